"""`finsight optimise` (and its alias `optimize`) against the real services."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from libs.cli import optimise_cmds
from libs.cli.main import build_parser
from tests.cli.conftest import BENCHMARK, SYMBOLS


async def test_optimise_prints_weights_expected_figures_and_evaluation(cli: Any) -> None:
    r = await cli("optimise", *SYMBOLS, "--objective", "min-variance", "--max-weight", "40%")
    assert r.code == 0, r.err
    assert "Optimised weights (min-variance)" in r.out
    assert "Expected (annualised, from the estimates)" in r.out
    assert "Evaluation of the weights (in sample, rebalanced monthly)" in r.out
    assert "CLARABEL optimal" in r.out
    for symbol in SYMBOLS:
        assert symbol in r.out


async def test_optimize_alias_json_honours_the_constraints(cli: Any) -> None:
    r = await cli(
        "optimize", *SYMBOLS, "--objective", "max-sharpe", "--max-weight", "0.5",
        "--covariance", "ledoit-wolf", "--returns", "sample",
        "--group", f"pair={SYMBOLS[0]},{SYMBOLS[1]}:70%", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    data = r.json()
    weights = data["weights_by_symbol"]
    assert set(weights) == set(SYMBOLS)
    assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-9)
    assert max(weights.values()) <= 0.5 + 1e-9
    assert weights[SYMBOLS[0]] + weights[SYMBOLS[1]] <= 0.7 + 1e-9
    assert data["objective"] == "OPTIMIZATION_OBJECTIVE_MAX_SHARPE"
    assert data["objective_value"] == pytest.approx(data["expected_sharpe"])
    assert 0 <= data["shrinkage"] <= 1
    assert data["evaluation"]["symbol"] == "portfolio"


async def test_optimise_out_of_sample_with_frontier(cli: Any) -> None:
    r = await cli(
        "optimise", *SYMBOLS, "--objective", "min-cvar", "--to", "2023-06-30",
        "--eval-from", "2023-07-01", "--benchmark", BENCHMARK, "--frontier", "4",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "Evaluation of the weights (out of sample" in r.out
    assert "Efficient frontier (4 points)" in r.out
    r = await cli("optimise", *SYMBOLS, "--objective", "risk-parity", "--json")
    assert r.code == 0, r.err
    shares = [c["share"] for c in r.json()["risk_contributions"]]
    assert max(shares) - min(shares) < 1e-8


async def test_optimise_plot_draws_the_frontier(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "frontier.png"
    r = await cli("optimise", *SYMBOLS, "--objective", "hrp", "--plot", str(path), "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["plot"] == str(path)
    assert len(data["frontier"]) == optimise_cmds.PLOT_FRONTIER_POINTS
    image = imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 700
    # The frontier line (C0 blue) and the star (C3 red) are drawn.
    rgb = image[..., :3]
    blue = np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.05
    red = np.abs(rgb - np.array([0xD6, 0x27, 0x28]) / 255).sum(axis=-1) < 0.05
    assert blue.sum() > 100 and red.sum() > 50


async def test_optimise_infeasible_names_the_constraint(cli: Any) -> None:
    r = await cli("optimise", *SYMBOLS, "--max-weight", "40%", "--target-return", "500%")
    assert r.code == 1
    assert "FAILED_PRECONDITION" in r.err and "OPTIMIZATION_INFEASIBLE" in r.err
    assert "target_return 500% is above the highest attainable" in r.err
    assert "constraint: target_return" in r.err
    r = await cli("optimise", *SYMBOLS, "--max-weight", "20%", "--json")
    assert r.code == 1
    error = r.json()["error"]
    assert error["metadata"]["constraint"] == "max_weight"
    assert "upper bounds sum to 60% < 100%" in error["message"]


async def test_optimise_violations_name_the_flags(cli: Any) -> None:
    r = await cli("optimise", *SYMBOLS, "--frontier", "1", "--bound", "NOPE=:30%")
    assert r.code == 1
    assert "--frontier" in r.err
    assert "--bound #1 (bounds[0].symbol)" in r.err
    r = await cli("optimise", *SYMBOLS, "--objective", "hrp", "--max-weight", "30%")
    assert r.code == 1 and "--max-weight" in r.err and "HRP takes no constraint" in r.err


def test_argument_forms() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["optimise", "A", "B", "--bound", "A=5%:30%", "--bound", "B=:0.6",
         "--group", "g=A,B:10%:90%", "--group", "h=A:50%", "--current", "A=50%",
         "--max-turnover", "20%", "--target-volatility", "15%"]
    )  # fmt: skip
    req = optimise_cmds.build_request(args)
    assert req.bounds[0].min_weight == pytest.approx(0.05)
    assert req.bounds[0].max_weight == pytest.approx(0.3)
    assert not req.bounds[1].HasField("min_weight") and req.bounds[1].max_weight == 0.6
    assert (req.groups[0].min_weight, req.groups[0].max_weight) == (pytest.approx(0.1), 0.9)
    assert not req.groups[1].HasField("min_weight") and req.groups[1].max_weight == 0.5
    assert req.current_weights[0].weight == 0.5 and req.max_turnover == pytest.approx(0.2)
    assert req.target_volatility == pytest.approx(0.15)
    assert not req.HasField("min_weight") and not req.HasField("evaluation_range")
    for bad in (["--bound", "A=0.3"], ["--group", "g=A,B"], ["--current", "A"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["optimise", "A", "B", *bad])
