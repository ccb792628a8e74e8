"""Personal data stays home: redaction, restoration, block and allow, end to end (real gateway
gRPC server, real dev provider over HTTP, real Redis-protocol server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tracing import configure_tracing
from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.config import GatewaySettings
from tests.conftest import Keys, RedisProcess, make_settings
from tests.llm_gateway.conftest import GatewayFactory, Gw, start_gateway, system, user
from tests.llm_gateway.test_stream import collect, stream

EMAIL = "jane.doe@example.com"
IBAN = "DE89 3704 0044 0532 0130 00"
CARD = "4111 1111 1111 1111"
PHONE = "+44 20 7946 0958"
SSN = "536-22-1234"
ACCOUNT = "0012-3456-78"
VALUES = [EMAIL, IBAN, CARD, PHONE, SSN, ACCOUNT]
PROMPT = (
    f"Client {EMAIL} (phone {PHONE}, SSN {SSN}) wants to move funds from IBAN {IBAN} "
    f"to acct no. {ACCOUNT}; card {CARD} pays the fee of $1,234.56 for 2024."
)
REDACTED = (
    "Client [EMAIL_1] (phone [PHONE_1], SSN [SSN_1]) wants to move funds from IBAN [IBAN_1] "
    "to acct no. [ACCOUNT_1]; card [CARD_1] pays the fee of $1,234.56 for 2024."
)
ALL_KINDS = [("ACCOUNT", 1), ("CARD", 1), ("EMAIL", 1), ("IBAN", 1), ("PHONE", 1), ("SSN", 1)]
PRICES = {"input_cache_hit_per_mtok": "0", "input_cache_miss_per_mtok": "0", "output_per_mtok": "0"}

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


def kinds(redactions: Any) -> list[tuple[str, int]]:
    return [(r.kind, r.count) for r in redactions]


def holds_any(value: object, secrets: list[str] = VALUES) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return [s for s in secrets if s in text or s.replace(" ", "") in text]


def home_provider(provider: DevProvider) -> dict[str, Any]:
    """A second provider ("local", inside the deployment) served by the same dev provider."""
    return {
        "llm_gateway_providers": {
            "local": {"base_url": provider.base_url, "api_key": DEFAULT_API_KEY, "external": False}
        },
        "llm_gateway_models": {
            "local-chat": {
                "provider": "local",
                "provider_model": "deepseek-chat",
                "context_window": 65536,
                "max_output_tokens": 8192,
                **PRICES,
            }
        },
    }


async def test_external_provider_never_sees_the_values_and_the_caller_gets_them_back(
    gw: Gw, control: DevProviderControl
) -> None:
    reply = await gw.complete(messages=[system(f"Escalate to {EMAIL}."), user(PROMPT)])
    assert reply.content == "echo: " + PROMPT  # the dev provider echoed placeholders
    assert kinds(reply.redactions) == [(k, n + (k == "EMAIL")) for k, n in ALL_KINDS]
    body = (await control.requests())[-1]["body"]
    assert holds_any(body) == []
    assert body["messages"] == [
        {"role": "system", "content": "Escalate to [EMAIL_1]."},
        {"role": "user", "content": REDACTED},
    ]
    # An answer that uses the placeholders in its own words is restored too.
    await control.script({"content": "Done: [IBAN_1] → [ACCOUNT_1], receipt to [EMAIL_1]."})
    reply = await gw.complete(PROMPT)
    assert reply.content == f"Done: {IBAN} → {ACCOUNT}, receipt to {EMAIL}."
    # Text without personal data goes out untouched and reports nothing.
    plain = await gw.complete("Revenue rose 34.1% to $1,234,567 in 2024.")
    assert plain.content == "echo: Revenue rose 34.1% to $1,234,567 in 2024."
    assert list(plain.redactions) == []


async def test_streamed_answers_are_restored_delta_by_delta(
    gw: Gw, control: DevProviderControl
) -> None:
    text, end = await collect(stream(gw, PROMPT))
    assert text == "echo: " + PROMPT
    assert end is not None and kinds(end.redactions) == ALL_KINDS
    assert holds_any((await control.requests())[-1]["body"]) == []
    # Placeholders glued to punctuation, a bracket that is no placeholder, and one the
    # gateway never issued, one word (= one delta) each.
    await control.script(
        {
            "content": "[note] ([EMAIL_1],[IBAN_1]). [EMAIL_7] [PHONE_1]",
            "reasoning_content": "look up [SSN_1]",
        }
    )
    deltas: list[pb.CompletionDelta] = []
    async for message in stream(gw, PROMPT):
        if message.HasField("delta"):
            deltas.append(message.delta)
    assert "".join(d.content for d in deltas) == f"[note] ({EMAIL},{IBAN}). [EMAIL_7] {PHONE}"
    assert "".join(d.reasoning_content for d in deltas) == f"look up {SSN}"
    assert len(deltas) > 3  # still streamed, not buffered to the end


async def test_cache_keys_entries_and_usage_events_hold_no_values(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw = await start_gateway(tmp_path, private_redis.url, api_keys, provider)
    redis = Redis.from_url(private_redis.url)
    try:
        first = await gw.complete(f"Summarise the account of {EMAIL}", temperature=0)
        assert not first.cached and first.content == f"echo: Summarise the account of {EMAIL}"
        # Keyed on the redacted prompt: another client's address hits the same entry, and
        # gets its own address back.
        other = await gw.complete("Summarise the account of bob@example.org", temperature=0)
        assert other.cached and other.content == "echo: Summarise the account of bob@example.org"
        assert kinds(other.redactions) == [("EMAIL", 1)]
        text, end = await collect(
            stream(gw, "Summarise the account of carol@example.net", temperature=0)
        )
        assert end is not None and end.cached
        assert text == "echo: Summarise the account of carol@example.net"
        assert len(await control.requests()) == 1

        await gw.accounted()  # answers are accounted just after they are returned
        secrets = [EMAIL, "bob@example.org", "carol@example.net"]
        keys = [k async for k in redis.scan_iter(match="llm:*")]
        assert keys and holds_any(b"".join(keys).decode(), secrets) == []
        cached = [k for k in keys if b":cache:" in k]
        assert len(cached) == 1
        entry: bytes = (await redis.get(cached[0])) or b""  # type: ignore[assignment]
        assert b"[EMAIL_1]" in entry and holds_any(entry.decode(), secrets) == []
        events: list[Any] = await redis.xrange("llm:usage-events")  # type: ignore[assignment]
        assert len(events) == 3
        for _, fields in events:
            assert (
                holds_any(json.dumps({k.decode(): v.decode() for k, v in fields.items()}), secrets)
                == []
            )
            assert fields[b"redactions"] == b"EMAIL:1"
    finally:
        await redis.aclose()
        await gw.close()


async def test_block_refuses_with_the_kinds_and_calls_no_provider(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(llm_gateway_pii_policy="block")
    for call in (gw.complete(PROMPT), collect(stream(gw, PROMPT))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.reason == "PII_BLOCKED"
        assert info.metadata["kinds"] == "ACCOUNT,CARD,EMAIL,IBAN,PHONE,SSN"
        assert holds_any(info.message) == [] and holds_any(info.metadata) == []
    assert await control.requests() == []
    assert (await gw.complete("no personal data here")).content == "echo: no personal data here"


async def test_allow_sends_the_prompt_as_written(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(llm_gateway_pii_policy="allow")
    reply = await gw.complete(PROMPT)
    assert reply.content == "echo: " + PROMPT and list(reply.redactions) == []
    assert (await control.requests())[-1]["body"]["messages"][-1]["content"] == PROMPT


async def test_a_route_overrides_the_policy_both_ways(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_routes={
            "vault": {"models": ["deepseek-chat"], "pii_policy": "block"},
            "trusted": {"models": ["deepseek-chat"], "pii_policy": "allow"},
        }
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(f"IBAN {IBAN}", model="vault")
    info = status_info(err.value)
    assert info.reason == "PII_BLOCKED" and info.metadata == {"kinds": "IBAN", "route": "vault"}
    await gw.complete(f"IBAN {IBAN}", model="trusted")
    await gw.complete(f"IBAN {IBAN}")  # the default route: the setting's `redact`
    sent = [r["body"]["messages"][-1]["content"] for r in await control.requests()]
    assert sent == [f"IBAN {IBAN}", "IBAN [IBAN_1]"]


def test_a_route_policy_outside_the_vocabulary_is_a_configuration_error(
    tmp_path: Path, redis_url: str
) -> None:
    routes = {"x": {"models": ["deepseek-chat"], "pii_policy": "scrub"}}
    with pytest.raises(ValidationError, match="pii_policy"):
        make_settings(GatewaySettings, tmp_path, redis_url, None, llm_gateway_routes=routes)
    with pytest.raises(ValidationError, match="LLM_GATEWAY_PII_PHONE_REGION"):
        make_settings(GatewaySettings, tmp_path, redis_url, None, llm_gateway_pii_phone_region="XX")
    with pytest.raises(ValidationError, match="llm_gateway_pii_policy"):
        make_settings(GatewaySettings, tmp_path, redis_url, None, llm_gateway_pii_policy="maybe")


async def test_a_provider_inside_the_deployment_gets_the_prompt_as_written(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **home_provider(provider),
        llm_gateway_routes={"home": {"models": ["local-chat"]}},
    )
    reply = await gw.complete(PROMPT, model="home")
    assert reply.provider == "local" and list(reply.redactions) == []
    assert (await control.requests())[-1]["body"]["messages"][-1]["content"] == PROMPT


async def test_the_policy_follows_the_provider_actually_called_on_fallback(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **home_provider(provider),
        llm_gateway_routes={"spill": {"models": ["deepseek-chat", "local-chat"]}},
    )
    await control.script({"status": 503, "times": 3})  # DeepSeek's retries are spent
    reply = await gw.complete(PROMPT, model="spill", temperature=0)
    assert reply.provider == "local" and list(reply.redactions) == []
    assert reply.content == "echo: " + PROMPT
    sent = [r["body"]["messages"][-1]["content"] for r in await control.requests()]
    assert sent == [REDACTED] * 3 + [PROMPT]
    # The answer of a provider that saw the values was not cached: DeepSeek answers now.
    again = await gw.complete(PROMPT, model="spill", temperature=0)
    assert not again.cached and again.provider == "deepseek"
    assert kinds(again.redactions) == ALL_KINDS and again.content == "echo: " + PROMPT
    assert (await control.requests())[-1]["body"]["messages"][-1]["content"] == REDACTED


async def test_a_blocked_external_link_is_skipped_for_one_at_home(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **home_provider(provider),
        llm_gateway_pii_policy="block",
        llm_gateway_routes={"spill": {"models": ["deepseek-chat", "local-chat"]}},
    )
    reply = await gw.complete(PROMPT, model="spill")
    assert reply.provider == "local" and reply.content == "echo: " + PROMPT
    assert len(await control.requests()) == 1


async def test_metrics_spans_and_logs_carry_kinds_and_counts_never_values(
    gw: Gw, control: DevProviderControl, caplog: pytest.LogCaptureFixture
) -> None:
    def sample(kind: str) -> float:
        labels = {"kind": kind, "outcome": "redacted"}
        return REGISTRY.get_sample_value("llm_gateway_pii_redactions_total", labels) or 0.0

    before = sample("EMAIL")
    _EXPORTER.clear()
    with caplog.at_level(logging.DEBUG):
        await gw.complete(f"{EMAIL} and {EMAIL} again, IBAN {IBAN}")
    assert sample("EMAIL") == before + 2
    spans = _EXPORTER.get_finished_spans()
    attempt = [dict(s.attributes or {}) for s in spans if s.name == "chat deepseek-chat"]
    assert [a["finsight.llm.pii.redacted"] for a in attempt] == [3]
    screened = [dict(s.attributes or {}) for s in spans]
    screened = [a for a in screened if "finsight.llm.pii.outcome" in a]
    assert len(screened) == 1
    assert screened[0]["finsight.llm.pii.count"] == 3
    assert screened[0]["finsight.llm.pii.email"] == 2
    assert tuple(screened[0]["finsight.llm.pii.kinds"]) == ("EMAIL", "IBAN")  # type: ignore[arg-type]
    assert holds_any([dict(s.attributes or {}) for s in spans]) == []
    found = [r for r in caplog.records if r.getMessage() == "personal data in prompt"]
    assert [getattr(r, "pii", None) for r in found] == [{"EMAIL": 2, "IBAN": 1}]
    assert holds_any([r.getMessage() for r in caplog.records]) == []
    assert holds_any([{k: str(v) for k, v in r.__dict__.items()} for r in caplog.records]) == []
