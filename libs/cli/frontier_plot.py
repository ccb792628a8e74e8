"""The PNG of `finsight optimise --plot`: the efficient frontier with the chosen portfolio.

Drawn like the other charts (`plots.py`: matplotlib's object API on the Agg canvas, a
temporary file renamed into place). Expected volatility on x, expected return on y, both
annualised and in percent: the frontier's points joined by a line, each asset as a labelled
dot, the optimised portfolio as a star.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.cli.plots import house_style, save_png, weight_text
from libs.cli.render import day

TITLE_WEIGHTS = 8


@house_style
def frontier_figure(reply: pb.OptimizePortfolioResponse) -> Figure:
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if reply.frontier:
        ax.plot(
            [p.volatility for p in reply.frontier],
            [p.expected_return for p in reply.frontier],
            color="C0",
            marker="o",
            markersize=3,
            linewidth=1.6,
            label="efficient frontier",
        )
    ax.scatter(
        [a.volatility for a in reply.assets],
        [a.expected_return for a in reply.assets],
        color="C7",
        s=22,
        zorder=3,
        label="assets",
    )
    for a in reply.assets:
        ax.annotate(
            a.symbol,
            (a.volatility, a.expected_return),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=8,
        )
    name = pb.OptimizationObjective.Name(reply.objective).removeprefix("OPTIMIZATION_OBJECTIVE_")
    label = name.lower().replace("_", "-")
    ax.scatter(
        [reply.expected_volatility],
        [reply.expected_return],
        marker="*",
        s=260,
        color="C3",
        edgecolor="black",
        zorder=4,
        label=f"{label}: return {reply.expected_return:.1%}, vol {reply.expected_volatility:.1%}",
    )
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("expected volatility (annualised)")
    ax.set_ylabel("expected return (annualised, arithmetic)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    held = [f"{h.symbol} {weight_text(h.weight)}" for h in reply.weights if abs(h.weight) >= 5e-4]
    if len(held) > TITLE_WEIGHTS:
        held = [*held[:TITLE_WEIGHTS], f"… +{len(held) - TITLE_WEIGHTS} more"]
    w = reply.estimation_window
    fig.suptitle(
        f"Finsight optimisation ({label}): {', '.join(held)}\n"
        f"estimated {day(w.start)} to {day(w.end)} · Sharpe {reply.expected_sharpe:.2f}"
    )
    return fig


@house_style
def frontier_chart(path: Path, reply: pb.OptimizePortfolioResponse) -> Figure:
    """`frontier_figure` written to `path` as a PNG; returns the figure."""
    fig = frontier_figure(reply)
    save_png(fig, path)
    return fig
