"""Daily bars in columnar form, and the row rules every ingested bar must pass.

Pure domain code (numpy only): the servicer turns protobuf batches into
:class:`SeriesInput` values, :func:`validate_stream` checks every row with whole-array
operations and returns the valid rows as one :class:`BarColumns` plus a
:class:`Rejection` per invalid row; storage writes the columns.

Prices are int64 *micro-units* (1e-6 of the quote currency), the exact representation of
the DECIMAL(18,6) columns they are stored in; no float ever touches a price here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Final

import numpy as np
import numpy.typing as npt

MICROS: Final = 1_000_000
PRICE_SCALE: Final = 6
# DECIMAL(18,6): at most 18 digits in total.
MAX_PRICE_MICROS: Final = 10**18 - 1
SYMBOL_RE: Final = re.compile(r"^[A-Za-z0-9^][A-Za-z0-9.\-^=_]{0,31}$")
SYMBOL_RULE: Final = "1-32 characters: a letter, digit or ^, then letters, digits or .-^=_"

IntArray = npt.NDArray[np.int64]
DayArray = npt.NDArray[np.datetime64]


def valid_symbol(symbol: str) -> bool:
    return bool(SYMBOL_RE.fullmatch(symbol))


@dataclass(frozen=True, slots=True)
class BarColumns:
    """Bars as parallel arrays (one entry per bar)."""

    symbols: npt.NDArray[np.object_]  # str per row
    days: DayArray  # datetime64[D]
    open: IntArray  # micro-units
    high: IntArray
    low: IntArray
    close: IntArray
    adj_close: IntArray
    volume: IntArray

    def __len__(self) -> int:
        return int(self.days.shape[0])

    @staticmethod
    def empty() -> BarColumns:
        z = np.zeros(0, dtype=np.int64)
        return BarColumns(
            np.zeros(0, dtype=object), np.zeros(0, dtype="datetime64[D]"), z, z, z, z, z, z
        )

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> BarColumns:
        return BarColumns(
            self.symbols[index],
            self.days[index],
            self.open[index],
            self.high[index],
            self.low[index],
            self.close[index],
            self.adj_close[index],
            self.volume[index],
        )

    @staticmethod
    def concat(parts: Sequence[BarColumns]) -> BarColumns:
        if not parts:
            return BarColumns.empty()
        if len(parts) == 1:
            return parts[0]
        return BarColumns(
            np.concatenate([p.symbols for p in parts]),
            np.concatenate([p.days for p in parts]),
            np.concatenate([p.open for p in parts]),
            np.concatenate([p.high for p in parts]),
            np.concatenate([p.low for p in parts]),
            np.concatenate([p.close for p in parts]),
            np.concatenate([p.adj_close for p in parts]),
            np.concatenate([p.volume for p in parts]),
        )


@dataclass(frozen=True, slots=True)
class SeriesInput:
    """One symbol's rows as received (dates still as year/month/day numbers)."""

    message_index: int
    series_index: int
    symbol: str
    years: IntArray
    months: IntArray
    days: IntArray
    open: IntArray
    high: IntArray
    low: IntArray
    close: IntArray
    adj_close: IntArray
    volume: IntArray


@dataclass(frozen=True, slots=True)
class Rejection:
    """An invalid row (row_index -1: the whole series) and the reason."""

    message_index: int
    series_index: int
    row_index: int
    symbol: str
    day: date | None
    reason: str


@dataclass(frozen=True, slots=True)
class ValidatedStream:
    bars: BarColumns
    rejections: list[Rejection]
    received: int
    # Exact copies of a row sent in the same stream: one kept, the others dropped here.
    duplicates_collapsed: int = 0


def dates_from_parts(
    years: IntArray, months: IntArray, days: IntArray
) -> tuple[DayArray, npt.NDArray[np.bool_]]:
    """datetime64[D] per row and a mask of rows that are real calendar dates (year 1-9999)."""
    ok = (
        (years >= 1) & (years <= 9999) & (months >= 1) & (months <= 12) & (days >= 1) & (days <= 31)
    )
    y = np.where(ok, years, 1970) - 1970
    m = np.where(ok, months, 1) - 1
    d = np.where(ok, days, 1) - 1
    month_start = y.astype("datetime64[Y]").astype("datetime64[M]") + m.astype("timedelta64[M]")
    out = month_start.astype("datetime64[D]") + d.astype("timedelta64[D]")
    # 31 February rolls into March: a real date stays in its month.
    ok &= out.astype("datetime64[M]") == month_start
    return out, ok


def _series_checks(s: SeriesInput) -> str | None:
    if not valid_symbol(s.symbol):
        return f"invalid symbol {s.symbol[:40]!r}: {SYMBOL_RULE}"
    n = s.years.shape[0]
    arrays = (s.months, s.days, s.open, s.high, s.low, s.close, s.adj_close, s.volume)
    if any(a.shape[0] != n for a in arrays):
        return "arrays of different lengths (every column needs one value per date)"
    return None


# Row rules in reporting order: the first failing rule is the reason given.
def _row_reasons(
    s: SeriesInput, ok_date: npt.NDArray[np.bool_]
) -> list[tuple[npt.NDArray[np.bool_], str]]:
    prices = (s.open, s.high, s.low, s.close, s.adj_close)
    return [
        (~ok_date, "invalid date (need a full calendar date, year 1-9999)"),
        (np.logical_or.reduce([p <= 0 for p in prices]), "prices must be > 0"),
        (
            np.logical_or.reduce([p > MAX_PRICE_MICROS for p in prices]),
            "price too large for DECIMAL(18,6)",
        ),
        (s.low > s.high, "low > high"),
        ((s.open < s.low) | (s.open > s.high), "open outside [low, high]"),
        ((s.close < s.low) | (s.close > s.high), "close outside [low, high]"),
        (s.volume < 0, "volume must be >= 0"),
    ]


def validate_stream(series: Sequence[SeriesInput]) -> ValidatedStream:
    """Apply the row rules; valid rows are returned in stream order.

    A (symbol, date) key that occurs more than once in the stream rejects every
    occurrence: which copy is right cannot be known, and guessing would silently
    store one of two conflicting prices.
    """
    parts: list[BarColumns] = []
    origins: list[tuple[SeriesInput, npt.NDArray[np.intp]]] = []
    rejections: list[Rejection] = []
    received = 0
    for s in series:
        received += int(s.years.shape[0])
        problem = _series_checks(s)
        if problem is not None:
            rejections.append(
                Rejection(s.message_index, s.series_index, -1, s.symbol[:64], None, problem)
            )
            continue
        day_values, ok_date = dates_from_parts(s.years, s.months, s.days)
        bad = np.zeros(s.years.shape[0], dtype=bool)
        for mask, reason in _row_reasons(s, ok_date):
            new = mask & ~bad
            for row in np.flatnonzero(new).tolist():
                day = day_values[row].item() if ok_date[row] else None
                rejections.append(
                    Rejection(s.message_index, s.series_index, row, s.symbol, day, reason)
                )
            bad |= mask
        keep = np.flatnonzero(~bad)
        parts.append(
            BarColumns(
                np.full(keep.shape[0], s.symbol, dtype=object),
                day_values[keep],
                s.open[keep],
                s.high[keep],
                s.low[keep],
                s.close[keep],
                s.adj_close[keep],
                s.volume[keep],
            )
        )
        origins.append((s, keep))
    bars = BarColumns.concat(parts)
    bars, duplicates, collapsed = _drop_duplicate_keys(bars, origins)
    rejections.extend(duplicates)
    rejections.sort(key=lambda r: (r.message_index, r.series_index, r.row_index))
    return ValidatedStream(bars, rejections, received, collapsed)


def _drop_duplicate_keys(
    bars: BarColumns, origins: list[tuple[SeriesInput, npt.NDArray[np.intp]]]
) -> tuple[BarColumns, list[Rejection], int]:
    """Rows sharing a (symbol, date): identical copies collapse to the first (counted);
    copies that differ are all rejected, each naming where the others are."""
    if len(bars) < 2:
        return bars, [], 0
    _, symbol_codes = np.unique(bars.symbols.astype(str), return_inverse=True)
    keys = symbol_codes.astype(np.int64) * 4_000_000 + bars.days.astype(np.int64)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    dup = counts[inverse] > 1
    if not dup.any():
        return bars, [], 0
    where = _positions(origins)  # (message, series, row) of each kept row
    values = np.column_stack(
        [bars.open, bars.high, bars.low, bars.close, bars.adj_close, bars.volume]
    )
    drop = np.zeros(len(bars), dtype=bool)
    out: list[Rejection] = []
    collapsed = 0
    groups: dict[int, list[int]] = {}
    for i in np.flatnonzero(dup).tolist():
        groups.setdefault(int(inverse[i]), []).append(i)
    for members in groups.values():
        first = values[members[0]]
        if all(np.array_equal(values[i], first) for i in members[1:]):
            drop[members[1:]] = True
            collapsed += len(members) - 1
            continue
        drop[members] = True
        for i in members:
            others = "; ".join(_where(where[j]) for j in members if j != i)
            message, series, row = where[i]
            out.append(
                Rejection(
                    message,
                    series,
                    row,
                    str(bars.symbols[i]),
                    bars.days[i].item(),
                    f"conflicting duplicate (symbol, date): the copies differ (also at {others}); "
                    "every copy rejected",
                )
            )
    return bars.take(~drop), out, collapsed


def _positions(
    origins: list[tuple[SeriesInput, npt.NDArray[np.intp]]],
) -> list[tuple[int, int, int]]:
    return [
        (s.message_index, s.series_index, int(row)) for s, keep in origins for row in keep.tolist()
    ]


def _where(position: tuple[int, int, int]) -> str:
    message, series, row = position
    return f"message {message} series {series} row {row}"


def micros_to_decimal(value: int) -> Decimal:
    return Decimal(value).scaleb(-PRICE_SCALE)
