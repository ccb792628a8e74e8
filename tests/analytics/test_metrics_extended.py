"""The extended metric set vs independent implementations (issue 16, part 1).

Oracles, each independent of the vectorised engine:

* empyrical (empyrical-reloaded): ``omega_ratio``, ``tail_ratio``,
  ``stability_of_timeseries``, ``up_capture`` / ``down_capture`` /
  ``up_down_capture`` / ``capture``, ``beta`` (for Treynor), and the rolling
  ``roll_sortino_ratio``, ``roll_excess_sharpe``, ``roll_down_capture``;
* QuantStats where empyrical has nothing: ``win_rate``, ``best`` / ``worst``
  with ``aggregate="ME"`` / ``"YE"`` (calendar months / years), the parametric
  ``conditional_value_at_risk``, ``omega`` and ``tail_ratio`` as a second opinion;
* SciPy: Cornish-Fisher quantiles from ``scipy.stats.norm`` / ``skew`` /
  ``kurtosis``, and the Cornish-Fisher CVaR as a numerical integral
  (``scipy.integrate.quad``) of the expanded quantile over the tail.

Everything to 1e-9 relative on every sample symbol (20 S&P stocks + the index
1990-2022) and on synthetic edge cases: constant prices, one bad day, missing
days (gaps inside and across months), a benchmark with a shorter history.
Where the libraries answer differently from our written convention (an
undefined ratio is NaN, never 0 or inf) the test says so next to the check.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from datetime import date

import empyrical as ep
import grpc
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from scipy import integrate

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.common.errors import status_info
from services.analytics import market
from services.analytics import metrics as m
from tests.analytics.conftest import Running
from tests.analytics.test_metrics_oracle import _compressed_returns, _read_wide
from tests.analytics.test_service_metrics import columns

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import quantstats as qs

REL = 1e-9
P = 252
RF_ANNUAL = 0.03
RF_P = (1 + RF_ANNUAL) ** (1 / P) - 1


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    symbols, prices, dates = _read_wide("sp500_dataset.csv.gz")
    _, index, _ = _read_wide("sp500_index.csv.gz")
    return symbols, prices, dates, index[:, 0]


@pytest.fixture(scope="module")
def results(sample) -> dict[str, m.SymbolMetrics]:
    symbols, prices, dates, bench = sample
    return m.compute_metrics(
        prices, dates, symbols, benchmark=bench, periods_per_year=P, risk_free=RF_ANNUAL
    )


def _days(n: int, start: str = "2024-01-01") -> np.ndarray:
    return np.busday_offset(np.datetime64(start), np.arange(n), roll="forward").astype(
        "datetime64[D]"
    )


# ---------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------


def _agree(ours: float, ref: float, rel: float = REL) -> bool:
    if math.isnan(ref) or math.isnan(ours):
        return math.isnan(ref) and math.isnan(ours)
    return math.isclose(ours, ref, rel_tol=rel, abs_tol=1e-15)


def _mismatches(pairs: dict[str, tuple[float, float]]) -> list[str]:
    return [f"{k}: ours={a!r} oracle={b!r}" for k, (a, b) in pairs.items() if not _agree(a, b)]


def _series(r: np.ndarray, days: np.ndarray) -> pd.Series:
    return pd.Series(r, index=pd.DatetimeIndex(days.astype("datetime64[ns]")))


def _cf_quantile(z: float, s: float, k: float) -> float:
    return z + (z * z - 1) * s / 6 + (z**3 - 3 * z) * k / 24 - (2 * z**3 - 5 * z) * s * s / 36


def _cf_oracle(r: np.ndarray, q: float) -> tuple[float, float]:
    """Cornish-Fisher VaR (scipy quantile and moments) and CVaR as the integral
    (1/q) int_0^q VaR(u) du, done numerically in z = Phi^-1(u)."""
    mean, sd = float(np.mean(r)), float(np.std(r, ddof=1))
    s, k = float(st.skew(r)), float(st.kurtosis(r))
    z = float(st.norm.ppf(q))
    var = mean + _cf_quantile(z, s, k) * sd
    if math.isnan(s) or math.isnan(k):
        return var, math.nan
    tail, _ = integrate.quad(
        lambda u: _cf_quantile(u, s, k) * st.norm.pdf(u), -np.inf, z, epsabs=0, epsrel=1e-13
    )
    return var, mean + sd * tail / q


def _univariate_oracle(
    r: np.ndarray, days: np.ndarray, threshold_annual: float | None = None
) -> dict[str, float]:
    """The extended figures of one symbol from its returns ``r`` dated ``days``."""
    ser = _series(r, days)
    if threshold_annual is None:
        omega = ep.omega_ratio(r, risk_free=RF_P, required_return=0.0, annualization=P)
    else:  # a given threshold replaces the risk-free rate
        omega = ep.omega_ratio(r, risk_free=0.0, required_return=threshold_annual, annualization=P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tail = ep.tail_ratio(r)
        out = {
            "omega": omega,
            # empyrical divides by zero (inf / nan) where our convention says NaN.
            "tail_ratio": tail if math.isfinite(tail) else math.nan,
            "stability": ep.stability_of_timeseries(r),
            "win_rate": qs.stats.win_rate(ser, prepare_returns=False),
            "parametric_cvar_95": qs.stats.conditional_value_at_risk(
                ser, confidence=0.95, prepare_returns=False
            ),
            "parametric_cvar_99": qs.stats.conditional_value_at_risk(
                ser, confidence=0.99, prepare_returns=False
            ),
            "best_month": qs.stats.best(ser, aggregate="ME", prepare_returns=False),
            "worst_month": qs.stats.worst(ser, aggregate="ME", prepare_returns=False),
            "best_year": qs.stats.best(ser, aggregate="YE", prepare_returns=False),
            "worst_year": qs.stats.worst(ser, aggregate="YE", prepare_returns=False),
        }
    for q, label in ((0.05, "95"), (0.01, "99")):
        out[f"cornish_fisher_var_{label}"], out[f"cornish_fisher_cvar_{label}"] = _cf_oracle(r, q)
    return out


def _univariate_ours(res: m.SymbolMetrics) -> dict[str, float]:
    assert res.best_month and res.worst_month and res.best_year and res.worst_year
    return {
        "omega": res.omega,
        "tail_ratio": res.tail_ratio,
        "stability": res.stability,
        "win_rate": res.win_rate,
        "parametric_cvar_95": res.parametric_cvar_95,
        "parametric_cvar_99": res.parametric_cvar_99,
        "best_month": res.best_month.value,
        "worst_month": res.worst_month.value,
        "best_year": res.best_year.value,
        "worst_year": res.worst_year.value,
        "cornish_fisher_var_95": res.cornish_fisher_var_95,
        "cornish_fisher_cvar_95": res.cornish_fisher_cvar_95,
        "cornish_fisher_var_99": res.cornish_fisher_var_99,
        "cornish_fisher_cvar_99": res.cornish_fisher_cvar_99,
    }


def _relative_oracle(r: np.ndarray, b: np.ndarray, period: str = "daily") -> dict[str, float]:
    """r and b aligned row by row, NaN where either has no return (empyrical pairs them)."""
    joint = ~np.isnan(r) & ~np.isnan(b)
    ppy = {"daily": 252, "weekly": 52}[period]
    rf_p = (1 + RF_ANNUAL) ** (1 / ppy) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "up_capture": ep.up_capture(r, b, period=period),
            "down_capture": ep.down_capture(r, b, period=period),
            "capture_ratio": ep.up_down_capture(r, b, period=period),
            "total_capture": ep.capture(r[joint], b[joint], period=period),
            "treynor": float(np.mean(r[joint] - rf_p)) * ppy / ep.beta(r, b, risk_free=rf_p),
        }
    return {k: (v if math.isfinite(v) else math.nan) for k, v in out.items()}


def _relative_ours(res: m.SymbolMetrics) -> dict[str, float]:
    rel = res.relative
    assert rel is not None
    return {
        "up_capture": rel.up_capture,
        "down_capture": rel.down_capture,
        "capture_ratio": rel.capture_ratio,
        "total_capture": rel.total_capture,
        "treynor": rel.treynor,
    }


def _pairs(ours: dict[str, float], ref: dict[str, float]) -> dict[str, tuple[float, float]]:
    assert ours.keys() == ref.keys()
    return {k: (float(ours[k]), float(ref[k])) for k in ours}


def _period_oracle(r: np.ndarray, days: np.ndarray, freq: str) -> dict[str, tuple]:
    """Best / worst calendar period by pandas (first on ties) with its bounds and count."""
    ser = _series(r, days)
    key = [ser.index.year, ser.index.month] if freq == "M" else [ser.index.year]
    grouped = ser.groupby(key)
    compounded = grouped.apply(lambda x: float(np.prod(1 + x.to_numpy()) - 1))
    counts = grouped.size()
    out = {}
    for label, pick in (("best", compounded.idxmax()), ("worst", compounded.idxmin())):
        if freq == "M":
            year, month = pick
            start = date(int(year), int(month), 1)
            end = (pd.Timestamp(start) + pd.offsets.MonthEnd(0)).date()
        else:
            start, end = date(int(pick), 1, 1), date(int(pick), 12, 31)
        out[label] = (float(compounded[pick]), start, end, int(counts[pick]))
    return out


def _assert_periods(res: m.SymbolMetrics, r: np.ndarray, days: np.ndarray) -> None:
    for freq, best, worst in (
        ("M", res.best_month, res.worst_month),
        ("Y", res.best_year, res.worst_year),
    ):
        oracle = _period_oracle(r, days, freq)
        for label, got in (("best", best), ("worst", worst)):
            assert got is not None
            value, start, end, count = oracle[label]
            assert _agree(got.value, value), (freq, label, got, value)
            assert (got.period_start, got.period_end, got.n_returns) == (start, end, count)


# ---------------------------------------------------------------------------
# The sample: every symbol, every figure
# ---------------------------------------------------------------------------

SYMBOLS = ["AAPL", "AMD", "BAC", "BBY", "CVX", "GE", "HD", "JNJ", "JPM", "KO",
           "LLY", "MRK", "MSFT", "PEP", "PFE", "PG", "RRC", "UNH", "WMT", "XOM"]  # fmt: skip


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_extended_figures_match_the_oracles_on_the_sample(sample, results, symbol: str) -> None:
    symbols, prices, dates, bench = sample
    col = symbols.index(symbol)
    r = prices[1:, col] / prices[:-1, col] - 1.0
    b = bench[1:] / bench[:-1] - 1.0
    res = results[symbol]
    pairs = _pairs(_univariate_ours(res), _univariate_oracle(r, dates[1:]))
    pairs |= _pairs(_relative_ours(res), _relative_oracle(r, b))
    assert _mismatches(pairs) == []
    _assert_periods(res, r, dates[1:])


def test_libraries_agree_where_they_overlap(sample, results) -> None:
    """QuantStats' omega (annual rf) and tail ratio equal empyrical's, hence ours."""
    symbols, prices, dates, _ = sample
    for col in (0, 5, 16):
        r = prices[1:, col] / prices[:-1, col] - 1.0
        ser = _series(r, dates[1:])
        res = results[symbols[col]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qs_omega = qs.stats.omega(ser, rf=RF_ANNUAL, required_return=0.0, periods=P)
            qs_tail = qs.stats.tail_ratio(ser, prepare_returns=False)
        assert _agree(res.omega, float(qs_omega))
        assert _agree(res.tail_ratio, float(qs_tail))
        # positive_share keeps zero returns in the denominator, win_rate does not.
        assert res.win_rate == np.count_nonzero(r > 0) / np.count_nonzero(r)
        assert res.positive_share == np.count_nonzero(r > 0) / r.size


def test_skew_and_kurtosis_are_population_moments_as_scipy(sample, results) -> None:
    """Conventions check: scipy.stats defaults (bias=True), not pandas' corrected ones."""
    symbols, prices, _, _ = sample
    for col, name in enumerate(symbols):
        r = prices[1:, col] / prices[:-1, col] - 1.0
        got = results[name]
        assert _agree(got.skew, float(st.skew(r, bias=True)))
        assert _agree(got.kurtosis, float(st.kurtosis(r, fisher=True, bias=True)))
        # ... and they differ from the bias-corrected estimators QuantStats reports.
        assert not _agree(got.kurtosis, float(pd.Series(r).kurt()), rel=1e-6)


def test_a_given_omega_threshold_replaces_the_risk_free_rate(sample) -> None:
    symbols, prices, dates, _ = sample
    res = m.compute_metrics(
        prices[:, :4], dates, symbols[:4], risk_free=RF_ANNUAL, omega_threshold=0.08
    )
    for col in range(4):
        r = prices[1:, col] / prices[:-1, col] - 1.0
        assert _agree(
            res[symbols[col]].omega,
            ep.omega_ratio(r, risk_free=0.0, required_return=0.08, annualization=P),
        )
    assert m.omega_threshold_per_period(None, RF_ANNUAL, P) == pytest.approx(RF_P, rel=1e-15)
    assert m.omega_threshold_per_period(0.0, RF_ANNUAL, P) == 0.0
    with pytest.raises(m.MetricsInputError) as err:
        m.compute_metrics(prices[:, :1], dates, symbols[:1], omega_threshold=-1.0)
    assert err.value.field == "omega_threshold"


def test_weekly_periods_annualise_with_their_own_p(sample) -> None:
    symbols, prices, dates, bench = sample
    weekly, weekly_dates, weekly_bench = prices[::5], dates[::5], bench[::5]
    res = m.compute_metrics(
        weekly, weekly_dates, symbols, benchmark=weekly_bench, periods_per_year=52,
        risk_free=RF_ANNUAL,
    )  # fmt: skip
    for col in (0, 9, 19):
        r = weekly[1:, col] / weekly[:-1, col] - 1.0
        b = weekly_bench[1:] / weekly_bench[:-1] - 1.0
        got = res[symbols[col]]
        assert _mismatches(_pairs(_relative_ours(got), _relative_oracle(r, b, "weekly"))) == []
        rf_w = (1 + RF_ANNUAL) ** (1 / 52) - 1
        assert _agree(got.omega, ep.omega_ratio(r, risk_free=rf_w, annualization=52))
        _assert_periods(got, r, weekly_dates[1:])


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gapped(sample):
    symbols, prices, dates, bench = sample
    cols = [symbols.index(s) for s in ("AAPL", "GE", "XOM")]
    out = prices[:, cols].copy()
    out[:250, 0] = np.nan  # listed a year later
    out[4000:4010, 0] = np.nan  # a 10-day suspension
    out[2015:2040, 1] = np.nan  # a month-long gap: a return spans two months
    rng = np.random.default_rng(11)
    out[rng.choice(np.arange(1, 8313), 400, replace=False), 1] = np.nan
    out[-30:, 2] = np.nan  # delisted early
    gapped_bench = bench.copy()
    gapped_bench[[100, 3000, 3001, 6000]] = np.nan
    return ["AAPL", "GE", "XOM"], out, dates, gapped_bench


def test_missing_days_match_the_oracles_on_the_same_returns(gapped) -> None:
    names, prices, dates, bench = gapped
    res = m.compute_metrics(
        prices, dates, names, benchmark=bench, periods_per_year=P, risk_free=RF_ANNUAL
    )
    b, b_rows = _compressed_returns(bench)
    b_full = np.full(dates.size, np.nan)
    b_full[b_rows] = b
    for col, name in enumerate(names):
        r, rows = _compressed_returns(prices[:, col])
        r_full = np.full(dates.size, np.nan)
        r_full[rows] = r
        got = res[name]
        pairs = _pairs(_univariate_ours(got), _univariate_oracle(r, dates[rows]))
        pairs |= _pairs(_relative_ours(got), _relative_oracle(r_full, b_full))
        assert _mismatches(pairs) == [], name
        _assert_periods(got, r, dates[rows])


def test_masked_path_agrees_with_dense_path_on_the_extended_set(sample) -> None:
    symbols, prices, dates, bench = sample
    dense = m.compute_metrics(prices[:, :3], dates, symbols[:3], benchmark=bench)
    with_gap = prices[:, :4].copy()
    with_gap[100:110, 3] = np.nan  # switches every symbol to the masked arithmetic
    masked = m.compute_metrics(with_gap, dates, symbols[:4], benchmark=bench)
    for name in symbols[:3]:
        a, b = _univariate_ours(dense[name]), _univariate_ours(masked[name])
        a |= _relative_ours(dense[name])
        b |= _relative_ours(masked[name])
        assert _mismatches({k: (a[k], b[k]) for k in a}) == [], name
        assert dense[name].best_month == masked[name].best_month


def test_constant_prices_are_undefined_not_zero_or_infinite() -> None:
    days = _days(60)
    res = m.compute_metrics(np.full(60, 100.0), days, ["FLAT"])["FLAT"]
    r = np.zeros(59)
    # Every ratio over a zero denominator is NaN: so are empyrical's omega, tail ratio
    # (0/0) and stability (scipy's linregress of a constant y); QuantStats' win_rate says
    # 0.0 without non-zero returns, ours NaN.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(res.omega) and math.isnan(ep.omega_ratio(r, annualization=P))
        assert math.isnan(res.tail_ratio) and math.isnan(ep.tail_ratio(r))
        assert math.isnan(res.stability) and math.isnan(ep.stability_of_timeseries(r))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert qs.stats.win_rate(_series(r, days[1:]), prepare_returns=False) == 0.0
    assert math.isnan(res.win_rate)
    # No dispersion: the Gaussian tail is the mean (as QuantStats says); the Cornish-Fisher
    # expansion needs skew and kurtosis, which are undefined (scipy: NaN).
    assert res.parametric_cvar_95 == 0.0
    assert math.isnan(res.cornish_fisher_var_95) and math.isnan(res.cornish_fisher_cvar_99)
    assert res.best_month == m.PeriodReturn(0.0, date(2024, 1, 1), date(2024, 1, 31), 22)
    assert res.worst_year is not None and res.worst_year.value == 0.0
    # Against a flat benchmark: beta, Treynor and every capture are undefined.
    rel = m.compute_metrics(np.linspace(100, 120, 60), days, ["UP"], benchmark=np.full(60, 50.0))[
        "UP"
    ].relative
    assert rel is not None
    assert all(
        math.isnan(x) for x in (rel.treynor, rel.up_capture, rel.down_capture, rel.capture_ratio)
    )
    assert math.isnan(rel.total_capture)  # ann(b) = 0


def test_one_bad_day() -> None:
    """A calm series with one -30% day: tails, moments and captures all move, and
    still equal the oracles."""
    n = 760
    rng = np.random.default_rng(3)
    days = _days(n)
    b = rng.normal(0.0004, 0.008, n - 1)
    r = 0.9 * b + rng.normal(0.0002, 0.004, n - 1)
    r[400] = -0.30
    prices = 100 * np.concatenate([[1.0], np.cumprod(1 + r)])
    bench = 1000 * np.concatenate([[1.0], np.cumprod(1 + b)])
    got = m.compute_metrics(
        prices, days, ["X"], benchmark=bench, periods_per_year=P, risk_free=RF_ANNUAL
    )["X"]
    r_back = prices[1:] / prices[:-1] - 1
    b_back = bench[1:] / bench[:-1] - 1
    pairs = _pairs(_univariate_ours(got), _univariate_oracle(r_back, days[1:]))
    pairs |= _pairs(_relative_ours(got), _relative_oracle(r_back, b_back))
    assert _mismatches(pairs) == []
    assert got.worst_month is not None
    assert got.worst_month.period_start <= m._to_date(days[401]) <= got.worst_month.period_end
    assert got.cornish_fisher_cvar_99 < got.cornish_fisher_var_99 < 0


def test_a_benchmark_with_a_shorter_history(sample) -> None:
    symbols, prices, dates, bench = sample
    short = bench.copy()
    short[:3000] = np.nan  # starts late ...
    short[-400:] = np.nan  # ... and ends early
    res = m.compute_metrics(prices[:, :5], dates, symbols[:5], benchmark=short, risk_free=RF_ANNUAL)
    b, rows = _compressed_returns(short)
    b_full = np.full(dates.size, np.nan)
    b_full[rows] = b
    for col in range(5):
        r_full = np.full(dates.size, np.nan)
        r_full[1:] = prices[1:, col] / prices[:-1, col] - 1.0
        got = res[symbols[col]]
        assert _mismatches(_pairs(_relative_ours(got), _relative_oracle(r_full, b_full))) == []
        # The absolute figures do not depend on the benchmark (up to summation order).
        alone = m.compute_metrics(prices[:, [col]], dates, [symbols[col]], risk_free=RF_ANNUAL)
        a, b_ = _univariate_ours(alone[symbols[col]]), _univariate_ours(got)
        assert all(_agree(a[k], b_[k], rel=1e-12) for k in a)


def test_returns_input_dates_periods_like_price_input(sample) -> None:
    symbols, prices, dates, _ = sample
    from_prices = m.compute_metrics(prices[:, :3], dates, symbols[:3])
    from_returns = m.compute_metrics(
        m.simple_returns(prices[:, :3]), dates, symbols[:3], kind="returns"
    )
    assert from_prices == from_returns


# ---------------------------------------------------------------------------
# Rolling
# ---------------------------------------------------------------------------

_ROLLING_ORACLES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "sortino": lambda x, b, w: ep.roll_sortino_ratio(x, window=w, required_return=RF_P),
    "information_ratio": lambda x, b, w: ep.stats.roll_excess_sharpe(x, b, window=w) * math.sqrt(P),
    "downside_capture": lambda x, b, w: ep.roll_down_capture(x, b, window=w),
}


@pytest.mark.parametrize("metric", sorted(_ROLLING_ORACLES))
def test_new_rolling_metrics_match_empyrical(sample, metric: m.RollingMetricName) -> None:
    _symbols, prices, dates, bench = sample
    x = prices[1:, 3] / prices[:-1, 3] - 1.0
    b = bench[1:] / bench[:-1] - 1.0
    got = m.rolling_metric(
        x, dates[1:], metric, 63, benchmark_returns=b, periods_per_year=P, risk_free=RF_ANNUAL
    )
    assert np.isnan(got.values[:62]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.asarray(_ROLLING_ORACLES[metric](x, b, 63), dtype=np.float64).ravel()
    want = np.where(np.isfinite(want), want, np.nan)
    np.testing.assert_allclose(got.values[62:], want, rtol=REL, atol=0)


def test_rolling_downside_capture_without_a_falling_day_is_nan() -> None:
    x = np.array([0.01, -0.02, 0.03, 0.01, -0.01, 0.02])
    b = np.array([0.01, 0.02, 0.01, -0.01, 0.005, 0.003])
    got = m.rolling_metric(x, _days(6), "downside_capture", 2, benchmark_returns=b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ep.roll_down_capture(x, b, window=2)
    np.testing.assert_allclose(got.values[1:], want, rtol=REL)
    assert np.isnan(got.values[[1, 2, 5]]).all()  # windows without b < 0


def test_rolling_relative_metrics_skip_missing_returns(gapped) -> None:
    _names, prices, dates, bench = gapped
    rets, b = m.simple_returns(prices[:, 1]), m.simple_returns(bench)
    mask = ~np.isnan(rets) & ~np.isnan(b)
    rows = np.flatnonzero(mask)
    for metric in ("information_ratio", "downside_capture"):
        got = m.rolling_metric(rets, dates, metric, 21, benchmark_returns=b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = _ROLLING_ORACLES[metric](rets[mask], b[mask], 21)
        np.testing.assert_allclose(got.values[rows[20:]], want, rtol=REL)
        assert np.isnan(np.delete(got.values, rows[20:])).all()
    got = m.rolling_metric(rets, dates, "sortino", 21, risk_free=RF_ANNUAL)
    own = np.flatnonzero(~np.isnan(rets))
    want = ep.roll_sortino_ratio(rets[own], window=21, required_return=RF_P)
    np.testing.assert_allclose(got.values[own[20:]], want, rtol=REL)


@pytest.mark.parametrize("metric", ["information_ratio", "downside_capture"])
def test_rolling_relative_metrics_need_the_benchmark(metric: m.RollingMetricName) -> None:
    with pytest.raises(m.MetricsInputError) as err:
        m.rolling_metric(np.array([0.01, 0.02, -0.01]), _days(3), metric, 2)
    assert err.value.field == "benchmark_returns"


# ---------------------------------------------------------------------------
# Over gRPC: the new fields equal the engine, the conventions are named
# ---------------------------------------------------------------------------


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _pb_date(day: date) -> tuple[int, int, int]:
    return (day.year, day.month, day.day)


def _assert_extended_equal(got: pb.SeriesMetrics, want: m.SymbolMetrics) -> None:
    pairs = {
        "omega": (got.omega_ratio, want.omega),
        "tail_ratio": (got.tail_ratio, want.tail_ratio),
        "stability": (got.stability, want.stability),
        "win_rate": (got.win_rate, want.win_rate),
        "parametric_cvar_95": (got.parametric_cvar_95, want.parametric_cvar_95),
        "parametric_cvar_99": (got.parametric_cvar_99, want.parametric_cvar_99),
        "cf_var_95": (got.cornish_fisher_var_95, want.cornish_fisher_var_95),
        "cf_var_99": (got.cornish_fisher_var_99, want.cornish_fisher_var_99),
        "cf_cvar_95": (got.cornish_fisher_cvar_95, want.cornish_fisher_cvar_95),
        "cf_cvar_99": (got.cornish_fisher_cvar_99, want.cornish_fisher_cvar_99),
    }
    if want.relative is not None:
        rel = want.relative
        pairs |= {
            "up_capture": (got.relative.up_capture, rel.up_capture),
            "down_capture": (got.relative.down_capture, rel.down_capture),
            "capture_ratio": (got.relative.capture_ratio, rel.capture_ratio),
            "total_capture": (got.relative.total_capture, rel.total_capture),
            "treynor": (got.relative.treynor, rel.treynor),
        }
    wrong = {k: v for k, v in pairs.items() if not _same(*v)}
    assert not wrong, f"{got.symbol}: {wrong}"
    for field in ("best_month", "worst_month", "best_year", "worst_year"):
        g, w = getattr(got, field), getattr(want, field)
        assert w is not None
        assert g.value == w.value and g.return_count == w.n_returns, field
        assert _pb_date(g.period_start) == _pb_date(w.period_start), field
        assert _pb_date(g.period_end) == _pb_date(w.period_end), field


async def test_compute_metrics_returns_the_extended_set(analytics: Running) -> None:
    md = analytics.keys.md(analytics.keys.reader_a)
    symbols = ["AAPL", "KO", "XOM", "^GSPC"]
    reply = await analytics.stub.ComputeMetrics(
        pb.ComputeMetricsRequest(symbols=symbols, benchmark="SP500", risk_free_rate=0.02),
        metadata=md,
    )
    prices, dates = columns([*symbols, "SP500"])
    want = m.compute_metrics(
        prices[:, :-1], dates, symbols, benchmark=prices[:, -1], benchmark_symbol="SP500",
        risk_free=0.02,
    )  # fmt: skip
    for got in reply.metrics:
        _assert_extended_equal(got, want[got.symbol])
    c = reply.conventions
    assert c.omega_threshold_annual == 0.02
    assert c.omega_threshold_per_period == m.per_period_risk_free(0.02, 252)
    assert (c.moments_rule, c.win_rate_rule, c.capture_rule) == (
        market.MOMENTS_RULE,
        market.WIN_RATE_RULE,
        market.CAPTURE_RULE,
    )
    assert "count(r != 0)" in c.win_rate_rule and "population" in c.moments_rule
    assert c.tail_ratio_rule and c.treynor_rule and c.cornish_fisher_rule and c.calendar_rule
    assert "parametric CVaR" in c.tail_rule

    # A requested Omega threshold (0 is a value, not "unset").
    for threshold in (0.0, 0.07):
        request = pb.ComputeMetricsRequest(
            symbols=["AAPL"], risk_free_rate=0.02, omega_threshold_annual=threshold
        )
        got = await analytics.stub.ComputeMetrics(request, metadata=md)
        expected = m.compute_metrics(
            prices[:, :1], dates, ["AAPL"], risk_free=0.02, omega_threshold=threshold
        )["AAPL"]
        assert got.metrics[0].omega_ratio == expected.omega
        assert got.conventions.omega_threshold_annual == threshold
        assert got.conventions.omega_threshold_per_period == m.omega_threshold_per_period(
            threshold, 0.02, 252
        )


async def test_portfolio_metrics_carry_the_extended_set(analytics: Running) -> None:
    holdings = [pb.Holding(symbol="AAPL", weight=0.6), pb.Holding(symbol="KO", weight=0.4)]
    reply = await analytics.stub.ComputePortfolio(
        pb.ComputePortfolioRequest(holdings=holdings, benchmark="SP500"),
        metadata=analytics.keys.md(analytics.keys.reader_a),
    )
    prices, dates = columns(["AAPL", "KO", "SP500"])
    want = m.analyse_portfolio(
        prices[:, :2], dates, ["AAPL", "KO"], [0.6, 0.4], "monthly", benchmark=prices[:, 2],
        benchmark_symbol="SP500",
    )  # fmt: skip
    _assert_extended_equal(reply.metrics, want.metrics)


async def test_bad_omega_threshold_names_the_field(analytics: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.ComputeMetrics(
            pb.ComputeMetricsRequest(symbols=["AAPL"], omega_threshold_annual=-1.5),
            metadata=analytics.keys.md(analytics.keys.reader_a),
        )
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["omega_threshold_annual"]


async def test_new_rolling_metrics_equal_the_engine(analytics: Running) -> None:
    md = analytics.keys.md(analytics.keys.reader_a)
    prices, dates = columns(["JPM", "SP500"])
    returns = m.simple_returns(prices)
    cases: list[tuple[int, m.RollingMetricName]] = [
        (pb.ROLLING_METRIC_SORTINO, "sortino"),
        (pb.ROLLING_METRIC_INFORMATION_RATIO, "information_ratio"),
        (pb.ROLLING_METRIC_DOWNSIDE_CAPTURE, "downside_capture"),
    ]
    for metric, name in cases:
        reply = await analytics.stub.RollingMetrics(
            pb.RollingMetricsRequest(
                symbol="JPM", metric=metric, window=63, benchmark="SP500", risk_free_rate=0.02
            ),
            metadata=md,
        )
        want = m.rolling_metric(
            returns[:, 0], dates, name, 63, benchmark_returns=returns[:, 1], risk_free=0.02
        )
        defined = ~np.isnan(want.values)
        assert [p.value for p in reply.points] == want.values[defined].tolist(), name
        first = want.dates[defined][0].astype("datetime64[D]").item()
        assert _pb_date(reply.points[0].date) == _pb_date(first)
        assert reply.metric == metric

    for metric in (pb.ROLLING_METRIC_INFORMATION_RATIO, pb.ROLLING_METRIC_DOWNSIDE_CAPTURE):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await analytics.stub.RollingMetrics(
                pb.RollingMetricsRequest(symbol="JPM", metric=metric, window=20), metadata=md
            )
        assert [v.field for v in status_info(err.value).field_violations] == ["benchmark"]
