"""Deterministic, rule-based commentary on computed metrics.

This is the fallback text when no LLM answers.  It is built only from the
numbers in :class:`~services.analytics.metrics.SymbolMetrics`: no clock, no
randomness, no locale; the same input always gives the same text.  Symbols
are described in a fixed order (the benchmark first when it is among them,
then the others by name), one paragraph each, paragraphs separated by a
blank line.  Undefined values (NaN) are written as ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from services.analytics.metrics import DrawdownInfo, SymbolMetrics

# Upper bounds (exclusive) of the Sharpe-ratio wording buckets, checked in order.
_SHARPE_WORDS: Final = (
    (0.0, "negative"),
    (0.5, "weak"),
    (1.0, "moderate"),
    (2.0, "good"),
    (math.inf, "exceptional"),
)


def format_percent(value: float, *, signed: bool = True, digits: int = 1) -> str:
    """A fraction as a percentage, ``+12.3%`` (sign unless ``signed=False``); NaN is ``n/a``."""
    if not math.isfinite(value):
        return "n/a"
    sign = "+" if signed else ""
    return f"{value * 100:{sign},.{digits}f}%"


def format_ratio(value: float, digits: int = 2) -> str:
    """A ratio with ``digits`` decimals, ``1.23``; NaN is ``n/a``."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _sharpe_word(sharpe: float) -> str:
    if not math.isfinite(sharpe):
        return "undefined"
    return next(word for bound, word in _SHARPE_WORDS if sharpe < bound)


def _performance_sentence(m: SymbolMetrics) -> str:
    return (
        f"{m.symbol} ({m.start_date.isoformat()} to {m.end_date.isoformat()}, "
        f"{m.n_returns:,} returns): total return {format_percent(m.total_return)}, "
        f"{format_percent(m.cagr)} a year compounded (CAGR), with annualised volatility of "
        f"{format_percent(m.volatility, signed=False)}."
    )


def _risk_adjusted_sentence(m: SymbolMetrics) -> str:
    return (
        f"Risk-adjusted performance was {_sharpe_word(m.sharpe)} "
        f"(Sharpe {format_ratio(m.sharpe)}, Sortino {format_ratio(m.sortino)})."
    )


def _drawdown_sentence(dd: DrawdownInfo, end_label: str) -> str:
    if dd.peak_date is None or dd.trough_date is None:
        return "It never fell below a previous high (no drawdown)."
    where = (
        f"The deepest drawdown was {format_percent(dd.max_drawdown)}, from a peak on "
        f"{dd.peak_date.isoformat()} to a trough on {dd.trough_date.isoformat()}"
    )
    if dd.recovery_date is not None:
        return (
            f"{where}; the previous high was regained on {dd.recovery_date.isoformat()} "
            f"({dd.duration_periods:,} periods, {dd.duration_days:,} days after the peak)."
        )
    return (
        f"{where}, and it had not been recovered by {end_label} "
        f"({dd.duration_periods:,} periods, {dd.duration_days:,} days after the peak)."
    )


def _var_sentence(m: SymbolMetrics) -> str:
    if not math.isfinite(m.var_95):
        return "Value at risk is not available."
    if m.var_95 >= 0:
        return (
            f"Even its worst 5% of periods were not losses (95% historical VaR "
            f"{format_percent(m.var_95, digits=2)})."
        )
    return (
        f"In the worst 5% of periods it lost {format_percent(-m.var_95, signed=False, digits=2)} "
        f"or more (95% historical VaR), "
        f"{format_percent(-m.cvar_95, signed=False, digits=2)} on average (CVaR)."
    )


def _benchmark_sentence(
    m: SymbolMetrics, benchmark: SymbolMetrics | None, benchmark_symbol: str | None
) -> str | None:
    rel = m.relative
    if rel is None:  # the detail (dates, counts) is in the response's relative_unavailable
        if not m.relative_unavailable:
            return None
        name = benchmark_symbol or "the benchmark"
        return f"There are no figures against {name}: it has too little data in this window."
    text = f"Against {rel.benchmark}"
    if rel.n_common < m.n_returns:  # the relative figures cover only the common days
        text += (
            f" (over the {rel.n_common:,} returns it shares with the benchmark, "
            f"{rel.first_date.isoformat()} to {rel.last_date.isoformat()})"
        )
    text += (
        f" it had a beta of {format_ratio(rel.beta)}, an annualised alpha "
        f"of {format_percent(rel.alpha)} and an information ratio of {format_ratio(rel.information_ratio)}"
    )
    if benchmark is not None and math.isfinite(m.cagr) and math.isfinite(benchmark.cagr):
        gap = (m.cagr - benchmark.cagr) * 100
        direction = "ahead of" if gap >= 0 else "behind"
        text += f"; its CAGR was {abs(gap):.1f} percentage points a year {direction} the benchmark"
    return text + "."


def _paragraph(
    m: SymbolMetrics, benchmark: SymbolMetrics | None, benchmark_symbol: str | None
) -> str:
    sentences = [
        _performance_sentence(m),
        _risk_adjusted_sentence(m),
        _drawdown_sentence(m.drawdown, m.end_date.isoformat()),
        _var_sentence(m),
    ]
    relative = _benchmark_sentence(m, benchmark, benchmark_symbol)
    if relative is not None:
        sentences.append(relative)
    return " ".join(sentences)


def _ordered_symbols(names: list[str], benchmark_symbol: str | None) -> list[str]:
    rest = sorted(name for name in names if name != benchmark_symbol)
    return ([benchmark_symbol] if benchmark_symbol in names else []) + rest


def rules_commentary(
    metrics_by_symbol: Mapping[str, SymbolMetrics], benchmark_symbol: str | None = None
) -> str:
    """Plain-English summary of each symbol's metrics, built only from the numbers.

    ``benchmark_symbol`` names the benchmark; when its own metrics are in the
    mapping it is described first and the others' CAGR is compared with it.
    The benchmark-relative sentence uses each symbol's ``relative`` block.
    """
    if not metrics_by_symbol:
        return "No metrics were available to comment on."
    benchmark = metrics_by_symbol.get(benchmark_symbol) if benchmark_symbol else None
    paragraphs = []
    for name in _ordered_symbols(list(metrics_by_symbol), benchmark_symbol):
        own = metrics_by_symbol[name]
        compare = None if name == benchmark_symbol else benchmark
        paragraphs.append(_paragraph(own, compare, benchmark_symbol))
    return "\n\n".join(paragraphs)
