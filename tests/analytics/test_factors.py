"""Factor exposure (services/analytics/factors.py, ComputeFactorExposure) vs statsmodels.

The oracle is statsmodels' OLS / RollingOLS on series built independently with pandas (an
inner join of the price columns, `pct_change`, the per-period risk-free rate subtracted
except from excess factors). Everything is compared to 1e-9 relative; a coefficient near
zero (a daily alpha of 1e-7, say) is compared to 1e-12 absolute as well, because no
double-precision solver, statsmodels' included, gets such a coefficient to 1e-9 of itself
(statsmodels' `inv` and `pinv` paths differ by ~1e-14 absolute there).
"""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from google.type import date_pb2
from statsmodels.regression.rolling import RollingOLS

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.common.errors import status_info
from services.analytics import factors as fx
from services.analytics import metrics as engine
from tests.analytics.conftest import Running
from tests.analytics.test_metrics_oracle import _read_wide

P = 252
RF = 0.03
RF_P = (1 + RF) ** (1 / P) - 1
REL = 1e-9
ABS = 1e-12


def close(ours: Any, ref: Any, rel: float = REL, abs_: float = ABS) -> None:
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=rel, atol=abs_)


# -- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    symbols, prices, dates = _read_wide("sp500_dataset.csv.gz")
    _, index, _ = _read_wide("sp500_index.csv.gz")
    frame = pd.DataFrame(prices, index=pd.DatetimeIndex(dates), columns=symbols)
    frame["SP500"] = index[:, 0]
    return frame


def oracle_frame(
    prices: pd.DataFrame, subject: str, factors: list[str], excess: frozenset[str] = frozenset()
) -> tuple[pd.Series, pd.DataFrame]:
    """Excess returns of the subject and the factors, independently of the engine."""
    joined = prices[[subject, *factors]].dropna(how="any")
    returns = joined.pct_change(fill_method=None).iloc[1:]
    y = returns[subject] - RF_P
    x = returns[factors].copy()
    for f in factors:
        if f not in excess:
            x[f] = x[f] - RF_P
    return y, x


def ours(
    prices: pd.DataFrame, subject: str, factors: list[str], **kwargs: Any
) -> fx.FactorExposure:
    return fx.factor_exposure(
        prices[subject].to_numpy(),
        prices[factors].to_numpy(),
        prices.index.to_numpy().astype("datetime64[D]"),
        factors,
        subject=subject,
        periods_per_year=P,
        risk_free=RF,
        **kwargs,
    )


def assert_matches(e: fx.FactorExposure, res: Any, *, rel: float = REL) -> None:
    params = np.asarray(res.params)
    close([e.alpha, *(f.loading for f in e.loadings)], params, rel)
    close([e.alpha_standard_error, *(f.standard_error for f in e.loadings)], res.bse, rel)
    close([e.alpha_t_stat, *(f.t_stat for f in e.loadings)], res.tvalues, rel, 1e-9)
    close(e.r_squared, res.rsquared, rel)
    close(e.adj_r_squared, res.rsquared_adj, rel)
    close(e.residual_volatility, math.sqrt(res.scale) * math.sqrt(P), rel)
    assert e.observations == int(res.nobs)
    close(e.alpha_annual, (1 + params[0]) ** P - 1, rel)


# -- the engine against statsmodels ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "factors", "start"),
    [
        ("AAPL", ["SP500", "MSFT", "JPM"], "2013-01-01"),
        ("XOM", ["SP500", "CVX", "KO", "PG", "WMT"], "1990-01-01"),
        ("JNJ", ["SP500"], "2008-01-01"),
    ],
)
def test_ols_matches_statsmodels_on_the_sample(
    sample: pd.DataFrame, subject: str, factors: list[str], start: str
) -> None:
    prices = sample.loc[start:]
    e = ours(prices, subject, factors)
    y, x = oracle_frame(prices, subject, factors)
    res = sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit()
    assert_matches(e, res)
    assert e.first_date == y.index[0].date() and e.last_date == y.index[-1].date()
    assert [f.factor for f in e.loadings] == factors
    assert e.standard_errors == "classic" and e.hac_lags == 0


@pytest.mark.parametrize("lags", [0, 1, 5, 21])
def test_hac_matches_statsmodels_newey_west(sample: pd.DataFrame, lags: int) -> None:
    prices = sample.loc["2012-01-01":"2021-12-31"]
    factors = ["SP500", "MSFT", "PEP"]
    e = ours(prices, "AAPL", factors, standard_errors="hac", hac_lags=lags)
    y, x = oracle_frame(prices, "AAPL", factors)
    used = lags or fx.newey_west_lags(len(y))
    assert e.hac_lags == used
    res = sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit(
        cov_type="HAC", cov_kwds={"maxlags": used}
    )
    assert_matches(e, res)


def test_newey_west_default_lags_are_statsmodels_rule() -> None:
    from statsmodels.stats.sandwich_covariance import S_hac_simple

    rng = np.random.default_rng(5)
    for n in (30, 252, 2520, 8000):
        scores = rng.normal(size=(n, 2))
        lags = fx.newey_west_lags(n)
        explicit = S_hac_simple(scores, nlags=lags)
        close(S_hac_simple(scores), explicit, 1e-15, 0.0)  # statsmodels' own default


@pytest.mark.parametrize("window", [21, 63, 252])
def test_rolling_matches_statsmodels_rolling_ols(sample: pd.DataFrame, window: int) -> None:
    prices = sample.loc["2012-01-01":"2022-12-31"]
    factors = ["SP500", "MSFT", "JPM", "XOM"]
    e = ours(prices, "AAPL", factors, rolling_window=window)
    y, x = oracle_frame(prices, "AAPL", factors)
    res = RollingOLS(y.to_numpy(), sm.add_constant(x.to_numpy()), window=window).fit()
    params = np.asarray(res.params)[window - 1 :]
    rolling = e.rolling
    assert rolling is not None and rolling.window == window
    assert rolling.dates == [d.date() for d in y.index[window - 1 :]]
    for i, f in enumerate(factors):
        close(rolling.loadings[f], params[:, i + 1])
    close(rolling.alpha_annual, (1 + params[:, 0]) ** P - 1)
    close(rolling.r_squared, np.asarray(res.rsquared)[window - 1 :])
    # The last window is a plain regression over the last `window` returns.
    tail = sm.OLS(y.to_numpy()[-window:], sm.add_constant(x.to_numpy()[-window:])).fit()
    close([rolling.loadings[f][-1] for f in factors], tail.params[1:])


def test_rolling_blocks_give_the_same_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.01, (400, 3))
    y = x @ [0.5, 1.0, -0.2] + rng.normal(0, 0.01, 400)
    whole = fx.rolling_ols(y, x, 50)
    monkeypatch.setattr(fx, "_ROLLING_BLOCK_VALUES", 50 * 4 * 7)  # 7 windows per block
    blocks = fx.rolling_ols(y, x, 50)
    np.testing.assert_array_equal(whole.params, blocks.params)
    np.testing.assert_array_equal(whole.rsquared, blocks.rsquared)


def test_one_factor_is_compute_metrics_beta_and_alpha(sample: pd.DataFrame) -> None:
    prices = sample.loc["2010-01-01":]
    e = ours(prices, "KO", ["SP500"])
    m = engine.compute_metrics(
        prices[["KO"]].to_numpy(),
        prices.index.to_numpy().astype("datetime64[D]"),
        ["KO"],
        benchmark=prices["SP500"].to_numpy(),
        periods_per_year=P,
        risk_free=RF,
    )["KO"]
    assert m.relative is not None
    close(e.loadings[0].loading, m.relative.beta)
    close(e.alpha_annual, m.relative.alpha)
    assert e.observations == m.relative.n_common


def test_an_excess_factor_is_not_risk_free_adjusted(sample: pd.DataFrame) -> None:
    prices = sample.loc["2015-01-01":].copy()
    # A long-short "factor" as an index: MSFT minus KO daily, cumulated.
    spread = prices["MSFT"].pct_change() - prices["KO"].pct_change()
    prices["LS"] = 100 * (1 + spread.fillna(0)).cumprod()
    factors = ["SP500", "LS"]
    e = ours(prices, "AAPL", factors, excess=[False, True])
    y, x = oracle_frame(prices, "AAPL", factors, excess=frozenset({"LS"}))
    assert_matches(e, sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit())
    assert [f.excess for f in e.loadings] == [False, True]
    # Flagging it changes the alpha by loading * rf_p, nothing else.
    plain = ours(prices, "AAPL", factors)
    close([f.loading for f in plain.loadings], [f.loading for f in e.loadings], 1e-9)
    close(plain.alpha - e.alpha, e.loadings[1].loading * RF_P, 1e-6)


# -- synthetic edge cases --------------------------------------------------------------------------


def _days(n: int) -> np.ndarray:
    return np.datetime64("2020-01-01") + np.arange(n)


def _prices(returns: np.ndarray) -> np.ndarray:
    """Prices (100 before the first return) whose simple returns are `returns` (rows)."""
    growth = np.cumprod(1 + returns, axis=0)
    return 100 * np.concatenate([np.ones((1, *returns.shape[1:])), growth])


def test_an_exact_linear_combination_is_recovered() -> None:
    rng = np.random.default_rng(11)
    f = rng.normal(0.0004, 0.012, (500, 2))
    alpha, betas = 0.0003, np.array([0.7, -1.3])
    # The subject's *excess* return is alpha + betas . (f - rf_p), exactly.
    r = RF_P + alpha + (f - RF_P) @ betas
    prices = _prices(np.column_stack([r, f]))
    e = fx.factor_exposure(
        prices[:, 0], prices[:, 1:], _days(501), ["F1", "F2"], periods_per_year=P, risk_free=RF
    )
    close([fl.loading for fl in e.loadings], betas, 1e-10, 1e-12)
    close(e.alpha, alpha, 1e-8, 1e-14)
    assert e.r_squared == pytest.approx(1.0, abs=1e-12)
    assert e.residual_volatility < 1e-12
    assert e.observations == 500


def test_missing_days_in_one_factor_shrink_the_common_window() -> None:
    rng = np.random.default_rng(12)
    n = 300
    f = rng.normal(0.0, 0.01, (n, 2))
    r = 0.8 * f[:, 0] + 0.3 * f[:, 1] + rng.normal(0, 0.005, n)
    prices = _prices(np.column_stack([r, f]))
    missing = [5, 6, 40, 299]  # F2 has no price on these rows (a two-day gap among them)
    prices[missing, 2] = np.nan
    frame = pd.DataFrame(prices, index=pd.DatetimeIndex(_days(n + 1)), columns=["S", "F1", "F2"])
    e = fx.factor_exposure(
        prices[:, 0], prices[:, 1:], _days(n + 1), ["F1", "F2"], periods_per_year=P, risk_free=RF
    )
    assert e.observations == n - len(missing)  # n + 1 - 4 common prices
    y, x = oracle_frame(frame, "S", ["F1", "F2"])
    assert_matches(e, sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit())
    # The return across F2's gap spans the same two days for the subject and both factors.
    row = list(y.index).index(pd.Timestamp(_days(n + 1)[7]))
    close(y.iloc[row] + RF_P, prices[7, 0] / prices[4, 0] - 1, 1e-14)


def test_a_factor_with_a_shorter_history_sets_the_start(sample: pd.DataFrame) -> None:
    prices = sample.loc["2000-01-01":"2004-12-31"].copy()
    prices.loc[:"2002-06-30", "MSFT"] = np.nan
    e = ours(prices, "AAPL", ["SP500", "MSFT"])
    first_price = prices["MSFT"].first_valid_index()
    later = prices.index[prices.index > first_price][0]
    assert e.first_date == later.date()
    y, x = oracle_frame(prices, "AAPL", ["SP500", "MSFT"])
    assert_matches(e, sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit())


def test_collinear_factors_are_named() -> None:
    rng = np.random.default_rng(13)
    f = rng.normal(0.0, 0.01, (200, 3))
    combo = 0.5 * f[:, 0] - 2.0 * f[:, 1]  # C = 0.5 A - 2 B (in returns, plus noise 0)
    r = rng.normal(0, 0.01, 200)
    prices = _prices(np.column_stack([r, f, combo]))
    names = ["A", "B", "D", "C"]
    with pytest.raises(fx.CollinearFactorsError) as err:
        fx.factor_exposure(prices[:, 0], prices[:, 1:], _days(201), names)
    assert err.value.factors == ["A", "B", "C"]
    assert "A, B, C" in err.value.message


def test_a_constant_factor_is_collinear_with_the_intercept() -> None:
    rng = np.random.default_rng(14)
    prices = _prices(rng.normal(0, 0.01, (100, 2)))
    flat = np.full((101, 1), 50.0)
    with pytest.raises(fx.CollinearFactorsError) as err:
        fx.factor_exposure(prices[:, 0], np.hstack([prices[:, 1:], flat]), _days(101), ["A", "Z"])
    assert err.value.factors == ["Z"]
    assert "constant" in err.value.message


def test_near_collinear_but_identified_factors_pass() -> None:
    rng = np.random.default_rng(15)
    f = rng.normal(0.0, 0.01, (1000, 2))
    f[:, 1] = f[:, 0] + rng.normal(0, 1e-5, 1000)  # correlation 0.999999
    r = f[:, 0] + rng.normal(0, 0.01, 1000)
    prices = _prices(np.column_stack([r, f]))
    e = fx.factor_exposure(prices[:, 0], prices[:, 1:], _days(1001), ["A", "B"])
    frame = pd.DataFrame(prices, index=pd.DatetimeIndex(_days(1001)), columns=["S", "A", "B"])
    joined = frame.pct_change().iloc[1:]
    res = sm.OLS(joined["S"].to_numpy(), sm.add_constant(joined[["A", "B"]].to_numpy())).fit()
    close([f.loading for f in e.loadings], res.params[1:], 1e-7)  # cond ~1e3 x noisier


def test_rolling_windows_with_a_flat_factor_are_undefined() -> None:
    rng = np.random.default_rng(16)
    f = rng.normal(0.0, 0.01, (120, 2))
    f[30:70, 1] = 0.0  # B does not move for 40 days
    r = f @ [1.0, 0.5] + rng.normal(0, 0.002, 120)
    fit = fx.rolling_ols(r, f, 20)
    flat = (fit.end_rows >= 49) & (fit.end_rows <= 69)  # windows inside rows 30..69
    assert np.isnan(fit.params[flat]).all() and np.isnan(fit.rsquared[flat]).all()
    assert np.isfinite(fit.params[~flat]).all()


def test_too_few_observations_and_bad_windows_name_their_field() -> None:
    rng = np.random.default_rng(17)
    prices = _prices(rng.normal(0, 0.01, (4, 4)))
    with pytest.raises(fx.FactorInputError) as err:
        fx.factor_exposure(prices[:, 0], prices[:, 1:], _days(5), ["A", "B", "C"])
    assert err.value.field == "range"
    assert "4 common returns" in err.value.message and "at least 5" in err.value.message
    prices = _prices(rng.normal(0, 0.01, (30, 2)))
    for window in (2, 31):
        with pytest.raises(fx.FactorInputError) as err:
            fx.factor_exposure(prices[:, 0], prices[:, 1:], _days(31), ["A"], rolling_window=window)
        assert err.value.field == "rolling_window"


def test_a_portfolio_subject_regresses_its_valued_returns(sample: pd.DataFrame) -> None:
    prices = sample.loc["2016-01-01":"2020-12-31"]
    holdings = ["AAPL", "KO", "XOM"]
    weights = np.array([0.5, 0.3, 0.2])
    days = prices.index.to_numpy().astype("datetime64[D]")
    columns = [*holdings, "SP500", "MSFT"]
    subject = fx.PortfolioSubject(tuple(holdings), tuple(weights.tolist()), "monthly", False)
    e = fx.exposure_from_matrix(
        prices[columns].to_numpy(), days, columns, subject, ["SP500", "MSFT"],
        periods_per_year=P, risk_free=RF,
    )  # fmt: skip
    port = engine.portfolio_returns(prices[holdings].to_numpy(), days, weights, "monthly")
    returns = pd.DataFrame(
        {"P": port, "SP500": prices["SP500"].pct_change(), "MSFT": prices["MSFT"].pct_change()},
        index=prices.index,
    ).iloc[1:]
    res = sm.OLS(
        returns["P"].to_numpy() - RF_P,
        sm.add_constant(returns[["SP500", "MSFT"]].to_numpy() - RF_P),
    ).fit()
    assert e.subject == "portfolio"
    assert_matches(e, res)


# -- over gRPC -----------------------------------------------------------------------------------------


def d(text: str) -> date_pb2.Date:
    y, m, day = (int(x) for x in text.split("-"))
    return date_pb2.Date(year=y, month=m, day=day)


def factor_request(subject: str, *factors: str, **kwargs: Any) -> pb.ComputeFactorExposureRequest:
    return pb.ComputeFactorExposureRequest(
        symbol=subject, factors=[pb.Factor(symbol=f) for f in factors], **kwargs
    )


async def test_the_rpc_equals_the_engine_and_statsmodels(
    analytics: Running, sample: pd.DataFrame
) -> None:
    request = factor_request("AAPL", "SP500", "MSFT", "JPM", risk_free_rate=RF, rolling_window=63)
    request.range.start.CopyFrom(d("2013-01-01"))
    reply = await analytics.stub.ComputeFactorExposure(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    prices = sample.loc["2013-01-01":]
    factors = ["SP500", "MSFT", "JPM"]
    want = ours(prices, "AAPL", factors, rolling_window=63)
    assert reply.subject == "AAPL"
    assert [f.factor for f in reply.loadings] == factors
    assert [f.loading for f in reply.loadings] == [f.loading for f in want.loadings]
    assert [f.t_stat for f in reply.loadings] == [f.t_stat for f in want.loadings]
    assert (reply.alpha, reply.alpha_annualized, reply.alpha_t_stat) == (
        want.alpha,
        want.alpha_annual,
        want.alpha_t_stat,
    )
    assert (reply.r_squared, reply.adj_r_squared, reply.residual_volatility) == (
        want.r_squared,
        want.adj_r_squared,
        want.residual_volatility,
    )
    y, x = oracle_frame(prices, "AAPL", factors)
    res = sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit()
    close([reply.alpha, *(f.loading for f in reply.loadings)], res.params)
    close([f.standard_error for f in reply.loadings], res.bse[1:])
    assert reply.observations == len(y)
    first, last = y.index[0].date(), y.index[-1].date()
    assert reply.first_date == d(first.isoformat()) and reply.last_date == d(last.isoformat())
    assert reply.standard_errors == pb.STANDARD_ERROR_TYPE_CLASSIC
    assert reply.rolling_window == 63
    assert [r.factor for r in reply.rolling_loadings] == factors
    assert len(reply.rolling_alpha) == len(reply.rolling_r_squared) == len(y) - 62
    assert [p.value for p in reply.rolling_loadings[1].points] == want.rolling.loadings["MSFT"]  # type: ignore[union-attr]
    c = reply.conventions
    assert (c.periods_per_year, c.risk_free_rate_annual) == (252, RF)
    assert "every factor have a price" in c.returns_rule and "statsmodels" in c.reference
    assert reply.data_version >= 1
    again = await analytics.stub.ComputeFactorExposure(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    assert again == reply


async def test_the_rpc_with_hac_and_a_portfolio(analytics: Running) -> None:
    request = pb.ComputeFactorExposureRequest(
        portfolio=pb.FactorPortfolio(
            holdings=[pb.Holding(symbol="AAPL", weight=0.6), pb.Holding(symbol="KO", weight=0.4)],
            rebalance=pb.REBALANCE_QUARTERLY,
        ),
        factors=[pb.Factor(symbol="MSFT"), pb.Factor(symbol="^GSPC")],
        standard_errors=pb.STANDARD_ERROR_TYPE_HAC,
        hac_lags=4,
    )
    request.range.start.CopyFrom(d("2015-01-01"))
    reply = await analytics.stub.ComputeFactorExposure(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    assert reply.subject == "portfolio"
    assert reply.standard_errors == pb.STANDARD_ERROR_TYPE_HAC and reply.hac_lags == 4
    # ^GSPC ends on 2018-12-31: the common window ends there.
    assert reply.last_date == d("2018-12-31")
    assert 0.0 < reply.r_squared < 1.0 and reply.observations > 900
    # SP500 (the index of the wide sample file) and ^GSPC are the same series.
    request.factors.append(pb.Factor(symbol="SP500"))
    info = await _error(analytics, request)
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.metadata["factors"] == "^GSPC,SP500"


async def _error(analytics: Running, request: pb.ComputeFactorExposureRequest) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.ComputeFactorExposure(
            request, metadata=analytics.keys.md(analytics.keys.reader_a)
        )
    return status_info(err.value)


async def test_bad_requests_name_their_fields(analytics: Running) -> None:
    cases: list[tuple[pb.ComputeFactorExposureRequest, str]] = [
        (factor_request("AAPL"), "factors"),
        (factor_request("", "SP500"), "symbol"),
        (factor_request("AAPL", "SP500", "SP500"), "factors[1].symbol"),
        (factor_request("AAPL", "MSFT", "AAPL"), "factors[1].symbol"),
        (factor_request("AAPL", "SP500", rolling_window=2), "rolling_window"),
        (factor_request("AAPL", "SP500", hac_lags=-1), "hac_lags"),
        (factor_request("AAPL", "SP500", standard_errors=7), "standard_errors"),  # type: ignore[arg-type]
        (factor_request("AAPL", *(f"F{i}" for i in range(21))), "factors"),
        (
            pb.ComputeFactorExposureRequest(
                portfolio=pb.FactorPortfolio(holdings=[pb.Holding(symbol="AAPL", weight=0.5)]),
                factors=[pb.Factor(symbol="SP500")],
            ),
            "portfolio.holdings",
        ),
    ]
    for request, field in cases:
        info = await _error(analytics, request)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT, (field, info)
        assert field in [v.field for v in info.field_violations], (field, info.field_violations)


async def test_data_errors_over_grpc(analytics: Running) -> None:
    # Too few common returns for the factors in the range.
    request = factor_request("AAPL", "SP500", "MSFT", "JPM")
    request.range.start.CopyFrom(d("2020-01-02"))
    request.range.end.CopyFrom(d("2020-01-07"))
    info = await _error(analytics, request)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["range"]
    assert "at least 5" in info.field_violations[0].description
    # A rolling window longer than the common returns.
    request = factor_request("AAPL", "SP500", rolling_window=100)
    request.range.start.CopyFrom(d("2020-01-01"))
    request.range.end.CopyFrom(d("2020-03-31"))
    info = await _error(analytics, request)
    assert [v.field for v in info.field_violations] == ["rolling_window"]
    # Unknown factor.
    info = await _error(analytics, factor_request("AAPL", "NOPE"))
    assert info.code == grpc.StatusCode.NOT_FOUND and info.metadata["symbols"] == "NOPE"


async def test_collinear_factors_fail_the_precondition(analytics: Running) -> None:
    from tests.analytics.conftest import series

    rng = np.random.default_rng(21)
    start = date(2021, 1, 4)
    days = [(start + timedelta(days=i)).isoformat() for i in range(80)]
    walk = 100 * np.cumprod(1 + rng.normal(0, 0.01, (80, 2)), axis=0)

    def rows(p: np.ndarray) -> list[tuple[str, float, float, float, float, float, int]]:
        return [(dy, x, x + 1, x - 1, x, x, 10) for dy, x in zip(days, np.round(p, 4), strict=True)]

    bars = [
        series("FXS", rows(walk[:, 0])),
        series("FXA", rows(walk[:, 1])),
        series("FXB", rows(walk[:, 1])),  # the same series as FXA
        series("FXF", rows(np.full(80, 42.0))),  # never moves
    ]

    async def stream() -> Any:
        yield pb.IngestBarsRequest(series=bars)

    await analytics.stub.IngestBars(stream(), metadata=analytics.keys.md(analytics.keys.writer_a))
    for factors, named in ((["FXA", "FXB"], "FXA,FXB"), (["FXA", "FXF"], "FXF")):
        info = await _error(analytics, factor_request("FXS", *factors))
        assert info.code == grpc.StatusCode.FAILED_PRECONDITION, info
        assert info.reason == "COLLINEAR_FACTORS" and info.metadata["factors"] == named
