"""Memory's background gateway calls are billed to the tenant whose data they process
(the service key acting for it: `x-finsight-on-behalf-of-tenant`), and the catch-up gives
a turn up after MEMORY_EXTRACTION_CATCHUP_MAX_ATTEMPTS failures of its own, while a
gateway outage consumes none. Real gateway, dev provider, real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from finsight.llm.v1 import llm_gateway_pb2 as gw_pb
from finsight.memory.v1 import memory_pb2 as pb
from libs.devprovider import DevProvider
from services.memory.extraction import ExtractionUnavailable
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import Gw, start_gateway
from tests.llm_gateway.test_embed import embedding_settings
from tests.memory.conftest import start_memory
from tests.memory.test_extraction import _stack, consent, counted, say
from tests.memory.test_extraction_catchup import CATCHUP, catchup_of, free_port, status
from tests.memory.test_recall import remember

GIVEN_UP = "finsight_memory_extraction_given_up_total"


async def requests_of(gw: Gw, key: str, model: str = "") -> int:
    usage = await gw.stub.GetUsage(
        gw_pb.GetUsageRequest(model=model), metadata=(("authorization", f"Bearer {key}"),)
    )
    return int(usage.total_requests)


class Refusing:
    """A completer whose gateway answers each call with the next of `codes`."""

    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.calls = 0
        self.fresh: list[bool] = []

    async def complete_json(self, system: str, user: str, *, fresh: bool = False) -> str:
        self.calls += 1
        self.fresh.append(fresh)
        code = self.codes.pop(0)
        raise ExtractionUnavailable(f"{code}: refused", code)

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_catchup_is_billed_to_the_turns_tenant_and_gives_up_after_the_cap(
    tmp_path: Path, private_redis: RedisProcess, api_keys: Keys, database_url: str | None
) -> None:
    port = free_port()
    overrides: dict[str, Any] = {
        **CATCHUP,
        "memory_llm_gateway_target": f"127.0.0.1:{port}",
        "finsight_service_api_key": api_keys.service,
        "memory_extraction_catchup_max_attempts": 3,
    }
    redis_url = private_redis.url  # usage of this test only
    async for stack in _stack(
        tmp_path, redis_url, api_keys, database_url, gateway_up=False, **overrides
    ):
        memory, catchup = stack.memory, catchup_of(stack)
        await consent(memory, "u1")
        (turn, _) = await say(memory, "s1", "u1", "I hold 10 AAPL shares.")
        await stack.settle()  # the live job failed: gateway unreachable (an outage)

        # An outage never counts: passes while the gateway is down consume no attempt.
        for _ in range(4):
            assert await catchup.run_pass() == 1
            await stack.settle()
        assert await catchup.attempts.of("acme", [turn]) == {}

        gateway = await start_gateway(
            tmp_path / "gw", redis_url, api_keys, stack.provider, llm_gateway_grpc_port=port
        )
        try:
            # The model answers what is not JSON, every time.
            stack.provider.state.script([{"content": "Sure! Here are the facts: none"}] * 10)
            given_up = counted(GIVEN_UP)
            for _ in range(40):  # the channel reconnects within its backoff cap
                await catchup.run_pass()
                await stack.settle()
                if stack.chat_requests():
                    break
                await asyncio.sleep(0.25)
            assert len(stack.chat_requests()) == 1
            assert counted("finsight_memory_extractions_total", outcome="unparseable") >= 1
            assert await catchup.attempts.of("acme", [turn]) == {turn: 1}
            # Billed to the turn's tenant (acme), not to memory's own (t-memory).
            assert await requests_of(gateway, api_keys.alice) == 1
            assert await requests_of(gateway, api_keys.service) == 0

            # Unhandled: offered again until the cap, then never.
            for _ in range(2):
                assert await catchup.run_pass() == 1
                await stack.settle()
            assert len(stack.chat_requests()) == 3
            assert counted(GIVEN_UP) == given_up + 1
            for _ in range(2):
                assert await catchup.run_pass() == 0
                await stack.settle()
            assert len(stack.chat_requests()) == 3
            assert counted(GIVEN_UP) == given_up + 1
            assert (await status(stack, "u1")).messages_pending == 1  # stays unhandled

            # A new turn is not starved by the given-up one, and is billed to acme too.
            stack.provider.state.script([])
            stack.reply({"op": "ADD", "text": "The user holds 5 NVDA shares.", "kind": "holding"})
            catchup.settings.memory_extraction_catchup_batch = 1  # only one turn a pass
            await say(memory, "s2", "u1", "I also hold 5 NVDA shares.")
            await stack.settle()  # the live job (alice's key, acme) answered it
            assert len(stack.chat_requests()) == 4
            assert await requests_of(gateway, api_keys.alice) == 4
            assert await requests_of(gateway, api_keys.service) == 0
        finally:
            await gateway.close()


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_a_gateway_refusal_counts_an_attempt_and_an_outage_does_not(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    overrides: dict[str, Any] = {
        **CATCHUP,
        "finsight_service_api_key": api_keys.service,
        "memory_extraction_catchup_max_attempts": 2,
    }
    async for stack in _stack(tmp_path, redis_url, api_keys, database_url, **overrides):
        memory, catchup = stack.memory, catchup_of(stack)
        extractor = memory.app.manager.extractor
        assert extractor is not None
        refusing = Refusing(
            "INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
            "FAILED_PRECONDITION",
        )  # fmt: skip
        extractor.completer = refusing
        await consent(memory, "u1")
        (turn, _) = await say(memory, "s1", "u1", "I hold 10 AAPL shares.")
        await stack.settle()  # the live job: INVALID_ARGUMENT, attempt 1
        assert await catchup.attempts.of("acme", [turn]) == {turn: 1}
        assert extractor.gateway_ok  # a refusal is an answer: no probing
        given_up = counted(GIVEN_UP)
        for _ in range(3):  # UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED: outages
            assert await catchup.run_pass() == 1
            await stack.settle()
            assert not extractor.gateway_ok
        assert await catchup.attempts.of("acme", [turn]) == {turn: 1}
        assert await catchup.run_pass() == 1  # FAILED_PRECONDITION: attempt 2, the cap
        await stack.settle()
        assert counted(GIVEN_UP) == given_up + 1
        assert await catchup.run_pass() == 0
        assert refusing.calls == 5 and not refusing.codes
        assert refusing.fresh == [False, True, True, True, True]  # retries skip the cache
        # Another replica (or this one after a restart) sees the count in Redis.
        other = type(catchup)(catchup.settings, catchup.store, extractor, catchup.redis)
        assert await other.attempts.of("acme", [turn]) == {turn: 2}


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_the_reembed_is_billed_to_the_tenant(
    tmp_path: Path, private_redis: RedisProcess, api_keys: Keys, database_url: str | None
) -> None:
    redis_url = private_redis.url
    common: dict[str, Any] = {
        "memory_redis_prefix": f"t-{tmp_path.name}",
        "memory_purge_interval_s": 0,
        "memory_reembed_interval_s": 0,  # passes run by the test
        "memory_database_url": database_url,
    }
    plain = await start_memory(
        tmp_path, redis_url, api_keys, memory_embedding_provider="none", **common
    )
    try:
        await consent(plain, "u1")
        await remember(plain, "u1", pb.NewFact(text="Keeps gold coins"), pb.NewFact(text="Vegan"))
    finally:
        await plain.close()

    async with DevProvider() as provider:
        gateway = await start_gateway(
            tmp_path / "gw", redis_url, api_keys, provider, **embedding_settings(provider.base_url)
        )
        memory = await start_memory(
            tmp_path,
            redis_url,
            api_keys,
            memory_embedding_provider="gateway",
            memory_embedding_route="embed",
            memory_llm_gateway_target=f"127.0.0.1:{gateway.host.bound_port}",
            finsight_service_api_key=api_keys.service,
            **common,
        )
        try:
            assert await memory.app.manager.reembed_pass() == 2
            assert await requests_of(gateway, api_keys.alice, "dev-embed") == 1
            assert await requests_of(gateway, api_keys.service) == 0
        finally:
            await memory.close()
            await gateway.close()
