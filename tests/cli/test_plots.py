"""The --plot charts (libs/cli/plots.py): panels, scales, benchmark, titles, date ticks.

Checked on the matplotlib objects, not pixels: two ranges of realistic prices, twenty
years of a stock that grows about 800-fold with a two-thirds drawdown, and two weeks.
"""

from __future__ import annotations

import itertools
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from libs.cli import plots
from tests.cli.conftest import BENCHMARK

YEARS_20 = 20 * 252
WEEKS_2 = 10


def weekdays(n: int, first: date = date(2004, 1, 2)) -> list[date]:
    days: list[date] = []
    d = first
    while len(days) < n:
        if d.weekday() < 5:
            days.append(d)
        d += timedelta(days=1)
    return days


def walk(seed: int, n: int, growth: float, crash: float = 0.0) -> np.ndarray[Any, Any]:
    """Prices that end near `growth` times the start, with a fall of `crash` mid-way."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 0.012, n - 1)
    r += (np.log(growth) - np.log1p(r).sum()) / (n - 1)  # hit the target growth
    if crash:
        mid = (n - 1) // 2
        r[mid : mid + 5] += np.log1p(-crash) / 5
        r[mid + 5 :] -= np.log1p(-crash) / (n - 1 - mid - 5)  # recover to the target
    return 50.0 * np.exp(np.concatenate(([0.0], np.cumsum(r))))


def prices(n: int) -> tuple[list[date], dict[str, np.ndarray[Any, Any]]]:
    big = n > 252
    return weekdays(n), {
        "AAPL": walk(1, n, 801.0 if big else 1.03, 0.66 if big else 0.0),
        "MSFT": walk(2, n, 40.0 if big else 0.98),
        BENCHMARK: walk(3, n, 4.0 if big else 1.01),
    }


def by_title(fig: Figure, text: str) -> Axes:
    (ax,) = [ax for ax in fig.axes if text in ax.get_title()]
    return ax


def line_labels(ax: Axes) -> list[str]:
    return [str(line.get_label()) for line in ax.get_lines()]


def assert_readable_dates(fig: Figure, ax: Axes) -> None:
    """The date tick labels shown: a handful, none overlapping another."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    assert 3 <= len(labels) <= plots.MAX_DATE_TICKS + 1, [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for left, right in itertools.pairwise(boxes):
        assert left.x1 < right.x0, "date tick labels overlap"


def metrics_fig(tmp_path: Path, n: int) -> tuple[Figure, list[date]]:
    days, closes = prices(n)
    series = [plots.Series(s, days, c) for s, c in closes.items()]
    window = min(63, n - 1)
    vol = [
        plots.Series(s.symbol, s.dates[window:], np.full(n - window, 0.2))
        for s in series
        if s.symbol != BENCHMARK
    ]
    path = tmp_path / "metrics.png"
    fig = plots.metrics_chart(path, series, vol, window, BENCHMARK)
    assert path.read_bytes()[:4] == b"\x89PNG"
    return fig, days


def portfolio_fig(tmp_path: Path, n: int) -> tuple[Figure, list[date]]:
    days, closes = prices(n)
    weights = {"AAPL": 0.6, "MSFT": 0.4}
    returns = sum(w * np.diff(closes[s]) / closes[s][:-1] for s, w in weights.items())
    path = tmp_path / "portfolio.png"
    fig = plots.portfolio_chart(
        path,
        list(weights),
        np.array([[1.0, 0.3], [0.3, 1.0]]),
        plots.Series("portfolio", days[1:], np.asarray(returns)),
        weights,
        days[0],
        rebalance="monthly",
        benchmark=plots.Series(BENCHMARK, days, closes[BENCHMARK]),
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
    return fig, days


@pytest.mark.parametrize(("n", "scale"), [(YEARS_20, "log"), (WEEKS_2, "linear")])
def test_metrics_chart_panels_scale_benchmark_title_dates(
    tmp_path: Path, n: int, scale: str
) -> None:
    fig, days = metrics_fig(tmp_path, n)
    assert len(fig.axes) == 3
    cum, dd, vol = (by_title(fig, t) for t in ("Cumulative", "Drawdown", "volatility"))
    assert cum.get_yscale() == scale and dd.get_yscale() == "linear"
    assert f"{scale} scale" in cum.get_ylabel()
    assert cum.get_shared_x_axes().joined(cum, dd) and dd.get_shared_x_axes().joined(dd, vol)
    for ax in (cum, dd):
        assert line_labels(ax)[:3] == ["AAPL", "MSFT", f"{BENCHMARK} (benchmark)"]
    assert isinstance(dd.yaxis.get_major_formatter(), PercentFormatter)
    lowest = min(float(np.min(line.get_ydata())) for line in dd.get_lines())  # type: ignore[arg-type]
    assert (lowest < -0.6) if n == YEARS_20 else (lowest < 0)
    title = fig.get_suptitle()
    for text in (
        "AAPL",
        "MSFT",
        f"benchmark {BENCHMARK}",
        days[0].isoformat(),
        days[-1].isoformat(),
    ):
        assert text in title
    assert_readable_dates(fig, vol)


@pytest.mark.parametrize(("n", "scale"), [(YEARS_20, "log"), (WEEKS_2, "linear")])
def test_portfolio_chart_panels_scale_benchmark_title_dates(
    tmp_path: Path, n: int, scale: str
) -> None:
    fig, days = portfolio_fig(tmp_path, n)
    assert len(fig.axes) == 4  # heat map, its colour bar, growth, drawdown
    cum = by_title(fig, "cumulative return")
    dd = by_title(fig, "Drawdown")
    assert cum.get_yscale() == scale and dd.get_yscale() == "linear"
    assert f"{scale} scale" in cum.get_ylabel()
    assert cum.get_shared_x_axes().joined(cum, dd)
    assert cum.get_position().y0 > dd.get_position().y1  # drawdown below
    for ax in (cum, dd):
        assert line_labels(ax)[0] == "portfolio"
        assert f"{BENCHMARK} (benchmark)" in line_labels(ax)
    assert isinstance(dd.yaxis.get_major_formatter(), PercentFormatter)
    lowest = min(float(np.min(line.get_ydata())) for line in dd.get_lines())  # type: ignore[arg-type]
    assert (lowest < -0.3) if n == YEARS_20 else (lowest < 0)
    # Growth starts at 1 (log) or 0% (linear) on the day before the first return.
    first = cum.get_lines()[0].get_ydata()[0]  # type: ignore[index]
    assert first == pytest.approx(1.0 if scale == "log" else 0.0)
    title = fig.get_suptitle()
    for text in ("AAPL 60%", "MSFT 40%", "rebalanced monthly", f"benchmark {BENCHMARK}"):
        assert text in title
    assert f"{days[0].isoformat()} to {days[-1].isoformat()}" in title
    assert_readable_dates(fig, dd)


@pytest.mark.parametrize("n", [WEEKS_2, 21, 130, 252, 3 * 252, 30 * 252])
def test_date_ticks_readable_from_two_weeks_to_thirty_years(tmp_path: Path, n: int) -> None:
    fig, _ = portfolio_fig(tmp_path, n)  # the narrower of the two date axes
    assert_readable_dates(fig, by_title(fig, "Drawdown"))


def test_log_scale_rule() -> None:
    assert plots.use_log_scale([np.array([1.0, 9.9])]) is False
    assert plots.use_log_scale([np.array([1.0, 3.0]), np.array([1.0, 0.1])]) is True
    assert plots.use_log_scale([np.array([1.0, 50.0, -0.1])]) is False  # wiped-out short
    assert plots.weight_text(1 / 3) == "33.3%" and plots.weight_text(-0.25) == "-25%"


async def test_portfolio_plot_draws_the_benchmark_end_to_end(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Figure] = []
    chart = plots.portfolio_chart

    def spy(*args: Any, **kwargs: Any) -> Figure:
        figures.append(chart(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plots, "portfolio_chart", spy)
    path = tmp_path / "p.png"
    r = await cli(
        "portfolio", "CLIX=0.6", "CLIZ=0.4", "--benchmark", BENCHMARK, "--from", "2023-02-01",
        "--rebalance", "quarterly", "--plot", str(path),
    )  # fmt: skip
    assert r.code == 0, r.err
    (fig,) = figures
    assert path.exists()
    assert f"{BENCHMARK} (benchmark)" in line_labels(by_title(fig, "cumulative return"))
    title = fig.get_suptitle()
    assert "CLIX 60%" in title and "rebalanced quarterly" in title and "2023-02-01" in title


def test_charts_ignore_a_global_matplotlib_style(tmp_path: Path) -> None:
    """A style set process-wide (a user's matplotlibrc; QuantStats sets one on import) does
    not reach our charts: the PNG has matplotlib's default colours and background."""
    import matplotlib as mpl
    from matplotlib.image import imread

    with mpl.style.context("dark_background"), mpl.rc_context({"font.size": 23.0}):
        metrics_fig(tmp_path, 300)
        assert mpl.rcParams["font.size"] == 23.0  # the caller's style is left as it was
    rgb = imread(tmp_path / "metrics.png")[..., :3]
    assert (rgb[0, 0] == 1.0).all()  # a white figure, not the style's black
    c0 = np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.05
    assert c0.sum() > 200  # the first symbol's line in the default C0 blue
