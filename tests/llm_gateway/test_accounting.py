"""Tenant limits, budgets, the response cache and usage accounting, on a real Redis server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.devprovider import DevProvider, DevProviderControl
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import GatewayFactory, Gw, start_gateway, system, user


def nanos(m: object) -> int:
    return int(m.units) * 1_000_000_000 + int(m.nanos)  # type: ignore[attr-defined]


async def test_deterministic_requests_are_cached_per_tenant(
    gw: Gw, control: DevProviderControl
) -> None:
    first = await gw.complete("cache me", temperature=0)
    second = await gw.complete("cache me", temperature=0)
    assert not first.cached and second.cached
    assert second.content == first.content and nanos(second.cost) == 0 and nanos(first.cost) > 0
    assert second.attempts == 0 and second.usage.completion_tokens == first.usage.completion_tokens
    assert len(await control.requests()) == 1
    # Another tenant never sees acme's answers.
    other = await gw.complete("cache me", who="bob", temperature=0)
    assert not other.cached
    # Not deterministic: not cached; explicit policies override.
    await gw.complete("cache me")
    forced = await gw.complete("cache me", cache_policy=pb.CACHE_POLICY_DISABLED, temperature=0)
    assert not forced.cached
    assert len(await control.requests()) == 4
    opted = await gw.complete("warm", cache_policy=pb.CACHE_POLICY_ENABLED, temperature=0.7)
    again = await gw.complete("warm", cache_policy=pb.CACHE_POLICY_ENABLED, temperature=0.7)
    assert not opted.cached and again.cached


async def test_cache_entries_expire(gw: Gw, control: DevProviderControl) -> None:
    await gw.complete("short lived", temperature=0, cache_ttl_seconds=1)
    await asyncio.sleep(1.2)
    assert not (await gw.complete("short lived", temperature=0)).cached


async def test_usage_counters_and_stream_events(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw = await start_gateway(tmp_path, private_redis.url, api_keys, provider)
    try:
        replies = [
            await gw.complete("one two three"),
            await gw.complete("four five"),
            await gw.complete("cached", temperature=0),
            await gw.complete("cached", temperature=0),
        ]
        await gw.complete("for bob", who="bob")
        usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        assert len(usage.rows) == 1
        row = usage.rows[0]
        assert row.model == "deepseek-chat" and row.requests == 4 and row.cache_hits == 1
        billed = replies[:3]
        assert row.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in billed)
        assert row.usage.completion_tokens == sum(r.usage.completion_tokens for r in billed)
        assert nanos(row.cost) == sum(nanos(r.cost) for r in replies) == nanos(usage.total_cost)
        assert usage.total_requests == 4 and not usage.HasField("daily_budget")
        filtered = await gw.stub.GetUsage(
            pb.GetUsageRequest(model="deepseek-reasoner"), metadata=gw.md()
        )
        assert not filtered.rows
        redis = Redis.from_url(private_redis.url)
        try:
            events: list[Any] = await redis.xrange("llm:usage-events")  # type: ignore[assignment]
        finally:
            await redis.aclose()
        assert len(events) == 5
        fields = events[0][1]
        assert fields[b"tenant"] == b"acme" and fields[b"model"] == b"deepseek-chat"
        assert int(fields[b"cost_nanos"]) == nanos(replies[0].cost)
        assert [e[1][b"cached"] for e in events[:4]] == [b"0", b"0", b"0", b"1"]
    finally:
        await gw.close()


async def test_get_usage_rejects_bad_ranges(gw: Gw) -> None:
    bad = pb.GetUsageRequest()
    bad.range.start.year, bad.range.start.month, bad.range.start.day = 2025, 2, 30
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.GetUsage(bad, metadata=gw.md())
    assert [v.field for v in status_info(err.value).field_violations] == ["range.start"]
    wide = pb.GetUsageRequest()
    wide.range.start.year, wide.range.start.month, wide.range.start.day = 2020, 1, 1
    wide.range.end.year, wide.range.end.month, wide.range.end.day = 2025, 1, 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.GetUsage(wide, metadata=gw.md())
    assert status_info(err.value).code == grpc.StatusCode.INVALID_ARGUMENT


async def test_requests_per_minute_limit(
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
        llm_gateway_tenant_limits={"acme": {"rpm": 2}},
    )
    try:
        await gw.complete("a")
        await gw.complete("b")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.complete("c")
        info = status_info(err.value)
        assert (info.code, info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TENANT_RPM_EXCEEDED",
        )
        assert info.retry_after is not None and 0 < info.retry_after <= 30
        assert info.quota and info.quota[0].subject == "tenant:acme"
        assert len(await control.requests()) == 2
        await gw.complete("bob is not limited", who="bob")
    finally:
        await gw.close()


async def test_tokens_per_minute_limit_refunds_unused_tokens(
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
        llm_gateway_tenant_limits={"acme": {"tpm": 100}},
    )
    try:
        # Each request reserves prompt + max_tokens (~5 + 60) but uses ~8: the rest comes back,
        # so many more than 100 / 65 requests fit in the minute.
        for i in range(5):
            await gw.complete(f"short {i}", max_tokens=60)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.complete("x " * 200, max_tokens=60)
        info = status_info(err.value)
        assert (info.code, info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TENANT_TPM_EXCEEDED",
        )
        assert info.retry_after is not None and info.quota
    finally:
        await gw.close()


async def test_daily_budget_is_never_exceeded_under_concurrency(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    # Each request may cost up to (prompt + 100 output tokens) at 0.28/0.42 per 1M: ~45 µUSD.
    # A 200 µUSD budget admits 4 reservations at once, whatever the concurrency.
    gw = await start_gateway(
        tmp_path, private_redis.url, api_keys, provider, llm_gateway_daily_budget_usd="0.0002"
    )
    try:
        await control.script(default={"delay_ms": 100})
        results = await asyncio.gather(
            *(gw.complete(f"spend {i}", max_tokens=100) for i in range(10)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, pb.CompleteResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 4 and len(refused) == 6
        info = status_info(refused[0])
        assert (info.code, info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DAILY_BUDGET_EXHAUSTED",
        )
        assert info.quota and info.retry_after is not None and info.retry_after > 0
        # Reservations were replaced by the real (much lower) cost: more requests now fit.
        usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        spent = sum(nanos(r.cost) for r in ok)
        assert nanos(usage.daily_budget) == 200_000
        assert nanos(usage.remaining_budget_today) == 200_000 - spent
        await gw.complete("after settlement", max_tokens=100)
    finally:
        await gw.close()


async def test_context_is_fitted_by_dropping_the_oldest_turns(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_models={
            "deepseek-chat": {
                "context_window": 300,
                "max_output_tokens": 100,
                "default_max_tokens": 100,
            },
            "big-chat": {
                "provider": "deepseek",
                "provider_model": "deepseek-chat",
                "context_window": 131072,
                "max_output_tokens": 8192,
                "input_cache_hit_per_mtok": "0.028",
                "input_cache_miss_per_mtok": "0.28",
                "output_per_mtok": "0.42",
            },
        },
        llm_gateway_routes={"roomy": {"models": ["deepseek-chat"], "context_fallback": "big-chat"}},
    )
    filler = "lorem ipsum dolor sit amet " * 20  # ~100 tokens per turn
    messages = [
        system("Be brief."),
        user(filler),
        user(filler),
        user(filler),
        user("the question"),
    ]
    reply = await gw.complete(messages=messages)
    assert reply.truncated and list(reply.dropped_message_indices) == [1, 2]
    sent = (await control.requests())[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["Be brief.", filler, "the question"]
    # The route with a larger-context fallback sends the whole conversation there.
    roomy = await gw.complete(messages=messages, model="roomy")
    assert not roomy.truncated
    assert len((await control.requests())[-1]["body"]["messages"]) == 5
    # Even system + last user message do not fit: INVALID_ARGUMENT before any call.
    calls = len(await control.requests())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(messages=[system(filler * 3), user("q")])
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["messages"]
    assert len(await control.requests()) == calls
