"""Defects the fuzz and bad-input suites found in the services, each pinned by a test.

Each test states the contract. A defect not yet fixed is marked `xfail(strict=True)`, so
that the fix turns it into an XPASS (which fails the run) and the mark is dropped with it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from tests.fuzz.conftest import FUZZ_USERS, Seeded
from tests.security.stack import MEMORY, random_walk_series

STALL_LIMIT_S = 1.0


async def test_analytics_refuses_a_symbol_with_a_trailing_newline(seeded: Seeded) -> None:
    an = analytics_pb2_grpc.AnalyticsServiceStub(seeded.stack.channel("analytics"))

    async def stream() -> Any:
        yield apb.IngestBarsRequest(series=[random_walk_series("NLSYM\n", 5, seed=1)])

    reply = await an.IngestBars(stream(), metadata=seeded.stack.keys.md("alice_writer"))
    assert reply.inserted == 0 and reply.rejected >= 1


async def test_memory_refuses_an_expiry_beyond_the_representable_range(seeded: Seeded) -> None:
    mem = memory_pb2_grpc.MemoryServiceStub(seeded.stack.channel("memory"))
    far = Timestamp(seconds=10**13)  # year ~318,857
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mem.Remember(
            mpb.RememberRequest(
                user_id=FUZZ_USERS[0], facts=[mpb.NewFact(text="far future", expire_time=far)]
            ),
            metadata=seeded.stack.keys.md("alice"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _stall_while(stack: Any, process: str, make_call: Any) -> tuple[float, float]:
    """(seconds the oversize call took, worst latency of another caller's cheap RPC meanwhile)."""
    md = stack.keys.md("bob")
    cheap = {
        "memory": lambda: memory_pb2_grpc.MemoryServiceStub(stack.channel(process)).GetConsent(
            mpb.GetConsentRequest(user_id="x"), metadata=md, timeout=30
        ),
        "llm_gateway": lambda: llm_gateway_pb2_grpc.LlmGatewayServiceStub(
            stack.channel(process)
        ).ListModels(gpb.ListModelsRequest(), metadata=md, timeout=30),
    }[process]
    worst = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal worst
        while not done.is_set():
            t = time.perf_counter()
            await cheap()
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await make_call()  # pre-serialized bytes, sent only now, while the probe runs
    took = time.perf_counter() - started
    done.set()
    await task
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return took, worst


@pytest.mark.slow  # a timing measurement: runs in `make fuzz`, never in `make test`
async def test_an_oversize_memory_batch_does_not_stall_other_callers(seeded: Seeded) -> None:
    stack = seeded.stack
    huge = mpb.AppendMessagesRequest(
        session_id="stall",
        user_id="stall",
        messages=[mpb.NewMessage(metadata={"k": "v"})] * 100_000,
    ).SerializeToString()
    send = stack.channel("memory").unary_unary(f"/{MEMORY.full_name}/AppendMessages")
    took, worst = await _stall_while(
        stack, "memory", lambda: send(huge, metadata=stack.keys.md("alice"), timeout=60)
    )
    print(f"refusing took {took:.2f}s; others waited {worst:.2f}s")
    assert worst < STALL_LIMIT_S, f"refusing took {took:.2f}s; others waited {worst:.2f}s"


async def test_memory_forget_refuses_a_filter_time_beyond_the_representable_range(
    seeded: Seeded,
) -> None:
    mem = memory_pb2_grpc.MemoryServiceStub(seeded.stack.channel("memory"))
    far = Timestamp(seconds=2**55)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mem.Forget(
            mpb.ForgetRequest(user_id=FUZZ_USERS[0], filter=mpb.FactFilter(created_before=far)),
            metadata=seeded.stack.keys.md("alice"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_memory_recall_handles_a_filter_time_beyond_the_representable_range(
    seeded: Seeded,
) -> None:
    mem = memory_pb2_grpc.MemoryServiceStub(seeded.stack.channel("memory"))
    far = Timestamp(seconds=2**55)
    flt = mpb.FactFilter(kinds=["pref"], created_after=far)
    try:
        reply = await mem.Recall(
            mpb.RecallRequest(user_id=FUZZ_USERS[0], query="risk", filter=flt),
            metadata=seeded.stack.keys.md("alice"),
        )
        assert not reply.facts  # nothing was created after that
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.code()
