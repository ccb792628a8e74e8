"""`finsight metrics --drawdowns [N]` and `--monthly`: the drawdown and period tables.

Rendering only (rich tables from the ComputeMetrics response); the rules behind the numbers
are in docs/analytics.md, "Drawdown and period tables".
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import date
from typing import Final

from rich.markup import escape
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.cli.render import day, from_pb_date, pct

DEFAULT_DRAWDOWNS: Final = 10
"""Rows of `--drawdowns` without a number (pyfolio's default table size)."""
PARTIAL_MARK: Final = "*"


def _length(periods: int, days: int) -> str:
    return f"{periods:,} / {days:,} d"


def drawdown_table(m: pb.SeriesMetrics) -> Table:
    """The N deepest drawdowns of one series, deepest first."""
    table = Table(
        title=f"Deepest drawdowns of {escape(m.symbol)}",
        caption=(
            "lengths in returns / calendar days from the peak; recovery = first day back at "
            "the peak; an open drawdown runs to the last day"
        ),
    )
    for name in ("#", "depth", "peak", "trough", "recovery", "to trough", "peak → recovery"):
        table.add_column(name, justify="right" if name in {"#", "depth"} else "left")
    for i, d in enumerate(m.drawdown_periods, start=1):
        recovery = day(d.recovery_date) if d.recovered else "not recovered"
        duration = _length(d.duration_periods, d.duration_days)
        table.add_row(
            str(i),
            pct(d.depth),
            day(d.peak_date),
            day(d.trough_date),
            recovery,
            _length(d.periods_to_trough, d.days_to_trough),
            duration if d.recovered else f"{duration} (so far)",
        )
    if not m.drawdown_periods:
        table.caption = "no drawdown: the series never fell below a peak"
    return table


def _cell(r: pb.CalendarPeriodReturn) -> str:
    return pct(r.value, 1) + (PARTIAL_MARK if r.partial else "")


def monthly_table(m: pb.SeriesMetrics) -> Table:
    """A year x month grid of compounded returns with the year's return in the last column."""
    table = Table(
        title=f"Monthly returns of {escape(m.symbol)}",
        caption=(
            f"compounded daily returns per calendar month / year; {PARTIAL_MARK} partial: "
            f"the series starts or ends inside the period ({day(m.start_date)} → "
            f"{day(m.end_date)})"
        ),
    )
    table.add_column("year", style="bold")
    for month in range(1, 13):
        table.add_column(calendar.month_abbr[month], justify="right")
    table.add_column("year", justify="right", style="bold")
    months: dict[tuple[int, int], pb.CalendarPeriodReturn] = {}
    for r in m.monthly_returns:
        start = from_pb_date(r.period_start)
        if start is not None:
            months[(start.year, start.month)] = r
    years = {
        start.year: r
        for r in m.yearly_returns
        if (start := from_pb_date(r.period_start)) is not None
    }
    for year in sorted({y for y, _ in months} | set(years)):
        cells = [_cell(months[(year, mo)]) if (year, mo) in months else "" for mo in range(1, 13)]
        table.add_row(str(year), *cells, _cell(years[year]) if year in years else "")
    return table


def drawdown_spans(
    metrics: Sequence[pb.SeriesMetrics],
) -> dict[str, list[tuple[date, date]]]:
    """Per symbol: (peak, recovery) of each table row, to the last day when not recovered."""
    out: dict[str, list[tuple[date, date]]] = {}
    for m in metrics:
        last = from_pb_date(m.end_date)
        spans = []
        for d in m.drawdown_periods:
            peak = from_pb_date(d.peak_date)
            end = from_pb_date(d.recovery_date) if d.recovered else last
            if peak is not None and end is not None:
                spans.append((peak, end))
        out[m.symbol] = spans
    return out
