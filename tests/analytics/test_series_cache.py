"""The in-process series cache (services/analytics/storage.py, "Read cache") in DuckDB's
sole-writer mode: metric requests are answered from cached series while the data version
holds, never from data a commit replaced (not even one the store did not see: a commit in
flight, a cancelled write that committed all the same), and the same with a cache too small
to hold everything. The same cache over PostgreSQL with several writers:
test_store_replicas.py."""

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
from libs.common.duck import Cursor, Database
from services.analytics.bars import BarColumns
from services.analytics.main import MIGRATIONS
from services.analytics.storage import MarketStore
from services.analytics.storage_duckdb import DuckMarketBackend, arrow_table, upsert
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
    yield MarketStore(DuckMarketBackend(db))
    await db.close()


def duck(store: MarketStore) -> Database:
    assert isinstance(store.backend, DuckMarketBackend)
    return store.backend.db


def stored_version(cur: Cursor, tenant: str) -> int:
    row = cur.execute(
        "SELECT sum(version) FROM data_versions WHERE tenant IN (?, '__shared__')", [tenant]
    ).fetchone()
    return int(row[0] or 0) if row else 0


async def test_a_commit_the_store_did_not_see_is_never_mixed_in_or_cached(
    store: MarketStore,
) -> None:
    await store.upsert("t", columns("AAA", prices(4)))
    await store.upsert("t", columns("BBB", prices(5)))
    view = await store.view("t")
    first = await store.adj_closes(view, ["AAA"], None, None)  # AAA cached at `version`
    version = first.data_version
    # A commit that lands while the store still believes in `version` (as if its upsert
    # were still on its way back): BBB is read at the new version, so AAA is re-read
    # with it rather than served from the cache, and the answer is from one state.
    changed = [*prices(4)[:-1], 1.0]
    done = await duck(store).write("upsert_bars", upsert, "t", arrow_table(columns("AAA", changed)))
    assert (await store.view("t")).data_version == version  # not seen yet...
    panel = await store.adj_closes(await store.view("t"), ["AAA", "BBB"], None, None)
    new_version = sum(done.versions.values())
    assert panel.data_version == new_version > version
    aaa = panel.adj_close_micros[panel.columns == 0]
    assert aaa[-1] == 1_000_000  # the new close, not the cached one
    # ... and what was cached meanwhile is tagged with the state it was read at.
    again = await store.adj_closes(await store.view("t"), ["AAA", "BBB"], None, None)
    assert again.data_version == new_version
    assert np.array_equal(again.adj_close_micros, panel.adj_close_micros)


async def test_a_cancelled_write_that_commits_later_is_never_hidden(store: MarketStore) -> None:
    await store.upsert("t", columns("AAA", prices(6)))
    view = await store.view("t")
    await store.adj_closes(view, ["AAA"], None, None)  # cached at the known version
    # The writer takes a slow job and the upsert in ONE batch; the upsert's caller gives
    # up while the batch runs, so the write commits but the store never hears of it.
    db = duck(store)
    slow = asyncio.create_task(db.write("slow", lambda cur: time.sleep(0.5)))
    task = asyncio.create_task(store.upsert("t", columns("AAA", prices(7))))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await slow  # the batch has committed, the cancelled upsert with it
    stored = await db.read("v", stored_version, "t")
    assert stored == view.data_version + 1
    now = await store.view("t")
    assert now.data_version == stored  # read from the file, not the stale knowledge
    panel = await store.adj_closes(now, ["AAA"], None, None)
    assert panel.data_version == stored
    assert panel.adj_close_micros[-1] == round(prices(7)[-1] * 1_000_000)
    # Once a no-op write has passed the single writer, the store trusts what it learns
    # again: a warm view costs no database read.
    for _ in range(100):
        if store._unsettled == 0:
            break
        await asyncio.sleep(0.01)
    assert store._unsettled == 0
    await store.view("t")  # learns the versions once
    reads = version_reads("series-cache")
    assert (await store.view("t")).data_version == stored
    assert version_reads("series-cache") == reads


def version_reads(db: str) -> float:
    value = REGISTRY.get_sample_value(
        "finsight_db_query_seconds_count", {"db": db, "statement": "data_version"}
    )
    return value or 0.0


def list_symbols_reads() -> float:
    value = REGISTRY.get_sample_value(
        "finsight_db_query_seconds_count", {"db": "analytics", "statement": "list_symbols"}
    )
    return value or 0.0


async def test_list_symbols_is_served_from_memory_until_a_commit(small: Running) -> None:
    k = small.keys.writer_a
    await ingest(small, k, bars("LSA", prices(3)))

    async def listed() -> dict[str, int]:
        reply = await small.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=small.keys.md(k))
        return {s.symbol: s.bar_count for s in reply.symbols}

    assert (await listed())["LSA"] == len(DAYS)
    reads = list_symbols_reads()
    for _ in range(3):  # no aggregate over the bars table while the data version holds
        assert (await listed())["LSA"] == len(DAYS)
    assert list_symbols_reads() == reads
    await ingest(small, k, bars("LSB", prices(4)))
    assert set(await listed()) >= {"LSA", "LSB"}  # a commit: read again, the new symbol in
    assert list_symbols_reads() == reads + 1
