"""Complete end to end: gRPC → gateway → the dev provider over real HTTP."""

from __future__ import annotations

import itertools
import time
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tokens import count_messages
from libs.devprovider import DevProvider, DevProviderControl
from services.llm_gateway.pricing import Pricing, Usage
from tests.conftest import Keys, free_port
from tests.llm_gateway.conftest import GatewayFactory, Gw, start_gateway, system, user

DEEPSEEK = Pricing(Decimal("0.028"), Decimal("0.28"), Decimal("0.42"))


def money_nanos(m: object) -> int:
    return int(m.units) * 1_000_000_000 + int(m.nanos)  # type: ignore[attr-defined]


async def test_complete_answers_with_usage_cost_and_provenance(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"usage": {"prompt_cache_hit_tokens": 2}})
    reply = await gw.complete("what is the price of risk", max_tokens=50)
    assert reply.content == "echo: what is the price of risk"
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert (reply.provider, reply.model, reply.route) == ("deepseek", "deepseek-chat", "default")
    assert reply.attempts == 1 and not reply.cached and not reply.truncated
    u = reply.usage
    assert (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens) == (7, 7, 2)
    assert u.total_tokens == 14
    # 2 cache-hit + 5 cache-miss prompt tokens + 7 output tokens, priced separately.
    expected = DEEPSEEK.cost_nanos(Usage(prompt=7, completion=7, cached_prompt=2))
    assert expected == 2 * 28 + 5 * 280 + 7 * 420
    assert money_nanos(reply.cost) == expected and reply.cost.currency_code == "USD"
    sent = (await control.requests())[-1]["body"]
    assert sent["model"] == "deepseek-chat" and sent["max_tokens"] == 50
    assert sent["messages"] == [{"role": "user", "content": "what is the price of risk"}]


async def test_retries_a_503_then_answers(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"status": 503}, {"status": 500})
    reply = await gw.complete("again")
    assert reply.content == "echo: again" and reply.attempts == 3
    assert [r["status"] for r in await control.requests()] == [503, 500, 200]


async def test_retry_after_is_honoured_on_every_attempt(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"status": 429, "retry_after": 0.4}, {"status": 429, "retry_after": 0.4})
    reply = await gw.complete("patience")
    assert reply.attempts == 3
    times = [r["mono"] for r in await control.requests()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 2 and all(gap >= 0.39 for gap in gaps), gaps


async def test_never_retries_past_the_callers_deadline(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"status": 503, "retry_after": 5})  # within the cap, past the deadline
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete("hurry", timeout=1.0)
    assert time.monotonic() - started < 0.9
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.UNAVAILABLE and info.reason == "PROVIDER_UNAVAILABLE"
    assert info.retry_after == pytest.approx(5, abs=0.01)
    assert len(await control.requests()) == 1


async def test_a_provider_slower_than_the_callers_deadline_is_deadline_exceeded_not_a_fault(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    # The caller's deadline ends the attempt: DEADLINE_EXCEEDED (not UNAVAILABLE, which
    # invites a retry), and the breaker does not count it against the provider.
    gw = await gateway_with(llm_gateway_breaker_fail_max=2)
    await control.script(default={"delay_ms": 3000})
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.complete("slow", timeout=0.6)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
        assert time.monotonic() - started < 1.2
    assert len(await control.requests()) == 3  # one attempt each: nothing left to retry
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md())
    assert {p.name: p.circuit_state for p in models.providers}["deepseek"] == (
        pb.CIRCUIT_STATE_CLOSED
    )
    await control.script(default={})
    assert (await gw.complete("fast again")).content == "echo: fast again"


async def test_retry_after_above_the_cap_is_returned_not_waited(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script(default={"status": 429, "retry_after": 120})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete("later")
    info = status_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_RATE_LIMITED")
    assert info.retry_after == pytest.approx(120, abs=0.5)
    assert len(await control.requests()) == 1


@pytest.mark.parametrize(
    ("status", "code", "reason", "retry_info"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_INVALID_REQUEST", False),
        (422, grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_INVALID_REQUEST", False),
        (401, grpc.StatusCode.UNAVAILABLE, "PROVIDER_AUTH", False),
        (402, grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_INSUFFICIENT_BALANCE", False),
        (503, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", True),
    ],
)
async def test_provider_errors_map_to_stable_reasons(
    gw: Gw,
    control: DevProviderControl,
    status: int,
    code: grpc.StatusCode,
    reason: str,
    retry_info: bool,
) -> None:
    await control.script(default={"status": status})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete("fail")
    info = status_info(err.value)
    assert (info.code, info.reason) == (code, reason)
    assert (info.retry_after is not None) == retry_info
    assert info.metadata["http_status"] == str(status)
    # 4xx are never retried; 5xx are (1 + 2 retries).
    assert len(await control.requests()) == (3 if status >= 500 else 1)


async def test_hang_and_keepalive_lines_hit_the_absolute_attempt_deadline(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_attempt_timeout_s=0.4, llm_gateway_max_retries=0, llm_gateway_read_timeout_s=60
    )
    # Blank lines every 50 ms would keep an idle read timeout alive for ~8 minutes.
    await control.script({"keepalive_lines": 10_000, "keepalive_interval_ms": 50})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete("queued")
    assert time.monotonic() - started < 2
    assert status_info(err.value).reason == "PROVIDER_UNAVAILABLE"
    await control.script({"hang": True})
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.complete("hang")
    entries = await control.requests()
    assert len(entries) == 2


async def test_keepalive_lines_before_a_real_answer_are_tolerated(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"keepalive_lines": 3, "keepalive_interval_ms": 20})
    assert (await gw.complete("eventually")).content == "echo: eventually"


async def test_dropped_connection_is_retried(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"drop": True})
    reply = await gw.complete("flaky network")
    assert reply.attempts == 2 and reply.content == "echo: flaky network"


async def test_breaker_opens_and_short_circuits_with_retry_info(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_breaker_fail_max=3, llm_gateway_breaker_reset_s=30, llm_gateway_max_retries=0
    )
    await control.script(default={"status": 500})
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.complete("down")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete("still down")
    info = status_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert info.retry_after is not None and 25 < info.retry_after <= 30
    assert len(await control.requests()) == 3  # the 4th never reached the provider
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md())
    state = {p.name: p.circuit_state for p in models.providers}
    assert state["deepseek"] == pb.CIRCUIT_STATE_OPEN
    # A provider outage is not a readiness failure: the pod keeps serving.
    async with grpc.aio.insecure_channel(gw.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="finsight.llm.v1.LlmGatewayService")
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_fallback_to_the_next_link_when_retries_are_spent(
    tmp_path: Path,
    redis_url: str,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    async with DevProvider() as backup:
        gw = await start_gateway(
            tmp_path,
            redis_url,
            api_keys,
            provider,
            llm_gateway_max_retries=1,
            llm_gateway_providers={
                "backup": {"base_url": backup.base_url, "api_key": "sk-devprovider"}
            },
            llm_gateway_models={
                "backup-chat": {
                    "provider": "backup",
                    "provider_model": "deepseek-chat",
                    "context_window": 65536,
                    "max_output_tokens": 4096,
                    "input_cache_hit_per_mtok": "0.1",
                    "input_cache_miss_per_mtok": "1",
                    "output_per_mtok": "2",
                    "prices_as_of": "2025-10-01",
                }
            },
            llm_gateway_routes={"default": {"models": ["deepseek-chat", "backup-chat"]}},
        )
        try:
            await control.script(default={"status": 502})
            reply = await gw.complete("anyone there")
            assert reply.provider == "backup" and reply.content == "echo: anyone there"
            assert reply.attempts == 3  # 2 on deepseek + 1 on backup
            # The backup's own prices apply.
            u = reply.usage
            assert money_nanos(reply.cost) == u.prompt_tokens * 1000 + u.completion_tokens * 2000
            # A 400 does not fall back: another provider would reject it too.
            await control.script(default={"status": 400})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gw.complete("bad")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(backup.state.log) == 1
        finally:
            await gw.close()


async def test_no_provider_configured_serves_everything_but_completions(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    gw = await start_gateway(tmp_path, redis_url, api_keys, None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.complete("hello")
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.reason == "NO_PROVIDER_CONFIGURED" and "DEEPSEEK_API_KEY" in info.message
        models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md())
        chat = next(m for m in models.models if m.name == "deepseek-chat")
        assert not chat.available and chat.context_window == 131072
        assert chat.max_output_tokens == 8192
        assert money_nanos(chat.pricing.output_per_million) == 420_000_000
        assert (chat.pricing.as_of.year, chat.pricing.as_of.month, chat.pricing.as_of.day) == (
            2025,
            9,
            29,
        )
        reasoner = next(m for m in models.models if m.name == "deepseek-reasoner")
        assert reasoner.max_output_tokens == 65536
        assert {r.alias for r in models.routes} >= {"default", "reasoning"}
        counted = await gw.stub.CountTokens(
            pb.CountTokensRequest(messages=[system("Be terse."), user("Hello world")]),
            metadata=gw.md(),
        )
        assert counted.prompt_tokens == count_messages(
            [("system", "Be terse."), ("user", "Hello world")]
        )
        usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        assert usage.total_requests >= 0
    finally:
        await gw.close()


async def test_unreachable_provider_answers_unavailable_quickly(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    gw = await start_gateway(
        tmp_path,
        redis_url,
        api_keys,
        None,
        deepseek_api_key="sk-x",
        deepseek_base_url=f"http://127.0.0.1:{free_port()}",
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.complete("anyone")
        info = status_info(err.value)
        assert (info.code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert info.retry_after is not None
    finally:
        await gw.close()


async def test_count_tokens_matches_known_counts(gw: Gw) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 150
    counted = await gw.stub.CountTokens(
        pb.CountTokensRequest(model="reasoning", messages=[user(text)]), metadata=gw.md()
    )
    # 1,501 content tokens (tests/common/test_tokens.py) + <|User|> + BOS + <|Assistant|>.
    assert counted.prompt_tokens == 1501 + 1 + 2
    assert list(counted.message_tokens) == [1502]
    assert counted.model == "deepseek-reasoner" and counted.max_output_tokens == 65536
