"""The analytics service in PostgreSQL mode, over real gRPC: two replicas (two service hosts
in this process, each with its own pool) on one real PostgreSQL database and one Redis of
their own, started together with the sample data to load.

- exactly one replica loads the sample, both become ready, no DuckDB file appears;
- their answers equal the DuckDB service's (tests/analytics/conftest.py `analytics`)
  number for number, and the stored decimals equal bit for bit;
- an ingest acknowledged by one replica is in the other's very next answer, result cache
  and in-process caches warm notwithstanding;
- PostgreSQL down: UNAVAILABLE with RetryInfo, and the service recovers by itself.

The sample load takes a few seconds, so the replicas are shared by this module; the
tests that write use tenant globex and symbols of their own, the comparisons tenant acme.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.common.errors import status_info
from services.analytics.sample_loader import SampleLoader
from tests.analytics.conftest import (
    Running,
    date_pb,
    series,
    start_analytics,
    write_analytics_keys,
)
from tests.analytics.test_service_data import ROWS, get_bars, ingest
from tests.analytics.test_service_metrics import STOCKS
from tests.conftest import RedisProcess
from tests.postgres import PostgresServer

SAMPLE_BARS = 184_635  # bars of the bundled sample files that pass the row rules


def sample_loads(outcome: str) -> float:
    value = REGISTRY.get_sample_value("finsight_analytics_sample_loads_total", {"outcome": outcome})
    return value or 0.0


def loader_of(running: Running) -> SampleLoader:
    check = running.host._checks["sample_data"][0]
    loader = getattr(check, "__self__", None)
    assert isinstance(loader, SampleLoader)
    return loader


@dataclass
class Replicas:
    a: Running
    b: Running
    url: str
    dirs: list[Path]
    loads: dict[str, float]  # sample-load outcomes counted while they started


@pytest.fixture(scope="module")
async def replicas(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[Replicas]:
    tmp = tmp_path_factory.mktemp("analytics-pg")
    redis = RedisProcess(tmp / "valkey")
    redis.start()
    url = pg_server.create_database("analytics")
    keys = write_analytics_keys(tmp / "keys.json")
    dirs = [tmp / "a", tmp / "b"]
    for d in dirs:
        d.mkdir()
    before = {o: sample_loads(o) for o in ("loaded", "present")}
    a, b = await asyncio.gather(
        *(start_analytics(d, redis.url, keys, analytics_database_url=url) for d in dirs)
    )
    loads = {o: sample_loads(o) - before[o] for o in before}
    yield Replicas(a, b, url, dirs, loads)
    for r in (a, b):
        await r.channel.close()
        await r.host.drain_and_stop()
    pg_server.drop_database(url)
    redis.stop()


async def all_bars(r: Running, symbol: str) -> pb.BarSeries:
    call = r.stub.GetBars(
        pb.GetBarsRequest(symbol=symbol, page_size=50_000), metadata=r.keys.md(r.keys.reader_a)
    )
    pages = [reply.bars async for reply in call]
    assert len(pages) == 1
    return pages[0]


def without_version(message: Message) -> bytes:
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("data_version")  # type: ignore[arg-type]
    if isinstance(copy, pb.OptimizePortfolioResponse):
        copy.solver.ClearField("seconds")  # wall time of the solve, not a result
    return copy.SerializeToString(deterministic=True)


async def test_replicas_starting_together_load_the_sample_once(replicas: Replicas) -> None:
    outcomes = sorted(str(loader_of(r).outcome) for r in (replicas.a, replicas.b))
    assert outcomes == ["loaded", "present"]
    assert replicas.loads == {"loaded": 1, "present": 1}
    with psycopg.connect(replicas.url) as conn:
        rows = conn.execute("SELECT count(*) FROM bars WHERE tenant = '__shared__'").fetchone()
        version = conn.execute(
            "SELECT version FROM data_versions WHERE tenant = '__shared__'"
        ).fetchone()
    assert rows == (SAMPLE_BARS,)
    assert version == (1,)  # one load, one version bump
    assert [list(d.rglob("*.duckdb*")) for d in replicas.dirs] == [[], []]


async def test_answers_equal_the_duckdb_service(replicas: Replicas, analytics: Running) -> None:
    def calls(r: Running) -> list[tuple[str, Message]]:
        dated = pb.ComputeMetricsRequest(symbols=["MSFT", "KO", "^GSPC"], risk_free_rate=0.03)
        dated.range.start.CopyFrom(date_pb("2008-01-01"))
        dated.range.end.CopyFrom(date_pb("2009-12-31"))
        return [
            ("ComputeMetrics", pb.ComputeMetricsRequest(symbols=STOCKS, benchmark="SP500")),
            ("ComputeMetrics", dated),
            (
                "RollingMetrics",
                pb.RollingMetricsRequest(
                    symbol="JPM", metric=pb.ROLLING_METRIC_BETA, window=63, benchmark="SP500"
                ),
            ),
            (
                "ComputeFactorExposure",
                pb.ComputeFactorExposureRequest(
                    symbol="AAPL",
                    factors=[pb.Factor(symbol="SP500"), pb.Factor(symbol="MSFT")],
                    rolling_window=63,
                ),
            ),
            (
                "OptimizePortfolio",
                pb.OptimizePortfolioRequest(
                    symbols=["AAPL", "KO", "JPM", "XOM"],
                    objective=pb.OPTIMIZATION_OBJECTIVE_MAX_SHARPE,
                    max_weight=0.6,
                    benchmark="SP500",
                ),
            ),
            (
                "ComputePortfolio",
                pb.ComputePortfolioRequest(
                    holdings=[
                        pb.Holding(symbol="AAPL", weight=0.5),
                        pb.Holding(symbol="KO", weight=0.3),
                        pb.Holding(symbol="^GSPC", weight=0.2),
                    ],
                    benchmark="SP500",
                    include_returns=True,
                ),
            ),
        ]

    for (method, request), (_, same_request) in zip(
        calls(analytics), calls(replicas.a), strict=True
    ):
        want = await getattr(analytics.stub, method)(
            request, metadata=analytics.keys.md(analytics.keys.reader_a)
        )
        for r in (replicas.a, replicas.b, replicas.a):  # the last one from the result cache
            got = await getattr(r.stub, method)(same_request, metadata=r.keys.md(r.keys.reader_a))
            assert without_version(got) == without_version(want), method
            assert got.data_version == 1  # acme has no data of its own here: the sample's
    assert len(want.returns) > 6000  # type: ignore[attr-defined]  # the portfolio since 1999

    listed_pg = await replicas.b.stub.ListSymbols(
        pb.ListSymbolsRequest(), metadata=replicas.b.keys.md(replicas.b.keys.reader_a)
    )
    listed_duck = await analytics.stub.ListSymbols(
        pb.ListSymbolsRequest(), metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    shared = [s for s in listed_duck.symbols if s.source == pb.DATA_SOURCE_SHARED]
    assert list(listed_pg.symbols) == shared and len(shared) == 23
    for symbol in ("BBY", "^GSPC", "^IXIC", "SP500"):
        from_pg = await all_bars(replicas.a, symbol)
        assert from_pg == await all_bars(analytics, symbol), symbol
        assert len(from_pg.dates) > 5000


async def test_an_ingest_through_one_replica_is_in_the_others_next_answer(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    k = a.keys.writer_b  # tenant globex
    request = pb.ComputeMetricsRequest(symbols=["KO", "PG"])
    md = b.keys.md(k)
    first = await b.stub.ComputeMetrics(request, metadata=md)
    cached = await b.stub.ComputeMetrics(request, metadata=md)  # result cache + series warm
    assert cached == first and first.metrics[0].return_count > 8000
    listed = await b.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md)
    assert "RYW1" not in {s.symbol for s in listed.symbols}

    # Through A: globex's own KO (replaces the shared one for globex) and a new symbol.
    reply = await ingest(a, k, series("KO", ROWS), series("RYW1", ROWS))
    assert (reply.inserted, reply.updated, reply.unchanged) == (6, 0, 0)
    assert reply.data_version == first.data_version + 1

    after = await b.stub.ComputeMetrics(request, metadata=md)
    assert after.data_version == reply.data_version
    assert after.metrics[0].return_count == 2  # globex's three KO bars
    assert after.metrics[1].total_return == first.metrics[1].total_return  # PG: shared
    assert after.metrics[1].return_count == first.metrics[1].return_count
    listed = await b.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md)
    sources = {s.symbol: (s.bar_count, s.source) for s in listed.symbols}
    assert sources["RYW1"] == (3, pb.DATA_SOURCE_TENANT)
    assert sources["KO"] == (3, pb.DATA_SOURCE_TENANT)
    assert listed.data_version == reply.data_version
    pages = await get_bars(b, k, "RYW1")
    assert [c for p in pages for c in p.close_micros] == [10_250_000, 10_750_000, 10_500_000]

    # The same ingest again through B changes nothing, and A sees no new version.
    again = await ingest(b, k, series("KO", ROWS), series("RYW1", ROWS))
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 6)
    assert again.data_version == reply.data_version
    # acme's answers (and cached results) were not touched by globex's ingest.
    acme = await a.stub.ComputeMetrics(request, metadata=a.keys.md(a.keys.reader_a))
    assert acme.data_version == 1 and acme.metrics[0].return_count > 8000


async def test_postgresql_down_is_unavailable_with_retry_info_then_recovers(
    tmp_path: Path, redis_url: str
) -> None:
    server = PostgresServer.start(tmp_path / "pg")
    url = server.create_database("analytics")
    keys = write_analytics_keys(tmp_path / "keys.json")
    running = await start_analytics(
        tmp_path,
        redis_url,
        keys,
        analytics_database_url=url,
        analytics_load_sample_data=False,
        analytics_cache_ttl_s=0,
        finsight_pg_pool_timeout_s=1.0,
        finsight_pg_connect_timeout_s=1.0,
    )
    md = keys.md(keys.writer_a)
    try:
        await ingest(running, keys.writer_a, series("DOWN1", ROWS))
        request = pb.ComputeMetricsRequest(symbols=["DOWN1"])
        assert (await running.stub.ComputeMetrics(request, metadata=md)).metrics
        server.stop()
        for call in (
            running.stub.ComputeMetrics(request, metadata=md, timeout=10),
            running.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md, timeout=10),
            running.stub.IngestBars(
                iter([pb.IngestBarsRequest(series=[series("DOWN2", ROWS)])]),
                metadata=md,
                timeout=10,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            info = status_info(err.value)
            assert info.code == grpc.StatusCode.UNAVAILABLE, info
            assert info.retry_after and info.retry_after > 0
        server = PostgresServer.start(tmp_path / "pg")  # the same data directory
        for _ in range(100):
            try:
                reply = await running.stub.ComputeMetrics(request, metadata=md, timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        assert reply.metrics[0].return_count == 2
        again = await ingest(running, keys.writer_a, series("DOWN2", ROWS))
        assert again.inserted == 3  # nothing of the failed ingest was written
    finally:
        await running.channel.close()
        await running.host.drain_and_stop()
        server.stop()
