"""Drawdown tables and calendar period (monthly / yearly) return tables.

Pure domain code like :mod:`services.analytics.metrics` (numpy and the standard library
only), on the same input: a ``(periods, symbols)`` array of prices or simple returns with
``NaN`` for a missing observation, and one ``datetime64[D]`` date per row. Returns, gaps
and the starting wealth follow metrics.py exactly (the panel is built by the same code),
so the deepest drawdown of a table *is* ``SymbolMetrics.drawdown`` and the compounded
periods multiply up to ``total_return``.

Drawdown table (pyfolio's ``gen_drawdown_table``, made explicit)
----------------------------------------------------------------
* The wealth path ``W_t = prod(1 + r)`` starts at 1.0 on the row of the starting value
  (the first price; for return input the row before the first return), and that start is
  the first peak, as in metrics.py (empyrical's ``max_drawdown`` anchors the series at
  100; pyfolio starts at the first return, so a loss on the first day is no drawdown
  there: the oracle tests give pyfolio the series with a 0 return on the start row).
* The underwater curve ``U_t = (W_t - M_t) / M_t`` with ``M_t = max(1, W_0..W_t)``. A
  drawdown is a maximal run of rows with ``U_t < 0``: its **peak** is the last row before
  the run where wealth was at its running maximum (``U = 0``, a row with a return or the
  start), its **trough** the first row of the run at the run's minimum, its **recovery**
  the first row after the run (the first day back at or above the peak), or none when the
  run lasts to the symbol's last return ("not recovered"). Runs are disjoint, so the
  periods of a table never overlap (pyfolio removes each period's rows before it looks
  for the next deepest; the result is the same).
* **Depth** ``U`` at the trough (a negative fraction, like ``max_drawdown``); pyfolio
  reports ``-100 * depth`` as "Net drawdown in %".
* The table holds the ``n`` deepest drawdowns, deepest first; equal depths keep date
  order (the earlier first, as pyfolio's ``idxmin``). A series that never falls below a
  peak has an empty table (pyfolio returns one row of zero depth for it).
* Lengths count the symbol's own returns and calendar days: ``periods_to_trough`` /
  ``days_to_trough`` from the peak to the trough, ``duration_periods`` /
  ``duration_days`` from the peak to the recovery, or to the last return when not
  recovered (the convention of ``Drawdown.duration_*``). So the recovery day's return is
  counted and the peak's is not: a one-day dip recovered the next day lasts 2 periods.
  pyfolio's "Duration" is the number of business days from peak to recovery *both
  included* (``len(pd.date_range(peak, recovery, freq="B"))``, weekdays whether or not
  the market traded, NaN when not recovered); QuantStats' ``drawdown_details`` runs from
  the first to the last day *below* the peak, ``days = end - start + 1`` calendar days.
  Those are not reported; the tests check each against the dates given here.
* Wealth compounds the returns (as empyrical and pyfolio): a price back *exactly* at an
  earlier high may compound to one rounding step below the peak and then is no recovery.
  ``metrics._underwater`` is used as it is, so the table and ``Drawdown`` always agree.

Period returns (empyrical's ``aggregate_returns``)
--------------------------------------------------
* Calendar months and years of the row dates; a period's return compounds the symbol's
  returns dated in it: ``prod(1 + r) - 1`` (a return spanning a price gap is booked in
  the period of the price that closes the gap, as everywhere). Periods in which the
  symbol has no return are left out.
* A period is **partial** when the returns do not cover all of it: the series starts
  inside it (the starting value is dated in the period itself, e.g. a first price on
  2 January: the move from 31 December is missing), or the series ends inside it (the
  symbol's last period, when its last return falls before the period's last weekday);
  it then covers the series' own start or end date (``SeriesMetrics.start_date`` /
  ``end_date``) instead of the period's.
  The trading calendar is not known, so a period whose last weekday is a holiday and
  whose data end on the trading day before is marked partial too; a return input whose
  first return sits on the first row has no dated starting value and its first period is
  marked partial. empyrical and QuantStats do not mark partial periods (their values are
  the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from services.analytics.metrics import (
    DateArray,
    FloatArray,
    InputKind,
    IntArray,
    MetricsInputError,
    _as_dates,
    _as_matrix,
    _build_panel,
    _check_kind,
    _check_symbols,
    _check_value_domain,
    _Panel,
    _require_min_returns,
    _underwater,
)

MAX_DRAWDOWN_TABLE: Final = 50
TABLE_RULE: Final = (
    "drawdown table: the n deepest disjoint runs below the running peak (wealth starts at "
    "1 on the starting value), deepest first; peak = last day at the running maximum before "
    "the run, trough = first day at its minimum, recovery = first day back at the peak; "
    "lengths in the series' own returns and calendar days from the peak (the recovery day "
    "counted, the peak not), to the last return when not recovered. period returns: "
    "prod(1 + r) - 1 of the returns dated in each calendar month / year; partial when the "
    "series starts inside the period or ends before its last weekday"
)


@dataclass(frozen=True, slots=True)
class DrawdownPeriod:
    """One row of a drawdown table (see the module docstring for the rules)."""

    depth: float  # < 0, fraction of the peak wealth
    peak_date: date
    trough_date: date
    recovery_date: date | None  # None when not recovered
    periods_to_trough: int
    days_to_trough: int
    duration_periods: int  # peak -> recovery, or to the last return
    duration_days: int

    @property
    def recovered(self) -> bool:
        return self.recovery_date is not None


class TablePeriod(NamedTuple):
    """The compounded return of one calendar month or year of a period table.

    A named tuple, not a dataclass: a table of 500 symbols x 10 years holds 65,000 of them
    and a tuple is built 3x faster than a frozen dataclass. The fields are those of
    ``metrics.PeriodReturn`` (best / worst month) plus ``partial``."""

    value: float  # prod(1 + r) - 1
    period_start: date  # first calendar day of the period
    period_end: date  # last calendar day of the period
    n_returns: int  # returns compounded
    partial: bool  # the series starts or ends inside the period


@dataclass(frozen=True, slots=True)
class SeriesTables:
    """The tables of one symbol; a table that was not asked for is empty."""

    symbol: str
    drawdowns: list[DrawdownPeriod]
    monthly: list[TablePeriod]
    yearly: list[TablePeriod]


# ---------------------------------------------------------------------------
# Drawdown table
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DrawdownRows:
    """The selected drawdowns of all symbols, sorted by symbol then rank (vectors)."""

    symbol: IntArray  # column index
    depth: FloatArray
    peak: IntArray  # rows of the input
    trough: IntArray
    recovery: IntArray  # -1 when not recovered
    end: IntArray  # the recovery, or the last return when not recovered
    to_trough: IntArray  # periods
    duration: IntArray


def _drawdown_rows(panel: _Panel, top: int) -> _DrawdownRows:
    """The ``top`` deepest drawdowns of every symbol, found on the whole panel at once.

    Every run below the peak of every symbol is located on the flattened ``(K, T + 1)``
    array (a sentinel column keeps the runs of two symbols apart), reduced with
    ``minimum.reduceat``, and ranked with one ``lexsort``: no per-symbol loop.
    """
    dd, _ = _underwater(panel.x)
    k, t = dd.shape
    width = t + 1
    padded = np.zeros((k, width))
    padded[:, :t] = dd
    flat = padded.ravel()
    under = flat < 0.0
    edge = np.diff(under.astype(np.int8), prepend=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)  # first row back at the peak (or the sentinel)
    symbol = (starts // width).astype(np.intp)
    start_col = (starts % width).astype(np.intp)
    end_col = (ends % width).astype(np.intp)
    if starts.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return _DrawdownRows(empty, np.zeros(0), empty, empty, empty, empty, empty, empty)
    depth = np.minimum.reduceat(flat, np.column_stack([starts, ends]).ravel())[::2]
    # Deepest first per symbol, equal depths in date order; keep the first `top`.
    order = np.lexsort((starts, depth, symbol))
    group_start = np.searchsorted(symbol[order], symbol[order], side="left")
    keep = order[np.arange(order.size) - group_start < top]
    symbol, depth = symbol[keep], depth[keep]
    starts, ends = starts[keep], ends[keep]
    start_col, end_col = start_col[keep], end_col[keep]
    trough_col = _first_at(flat, starts, ends, depth) - symbol * width
    off = panel.offset
    rows = symbol
    if panel.mask is None:
        peak_col = start_col - 1  # the row before the run is at the peak and has a return
    else:
        at_peak = (dd == 0.0) & panel.mask
        col = np.arange(t, dtype=np.intp)
        last_peak = np.maximum.accumulate(np.where(at_peak, col, np.intp(-1)), axis=1)
        peak_col = np.where(start_col > 0, last_peak[rows, np.maximum(start_col - 1, 0)], -1)
    from_start = peak_col < 0
    peak = np.where(from_start, panel.base[rows], peak_col + off)
    trough = trough_col + off
    recovered = end_col < t
    recovery = np.where(recovered, end_col + off, -1)
    end = np.where(recovered, recovery, panel.last[rows])
    # A start-of-wealth peak on a row that carries a return sits before that return.
    extra = (from_start & panel.base_has_return[rows]).astype(np.intp)
    if panel.mask is None:
        to_trough = trough - peak + extra
        duration = end - peak + extra
    else:
        counts = np.cumsum(panel.mask, axis=1, dtype=np.intp)
        to_trough = counts[rows, trough] - counts[rows, peak] + extra
        duration = counts[rows, end] - counts[rows, peak] + extra
    return _DrawdownRows(symbol, depth, peak, trough, recovery, end, to_trough, duration)


def _first_at(flat: FloatArray, starts: IntArray, ends: IntArray, depth: FloatArray) -> IntArray:
    """Per run [start, end): the first flat index whose value equals the run's depth."""
    lengths = ends - starts
    run = np.repeat(np.arange(starts.size), lengths)
    pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = starts[run] + pos
    hits = np.flatnonzero(flat[index] == depth[run])  # every run has one: its minimum
    first = hits[np.r_[True, run[hits][1:] != run[hits][:-1]]]
    out: IntArray = index[first]
    return out


def _box_drawdowns(rows: _DrawdownRows, days: DateArray, k: int) -> list[list[DrawdownPeriod]]:
    out: list[list[DrawdownPeriod]] = [[] for _ in range(k)]
    if rows.symbol.size == 0:
        return out
    ordinal = days.astype(np.int64)
    peak_day = ordinal[rows.peak]
    listed: list[date] = days.tolist()
    columns = zip(
        rows.symbol.tolist(),
        rows.depth.tolist(),
        rows.peak.tolist(),
        rows.trough.tolist(),
        rows.recovery.tolist(),
        rows.to_trough.tolist(),
        (ordinal[rows.trough] - peak_day).tolist(),
        rows.duration.tolist(),
        (ordinal[rows.end] - peak_day).tolist(),
        strict=True,
    )
    for sym, depth, peak, trough, recovery, to_trough, days_to, duration, dur_days in columns:
        out[sym].append(
            DrawdownPeriod(
                depth,
                listed[peak],
                listed[trough],
                listed[recovery] if recovery >= 0 else None,
                to_trough,
                days_to,
                duration,
                dur_days,
            )
        )
    return out


# ---------------------------------------------------------------------------
# Period returns
# ---------------------------------------------------------------------------


def _period_keys(days: DateArray, unit: str) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = days.astype(f"datetime64[{unit}]").astype(np.int64)
    return out


def _period_table(
    panel: _Panel, days: DateArray, unit: str
) -> tuple[npt.NDArray[np.int64], FloatArray, IntArray, npt.NDArray[np.bool_]]:
    """Per (symbol, period): compounded return, return count, and whether it is partial.

    ``unit`` is ``"M"`` or ``"Y"``. One ``multiply.reduceat`` over the ``(K, T)`` growth
    factors at the period boundaries of the shared date axis gives every symbol's every
    period at once.
    """
    returns = panel.returns
    valid = ~np.isnan(returns)
    keys = _period_keys(days, unit)
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    period_key = keys[bounds]
    growth = np.where(valid, returns, 0.0)
    growth += 1.0
    value = np.multiply.reduceat(growth, bounds, axis=1) - 1.0
    count = np.add.reduceat(valid, bounds, axis=1, dtype=np.intp)
    symbols = np.arange(returns.shape[0])
    # Starts inside: the period of the first return is that of the starting value (or
    # the starting value is the first return itself: return input on row 0).
    first_return = np.argmax(valid, axis=1)
    first_period = np.searchsorted(bounds, first_return, side="right") - 1
    starts_inside = panel.base_has_return | (keys[panel.base] == period_key[first_period])
    # Ends inside: the last return falls before the last weekday of its period.
    last_period = np.searchsorted(bounds, panel.last, side="right") - 1
    next_start = (period_key[last_period] + 1).astype(f"datetime64[{unit}]")
    last_weekday = np.busday_offset(next_start.astype("datetime64[D]") - 1, 0, roll="backward")
    ends_inside = days[panel.last] < last_weekday
    partial = np.zeros(count.shape, dtype=bool)
    partial[symbols, first_period] = starts_inside
    partial[symbols, last_period] |= ends_inside
    return period_key, value, count, partial


def _box_periods(panel: _Panel, days: DateArray, unit: str) -> list[list[TablePeriod]]:
    key, value, count, partial = _period_table(panel, days, unit)
    first_day = key.astype(f"datetime64[{unit}]").astype("datetime64[D]")
    last_day = (key + 1).astype(f"datetime64[{unit}]").astype("datetime64[D]") - 1
    starts: list[date] = first_day.tolist()
    ends: list[date] = last_day.tolist()
    present = count > 0
    _, period = np.nonzero(present)
    boxed = [
        TablePeriod(v, starts[p], ends[p], n, part)
        for p, v, n, part in zip(
            period.tolist(),
            value[present].tolist(),
            count[present].tolist(),
            partial[present].tolist(),
            strict=True,
        )
    ]
    split = np.cumsum(present.sum(axis=1)).tolist()
    return [boxed[a:b] for a, b in zip([0, *split[:-1]], split, strict=True)]


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def check_table_size(drawdowns: int) -> int:
    """The drawdown table size: 0 (no table) to MAX_DRAWDOWN_TABLE."""
    if isinstance(drawdowns, bool) or not isinstance(drawdowns, int | np.integer):
        raise MetricsInputError("drawdowns", "must be an integer")
    if not 0 <= drawdowns <= MAX_DRAWDOWN_TABLE:
        raise MetricsInputError(
            "drawdowns", f"must be 0-{MAX_DRAWDOWN_TABLE} (0 = no table), got {drawdowns}"
        )
    return int(drawdowns)


def compute_tables(
    values: npt.ArrayLike,
    dates: npt.ArrayLike,
    symbols: Sequence[str],
    *,
    kind: InputKind = "prices",
    drawdowns: int = 10,
    periods: bool = True,
) -> dict[str, SeriesTables]:
    """The ``drawdowns`` deepest drawdowns and (when ``periods``) the monthly and yearly
    returns of every column, keyed by symbol in column order.

    Input as for :func:`services.analytics.metrics.compute_metrics`; raises
    :class:`~services.analytics.metrics.MetricsInputError`.
    """
    checked_kind = _check_kind(kind)
    top = check_table_size(drawdowns)
    matrix = _as_matrix(values, "values")
    names = _check_symbols(symbols, matrix.shape[1])
    day_array = _as_dates(dates, matrix.shape[0])
    _check_value_domain(matrix, checked_kind, "values")
    panel = _build_panel(np.ascontiguousarray(matrix.T), checked_kind)
    _require_min_returns(panel.n, names, "values")
    k = len(names)
    tables = _box_drawdowns(_drawdown_rows(panel, top), day_array, k) if top else None
    monthly = _box_periods(panel, day_array, "M") if periods else None
    yearly = _box_periods(panel, day_array, "Y") if periods else None
    return {
        name: SeriesTables(
            name,
            tables[i] if tables is not None else [],
            monthly[i] if monthly is not None else [],
            yearly[i] if yearly is not None else [],
        )
        for i, name in enumerate(names)
    }
