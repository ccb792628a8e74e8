"""The CLI importer streams a file over real gRPC: long CSV and wide Parquet, rejections."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finsight.analytics.v1 import analytics_pb2 as pb
from services.analytics.importer_cli import parse_args, run
from tests.analytics.conftest import Running

LONG = """symbol,date,open,high,low,close,adj close,volume
CLIA,2024-01-02,10.5,11,10,10.75,10.7,100
CLIA,2024-01-03,10.75,11.25,10.5,11,10.95,200
CLIB,2024-01-02,0.1234567,1,0.1,0.5,0.5,10
CLIB,2024-01-03,1.5,1.2,1.0,1.1,1.1,10
CLIB,2024-01-04,1.1,1.2,1.0,1.1,1.1,abc
CLIB,2024-01-05,1.100001,1.2,1.0,1.1,1.1,10
"""


async def bars_of(a: Running, symbol: str) -> pb.BarSeries:
    call = a.stub.GetBars(pb.GetBarsRequest(symbol=symbol), metadata=a.keys.md(a.keys.reader_a))
    return (await call.read()).bars


async def test_long_csv_import_reports_every_rejection(
    analytics: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "long.csv"
    path.write_text(LONG)
    args = parse_args(
        [str(path), "--target", analytics.target, "--api-key", analytics.keys.writer_a]
    )
    assert await run(args) == 1  # rows were rejected
    out = capsys.readouterr()
    assert "more than 6 decimal places" in out.err  # CLIB 2024-01-02: never rounded
    assert "CLIB 2024-01-03: open outside [low, high]" in out.err  # rejected by the service
    assert "non-numeric volume" in out.err  # CLIB 2024-01-04, rejected by the parser
    clia = await bars_of(analytics, "CLIA")
    assert list(clia.adj_close_micros) == [10_700_000, 10_950_000]
    clib = await bars_of(analytics, "CLIB")
    assert list(clib.open_micros) == [1_100_001]

    # The same file again changes nothing (the data version does not move).
    md = analytics.keys.md(analytics.keys.reader_a)
    before = (await analytics.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md)).data_version
    assert await run(args) == 1
    after = (await analytics.stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md)).data_version
    assert after == before
    again = await bars_of(analytics, "CLIA")
    assert again == clia


async def test_wide_parquet_import(analytics: Running, tmp_path: Path) -> None:
    table = pa.table(
        {
            "Date": pa.array(["2024-01-02", "2024-01-03", "2024-01-04"]),
            "CLIW1": pa.array([1.5, 1.25, None]),
            "CLIW2": pa.array([100.0, 101.5, 99.75]),
        }
    )
    path = tmp_path / "wide.parquet"
    pq.write_table(table, path)
    args = parse_args(
        [str(path), "--layout", "wide", "--target", analytics.target,
         "--api-key", analytics.keys.writer_a, "--reject-all"]
    )  # fmt: skip
    assert await run(args) == 0
    assert list((await bars_of(analytics, "CLIW1")).close_micros) == [1_500_000, 1_250_000]
    assert list((await bars_of(analytics, "CLIW2")).close_micros) == [
        100_000_000, 101_500_000, 99_750_000]  # fmt: skip


async def test_missing_write_scope_is_an_error(analytics: Running, tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text(LONG)
    args = parse_args(
        [str(path), "--target", analytics.target, "--api-key", analytics.keys.reader_a]
    )
    assert await run(args) == 2
