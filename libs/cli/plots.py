"""PNG charts for `finsight metrics --plot` and `finsight portfolio --plot`.

Pure drawing over plain arrays (no gRPC here). matplotlib's object API drawn on the Agg
canvas explicitly (the Agg backend, whatever MPLBACKEND says): no pyplot global state and
no display needed. Imported only when `--plot` is
given, so the other commands do not pay for importing matplotlib. Files are written to a
temporary name and renamed, so a failed draw never leaves a half-written PNG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

FloatArray = npt.NDArray[np.float64]


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


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metrics_chart(
    path: Path,
    prices: list[Series],
    rolling_vol: list[Series],
    window: int,
    benchmark: str | None = None,
) -> None:
    """Cumulative return, drawdown and rolling volatility, one line per symbol."""
    fig = Figure(figsize=(11, 9), layout="constrained")
    ax_cum, ax_dd, ax_vol = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    colors = {s.symbol: f"C{i}" for i, s in enumerate(prices)}
    for s in prices:
        style = (
            {"linestyle": "--", "linewidth": 1.2} if s.symbol == benchmark else {"linewidth": 1.4}
        )
        label = f"{s.symbol} (benchmark)" if s.symbol == benchmark else s.symbol
        ax_cum.plot(
            s.dates, cumulative_return(s.values), color=colors[s.symbol], label=label, **style
        )  # type: ignore[arg-type]
        dd = drawdown(s.values)
        ax_dd.plot(s.dates, dd, color=colors[s.symbol], **style)  # type: ignore[arg-type]
        if s.symbol != benchmark:
            ax_dd.fill_between(s.dates, dd, 0.0, color=colors[s.symbol], alpha=0.12)  # type: ignore[arg-type]
    for s in rolling_vol:
        ax_vol.plot(s.dates, s.values, color=colors.get(s.symbol), label=s.symbol, linewidth=1.2)  # type: ignore[arg-type]
    ax_cum.set_title("Cumulative return")
    ax_dd.set_title("Drawdown from running peak")
    ax_vol.set_title(f"Rolling volatility ({window}-day window, annualised)")
    for ax in (ax_cum, ax_dd, ax_vol):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(True, alpha=0.3)
    ax_cum.axhline(0.0, color="black", linewidth=0.6)
    ax_cum.legend(loc="best", fontsize="small")
    fig.suptitle("Finsight metrics: " + ", ".join(s.symbol for s in prices))
    _save(fig, path)


def portfolio_chart(
    path: Path,
    symbols: list[str],
    correlation: FloatArray,
    returns: Series | None,
    weights: dict[str, float],
    start: date | None = None,
) -> None:
    """Correlation heat map of the assets; the portfolio's cumulative return and drawdown."""
    fig = Figure(figsize=(13, 6), layout="constrained")
    if returns is not None and len(returns.values):
        ax_heat, ax_right = fig.subplots(1, 2, width_ratios=[1, 1.3])
    else:
        ax_heat, ax_right = fig.subplots(1, 1), None
    n = len(symbols)
    image = ax_heat.imshow(correlation, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax_heat.set_xticks(range(n), symbols, rotation=45, ha="right")
    ax_heat.set_yticks(range(n), [f"{s} ({weights.get(s, 0.0):.0%})" for s in symbols])
    if n <= 15:  # annotations stay readable up to about 15 assets
        for i in range(n):
            for j in range(n):
                value = correlation[i, j]
                text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
                color = "white" if np.isfinite(value) and abs(value) > 0.6 else "black"
                ax_heat.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax_heat.set_title("Correlation of daily returns")
    fig.colorbar(image, ax=ax_heat, shrink=0.8)
    if ax_right is not None and returns is not None:
        wealth = wealth_from_returns(returns.values)
        if start is not None:  # the day of the starting value, before the first return
            dates, cum, dd = [start, *returns.dates], cumulative_return(wealth), drawdown(wealth)
        else:
            dates, cum, dd = returns.dates, cumulative_return(wealth)[1:], drawdown(wealth)[1:]
        ax_right.plot(dates, cum, color="C0", label="cumulative return")  # type: ignore[arg-type]
        ax_right.fill_between(dates, dd, 0.0, color="C3", alpha=0.3, label="drawdown")  # type: ignore[arg-type]
        ax_right.axhline(0.0, color="black", linewidth=0.6)
        ax_right.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_right.grid(True, alpha=0.3)
        ax_right.legend(loc="best", fontsize="small")
        ax_right.set_title("Portfolio: cumulative return and drawdown")
    fig.suptitle("Finsight portfolio")
    _save(fig, path)
