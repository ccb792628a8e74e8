"""Portfolio optimisation (services/analytics/optimize.py, OptimizePortfolio over gRPC).

Each objective is matched against an independent implementation on the sample data
(skfolio 1.x on the same returns: weights to 1e-4, objective to 1e-6) and against its
optimality conditions (closed forms, equal risk contributions, the historical CVaR of the
weights, a direct implementation of HRP written here); the estimators against sklearn and
pandas; every constraint is checked to hold, and every infeasible case to name its
constraint.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from google.type import date_pb2
from prometheus_client import REGISTRY

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.common.v1 import common_pb2
from libs.common.errors import status_info
from services.analytics import metrics as engine
from services.analytics import optimize as opt
from tests.analytics.conftest import Running
from tests.analytics.test_service_metrics import columns

SYMBOLS = ["AAPL", "MSFT", "JPM", "XOM", "KO", "PG"]
TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}


@cache
def sample_returns(start: str = "2015-01-01", end: str = "2022-12-31") -> np.ndarray:
    prices, dates = columns(SYMBOLS)
    keep = (dates >= np.datetime64(start)) & (dates <= np.datetime64(end))
    r = engine.simple_returns(prices[keep])
    out: np.ndarray = r[~np.isnan(r).any(axis=1)]
    return out


def spec(objective: opt.Objective, k: int = len(SYMBOLS), **kw: object) -> opt.Spec:
    lower = np.asarray(kw.pop("lower", np.zeros(k)), dtype=float)
    upper = np.asarray(kw.pop("upper", np.ones(k)), dtype=float)
    args: dict[str, object] = {
        "symbols": tuple(SYMBOLS[:k]) if k <= len(SYMBOLS) else tuple(f"S{i}" for i in range(k)),
        "objective": objective,
        "lower": np.asarray(lower, dtype=float),
        "upper": np.asarray(upper, dtype=float),
        "min_weight": float(np.min(lower)),
        "max_weight": float(np.max(upper)),
        **kw,
    }
    return opt.Spec(**args)  # type: ignore[arg-type]


def sample_estimates(**kw: object) -> opt.Estimates:
    return opt.estimate(sample_returns(), "sample", "sample", 63.0, 252.0, **kw)  # type: ignore[arg-type]


# -- estimators ------------------------------------------------------------------------------


def test_ledoit_wolf_matches_sklearn() -> None:
    from sklearn.covariance import ledoit_wolf

    r = sample_returns()
    got, shrinkage = opt.ledoit_wolf(r)
    want, want_shrinkage = ledoit_wolf(r)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    assert shrinkage == pytest.approx(want_shrinkage, rel=1e-10)
    # More assets than days: the shrinkage matters, still the same formula.
    rng = np.random.default_rng(3)
    wide = rng.normal(0, 0.01, (30, 60))
    got, shrinkage = opt.ledoit_wolf(wide)
    want, want_shrinkage = ledoit_wolf(wide)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-18)
    assert shrinkage == pytest.approx(want_shrinkage, rel=1e-10)
    est = opt.estimate(r, "sample", "ledoit_wolf", 63.0, 252.0)
    np.testing.assert_allclose(est.cov, ledoit_wolf(r)[0] * 252, rtol=1e-10)
    np.testing.assert_allclose(est.mu, r.mean(axis=0) * 252, rtol=1e-12)


@pytest.mark.parametrize("half_life", [5.0, 30.0, 63.0, 500.0])
def test_exponential_estimators_match_pandas(half_life: float) -> None:
    r = sample_returns()
    frame = pd.DataFrame(r)
    est = opt.estimate(r, "exponential", "exponential", half_life, 252.0)
    want_cov = frame.ewm(halflife=half_life).cov().iloc[-r.shape[1] :].to_numpy()
    np.testing.assert_allclose(est.cov, want_cov * 252, rtol=1e-10)
    want_mean = frame.ewm(halflife=half_life).mean().iloc[-1].to_numpy()
    np.testing.assert_allclose(est.mu, want_mean * 252, rtol=1e-10)


def test_sample_estimators_are_the_engine_covariance() -> None:
    r = sample_returns()
    est = sample_estimates()
    np.testing.assert_allclose(est.cov, engine.covariance_matrix(r, 252), rtol=1e-13)
    np.testing.assert_allclose(est.factor.T @ est.factor, est.cov, rtol=1e-9, atol=1e-15)
    assert math.isnan(est.shrinkage)


# -- objectives against skfolio --------------------------------------------------------------


def _skfolio_frame() -> pd.DataFrame:
    return pd.DataFrame(sample_returns(), columns=SYMBOLS)


@pytest.mark.parametrize(
    ("objective", "upper", "rf"),
    [("min_variance", 0.3, 0.0), ("max_sharpe", 0.4, 0.0), ("max_sharpe", 1.0, 0.02)],
)
def test_mean_variance_matches_skfolio(objective: opt.Objective, upper: float, rf: float) -> None:
    from skfolio import RiskMeasure
    from skfolio.optimization import MeanRisk, ObjectiveFunction

    est = sample_estimates()
    s = spec(objective, upper=np.full(6, upper), risk_free=rf)
    got = opt.optimize(s, est)
    function = (
        ObjectiveFunction.MINIMIZE_RISK
        if objective == "min_variance"
        else ObjectiveFunction.MAXIMIZE_RATIO
    )
    model = MeanRisk(
        objective_function=function,
        risk_measure=RiskMeasure.VARIANCE,
        max_weights=upper,
        risk_free_rate=engine.per_period_risk_free(rf, 252),  # skfolio's per-period units
        solver="CLARABEL",
        solver_params=TIGHT,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_skfolio_frame())
    w = model.weights_
    np.testing.assert_allclose(got.weights, w, atol=1e-4)
    if objective == "min_variance":
        assert got.objective_value == pytest.approx(float(w @ est.cov @ w), abs=1e-6)
    else:
        sharpe = (float(est.mu @ w) - s.rf_annual) / math.sqrt(float(w @ est.cov @ w))
        assert got.objective_value == pytest.approx(sharpe, abs=1e-6)
        assert got.objective_value >= sharpe - 1e-9  # never worse than the reference


def test_min_cvar_matches_skfolio() -> None:
    from skfolio import RiskMeasure
    from skfolio.optimization import MeanRisk, ObjectiveFunction

    got = opt.optimize(spec("min_cvar", upper=np.full(6, 0.35)), sample_estimates())
    model = MeanRisk(
        objective_function=ObjectiveFunction.MINIMIZE_RISK,
        risk_measure=RiskMeasure.CVAR,
        cvar_beta=0.95,
        max_weights=0.35,
        solver="CLARABEL",
        solver_params=TIGHT,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_skfolio_frame())
    np.testing.assert_allclose(got.weights, model.weights_, atol=1e-4)
    want = historical_cvar(sample_returns() @ model.weights_, 0.95)
    assert got.objective_value == pytest.approx(want, abs=1e-6)
    assert got.solver == "HIGHS"


def test_risk_parity_matches_skfolio() -> None:
    from skfolio import RiskMeasure
    from skfolio.optimization import RiskBudgeting

    got = opt.optimize(spec("risk_parity"), sample_estimates())
    model = RiskBudgeting(risk_measure=RiskMeasure.VARIANCE, solver="CLARABEL", solver_params=TIGHT)
    model.fit(_skfolio_frame())
    np.testing.assert_allclose(got.weights, model.weights_, atol=1e-4)


def test_hrp_matches_skfolio_single_linkage() -> None:
    from skfolio import RiskMeasure
    from skfolio.cluster import HierarchicalClustering, LinkageMethod
    from skfolio.optimization import HierarchicalRiskParity
    from skfolio.seriation import HierarchicalSeriation

    got = opt.optimize(spec("hrp"), sample_estimates())
    model = HierarchicalRiskParity(
        risk_measure=RiskMeasure.VARIANCE,
        seriation_estimator=HierarchicalSeriation(
            hierarchical_clustering_estimator=HierarchicalClustering(
                linkage_method=LinkageMethod.SINGLE
            ),
            optimal_ordering=False,
        ),
    )
    model.fit(_skfolio_frame())
    np.testing.assert_allclose(got.weights, model.weights_, atol=1e-10)


# -- optimality conditions -------------------------------------------------------------------


def _wide(k: int) -> opt.Spec:
    return spec("min_variance", lower=np.full(k, -100.0), upper=np.full(k, 100.0), allow_short=True)


def test_min_variance_unconstrained_short_is_the_closed_form() -> None:
    est = sample_estimates()
    got = opt.optimize(_wide(6), est)
    inv = np.linalg.solve(est.cov, np.ones(6))
    np.testing.assert_allclose(got.weights, inv / inv.sum(), atol=1e-7)
    assert got.weights.min() < 0 or True  # shorting allowed, not required


def test_max_sharpe_unconstrained_short_is_the_tangency_portfolio() -> None:
    est = sample_estimates()
    s = spec(
        "max_sharpe",
        lower=np.full(6, -100.0),
        upper=np.full(6, 100.0),
        allow_short=True,
        risk_free=0.01,
    )
    got = opt.optimize(s, est)
    z = np.linalg.solve(est.cov, est.mu - s.rf_annual)
    np.testing.assert_allclose(got.weights, z / z.sum(), atol=1e-6)
    assert got.sharpe == pytest.approx(math.sqrt((est.mu - s.rf_annual) @ z), rel=1e-8)


def test_risk_parity_contributions_are_equal() -> None:
    for estimator in ("sample", "ledoit_wolf", "exponential"):
        est = opt.estimate(sample_returns(), "sample", estimator, 63.0, 252.0)  # type: ignore[arg-type]
        got = opt.optimize(spec("risk_parity"), est)
        shares = got.risk.shares
        assert np.abs(shares - 1 / 6).max() < 1e-8, (estimator, shares)
        assert got.objective_value < 1e-8
        assert got.weights.min() > 0


def reference_hrp(cov: np.ndarray) -> np.ndarray:
    """HRP as written in López de Prado (2016), "Building diversified portfolios that
    outperform out of sample", with pandas: getQuasiDiag and getRecBipart. The linkage is
    of the condensed correlation-distance matrix (as PyPortfolioOpt and skfolio do)."""
    import scipy.cluster.hierarchy as sch
    from scipy.spatial.distance import squareform

    cov_df = pd.DataFrame(cov)
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    dist = np.sqrt(np.clip((1 - corr) / 2.0, 0, None))
    np.fill_diagonal(dist, 0)
    link = sch.linkage(squareform(dist, checks=False), "single")

    def quasi_diag(link: np.ndarray) -> list[int]:
        link = link.astype(int)
        sort_ix = pd.Series([link[-1, 0], link[-1, 1]])
        num_items = link[-1, 3]
        while sort_ix.max() >= num_items:
            sort_ix.index = range(0, sort_ix.shape[0] * 2, 2)
            df0 = sort_ix[sort_ix >= num_items]
            i = df0.index
            j = df0.values - num_items
            sort_ix[i] = link[j, 0]
            df0 = pd.Series(link[j, 1], index=i + 1)
            sort_ix = pd.concat([sort_ix, df0]).sort_index()
            sort_ix.index = range(sort_ix.shape[0])
        return sort_ix.tolist()

    def cluster_var(items: list[int]) -> float:
        sub = cov_df.loc[items, items].to_numpy()
        ivp = 1.0 / np.diag(sub)
        ivp /= ivp.sum()
        return float(ivp @ sub @ ivp)

    order = quasi_diag(link)
    w = pd.Series(1.0, index=order)
    items = [order]
    while items:
        items = [
            i[j:k]
            for i in items
            for j, k in ((0, len(i) // 2), (len(i) // 2, len(i)))
            if len(i) > 1
        ]
        for i in range(0, len(items), 2):
            c0, c1 = items[i], items[i + 1]
            v0, v1 = cluster_var(c0), cluster_var(c1)
            alpha = 1 - v0 / (v0 + v1)
            w[c0] *= alpha
            w[c1] *= 1 - alpha
    return w.sort_index().to_numpy()


def test_hrp_matches_the_reference_algorithm() -> None:
    np.testing.assert_allclose(
        opt.hrp_weights(sample_estimates().cov), reference_hrp(sample_estimates().cov), atol=1e-14
    )
    rng = np.random.default_rng(11)
    for k in (2, 3, 7, 25):
        factors = rng.normal(0, 0.01, (400, 3))
        x = factors @ rng.normal(0.5, 0.4, (3, k)) + rng.normal(0, 0.01, (400, k))
        cov = np.cov(x, rowvar=False) * 252
        w = opt.hrp_weights(cov)
        np.testing.assert_allclose(w, reference_hrp(cov), atol=1e-14)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert (w > 0).all()


def historical_cvar(portfolio: np.ndarray, confidence: float) -> float:
    """CVaR of the loss (Rockafellar-Uryasev, the tail of (1 - c) T observations, a
    fractional last one included), positive = loss."""
    losses = np.sort(-portfolio)[::-1]
    tail = (1 - confidence) * len(losses)
    whole = math.floor(tail)
    total = losses[:whole].sum() + (tail - whole) * (losses[whole] if whole < len(losses) else 0)
    return float(total / tail)


@pytest.mark.parametrize("confidence", [0.95, 0.99, 0.9, 0.975])
def test_min_cvar_objective_is_the_historical_cvar_of_its_weights(confidence: float) -> None:
    got = opt.optimize(spec("min_cvar", confidence=confidence), sample_estimates())
    r = sample_returns()
    assert got.objective_value == pytest.approx(
        historical_cvar(r @ got.weights, confidence), abs=1e-12
    )
    if ((1 - confidence) * len(r)) % 1 == 0:  # then also the engine's CVaR (k worst returns)
        k = int((1 - confidence) * len(r))
        assert -np.sort(r @ got.weights)[:k].mean() == pytest.approx(got.objective_value)
    # no single asset does better
    for j in range(6):
        assert historical_cvar(r[:, j], confidence) >= got.objective_value - 1e-12


def test_min_cvar_lp_and_conic_paths_agree() -> None:
    est = sample_estimates()
    lp = opt.optimize(spec("min_cvar", upper=np.full(6, 0.3)), est)
    # A volatility cap that does not bind sends the problem to the conic path.
    conic = opt.optimize(spec("min_cvar", upper=np.full(6, 0.3), target_volatility=5.0), est)
    assert lp.solver == "HIGHS" and conic.solver == "CLARABEL"
    assert conic.objective_value == pytest.approx(lp.objective_value, abs=1e-8)
    np.testing.assert_allclose(conic.weights, lp.weights, atol=1e-4)


def test_expected_figures_follow_the_metric_conventions() -> None:
    est = sample_estimates()
    s = spec("min_variance", upper=np.full(6, 0.4), risk_free=0.02)
    got = opt.optimize(s, est)
    portfolio = sample_returns() @ got.weights
    m = engine.compute_metrics(
        portfolio, np.arange(len(portfolio)).astype("datetime64[D]"), ["p"], kind="returns",
        risk_free=0.02,
    )["p"]  # fmt: skip
    assert got.sharpe == pytest.approx(m.sharpe, rel=1e-9)
    assert got.volatility == pytest.approx(m.volatility, rel=1e-9)
    assert got.expected_return == pytest.approx(portfolio.mean() * 252, rel=1e-12)
    assert got.risk.contributions.sum() == pytest.approx(got.volatility, rel=1e-12)


# -- constraints -----------------------------------------------------------------------------


def test_constraints_are_honoured() -> None:
    est = sample_estimates()
    current = np.full(6, 1 / 6)
    groups = (opt.Group("tech", (0, 1), 0.3), opt.Group("staples", (4, 5), 0.6, 0.2))
    for objective in ("min_variance", "max_sharpe", "min_cvar"):
        s = spec(
            objective,  # type: ignore[arg-type]
            lower=np.array([0.05, 0, 0, 0, 0, 0]),
            upper=np.array([0.4, 0.4, 0.4, 0.4, 0.25, 0.4]),
            overridden=(0, 4),
            groups=groups,
            current=current,
            max_turnover=0.5,
        )
        w = opt.optimize(s, est).weights
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert (w >= s.lower - 1e-9).all() and (w <= s.upper + 1e-9).all(), w
        assert w[:2].sum() <= 0.3 + 1e-9
        assert 0.2 - 1e-9 <= w[4:].sum() <= 0.6 + 1e-9
        assert np.abs(w - current).sum() <= 0.5 + 1e-7


def test_target_return_and_volatility_bind() -> None:
    est = sample_estimates()
    free = opt.optimize(spec("min_variance"), est)
    target = free.expected_return + 0.05
    bound = opt.optimize(spec("min_variance", target_return=target), est)
    assert bound.expected_return == pytest.approx(target, abs=1e-7)
    assert bound.volatility > free.volatility
    cap = free.volatility * 1.1
    sharpe = opt.optimize(spec("max_sharpe"), est)
    assert sharpe.volatility > cap  # so the cap binds
    capped = opt.optimize(spec("max_sharpe", target_volatility=cap), est)
    assert capped.volatility <= cap + 1e-7
    cvar = opt.optimize(spec("min_cvar", target_return=target), est)
    assert cvar.expected_return >= target - 1e-9


def test_short_bounds() -> None:
    s = spec("min_variance", lower=np.full(6, -0.2), upper=np.full(6, 0.6), allow_short=True)
    w = opt.optimize(s, sample_estimates()).weights
    assert w.min() >= -0.2 - 1e-9 and w.max() <= 0.6 + 1e-9


def failure(s: opt.Spec, est: opt.Estimates | None = None) -> opt.OptimizationFailed:
    with pytest.raises(opt.OptimizationFailed) as err:
        opt.optimize(s, est or sample_estimates())
    return err.value


def test_infeasible_cases_name_their_constraint() -> None:
    est = sample_estimates()
    top = float(est.mu.max())
    e = failure(spec("min_variance", upper=np.full(6, 0.4), max_weight=0.4, target_return=0.4))
    assert (e.kind, e.constraint) == ("infeasible", "target_return")
    assert e.message.startswith("target_return 40% is above the highest attainable ")
    assert "under max_weight 40%" in e.message
    e = failure(spec("min_variance", upper=np.full(6, 0.1), max_weight=0.1))
    assert (e.constraint, e.kind) == ("max_weight", "infeasible")
    assert "upper bounds sum to 60% < 100%" in e.message
    e = failure(spec("min_variance", lower=np.full(6, 0.2), min_weight=0.2))
    assert e.constraint == "min_weight" and "lower bounds sum to 120%" in e.message
    groups = (opt.Group("a", (0, 1, 2), 0.3), opt.Group("b", (3, 4, 5), 0.5))
    e = failure(spec("max_sharpe", groups=groups))
    assert e.constraint == "groups" and e.message.startswith("group caps sum below 100%")
    assert "at most 80%" in e.message
    e = failure(spec("min_variance", lower=np.full(6, 0.1), groups=(opt.Group("a", (0, 1), 0.1),)))
    assert e.constraint == "groups[a]" and "below its members' lower bounds (20%)" in e.message
    current = np.array([1.0, 0, 0, 0, 0, 0])
    e = failure(spec("min_cvar", upper=np.full(6, 0.5), current=current, max_turnover=0.2))
    assert e.constraint == "max_turnover"
    assert "least turnover 100%" in e.message
    e = failure(spec("min_variance", target_volatility=0.01))
    assert e.constraint == "target_volatility" and "below the lowest attainable" in e.message
    e = failure(spec("max_sharpe", risk_free=min(top + 0.05, 0.9)))
    assert e.constraint == "risk_free_rate" and "above the risk-free rate" in e.message
    e = failure(spec("min_cvar", target_return=top + 0.01))
    assert e.constraint == "target_return"
    # target return reachable alone, not with the turnover limit
    current = np.full(6, 1 / 6)
    e = failure(spec("min_variance", current=current, max_turnover=0.05, target_return=top - 0.01))
    assert e.constraint == "target_return" and "max_turnover 5%" in e.message


def test_zero_variance_asset_fails_risk_parity() -> None:
    r = sample_returns().copy()
    r[:, 2] = 0.0
    est = opt.estimate(r, "sample", "sample", 63.0, 252.0)
    for objective in ("risk_parity", "hrp"):
        e = failure(spec(objective), est)  # type: ignore[arg-type]
        assert e.constraint == "covariance" and "JPM" in e.message


def test_frontier_is_efficient_and_ordered() -> None:
    est = sample_estimates()
    s = spec("min_variance", upper=np.full(6, 0.5))
    got = opt.optimize(s, est, frontier_points=8)
    points = got.frontier
    assert len(points) == 8
    returns = [p.expected_return for p in points]
    vols = [p.volatility for p in points]
    assert returns == sorted(returns)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(vols))
    assert points[0].volatility == pytest.approx(got.volatility, rel=1e-6)
    for p in points:
        assert p.weights.max() <= 0.5 + 1e-9 and p.weights.sum() == pytest.approx(1.0)
    # the last point is the highest attainable return under max 50%: the two best assets
    best = np.sort(est.mu)[::-1]
    assert points[-1].expected_return == pytest.approx(0.5 * best[0] + 0.5 * best[1], rel=1e-9)


def test_bench_size_solves() -> None:
    """100 symbols x 10 years of synthetic returns: every objective solves."""
    rng = np.random.default_rng(0)
    t, k = 2520, 100
    f = rng.normal(0, 0.01, (t, 5))
    x = f @ rng.normal(0.5, 0.3, (5, k)) * 0.5 + rng.normal(0.0003, 0.012, (t, k))
    est = opt.estimate(x, "sample", "ledoit_wolf", 63.0, 252.0)
    for objective in opt.OBJECTIVES:
        s = spec(
            objective, k=k, upper=np.full(k, 1.0 if objective in ("risk_parity", "hrp") else 0.1)
        )  # type: ignore[arg-type]
        got = opt.optimize(s, est)
        assert got.weights.sum() == pytest.approx(1.0, abs=1e-9)


# -- over gRPC -------------------------------------------------------------------------------


def d(text: str) -> date_pb2.Date:
    y, m, day = (int(x) for x in text.split("-"))
    return date_pb2.Date(year=y, month=m, day=day)


def rng_pb(start: str, end: str) -> common_pb2.DateRange:
    return common_pb2.DateRange(start=d(start), end=d(end))


def request(**kw: object) -> pb.OptimizePortfolioRequest:
    args: dict[str, object] = {
        "symbols": ["AAPL", "MSFT", "JPM", "XOM"],
        "objective": pb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE,
        "range": rng_pb("2015-01-01", "2019-12-31"),
        **kw,
    }
    return pb.OptimizePortfolioRequest(**args)  # type: ignore[arg-type]


async def call(
    analytics: Running, req: pb.OptimizePortfolioRequest
) -> pb.OptimizePortfolioResponse:
    return await analytics.stub.OptimizePortfolio(
        req, metadata=analytics.keys.md(analytics.keys.reader_a), timeout=60
    )


async def error(analytics: Running, req: pb.OptimizePortfolioRequest):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(analytics, req)
    return status_info(err.value)


def _counter(objective: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "finsight_analytics_optimizations_total", {"objective": objective, "outcome": outcome}
    )
    return value or 0.0


async def test_service_min_variance_in_sample(analytics: Running) -> None:
    before = _counter("min_variance", "optimal")
    reply = await call(
        analytics, request(max_weight=0.4, rebalance=pb.REBALANCE_DAILY, risk_free_rate=0.01)
    )
    assert _counter("min_variance", "optimal") == before + 1
    weights = [h.weight for h in reply.weights]
    assert [h.symbol for h in reply.weights] == ["AAPL", "MSFT", "JPM", "XOM"]
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-9)
    assert max(weights) <= 0.4 + 1e-12 and min(weights) >= 0
    assert reply.objective == pb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE
    assert reply.objective_value == pytest.approx(reply.expected_volatility**2, rel=1e-12)
    assert reply.solver.solver == "CLARABEL" and reply.solver.status == "optimal"
    assert reply.solver.iterations > 0
    # the engine on the same returns
    prices, dates = columns(["AAPL", "MSFT", "JPM", "XOM"])
    keep = (dates >= np.datetime64("2015-01-01")) & (dates <= np.datetime64("2019-12-31"))
    r = engine.simple_returns(prices[keep])
    r = r[~np.isnan(r).any(axis=1)]
    assert reply.estimation_periods == len(r)
    k = 4
    s = opt.Spec((*SYMBOLS[:2], "JPM", "XOM"), "min_variance", np.zeros(k),
                 np.full(k, 0.4), 0.0, 0.4, risk_free=0.01)  # fmt: skip
    want = opt.optimize(s, opt.estimate(r, "sample", "sample", 63, 252))
    np.testing.assert_allclose(weights, want.weights, atol=1e-9)
    # In sample, daily rebalanced: the evaluation is the expectation (sample estimators).
    ev = reply.evaluation
    assert not reply.out_of_sample
    assert ev.sharpe == pytest.approx(reply.expected_sharpe, rel=1e-9)
    assert ev.volatility == pytest.approx(reply.expected_volatility, rel=1e-9)
    assert ev.return_count == reply.estimation_periods
    assert reply.estimation_window.end == ev.end_date
    assert reply.rebalance == pb.REBALANCE_DAILY
    shares = [rc.share for rc in reply.risk_contributions]
    assert math.fsum(shares) == pytest.approx(1.0)
    assert len(reply.covariance.values) == 16 and math.isnan(reply.shrinkage)
    assert "sample mean x 252" in reply.optimization_rule
    assert reply.conventions.risk_free_rate_annual == 0.01
    again = await call(
        analytics, request(max_weight=0.4, rebalance=pb.REBALANCE_DAILY, risk_free_rate=0.01)
    )
    assert again == reply  # served from the result cache
    assert _counter("min_variance", "optimal") == before + 1


async def test_service_out_of_sample_and_frontier(analytics: Running) -> None:
    reply = await call(
        analytics,
        request(
            objective=pb.OPTIMIZATION_OBJECTIVE_MAX_SHARPE,
            covariance_estimator=pb.COVARIANCE_ESTIMATOR_LEDOIT_WOLF,
            return_estimator=pb.RETURN_ESTIMATOR_EXPONENTIAL,
            half_life=126,
            evaluation_range=rng_pb("2020-01-01", "2021-12-31"),
            benchmark="^GSPC",
            frontier_points=5,
            groups=[pb.WeightGroup(name="tech", symbols=["AAPL", "MSFT"], max_weight=0.5)],
        ),
    )
    assert reply.out_of_sample
    assert reply.evaluation.start_date.year == 2020 and reply.evaluation.end_date.year == 2021
    assert 0 < reply.shrinkage < 1
    assert reply.weights[0].weight + reply.weights[1].weight <= 0.5 + 1e-9
    assert len(reply.frontier) == 5
    assert [p.expected_return for p in reply.frontier] == sorted(
        p.expected_return for p in reply.frontier
    )
    assert all(len(p.weights) == 4 for p in reply.frontier)
    assert reply.objective_value == pytest.approx(reply.expected_sharpe)
    assert reply.evaluation.relative.benchmark == "^GSPC" or reply.evaluation.relative_unavailable


@pytest.mark.parametrize(
    "objective",
    [
        pb.OPTIMIZATION_OBJECTIVE_MIN_CVAR,
        pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY,
        pb.OPTIMIZATION_OBJECTIVE_HRP,
    ],
)
async def test_service_other_objectives(analytics: Running, objective: int) -> None:
    reply = await call(analytics, request(objective=objective, cvar_confidence=0.99))
    assert math.fsum(h.weight for h in reply.weights) == pytest.approx(1.0, abs=1e-9)
    if objective == pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY:
        assert max(abs(rc.share - 0.25) for rc in reply.risk_contributions) < 1e-8


async def test_service_infeasible_is_failed_precondition(analytics: Running) -> None:
    before = _counter("min_variance", "infeasible")
    info = await error(analytics, request(max_weight=0.4, target_return=0.9))
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == "OPTIMIZATION_INFEASIBLE"
    assert info.metadata == {"constraint": "target_return", "objective": "min_variance"}
    assert "target_return 90% is above the highest attainable" in info.message
    assert "under max_weight 40%" in info.message
    assert _counter("min_variance", "infeasible") == before + 1
    info = await error(
        analytics,
        request(
            groups=[
                pb.WeightGroup(name="tech", symbols=["AAPL", "MSFT"], max_weight=0.3),
                pb.WeightGroup(name="rest", symbols=["JPM", "XOM"], max_weight=0.3),
            ]
        ),
    )
    assert info.metadata["constraint"] == "groups"
    assert "group caps sum below 100%" in info.message


async def test_service_validation_names_fields(analytics: Running) -> None:
    info = await error(
        analytics,
        pb.OptimizePortfolioRequest(
            symbols=["AAPL"],
            min_weight=-0.1,
            bounds=[pb.SymbolBounds(symbol="NOPE", max_weight=0.3)],
            groups=[pb.WeightGroup(name="", symbols=["ZZZ"])],
            max_turnover=0.1,
            cvar_confidence=1.5,
            frontier_points=1,
            half_life=-3,
        ),
    )
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in info.field_violations}
    assert {
        "symbols",
        "objective",
        "min_weight",
        "bounds[0].symbol",
        "groups[0].name",
        "groups[0].symbols[0]",
        "groups[0]",
        "current_weights",
        "cvar_confidence",
        "frontier_points",
        "half_life",
    } <= fields, fields
    info = await error(
        analytics, request(objective=pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY, max_weight=0.3)
    )
    assert [v.field for v in info.field_violations] == ["max_weight"]
    assert "RISK_PARITY takes no constraint" in info.field_violations[0].description
    info = await error(analytics, request(symbols=["AAPL", "NOSUCH"]))
    assert info.code == grpc.StatusCode.NOT_FOUND and info.reason == "UNKNOWN_SYMBOL"
    info = await error(analytics, request(range=rng_pb("2015-01-01", "2015-01-09")))
    assert [v.field for v in info.field_violations] == ["range"]
    info = await error(analytics, request(evaluation_range=rng_pb("1980-01-01", "1981-01-01")))
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(v.field.startswith("evaluation_range") for v in info.field_violations), info


def test_no_solver_banner_on_stdout() -> None:
    """HiGHS writes its banner to descriptor 1 when a process builds its first solver; the
    service's stdout is JSON log lines, so a min-CVaR solve (HiGHS directly) and an LP
    through cvxpy's HIGHS interface in a fresh interpreter must print nothing there."""
    script = (
        "import numpy as np, cvxpy as cp\n"
        "from services.analytics import optimize as opt\n"
        "rng = np.random.default_rng(1)\n"
        "x = rng.normal(0, 0.01, size=(300, 3))\n"
        "spec = opt.Spec(symbols=('A', 'B', 'C'), objective='min_cvar', lower=np.zeros(3),\n"
        "                upper=np.ones(3), min_weight=0.0, max_weight=1.0)\n"
        "opt.optimize(spec, opt.estimate(x, 'sample', 'sample', 63.0, 252.0))\n"
        "w = cp.Variable(2)\n"
        "cp.Problem(cp.Minimize(w[0]), [w >= 0, cp.sum(w) == 1]).solve(solver='HIGHS')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
