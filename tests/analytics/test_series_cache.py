"""The in-process series cache (services/analytics/storage.py, "Read cache"): metric requests
are answered from cached series while the data version holds, never from data a commit
replaced, and the same with a cache too small to hold everything."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.common.duck import Database
from services.analytics.bars import BarColumns
from services.analytics.main import MIGRATIONS
from services.analytics.storage import MarketStore, _arrow_table, _upsert
from tests.analytics.conftest import (
    Running,
    date_pb,
    series,
    start_analytics,
    write_analytics_keys,
)
from tests.analytics.test_service_data import ingest

DAYS = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(100)]


def prices(seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [round(float(p), 2) for p in 100 * np.cumprod(1 + rng.normal(0, 0.01, len(DAYS)))]


def bars(symbol: str, closes: list[float]) -> pb.BarSeries:
    return series(
        symbol, [(d.isoformat(), c, c, c, c, c, 1000) for d, c in zip(DAYS, closes, strict=True)]
    )


def series_reads() -> float:
    value = REGISTRY.get_sample_value(
        "finsight_db_query_seconds_count", {"db": "analytics", "statement": "read_adj_close"}
    )
    return value or 0.0


@pytest.fixture
async def small(tmp_path: Path, redis_url: str) -> AsyncIterator[Running]:
    # No Redis result cache (every request computes) and room for 150 rows: two 100-row
    # series do not fit together.
    keys = write_analytics_keys(tmp_path / "keys.json")
    running = await start_analytics(
        tmp_path, redis_url, keys, analytics_cache_ttl_s=0, analytics_series_cache_max_rows=150
    )
    yield running
    await running.channel.close()
    await running.host.drain_and_stop()


async def total_return(a: Running, *symbols: str, start: str = "") -> list[float]:
    request = pb.ComputeMetricsRequest(symbols=list(symbols))
    if start:
        request.range.start.CopyFrom(date_pb(start))
    reply = await a.stub.ComputeMetrics(request, metadata=a.keys.md(a.keys.writer_a))
    return [m.total_return for m in reply.metrics]


async def test_cached_series_answer_until_a_commit_replaces_them(small: Running) -> None:
    k = small.keys.writer_a
    zzz, yyy = prices(1), prices(2)
    await ingest(small, k, bars("ZZZ", zzz))
    assert await total_return(small, "ZZZ") == [pytest.approx(zzz[-1] / zzz[0] - 1, rel=1e-12)]
    reads = series_reads()
    # Another range of the same series: sliced from the cache, no DuckDB read.
    assert await total_return(small, "ZZZ", start="2024-02-01") == [
        pytest.approx(zzz[-1] / zzz[31] - 1, rel=1e-12)
    ]
    assert series_reads() == reads

    # A correction moves the data version: the next answer uses the new close.
    fixed = [*zzz[:-1], zzz[-1] * 2]
    await ingest(small, k, bars("ZZZ", fixed))
    assert await total_return(small, "ZZZ") == [pytest.approx(fixed[-1] / fixed[0] - 1, rel=1e-12)]
    assert series_reads() == reads + 1

    # Two series over the cache's bound: evicted and re-read, the answers stay right.
    await ingest(small, k, bars("YYY", yyy))
    for _ in range(2):
        assert await total_return(small, "ZZZ", "YYY") == [
            pytest.approx(fixed[-1] / fixed[0] - 1, rel=1e-12),
            pytest.approx(yyy[-1] / yyy[0] - 1, rel=1e-12),
        ]


async def test_a_tenants_own_series_replaces_the_shared_one_at_once(small: Running) -> None:
    shared = await total_return(small, "PFE")  # the sample data's series, now cached
    own = prices(3)
    await ingest(small, small.keys.writer_a, bars("PFE", own))
    assert await total_return(small, "PFE") == [pytest.approx(own[-1] / own[0] - 1, rel=1e-12)]
    other = await small.stub.ComputeMetrics(  # another tenant still reads the shared one
        pb.ComputeMetricsRequest(symbols=["PFE"]), metadata=small.keys.md(small.keys.writer_b)
    )
    assert [m.total_return for m in other.metrics] == shared


def columns(symbol: str, closes: list[float]) -> BarColumns:
    micros = np.array([round(c * 1_000_000) for c in closes], dtype=np.int64)
    return BarColumns(
        np.array([symbol] * len(closes), dtype=object),
        np.array(DAYS[: len(closes)], dtype="datetime64[D]"),
        micros,
        micros,
        micros,
        micros,
        micros,
        np.full(len(closes), 1000, dtype=np.int64),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MarketStore]:
    db = Database(tmp_path / "a.duckdb", name="series-cache", migrations_dir=MIGRATIONS)
    await db.open()
    yield MarketStore(db)
    await db.close()


async def test_a_commit_the_store_did_not_see_is_never_mixed_in_or_cached(
    store: MarketStore,
) -> None:
    await store.upsert("t", columns("AAA", prices(4)))
    owners = {"AAA": "t", "BBB": "t"}
    await store.upsert("t", columns("BBB", prices(5)))
    version = await store.data_version()
    first = await store.adj_closes({"AAA": "t"}, None, None)  # AAA cached at `version`
    assert first.data_version == version
    # A commit that lands while the store still believes in `version` (as if its upsert
    # were still on its way back): BBB is read at the new version, so AAA is re-read
    # with it rather than served from the cache, and nothing is kept.
    changed = [*prices(4)[:-1], 1.0]
    counts = await store.db.write(
        "upsert_bars", _upsert, "t", _arrow_table(columns("AAA", changed))
    )
    panel = await store.adj_closes(owners, None, None)
    assert panel.data_version == counts.data_version > version
    aaa = panel.adj_close_micros[panel.columns == 0]
    assert aaa[-1] == 1_000_000  # the new close, not the cached one
    assert await store.data_version() == version  # the store has not seen the commit...
    again = await store.adj_closes(owners, None, None)
    assert again.data_version == counts.data_version  # ... and did not cache a mixture


async def test_a_write_that_fails_or_is_cancelled_drops_the_cache(store: MarketStore) -> None:
    await store.upsert("t", columns("AAA", prices(6)))
    await store.adj_closes({"AAA": "t"}, None, None)
    # The writer takes a slow job and the upsert in one batch; the upsert's caller gives up
    # while the batch runs, so the write commits but the store never hears of it.
    slow = asyncio.create_task(store.db.write("slow", lambda cur: time.sleep(0.5)))
    task = asyncio.create_task(store.upsert("t", columns("AAA", prices(7))))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await slow
    panel = await store.adj_closes({"AAA": "t"}, None, None)
    stored = await store.db.read(
        "v", lambda cur: cur.execute("SELECT version FROM data_version").fetchone()[0]
    )
    assert panel.data_version == stored  # re-read, at the version the file holds
