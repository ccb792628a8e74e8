"""The in-process series cache (services/analytics/storage.py, "Read cache"): metric requests
are answered from cached series while the data version holds, never from data a commit
replaced, and the same with a cache too small to hold everything."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from finsight.analytics.v1 import analytics_pb2 as pb
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
