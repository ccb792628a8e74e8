"""IngestBars / ListSymbols / GetBars over real gRPC and a real DuckDB file.

Idempotent upsert with inserted / updated / unchanged counts, the data version, row
rejections in both invalid-row policies, exact decimal storage, scopes, and tenant
isolation (with the shared sample data visible to every tenant).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.common.errors import status_info
from tests.analytics.conftest import Running, series, start_analytics, write_analytics_keys

ROWS = [
    ("2024-01-02", 10.0, 10.5, 9.5, 10.25, 10.2, 1000),
    ("2024-01-03", 10.25, 11.0, 10.0, 10.75, 10.7, 2000),
    ("2024-01-04", 10.75, 10.8, 10.1, 10.5, 10.45, 1500),
]


def stream(*messages: pb.IngestBarsRequest) -> Iterable[pb.IngestBarsRequest]:
    return iter(messages)


async def ingest(
    a: Running, key: str, *series_: pb.BarSeries, policy: int = pb.INVALID_ROW_POLICY_SKIP_INVALID
) -> pb.IngestBarsResponse:
    request = pb.IngestBarsRequest(on_invalid=policy, series=list(series_))
    return await a.stub.IngestBars(stream(request), metadata=a.keys.md(key), timeout=30)


async def get_bars(a: Running, key: str, symbol: str) -> list[pb.BarSeries]:
    call = a.stub.GetBars(pb.GetBarsRequest(symbol=symbol, page_size=2), metadata=a.keys.md(key))
    return [reply.bars async for reply in call]


async def test_reingest_is_idempotent_and_a_correction_counts_as_updated(
    analytics: Running,
) -> None:
    k = analytics.keys.writer_a
    first = await ingest(analytics, k, series("IDEM1", ROWS))
    assert (first.received, first.inserted, first.updated, first.unchanged, first.rejected) == (
        3,
        3,
        0,
        0,
        0,
    )

    again = await ingest(analytics, k, series("IDEM1", ROWS))
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 3)
    assert again.data_version == first.data_version  # nothing changed: caches stay valid

    corrected = [ROWS[0], ("2024-01-03", 10.25, 11.0, 10.0, 10.8, 10.75, 2100), ROWS[2]]
    fixed = await ingest(analytics, k, series("IDEM1", corrected))
    assert (fixed.inserted, fixed.updated, fixed.unchanged) == (0, 1, 2)
    assert fixed.data_version > first.data_version

    pages = await get_bars(analytics, k, "IDEM1")
    assert [len(p.dates) for p in pages] == [2, 1]  # page_size 2, date order
    closes = [c for p in pages for c in p.close_micros]
    assert closes == [10_250_000, 10_800_000, 10_500_000]
    assert [v for p in pages for v in p.volumes] == [1000, 2100, 1500]


async def test_invalid_rows_are_reported_and_skipped(analytics: Running) -> None:
    bad = series(
        "SKIP1",
        [
            ROWS[0],
            ("2024-01-03", 10.0, 9.0, 9.5, 9.6, 9.6, 10),  # low > high
            ("2024-01-04", 10.0, 10.5, 9.5, 11.0, 10.0, 10),  # close above high
            ("2024-01-05", 10.0, 10.5, 9.5, 10.0, 10.0, -1),  # negative volume
            ("2024-01-08", 0.0, 10.5, 0.0, 10.0, 10.0, 10),  # zero price
            ("2024-01-09", 10.0, 10.5, 9.5, 10.0, 10.0, 10),  # ok
        ],
    )
    bad.dates[5].CopyFrom(bad.dates[5].__class__(year=2023, month=2, day=30))  # no such day
    dup = series("SKIP1", [ROWS[2], ROWS[2]])  # the same row twice: one copy kept
    day, o, h, lo, c, adj, vol = ROWS[0]
    changed = (day, o * 2, h * 2, lo * 2, c * 2, adj * 2, vol * 2)
    conflict = series("SKIP2", [ROWS[0], changed])  # one key, two different bars
    bad_symbol = series("bad symbol!", [ROWS[0]])
    reply = await ingest(analytics, analytics.keys.writer_a, bad, dup, conflict, bad_symbol)
    assert reply.received == 11
    assert reply.inserted == 2 and reply.rejected == 8 and reply.duplicates_collapsed == 1
    reasons = {(r.series_index, r.row_index): r.reason for r in reply.rejections}
    assert reasons[(0, 1)] == "low > high"
    assert reasons[(0, 2)] == "close outside [low, high]"
    assert reasons[(0, 3)] == "volume must be >= 0"
    assert reasons[(0, 4)] == "prices must be > 0"
    assert reasons[(0, 5)].startswith("invalid date")
    assert (1, 0) not in reasons and (1, 1) not in reasons
    assert reasons[(2, 0)].startswith("conflicting duplicate (symbol, date)")
    assert "also at message 0 series 2 row 1" in reasons[(2, 0)]
    assert "also at message 0 series 2 row 0" in reasons[(2, 1)]
    assert reasons[(3, -1)].startswith("invalid symbol")
    dated = next(r for r in reply.rejections if r.row_index == 1 and r.series_index == 0)
    assert (dated.symbol, dated.date.year, dated.date.month, dated.date.day) == (
        "SKIP1",
        2024,
        1,
        3,
    )
    pages = await get_bars(analytics, analytics.keys.writer_a, "SKIP1")
    assert [(d.month, d.day) for p in pages for d in p.dates] == [(1, 2), (1, 4)]


async def test_reject_all_writes_nothing(analytics: Running) -> None:
    rows = [ROWS[0], ("2024-01-03", 10.0, 9.0, 9.5, 9.6, 9.6, 10)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest(
            analytics,
            analytics.keys.writer_a,
            series("ALLORNONE", rows),
            policy=pb.INVALID_ROW_POLICY_REJECT_ALL,
        )
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in info.field_violations] == [
        ("messages[0].series[0].rows[1]", "low > high")
    ]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get_bars(analytics, analytics.keys.writer_a, "ALLORNONE")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_multi_message_stream_is_one_unit(analytics: Running) -> None:
    k = analytics.keys.writer_a
    messages = [pb.IngestBarsRequest(series=[series("MULTI1", [r])]) for r in ROWS]
    reply = await analytics.stub.IngestBars(iter(messages), metadata=analytics.keys.md(k))
    assert (reply.received, reply.inserted) == (3, 3)


async def test_sample_prices_are_stored_exactly(analytics: Running) -> None:
    # Reading one page and cancelling the stream is also the regression test for a server
    # crash: the kit's access log read ctx.peer() after the client cancelled (segfault).
    k = analytics.keys.reader_a
    call = analytics.stub.GetBars(
        pb.GetBarsRequest(symbol="BBY", page_size=1), metadata=analytics.keys.md(k)
    )
    first = await call.read()
    call.cancel()
    assert first.bars.adj_close_micros[0] == 144_000  # 0.144 in the file, 1990-01-02
    call = analytics.stub.GetBars(
        pb.GetBarsRequest(symbol="^GSPC", page_size=1), metadata=analytics.keys.md(k)
    )
    first = await call.read()
    call.cancel()
    bars = first.bars
    # 1/4/1999,1229.22998,1248.810059,1219.099976,1228.099976,1228.099976,877000000
    assert (bars.open_micros[0], bars.high_micros[0], bars.low_micros[0]) == (
        1_229_229_980,
        1_248_810_059,
        1_219_099_976,
    )
    assert bars.volumes[0] == 877_000_000


async def test_ingest_needs_the_write_scope(analytics: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest(analytics, analytics.keys.reader_a, series("NOPE1", ROWS))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.ListSymbols(
            pb.ListSymbolsRequest(), metadata=analytics.keys.md(analytics.keys.narrow)
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tenants_are_isolated_and_share_the_reference_data(analytics: Running) -> None:
    a, b = analytics.keys.writer_a, analytics.keys.writer_b
    await ingest(analytics, a, series("ACMEONLY", ROWS))
    # globex overrides AAPL with its own series; acme keeps the shared one.
    await ingest(analytics, b, series("AAPL", ROWS))

    def listed(reply: pb.ListSymbolsResponse) -> dict[str, tuple[int, int]]:
        return {s.symbol: (s.bar_count, s.source) for s in reply.symbols}

    seen_a = listed(
        await analytics.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=analytics.keys.md(a))
    )
    seen_b = listed(
        await analytics.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=analytics.keys.md(b))
    )
    assert seen_a["ACMEONLY"] == (3, pb.DATA_SOURCE_TENANT)
    assert "ACMEONLY" not in seen_b
    assert seen_a["AAPL"] == (8313, pb.DATA_SOURCE_SHARED)
    assert seen_b["AAPL"] == (3, pb.DATA_SOURCE_TENANT)
    assert seen_b["MSFT"] == (8313, pb.DATA_SOURCE_SHARED)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get_bars(analytics, b, "ACMEONLY")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.ComputeMetrics(
            pb.ComputeMetricsRequest(symbols=["ACMEONLY"]), metadata=analytics.keys.md(b)
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # globex's metrics for AAPL come from its own three bars.
    reply = await analytics.stub.ComputeMetrics(
        pb.ComputeMetricsRequest(symbols=["AAPL"]), metadata=analytics.keys.md(b)
    )
    assert reply.metrics[0].return_count == 2


async def test_get_bars_rejects_a_bad_range(analytics: Running) -> None:
    request = pb.GetBarsRequest(symbol="AAPL")
    request.range.start.CopyFrom(request.range.start.__class__(year=2020, month=1, day=1))
    request.range.end.CopyFrom(request.range.end.__class__(year=2019, month=1, day=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in analytics.stub.GetBars(
            request, metadata=analytics.keys.md(analytics.keys.reader_a)
        ):
            pass
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["range.start"]


async def test_a_stream_over_the_row_limit_writes_nothing(tmp_path: Path, redis_url: str) -> None:
    keys = write_analytics_keys(tmp_path / "keys.json")
    small = await start_analytics(
        tmp_path, redis_url, keys, analytics_load_sample_data=False, analytics_ingest_max_rows=4
    )
    try:
        messages = [pb.IngestBarsRequest(series=[series("LIMIT1", ROWS)])] * 2  # 6 rows
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await small.stub.IngestBars(iter(messages), metadata=keys.md(keys.writer_a))
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in info.field_violations] == ["messages[1]"]
        listed = await small.stub.ListSymbols(
            pb.ListSymbolsRequest(), metadata=keys.md(keys.writer_a)
        )
        assert list(listed.symbols) == [] and listed.data_version == 0
    finally:
        await small.channel.close()
        await small.host.drain_and_stop()
