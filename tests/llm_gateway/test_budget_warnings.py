"""Budget warnings: 80% / 100% of a tenant's daily budget counted once (metric, log, usage
stream event), and GetUsage's budget fraction and projected exhaustion time; real Redis and
the dev provider."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.devprovider import DevProvider, DevProviderControl
from services.llm_gateway.usage import project_exhaustion
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import start_gateway
from tests.llm_gateway.test_accounting import nanos

BUDGET = 200_000  # nano-USD (0.0002 USD)


def crossed(threshold: str) -> float:
    value = REGISTRY.get_sample_value(
        "llm_gateway_budget_threshold_crossed_total", {"threshold": threshold}
    )
    assert value is not None, "both threshold series exist from start-up"
    return value


async def budget_events(url: str) -> list[dict[bytes, bytes]]:
    redis = Redis.from_url(url)
    try:
        entries: list[Any] = await redis.xrange("llm:usage-events")  # type: ignore[assignment]
    finally:
        await redis.aclose()
    return [f for _, f in entries if f.get(b"type") == b"budget_threshold"]


async def test_thresholds_fire_once_each_even_when_concurrent_requests_cross_together(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    before = {t: crossed(t) for t in ("0.8", "1.0")}
    gw = await start_gateway(
        tmp_path, private_redis.url, api_keys, provider, llm_gateway_daily_budget_usd="0.0002"
    )
    try:
        # A plain completion costs a few µUSD; below, the dev provider reports more output
        # tokens (0.42 USD per million) than the reservation assumed, to set the spend.
        first = await gw.complete("spend", max_tokens=20)
        cost = nanos(first.cost)
        assert 0 < cost < BUDGET // 20
        # 12 concurrent requests take the recorded cost from < 80% to >= 80% (while each
        # reservation still fits), several of them after the crossing: counted once.
        per = BUDGET * 95 // 100 // 12 + 1
        tokens = per // 420 + 1  # completion tokens (420 nano-USD each) costing at least `per`
        await control.script(default={"usage": {"completion_tokens": tokens}, "delay_ms": 30})
        results = await asyncio.gather(
            *(gw.complete(f"spend {i}", max_tokens=20) for i in range(12)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, pb.CompleteResponse)]
        spent = cost + sum(nanos(r.cost) for r in ok)
        assert spent * 10 >= BUDGET * 8, (spent, [type(r) for r in results])
        if spent < BUDGET:
            # Not at 100% yet: one more (over-reporting) completion gets there.
            await control.script(default={"usage": {"completion_tokens": 10 * tokens}})
            more = await asyncio.gather(
                *(gw.complete(f"more {i}", max_tokens=20) for i in range(4)),
                return_exceptions=True,
            )
            spent += sum(nanos(r.cost) for r in more if isinstance(r, pb.CompleteResponse))
        assert spent >= BUDGET
        await gw.accounted()  # answers are accounted just after they are returned
        assert crossed("0.8") - before["0.8"] == 1
        assert crossed("1.0") - before["1.0"] == 1

        events = await budget_events(private_redis.url)
        assert [e[b"threshold"] for e in events] == [b"0.8", b"1.0"]
        today = datetime.now(UTC).strftime("%Y%m%d").encode()
        for event in events:
            assert event[b"tenant"] == b"acme" and event[b"day"] == today
            assert int(event[b"budget_nanos"]) == BUDGET
        assert BUDGET * 8 <= int(events[0][b"spent_nanos"]) * 10 < BUDGET * 10
        assert int(events[1][b"spent_nanos"]) >= BUDGET

        # Budget used up: nothing is left, the projection is now; nothing fires again.
        usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        assert usage.budget_used_fraction >= 1.0
        assert nanos(usage.remaining_budget_today) == 0
        assert usage.HasField("projected_exhaustion_time")
        at = usage.projected_exhaustion_time.ToDatetime(tzinfo=UTC)
        assert abs((at - datetime.now(UTC)).total_seconds()) < 5
        assert crossed("0.8") - before["0.8"] == 1 and crossed("1.0") - before["1.0"] == 1
    finally:
        await gw.close()


async def test_get_usage_projection_with_and_without_a_budget(
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
        llm_gateway_tenant_limits={"acme": {"daily_budget_usd": "1000"}},
    )
    try:
        fresh = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        assert fresh.HasField("daily_budget") and fresh.budget_used_fraction == 0
        assert not fresh.HasField("projected_exhaustion_time")  # nothing spent: no rate yet
        reply = await gw.complete("some spend")
        usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
        assert usage.budget_used_fraction == nanos(reply.cost) / 1000e9
        # A tiny spend against 1000 USD lasts far beyond midnight: unset.
        assert not usage.HasField("projected_exhaustion_time")
        # bob has no budget: no budget fields at all.
        other = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md("bob"))
        assert not other.HasField("daily_budget")
        assert not other.HasField("projected_exhaustion_time") and other.budget_used_fraction == 0
    finally:
        await gw.close()


def test_projection_extends_todays_average_rate_to_the_budget() -> None:
    now = datetime(2025, 3, 1, 6, 0, tzinfo=UTC)  # 6 h into the day
    # 300 spent in 6 h = 50/h; 600 left → 12 h more → 18:00.
    assert project_exhaustion(now, 300, 600) == datetime(2025, 3, 1, 18, 0, tzinfo=UTC)
    assert project_exhaustion(now, 300, 0) == now  # already spent
    assert project_exhaustion(now, 0, 600) is None  # no rate yet
    assert project_exhaustion(now, 300, 1000) is None  # 02:00 the next day: after the reset
    almost = datetime(2025, 3, 1, 23, 59, 59, tzinfo=UTC)
    # 86399 s elapsed, 86_399_000 spent: 1000/s; 500 left → half a second before midnight.
    assert project_exhaustion(almost, 86_399_000, 500) == almost + timedelta(seconds=0.5)
    assert project_exhaustion(almost, 86_399_000, 1000) is None  # exactly midnight: reset
