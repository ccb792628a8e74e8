"""The production topology under faults: PostgreSQL, two memory and two analytics replicas,
callers round-robin over them (tests/system/harness.py, `Suite(store="postgres")`).

- SIGKILL one replica of each under write load: no acknowledged write is lost, nothing is
  half-applied, and the other replica keeps answering;
- PostgreSQL restarted under load: UNAVAILABLE with RetryInfo while it is down, recovery
  by itself (no service restarts), no acknowledged write lost;
- a rolling restart of every replica under load (callers retry UNAVAILABLE as the kit's
  channels do): zero failed RPCs.

The quick variants run in `make test`; `make chaos` runs the `test_chaos_*` ones (longer,
heavier, repeated).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as an
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mem
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.clients import service_config
from tests.system.calls import Tally
from tests.system.harness import CHANNEL_OPTIONS, SERVING, Suite
from tests.system.test_faults import (
    bar_series,
    metrics_req,
    problems,
    read_history,
    uid,
    user,
    wait_until,
)

Figures = Callable[..., None]
MEMORY = ("memory-1", "memory-2")
ANALYTICS = ("analytics-1", "analytics-2")
MIN_READY_S = 2.0  # > the test channels' longest reconnect backoff (1 s)


@pytest.fixture(scope="module")
async def pg_system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    # A request waits at most 1 s for a pooled connection (production: 5 s), so an outage
    # of a few seconds shows as UNAVAILABLE instead of calls that wait it out.
    suite = Suite(
        tmp_path_factory.mktemp("replicas"),
        store="postgres",
        env={"FINSIGHT_PG_POOL_TIMEOUT_S": "1", "FINSIGHT_PG_CONNECT_TIMEOUT_S": "1"},
    )
    await suite.up()
    try:
        yield suite
    finally:
        await suite.down()


@pytest.fixture
async def suite(pg_system: Suite) -> AsyncIterator[Suite]:
    await pg_system.heal()
    yield pg_system
    await pg_system.heal()


def retrying_channel(suite: Suite, service: str) -> grpc.aio.Channel:
    """A channel over every replica as services' channels are (libs.common.clients):
    retries of UNAVAILABLE, and client-side health checking on the readiness name, so a
    draining replica gets no new calls."""
    config = service_config(suite.spec(f"{service}-1").health_name)
    return grpc.aio.insecure_channel(
        suite.target(service),
        options=[*CHANNEL_OPTIONS, ("grpc.service_config", json.dumps(config))],
    )


class Writes:
    """AppendMessages load over both memory replicas: `writers` sessions, one message per
    request, each with a client message id; what was acknowledged is remembered."""

    def __init__(self, suite: Suite, stub: memory_pb2_grpc.MemoryServiceStub, writers: int) -> None:
        self.suite = suite
        self.stub = stub
        self.run = uid()
        self.writers = writers
        self.acked: set[str] = set()
        self.tally = Tally()
        self.stop = asyncio.Event()

    def session(self, w: int) -> str:
        return f"rep-{self.run}-{w}"

    async def writer(self, w: int) -> None:
        md = self.suite.md()
        for i in range(1_000_000):
            if self.stop.is_set():
                return
            cid = f"{w}-{i}"
            req = mem.AppendMessagesRequest(
                session_id=self.session(w),
                user_id="u-rep",
                messages=[mem.NewMessage(message=user(cid), client_message_id=cid)],
            )
            reply = await self.tally.call(
                "AppendMessages",
                lambda d, req=req: self.stub.AppendMessages(req, metadata=md, timeout=d),  # type: ignore[misc]
                10,
            )
            if reply is not None:
                self.acked.add(cid)
            else:
                await asyncio.sleep(0.05)

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.writer(w)) for w in range(self.writers)]

    async def check_stored(self) -> int:
        """Every acknowledged message is stored exactly once, sequences gap-free."""
        stored_total = 0
        for w in range(self.writers):
            stored = await read_history(self.suite, self.session(w), "u-rep")
            assert [s for s, _ in stored] == list(range(1, len(stored) + 1)), stored[:20]
            cids = [cid for _, cid in stored]
            assert len(cids) == len(set(cids)), "a message stored twice"
            mine = {c for c in self.acked if c.startswith(f"{w}-")}
            assert mine <= set(cids), sorted(mine - set(cids))[:5]
            stored_total += len(stored)
        return stored_total


async def sigkill_one_replica(
    suite: Suite,
    figures: Figures,
    victims: tuple[str, str] = ("memory-1", "analytics-1"),
    after_s: float = 3.0,
) -> None:
    """Write load through both replicas, SIGKILL one of each service, `after_s` more of
    load on the survivors; then restart the victims (heal)."""
    writes = Writes(suite, suite.memory(), writers=6)
    a = suite.analytics()
    md = suite.md()
    metrics_tally = Tally()

    async def metrics_load() -> None:
        while not writes.stop.is_set():
            await metrics_tally.call(
                "ComputeMetrics",
                lambda d: a.ComputeMetrics(metrics_req(), metadata=md, timeout=d),
                10,
            )

    tasks = [*writes.start(), asyncio.create_task(metrics_load())]
    await wait_until(lambda: _true(len(writes.acked) >= 60), timeout=60, interval=0.02)
    killed_at = time.monotonic()
    codes = await asyncio.gather(*(suite.kill(name) for name in victims))
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    acked_at_kill = len(writes.acked)
    await asyncio.sleep(after_s)  # the survivors carry the load alone
    writes.stop.set()
    await asyncio.gather(*tasks)

    settled = killed_at + 1.0  # the channel has noticed the dead replica by then
    after = [c for c in [*writes.tally.calls, *metrics_tally.calls] if c.started > settled]
    assert after and all(c.ok for c in after), problems([c for c in after if not c.ok])
    errors = [c for c in [*writes.tally.calls, *metrics_tally.calls] if not c.ok]
    assert all(c.code == "UNAVAILABLE" and c.ended >= killed_at - 0.05 for c in errors), problems(
        errors
    )
    assert len(writes.acked) > acked_at_kill + 20, "the surviving replica stopped answering"
    stored = await writes.check_stored()
    figures(
        killed=list(victims),
        appends_acked=len(writes.acked),
        appends_stored=stored,
        acked_after_kill=len(writes.acked) - acked_at_kill,
        failed_at_kill=len(errors),
        lost_acknowledged=0,
        latency=writes.tally.summary(),
    )


async def postgres_restart(suite: Suite, figures: Figures, down_s: float = 3.0) -> None:
    """Write load; PostgreSQL stopped for `down_s`, started again."""
    writes = Writes(suite, suite.memory(), writers=4)
    pids = {name: suite.pid(name) for name in suite.names}
    tasks = writes.start()
    await wait_until(lambda: _true(len(writes.acked) >= 30), timeout=60, interval=0.02)
    writes.tally.tag = "down"
    down_at = time.monotonic()
    await asyncio.to_thread(suite.pg_stop)
    await asyncio.sleep(down_s)
    writes.tally.tag = "recovering"
    await asyncio.to_thread(suite.pg_start)
    up_at = time.monotonic()
    acked_before = len(writes.acked)
    recovered = await wait_until(
        lambda: _true(len(writes.acked) >= acked_before + 20), timeout=60, interval=0.05
    )
    writes.tally.tag = "after"
    await asyncio.sleep(1.0)
    writes.stop.set()
    await asyncio.gather(*tasks)

    assert not writes.tally.late(), problems(writes.tally.late())
    down = writes.tally.of(tag="down")
    failed = [c for c in down if not c.ok]
    assert failed, "no call noticed the database was down"
    assert all(c.code == "UNAVAILABLE" for c in failed), problems(failed)
    assert all(c.retry_after is not None for c in failed), problems(failed)
    after = writes.tally.of(tag="after")
    assert after and all(c.ok for c in after), problems([c for c in after if not c.ok])
    assert {name: suite.pid(name) for name in suite.names} == pids  # recovered by itself
    for name in MEMORY:
        assert await suite.health(name) == SERVING
    stored = await writes.check_stored()
    figures(
        down_s=round(up_at - down_at, 2),
        recovered_after_start_s=round(recovered, 2),
        failed_while_down=len(failed),
        outcomes_while_down=dict(writes.tally.outcomes(tag="down")),
        appends_acked=len(writes.acked),
        appends_stored=stored,
        lost_acknowledged=0,
    )


async def rolling_restart(suite: Suite, figures: Figures, writers: int = 4) -> None:
    """Appends, ComputeMetrics and IngestBars through every replica while each replica in
    turn is restarted (SIGTERM, drain, start, ready); asserts zero failed RPCs."""
    memory_channel = retrying_channel(suite, "memory")
    analytics_channel = retrying_channel(suite, "analytics")
    writes = Writes(suite, memory_pb2_grpc.MemoryServiceStub(memory_channel), writers=writers)
    a = analytics_pb2_grpc.AnalyticsServiceStub(analytics_channel)
    md, admin = suite.md(), suite.md("admin")
    other = Tally()
    ingests = 0

    async def metrics_load() -> None:
        while not writes.stop.is_set():
            await other.call(
                "ComputeMetrics",
                lambda d: a.ComputeMetrics(metrics_req(), metadata=md, timeout=d),
                10,
            )

    async def ingest_load() -> None:
        nonlocal ingests
        while not writes.stop.is_set():
            symbol = f"R{writes.run}.{ingests}"

            async def stream(symbol: str = symbol) -> AsyncIterator[an.IngestBarsRequest]:
                yield an.IngestBarsRequest(series=[bar_series(symbol)])

            if await other.call(
                "IngestBars", lambda d: a.IngestBars(stream(), metadata=admin, timeout=d), 10
            ):
                ingests += 1

    try:
        tasks = [
            *writes.start(),
            asyncio.create_task(metrics_load()),
            asyncio.create_task(ingest_load()),
        ]
        await wait_until(lambda: _true(len(writes.acked) >= 30), timeout=60, interval=0.02)
        timings: dict[str, float] = {}
        for name in (*MEMORY, *ANALYTICS):
            began = time.monotonic()
            await suite.restart(name)
            timings[name] = round(time.monotonic() - began, 2)
            # As the Deployment's minReadySeconds: callers' channels reconnect to the new
            # replica and see it SERVING before the next one drains.
            await asyncio.sleep(MIN_READY_S)
        await asyncio.sleep(1.0)
        writes.stop.set()
        await asyncio.gather(*tasks)
    finally:
        await memory_channel.close()
        await analytics_channel.close()
    calls = [*writes.tally.calls, *other.calls]
    assert all(c.ok for c in calls), problems([c for c in calls if not c.ok])
    stored = await writes.check_stored()
    figures(
        calls=len(calls),
        failed=0,
        restart_s=timings,
        appends_acked=len(writes.acked),
        appends_stored=stored,
        ingests=ingests,
        latency={**writes.tally.summary(), **other.summary()},
    )


async def test_sigkill_one_replica_loses_nothing_and_the_other_keeps_answering(
    suite: Suite, figures: Figures
) -> None:
    await sigkill_one_replica(suite, figures)


async def test_postgres_restart_is_unavailable_with_retry_info_then_recovers(
    suite: Suite, figures: Figures
) -> None:
    await postgres_restart(suite, figures)


async def test_rolling_restart_of_every_replica_fails_no_rpc(
    suite: Suite, figures: Figures
) -> None:
    await rolling_restart(suite, figures)


CHAOS_ROUNDS = int(os.environ.get("CHAOS_REPLICA_ROUNDS", "3"))


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_chaos_replica_faults_repeated(suite: Suite, figures: Figures) -> None:
    """`make chaos`: every fault again, CHAOS_REPLICA_ROUNDS times (3), killing each replica
    in turn, longer outages and heavier load."""
    for i in range(CHAOS_ROUNDS):
        victims = ("memory-1", "analytics-2") if i % 2 == 0 else ("memory-2", "analytics-1")
        await sigkill_one_replica(suite, figures, victims, after_s=10.0)
        await suite.heal()
        await postgres_restart(suite, figures, down_s=10.0)
        await suite.heal()
        await rolling_restart(suite, figures, writers=12)
        await suite.heal()


async def test_each_replica_answers_for_writes_made_through_the_other(suite: Suite) -> None:
    """Read-your-writes across replicas, end to end: a session appended through memory-1 is
    read through memory-2, bars ingested through analytics-1 are in analytics-2's next
    answer (after analytics-2 has cached the symbol list)."""
    run = uid()
    md, admin = suite.md(), suite.md("admin")
    m1 = memory_pb2_grpc.MemoryServiceStub(suite.channel("memory-1"))
    m2 = memory_pb2_grpc.MemoryServiceStub(suite.channel("memory-2"))
    a1 = analytics_pb2_grpc.AnalyticsServiceStub(suite.channel("analytics-1"))
    a2 = analytics_pb2_grpc.AnalyticsServiceStub(suite.channel("analytics-2"))
    session = f"ryw-{run}"
    for i in range(3):
        stub = m1 if i % 2 == 0 else m2
        await stub.AppendMessages(
            mem.AppendMessagesRequest(
                session_id=session, user_id="u-ryw", messages=[mem.NewMessage(message=user(f"{i}"))]
            ),
            metadata=md,
            timeout=10,
        )
        for reader in (m1, m2):
            page = await reader.GetHistory(
                mem.GetHistoryRequest(session_id=session, user_id="u-ryw", page_size=10),
                metadata=md,
                timeout=10,
            )
            assert [x.message.content for x in page.messages] == [str(j) for j in range(i + 1)]

    before = await a2.ListSymbols(an.ListSymbolsRequest(), metadata=admin, timeout=10)
    symbol = f"Y{run}"

    async def stream() -> AsyncIterator[an.IngestBarsRequest]:
        yield an.IngestBarsRequest(series=[bar_series(symbol)])

    reply = await a1.IngestBars(stream(), metadata=admin, timeout=30)
    after = await a2.ListSymbols(an.ListSymbolsRequest(), metadata=admin, timeout=10)
    assert symbol not in {s.symbol for s in before.symbols}
    assert symbol in {s.symbol for s in after.symbols}
    assert after.data_version == reply.data_version > before.data_version


async def _true(value: bool) -> bool:
    return value
