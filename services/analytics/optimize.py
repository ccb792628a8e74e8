"""Portfolio optimisation: estimators, objectives, constraints and their diagnosis.

Pure domain code (numpy, scipy, cvxpy; no gRPC, protobuf or storage): the input is a
(T, K) matrix of simple returns on the days every asset has one, the output the weights
and what they are expected to do. The service layer (`market.py`) reads the prices,
evaluates the weights with the engine's `analyse_portfolio` and maps
:class:`OptimizationFailed` to FAILED_PRECONDITION.

Conventions (written out in docs/analytics.md, "Portfolio optimisation")
-----------------------------------------------------------------------
* **Units.** ``P`` periods per year. Expected returns are arithmetic and annualised
  (``mean * P``); covariances are annualised (``x P``); the expected volatility is
  ``sqrt(w' S w)`` and the expected Sharpe ``(mu' w - rf_p P) / sqrt(w' S w)`` with
  ``rf_p`` the per-period risk-free rate of ComputeMetrics. With the sample estimators
  this is exactly the Sharpe ratio ComputeMetrics gives the daily-rebalanced portfolio's
  returns on the estimation days.
* **Estimators.** sample: mean, and covariance with ddof=1. exponential: weights
  ``0.5 ** ((T - 1 - t) / half_life)``, the weighted mean and pandas' bias-corrected
  weighted covariance (``DataFrame.ewm(halflife=h).cov()``, ``bias=False``). ledoit_wolf:
  Ledoit & Wolf (2004) shrinkage of the ddof=0 sample covariance towards ``mu I`` (``mu``
  = its average variance), with the closed-form optimal intensity, as
  ``sklearn.covariance.ledoit_wolf``; the expected returns are then the sample means.
* **Objectives.** min_variance: minimise ``w' S w``. max_sharpe: the Cornuejols-Tutuncu
  homogenisation, minimise ``y' S y`` s.t. ``(mu - rf)' y = 1`` and every constraint
  scaled by ``kappa = 1' y``, then ``w = y / kappa``. min_cvar: Rockafellar-Uryasev LP over
  the historical returns, minimise ``a + sum(u) / ((1 - c) T)``, ``u >= -R w - a``,
  ``u >= 0`` (the CVaR of the per-period loss, positive = loss; when ``(1 - c) T`` is an
  integer k it is the mean of the k worst losses). risk_parity: equal risk
  contributions by the log-barrier program of Spinu (2013) / Maillard et al. (2010),
  minimise ``y' S y / 2 - sum(log y) / K``, ``w = y / 1'y`` (long-only, no other
  constraint). hrp: López de Prado (2016): single linkage of the correlation distance
  ``sqrt((1 - rho) / 2)``, quasi-diagonal order of the dendrogram leaves, recursive
  bisection with inverse-variance cluster weights (long-only, no other constraint).
* **Constraints.** weights sum to 1; per-symbol bounds (long-only [0, 1] by default,
  [-1, 1] with shorting); group caps (``min <= sum_G w <= max``); a target return
  (``mu' w >= target``) or a volatility cap (``sqrt(w' S w) <= target``); turnover
  ``sum |w - w0| <= max`` from the current weights ``w0``.
* **Failures.** An infeasible or unsolved problem raises :class:`OptimizationFailed`
  naming the constraint: bound sums and group caps are checked before solving; after an
  infeasible status the constraints are added back one at a time (turnover, target
  return, volatility cap) and the first one that cannot hold is named with the best
  value the others allow. There is no fallback to another objective.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import cvxpy as cp
import highspy
import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from services.analytics import metrics as engine

FloatArray = npt.NDArray[np.float64]
Objective = Literal["min_variance", "max_sharpe", "min_cvar", "risk_parity", "hrp"]
ReturnEstimator = Literal["sample", "exponential"]
CovarianceEstimator = Literal["sample", "exponential", "ledoit_wolf"]

OBJECTIVES: Final = ("min_variance", "max_sharpe", "min_cvar", "risk_parity", "hrp")
MIN_ESTIMATION_ROWS: Final = 10
DEFAULT_HALF_LIFE: Final = 63.0
DEFAULT_CONFIDENCE: Final = 0.95
MAX_ABS_BOUND: Final = 100.0
MAX_FRONTIER_POINTS: Final = 50
# Weight constraints must hold to this after solving (else: not converged).
FEASIBILITY_TOLERANCE: Final = 1e-6
# Clarabel's tolerances (its defaults are 1e-8): close for every program, tight for risk
# parity, whose risk contributions must be equal to 1e-10.
_CLOSE: Final = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
_TIGHT: Final = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}


def _silence_highs_banner() -> None:
    """HiGHS prints its copyright banner to file descriptor 1 (C++, not Python's stdout)
    the first time a solver is built in a process, whatever ``output_flag`` says later.
    On a service whose stdout is JSON log lines that is two unparseable lines, so the
    first solver is built here, at import, with descriptor 1 pointed at /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


_silence_highs_banner()


class OptimizationFailed(Exception):
    """An infeasible or unsolved problem: `constraint` names the culprit."""

    def __init__(self, kind: Literal["infeasible", "not_converged"], constraint: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.constraint = constraint
        self.message = message


@dataclass(frozen=True, slots=True)
class Group:
    """A cap (and optional floor) on the summed weight of some assets."""

    name: str
    members: tuple[int, ...]  # column indices
    max_weight: float | None
    min_weight: float | None = None


@dataclass(frozen=True, slots=True)
class Spec:
    """What to optimise, under which constraints (validated: see `market.check_spec`)."""

    symbols: tuple[str, ...]
    objective: Objective
    lower: FloatArray  # per symbol, resolved
    upper: FloatArray
    min_weight: float  # the defaults the bounds came from (for messages)
    max_weight: float
    overridden: tuple[int, ...] = ()  # symbols with their own bounds
    allow_short: bool = False
    groups: tuple[Group, ...] = ()
    target_return: float | None = None
    target_volatility: float | None = None
    current: FloatArray | None = None
    max_turnover: float | None = None
    return_estimator: ReturnEstimator = "sample"
    covariance_estimator: CovarianceEstimator = "sample"
    half_life: float = DEFAULT_HALF_LIFE
    risk_free: float = 0.0  # annual
    periods_per_year: float = engine.DEFAULT_PERIODS_PER_YEAR
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def rf_annual(self) -> float:
        """The risk-free rate in the units of the expected returns (rf_p * P)."""
        return engine.per_period_risk_free(self.risk_free, self.periods_per_year) * (
            self.periods_per_year
        )


@dataclass(frozen=True, slots=True)
class Estimates:
    mu: FloatArray  # annualised arithmetic expected returns
    cov: FloatArray  # annualised covariance
    returns: FloatArray  # (T, K) per-period returns used
    factor: FloatArray  # F with F'F = cov (so w' S w = |F w|^2)
    shrinkage: float = math.nan  # Ledoit-Wolf intensity (NaN for the other estimators)

    @classmethod
    def of(
        cls, mu: FloatArray, cov: FloatArray, returns: FloatArray, shrinkage: float = math.nan
    ) -> Estimates:
        """The estimates with the covariance's factor (from its eigen decomposition)."""
        cov = (cov + cov.T) / 2
        lam, vec = np.linalg.eigh(cov)
        factor: FloatArray = (vec * np.sqrt(np.clip(lam, 0.0, None))).T
        return cls(mu, cov, returns, factor, shrinkage)


@dataclass(frozen=True, slots=True)
class FrontierPoint:
    target_return: float
    expected_return: float
    volatility: float
    sharpe: float
    weights: FloatArray


@dataclass(frozen=True, slots=True)
class Solution:
    weights: FloatArray
    objective_value: float
    expected_return: float
    volatility: float
    sharpe: float
    risk: engine.RiskContributions
    solver: str
    status: str
    iterations: int
    seconds: float
    frontier: list[FrontierPoint] = field(default_factory=list)


# -- estimators ------------------------------------------------------------------------------


def ewm_weights(n: int, half_life: float) -> FloatArray:
    """Weights of rows 0..n-1, the last row weighing 1: 0.5 ** ((n - 1 - t) / half_life)."""
    out: FloatArray = 0.5 ** ((n - 1 - np.arange(n)) / half_life)
    return out


def ewm_mean(x: FloatArray, half_life: float) -> FloatArray:
    """The exponentially weighted mean of the rows of x (pandas' ewm(halflife).mean())."""
    w = ewm_weights(x.shape[0], half_life)
    out: FloatArray = w @ x / w.sum()
    return out


def ewm_covariance(x: FloatArray, half_life: float) -> FloatArray:
    """pandas' DataFrame.ewm(halflife=h).cov() at the last row (bias=False, adjust=True)."""
    w = ewm_weights(x.shape[0], half_life)
    s1, s2 = w.sum(), float(w @ w)
    centred = x - w @ x / s1
    biased = (centred * w[:, None]).T @ centred / s1
    out: FloatArray = biased * (s1 * s1 / (s1 * s1 - s2))
    return out


def ledoit_wolf(x: FloatArray) -> tuple[FloatArray, float]:
    """Ledoit & Wolf (2004) shrinkage towards mu*I of the ddof=0 sample covariance.

    The formula of sklearn.covariance.ledoit_wolf (assume_centered=False): returns the
    shrunk covariance and the intensity in [0, 1].
    """
    n, p = x.shape
    xc = x - x.mean(axis=0)
    sample = xc.T @ xc / n
    mu = float(np.trace(sample)) / p
    x2 = xc**2
    beta_ = float(np.sum(x2.T @ x2))
    delta_ = float(np.sum(sample**2))  # = sum((X.X)^2) / n^2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(sample)) + p * mu * mu) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - shrinkage) * sample
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, float(shrinkage)


def estimate(
    returns: FloatArray,
    return_estimator: ReturnEstimator,
    covariance_estimator: CovarianceEstimator,
    half_life: float,
    periods_per_year: float,
) -> Estimates:
    """Annualised expected returns and covariance of complete (T, K) returns."""
    x = np.asarray(returns, dtype=np.float64)
    mean = ewm_mean(x, half_life) if return_estimator == "exponential" else x.mean(axis=0)
    shrinkage = math.nan
    if covariance_estimator == "exponential":
        cov = ewm_covariance(x, half_life)
    elif covariance_estimator == "ledoit_wolf":
        cov, shrinkage = ledoit_wolf(x)
    else:
        cov = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
    return Estimates.of(mean * periods_per_year, cov * periods_per_year, x, shrinkage)


# -- messages --------------------------------------------------------------------------------


def pct(x: float) -> str:
    """0.312 -> '31.2%', 0.4 -> '40%'."""
    return f"{x * 100:.4g}%"


def _bounds_text(spec: Spec) -> list[str]:
    parts = []
    default_lower = 0.0 if not spec.allow_short else -1.0
    if spec.min_weight != default_lower:
        parts.append(f"min_weight {pct(spec.min_weight)}")
    if spec.max_weight != 1.0:
        parts.append(f"max_weight {pct(spec.max_weight)}")
    if spec.overridden:
        parts.append("bounds of " + ", ".join(spec.symbols[i] for i in spec.overridden))
    if not parts:
        parts.append("long-only" if not spec.allow_short else "weights in [-100%, 100%]")
    return parts


def _group_text(g: Group) -> str:
    if g.min_weight is not None and g.max_weight is not None:
        return f"group {g.name} in [{pct(g.min_weight)}, {pct(g.max_weight)}]"
    if g.max_weight is not None:
        return f"group {g.name} <= {pct(g.max_weight)}"
    return f"group {g.name} >= {pct(g.min_weight or 0.0)}"


def context(spec: Spec, *, turnover: bool, target_return: bool) -> str:
    """The constraints in effect, in words ("max_weight 40%, group tech <= 50%")."""
    parts = _bounds_text(spec) + [_group_text(g) for g in spec.groups]
    if turnover and spec.max_turnover is not None:
        parts.append(f"max_turnover {pct(spec.max_turnover)}")
    if target_return and spec.target_return is not None:
        parts.append(f"target_return {pct(spec.target_return)}")
    return ", ".join(parts)


# -- constraints -----------------------------------------------------------------------------


def _needed_bounds(spec: Spec) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices of the lower and upper bounds not implied by the others and sum(w) = 1."""
    lo_total, hi_total = float(spec.lower.sum()), float(spec.upper.sum())
    # w_i = 1 - sum_{j != i} w_j lies in [1 - (hi_total - hi_i), 1 - (lo_total - lo_i)].
    implied_hi = 1.0 - (lo_total - spec.lower)
    implied_lo = 1.0 - (hi_total - spec.upper)
    upper = np.flatnonzero(spec.upper < implied_hi - 1e-12)
    lower = np.flatnonzero(spec.lower > implied_lo + 1e-12)
    return lower, upper


def _linear(
    spec: Spec,
    est: Estimates,
    w: cp.Variable,
    scale: cp.Expression | float = 1.0,
    *,
    turnover: bool = True,
    target_return: bool = True,
    target_volatility: bool = True,
) -> list[Any]:
    """The constraints on w, homogeneous in `scale` (1, or kappa for max Sharpe)."""
    out = [cp.sum(w) == scale]
    # Bounds the budget already implies are left out: interior-point solvers end such
    # degenerate programs "inaccurate" (w <= 1 with w >= 0 and sum(w) = 1, for one).
    lower_needed, upper_needed = _needed_bounds(spec)
    if lower_needed.size:
        out.append(w[lower_needed] >= scale * spec.lower[lower_needed])
    if upper_needed.size:
        out.append(w[upper_needed] <= scale * spec.upper[upper_needed])
    for g in spec.groups:
        total = cp.sum(w[list(g.members)])
        if g.max_weight is not None:
            out.append(total <= g.max_weight * scale)
        if g.min_weight is not None:
            out.append(total >= g.min_weight * scale)
    if turnover and spec.max_turnover is not None and spec.current is not None:
        out.append(cp.norm1(w - scale * spec.current) <= spec.max_turnover * scale)
    if target_return and spec.target_return is not None:
        out.append(est.mu @ w >= spec.target_return * scale)
    if target_volatility and spec.target_volatility is not None:
        out.append(cp.norm(est.factor @ w, 2) <= spec.target_volatility * scale)
    return out


def precheck(spec: Spec) -> None:
    """What can be told infeasible without the data: bound sums and group caps."""
    lo, hi = float(spec.lower.sum()), float(spec.upper.sum())
    which = "bounds" if spec.overridden else None
    if lo > 1.0 + 1e-12:
        raise OptimizationFailed(
            "infeasible",
            which or "min_weight",
            f"the lower bounds sum to {pct(lo)} > 100% ({', '.join(_bounds_text(spec))}, "
            f"{len(spec.symbols)} symbols): weights must sum to 100%",
        )
    if hi < 1.0 - 1e-12:
        raise OptimizationFailed(
            "infeasible",
            which or "max_weight",
            f"the upper bounds sum to {pct(hi)} < 100% ({', '.join(_bounds_text(spec))}, "
            f"{len(spec.symbols)} symbols): weights must sum to 100%",
        )
    for g in spec.groups:
        members = list(g.members)
        g_lo, g_hi = float(spec.lower[members].sum()), float(spec.upper[members].sum())
        if g.max_weight is not None and g.max_weight < g_lo - 1e-12:
            raise OptimizationFailed(
                "infeasible",
                f"groups[{g.name}]",
                f"group {g.name} cap {pct(g.max_weight)} is below its members' lower bounds "
                f"({pct(g_lo)})",
            )
        if g.min_weight is not None and g.min_weight > g_hi + 1e-12:
            raise OptimizationFailed(
                "infeasible",
                f"groups[{g.name}]",
                f"group {g.name} floor {pct(g.min_weight)} is above its members' upper bounds "
                f"({pct(g_hi)})",
            )
    if not spec.groups:
        return
    # Bounds and group limits alone: the reachable range of sum(w) must contain 1.
    w = cp.Variable(len(spec.symbols))
    rows = [w >= spec.lower, w <= spec.upper]
    for g in spec.groups:
        total = cp.sum(w[list(g.members)])
        rows += [total <= g.max_weight] if g.max_weight is not None else []
        rows += [total >= g.min_weight] if g.min_weight is not None else []
    caps = ", ".join(_group_text(g) for g in spec.groups)
    most = _lp_value(cp.Maximize(cp.sum(w)), rows)
    if most is None or most < 1.0 - 1e-9:
        raise OptimizationFailed(
            "infeasible",
            "groups",
            f"group caps sum below 100%: with {caps} and the weight bounds at most "
            f"{pct(most or 0.0)} can be invested",
        )
    least = _lp_value(cp.Minimize(cp.sum(w)), rows)
    if least is not None and least > 1.0 + 1e-9:
        raise OptimizationFailed(
            "infeasible",
            "groups",
            f"group floors sum above 100%: with {caps} at least {pct(least)} must be invested",
        )


def _lp_value(objective: Any, constraints: list[Any]) -> float | None:
    """The optimal value of a small diagnostic problem (None when it has none): HiGHS for
    what cvxpy reduces to an LP, Clarabel for the cones."""
    problem = cp.Problem(objective, constraints)
    try:
        problem.solve(solver="HIGHS")
    except cp.error.SolverError:
        problem.solve(solver="CLARABEL")
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        return None
    return float(problem.value)


def diagnose(spec: Spec, est: Estimates) -> OptimizationFailed:
    """After an infeasible status: the first constraint that cannot hold with the ones
    before it (turnover, then target return, then the volatility cap)."""
    k = len(spec.symbols)
    w = cp.Variable(k)
    base = _linear(spec, est, w, turnover=False, target_return=False, target_volatility=False)
    if spec.max_turnover is not None and spec.current is not None:
        least = _lp_value(cp.Minimize(cp.norm1(w - spec.current)), base)
        if least is not None and least > spec.max_turnover + 1e-9:
            return OptimizationFailed(
                "infeasible",
                "max_turnover",
                f"max_turnover {pct(spec.max_turnover)} is below the least turnover "
                f"{pct(least)} from current_weights that "
                f"{context(spec, turnover=False, target_return=False)} allow",
            )
    with_turnover = _linear(spec, est, w, target_return=False, target_volatility=False)
    under = context(spec, turnover=True, target_return=False)
    if spec.target_return is not None:
        best = _lp_value(cp.Maximize(est.mu @ w), with_turnover)
        if best is not None and best < spec.target_return - 1e-9:
            return OptimizationFailed(
                "infeasible",
                "target_return",
                f"target_return {pct(spec.target_return)} is above the highest attainable "
                f"{pct(best)} under {under}",
            )
    if spec.target_volatility is not None:
        rows = _linear(spec, est, w, target_volatility=False)
        least = _lp_value(cp.Minimize(cp.norm(est.factor @ w, 2)), rows)
        if least is not None and least > spec.target_volatility + 1e-9:
            return OptimizationFailed(
                "infeasible",
                "target_volatility",
                f"target_volatility {pct(spec.target_volatility)} is below the lowest "
                f"attainable {pct(least)} under {context(spec, turnover=True, target_return=True)}",
            )
    if spec.objective == "max_sharpe":
        rows = _linear(spec, est, w)
        best = _lp_value(cp.Maximize(est.mu @ w), rows)
        if best is not None and best <= spec.rf_annual + 1e-12:
            return OptimizationFailed(
                "infeasible",
                "risk_free_rate",
                f"no portfolio allowed has an expected return above the risk-free rate "
                f"{pct(spec.rf_annual)} (the highest attainable is {pct(best)} under "
                f"{context(spec, turnover=True, target_return=True)}): the maximum Sharpe "
                "ratio is not positive",
            )
    return OptimizationFailed(
        "infeasible",
        "constraints",
        "the constraints cannot hold together ("
        + context(spec, turnover=True, target_return=True)
        + (f", target_volatility {pct(spec.target_volatility)}" if spec.target_volatility else "")
        + ")",
    )


# -- solving ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Solved:
    weights: FloatArray
    value: float
    solver: str
    status: str
    iterations: int


def _solve(
    problem: cp.Problem,
    spec: Spec,
    est: Estimates,
    solver: str = "CLARABEL",
    tolerances: dict[str, float] | None = None,
) -> cp.Problem:
    """Solve; an infeasible or unsolved status raises OptimizationFailed. Returns the
    problem solved (a copy when the first attempt was retried; same variables)."""
    status = _run(problem, solver, (tolerances or _CLOSE) if solver == "CLARABEL" else {})
    if status == cp.OPTIMAL_INACCURATE and solver == "CLARABEL":
        # The tighter tolerances were not reached: Clarabel's defaults (1e-8) on a fresh
        # copy (a re-solve of the same object starts from cached state), or fail.
        problem = cp.Problem(problem.objective, problem.constraints)
        status = _run(problem, solver, {})
    if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise diagnose(spec, est)
    if status != cp.OPTIMAL:
        raise OptimizationFailed(
            "not_converged",
            "solver",
            f"the {solver} solver did not converge on the {spec.objective} problem "
            f"(status {status}); try fewer symbols, a longer window or the "
            "ledoit_wolf covariance",
        )
    return problem


def _run(problem: cp.Problem, solver: str, options: dict[str, float]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "may be inaccurate": the status says
            problem.solve(solver=solver, **options)
    except cp.error.SolverError:
        return "solver_error"
    return str(problem.status)


def _iterations(problem: cp.Problem) -> int:
    stats = problem.solver_stats
    return int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0


def _min_variance(spec: Spec, est: Estimates) -> _Solved:
    w = cp.Variable(len(spec.symbols))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(est.factor @ w)), _linear(spec, est, w))
    problem = _solve(problem, spec, est)
    status = str(problem.status)
    x = np.asarray(w.value, dtype=np.float64)
    return _Solved(x, float(x @ est.cov @ x), "CLARABEL", status, _iterations(problem))


def _max_sharpe(spec: Spec, est: Estimates) -> _Solved:
    if spec.target_volatility is None:
        return _tangency(spec, est)
    # With a volatility cap: the tangency portfolio when it is within the cap; else the
    # highest expected return at the cap, since the Sharpe ratio rises along the efficient
    # frontier up to the tangency (the homogenised program with the cap as a cone is
    # solved only inaccurately by interior-point solvers).
    free = _tangency(dataclasses.replace(spec, target_volatility=None), est, spec)
    if math.sqrt(max(float(free.weights @ est.cov @ free.weights), 0.0)) <= spec.target_volatility:
        return free
    w = cp.Variable(len(spec.symbols))
    problem = cp.Problem(cp.Maximize(est.mu @ w), _linear(spec, est, w))
    problem = _solve(problem, spec, est)
    status = str(problem.status)
    x = np.asarray(w.value, dtype=np.float64)
    iterations = free.iterations + _iterations(problem)
    return _Solved(x, _sharpe(x, est, spec), "CLARABEL", status, iterations)


def _tangency(spec: Spec, est: Estimates, failing: Spec | None = None) -> _Solved:
    """The Cornuejols-Tutuncu program; `failing` is the spec diagnosed when infeasible."""
    y = cp.Variable(len(spec.symbols))
    kappa = cp.Variable(nonneg=True)
    rows = [(est.mu - spec.rf_annual) @ y == 1, *_linear(spec, est, y, kappa)]
    problem = cp.Problem(cp.Minimize(cp.sum_squares(est.factor @ y)), rows)
    problem = _solve(problem, failing or spec, est)
    status = str(problem.status)
    yv = np.asarray(y.value, dtype=np.float64)
    x = yv / yv.sum()
    return _Solved(x, _sharpe(x, est, spec), "CLARABEL", status, _iterations(problem))


def _min_cvar(spec: Spec, est: Estimates) -> _Solved:
    if spec.target_volatility is not None:
        return _min_cvar_conic(spec, est)
    return _min_cvar_lp(spec, est)


def _min_cvar_conic(spec: Spec, est: Estimates) -> _Solved:
    """The Rockafellar-Uryasev program with a volatility cap (a second-order cone)."""
    r = est.returns
    t, k = r.shape
    w, a, u = cp.Variable(k), cp.Variable(), cp.Variable(t, nonneg=True)
    tail = (1.0 - spec.confidence) * t
    rows = [u >= -r @ w - a, *_linear(spec, est, w)]
    problem = cp.Problem(cp.Minimize(a + cp.sum(u) / tail), rows)
    problem = _solve(problem, spec, est)
    status = str(problem.status)
    x = np.asarray(w.value, dtype=np.float64)
    return _Solved(x, float(problem.value), "CLARABEL", status, _iterations(problem))


def _min_cvar_lp(spec: Spec, est: Estimates) -> _Solved:
    """The Rockafellar-Uryasev LP, solved by HiGHS as its dual (K + 1 rows, not T).

    Primal: min a + c 1'u s.t. u_t >= -r_t' w - a, u >= 0, 1'w = 1, G w <= g (bounds,
    groups, target return), and with a turnover limit |w - w0| <= s, 1's <= T; c =
    1 / ((1 - conf) T). Its dual, with multipliers lam (T) of the scenario rows, nu of the
    budget, y (m) of G, p, q (K) of the turnover rows and tau of 1's <= T:

        min  nu + g'y + w0'(p - q) + T tau
        s.t. 1'lam = 1;  R'lam - nu 1 - G'y - p + q = 0;  p + q - tau 1 = 0
             0 <= lam <= c;  y, p, q, tau >= 0

    has K + 1 (+ K) rows, so the simplex works on a basis of that size instead of T: about
    twice as fast at 100 x 2,520. The weights are (minus) the duals of the K rows
    R'lam - ... = 0; the primal optimum is minus the dual's.
    """
    r = est.returns
    t, k = r.shape
    c = 1.0 / ((1.0 - spec.confidence) * t)
    g_rows: list[FloatArray] = []
    g_rhs: list[float] = []
    lower_needed, upper_needed = _needed_bounds(spec)
    for i in upper_needed.tolist():
        row = np.zeros(k)
        row[i] = 1.0
        g_rows.append(row)
        g_rhs.append(float(spec.upper[i]))
    for i in lower_needed.tolist():
        row = np.zeros(k)
        row[i] = -1.0
        g_rows.append(row)
        g_rhs.append(-float(spec.lower[i]))
    for g in spec.groups:
        member = np.zeros(k)
        member[list(g.members)] = 1.0
        if g.max_weight is not None:
            g_rows.append(member)
            g_rhs.append(g.max_weight)
        if g.min_weight is not None:
            g_rows.append(-member)
            g_rhs.append(-g.min_weight)
    if spec.target_return is not None:
        g_rows.append(-est.mu)
        g_rhs.append(-spec.target_return)
    m = len(g_rows)
    turnover = spec.max_turnover is not None and spec.current is not None
    n_turn = 2 * k + 1 if turnover else 0
    # Columns: lam (t), nu, y (m), [p (k), q (k), tau].
    n_col = t + 1 + m + n_turn
    inf = highspy.kHighsInf
    cost = np.zeros(n_col)
    cost[t] = 1.0
    cost[t + 1 : t + 1 + m] = g_rhs
    col_lower = np.zeros(n_col)
    col_upper = np.full(n_col, inf)
    col_upper[:t] = c
    col_lower[t] = -inf
    gt = np.asarray(g_rows, dtype=np.float64).reshape(m, k).T  # (k, m)
    blocks = [
        [
            sparse.csr_matrix(np.ones((1, t))),
            sparse.csr_matrix((1, 1 + m + n_turn)),
        ],
        [
            sparse.csr_matrix(r.T),
            sparse.csr_matrix(-np.ones((k, 1))),
            sparse.csr_matrix(-gt),
        ],
    ]
    n_row = 1 + k
    if turnover:
        assert spec.current is not None and spec.max_turnover is not None
        eye = sparse.eye(k, format="csr")
        cost[t + 1 + m : t + 1 + m + k] = spec.current
        cost[t + 1 + m + k : t + 1 + m + 2 * k] = -spec.current
        cost[-1] = spec.max_turnover
        blocks[1] += [-eye, eye, sparse.csr_matrix((k, 1))]
        blocks.append(
            [
                sparse.csr_matrix((k, t + 1 + m)),
                eye,
                eye,
                sparse.csr_matrix(-np.ones((k, 1))),
            ]
        )
        n_row += k
    matrix = sparse.vstack([sparse.hstack(b) for b in blocks], format="csc")
    rows = np.zeros(n_row)
    rows[0] = 1.0
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n_col, n_row
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, col_lower, col_upper
    lp.row_lower_, lp.row_upper_ = rows, rows
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr
    lp.a_matrix_.index_ = matrix.indices
    lp.a_matrix_.value_ = matrix.data
    solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    solver.passModel(lp)
    solver.run()
    status = solver.getModelStatus()
    if status in (
        highspy.HighsModelStatus.kUnbounded,
        highspy.HighsModelStatus.kInfeasible,
        highspy.HighsModelStatus.kUnboundedOrInfeasible,
    ):
        raise diagnose(spec, est)  # a dual without a bounded optimum: no primal point
    if status != highspy.HighsModelStatus.kOptimal:
        raise OptimizationFailed(
            "not_converged",
            "solver",
            f"the HiGHS solver did not solve the min_cvar LP ({solver.modelStatusToString(status)})",
        )
    w = -np.asarray(solver.getSolution().row_dual[1 : 1 + k], dtype=np.float64)
    info = solver.getInfo()
    value = -float(info.objective_function_value)
    return _Solved(w, value, "HIGHS", "optimal", int(info.simplex_iteration_count))


def _check_positive_variance(spec: Spec, est: Estimates) -> None:
    flat = [s for s, v in zip(spec.symbols, np.diag(est.cov).tolist(), strict=True) if v <= 1e-20]
    if flat:
        raise OptimizationFailed(
            "infeasible",
            "covariance",
            f"{spec.objective} needs every asset to have a positive variance; "
            f"{', '.join(flat)} have none in the estimation window",
        )


def _risk_parity(spec: Spec, est: Estimates) -> _Solved:
    _check_positive_variance(spec, est)
    k = len(spec.symbols)
    y = cp.Variable(k)
    objective = 0.5 * cp.sum_squares(est.factor @ y) - cp.sum(cp.log(y)) / k
    problem = cp.Problem(cp.Minimize(objective))
    problem = _solve(problem, spec, est, tolerances=_TIGHT)
    status = str(problem.status)
    yv = np.asarray(y.value, dtype=np.float64)
    x = yv / yv.sum()
    shares = x * (est.cov @ x) / float(x @ est.cov @ x)
    return _Solved(
        x, float(np.abs(shares - 1.0 / k).max()), "CLARABEL", status, _iterations(problem)
    )


def hrp_weights(cov: FloatArray) -> FloatArray:
    """Hierarchical risk parity weights of a covariance matrix (López de Prado 2016)."""
    sd = np.sqrt(np.diag(cov))
    corr = np.clip(cov / np.outer(sd, sd), -1.0, 1.0)
    dist = np.sqrt(np.clip((1.0 - corr) / 2.0, 0.0, None))
    np.fill_diagonal(dist, 0.0)
    k = cov.shape[0]
    if k == 1:
        return np.ones(1)
    link = hierarchy.linkage(squareform(dist, checks=False), method="single")
    order = hierarchy.leaves_list(link).tolist()
    w = np.ones(k)
    clusters = [order]
    while clusters:
        split: list[list[int]] = []
        for items in clusters:
            if len(items) < 2:
                continue
            half = len(items) // 2
            left, right = items[:half], items[half:]
            v_left, v_right = _cluster_variance(cov, left), _cluster_variance(cov, right)
            alpha = 1.0 - v_left / (v_left + v_right)
            w[left] *= alpha
            w[right] *= 1.0 - alpha
            split += [left, right]
        clusters = split
    return w


def _cluster_variance(cov: FloatArray, items: Sequence[int]) -> float:
    sub = cov[np.ix_(items, items)]
    ivp = 1.0 / np.diag(sub)
    ivp /= ivp.sum()
    return float(ivp @ sub @ ivp)


def _hrp(spec: Spec, est: Estimates) -> _Solved:
    _check_positive_variance(spec, est)
    x = hrp_weights(est.cov)
    return _Solved(x, float(x @ est.cov @ x), "scipy.cluster.hierarchy", "optimal", 0)


_SOLVERS: Final = {
    "min_variance": _min_variance,
    "max_sharpe": _max_sharpe,
    "min_cvar": _min_cvar,
    "risk_parity": _risk_parity,
    "hrp": _hrp,
}


def _sharpe(w: FloatArray, est: Estimates, spec: Spec) -> float:
    vol = math.sqrt(max(float(w @ est.cov @ w), 0.0))
    return (float(est.mu @ w) - spec.rf_annual) / vol if vol > 0 else math.nan


def _clean(w: FloatArray, spec: Spec) -> FloatArray:
    """Solver round-off removed: clipped to the bounds, summing to 1."""
    x = np.clip(w, spec.lower, spec.upper)
    x = x / x.sum()
    x = np.clip(x, spec.lower, spec.upper)
    out: FloatArray = x / math.fsum(x.tolist())
    return out


def verify(w: FloatArray, spec: Spec, est: Estimates) -> None:
    """Every constraint holds (to FEASIBILITY_TOLERANCE); else the solver did not converge."""
    tol = FEASIBILITY_TOLERANCE
    broken: list[str] = []
    if (w < spec.lower - tol).any() or (w > spec.upper + tol).any():
        broken.append("bounds")
    for g in spec.groups:
        total = float(w[list(g.members)].sum())
        if (g.max_weight is not None and total > g.max_weight + tol) or (
            g.min_weight is not None and total < g.min_weight - tol
        ):
            broken.append(f"groups[{g.name}]")
    if spec.target_return is not None and float(est.mu @ w) < spec.target_return - tol:
        broken.append("target_return")
    vol = math.sqrt(max(float(w @ est.cov @ w), 0.0))
    if spec.target_volatility is not None and vol > spec.target_volatility + tol:
        broken.append("target_volatility")
    turnover = math.inf if spec.current is None else float(np.abs(w - spec.current).sum())
    if spec.max_turnover is not None and turnover > spec.max_turnover + tol:
        broken.append("max_turnover")
    if broken:
        raise OptimizationFailed(
            "not_converged",
            broken[0],
            f"the solver's weights break {', '.join(broken)} beyond {tol:g}: it did not converge",
        )


def optimize(spec: Spec, est: Estimates, frontier_points: int = 0) -> Solution:
    """Solve `spec` on the estimates; OptimizationFailed when it cannot be."""
    started = time.perf_counter()
    if spec.objective not in ("risk_parity", "hrp"):
        precheck(spec)
    solved = _SOLVERS[spec.objective](spec, est)
    w = _clean(solved.weights, spec)
    verify(w, spec, est)
    value = solved.value
    if spec.objective == "max_sharpe":
        value = _sharpe(w, est, spec)
    elif spec.objective in ("min_variance", "hrp"):
        value = float(w @ est.cov @ w)
    points = frontier(spec, est, frontier_points) if frontier_points else []
    vol = math.sqrt(max(float(w @ est.cov @ w), 0.0))
    return Solution(
        weights=w,
        objective_value=value,
        expected_return=float(est.mu @ w),
        volatility=vol,
        sharpe=_sharpe(w, est, spec),
        risk=engine.risk_contributions(w, est.cov, allow_short=True),
        solver=solved.solver,
        status=solved.status,
        iterations=solved.iterations,
        seconds=time.perf_counter() - started,
        frontier=points,
    )


def frontier(spec: Spec, est: Estimates, points: int) -> list[FrontierPoint]:
    """The mean-variance efficient frontier under the weight constraints (bounds, groups,
    turnover; not the target return or volatility cap): `points` minimum-variance
    portfolios at target returns evenly spaced from the minimum-variance portfolio's
    expected return to the highest attainable one."""
    precheck(spec)
    k = len(spec.symbols)
    w = cp.Variable(k)
    rows = _linear(spec, est, w, target_return=False, target_volatility=False)
    # The top end: the highest attainable expected return (an LP; its corner solution is
    # the frontier's last point, which an interior-point QP reaches only inaccurately).
    top_problem = cp.Problem(cp.Maximize(est.mu @ w), rows)
    status = _run(top_problem, "HIGHS", {})
    if status != cp.OPTIMAL or w.value is None:
        raise diagnose(spec, est)
    top_weights = _clean(np.asarray(w.value, dtype=np.float64), spec)
    risk = cp.Minimize(cp.sum_squares(est.factor @ w))
    _solve(cp.Problem(risk, rows), spec, est)
    assert w.value is not None
    low_weights = _clean(np.asarray(w.value, dtype=np.float64), spec)
    low, top = float(est.mu @ low_weights), float(est.mu @ top_weights)
    out = []
    for i in range(points):
        goal = low + max(top - low, 0.0) * i / max(points - 1, 1)
        if i == 0:
            x = low_weights
        elif i == points - 1:
            x = top_weights
        else:
            _solve(cp.Problem(risk, [*rows, est.mu @ w >= goal]), spec, est)
            x = _clean(np.asarray(w.value, dtype=np.float64), spec)
        vol = math.sqrt(max(float(x @ est.cov @ x), 0.0))
        out.append(FrontierPoint(goal, float(est.mu @ x), vol, _sharpe(x, est, spec), x))
    return out


_OBJECTIVE_RULES: Final = {
    "min_variance": "minimise w' S w",
    "max_sharpe": "maximise (mu' w - rf) / sqrt(w' S w) (Cornuejols-Tutuncu homogenisation)",
    "min_cvar": "minimise the historical CVaR of the per-period loss at {c} "
    "(Rockafellar-Uryasev LP)",
    "risk_parity": "equal risk contributions w_i (S w)_i (log-barrier program, long-only)",
    "hrp": "hierarchical risk parity: single linkage on sqrt((1 - rho) / 2), recursive "
    "bisection with inverse-variance weights (long-only)",
}


def describe(spec: Spec, est: Estimates | None = None) -> str:
    """The estimators, objective and units of a result, in words."""
    p = f"{spec.periods_per_year:g}"
    h = f"half-life {spec.half_life:g} returns"
    mean = (
        f"exponentially weighted mean ({h}) x {p}"
        if spec.return_estimator == "exponential"
        else f"sample mean x {p}"
    )
    cov = {
        "sample": f"sample covariance (ddof=1) x {p}",
        "exponential": f"exponentially weighted covariance ({h}, bias-corrected) x {p}",
        "ledoit_wolf": f"Ledoit-Wolf shrinkage of the ddof=0 covariance to mu*I x {p}",
    }[spec.covariance_estimator]
    rule = _OBJECTIVE_RULES[spec.objective].format(c=f"{spec.confidence:g}")
    return (
        f"expected returns: {mean} (arithmetic); covariance: {cov}; objective: {rule}; "
        "returns of the days on which every symbol has one"
    )
