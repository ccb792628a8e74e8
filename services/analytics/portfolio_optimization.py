"""The OptimizePortfolio use case: validate, read prices, estimate, solve, evaluate.

Domain layer like `market.py` (no grpc, no protobuf): the request arrives as plain values
(:class:`OptimizeInput`), is checked field by field (INVALID_ARGUMENT naming each field),
solved by `optimize.py` off the event loop, and the weights are evaluated with
`MarketAnalytics.portfolio` (the ComputePortfolio metrics) in or out of sample. A problem
the constraints make infeasible, or that the solver does not solve, is FAILED_PRECONDITION
naming the constraint (`optimize.OptimizationFailed`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np

from libs.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, Violations
from libs.common.tracing import tracer
from services.analytics import metrics as engine
from services.analytics import optimize as opt
from services.analytics.market import (
    DateWindow,
    MarketAnalytics,
    MetricParams,
    PortfolioResult,
    check_symbol,
    check_symbols,
    check_window,
)
from services.analytics.storage import TenantView
from services.analytics.telemetry import OPTIMIZATION_SECONDS, OPTIMIZATIONS

_tracer = tracer(__name__)

MIN_SYMBOLS: Final = 2
MAX_SYMBOLS: Final = 100
MAX_GROUPS: Final = 50
MAX_GROUP_NAME: Final = 64
UNCONSTRAINED_ONLY: Final = ("risk_parity", "hrp")


@dataclass(frozen=True, slots=True)
class BoundsInput:
    symbol: str
    min_weight: float | None
    max_weight: float | None


@dataclass(frozen=True, slots=True)
class GroupInput:
    name: str
    symbols: tuple[str, ...]
    max_weight: float | None
    min_weight: float | None


@dataclass(frozen=True, slots=True)
class OptimizeInput:
    """The request as plain values (None = unset)."""

    symbols: tuple[str, ...]
    objective: opt.Objective | None
    window: DateWindow
    evaluation: DateWindow | None
    return_estimator: opt.ReturnEstimator = "sample"
    covariance_estimator: opt.CovarianceEstimator = "sample"
    half_life: float = 0.0
    allow_short: bool = False
    min_weight: float | None = None
    max_weight: float | None = None
    bounds: tuple[BoundsInput, ...] = ()
    groups: tuple[GroupInput, ...] = ()
    target_return: float | None = None
    target_volatility: float | None = None
    current: tuple[tuple[str, float], ...] = ()
    max_turnover: float | None = None
    confidence: float = 0.0
    rebalance: engine.Rebalance = "monthly"
    benchmark: str = ""
    frontier_points: int = 0


@dataclass(frozen=True, slots=True)
class OptimizeResult:
    spec: opt.Spec
    estimates: opt.Estimates
    solution: opt.Solution
    estimation_first: date
    estimation_last: date
    evaluation: PortfolioResult
    out_of_sample: bool
    rebalance: engine.Rebalance
    params: MetricParams
    data_version: int


def _finite(v: Violations, value: float | None, name: str) -> bool:
    if value is None:
        return False
    return v.check(math.isfinite(value), name, f"must be finite, got {value!r}")


def check_input(v: Violations, req: OptimizeInput, params: MetricParams) -> opt.Spec | None:
    """The solver's spec, or None with the violations collected in `v`."""
    symbols = list(req.symbols)
    check_symbols(v, symbols, "symbols", MAX_SYMBOLS)
    v.check(
        len(symbols) >= MIN_SYMBOLS or not symbols,
        "symbols",
        f"at least {MIN_SYMBOLS} symbols are needed, got {len(symbols)}",
    )
    index = {s: i for i, s in enumerate(symbols)}
    objective = req.objective
    v.check(
        objective is not None,
        "objective",
        "required: one of MIN_VARIANCE, MAX_SHARPE, MIN_CVAR, RISK_PARITY, HRP",
    )
    check_window(v, req.window, "range")
    if req.evaluation is not None:
        check_window(v, req.evaluation, "evaluation_range")
    if req.benchmark:
        check_symbol(v, req.benchmark, "benchmark")
    half_life = req.half_life or opt.DEFAULT_HALF_LIFE
    v.check(
        math.isfinite(half_life) and 1.0 <= half_life <= 10_000.0,
        "half_life",
        f"must be 1-10,000 returns (0 = 63), got {req.half_life!r}",
    )
    confidence = req.confidence or opt.DEFAULT_CONFIDENCE
    v.check(
        math.isfinite(confidence) and 0.5 <= confidence <= 0.999,
        "cvar_confidence",
        f"must be in [0.5, 0.999] (0 = 0.95), got {req.confidence!r}",
    )
    v.check(
        req.frontier_points == 0 or 2 <= req.frontier_points <= opt.MAX_FRONTIER_POINTS,
        "frontier_points",
        f"must be 0 or 2-{opt.MAX_FRONTIER_POINTS}, got {req.frontier_points}",
    )
    default_lower = -1.0 if req.allow_short else 0.0
    lower_all = default_lower if req.min_weight is None else req.min_weight
    upper_all = 1.0 if req.max_weight is None else req.max_weight

    def bound_ok(lo: float, hi: float, where: str) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            v.add(where, "bounds must be finite")
            return
        if lo < -opt.MAX_ABS_BOUND or hi > opt.MAX_ABS_BOUND:
            v.add(where, f"bounds must lie in [-{opt.MAX_ABS_BOUND:g}, {opt.MAX_ABS_BOUND:g}]")
        if lo < 0 and not req.allow_short:
            v.add(where, f"a negative lower bound ({lo!r}) needs allow_short")
        if lo > hi:
            v.add(where, f"lower bound {lo!r} is above upper bound {hi!r}")

    if req.min_weight is not None or req.max_weight is not None:
        field_name = "min_weight" if req.min_weight is not None else "max_weight"
        bound_ok(lower_all, upper_all, field_name)
    v.check(
        req.max_weight is None or not math.isfinite(req.max_weight) or req.max_weight > 0,
        "max_weight",
        f"must be > 0, got {req.max_weight!r}",
    )
    k = len(symbols)
    lower = np.full(k, lower_all, dtype=np.float64)
    upper = np.full(k, upper_all, dtype=np.float64)
    overridden: list[int] = []
    for i, b in enumerate(req.bounds):
        where = f"bounds[{i}]"
        if b.symbol not in index:
            v.add(f"{where}.symbol", f"{b.symbol[:40]!r} is not one of the symbols")
            continue
        j = index[b.symbol]
        if j in overridden:
            v.add(f"{where}.symbol", f"second bounds entry for {b.symbol}")
            continue
        lo = lower_all if b.min_weight is None else b.min_weight
        hi = upper_all if b.max_weight is None else b.max_weight
        bound_ok(lo, hi, where)
        lower[j], upper[j] = lo, hi
        overridden.append(j)
    groups: list[opt.Group] = []
    v.check(len(req.groups) <= MAX_GROUPS, "groups", f"at most {MAX_GROUPS} groups")
    seen_names: set[str] = set()
    for i, g in enumerate(req.groups[:MAX_GROUPS]):
        where = f"groups[{i}]"
        if not 1 <= len(g.name) <= MAX_GROUP_NAME:
            v.add(f"{where}.name", f"1-{MAX_GROUP_NAME} characters")
        elif g.name in seen_names:
            v.add(f"{where}.name", f"duplicate group name {g.name!r}")
        seen_names.add(g.name)
        members: list[int] = []
        for j, s in enumerate(g.symbols):
            if s not in index:
                v.add(f"{where}.symbols[{j}]", f"{s[:40]!r} is not one of the symbols")
            elif index[s] in members:
                v.add(f"{where}.symbols[{j}]", f"duplicate symbol {s!r}")
            else:
                members.append(index[s])
        if not g.symbols:
            v.add(f"{where}.symbols", "at least one symbol")
        if g.max_weight is None and g.min_weight is None:
            v.add(where, "set max_weight, min_weight or both")
        for name, value in (("max_weight", g.max_weight), ("min_weight", g.min_weight)):
            if value is not None and not (
                math.isfinite(value) and abs(value) <= opt.MAX_ABS_BOUND * MAX_SYMBOLS
            ):
                v.add(f"{where}.{name}", f"must be finite, got {value!r}")
        if (
            g.max_weight is not None
            and g.min_weight is not None
            and math.isfinite(g.max_weight)
            and math.isfinite(g.min_weight)
            and g.min_weight > g.max_weight
        ):
            v.add(where, f"min_weight {g.min_weight!r} is above max_weight {g.max_weight!r}")
        groups.append(opt.Group(g.name, tuple(members), g.max_weight, g.min_weight))
    if _finite(v, req.target_return, "target_return"):
        assert req.target_return is not None
        v.check(
            abs(req.target_return) <= 100.0,
            "target_return",
            f"an annual return as a fraction in [-100, 100], got {req.target_return!r}",
        )
    if _finite(v, req.target_volatility, "target_volatility"):
        assert req.target_volatility is not None
        v.check(
            0.0 < req.target_volatility <= 100.0,
            "target_volatility",
            f"an annual volatility as a fraction in (0, 100], got {req.target_volatility!r}",
        )
    current: np.ndarray | None = None
    if req.current:
        current = np.zeros(k)
        placed: set[str] = set()
        for i, (s, w) in enumerate(req.current):
            where = f"current_weights[{i}]"
            if s not in index:
                v.add(f"{where}.symbol", f"{s[:40]!r} is not one of the symbols")
            elif s in placed:
                v.add(f"{where}.symbol", f"duplicate symbol {s!r}")
            elif not (math.isfinite(w) and abs(w) <= opt.MAX_ABS_BOUND):
                v.add(f"{where}.weight", f"must be finite, in [-100, 100], got {w!r}")
            else:
                current[index[s]] = w
                placed.add(s)
    if _finite(v, req.max_turnover, "max_turnover"):
        assert req.max_turnover is not None
        v.check(
            0.0 < req.max_turnover <= 200.0,
            "max_turnover",
            f"must be in (0, 200], got {req.max_turnover!r}",
        )
        v.check(current is not None, "current_weights", "required with max_turnover")
    if objective in UNCONSTRAINED_ONLY:
        name = objective.upper() if objective else ""
        for flag, where in (
            (req.allow_short, "allow_short"),
            (req.min_weight is not None, "min_weight"),
            (req.max_weight is not None, "max_weight"),
            (bool(req.bounds), "bounds"),
            (bool(req.groups), "groups"),
            (req.target_return is not None, "target_return"),
            (req.target_volatility is not None, "target_volatility"),
            (req.max_turnover is not None, "max_turnover"),
        ):
            if flag:
                v.add(
                    where,
                    f"{name} takes no constraint but long-only (its weights are set by the "
                    "risk split); use MIN_VARIANCE, MAX_SHARPE or MIN_CVAR",
                )
    if v or objective is None:
        return None
    return opt.Spec(
        symbols=tuple(symbols),
        objective=objective,
        lower=lower,
        upper=upper,
        min_weight=lower_all,
        max_weight=upper_all,
        overridden=tuple(sorted(overridden)),
        allow_short=req.allow_short,
        groups=tuple(groups),
        target_return=req.target_return,
        target_volatility=req.target_volatility,
        current=current,
        max_turnover=req.max_turnover,
        return_estimator=req.return_estimator,
        covariance_estimator=req.covariance_estimator,
        half_life=half_life,
        risk_free=params.risk_free,
        periods_per_year=params.periods_per_year,
        confidence=confidence,
    )


def failed(exc: opt.OptimizationFailed, objective: str) -> FailedPrecondition:
    reason = "OPTIMIZATION_INFEASIBLE" if exc.kind == "infeasible" else "OPTIMIZATION_NOT_CONVERGED"
    return FailedPrecondition(
        exc.message,
        reason=reason,
        metadata={"constraint": exc.constraint, "objective": objective},
    )


def _complete(prices: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns on the rows where every asset has one, their dates, and the row of the first
    day on which every asset has a price."""
    returns = engine.simple_returns(prices)
    complete = ~np.isnan(returns).any(axis=1)
    priced = ~np.isnan(prices)
    first_all = int(np.argmax(priced.all(axis=1))) if priced.all(axis=1).any() else 0
    return returns[complete], days[complete], first_all


def _to_date(day: np.datetime64) -> date:
    out = day.astype("datetime64[D]").item()
    assert isinstance(out, date)
    return out


async def optimize_portfolio(
    market: MarketAnalytics,
    view: TenantView,
    req: OptimizeInput,
    spec: opt.Spec,
    params: MetricParams,
) -> OptimizeResult:
    started = time.perf_counter()
    outcome = "error"
    try:
        result = await _optimize(market, view, req, spec, params)
        outcome = "optimal"
        return result
    except opt.OptimizationFailed as exc:
        outcome = exc.kind
        raise failed(exc, spec.objective) from exc
    except InvalidArgument:
        outcome = "invalid"
        raise
    finally:
        OPTIMIZATIONS.labels(spec.objective, outcome).inc()
        OPTIMIZATION_SECONDS.labels(spec.objective).observe(time.perf_counter() - started)


async def _optimize(
    market: MarketAnalytics,
    view: TenantView,
    req: OptimizeInput,
    spec: opt.Spec,
    params: MetricParams,
) -> OptimizeResult:
    symbols = list(spec.symbols)
    # The estimation window's prices: the same reading (and errors: unknown symbols, no
    # data in the range) as every metric RPC.
    matrix, version, _ = await market._matrix(view, symbols, req.window)
    returns, days, first_all = _complete(matrix.prices, matrix.days)
    if returns.shape[0] < opt.MIN_ESTIMATION_ROWS:
        raise InvalidArgument.field(
            "range",
            f"{returns.shape[0]} day(s) on which every symbol has a return in the range; "
            f"the estimates need at least {opt.MIN_ESTIMATION_ROWS}",
        )
    with _tracer.start_as_current_span("analytics.optimize") as span:
        span.set_attribute("analytics.objective", spec.objective)
        span.set_attribute("analytics.symbols", len(symbols))
        span.set_attribute("analytics.rows", int(returns.shape[0]))
        try:
            estimates, solution = await asyncio.to_thread(
                _estimate_and_solve, returns, spec, req.frontier_points
            )
        except opt.OptimizationFailed as exc:
            span.set_attribute("analytics.status", exc.kind)
            span.set_attribute("analytics.constraint", exc.constraint)
            raise
        span.set_attribute("analytics.solver", solution.solver)
        span.set_attribute("analytics.status", solution.status)
        span.set_attribute("analytics.iterations", solution.iterations)
    first_day, last_day = _to_date(days[0]), _to_date(days[-1])
    if req.evaluation is None:
        evaluation_window = DateWindow(_to_date(matrix.days[first_all]), last_day)
        field_name = "range"
    else:
        evaluation_window = req.evaluation
        field_name = "evaluation_range"
    weights = solution.weights.tolist()
    try:
        evaluation = await market.portfolio(
            view,
            symbols,
            weights,
            evaluation_window,
            req.rebalance,
            req.benchmark,
            bool((solution.weights < 0).any()),
            params,
        )
    except InvalidArgument as exc:
        raise _renamed(exc, field_name) from exc
    out_of_sample = evaluation.analysis.metrics.start_date > last_day
    return OptimizeResult(
        spec=spec,
        estimates=estimates,
        solution=solution,
        estimation_first=first_day,
        estimation_last=last_day,
        evaluation=evaluation,
        out_of_sample=out_of_sample,
        rebalance=req.rebalance,
        params=params,
        data_version=version,
    )


def _estimate_and_solve(
    returns: np.ndarray, spec: opt.Spec, frontier_points: int
) -> tuple[opt.Estimates, opt.Solution]:
    estimates = opt.estimate(
        returns,
        spec.return_estimator,
        spec.covariance_estimator,
        spec.half_life,
        spec.periods_per_year,
    )
    return estimates, opt.optimize(spec, estimates, frontier_points)


def _renamed(exc: InvalidArgument, field_name: str) -> InvalidArgument:
    """An evaluation error on `range` as one on the request's evaluation field."""
    if field_name == "range":
        return exc
    violations: Sequence[FieldViolation] = [
        FieldViolation(
            field_name + f.field.removeprefix("range") if f.field.startswith("range") else f.field,
            f.description,
        )
        for f in exc.violations
    ]
    return InvalidArgument(
        f"evaluation: {exc.message}",
        violations,
        reason=exc.reason,
        metadata=exc.metadata,
    )
