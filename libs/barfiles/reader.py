"""Parse price files into :class:`Bar` records (pure parsing, no gRPC, no database).

The one reader of CSV / Parquet bar files: `finsight ingest` and
``python -m services.analytics.importer_cli`` (through :mod:`libs.barfiles.ingest`) and
the analytics service's sample loader all parse with it.  Messages name the command
line's options (``--symbol``, ``--date-format``); the Python keyword of each option is
its flag's name (``symbol=``, ``date_format=``).

Sources and formats
-------------------
``source`` is a path (``str`` / ``os.PathLike``), the file's bytes, or a binary
file object (read fully into memory).  CSV is read with ``pyarrow.csv``'s
streaming reader, every column as text; gzip is detected from a ``.gz``
suffix or the gzip magic bytes.  Parquet (``.parquet`` / ``.pq`` suffix or
``PAR1`` magic) is read batch-wise with ``pyarrow.parquet`` and every column
is cast to text by Arrow (floats become their shortest round-trip decimal
text, e.g. ``0.264``; Arrow decimals stay exact; date/timestamp columns
become ISO text).  ``file_format`` can force ``"csv"`` or ``"parquet"``.

Layouts (``layout="auto"`` detects, or force ``"long"`` / ``"wide"``)
-------------------------------------------------------------------
* **long**: one row per symbol and date with columns symbol, date, open, high,
  low, close, adj_close, volume.  Headers are matched case-insensitively,
  ignoring spaces, ``_``, ``-`` and ``.`` (``Adj Close``, ``adj_close``,
  ``AdjClose`` and ``Adjusted Close`` are all adj_close; ``ticker`` is an
  alias of symbol; see :data:`ACCEPTED_COLUMNS` and ``_ALIASES``).  A file
  without a symbol column is a single-symbol OHLCV file (e.g.
  ``Date,Open,High,Low,Close,Adj Close,Volume``); its symbol must be given
  with ``--symbol`` (``symbol="^GSPC"``).  Missing columns are derived:
  adj_close <- close (and close <- adj_close), open/high/low <- close,
  volume <- 0.  At least one of close / adj_close is required.  Other columns
  are ignored (``Dividends``, ``Stock Splits``), except one whose name is a
  near miss of an accepted name the file lacks (``Adj Closing``, ``Tickr``):
  the fallback would silently store other numbers, so that is an
  :class:`ImportFormatError` naming the closest accepted name and listing
  them all.
* **wide**: a date column plus one column per symbol holding the adjusted
  close; each non-empty cell becomes a bar with open = high = low = close =
  adj_close = the value and volume 0.  An empty cell means "no price that
  day" and is skipped silently.  With a single value column ``--symbol``
  renames it.
* auto: a symbol column means long; otherwise a close or adj_close column
  means single-symbol long; so do two or more of open / high / low / volume
  (an OHLCV file whose close column is misspelt gets the column message, not
  a wide import of symbols "Open", "High", ...; a wide file of such tickers
  needs ``--layout wide``); otherwise wide.

Values
------
Prices are ``decimal.Decimal`` built from the file's text (``Decimal("0.264")``
stays exactly that; no float round trip).  Accepted number grammar, after
trimming whitespace: ``[+-]digits[.digits][(e|E)[+-]digits]`` (thousands
separators, underscores, ``inf`` and ``nan`` are rejected).  Dates may be ISO
``YYYY-MM-DD`` (anything after the 10th character, e.g. a time, is ignored),
``YYYY/MM/DD`` or US ``M/D/YYYY``.  Volume is an integer (``"1200.0"`` is
accepted, ``"12.5"`` is not); an empty volume is 0.  Headers must be unique;
blank headers (a trailing comma) are ignored in wide files.

Order: long files yield bars in file order.  Wide files yield, per batch of
rows, the bars of the first symbol column (dates ascending), then the next
column, and so on.

Rejected rows
-------------
Row-level problems never raise: the row (for wide files: the cell) is left
out and reported as a :class:`RejectedRow` in the ``rejected`` list of the
batch that would have contained it, with the reason.  Reasons: ``missing
date``, ``unparsable date``, ``missing price``, ``non-numeric price``,
``non-finite price``, ``adj_close must be > 0``, ``negative open|high|low|
close``, ``non-numeric volume``, ``volume is not an integer``, ``negative
volume``, ``empty symbol``, and (CSV) ``expected N fields, got M`` for a line
with the wrong number of fields.  ``RejectedRow.line`` (CSV) is the line an
editor shows the row on: 1-based, the header is line 1, blank lines count,
and a record with a quoted newline is at the line where it starts.  It is
found by reading the file once more with the stdlib ``csv`` module, lazily and
only as far as the last rejection (a clean file is read once).
``RejectedRow.row`` is the 1-based position of the row among the file's
well-formed data rows (for Parquet, which has no lines, the row number); it is
``None`` for malformed lines, whose raw text is in ``value``.  Structural
problems (unreadable file, no date column, duplicate headers, single-symbol
file without ``--symbol``, a misspelt column) raise :class:`ImportFormatError`;
messages about columns list the accepted names.  Duplicate (symbol, date) rows
are passed through; de-duplication belongs to the service.

Speed
-----
Each record batch is screened with Arrow compute kernels (regexes over whole
columns); clean rows are then built with ``map(Decimal, ...)`` and
``map(Bar, ...)``, and only the rows the screen flags go through the strict
per-row parser that finds the reason.  The floor is one ``Decimal(str)`` per
price and one ``Bar`` per row (about 2.5 us per 5-price row in CPython 3.11);
a 45 MB long CSV of 831,300 rows imports in about 3.5 s on one core of the
development machine.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import gzip
import io
import math
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal, InvalidOperation
from itertools import repeat
from pathlib import Path
from typing import IO, BinaryIO, Final, Literal, TypeVar, get_args

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

from libs.barfiles.options import DATE_FORMATS, DateFormat, Layout

FileFormat = Literal["auto", "csv", "parquet"]
# Formats people try that are not CSV or Parquet (spreadsheets, archives, JSON, ...).
_UNSUPPORTED_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers", ".json", ".jsonl",
                         ".zip", ".feather", ".arrow", ".pdf", ".txt.zip")  # fmt: skip
_ZIP_MAGIC = b"PK\x03\x04"
Source = str | os.PathLike[str] | bytes | BinaryIO

DEFAULT_BATCH_SIZE: Final = 50_000
_CSV_BLOCK_SIZE: Final = 4 << 20
_GZIP_MAGIC: Final = b"\x1f\x8b"
_PARQUET_MAGIC: Final = b"PAR1"
_MISSING_TEXT: Final = frozenset({"", "na", "n/a", "nan", "null", "none", "-"})
_MISSING_SET: Final = pa.array(sorted(_MISSING_TEXT))
_PRICE_FIELDS: Final = ("open", "high", "low", "close", "adj_close")
# The accepted number grammar (after trimming): optional '+', plain decimal
# digits with an optional fraction and exponent.  Applied both by Arrow (RE2)
# and by Python's re, so the fast and the strict path agree.
_NUMBER_PATTERN: Final = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_SIGNED_NUMBER_RE: Final = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_NONZERO_MANTISSA: Final = r"^[^eE]*[1-9]"
# At most 18 digits so the Arrow cast to int64 cannot overflow.
_VOLUME_PATTERN: Final = r"^[0-9]{1,18}$"
_T = TypeVar("_T")

# The fields a long file's columns map to, in the order messages list them.
ACCEPTED_COLUMNS: Final = ("date", "open", "high", "low", "close", "adj_close", "volume", "symbol")
# How close (difflib ratio of normalised names) an unknown column must be to an accepted
# name to be "did you mean" in a message, and to refuse a long file that lacks that field.
_SUGGEST_CUTOFF: Final = 0.6
_NEAR_MISS_CUTOFF: Final = 0.75
# Fields that, two or more of them and no close, make an auto-detected file long.
_OHLV: Final = frozenset({"open", "high", "low", "volume"})
# Normalised header -> canonical field name.
_ALIASES: Final[dict[str, str]] = {
    "symbol": "symbol",
    "ticker": "symbol",
    "date": "date",
    "datetime": "date",
    "timestamp": "date",
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "adjclose": "adj_close",
    "adjustedclose": "adj_close",
    "volume": "volume",
    "vol": "volume",
}


class ImportFormatError(ValueError):
    """The file cannot be interpreted as a whole (not a row-level problem)."""


@dataclass(slots=True)
class Bar:
    """One daily bar; prices exact as written in the file.

    Not frozen on purpose: a frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` per field and made construction ~8x slower, which
    dominated the import of large files.  Treat instances as read-only.
    """

    symbol: str
    date: date
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    adj_close: Decimal
    volume: int


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row (or wide-format cell) left out of the import, and why."""

    row: int | None  # 1-based among well-formed data rows; None for malformed lines
    reason: str
    symbol: str | None = None
    column: str | None = None  # header of the offending column, as in the file
    value: str | None = None  # offending text (the whole line for malformed lines)
    line: int | None = None  # CSV: the line an editor shows it on (header = line 1)


@dataclass(frozen=True, slots=True)
class ImportBatch:
    layout: Literal["long", "wide"]
    bars: tuple[Bar, ...]
    rejected: tuple[RejectedRow, ...]


@dataclass(frozen=True, slots=True)
class ImportResult:
    layout: Literal["long", "wide"]
    bars: list[Bar] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PriceMatrix:
    """Adjusted closes pivoted for the metric engine: (dates, symbols), NaN = missing."""

    symbols: tuple[str, ...]
    dates: npt.NDArray[np.datetime64]
    adj_close: npt.NDArray[np.float64]


class _RowError(Exception):
    """Internal: a value of a row is invalid; carries the rejection details."""

    def __init__(self, reason: str, column: str | None, value: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.column = column
        self.value = value


# ---------------------------------------------------------------------------
# Value parsing
# ---------------------------------------------------------------------------


def normalise_header(name: str) -> str:
    """Lower-case a header and drop BOM, spaces, ``_``, ``-`` and ``.``."""
    return re.sub(r"[\s_\-.\ufeff]", "", name.lower())


def _is_missing(text: str | None) -> bool:
    return text is None or text.strip().lower() in _MISSING_TEXT


class DayMonthOrderError(ImportFormatError):
    """A date like 01/05/2024 in a file read without a day/month order: refused, not
    guessed (is it 5 January or 1 May?)."""


def parse_date(text: str, date_format: DateFormat = "mdy") -> date:
    """ISO ``YYYY-MM-DD[...]`` or ``YYYY/MM/DD`` always; ``M/D/YYYY`` with "mdy",
    ``D/M/YYYY`` with "dmy"; with "iso" such a date is a DayMonthOrderError. ValueError for
    text that is no date."""
    s = text.strip()
    if "/" in s:
        parts = s.split(" ", 1)[0].split("/")
        if len(parts) != 3:
            raise ValueError(f"bad date {text!r}")
        a, b, c = (int(x) for x in parts)
        if len(parts[0]) == 4:
            return date(a, b, c)
        if date_format == "iso":
            raise DayMonthOrderError(
                f"dates like {s!r} put the day and the month in an order the file does not "
                "say: give --date-format mdy (month/day/year, US) or dmy (day/month/year)"
            )
        return date(c, a, b) if date_format == "mdy" else date(c, b, a)
    return date.fromisoformat(s[:10])


class _DateCache:
    """Dates repeat once per symbol in long files; parse each distinct text once."""

    def __init__(self, date_format: DateFormat = "mdy") -> None:
        self.seen: dict[str, date] = {}
        self.date_format = date_format

    def try_parse(self, text: str | None) -> bool:
        """Parse and remember; False when the text is not a date."""
        if text is None or text in self.seen:
            return text is not None
        try:
            self.seen[text] = parse_date(text, self.date_format)
        except DayMonthOrderError:
            raise  # the whole file is ambiguous, not this row
        except ValueError:
            return False
        return True

    def parsed(self, text: str) -> date:
        """A text already accepted by try_parse."""
        return self.seen[text]

    def __call__(self, text: str | None, column: str) -> date:
        if _is_missing(text):
            raise _RowError("missing date", column, text)
        if not self.try_parse(text):
            raise _RowError("unparsable date", column, text)
        assert text is not None
        return self.seen[text]


def parse_price(text: str | None, column: str) -> Decimal:
    """Exact Decimal from text; missing, non-numeric or non-finite is a _RowError.

    The grammar is ``[+-]digits[.digits][e[+-]digits]`` after trimming
    whitespace; thousands separators, underscores, ``inf`` and ``nan`` are
    rejected.  Sign checks are left to the caller.
    """
    if _is_missing(text):
        raise _RowError("missing price", column, text)
    assert text is not None
    stripped = text.strip()
    if _SIGNED_NUMBER_RE.match(stripped) is None:
        reason = "non-numeric price"
        with contextlib.suppress(InvalidOperation):
            if not Decimal(stripped).is_finite():
                reason = "non-finite price"
        raise _RowError(reason, column, text)
    return Decimal(stripped)


def parse_volume(text: str | None, column: str) -> int:
    if _is_missing(text):
        return 0
    assert text is not None
    s = text.strip()
    try:
        volume = int(s)
    except ValueError:
        try:
            exact = Decimal(s)
        except InvalidOperation as exc:
            raise _RowError("non-numeric volume", column, text) from exc
        if not exact.is_finite() or exact != exact.to_integral_value():
            raise _RowError("volume is not an integer", column, text) from None
        volume = int(exact)
    if volume < 0:
        raise _RowError("negative volume", column, text)
    return volume


def _check_prices(
    o: Decimal, hi: Decimal, lo: Decimal, c: Decimal, adj: Decimal, headers: dict[str, str]
) -> None:
    if adj <= 0:
        raise _RowError("adj_close must be > 0", headers["adj_close"], str(adj))
    for name, value in (("open", o), ("high", hi), ("low", lo), ("close", c)):
        if value < 0:
            raise _RowError(f"negative {name}", headers[name], str(value))


# ---------------------------------------------------------------------------
# Reading the file into Arrow batches of text columns
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Malformed:
    """Malformed CSV lines reported by pyarrow, drained into the next batch."""

    rows: list[RejectedRow] = field(default_factory=list)

    def __call__(self, row: pa_csv.InvalidRow) -> str:
        self.rows.append(
            RejectedRow(
                row=None,
                reason=f"expected {row.expected_columns} fields, got {row.actual_columns}",
                value=row.text,
            )
        )
        return "skip"

    def drain(self) -> list[RejectedRow]:
        out, self.rows = self.rows, []
        return out


class _CsvLines:
    """The editor line of each CSV record, for rejections: the file read once more with the
    stdlib csv module (which, like Arrow, skips blank lines and keeps a quoted newline in
    its field), lazily and only as far as the rows asked about.

    Records with the header's number of fields are the well-formed data rows (Arrow's
    batches), the others the malformed lines (its invalid-row handler), each in file order.
    A file the csv module cannot read to the row asked about gives None.
    """

    def __init__(self, path: str | None, data: bytes | None) -> None:
        self._path, self._data = path, data
        self._records: Iterator[tuple[int, int]] | None = None
        self._fields: int | None = None
        self._good = array("q")  # start line of the k-th well-formed data row
        self._bad = array("q")  # start line of the j-th malformed line
        self._done = False

    def _text(self) -> IO[str]:
        raw: IO[bytes]
        if self._data is None:
            assert self._path is not None
            raw = open(self._path, "rb")  # noqa: SIM115 - closed with the text wrapper
        else:
            raw = io.BytesIO(self._data)
        name = (self._path or "").lower()
        if name.endswith(".gz") or _head(self._path, self._data)[:2] == _GZIP_MAGIC:
            raw = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")

    def _scan(self) -> Iterator[tuple[int, int]]:
        """(first line, number of fields) of every non-blank record."""
        with self._text() as handle:
            reader = csv.reader(handle)
            consumed = 0
            for record in reader:
                first, consumed = consumed + 1, reader.line_num
                if record:
                    yield first, len(record)

    def _advance(self, good: int, bad: int) -> None:
        """Read on until the good-th well-formed and the bad-th malformed line are known."""
        if self._records is None:
            self._records = self._scan()
        try:
            while not self._done and (len(self._good) <= good or len(self._bad) <= bad):
                item = next(self._records, None)
                if item is None:
                    self._done = True
                    break
                first, fields = item
                if self._fields is None:
                    self._fields = fields  # the header
                elif fields == self._fields:
                    self._good.append(first)
                else:
                    self._bad.append(first)
        except (csv.Error, OSError, EOFError):
            self._done = True  # the reader's own error (if any) is Arrow's to report

    def good(self, index: int) -> int | None:
        """Line of the index-th (0-based) well-formed data row."""
        self._advance(index, -1)
        return self._good[index] if index < len(self._good) else None

    def bad(self, index: int) -> int | None:
        """Line of the index-th (0-based) malformed line."""
        self._advance(-1, index)
        return self._bad[index] if index < len(self._bad) else None


def _load_source(source: Source) -> tuple[str | None, bytes | None]:
    """(path, None) for paths; (None, data) for bytes and file objects."""
    if isinstance(source, bytes | bytearray | memoryview):
        return None, bytes(source)
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not Path(path).is_file():
            raise ImportFormatError(f"no such file: {path}")
        return path, None
    if hasattr(source, "read"):
        return None, source.read()
    raise ImportFormatError(f"unsupported source type {type(source).__name__}")


def _head(path: str | None, data: bytes | None) -> bytes:
    if data is not None:
        return data[:4]
    assert path is not None
    with open(path, "rb") as handle:
        return handle.read(4)


def _detect_format(path: str | None, data: bytes | None, forced: FileFormat) -> str:
    if forced != "auto":
        return forced
    name = (path or "").lower()
    if name.endswith(_UNSUPPORTED_SUFFIXES) or _head(path, data) == _ZIP_MAGIC:
        kind = Path(name).suffix or "a ZIP archive (a spreadsheet?)"
        raise ImportFormatError(
            f"unsupported format {kind}: give a CSV (optionally .gz) or a Parquet file "
            "(a spreadsheet: save it as CSV)"
        )
    if path is not None and path.lower().endswith((".parquet", ".pq")):
        return "parquet"
    return "parquet" if _head(path, data) == _PARQUET_MAGIC else "csv"


def _csv_stream(path: str | None, data: bytes | None) -> pa.NativeFile:
    if data is None:
        assert path is not None
        compressed = path.lower().endswith(".gz") or _head(path, None)[:2] == _GZIP_MAGIC
        return pa.input_stream(path, compression="gzip" if compressed else None)
    raw = pa.BufferReader(data)
    return pa.CompressedInputStream(raw, "gzip") if data[:2] == _GZIP_MAGIC else raw


def _csv_batches(
    path: str | None, data: bytes | None, malformed: _Malformed
) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    try:
        reader = pa_csv.open_csv(
            _csv_stream(path, data),
            read_options=pa_csv.ReadOptions(block_size=_CSV_BLOCK_SIZE),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=malformed),
            # Everything as text: prices must reach Decimal without a float parse.
            convert_options=pa_csv.ConvertOptions(
                default_column_type=pa.string(), strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise ImportFormatError(f"cannot read CSV: {exc}") from exc

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        except (pa.ArrowInvalid, OSError) as exc:
            raise ImportFormatError(f"cannot read CSV: {exc}") from exc

    return list(reader.schema.names), batches()


def _parquet_batches(
    path: str | None, data: bytes | None, batch_size: int
) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    try:
        handle = pa_parquet.ParquetFile(path if data is None else io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ImportFormatError(f"cannot read Parquet: {exc}") from exc

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in handle.iter_batches(batch_size=batch_size):
            columns = [col.cast(pa.string()) for col in batch.columns]
            yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names)

    return list(handle.schema_arrow.names), batches()


# ---------------------------------------------------------------------------
# Layout detection and row conversion
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to turn a batch's columns into bars."""

    layout: Literal["long", "wide"]
    headers: dict[str, str]  # canonical field -> header in the file (long)
    date_header: str
    value_headers: tuple[str, ...]  # wide: one per symbol
    symbol: str | None  # single-symbol files / renamed wide column


def _canonical_headers(names: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in names:
        canonical = _ALIASES.get(normalise_header(name))
        if canonical is not None and canonical not in found:
            found[canonical] = name
    return found


def accepted_columns(fields: Iterable[str] = ACCEPTED_COLUMNS) -> str:
    """The accepted column names of `fields`, with their aliases, for messages."""
    wanted = tuple(fields)
    aliases = {
        f: [a for a, c in _ALIASES.items() if c == f and a != f.replace("_", "")] for f in wanted
    }
    listed = "; ".join(f"{', '.join(a)} = {f}" for f, a in aliases.items() if a)
    return (
        f"accepted: {', '.join(wanted)} ({f'aliases: {listed}; ' if listed else ''}"
        "case, spaces and _ - . do not matter)"
    )


def closest_column(
    names: Iterable[str], fields: Iterable[str], cutoff: float = _SUGGEST_CUTOFF
) -> tuple[str, str] | None:
    """The first of `names` that is no accepted name but near one of `fields` (or an alias
    of one), and that field; None when none is near enough (difflib ratio >= cutoff)."""
    wanted = set(fields)
    keys = [a for a, c in _ALIASES.items() if c in wanted]
    for name in names:
        norm = normalise_header(name)
        if not norm or norm in _ALIASES:
            continue
        match = difflib.get_close_matches(norm, keys, n=1, cutoff=cutoff)
        if match:
            return name, _ALIASES[match[0]]
    return None


def _suggestion(names: Sequence[str], fields: Iterable[str]) -> str:
    near = closest_column(names, fields)
    if near is None:
        return ""
    return f" ({near[0]!r} is no accepted name; the closest is {near[1]})"


def _plan(names: Sequence[str], layout: Layout, symbol: str | None) -> _Plan:
    if len(set(names)) != len(names):
        raise ImportFormatError(f"duplicate column names in {list(names)}")
    headers = _canonical_headers(names)
    if "date" not in headers:
        raise ImportFormatError(
            f"no date column among {list(names)}{_suggestion(names, ['date'])}; "
            + accepted_columns(["date"])
        )
    has_price = "close" in headers or "adj_close" in headers
    chosen = layout
    if chosen == "auto":
        ohlcv = "symbol" in headers or has_price or len(_OHLV & headers.keys()) >= 2
        chosen = "long" if ohlcv else "wide"
    if chosen == "long":
        return _long_plan(names, headers, has_price, symbol, detected=layout == "auto")
    # Blank headers (e.g. from a trailing comma) are not symbols.
    values = tuple(n for n in names if n != headers["date"] and n.strip())
    if not values:
        raise ImportFormatError("wide file has no value columns")
    if symbol is not None and len(values) != 1:
        raise ImportFormatError(
            f"--symbol renames a wide file's only value column; this file has {len(values)}"
        )
    return _Plan("wide", headers, headers["date"], values, symbol)


def _long_plan(
    names: Sequence[str],
    headers: dict[str, str],
    has_price: bool,
    symbol: str | None,
    detected: bool,
) -> _Plan:
    # A misspelt column would be ignored and its field derived from another column (or the
    # file refused for a reason that hides the typo): refuse it, naming the right name.
    missing = [f for f in ACCEPTED_COLUMNS if f not in headers]
    near = closest_column(names, missing, _NEAR_MISS_CUTOFF)
    if near is not None:
        raise ImportFormatError(
            f"unknown column {near[0]!r}: did you mean {near[1]}? (the file has no {near[1]} "
            f"column; rename the column); {accepted_columns()}"
        )
    if not has_price:
        wide = "; for a wide file (one column per symbol) give --layout wide" if detected else ""
        raise ImportFormatError(
            f"long layout needs a close or adj_close column, none among {list(names)}"
            f"{_suggestion(names, ['close', 'adj_close'])}{wide}; {accepted_columns()}"
        )
    if "symbol" in headers and symbol is not None:
        raise ImportFormatError(
            f"the file has a symbol column ({headers['symbol']!r}); do not give --symbol"
        )
    if "symbol" not in headers and not (symbol and symbol.strip()):
        raise ImportFormatError(
            "the file has no symbol column: give --symbol for a single-symbol file (e.g. "
            f"--symbol ^GSPC){_suggestion(names, ['symbol'])}; {accepted_columns(['symbol'])}"
        )
    return _Plan("long", headers, headers["date"], (), symbol.strip() if symbol else None)


def _effective_headers(headers: dict[str, str]) -> dict[str, str]:
    """Header to read for each price field, applying the documented fallbacks."""
    close = headers.get("close", headers.get("adj_close", "close"))
    return {
        "open": headers.get("open", close),
        "high": headers.get("high", close),
        "low": headers.get("low", close),
        "close": close,
        "adj_close": headers.get("adj_close", close),
    }


# ---------------------------------------------------------------------------
# Vectorised screening (Arrow compute) and bar construction
# ---------------------------------------------------------------------------

BoolMask = npt.NDArray[np.bool_]


def _text(batch: pa.RecordBatch, header: str) -> pa.Array:
    return pc.utf8_trim_whitespace(batch.column(header))


def _mask(values: pa.Array) -> BoolMask:
    """Arrow boolean array -> numpy bool, null counted as False."""
    filled = pc.fill_null(values, False)
    out: BoolMask = filled.to_numpy(zero_copy_only=False)
    return out


def _missing_mask(trimmed: pa.Array) -> BoolMask:
    lowered = pc.utf8_lower(trimmed)
    return _mask(pc.or_kleene(pc.is_null(trimmed), pc.is_in(lowered, _MISSING_SET)))


def _price_ok(trimmed: pa.Array, positive: bool) -> BoolMask:
    ok = _mask(pc.match_substring_regex(trimmed, _NUMBER_PATTERN))
    if positive:
        ok &= _mask(pc.match_substring_regex(trimmed, _NONZERO_MANTISSA))
    return ok


def _decimals(trimmed: pa.Array) -> list[Decimal]:
    return list(map(Decimal, trimmed.to_pylist()))


def _dictionary_values(values: pa.Array, decode: Callable[[str], _T]) -> list[_T]:
    """Decode each distinct text once, then expand (shares objects between rows)."""
    encoded = pc.dictionary_encode(values)
    distinct = [decode(text) for text in encoded.dictionary.to_pylist()]
    return list(map(distinct.__getitem__, encoded.indices.to_pylist()))


def _date_ok(days: pa.Array, dates: _DateCache) -> BoolMask:
    encoded = pc.dictionary_encode(days)
    valid = np.array([dates.try_parse(t) for t in encoded.dictionary.to_pylist()], dtype=bool)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    out: BoolMask = np.where(
        codes >= 0, valid[np.maximum(codes, 0)] if valid.size else False, False
    )
    return out


def _volume_ok(volumes: pa.Array | None) -> BoolMask | None:
    if volumes is None:
        return None
    empty = _mask(pc.or_kleene(pc.is_null(volumes), pc.equal(volumes, "")))
    return empty | _mask(pc.match_substring_regex(volumes, _VOLUME_PATTERN))


def _volume_values(volumes: pa.Array | None, n: int) -> list[int]:
    if volumes is None:
        return [0] * n
    filled = pc.if_else(pc.equal(pc.fill_null(volumes, ""), ""), "0", volumes)
    values: list[int] = pc.cast(filled, pa.int64()).to_pylist()
    return values


@dataclass(frozen=True, slots=True)
class _LongScreen:
    clean: BoolMask
    prices: dict[str, pa.Array]  # trimmed text per distinct header
    days: pa.Array
    symbols: pa.Array | None
    volumes: pa.Array | None


def _screen_long(batch: pa.RecordBatch, plan: _Plan, dates: _DateCache) -> _LongScreen:
    """Rows the fast path can take as they are (everything well-formed)."""
    headers = _effective_headers(plan.headers)
    prices = {h: _text(batch, h) for h in dict.fromkeys(headers.values())}
    clean = np.ones(batch.num_rows, dtype=bool)
    for header, trimmed in prices.items():
        clean &= _price_ok(trimmed, positive=header == headers["adj_close"])
    days = _text(batch, plan.date_header)
    clean &= _date_ok(days, dates)
    symbols = None
    if "symbol" in plan.headers:
        symbols = _text(batch, plan.headers["symbol"])
        clean &= _mask(pc.greater(pc.utf8_length(symbols), 0))
    volumes = _text(batch, plan.headers["volume"]) if "volume" in plan.headers else None
    volume_ok = _volume_ok(volumes)
    if volume_ok is not None:
        clean &= volume_ok
    return _LongScreen(clean, prices, days, symbols, volumes)


def _fast_long_bars(screen: _LongScreen, plan: _Plan, dates: _DateCache) -> list[Bar]:
    keep = pa.array(screen.clean)
    headers = _effective_headers(plan.headers)
    decoded = {h: _decimals(col.filter(keep)) for h, col in screen.prices.items()}
    days = _dictionary_values(screen.days.filter(keep), dates.parsed)
    n = len(days)
    if screen.symbols is None:
        names: Iterable[str] = repeat(plan.symbol or "", n)
    else:
        names = _dictionary_values(screen.symbols.filter(keep), str)
    volumes = _volume_values(None if screen.volumes is None else screen.volumes.filter(keep), n)
    columns = [decoded[headers[f]] for f in _PRICE_FIELDS]
    return list(map(Bar, names, days, *columns, volumes))


def _long_bar_strict(batch: pa.RecordBatch, plan: _Plan, i: int, dates: _DateCache) -> Bar:
    """Build one bar checking every value; raises _RowError with the precise reason."""
    headers = _effective_headers(plan.headers)
    row = {name: batch.column(name)[i].as_py() for name in batch.schema.names}
    symbol_header = plan.headers.get("symbol")
    name = plan.symbol if symbol_header is None else (row[symbol_header] or "").strip()
    if not name:
        raise _RowError("empty symbol", symbol_header, row.get(symbol_header or ""))
    o, hi, lo, c, adj = (parse_price(row[headers[f]], headers[f]) for f in _PRICE_FIELDS)
    _check_prices(o, hi, lo, c, adj, headers)
    day = dates(row[plan.date_header], plan.date_header)
    volume_header = plan.headers.get("volume")
    volume = parse_volume(row[volume_header] if volume_header else None, volume_header or "")
    return Bar(name, day, o, hi, lo, c, adj, volume)


def _merge(
    fast_rows: npt.NDArray[np.intp], fast: list[Bar], slow: list[tuple[int, Bar]]
) -> list[Bar]:
    """Interleave the (rare) strictly-parsed bars back into file order."""
    if not slow:
        return fast
    pairs = list(zip(fast_rows.tolist(), fast, strict=True)) + slow
    pairs.sort(key=lambda pair: pair[0])
    return [bar for _, bar in pairs]


def _long_rows(
    batch: pa.RecordBatch, plan: _Plan, first_row: int, dates: _DateCache
) -> tuple[list[Bar], list[RejectedRow]]:
    screen = _screen_long(batch, plan, dates)
    fast = _fast_long_bars(screen, plan, dates)
    slow: list[tuple[int, Bar]] = []
    rejected: list[RejectedRow] = []
    for i in np.flatnonzero(~screen.clean).tolist():
        try:
            slow.append((i, _long_bar_strict(batch, plan, i, dates)))
        except _RowError as err:
            name = plan.symbol
            if screen.symbols is not None:
                name = screen.symbols[i].as_py() or None
            rejected.append(RejectedRow(first_row + i, err.reason, name, err.column, err.value))
    return _merge(np.flatnonzero(screen.clean), fast, slow), rejected


def _wide_cell(text: str | None, header: str) -> Decimal:
    """Strict parse of one wide cell; raises _RowError with the reason."""
    value = parse_price(text, header)
    if value <= 0:
        raise _RowError("adj_close must be > 0", header, text)
    return value


def _wide_rows(
    batch: pa.RecordBatch, plan: _Plan, first_row: int, dates: _DateCache
) -> tuple[list[Bar], list[RejectedRow]]:
    """Bars grouped by value column (dates ascending within each), then rejections."""
    days_text = _text(batch, plan.date_header)
    day_ok = _date_ok(days_text, dates)
    rejected = [
        RejectedRow(
            first_row + i, "unparsable date" if t else "missing date", None, plan.date_header, t
        )
        for i, t in zip(
            np.flatnonzero(~day_ok).tolist(),
            days_text.filter(pa.array(~day_ok)).to_pylist(),
            strict=True,
        )
    ]
    days = [
        dates.parsed(t) if ok else None
        for t, ok in zip(days_text.to_pylist(), day_ok.tolist(), strict=True)
    ]
    bars: list[Bar] = []
    for header in plan.value_headers:
        name = plan.symbol or header.strip()
        trimmed = _text(batch, header)
        present = day_ok & ~_missing_mask(trimmed)
        ok = present & _price_ok(trimmed, positive=True)
        values = _decimals(trimmed.filter(pa.array(ok)))
        fast_days = [d for d, keep in zip(days, ok.tolist(), strict=True) if keep]
        fast = list(
            map(Bar, repeat(name), fast_days, values, values, values, values, values, repeat(0))
        )
        slow: list[tuple[int, Bar]] = []
        for i in np.flatnonzero(present & ~ok).tolist():
            text = trimmed[i].as_py()
            try:
                value = _wide_cell(text, header)
            except _RowError as err:
                rejected.append(RejectedRow(first_row + i, err.reason, name, header, text))
                continue
            day = days[i]
            assert day is not None
            slow.append((i, Bar(name, day, value, value, value, value, value, 0)))
        bars.extend(_merge(np.flatnonzero(ok), fast, slow))
    rejected.sort(key=lambda rejection: rejection.row or 0)  # stable: column order kept
    return bars, rejected


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_options(layout: str, file_format: str, batch_size: int) -> None:
    if layout not in get_args(Layout):
        raise ImportFormatError(f"layout must be one of {get_args(Layout)}, got {layout!r}")
    if file_format not in get_args(FileFormat):
        raise ImportFormatError(f"file_format must be one of {get_args(FileFormat)}")
    if batch_size < 1:
        raise ImportFormatError("batch_size must be positive")


def detect_layout(column_names: Sequence[str], symbol: str | None = None) -> str:
    """The layout ``layout="auto"`` would choose for these headers."""
    return _plan(column_names, "auto", symbol).layout


def _open(
    source: Source, file_format: FileFormat, batch_size: int, malformed: _Malformed
) -> tuple[list[str], Iterator[pa.RecordBatch], _CsvLines | None]:
    """Column names, a lazy iterator of text-typed record batches, and (CSV) the lines."""
    path, data = _load_source(source)
    if _detect_format(path, data, file_format) == "parquet":
        return (*_parquet_batches(path, data, batch_size), None)
    return (*_csv_batches(path, data, malformed), _CsvLines(path, data))


def iter_batches(
    source: Source,
    *,
    layout: Layout = "auto",
    symbol: str | None = None,
    file_format: FileFormat = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    date_format: DateFormat = "mdy",
) -> Iterator[ImportBatch]:
    """Yield the file's bars (and rejected rows) in batches of at most ``batch_size`` rows.

    Raises :class:`ImportFormatError` (when iteration starts) for structural
    problems; see the module docstring for layouts, leniency and rejections.
    """
    _check_options(layout, file_format, batch_size)
    malformed = _Malformed()
    names, batches, lines = _open(source, file_format, batch_size, malformed)
    plan = _plan(names, layout, symbol)
    yield from _convert(batches, plan, batch_size, malformed, date_format, lines)


def _convert(
    batches: Iterable[pa.RecordBatch],
    plan: _Plan,
    batch_size: int,
    malformed: _Malformed,
    date_format: DateFormat = "mdy",
    lines: _CsvLines | None = None,
) -> Iterator[ImportBatch]:
    if date_format not in DATE_FORMATS:
        raise ImportFormatError(f"date_format must be one of {DATE_FORMATS}")
    dates = _DateCache(date_format)
    convert = _long_rows if plan.layout == "long" else _wide_rows
    next_row = 1
    malformed_seen = 0

    def located(rejected: list[RejectedRow]) -> tuple[RejectedRow, ...]:
        """The rejections with their editor lines (CSV)."""
        nonlocal malformed_seen
        if lines is None:
            return tuple(rejected)
        out = []
        for r in rejected:
            if r.row is None:
                line, malformed_seen = lines.bad(malformed_seen), malformed_seen + 1
            else:
                line = lines.good(r.row - 1)
            out.append(replace(r, line=line))
        return tuple(out)

    for record_batch in batches:
        for start in range(0, record_batch.num_rows, batch_size):
            chunk = record_batch.slice(start, batch_size)
            bars, rejected = convert(chunk, plan, next_row, dates)
            next_row += chunk.num_rows
            yield ImportBatch(plan.layout, tuple(bars), located(malformed.drain() + rejected))
    leftovers = malformed.drain()
    if leftovers:
        yield ImportBatch(plan.layout, (), located(leftovers))


def read_bars(
    source: Source,
    *,
    layout: Layout = "auto",
    symbol: str | None = None,
    file_format: FileFormat = "auto",
    date_format: DateFormat = "mdy",
) -> ImportResult:
    """The whole file at once: all bars, all rejections and the layout used."""
    _check_options(layout, file_format, DEFAULT_BATCH_SIZE)
    malformed = _Malformed()
    names, batches, lines = _open(source, file_format, DEFAULT_BATCH_SIZE, malformed)
    plan = _plan(names, layout, symbol)
    result = ImportResult(plan.layout)
    for batch in _convert(batches, plan, DEFAULT_BATCH_SIZE, malformed, date_format, lines):
        result.bars.extend(batch.bars)
        result.rejected.extend(batch.rejected)
    return result


def to_price_matrix(bars: Iterable[Bar]) -> PriceMatrix:
    """Pivot bars to a (dates, symbols) float64 matrix of adjusted closes.

    Symbols are sorted by name, dates ascending; a later duplicate
    (symbol, date) overwrites an earlier one.  The float conversion happens
    here, at the boundary to the metric engine.
    """
    cells: dict[tuple[str, date], float] = {}
    for bar in bars:
        cells[(bar.symbol, bar.date)] = float(bar.adj_close)
    symbols = tuple(sorted({s for s, _ in cells}))
    days = sorted({d for _, d in cells})
    row_of = {d: i for i, d in enumerate(days)}
    col_of = {s: j for j, s in enumerate(symbols)}
    matrix = np.full((len(days), len(symbols)), math.nan)
    for (name, day), value in cells.items():
        matrix[row_of[day], col_of[name]] = value
    return PriceMatrix(symbols, np.array(days, dtype="datetime64[D]"), matrix)
