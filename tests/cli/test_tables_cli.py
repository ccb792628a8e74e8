"""`finsight metrics --drawdowns [N]` / `--monthly`: tables, --json and the shaded plot.

The stack holds synthetic prices (tests/cli/conftest.py): 260 weekdays from Monday
2023-01-02 to Friday 2023-12-29, so January 2023 is partial (the first price is inside it)
and December is not (its last weekday is the last day).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from libs.cli import plots
from libs.cli.table_views import DEFAULT_DRAWDOWNS
from tests.cli.conftest import DAYS, synthetic_closes, trading_days


def _oracle_periods(seed: int) -> tuple[dict[tuple[int, int], float], float]:
    """Monthly returns from month-end closes (a loop, not the engine) and the year's."""
    closes = np.asarray(synthetic_closes(seed, DAYS), dtype=float) / 1e6
    days = trading_days(DAYS)
    out: dict[tuple[int, int], float] = {}
    previous = closes[0]
    for i, d in enumerate(days):
        last_of_month = i == len(days) - 1 or days[i + 1].month != d.month
        if last_of_month:
            out[(d.year, d.month)] = closes[i] / previous - 1.0
            previous = closes[i]
    return out, closes[-1] / closes[0] - 1.0


def _drawdown_oracle(seed: int) -> list[tuple[float, date, date, date | None]]:
    """Every run below the running peak of the closes: (depth, peak, trough, recovery)."""
    closes = np.asarray(synthetic_closes(seed, DAYS), dtype=float)
    days = trading_days(DAYS)
    runs = []
    peak, i = 0, 1
    while i < len(closes):
        if closes[i] >= closes[peak]:
            peak, i = i, i + 1
            continue
        start, trough = peak, i
        while i < len(closes) and closes[i] < closes[start]:
            trough = i if closes[i] < closes[trough] else trough
            i += 1
        recovery = days[i] if i < len(closes) else None
        runs.append((closes[trough] / closes[start] - 1.0, days[start], days[trough], recovery))
        peak = i if i < len(closes) else peak
        i += 1
    return sorted(runs, key=lambda r: r[0])


async def test_json_has_the_tables(cli: Any) -> None:
    r = await cli("--json", "metrics", "CLIX", "CLIY", "--drawdowns", "4", "--monthly")
    assert r.code == 0, r.err
    data = r.json()
    assert data["conventions"]["table_rule"].startswith("drawdown table:")
    for seed, m in enumerate(data["metrics"]):
        table = m["drawdown_periods"]
        assert len(table) == 4
        assert table[0]["depth"] == m["drawdown"]["max_drawdown"]
        for got, (depth, peak, trough, recovery) in zip(
            table, _drawdown_oracle(seed)[:4], strict=True
        ):
            assert got["depth"] == pytest.approx(depth, rel=1e-9)
            assert (got["peak_date"], got["trough_date"]) == (peak.isoformat(), trough.isoformat())
            assert got["recovery_date"] == (recovery.isoformat() if recovery else None)
            assert got["recovered"] is (recovery is not None)
        months, year = _oracle_periods(seed)
        assert len(m["monthly_returns"]) == 12
        for got in m["monthly_returns"]:
            y, mo, _ = (int(x) for x in got["period_start"].split("-"))
            assert got["value"] == pytest.approx(months[(y, mo)], rel=1e-9)
        assert [g["partial"] for g in m["monthly_returns"]] == [True] + [False] * 11
        (yearly,) = m["yearly_returns"]
        assert yearly["value"] == pytest.approx(year, rel=1e-9)
        assert (yearly["period_start"], yearly["period_end"]) == ("2023-01-01", "2023-12-31")
        assert yearly["return_count"] == DAYS - 1 and yearly["partial"] is True

    plain = (await cli("--json", "metrics", "CLIX")).json()["metrics"][0]
    assert plain["drawdown_periods"] == [] and plain["monthly_returns"] == []


async def test_drawdown_table(cli: Any) -> None:
    r = await cli("metrics", "CLIZ", "--drawdowns", "3")
    assert r.code == 0, r.err
    assert "Deepest drawdowns of CLIZ" in r.out
    for header in ("depth", "peak", "trough", "recovery", "to trough", "peak → recovery"):
        assert header in r.out
    want = _drawdown_oracle(2)[:3]
    for depth, peak, trough, recovery in want:
        assert f"{depth * 100:.2f}%" in r.out
        assert peak.isoformat() in r.out and trough.isoformat() in r.out
        assert (recovery.isoformat() if recovery else "not recovered") in r.out
    assert "Monthly returns" not in r.out

    default = await cli("metrics", "CLIZ", "--drawdowns")  # N omitted: the default size
    runs = _drawdown_oracle(2)  # fewer runs than the default size: all of them
    assert len(runs) < DEFAULT_DRAWDOWNS
    assert all(f"{depth * 100:.2f}%" in default.out for depth, *_ in runs)
    every = (await cli("--json", "metrics", "CLIZ", "--drawdowns", "50")).json()
    assert len(every["metrics"][0]["drawdown_periods"]) == len(runs)


async def test_monthly_grid(cli: Any) -> None:
    r = await cli("metrics", "CLIX", "--monthly")
    assert r.code == 0, r.err
    assert "Monthly returns of CLIX" in r.out
    for name in ("Jan", "Jun", "Dec", "2023", "partial"):
        assert name in r.out
    months, year = _oracle_periods(0)
    assert f"{months[(2023, 1)] * 100:.1f}%*" in r.out  # January is partial
    assert f"{months[(2023, 7)] * 100:.1f}%" in r.out
    assert f"{year * 100:.1f}%*" in r.out  # so is the year


async def test_out_of_range_size_is_a_field_error(cli: Any) -> None:
    r = await cli("metrics", "CLIX", "--drawdowns", "51")
    assert r.code == 1
    assert "INVALID_ARGUMENT" in r.err and "drawdown_table_size" in r.err and "0-50" in r.err
    assert "Traceback" not in r.err


async def test_plot_shades_the_drawdown_periods(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Figure] = []
    chart = plots.metrics_chart

    def spy(*args: Any, **kwargs: Any) -> Figure:
        figures.append(chart(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plots, "metrics_chart", spy)
    path = tmp_path / "dd.png"
    r = await cli(
        "--json", "metrics", "CLIX", "CLIZ", "--drawdowns", "3", "--plot", str(path)
    )  # fmt: skip
    assert r.code == 0, r.err
    (fig,) = figures
    (ax,) = [a for a in fig.axes if "Drawdown" in a.get_title()]
    spans = [p for p in ax.patches if p.get_gid() == plots.DRAWDOWN_SPAN_GID]
    expected = sum(len(m["drawdown_periods"]) for m in r.json()["metrics"])
    assert len(spans) == expected == 6
    assert "shaded: the 6 deepest drawdown periods" in ax.get_title()
    assert path.exists()

    figures.clear()
    r = await cli("metrics", "CLIX", "--plot", str(path))  # no --drawdowns: nothing shaded
    (ax,) = [a for a in figures[0].axes if "Drawdown" in a.get_title()]
    assert not [p for p in ax.patches if p.get_gid() == plots.DRAWDOWN_SPAN_GID]
