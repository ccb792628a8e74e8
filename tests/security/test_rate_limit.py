"""Rate limits under a concurrent burst: the number admitted is the token-bucket arithmetic
(burst + rate x elapsed) within a few percent, and every refusal is RESOURCE_EXHAUSTED with
RetryInfo (and QuotaFailure) telling the caller when to come back.

Both mechanisms: the kit's per-caller limit on every service (FINSIGHT_RATE_LIMIT_*), and
the gateway's per-tenant completions-per-minute limit (LLM_GATEWAY_RPM).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.errors import StatusInfo, status_info
from tests.security.requests import user_message
from tests.security.stack import RESULTS_DIR, Stack, start_stack

RATE = 2.0  # tokens per second
BURST = 100
SHOTS = 300
RESULTS = RESULTS_DIR


async def burst(
    call: Callable[[], Awaitable[Any]], shots: int
) -> tuple[int, list[StatusInfo], float]:
    """Fire `shots` calls at once; (admitted, refusals, seconds from first send to last answer)."""
    refusals: list[StatusInfo] = []
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        try:
            await call()
            admitted += 1
        except grpc.aio.AioRpcError as err:
            refusals.append(status_info(err))

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(shots)))
    return admitted, refusals, time.monotonic() - started


def check_bucket(admitted: int, elapsed: float, rate: float, burst_size: int) -> dict[str, Any]:
    """The bucket's arithmetic, exactly: a full bucket admits `burst` at once, plus what
    refills while the burst lasts (+1 for a token refilled between two decisions)."""
    ceiling = burst_size + rate * elapsed
    assert burst_size <= admitted <= ceiling + 1, (admitted, burst_size, ceiling)
    return {
        "admitted": admitted,
        "bucket_min": burst_size,
        "bucket_max": round(ceiling + 1, 1),
        "over_burst_pct": round(100 * (admitted - burst_size) / burst_size, 2),
        "elapsed_s": round(elapsed, 2),
    }


def check_refusals(refusals: list[StatusInfo], reason: str, max_retry_s: float) -> None:
    assert refusals, "the burst was never limited"
    for info in refusals:
        assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info
        assert info.reason == reason, info
        assert info.retry_after is not None and 0 < info.retry_after <= max_retry_s, info
        assert info.quota, info  # QuotaFailure names whose limit it was


@pytest.fixture(scope="module")
async def limited(tmp_path_factory: pytest.TempPathFactory) -> Any:
    stack = await start_stack(
        tmp_path_factory.mktemp("ratelimit"),
        common={
            "finsight_rate_limit_enabled": True,
            "finsight_rate_limit_rps": RATE,
            "finsight_rate_limit_burst": BURST,
        },
        gateway={"llm_gateway_rpm": 60},
    )
    yield stack
    await stack.close()


def cheap_calls(stack: Stack, who: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    md = stack.keys.md(who)
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    return {
        "memory": lambda: mem.GetConsent(
            mpb.GetConsentRequest(user_id="u1"), metadata=md, timeout=20
        ),
        "analytics": lambda: an.ListSymbols(apb.ListSymbolsRequest(), metadata=md, timeout=20),
        "llm_gateway": lambda: gw.ListModels(gpb.ListModelsRequest(), metadata=md, timeout=20),
    }


async def test_kit_rate_limit_holds_under_a_burst_on_every_service(limited: Stack) -> None:
    figures: dict[str, Any] = {}
    for service, call in cheap_calls(limited, "alice").items():
        admitted, refusals, elapsed = await burst(call, SHOTS)
        figures[service] = check_bucket(admitted, elapsed, RATE, BURST)
        check_refusals(refusals, "RATE_LIMITED", max_retry_s=1 / RATE + 0.01)
        assert refusals[0].quota[0].subject == "caller:alice"
        # Another caller has a bucket of its own; and the limited one recovers after waiting.
        await cheap_calls(limited, "bob")[service]()
        await asyncio.sleep(max(r.retry_after or 0 for r in refusals))
        await call()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rate-limit.json").write_text(json.dumps(figures, indent=2))
    print(f"\nkit limit rate={RATE}/s burst={BURST}, {SHOTS} concurrent calls: {figures}")


async def test_gateway_tenant_rpm_holds_under_a_burst(limited: Stack) -> None:
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(limited.channel("llm_gateway"))
    md = limited.keys.md("bob_writer")  # tenant globex: its own RPM bucket, own kit bucket

    async def complete() -> Any:
        return await gw.Complete(
            gpb.CompleteRequest(messages=[user_message("hi")], max_tokens=4),
            metadata=md,
            timeout=30,
        )

    admitted, refusals, elapsed = await burst(complete, 90)
    # The kit's own per-caller bucket (BURST=100) is not what limits 90 calls.
    figures = check_bucket(admitted, elapsed, 60 / 60.0, 60)
    check_refusals(refusals, "TENANT_RPM_EXCEEDED", max_retry_s=1.01)
    usage = await gw.GetUsage(gpb.GetUsageRequest(), metadata=md, timeout=10)
    assert usage.total_requests == admitted  # refused completions were never billed
    print(f"\ngateway rpm=60, 90 concurrent completions: {figures}")
