"""The bar file reader (libs/barfiles/reader.py): layouts, exact Decimals, the sample
files, rejected rows and their editor lines, and the column messages."""

from __future__ import annotations

import csv
import gzip
import io
from datetime import date
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from libs.barfiles import reader as im
from services.analytics import metrics as m

SAMPLE = Path(__file__).resolve().parents[2] / "services" / "analytics" / "sample_data"


def _raw_rows(name: str) -> list[dict[str, str]]:
    """The file's cells as text, read with the stdlib only (independent oracle)."""
    with gzip.open(SAMPLE / name, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def _us_date(text: str) -> date:
    month, day, year = (int(x) for x in text.split("/"))
    return date(year, month, day)


# ---------------------------------------------------------------------------
# Sample files
# ---------------------------------------------------------------------------


def test_wide_sample_every_value_exact() -> None:
    result = im.read_bars(SAMPLE / "sp500_dataset.csv.gz")
    assert result.layout == "wide"
    assert result.rejected == []
    raw = _raw_rows("sp500_dataset.csv.gz")
    symbols = [k for k in raw[0] if k != "Date"]
    assert len(result.bars) == len(raw) * len(symbols) == 8313 * 20
    expected = {
        (s, date.fromisoformat(row["Date"])): row[s] for row in raw for s in symbols if row[s]
    }
    got = {(b.symbol, b.date): b for b in result.bars}
    assert got.keys() == expected.keys()
    for key, text in expected.items():
        bar = got[key]
        # Exact: same digits as the file, no float round trip.
        assert str(bar.adj_close) == text
        assert bar.open == bar.high == bar.low == bar.close == bar.adj_close
        assert bar.volume == 0


def test_decimal_exactness_of_small_early_prices() -> None:
    result = im.read_bars(SAMPLE / "sp500_dataset.csv.gz")
    first_aapl = next(b for b in result.bars if b.symbol == "AAPL")
    assert first_aapl.date == date(1990, 1, 2)
    assert isinstance(first_aapl.adj_close, Decimal)
    assert first_aapl.adj_close == Decimal("0.264")
    assert str(first_aapl.adj_close) == "0.264"
    # The binary float nearest 0.264 is not 0.264: a float round trip would show.
    assert first_aapl.adj_close != Decimal(float("0.264"))


def test_single_column_wide_index_and_rename() -> None:
    plain = im.read_bars(SAMPLE / "sp500_index.csv.gz")
    assert plain.layout == "wide"
    assert {b.symbol for b in plain.bars} == {"SP500"}
    assert len(plain.bars) == 8313
    assert plain.bars[0].adj_close == Decimal("359.69")
    renamed = im.read_bars(SAMPLE / "sp500_index.csv.gz", symbol="^SPX")
    assert {b.symbol for b in renamed.bars} == {"^SPX"}
    assert [b.adj_close for b in renamed.bars] == [b.adj_close for b in plain.bars]


@pytest.mark.parametrize(
    ("name", "symbol"), [("sp500_ohlcv.csv.gz", "^GSPC"), ("nasdaq_ohlcv.csv.gz", "^IXIC")]
)
def test_index_ohlcv_files(name: str, symbol: str) -> None:
    result = im.read_bars(SAMPLE / name, symbol=symbol)
    raw = _raw_rows(name)
    assert result.layout == "long"
    assert result.rejected == []
    assert len(result.bars) == len(raw) == 5031
    for bar, row in zip(result.bars, raw, strict=True):
        assert bar.symbol == symbol
        assert bar.date == _us_date(row["Date"])
        assert (str(bar.open), str(bar.high), str(bar.low), str(bar.close)) == (
            row["Open"],
            row["High"],
            row["Low"],
            row["Close"],
        )
        assert str(bar.adj_close) == row["Adj Close"]
        assert bar.volume == int(row["Volume"])
    assert result.bars[0].date == date(1999, 1, 4)


def test_index_ohlcv_without_symbol_is_a_format_error() -> None:
    # The message names the command line's flag, not the Python keyword.
    with pytest.raises(im.ImportFormatError, match="give --symbol") as err:
        im.read_bars(SAMPLE / "sp500_ohlcv.csv.gz")
    assert "symbol=" not in str(err.value)


def test_bars_feed_the_metric_engine() -> None:
    """Importer -> to_price_matrix -> metrics equals metrics on a direct float read."""
    matrix = im.to_price_matrix(im.read_bars(SAMPLE / "sp500_dataset.csv.gz").bars)
    raw = _raw_rows("sp500_dataset.csv.gz")
    assert matrix.symbols == tuple(sorted(k for k in raw[0] if k != "Date"))
    direct = np.array([[float(row[s]) for s in matrix.symbols] for row in raw])
    np.testing.assert_array_equal(matrix.adj_close, direct)
    assert matrix.dates[0] == np.datetime64("1990-01-02")
    res = m.compute_metrics(matrix.adj_close, matrix.dates, matrix.symbols)
    assert res["AAPL"].n_returns == 8312


# ---------------------------------------------------------------------------
# Long format, header leniency, detection
# ---------------------------------------------------------------------------

LONG = b"""Symbol , DATE,open,HIGH,Low,close,adj_close,Volume
AAPL,1990-01-02,0.264,0.27,0.26,0.264,0.264,100
AAPL,1/3/1990,0.266,0.27,0.26,0.266,0.2661,1200.0
MSFT,1990/01/02, 1.5 ,+1.6,1.4,1.55,1.55e0,
"""


def test_long_layout_with_lenient_headers_and_dates() -> None:
    result = im.read_bars(LONG)
    assert result.layout == "long"
    assert result.rejected == []
    assert result.bars == [
        im.Bar(
            "AAPL",
            date(1990, 1, 2),
            Decimal("0.264"),
            Decimal("0.27"),
            Decimal("0.26"),
            Decimal("0.264"),
            Decimal("0.264"),
            100,
        ),
        im.Bar(
            "AAPL",
            date(1990, 1, 3),
            Decimal("0.266"),
            Decimal("0.27"),
            Decimal("0.26"),
            Decimal("0.266"),
            Decimal("0.2661"),
            1200,
        ),
        im.Bar(
            "MSFT",
            date(1990, 1, 2),
            Decimal("1.5"),
            Decimal("1.6"),
            Decimal("1.4"),
            Decimal("1.55"),
            Decimal("1.55"),
            0,
        ),
    ]


@pytest.mark.parametrize(
    "header", ["Adj Close", "adj_close", "AdjClose", "ADJUSTED CLOSE", "adj-close"]
)
def test_adj_close_header_variants(header: str) -> None:
    data = f"ticker,date,{header}\nX,2020-01-02,10.5\n".encode()
    (bar,) = im.read_bars(data).bars
    assert (bar.symbol, bar.adj_close, bar.close, bar.open, bar.volume) == (
        "X",
        Decimal("10.5"),
        Decimal("10.5"),
        Decimal("10.5"),
        0,
    )


def test_missing_adj_close_falls_back_to_close() -> None:
    data = b"symbol,date,open,high,low,close,volume\nX,2020-01-02,1,2,0.5,1.5,7\n"
    (bar,) = im.read_bars(data).bars
    assert bar.adj_close == bar.close == Decimal("1.5")
    assert bar.low == Decimal("0.5")


@pytest.mark.parametrize(
    ("columns", "layout"),
    [
        (["symbol", "date", "close"], "long"),
        (["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"], "long"),
        (["Date", "AAPL", "MSFT"], "wide"),
        (["date", "SP500"], "wide"),
    ],
)
def test_detect_layout(columns: list[str], layout: str) -> None:
    assert im.detect_layout(columns, symbol="^X" if "Open" in columns else None) == layout


def test_forced_wide_layout_overrides_detection() -> None:
    data = b"Date,Close\n2020-01-02,5\n2020-01-03,6\n"
    with pytest.raises(im.ImportFormatError):
        im.read_bars(data)  # auto: single-symbol OHLCV without symbol=
    result = im.read_bars(data, layout="wide")
    assert result.layout == "wide"
    assert [(b.symbol, b.adj_close) for b in result.bars] == [
        ("Close", Decimal("5")),
        ("Close", Decimal("6")),
    ]


def test_wide_empty_cells_are_skipped_not_rejected() -> None:
    data = b"Date,A,B,\n2020-01-01,1.5,,\n2020-01-02,NaN,2,\n"
    result = im.read_bars(data)
    assert result.rejected == []
    assert [(b.symbol, b.date.day) for b in result.bars] == [("A", 1), ("B", 2)]


# ---------------------------------------------------------------------------
# Sources: bytes, gzip bytes, file objects, Parquet
# ---------------------------------------------------------------------------


def test_gzip_bytes_and_file_objects() -> None:
    raw = (SAMPLE / "sp500_index.csv.gz").read_bytes()
    from_bytes = im.read_bars(raw)
    from_file = im.read_bars(io.BytesIO(gzip.decompress(raw)))
    from_path = im.read_bars(str(SAMPLE / "sp500_index.csv.gz"))
    assert from_bytes.bars == from_file.bars == from_path.bars


def test_parquet_long_with_float_and_decimal_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "Symbol": ["AAPL", "AAPL"],
            "Date": pa.array([date(1990, 1, 2), date(1990, 1, 3)], pa.date32()),
            "Close": [0.264, 0.266],
            "Adj Close": pa.array([Decimal("0.2640"), Decimal("0.2660")], pa.decimal128(10, 4)),
            "Volume": pa.array([100, 200], pa.int64()),
        }
    )
    path = tmp_path / "bars.parquet"
    pq.write_table(table, path)
    result = im.read_bars(path)
    assert result.layout == "long"
    first = result.bars[0]
    assert first.close == Decimal("0.264")  # float64 -> shortest decimal text
    assert str(first.adj_close) == "0.2640"  # decimal128 stays exact
    assert (first.date, first.volume) == (date(1990, 1, 2), 100)
    assert im.read_bars(path.read_bytes()).bars == result.bars


def test_parquet_wide(tmp_path: Path) -> None:
    table = pa.table({"date": ["2020-01-02", "2020-01-03"], "X": [1.25, None]})
    path = tmp_path / "wide.pq"
    pq.write_table(table, path)
    result = im.read_bars(path)
    assert result.layout == "wide"
    assert [(b.symbol, b.adj_close) for b in result.bars] == [("X", Decimal("1.25"))]


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def test_batches_respect_batch_size_and_cover_the_file() -> None:
    batches = list(im.iter_batches(SAMPLE / "sp500_dataset.csv.gz", batch_size=1000))
    assert len(batches) == 9  # 8313 rows in chunks of 1000
    assert all(len(b.bars) <= 1000 * 20 for b in batches)
    assert all(b.layout == "wide" for b in batches)
    streamed = [bar for b in batches for bar in b.bars]
    whole = im.read_bars(SAMPLE / "sp500_dataset.csv.gz").bars
    assert sorted(streamed, key=lambda b: (b.symbol, b.date)) == sorted(
        whole, key=lambda b: (b.symbol, b.date)
    )


# ---------------------------------------------------------------------------
# Bad rows are reported, not fatal
# ---------------------------------------------------------------------------

BAD_LONG = b"""symbol,date,open,high,low,close,adj_close,volume
GOOD,2020-01-02,1,1,1,1,1,10
BAD,2020-01-03,abc,1,1,1,1,10
,2020-01-04,1,1,1,1,1,10
BAD,2020-13-01,1,1,1,1,1,10
BAD,2020-01-06,1,1,1,1,0,10
BAD,2020-01-07,-1,1,1,1,1,10
BAD,2020-01-08,1,1,1,1,1,-5
BAD,2020-01-09,1,1,1,1,1,1.5
BAD,2020-01-10,1,1,1,1,inf,10
BAD,2020-01-13,1,1,1,1,,10
BAD,2020-01-14,1,1,1,1
BAD,2020-01-15,"1,000",1,1,1,1,10
GOOD,2020-01-16,2,2,2,2,2.000,20
"""


def test_bad_rows_are_rejected_with_reasons() -> None:
    result = im.read_bars(BAD_LONG)
    assert [(b.symbol, b.date, b.adj_close) for b in result.bars] == [
        ("GOOD", date(2020, 1, 2), Decimal("1")),
        ("GOOD", date(2020, 1, 16), Decimal("2.000")),
    ]
    reasons = {(r.line, r.row, r.reason, r.column, r.value) for r in result.rejected}
    # line: as an editor shows it (the header is line 1); row: among the well-formed rows.
    assert reasons == {
        (12, None, "expected 8 fields, got 6", None, "BAD,2020-01-14,1,1,1,1"),
        (3, 2, "non-numeric price", "open", "abc"),
        (4, 3, "empty symbol", "symbol", ""),
        (5, 4, "unparsable date", "date", "2020-13-01"),
        (6, 5, "adj_close must be > 0", "adj_close", "0"),
        (7, 6, "negative open", "open", "-1"),
        (8, 7, "negative volume", "volume", "-5"),
        (9, 8, "volume is not an integer", "volume", "1.5"),
        (10, 9, "non-finite price", "adj_close", "inf"),
        (11, 10, "missing price", "adj_close", ""),
        (13, 11, "non-numeric price", "open", "1,000"),
    }
    assert all(r.symbol == "BAD" for r in result.rejected if r.row not in (None, 3))


def test_bad_wide_cells_are_rejected_individually() -> None:
    data = b"Date,A,B\n2020-01-01,1.5,x\nnot-a-date,1,1\n2020-01-03,0,2\n"
    result = im.read_bars(data)
    assert [(b.symbol, b.date.day) for b in result.bars] == [("A", 1), ("B", 3)]
    assert [(r.line, r.row, r.symbol, r.reason) for r in result.rejected] == [
        (2, 1, "B", "non-numeric price"),
        (3, 2, None, "unparsable date"),
        (4, 3, "A", "adj_close must be > 0"),
    ]


def test_a_rejection_cites_the_line_an_editor_shows() -> None:
    data = b"date,symbol,close\n2024-01-02,A,10\n2024-01-03,A,ten\n"
    (rejected,) = im.read_bars(data).rejected
    assert (rejected.line, rejected.row, rejected.value) == (3, 2, "ten")


# Blank lines, a quoted newline, a malformed line and CRLF endings: the line is where the
# record starts in the file, whatever Arrow's row count says.
AWKWARD = (
    b"symbol,date,close,note\r\n"  # 1
    b"A,2024-01-02,10,plain\r\n"  # 2
    b"\r\n"  # 3: blank
    b'A,2024-01-03,11,"two\r\nlines"\r\n'  # 4-5: one record
    b"A,2024-01-04,x,bad price\r\n"  # 6
    b"A,2024-01-05\r\n"  # 7: too few fields
    b"\r\n"  # 8: blank
    b'A,2024-01-08,-1,"a ""quoted"" note"\r\n'  # 9
)


@pytest.mark.parametrize("batch_size", [1, 50_000])
def test_lines_count_blank_lines_and_quoted_newlines(batch_size: int, tmp_path: Path) -> None:
    rejected = [r for b in im.iter_batches(AWKWARD, batch_size=batch_size) for r in b.rejected]
    assert sorted((r.line, r.reason) for r in rejected) == [
        (6, "non-numeric price"),
        (7, "expected 4 fields, got 2"),
        (9, "adj_close must be > 0"),
    ]
    # The same from gzip bytes and from a gzip file on disk.
    path = tmp_path / "awkward.csv.gz"
    path.write_bytes(gzip.compress(AWKWARD))
    lines = [r.line for r in im.read_bars(AWKWARD).rejected]
    assert [r.line for r in im.read_bars(gzip.compress(AWKWARD)).rejected] == lines
    assert [r.line for r in im.read_bars(path).rejected] == lines


def test_parquet_rejections_have_rows_not_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"date": ["2024-01-02", "2024-01-03"], "X": ["1", "y"]}), path)
    (rejected,) = im.read_bars(path).rejected
    assert (rejected.line, rejected.row) == (None, 2)


# ---------------------------------------------------------------------------
# Column names
# ---------------------------------------------------------------------------

ACCEPTED = "accepted: date, open, high, low, close, adj_close, volume, symbol (aliases: "


@pytest.mark.parametrize(
    ("header", "wrong", "meant"),
    [
        ("symbol,date,close,Adj Closing", "Adj Closing", "adj_close"),  # ignored before
        ("Tickr,Date,Close", "Tickr", "symbol"),  # was "no symbol column"
    ],
)
def test_a_misspelt_column_names_the_accepted_ones(header: str, wrong: str, meant: str) -> None:
    data = f"{header}\nA,2024-01-02,1,1\n".encode()
    with pytest.raises(im.ImportFormatError) as err:
        im.read_bars(data)
    message = str(err.value)
    assert f"unknown column {wrong!r}: did you mean {meant}?" in message
    assert ACCEPTED in message and "ticker = symbol" in message


def test_unrelated_extra_columns_are_ignored() -> None:
    data = b"Date,Open,High,Low,Close,Volume,Dividends,Stock Splits\n2024-01-02,1,2,1,2,5,0,0\n"
    (bar,) = im.read_bars(data, symbol="X").bars
    assert (bar.close, bar.adj_close, bar.volume) == (Decimal(2), Decimal(2), 5)


def test_an_ohlcv_file_with_a_misspelt_close_is_not_read_as_wide() -> None:
    data = b"Date,Open,High,Low,Closing,Volume\n2024-01-02,1,2,1,2,5\n"
    with pytest.raises(im.ImportFormatError) as err:
        im.read_bars(data)  # was: a wide file of the symbols Open, High, Low, Closing, Volume
    message = str(err.value)
    assert "needs a close or adj_close column" in message
    assert "'Closing' is no accepted name; the closest is close" in message
    assert "--layout wide" in message and ACCEPTED in message
    assert im.read_bars(data, layout="wide").layout == "wide"  # when it is meant


def test_missing_columns_list_the_accepted_names() -> None:
    with pytest.raises(im.ImportFormatError) as err:
        im.read_bars(b"Dt,Close\n2024-01-02,1\n")
    assert "'Dt' is no accepted name; the closest is date" in str(err.value)
    assert "accepted: date (aliases: datetime, timestamp = date;" in str(err.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"when,A\n2020-01-01,1\n", "no date column"),
        (b"Date,A,A\n2020-01-01,1,2\n", "duplicate column"),
        (b"symbol,date,volume\nX,2020-01-01,5\n", "close or adj_close"),
    ],
)
def test_structural_problems_raise(data: bytes, message: str) -> None:
    layout: im.Layout = "long" if b"symbol" in data else "auto"
    with pytest.raises(im.ImportFormatError, match=message):
        im.read_bars(data, layout=layout)


def test_symbol_argument_conflicts_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(im.ImportFormatError, match="symbol column"):
        im.read_bars(LONG, symbol="X")
    with pytest.raises(im.ImportFormatError, match="only value column"):
        im.read_bars(SAMPLE / "sp500_dataset.csv.gz", symbol="X")
    with pytest.raises(im.ImportFormatError, match="no such file"):
        im.read_bars(tmp_path / "missing.csv")


def test_parse_date_formats() -> None:
    assert im.parse_date("2020-02-03") == date(2020, 2, 3)
    assert im.parse_date("2020-02-03 00:00:00") == date(2020, 2, 3)
    assert im.parse_date("2/3/2020") == date(2020, 2, 3)
    assert im.parse_date("2020/02/03") == date(2020, 2, 3)
    with pytest.raises(ValueError):
        im.parse_date("03.02.2020")


SLASHED = "date,symbol,close\n01/05/2024,DMY,10\n02/05/2024,DMY,11\n"


def test_day_month_order_is_never_guessed_unless_told() -> None:
    with pytest.raises(im.DayMonthOrderError, match="--date-format mdy") as err:
        im.read_bars(SLASHED.encode(), date_format="iso")
    assert "'01/05/2024'" in str(err.value)
    us = im.read_bars(SLASHED.encode(), date_format="mdy").bars
    eu = im.read_bars(SLASHED.encode(), date_format="dmy").bars
    assert [b.date for b in us] == [date(2024, 1, 5), date(2024, 2, 5)]
    assert [b.date for b in eu] == [date(2024, 5, 1), date(2024, 5, 2)]
    iso = b"date,symbol,close\n2024-05-01,ISO,10\n2024/05/02,ISO,11\n"
    assert [b.date for b in im.read_bars(iso, date_format="iso").bars] == [
        date(2024, 5, 1),
        date(2024, 5, 2),
    ]


@pytest.mark.parametrize("name", ["prices.xlsx", "prices.xls", "prices.json", "prices.zip"])
def test_unsupported_files_say_so(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 not a price file")
    with pytest.raises(im.ImportFormatError, match="unsupported format"):
        im.read_bars(path)
    # A spreadsheet renamed .csv is still recognised by its ZIP bytes.
    renamed = tmp_path / "renamed.csv"
    renamed.write_bytes(b"PK\x03\x04 not a price file")
    with pytest.raises(im.ImportFormatError, match="a spreadsheet"):
        im.read_bars(renamed)
