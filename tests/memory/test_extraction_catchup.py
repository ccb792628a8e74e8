"""The extraction catch-up pass and GetExtractionStatus, end to end (the dev provider as
the LLM behind a real gateway): turns appended while the gateway is unreachable or the
queue is full are extracted by a later pass, exactly once; while the gateway is down a
pass only probes; with a shared store one replica per interval runs the pass."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.catchup import CATCHUP_CALLER, ExtractionCatchUp
from tests.conftest import Keys
from tests.llm_gateway.conftest import start_gateway
from tests.memory.test_extraction import Stack, _stack, audit_of, consent, counted, facts_of, say

CATCHUP: dict[str, Any] = {
    "memory_extraction_catchup_interval_s": 0,
    "memory_extraction_catchup_age_s": 0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def catchup_of(stack: Stack) -> ExtractionCatchUp:
    catchup = stack.memory.app.manager.catchup
    assert catchup is not None
    return catchup


async def status(stack: Stack, user: str, who: str = "alice") -> pb.GetExtractionStatusResponse:
    memory = stack.memory
    return await memory.stub.GetExtractionStatus(
        pb.GetExtractionStatusRequest(user_id=user), metadata=memory.md(who)
    )


def add(text: str) -> dict[str, Any]:
    return {"op": "ADD", "text": text, "kind": "holding"}


async def test_turns_missed_while_the_gateway_was_down_are_caught_up_once(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    port = free_port()
    overrides = {
        **CATCHUP,
        "memory_llm_gateway_target": f"127.0.0.1:{port}",
        "finsight_service_api_key": api_keys.service,
    }
    async for stack in _stack(
        tmp_path, redis_url, api_keys, database_url, gateway_up=False, **overrides
    ):
        memory, catchup = stack.memory, catchup_of(stack)
        extractor = memory.app.manager.extractor
        assert extractor is not None
        await consent(memory, "u1")
        first, _ = await say(memory, "s1", "u1", "I hold 10 AAPL shares.")
        await stack.settle()  # the live job failed: gateway unreachable
        before = await status(stack, "u1")
        assert before.tenant_enabled and before.user_consented
        assert (before.messages_pending, before.messages_extracted) == (1, 0)
        assert not before.HasField("last_extraction_time") and before.extracted_facts == 0
        assert not extractor.gateway_ok

        # Gateway still down: each pass is one probe job, not the whole backlog.
        await say(memory, "s2", "u1", "I also hold 5 NVDA shares.")
        await stack.settle()
        probes = counted("finsight_memory_extraction_catchup_passes_total", outcome="probe")
        failed = counted("finsight_memory_extractions_total", outcome="gateway_failed")
        for _ in range(2):
            assert await catchup.run_pass() == 1
            await stack.settle()
        assert counted("finsight_memory_extraction_catchup_passes_total", outcome="probe") == (
            probes + 2
        )
        assert counted("finsight_memory_extractions_total", outcome="gateway_failed") == failed + 2
        assert (await status(stack, "u1")).messages_pending == 2
        assert await facts_of(memory, "u1") == []

        # The gateway is back: the probe succeeds, the next pass takes the rest.
        gateway = await start_gateway(
            tmp_path / "gw", redis_url, api_keys, stack.provider, llm_gateway_grpc_port=port
        )
        try:
            stack.reply(add("The user holds 10 AAPL shares."))
            stack.reply(add("The user holds 5 NVDA shares."))
            for _ in range(40):  # the channel reconnects within its backoff cap
                await catchup.run_pass()
                await stack.settle()
                if (await status(stack, "u1")).messages_pending == 0:
                    break
                await asyncio.sleep(0.25)
            texts = sorted(f.text for f in await facts_of(memory, "u1"))
            assert texts == ["The user holds 10 AAPL shares.", "The user holds 5 NVDA shares."]
            facts = {f.text: f for f in await facts_of(memory, "u1")}
            assert list(facts["The user holds 10 AAPL shares."].source_message_ids) == [first]
            after = await status(stack, "u1")
            assert (after.messages_pending, after.messages_extracted) == (0, 2)
            assert after.HasField("last_extraction_time") and after.extracted_facts == 2
            assert extractor.gateway_ok

            # Exactly once: nothing is due any more, and the model is not asked again.
            asked = len(stack.chat_requests())
            assert await catchup.run_pass() == 0
            await stack.settle()
            assert len(stack.chat_requests()) == asked
            callers = {a.caller for a in await audit_of(memory, "u1") if a.rpc == "ExtractFacts"}
            assert callers == {CATCHUP_CALLER}
            # Another tenant sees none of it.
            theirs = await status(stack, "u1", "bob")
            assert not theirs.tenant_enabled and theirs.messages_extracted == 0
        finally:
            await gateway.close()


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_a_turn_dropped_by_a_full_queue_is_caught_up_and_others_are_skipped(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    overrides: dict[str, Any] = {
        **CATCHUP,
        "memory_extraction_queue_max": 1,
        "finsight_service_api_key": api_keys.service,
    }
    async for stack in _stack(tmp_path, redis_url, api_keys, database_url, **overrides):
        memory, catchup = stack.memory, catchup_of(stack)
        await consent(memory, "u1")
        await consent(memory, "u2", extraction=False)
        await say(memory, "sx", "u2", "I hold 3 IBM shares.")  # no consent: never caught up
        await stack.settle()
        stack.provider.state.script(
            [
                {"content": '{"operations": [{"op": "ADD", "text": "The user holds 1 A."}]}',
                 "delay_ms": 800},
                {"content": '{"operations": [{"op": "ADD", "text": "The user holds 2 B."}]}'},
                {"content": '{"operations": [{"op": "ADD", "text": "The user holds 3 C."}]}'},
            ]
        )  # fmt: skip
        dropped = counted("finsight_memory_extractions_total", outcome="dropped_queue_full")
        await say(memory, "s1", "u1", "I hold 1 A.")
        await asyncio.sleep(0.1)  # the worker took it and waits for the slow answer
        await say(memory, "s2", "u1", "I hold 2 B.")  # queued
        await say(memory, "s3", "u1", "I hold 3 C.")  # queue full: dropped
        assert counted("finsight_memory_extractions_total", outcome="dropped_queue_full") == (
            dropped + 1
        )
        # While the queue is full (half of it is the live appends'), a pass offers nothing.
        full = counted("finsight_memory_extraction_catchup_passes_total", outcome="queue_full")
        assert await catchup.run_pass() == 0
        assert counted("finsight_memory_extraction_catchup_passes_total", outcome="queue_full") == (
            full + 1
        )
        await stack.settle()
        assert (await status(stack, "u1")).messages_pending == 1
        assert (await status(stack, "u2")).messages_pending == 0  # not opted in: never pending

        offered = counted("finsight_memory_extraction_catchup_turns_total")
        assert await catchup.run_pass() == 1
        await stack.settle()
        assert counted("finsight_memory_extraction_catchup_turns_total") == offered + 1
        texts = sorted(f.text for f in await facts_of(memory, "u1"))
        assert texts == ["The user holds 1 A.", "The user holds 2 B.", "The user holds 3 C."]
        assert (await status(stack, "u1")).messages_pending == 0
        assert await catchup.run_pass() == 0  # u2 did not consent to extraction
        assert len(stack.chat_requests()) == 3


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_with_a_shared_store_one_replica_runs_each_pass(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    overrides: dict[str, Any] = {
        "memory_extraction_catchup_interval_s": 30,
        "finsight_service_api_key": "k",
    }
    async for stack in _stack(tmp_path, redis_url, api_keys, database_url, **overrides):
        app = stack.memory.app
        mine = catchup_of(stack)
        assert app.manager.extractor is not None
        other = ExtractionCatchUp(
            app.manager.settings, app.store, app.manager.extractor, app.hot.redis
        )
        assert mine._task is not None  # the loop runs (its first pass after the interval)
        assert await mine._claim() and not await other._claim()
        ttl = await app.hot.redis.pttl(mine.lock_key)
        assert 0 < ttl <= 27_000  # just under the interval: the next pass is free again


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_without_a_service_key_the_catchup_does_not_start(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    # Auth is on and no key is there to present for turns no caller appended: off, said once.
    async for stack in _stack(tmp_path, redis_url, api_keys, database_url):
        catchup = catchup_of(stack)
        assert not catchup.can_call_gateway and catchup._task is None
