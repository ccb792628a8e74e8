"""Benchmark portfolio optimisation: 100 symbols x 10 years, every objective, <= 1 s each.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_optimize [--quick]

Data: a seeded five-factor model of daily returns, 100 symbols x 2,520 days (10 years),
prices from their compounding (what the service pivots from storage). For each objective
the time is the best of several runs of what OptimizePortfolio computes after reading the
prices: returns, the estimates (sample mean, Ledoit-Wolf covariance), the solve under
long-only weights capped at 10% (risk parity and HRP: long-only only) and the evaluation
of the weights with the engine's `analyse_portfolio` (monthly rebalancing). The solve
alone is shown too, and skfolio 1.x solving the same problem is the baseline of the same
run (its own estimators, same constraints; skipped when skfolio does not import).

Issue 16's budget is 1 s per objective on this machine; the table says whether each
objective is within it.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from services.analytics import metrics as engine
from services.analytics import optimize as opt

BUDGET_S = 1.0
N_SYMBOLS, N_DAYS = 100, 2520
MAX_WEIGHT = 0.10


def generate(n: int = N_SYMBOLS, t: int = N_DAYS, seed: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factors = rng.normal(0.0002, 0.009, (t, 5))
    loadings = rng.normal(0.6, 0.35, (5, n)) / 2
    returns = factors @ loadings + rng.standard_t(5, (t, n)) * 0.009 + 0.0002
    prices = 100.0 * np.vstack([np.ones(n), np.cumprod(1.0 + np.clip(returns, -0.9, None), 0)])
    days = np.datetime64("2014-01-01") + np.arange(t + 1)
    return prices, days


def spec_for(objective: opt.Objective, n: int) -> opt.Spec:
    capped = objective not in ("risk_parity", "hrp")
    upper = MAX_WEIGHT if capped else 1.0
    return opt.Spec(
        symbols=tuple(f"S{i:03d}" for i in range(n)),
        objective=objective,
        lower=np.zeros(n),
        upper=np.full(n, upper),
        min_weight=0.0,
        max_weight=upper,
        risk_free=0.02,
    )


def best_of(runs: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def ours(prices: np.ndarray, days: np.ndarray, objective: opt.Objective) -> opt.Solution:
    returns = engine.simple_returns(prices)[1:]
    est = opt.estimate(returns, "sample", "ledoit_wolf", opt.DEFAULT_HALF_LIFE, 252.0)
    solution = opt.optimize(spec_for(objective, prices.shape[1]), est)
    engine.analyse_portfolio(
        prices, days, list(spec_for(objective, prices.shape[1]).symbols), solution.weights
    )
    return solution


def skfolio_model(objective: opt.Objective) -> Any:
    from skfolio import RiskMeasure
    from skfolio.moments import LedoitWolf
    from skfolio.optimization import (
        HierarchicalRiskParity,
        MeanRisk,
        ObjectiveFunction,
        RiskBudgeting,
    )
    from skfolio.prior import EmpiricalPrior

    prior = EmpiricalPrior(covariance_estimator=LedoitWolf())
    if objective == "risk_parity":
        return RiskBudgeting(risk_measure=RiskMeasure.VARIANCE, prior_estimator=prior)
    if objective == "hrp":
        return HierarchicalRiskParity(risk_measure=RiskMeasure.VARIANCE, prior_estimator=prior)
    function = (
        ObjectiveFunction.MAXIMIZE_RATIO
        if objective == "max_sharpe"
        else ObjectiveFunction.MINIMIZE_RISK
    )
    measure = RiskMeasure.CVAR if objective == "min_cvar" else RiskMeasure.VARIANCE
    return MeanRisk(
        objective_function=function,
        risk_measure=measure,
        max_weights=MAX_WEIGHT,
        risk_free_rate=engine.per_period_risk_free(0.02, 252),
        prior_estimator=prior,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each, no baseline")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 5
    prices, days = generate()
    returns = engine.simple_returns(prices)[1:]
    est = opt.estimate(returns, "sample", "ledoit_wolf", opt.DEFAULT_HALF_LIFE, 252.0)
    try:
        import pandas as pd

        frame = pd.DataFrame(returns)
        has_skfolio = not args.quick
        skfolio_model("min_variance")
    except ImportError:
        has_skfolio = False
    print(
        f"portfolio optimisation, {N_SYMBOLS} symbols x {N_DAYS} days, Ledoit-Wolf covariance, "
        f"weights <= {MAX_WEIGHT:.0%} (risk parity / HRP: long-only); best of {runs}"
    )
    header = f"{'objective':<14}{'total s':>9}{'solve s':>9}{'solver':>25}{'iters':>7}"
    header += f"{'skfolio s':>11}{'ratio':>8}  within {BUDGET_S:g} s"
    print(header)
    worst = 0.0
    for objective in opt.OBJECTIVES:
        total, solution = best_of(runs, functools.partial(ours, prices, days, objective))
        solve, _ = best_of(
            runs, functools.partial(opt.optimize, spec_for(objective, N_SYMBOLS), est)
        )
        worst = max(worst, total)
        line = (
            f"{objective:<14}{total:>9.3f}{solve:>9.3f}{solution.solver:>25}"
            f"{solution.iterations:>7}"
        )
        if has_skfolio:
            model = skfolio_model(objective)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                baseline, _ = best_of(1, functools.partial(model.fit, frame))
            line += f"{baseline:>11.3f}{baseline / total:>7.1f}x"
        else:
            line += f"{'-':>11}{'-':>8}"
        line += f"  {'yes' if total <= BUDGET_S else 'NO'}"
        print(line, flush=True)
    print(f"slowest objective: {worst:.3f} s (budget {BUDGET_S:g} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
