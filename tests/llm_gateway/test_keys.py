"""Several keys and base URLs per provider: weighted balance, a cool-down per key after
429/401/403 without cooling the others, the key id (never the key) in responses, usage and
spans, and key rotation from a file without a restart (real gateway, real dev provider)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tracing import configure_tracing
from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.deployments import Balancer, Deployment, KeySource, Slot
from services.llm_gateway.providers import ProviderError
from services.llm_gateway.retry import RetryPolicy
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import GatewayFactory, Gw, start_gateway

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


def prompt(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def providers(provider: DevProvider, *deployments: dict[str, Any]) -> dict[str, Any]:
    return {
        "llm_gateway_providers": {
            "deepseek": {"base_url": provider.root_url, "deployments": list(deployments)}
        }
    }


def key_of(entry: dict[str, Any]) -> str:
    return str(entry["headers"].get("authorization", "")).removeprefix("Bearer ")


async def test_sequential_traffic_splits_by_weight_and_says_which_key_answered(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw = await start_gateway(
        tmp_path,
        private_redis.url,
        api_keys,
        provider,
        **providers(
            provider,
            {"id": "east", "base_url": provider.root_url, "api_key": DEFAULT_API_KEY, "weight": 3},
            {"id": "west", "base_url": provider.base_url, "api_key": DEFAULT_API_KEY},
        ),
    )
    try:
        await _split_by_weight(gw, private_redis, control)
    finally:
        await gw.close()


async def _split_by_weight(
    gw: Gw, private_redis: RedisProcess, control: DevProviderControl
) -> None:
    replies = [await gw.complete(prompt("split")) for _ in range(8)]
    assert sorted(r.provider_key_id for r in replies) == ["east"] * 6 + ["west"] * 2
    paths = [e["path"] for e in await control.requests()]
    assert paths.count("/chat/completions") == 6 and paths.count("/v1/chat/completions") == 2
    await gw.accounted()  # answers are accounted just after they are returned
    # Usage stream and ListModels name the key id, never the key.
    redis = Redis.from_url(private_redis.url)
    try:
        events: list[Any] = await redis.xrange("llm:usage-events")  # type: ignore[assignment]
    finally:
        await redis.aclose()
    ids = sorted(fields[b"provider_key_id"].decode() for _, fields in events)
    assert ids == ["east"] * 6 + ["west"] * 2
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md(), timeout=5)
    deepseek = next(p for p in models.providers if p.name == "deepseek")
    assert [(k.id, k.weight, k.available) for k in deepseek.keys] == [
        ("east", 3, True),
        ("west", 1, True),
    ]
    assert DEFAULT_API_KEY not in str(models)


async def test_a_refused_key_cools_down_alone_and_the_retry_goes_to_another(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **providers(
            provider,
            {"id": "revoked", "api_key": "fsk-revoked-key"},
            {"id": "good", "api_key": DEFAULT_API_KEY},
        ),
    )
    _EXPORTER.clear()
    replies = [await gw.complete(prompt("auth")) for _ in range(4)]
    assert [r.provider_key_id for r in replies] == ["good"] * 4
    sent = await control.requests()
    assert [key_of(e) for e in sent].count("fsk-revoked-key") == 1  # tried once, then rests
    assert [e["status"] for e in sent][:2] in ([401, 200], [200, 401])
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md(), timeout=5)
    keys = {k.id: k for k in next(p for p in models.providers if p.name == "deepseek").keys}
    assert keys["revoked"].HasField("cooling_down_until") and not keys["good"].HasField(
        "cooling_down_until"
    )
    # The HTTP client span of each attempt names its key and status.
    http = [s for s in _EXPORTER.get_finished_spans() if s.name == "POST"]
    assert sorted(str((s.attributes or {})["finsight.llm.key_id"]) for s in http) == [
        "good",
        "good",
        "good",
        "good",
        "revoked",
    ]
    statuses = {
        (s.attributes or {})["finsight.llm.key_id"]: (s.attributes or {})[
            "http.response.status_code"
        ]
        for s in http
    }
    assert statuses == {"good": 200, "revoked": 401}
    assert all(DEFAULT_API_KEY not in json.dumps(dict(s.attributes or {})) for s in http)


async def test_a_rate_limited_key_rests_for_its_retry_after_while_the_other_serves(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **providers(
            provider,
            {"id": "one", "api_key": DEFAULT_API_KEY},
            {"id": "two", "base_url": provider.base_url, "api_key": DEFAULT_API_KEY},
        )
    )
    # Longer than the gateway would ever wait for (LLM_GATEWAY_RETRY_AFTER_CAP_S): with one
    # key this request would fail at once; here the other key answers it.
    await control.script({"status": 429, "retry_after": 120})
    reply = await gw.complete(prompt("rate"))
    assert reply.attempts == 2
    sent = await control.requests()
    limited = "one" if sent[0]["path"] == "/chat/completions" else "two"
    assert reply.provider_key_id != limited
    later = [await gw.complete(prompt("rate later")) for _ in range(3)]
    assert {r.provider_key_id for r in later} == {reply.provider_key_id}
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md(), timeout=5)
    keys = {k.id: k for k in next(p for p in models.providers if p.name == "deepseek").keys}
    rests = keys[limited].cooling_down_until.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=100) < rests <= timedelta(seconds=120)


async def test_every_key_refused_is_the_providers_answer(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **providers(
            provider, {"id": "k1", "api_key": "wrong-1"}, {"id": "k2", "api_key": "wrong-2"}
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(prompt("no key works"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status_info(err.value).reason == "PROVIDER_AUTH"
    assert sorted(key_of(e) for e in await control.requests()) == ["wrong-1", "wrong-2"]


async def test_a_key_file_rotates_without_a_restart(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl, tmp_path: Path
) -> None:
    key_file = tmp_path / "deepseek.key"
    key_file.write_text("old-revoked-key\n")
    gw = await gateway_with(**providers(provider, {"id": "mounted", "api_key_file": str(key_file)}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(prompt("before rotation"))
    assert status_info(err.value).reason == "PROVIDER_AUTH"
    key_file.write_text(DEFAULT_API_KEY + "\n")  # the Secret is rotated in place
    await asyncio.sleep(1.1)  # the file is looked at no more than once a second
    reply = await gw.complete(prompt("after rotation"))
    assert reply.provider_key_id == "mounted"
    assert key_of((await control.requests())[-1]) == DEFAULT_API_KEY


def test_a_retry_on_another_key_does_not_back_off() -> None:
    policy = RetryPolicy(max_retries=3, base_s=5, max_backoff_s=5, retry_after_cap_s=20)
    refused = ProviderError("p", "401", status=401, retry_after=None)
    refused.retry_elsewhere = True
    assert refused.retryable and policy.wait_s(1, refused) == 0.0
    rate_limited = ProviderError("p", "429", status=429, retry_after=7)
    assert policy.wait_s(1, rate_limited) >= 7  # one key only: its Retry-After is honoured


def test_concurrent_load_goes_where_fewest_wait_per_weight() -> None:
    now = [0.0]
    a, b = (Slot(Deployment(i, "http://x", KeySource("k"), w)) for i, w in (("a", 2), ("b", 1)))
    balancer = Balancer(
        "p", [a, b], rate_limit_cooldown_s=10, auth_cooldown_s=60, clock=lambda: now[0]
    )
    picks = []
    for _ in range(6):  # none finishes: in flight grows
        slot = balancer.pick()
        slot.in_flight += 1
        picks.append(slot.id)
    assert picks.count("a") == 4 and picks.count("b") == 2
    assert balancer.refused(a, 429, None)  # b can take the retry now
    assert a.cool_until == 10 and balancer.cooling() == ["a"]
    assert {balancer.pick().id for _ in range(3)} == {"b"}
    assert not balancer.refused(b, 403, None)  # nobody is left: no retry elsewhere
    assert balancer.pick() is a  # both rest: the one back first is tried
    now[0] = 11
    assert balancer.cooling() == ["b"] and balancer.pick() is a
