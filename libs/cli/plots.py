"""PNG charts for the `--plot` option of `finsight metrics`, `portfolio` and `factors`.

Pure drawing over plain arrays (no gRPC here). matplotlib's object API drawn on the Agg
canvas explicitly (the Agg backend, whatever MPLBACKEND says): no pyplot global state and
no display needed. Imported only when `--plot` is
given, so the other commands do not pay for importing matplotlib. Files are written to a
temporary name and renamed, so a failed draw never leaves a half-written PNG.

Layout rules shared by both charts:

- growth and drawdown are separate panels on one date axis (drawdown below, in percent);
- the growth panel is on a log scale, as "growth of 1", when the largest growth value of
  all its lines is at least `LOG_SCALE_RATIO` (10) times the smallest (and all are > 0);
  otherwise it is the cumulative return in percent on a linear scale. The y label says
  which;
- dates are ticked by `AutoDateLocator` with `ConciseDateFormatter`, readable from two
  weeks to decades;
- titles name the symbols, the weights and rebalancing (portfolio), the benchmark and the
  period (first to last day drawn).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import matplotlib.style
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

FloatArray = npt.NDArray[np.float64]
P = ParamSpec("P")
R = TypeVar("R")


def house_style(draw: Callable[P, R]) -> Callable[P, R]:
    """Draw (and save) with matplotlib's own defaults, whatever the process's rcParams say:
    a user's matplotlibrc, or a library that sets a style when imported (QuantStats does),
    would otherwise change colours, fonts and sizes of our charts."""

    @functools.wraps(draw)
    def styled(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.style.context("default"):
            return draw(*args, **kwargs)

    return styled


LOG_SCALE_RATIO: Final = 10.0
"""Growth panels switch to a log scale when max(growth) / min(growth) reaches this."""
MAX_DATE_TICKS: Final = 8
TITLE_HOLDINGS: Final = 8
"""Holdings named with their weights in a portfolio title; the rest are counted."""
DRAWDOWN_SPAN_GID: Final = "drawdown-period"
"""gid of the shaded drawdown periods of `metrics_figure` (tests count them)."""


@dataclass(frozen=True)
class Series:
    """A dated series of one symbol (prices, or a rolling metric)."""

    symbol: str
    dates: list[date]
    values: FloatArray


def cumulative_return(prices: FloatArray) -> FloatArray:
    """Growth of 1 invested at the first price, minus 1: prod(1 + r) - 1 of simple returns."""
    return prices / prices[0] - 1.0


def drawdown(prices: FloatArray) -> FloatArray:
    """Fall from the running peak, as a fraction (<= 0)."""
    return prices / np.maximum.accumulate(prices) - 1.0


def wealth_from_returns(returns: FloatArray) -> FloatArray:
    """Wealth starting at 1 before the first return (the prices of a return series)."""
    return np.concatenate(([1.0], np.cumprod(1.0 + returns)))


def use_log_scale(growths: Iterable[FloatArray]) -> bool:
    """True when the growth values (wealth of 1 invested) span `LOG_SCALE_RATIO` or more.

    A log scale needs every value > 0: a wealth that reaches zero or below (a short
    portfolio) keeps the linear scale.
    """
    values = [g[np.isfinite(g)] for g in growths]
    values = [v for v in values if len(v)]
    if not values:
        return False
    low = min(float(v.min()) for v in values)
    high = max(float(v.max()) for v in values)
    return low > 0.0 and high / low >= LOG_SCALE_RATIO


def period(series: Iterable[Sequence[date]]) -> str:
    """`first to last` (ISO dates) over the dates of all the series ("" when there are none)."""
    days = [d for dates in series if dates for d in (dates[0], dates[-1])]
    return f"{min(days).isoformat()} to {max(days).isoformat()}" if days else ""


def weight_text(weight: float) -> str:
    """0.6 -> "60%", 1/3 -> "33.3%", -0.25 -> "-25%"."""
    return f"{weight * 100:.1f}".removesuffix(".0") + "%"


def _times(value: float, _pos: Any = None) -> str:
    return f"{value:,.0f}x" if value >= 1 else f"{value:g}x"


def _date_axis(ax: Axes) -> None:
    """Ticks every range legibly: days for two weeks, months, years or decades beyond."""
    locator = AutoDateLocator(minticks=3, maxticks=MAX_DATE_TICKS)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _growth_panel(
    ax: Axes, lines: list[tuple[str, list[date], FloatArray, dict[str, Any]]]
) -> None:
    """Lines of wealth (growth of 1): log "growth of 1" or linear cumulative return."""
    log = use_log_scale(g for _, _, g, _ in lines)
    for label, dates, growth, style in lines:
        ax.plot(dates, growth if log else growth - 1.0, label=label, **style)  # type: ignore[arg-type]
    if log:
        ax.set_yscale("log")
        finite = np.concatenate([g[np.isfinite(g)] for _, _, g, _ in lines])
        decades = np.log10(finite.max() / finite.min())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades >= 2 else (1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(_times))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_ylabel("growth of 1 (log scale)")
    else:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylabel("cumulative return (linear scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _drawdown_panel(ax: Axes) -> None:
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("drawdown")
    ax.grid(True, alpha=0.3)


def save_png(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@house_style
def metrics_figure(
    prices: list[Series],
    rolling_vol: list[Series],
    window: int,
    benchmark: str | None = None,
    *,
    drawdown_periods: dict[str, list[tuple[date, date]]] | None = None,
) -> Figure:
    """Growth, drawdown and rolling volatility, one line per symbol, on one date axis.

    `drawdown_periods` (`--drawdowns`): per symbol, the (peak, recovery or last day) spans
    of its drawdown table, shaded in the symbol's colour on the drawdown panel (each span
    an `axvspan` patch with gid `DRAWDOWN_SPAN_GID`)."""
    fig = Figure(figsize=(11, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_cum, ax_dd, ax_vol = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    colors = {s.symbol: f"C{i}" for i, s in enumerate(prices)}
    lines = []
    for s in prices:
        style: dict[str, Any] = (
            {"linestyle": "--", "linewidth": 1.2} if s.symbol == benchmark else {"linewidth": 1.4}
        )
        style["color"] = colors[s.symbol]
        label = f"{s.symbol} (benchmark)" if s.symbol == benchmark else s.symbol
        lines.append((label, s.dates, s.values / s.values[0], style))
        dd = drawdown(s.values)
        ax_dd.plot(s.dates, dd, label=label, **style)  # type: ignore[arg-type]
        if s.symbol != benchmark:
            ax_dd.fill_between(s.dates, dd, 0.0, color=colors[s.symbol], alpha=0.12)  # type: ignore[arg-type]
    _growth_panel(ax_cum, lines)
    _drawdown_panel(ax_dd)
    shaded = 0
    for symbol, spans in (drawdown_periods or {}).items():
        for start, end in spans:
            ax_dd.axvspan(start, end, color=colors.get(symbol, "grey"), alpha=0.12, linewidth=0,  # type: ignore[arg-type]
                          gid=DRAWDOWN_SPAN_GID)  # fmt: skip
            shaded += 1
    for s in rolling_vol:
        ax_vol.plot(s.dates, s.values, color=colors.get(s.symbol), label=s.symbol, linewidth=1.2)  # type: ignore[arg-type]
    ax_vol.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_vol.set_ylabel("volatility")
    ax_vol.grid(True, alpha=0.3)
    ax_cum.set_title("Cumulative return" + (" (log scale)" if _is_log(ax_cum) else ""))
    ax_dd.set_title(
        "Drawdown from running peak"
        + (f" (shaded: the {shaded} deepest drawdown periods)" if shaded else "")
    )
    ax_vol.set_title(f"Rolling volatility ({window}-day window, annualised)")
    _date_axis(ax_vol)
    names = ", ".join(s.symbol for s in prices if s.symbol != benchmark) or "no data"
    parts = [f"Finsight metrics: {names}"]
    if benchmark:
        parts.append(f"benchmark {benchmark}")
    if span := period(s.dates for s in prices):
        parts.append(span)
    fig.suptitle(" · ".join(parts))
    return fig


@house_style
def metrics_chart(
    path: Path,
    prices: list[Series],
    rolling_vol: list[Series],
    window: int,
    benchmark: str | None = None,
    *,
    drawdown_periods: dict[str, list[tuple[date, date]]] | None = None,
) -> Figure:
    """`metrics_figure` written to `path` as a PNG; returns the figure."""
    fig = metrics_figure(prices, rolling_vol, window, benchmark, drawdown_periods=drawdown_periods)
    save_png(fig, path)
    return fig


def _is_log(ax: Axes) -> bool:
    return ax.get_yscale() == "log"


def _holdings_text(weights: dict[str, float]) -> str:
    items = [f"{s} {weight_text(w)}" for s, w in weights.items()]
    if len(items) > TITLE_HOLDINGS:
        items = [*items[:TITLE_HOLDINGS], f"… +{len(items) - TITLE_HOLDINGS} more"]
    return ", ".join(items)


@house_style
def portfolio_figure(
    symbols: list[str],
    correlation: FloatArray,
    returns: Series | None,
    weights: dict[str, float],
    start: date | None = None,
    *,
    rebalance: str | None = None,
    benchmark: Series | None = None,
) -> Figure:
    """Correlation heat map of the assets; the portfolio's growth and, below, its drawdown.

    `benchmark` holds the benchmark's prices over the portfolio's period; it is drawn
    dashed in both panels, rebased to its first price.
    """
    fig = Figure(figsize=(13, 7), layout="constrained")
    FigureCanvasAgg(fig)
    has_returns = returns is not None and len(returns.values) > 0
    if has_returns:
        grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.3], height_ratios=[3, 2])
        ax_heat = fig.add_subplot(grid[:, 0])
        ax_cum = fig.add_subplot(grid[0, 1])
        ax_dd = fig.add_subplot(grid[1, 1], sharex=ax_cum)
    else:
        ax_heat = fig.add_subplot(1, 1, 1)
    n = len(symbols)
    image = ax_heat.imshow(correlation, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax_heat.set_xticks(range(n), symbols, rotation=45, ha="right")
    ax_heat.set_yticks(range(n), [f"{s} ({weight_text(weights.get(s, 0.0))})" for s in symbols])
    if n <= 15:  # annotations stay readable up to about 15 assets
        for i in range(n):
            for j in range(n):
                value = correlation[i, j]
                text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
                color = "white" if np.isfinite(value) and abs(value) > 0.6 else "black"
                ax_heat.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax_heat.set_title("Correlation of daily returns")
    fig.colorbar(image, ax=ax_heat, shrink=0.8)
    drawn: list[list[date]] = []
    if has_returns and returns is not None:
        wealth = wealth_from_returns(returns.values)
        if start is not None:  # the day of the starting value, before the first return
            dates, growth = [start, *returns.dates], wealth
        else:
            dates, growth = returns.dates, wealth[1:]
        lines = [("portfolio", dates, growth, {"color": "C0", "linewidth": 1.4})]
        dd = drawdown(wealth) if start is not None else drawdown(wealth)[1:]
        ax_dd.plot(dates, dd, color="C0", linewidth=1.0, label="portfolio")  # type: ignore[arg-type]
        ax_dd.fill_between(dates, dd, 0.0, color="C0", alpha=0.2)  # type: ignore[arg-type]
        drawn.append(dates)
        if benchmark is not None and len(benchmark.values) >= 2:
            style = {"color": "C1", "linestyle": "--", "linewidth": 1.2}
            label = f"{benchmark.symbol} (benchmark)"
            lines.append((label, benchmark.dates, benchmark.values / benchmark.values[0], style))
            ax_dd.plot(benchmark.dates, drawdown(benchmark.values), label=label, **style)  # type: ignore[arg-type]
            drawn.append(benchmark.dates)
        _growth_panel(ax_cum, lines)
        _drawdown_panel(ax_dd)
        ax_dd.legend(loc="lower left", fontsize="small")
        ax_cum.tick_params(labelbottom=False)
        ax_cum.set_title(
            "Portfolio: cumulative return" + (" (log scale)" if _is_log(ax_cum) else "")
        )
        ax_dd.set_title("Drawdown from running peak")
        _date_axis(ax_dd)
    parts = [f"Finsight portfolio: {_holdings_text(weights)}"]
    details = [f"rebalanced {rebalance}"] if rebalance else []
    if benchmark is not None:
        details.append(f"benchmark {benchmark.symbol}")
    if span := period(drawn):
        details.append(span)
    fig.suptitle("\n".join([parts[0], " · ".join(details)]) if details else parts[0])
    return fig


@house_style
def portfolio_chart(
    path: Path,
    symbols: list[str],
    correlation: FloatArray,
    returns: Series | None,
    weights: dict[str, float],
    start: date | None = None,
    *,
    rebalance: str | None = None,
    benchmark: Series | None = None,
) -> Figure:
    """`portfolio_figure` written to `path` as a PNG; returns the figure."""
    fig = portfolio_figure(
        symbols, correlation, returns, weights, start, rebalance=rebalance, benchmark=benchmark
    )
    save_png(fig, path)
    return fig


@house_style
def factor_figure(
    subject: str,
    loadings: list[Series],
    r_squared: Series | None,
    window: int,
    full_loadings: dict[str, float] | None = None,
) -> Figure:
    """`finsight factors --plot`: rolling loadings (one line per factor, the full-period
    loading dotted in the same colour) over the rolling R², on one date axis."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax_beta, ax_r2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])
    for i, s in enumerate(loadings):
        color = f"C{i}"
        ax_beta.plot(s.dates, s.values, color=color, linewidth=1.3, label=s.symbol)  # type: ignore[arg-type]
        if full_loadings and s.symbol in full_loadings:
            ax_beta.axhline(full_loadings[s.symbol], color=color, linestyle=":", linewidth=1.0)
    ax_beta.axhline(0.0, color="black", linewidth=0.6)
    ax_beta.set_ylabel("loading (beta)")
    ax_beta.set_title(
        f"Rolling factor loadings ({window}-return window; dotted: full-period loading)"
    )
    ax_beta.grid(True, alpha=0.3)
    ax_beta.legend(loc="best", fontsize="small")
    if r_squared is not None:
        ax_r2.plot(r_squared.dates, r_squared.values, color="black", linewidth=1.0)  # type: ignore[arg-type]
    ax_r2.set_ylim(0.0, 1.0)
    ax_r2.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_r2.set_ylabel("R²")
    ax_r2.set_title("Rolling R²")
    ax_r2.grid(True, alpha=0.3)
    _date_axis(ax_r2)
    parts = [f"Finsight factor exposure: {subject} on {', '.join(s.symbol for s in loadings)}"]
    if span := period(s.dates for s in loadings):
        parts.append(span)
    fig.suptitle(" · ".join(parts))
    return fig


@house_style
def factor_chart(
    path: Path,
    subject: str,
    loadings: list[Series],
    r_squared: Series | None,
    window: int,
    full_loadings: dict[str, float] | None = None,
) -> Figure:
    """`factor_figure` written to `path` as a PNG; returns the figure."""
    fig = factor_figure(subject, loadings, r_squared, window, full_loadings)
    save_png(fig, path)
    return fig
