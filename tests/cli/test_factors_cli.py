"""`finsight factors` against the real services: table, --json, --rolling, --plot, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.image import imread

from libs.cli import plots
from libs.cli.main import build_parser
from tests.cli.conftest import BENCHMARK, DAYS, SYMBOLS


async def test_the_table_shows_loadings_and_the_fit(cli: Any) -> None:
    r = await cli("factors", SYMBOLS[0], "--factors", f"{BENCHMARK},{SYMBOLS[1]}", "--rf", "2%")
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    for cell in (
        f"Factor exposure of {SYMBOLS[0]}",
        BENCHMARK,
        SYMBOLS[1],
        "t-stat",
        "alpha (ann.)",
        "R² / adjusted",
        "residual volatility (ann.)",
        f"observations │ {DAYS - 1:,}",
        "standard errors: classic",
        "risk-free 2.00%/yr",
    ):
        assert cell in text, (cell, r.out)


async def test_json_has_every_figure_and_rolling_series(cli: Any) -> None:
    r = await cli(
        "--json", "factors", SYMBOLS[0], "--factors", BENCHMARK, "--rolling", "60", "--hac", "3"
    )
    assert r.code == 0, r.err
    data = r.json()
    assert data["subject"] == SYMBOLS[0] and data["observations"] == DAYS - 1
    (loading,) = data["loadings"]
    assert loading["factor"] == BENCHMARK and np.isfinite(loading["t_stat"])
    assert data["standard_errors"] == "STANDARD_ERROR_TYPE_HAC" and data["hac_lags"] == 3
    assert data["rolling_window"] == 60
    (series,) = data["rolling_loadings"]
    assert len(series["points"]) == DAYS - 1 - 59 == len(data["rolling_r_squared"])
    assert data["first_date"] < data["last_date"]


async def test_a_portfolio_and_excess_factors(cli: Any) -> None:
    r = await cli(
        "--json",
        "factors",
        f"{SYMBOLS[0]}=0.5",
        f"{SYMBOLS[1]}=50%",
        "--factors",
        f"{BENCHMARK},{SYMBOLS[2]}",
        "--excess",
        SYMBOLS[2],
        "--rebalance",
        "quarterly",
    )
    assert r.code == 0, r.err
    data = r.json()
    assert data["subject"] == "portfolio"
    assert [f["excess_return"] for f in data["loadings"]] == [False, True]


async def test_plot_draws_the_rolling_loadings(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "factors.png"
    r = await cli(
        "factors", SYMBOLS[0], "--factors", f"{BENCHMARK},{SYMBOLS[1]}", "--rolling", "40",
        "--plot", str(path),
    )  # fmt: skip
    assert r.code == 0, r.err
    assert f"chart written to {path}" in r.out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[0] > 500


def test_the_figure_has_a_line_per_factor_and_the_r_squared() -> None:
    from datetime import date, timedelta

    days = [date(2024, 1, 1) + timedelta(days=i) for i in range(50)]
    lines = [plots.Series(f, days, np.linspace(0.2, 1.1, 50)) for f in ("MKT", "SMB")]
    fig = plots.factor_figure("AAPL", lines, plots.Series("R²", days, np.full(50, 0.4)), 21,
                              {"MKT": 0.9, "SMB": 0.1})  # fmt: skip
    beta, r2 = fig.axes[:2]
    assert "21-return window" in beta.get_title()
    legend = beta.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["MKT", "SMB"]
    assert r2.get_ylim() == (0.0, 1.0)
    assert "AAPL on MKT, SMB" in fig.get_suptitle()


async def test_errors_are_plain_words(cli: Any) -> None:
    r = await cli("factors", SYMBOLS[0], "--factors", f"{BENCHMARK},{BENCHMARK}")
    assert r.code == 1 and "Traceback" not in r.err
    assert "factors[1].symbol" in r.err and "duplicate factor" in r.err
    r = await cli("factors", SYMBOLS[0], "--factors", SYMBOLS[0])
    assert r.code == 1 and "is the subject itself" in r.err
    r = await cli("factors", SYMBOLS[0], "--factors", BENCHMARK, "--plot", "x.png")
    assert r.code == 2 and "--rolling" in r.err
    r = await cli("factors", SYMBOLS[0], "--factors", BENCHMARK, "--excess", "NOPE")
    assert r.code == 2 and "NOPE" in r.err
    r = await cli("factors", SYMBOLS[0], "--factors", BENCHMARK, "--rolling", "5000")
    assert r.code == 1 and "rolling_window" in r.err


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(["factors", "AAPL", "--factors", "SP500, MSFT", "--hac"])
    assert args.factors == ["SP500", "MSFT"] and args.hac == 0 and args.rolling is None
