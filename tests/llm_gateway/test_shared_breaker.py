"""The circuit shared by gateway replicas over a real Redis-protocol server: two breakers,
each with its own Redis client and replica id, stand for two replicas of one provider."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tracing import configure_tracing
from libs.devprovider import DevProvider
from services.llm_gateway import metrics
from services.llm_gateway.breaker import CircuitOpen, ProviderBreaker
from services.llm_gateway.providers import ProviderClient, ProviderError
from services.llm_gateway.shared_breaker import SharedBreakers, breaker_key
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import BODY, Gw, start_gateway


class Replica:
    """One gateway replica's breaker for a provider, over its own Redis connection."""

    def __init__(self, url: str, provider: str, *, fail_max: int, reset_s: float) -> None:
        self.redis = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.hub = SharedBreakers(self.redis, poll_s=0.05, window_s=60)
        self.breaker = ProviderBreaker(
            provider,
            fail_max=fail_max,
            reset_s=reset_s,
            shared=self.hub.circuit(provider, fail_max=fail_max, reset_s=reset_s),
        )

    async def call(self, client: ProviderClient) -> None:
        """One attempt, and its report to Redis done (sent in the background otherwise)."""
        try:
            async with self.breaker.attempt():
                await client.complete(BODY, timeout_s=5)
        finally:
            await self.hub.drain()

    async def fail(self, client: ProviderClient) -> None:
        with pytest.raises(ProviderError):
            await self.call(client)

    async def close(self) -> None:
        await self.hub.aclose()
        await self.redis.aclose()


Replicas = Callable[..., tuple[Replica, Replica]]


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Replicas]:
    """`replicas(fail_max=, reset_s=, url=)`: two replicas of a provider of this test's own."""
    made: list[Replica] = []

    def make(*, fail_max: int, reset_s: float, url: str = redis_url) -> tuple[Replica, Replica]:
        name = f"dev-{uuid.uuid4().hex[:8]}"
        pair = (
            Replica(url, name, fail_max=fail_max, reset_s=reset_s),
            Replica(url, name, fail_max=fail_max, reset_s=reset_s),
        )
        made.extend(pair)
        return pair

    yield make
    for replica in made:
        await replica.close()


async def refused(replica: Replica, client: ProviderClient) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as err:
        await replica.call(client)
    return err.value


async def test_failures_of_two_replicas_add_up_and_open_both(
    replicas: Replicas, client: ProviderClient, provider: DevProvider
) -> None:
    a, b = replicas(fail_max=4, reset_s=30)
    provider.state.script(default={"status": 500})
    await a.fail(client)
    await a.fail(client)
    await b.hub.poll()
    assert b.breaker.shared_failures == 2
    await b.fail(client)
    assert b.breaker.shared_failures == 3
    await b.fail(client)  # the fourth across both: the shared circuit opens
    assert b.breaker.state == "open" and b.breaker.shared_state == "open"
    # A saw only two failures itself; it learns of the open state from its next poll.
    assert a.breaker.failures == 2 and a.breaker.cb.current_state == "closed"
    await a.hub.poll()
    assert a.breaker.state == "open" and a.breaker.cb.current_state == "open"
    sent = len(provider.state.log)
    for replica in (a, b):
        err = await refused(replica, client)
        assert err.scope == "shared" and 29 < err.retry_after <= 30
    assert len(provider.state.log) == sent  # refused without contacting the provider
    opens = metrics.SHARED_BREAKER_OPENS.labels(a.breaker.provider, "other_replica")
    assert opens._value.get() == 1


async def test_a_success_resets_the_shared_count(
    replicas: Replicas, client: ProviderClient, provider: DevProvider
) -> None:
    a, b = replicas(fail_max=3, reset_s=30)
    provider.state.script([{"status": 503}, {"status": 503}])
    await a.fail(client)
    await a.fail(client)
    await b.hub.poll()
    assert b.breaker.shared_failures == 2
    await b.call(client)  # B's success, with a shared count above 0: reset for everyone
    await a.hub.poll()
    assert a.breaker.shared_failures == 0
    provider.state.script([{"status": 503}, {"status": 503}])
    await a.fail(client)
    await b.fail(client)
    assert b.breaker.shared_failures == 2 and b.breaker.state == "closed"


async def test_one_trial_after_the_reset_timeout_and_its_success_closes_both(
    replicas: Replicas, client: ProviderClient, provider: DevProvider
) -> None:
    a, b = replicas(fail_max=2, reset_s=0.4)
    provider.state.script(default={"status": 500})
    await a.fail(client)
    await b.fail(client)
    await a.hub.poll()
    assert a.breaker.shared_state == b.breaker.shared_state == "open"
    await asyncio.sleep(0.45)
    await a.hub.poll()
    await b.hub.poll()
    assert a.breaker.state == b.breaker.state == "half-open"
    with pytest.raises(CircuitOpen), a.breaker.calling():  # sync: cannot ask for the lease
        pass
    provider.state.script(default=None)  # the provider is well again
    sent = len(provider.state.log)
    # Both replicas get a call at once: one takes the trial lease, the other is refused.
    outcomes = await asyncio.gather(a.call(client), b.call(client), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["CircuitOpen", "NoneType"]
    assert len(provider.state.log) == sent + 1
    await a.hub.poll()
    await b.hub.poll()
    for replica in (a, b):
        assert replica.breaker.state == "closed" and replica.breaker.shared_state == "closed"
        assert replica.breaker.cb.current_state == "closed"
        await replica.call(client)


async def test_a_failed_trial_reopens_for_both(
    replicas: Replicas, client: ProviderClient, provider: DevProvider
) -> None:
    a, b = replicas(fail_max=2, reset_s=0.4)
    provider.state.script(default={"status": 500})
    await a.fail(client)
    await a.fail(client)
    await b.hub.poll()
    assert b.breaker.state == "open"
    await asyncio.sleep(0.45)
    await b.hub.poll()
    await b.fail(client)  # B's trial fails: open again for everyone
    assert b.breaker.shared_state == "open"
    await a.hub.poll()
    assert a.breaker.shared_state == "open"
    err = await refused(a, client)
    assert err.scope == "shared" and 0.2 < err.retry_after <= 0.4


async def test_the_open_state_reaches_a_polling_replica_within_the_poll_interval(
    replicas: Replicas, client: ProviderClient, provider: DevProvider
) -> None:
    a, b = replicas(fail_max=2, reset_s=30)
    a.hub.start()
    b.hub.start()
    provider.state.script(default={"status": 500})
    await a.fail(client)
    await a.fail(client)
    opened = time.monotonic()
    while b.breaker.shared_state != "open":
        assert time.monotonic() - opened < 1.0
        await asyncio.sleep(0.01)
    assert time.monotonic() - opened < 0.2  # poll_s = 0.05


async def test_without_redis_the_local_breaker_decides_and_no_request_fails_for_it(
    replicas: Replicas, client: ProviderClient, provider: DevProvider, private_redis: RedisProcess
) -> None:
    a, b = replicas(fail_max=3, reset_s=0.3, url=private_redis.url)
    await a.hub.poll()
    assert a.breaker.shared_state == "closed"
    errors_before = metrics.SHARED_BREAKER_REDIS_ERRORS.labels("poll")._value.get()
    private_redis.stop()
    await a.hub.poll()
    assert a.breaker.shared_state is None and a.hub.down
    assert metrics.SHARED_BREAKER_REDIS_ERRORS.labels("poll")._value.get() == errors_before + 1
    await a.call(client)  # successes pass
    provider.state.script(default={"status": 500})
    for _ in range(3):
        await a.fail(client)  # failures count locally (reports to a dead Redis are dropped)
    assert a.breaker.state == "open" and a.breaker.failures == 3
    err = await refused(a, client)
    assert err.scope == "local"
    # The other replica, also without Redis, knows nothing of it: no shared state.
    await b.hub.poll()
    provider.state.script(default=None)
    await b.call(client)
    # Local reset and trial as without the shared breaker.
    await asyncio.sleep(0.35)
    await a.call(client)
    assert a.breaker.state == "closed"
    # Redis back: the next poll reads the shared state again.
    private_redis.start()
    await a.hub.poll()
    assert a.breaker.shared_state == "closed" and not a.hub.down


async def test_keys_follow_the_gateway_naming_and_expire(
    replicas: Replicas, client: ProviderClient, provider: DevProvider, redis_url: str
) -> None:
    a, _ = replicas(fail_max=5, reset_s=30)
    provider.state.script([{"status": 500}])
    await a.fail(client)
    name = a.breaker.provider
    key = breaker_key(name, "failures")
    assert key == f"llm:breaker:{{{name}}}:failures"
    async with Redis.from_url(redis_url) as r:
        assert await r.get(key) == b"1"
        assert 0 < await r.pttl(key) <= 60_000


async def deepseek(gw: Gw) -> pb.ProviderInfo:
    reply = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md("admin"))
    return next(p for p in reply.providers if p.name == "deepseek")


async def test_two_gateways_list_the_shared_state_and_span_the_shared_refusal(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    redis_url: str,
) -> None:
    exporter = InMemorySpanExporter()
    configure_tracing("test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(exporter),))
    shared = {
        "llm_gateway_shared_breaker": True,
        "llm_gateway_shared_breaker_poll_s": 0.05,
        "llm_gateway_breaker_fail_max": 2,
        "llm_gateway_max_retries": 0,
        "llm_gateway_cache_enabled": False,
    }
    one = await start_gateway(tmp_path / "1", private_redis.url, api_keys, provider, **shared)
    two = await start_gateway(tmp_path / "2", private_redis.url, api_keys, provider, **shared)
    alone = await start_gateway(tmp_path / "3", redis_url, api_keys, provider)  # the default
    try:
        provider.state.reset()
        info = await deepseek(alone)  # tests turn the shared breaker off (tests/conftest.py)
        assert info.shared_circuit_state == pb.CIRCUIT_STATE_UNSPECIFIED
        assert info.circuit_state == pb.CIRCUIT_STATE_CLOSED
        await asyncio.sleep(0.1)  # a poll
        assert (await deepseek(one)).shared_circuit_state == pb.CIRCUIT_STATE_CLOSED
        provider.state.script(default={"status": 502})
        for gw in (one, two):
            with pytest.raises(grpc.aio.AioRpcError):
                await gw.complete("failing")
        started = time.monotonic()
        while (await deepseek(one)).shared_circuit_state != pb.CIRCUIT_STATE_OPEN:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.02)
        info = await deepseek(one)
        assert info.circuit_state == pb.CIRCUIT_STATE_OPEN and info.consecutive_failures == 1
        exporter.clear()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await one.complete("refused")
        assert status_info(err.value).reason == "PROVIDER_CIRCUIT_OPEN"
        attempts = [
            dict(s.attributes or {})
            for s in exporter.get_finished_spans()
            if s.name == "chat deepseek-chat"
        ]
        assert [(a["error.type"], a["finsight.llm.circuit.scope"]) for a in attempts] == [
            ("circuit_open", "shared")
        ]
        assert (await deepseek(alone)).circuit_state == pb.CIRCUIT_STATE_CLOSED
    finally:
        for gw in (one, two, alone):
            await gw.close()
        provider.state.reset()
