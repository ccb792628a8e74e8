"""Metric engine vs independent oracles.

* empyrical (empyrical-reloaded) for every metric it has, on every symbol of
  the skfolio S&P 500 sample (20 stocks, 1990-2022) with the S&P 500 index as
  benchmark, to 1e-9 relative.
* scipy.stats for skew / kurtosis / the Gaussian quantile.
* plain numpy / Python loops where empyrical has no function (tracking error,
  drawdown dates, rolling windows on gapped data, portfolios, covariance) or
  where the project's convention differs from empyrical:
  - information ratio: empyrical's ``excess_sharpe`` is not annualised; ours
    is ``excess_sharpe * sqrt(P)``;
  - ``annual_return`` / ``cagr`` count NaN rows in ``len(returns)``, so they
    are given the NaN-free series (our N counts returns actually observed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import empyrical as ep
import numpy as np
import pyarrow.csv as pa_csv
import pytest
import scipy.stats as st

from services.analytics import metrics as m
from services.analytics.commentary import rules_commentary

SAMPLE = Path(__file__).resolve().parents[2] / "services" / "analytics" / "sample_data"
REL = 1e-9
P = 252
RF_ANNUAL = 0.03
RF_P = (1 + RF_ANNUAL) ** (1 / P) - 1


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _read_wide(name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pa_csv.read_csv(SAMPLE / name)
    symbols = [c for c in table.column_names if c != "Date"]
    values = np.column_stack([table[c].to_numpy() for c in symbols]).astype(np.float64)
    dates = table["Date"].to_numpy().astype("datetime64[D]")
    return symbols, values, dates


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    symbols, prices, dates = _read_wide("sp500_dataset.csv.gz")
    _, index, index_dates = _read_wide("sp500_index.csv.gz")
    assert np.array_equal(dates, index_dates)
    return symbols, prices, dates, index[:, 0]


@pytest.fixture(scope="module")
def results(sample):
    symbols, prices, dates, bench = sample
    return m.compute_metrics(
        prices,
        dates,
        symbols,
        benchmark=bench,
        benchmark_symbol="SP500",
        periods_per_year=P,
        risk_free=RF_ANNUAL,
    )


def _close(ours: float, ref: float, rel: float = REL) -> bool:
    return math.isclose(ours, ref, rel_tol=rel, abs_tol=1e-15)


def _mismatches(pairs: dict[str, tuple[float, float]], rel: float = REL) -> list[str]:
    return [
        f"{name}: ours={a!r} oracle={b!r}"
        for name, (a, b) in pairs.items()
        if not _close(float(a), float(b), rel)
    ]


def _to_date(day: np.datetime64) -> date:
    return day.astype("datetime64[D]").item()


# ---------------------------------------------------------------------------
# Direct oracles (loops on purpose: independent of the vectorised code)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _DrawdownOracle:
    mdd: float
    peak: date | None
    trough: date | None
    recovery: date | None
    periods: int


def _drawdown_oracle(r: list[float], dates: list[date], base_date: date) -> _DrawdownOracle:
    """Walk the wealth path; the starting wealth 1.0 (dated base_date) is the first peak."""
    wealth, peak_value, peak_at = 1.0, 1.0, -1
    worst, worst_peak, worst_trough = 0.0, -1, -1
    for i, ret in enumerate(r):
        wealth *= 1.0 + ret
        if wealth >= peak_value:
            peak_value, peak_at = wealth, i
        dd = (wealth - peak_value) / peak_value
        if dd < worst:
            worst, worst_peak, worst_trough = dd, peak_at, i
    if worst_trough < 0:
        return _DrawdownOracle(0.0, None, None, None, 0)
    # Recovery: first later point back at the pre-drawdown peak wealth.
    wealth = math.prod(1.0 + x for x in r[: worst_trough + 1])
    target = math.prod(1.0 + x for x in r[: worst_peak + 1]) if worst_peak >= 0 else 1.0
    recovery = -1
    for j in range(worst_trough + 1, len(r)):
        wealth *= 1.0 + r[j]
        if wealth >= target:  # same float products as the engine, so exact
            recovery = j
            break
    end = recovery if recovery >= 0 else len(r) - 1
    return _DrawdownOracle(
        mdd=worst,
        peak=dates[worst_peak] if worst_peak >= 0 else base_date,
        trough=dates[worst_trough],
        recovery=dates[recovery] if recovery >= 0 else None,
        periods=end - worst_peak,
    )


def _compressed_returns(prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns between consecutive available prices and the row index of each."""
    rows = np.flatnonzero(~np.isnan(prices))
    p = prices[rows]
    return p[1:] / p[:-1] - 1.0, rows[1:]


def _empyrical_univariate(r: np.ndarray) -> dict[str, float]:
    """Everything empyrical (and scipy) compute from the symbol's returns alone."""
    return {
        "total_return": ep.cum_returns_final(r),
        "cagr": ep.cagr(r, annualization=P),
        "annual_return": ep.annual_return(r, annualization=P),
        "volatility": ep.annual_volatility(r, annualization=P),
        "sharpe": ep.sharpe_ratio(r, risk_free=RF_P, annualization=P),
        "sortino": ep.sortino_ratio(r, required_return=RF_P, annualization=P),
        "calmar": ep.calmar_ratio(r, annualization=P),
        "max_drawdown": ep.max_drawdown(r),
        "var_95": ep.value_at_risk(r, cutoff=0.05),
        "var_99": ep.value_at_risk(r, cutoff=0.01),
        "cvar_95": ep.conditional_value_at_risk(r, cutoff=0.05),
        "cvar_99": ep.conditional_value_at_risk(r, cutoff=0.01),
        "skew": st.skew(r),
        "kurtosis": st.kurtosis(r),
        "parametric_var_95": st.norm.ppf(0.05, r.mean(), r.std(ddof=1)),
        "parametric_var_99": st.norm.ppf(0.01, r.mean(), r.std(ddof=1)),
        "positive_share": float(np.mean(r > 0)),
    }


def _ours_univariate(res: m.SymbolMetrics) -> dict[str, float]:
    return {
        "total_return": res.total_return,
        "cagr": res.cagr,
        "annual_return": res.cagr,
        "volatility": res.volatility,
        "sharpe": res.sharpe,
        "sortino": res.sortino,
        "calmar": res.calmar,
        "max_drawdown": res.drawdown.max_drawdown,
        "var_95": res.var_95,
        "var_99": res.var_99,
        "cvar_95": res.cvar_95,
        "cvar_99": res.cvar_99,
        "skew": res.skew,
        "kurtosis": res.kurtosis,
        "parametric_var_95": res.parametric_var_95,
        "parametric_var_99": res.parametric_var_99,
        "positive_share": res.positive_share,
    }


def _relative_oracle(r: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """r and b aligned row by row (NaN allowed on either side)."""
    joint = ~np.isnan(r) & ~np.isnan(b)
    active = r[joint] - b[joint]
    return {
        "beta": ep.beta(r, b, risk_free=RF_P),
        "alpha": ep.alpha(r, b, risk_free=RF_P, annualization=P),
        # Convention: annualised; empyrical's excess_sharpe is per period.
        "information_ratio": ep.excess_sharpe(r[joint], b[joint]) * math.sqrt(P),
        "tracking_error": float(np.std(active, ddof=1)) * math.sqrt(P),
        "n_common": float(joint.sum()),
    }


def _ours_relative(res: m.SymbolMetrics) -> dict[str, float]:
    rel = res.relative
    assert rel is not None
    return {
        "beta": rel.beta,
        "alpha": rel.alpha,
        "information_ratio": rel.information_ratio,
        "tracking_error": rel.tracking_error,
        "n_common": float(rel.n_common),
    }


def _pairs(ours: dict[str, float], oracle: dict[str, float]) -> dict[str, tuple[float, float]]:
    assert ours.keys() == oracle.keys()
    return {k: (ours[k], oracle[k]) for k in ours}


# ---------------------------------------------------------------------------
# Full sample vs empyrical, every symbol
# ---------------------------------------------------------------------------

SYMBOLS = [
    "AAPL",
    "AMD",
    "BAC",
    "BBY",
    "CVX",
    "GE",
    "HD",
    "JNJ",
    "JPM",
    "KO",
    "LLY",
    "MRK",
    "MSFT",
    "PEP",
    "PFE",
    "PG",
    "RRC",
    "UNH",
    "WMT",
    "XOM",
]


def test_sample_has_expected_symbols(sample) -> None:
    assert sample[0] == SYMBOLS
    assert sample[1].shape == (8313, 20)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_symbol_matches_empyrical(sample, results, symbol: str) -> None:
    symbols, prices, dates, bench = sample
    col = symbols.index(symbol)
    r = prices[1:, col] / prices[:-1, col] - 1.0
    b = bench[1:] / bench[:-1] - 1.0
    res = results[symbol]

    pairs = _pairs(_ours_univariate(res), _empyrical_univariate(r))
    pairs |= _pairs(_ours_relative(res), _relative_oracle(r, b))
    assert _mismatches(pairs) == []

    assert res.n_returns == r.size
    assert res.start_date == date(1990, 1, 2)
    assert res.end_date == _to_date(dates[-1])
    assert res.best == m.DatedReturn(float(r.max()), _to_date(dates[1 + int(np.argmax(r))]))
    assert res.worst == m.DatedReturn(float(r.min()), _to_date(dates[1 + int(np.argmin(r))]))


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_drawdown_dates_match_loop_oracle(sample, results, symbol: str) -> None:
    symbols, prices, dates, _ = sample
    r = prices[1:, symbols.index(symbol)] / prices[:-1, symbols.index(symbol)] - 1.0
    day_list = [_to_date(d) for d in dates[1:]]
    oracle = _drawdown_oracle(r.tolist(), day_list, _to_date(dates[0]))
    dd = results[symbol].drawdown
    assert _close(dd.max_drawdown, oracle.mdd)
    assert (dd.peak_date, dd.trough_date, dd.recovery_date) == (
        oracle.peak,
        oracle.trough,
        oracle.recovery,
    )
    assert dd.duration_periods == oracle.periods
    end = dd.recovery_date or _to_date(dates[-1])
    assert dd.duration_days == (end - dd.peak_date).days


def test_weekly_sampling_with_other_periods_per_year(sample) -> None:
    """Annualisation follows periods_per_year (weekly prices, P=52)."""
    symbols, prices, dates, bench = sample
    weekly, weekly_dates, weekly_bench = prices[::5], dates[::5], bench[::5]
    res = m.compute_metrics(
        weekly, weekly_dates, symbols, benchmark=weekly_bench, periods_per_year=52
    )
    for col in (0, 7, 19):
        r = weekly[1:, col] / weekly[:-1, col] - 1.0
        b = weekly_bench[1:] / weekly_bench[:-1] - 1.0
        got = res[symbols[col]]
        pairs = {
            "cagr": (got.cagr, ep.cagr(r, annualization=52)),
            "vol": (got.volatility, ep.annual_volatility(r, annualization=52)),
            "sharpe": (got.sharpe, ep.sharpe_ratio(r, annualization=52)),
            "sortino": (got.sortino, ep.sortino_ratio(r, annualization=52)),
            "alpha": (_ours_relative(got)["alpha"], ep.alpha(r, b, annualization=52)),
        }
        assert _mismatches(pairs) == []


def test_returns_input_equals_price_input(sample) -> None:
    symbols, prices, dates, bench = sample
    from_prices = m.compute_metrics(prices[:, :5], dates, symbols[:5], benchmark=bench)
    from_returns = m.compute_metrics(
        m.simple_returns(prices[:, :5]),
        dates,
        symbols[:5],
        kind="returns",
        benchmark=m.simple_returns(bench),
    )
    assert from_prices == from_returns


# ---------------------------------------------------------------------------
# NaN gaps: returns between consecutive available prices, never zero-filled
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gapped(sample):
    symbols, prices, dates, bench = sample
    cols = [symbols.index(s) for s in ("AAPL", "GE", "XOM")]
    gapped = prices[:, cols].copy()
    gapped[:250, 0] = np.nan  # listed a year later
    gapped[4000:4010, 0] = np.nan  # a 10-day suspension
    rng = np.random.default_rng(7)
    gapped[rng.choice(np.arange(1, 8313), 400, replace=False), 1] = np.nan
    gapped[-30:, 2] = np.nan  # delisted early
    gapped_bench = bench.copy()
    gapped_bench[[100, 3000, 3001, 6000]] = np.nan
    return ["AAPL", "GE", "XOM"], gapped, dates, gapped_bench


def test_gap_metrics_match_empyrical_on_the_same_returns(gapped) -> None:
    names, prices, dates, bench = gapped
    res = m.compute_metrics(
        prices, dates, names, benchmark=bench, periods_per_year=P, risk_free=RF_ANNUAL
    )
    b_compressed, b_rows = _compressed_returns(bench)
    b_full = np.full(dates.size, np.nan)
    b_full[b_rows] = b_compressed
    for col, name in enumerate(names):
        r, rows = _compressed_returns(prices[:, col])
        r_full = np.full(dates.size, np.nan)
        r_full[rows] = r
        got = res[name]
        pairs = _pairs(_ours_univariate(got), _empyrical_univariate(r))
        pairs |= _pairs(_ours_relative(got), _relative_oracle(r_full, b_full))
        assert _mismatches(pairs) == [], name
        assert got.n_returns == r.size
        first_price = int(np.flatnonzero(~np.isnan(prices[:, col]))[0])
        assert got.start_date == _to_date(dates[first_price])
        assert got.end_date == _to_date(dates[rows[-1]])


def test_return_spanning_a_gap_is_the_price_change_over_the_gap(gapped) -> None:
    _names, prices, _dates, _ = gapped
    rets = m.simple_returns(prices)
    assert np.isnan(rets[4000:4010, 0]).all()
    assert rets[4010, 0] == prices[4010, 0] / prices[3999, 0] - 1.0
    assert np.isnan(rets[250, 0])  # first available price: no return
    # Never zero-filled: as many returns as available prices minus one.
    for col in range(3):
        assert np.count_nonzero(~np.isnan(rets[:, col])) == (
            np.count_nonzero(~np.isnan(prices[:, col])) - 1
        )


def _assert_same_metrics(a: object, b: object, rel: float = 1e-12) -> None:
    """Equal dates/counts and floats equal to ``rel`` (different summation orders)."""
    for field in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, float):
            assert _close(x, y, rel) or (math.isnan(x) and math.isnan(y)), field.name
        elif dataclasses.is_dataclass(x):
            _assert_same_metrics(x, y, rel)
        else:
            assert x == y, field.name


def test_masked_path_agrees_with_dense_path(sample) -> None:
    """A gap in one symbol switches the engine to masked arithmetic for all of them."""
    symbols, prices, dates, bench = sample
    dense = m.compute_metrics(prices[:, :4], dates, symbols[:4], benchmark=bench, risk_free=0.02)
    with_gap = prices[:, :5].copy()
    with_gap[100:110, 4] = np.nan
    masked = m.compute_metrics(with_gap, dates, symbols[:5], benchmark=bench, risk_free=0.02)
    for name in symbols[:4]:
        _assert_same_metrics(dense[name], masked[name])


def test_dense_symbols_with_a_gapped_benchmark(sample) -> None:
    symbols, prices, dates, bench = sample
    gapped_bench = bench.copy()
    gapped_bench[[10, 2000, 2001, 5000]] = np.nan
    res = m.compute_metrics(
        prices[:, :3], dates, symbols[:3], benchmark=gapped_bench, risk_free=RF_ANNUAL
    )
    b, rows = _compressed_returns(gapped_bench)
    b_full = np.full(dates.size, np.nan)
    b_full[rows] = b
    for col in range(3):
        r_full = np.full(dates.size, np.nan)
        r_full[1:] = prices[1:, col] / prices[:-1, col] - 1.0
        got = _ours_relative(res[symbols[col]])
        assert _mismatches(_pairs(got, _relative_oracle(r_full, b_full))) == []
        # Only the 4 missing-price rows lack a benchmark return; the next
        # return spans the gap (e.g. row 11 = p11 / p9 - 1).
        assert got["n_common"] == 8312 - 4


def test_gap_drawdown_dates_match_loop_oracle(gapped) -> None:
    names, prices, dates, _ = gapped
    res = m.compute_metrics(prices, dates, names)
    for col, name in enumerate(names):
        r, rows = _compressed_returns(prices[:, col])
        base = _to_date(dates[int(np.flatnonzero(~np.isnan(prices[:, col]))[0])])
        oracle = _drawdown_oracle(r.tolist(), [_to_date(dates[i]) for i in rows], base)
        dd = res[name].drawdown
        assert (dd.peak_date, dd.trough_date, dd.recovery_date) == (
            oracle.peak,
            oracle.trough,
            oracle.recovery,
        )
        assert dd.duration_periods == oracle.periods


# ---------------------------------------------------------------------------
# Hand-made drawdown series
# ---------------------------------------------------------------------------


def _days(n: int, start: str = "2024-01-01") -> np.ndarray:
    # Business-like spacing with a weekend jump so days != periods.
    offsets = np.cumsum([0] + [1 if i % 5 else 3 for i in range(1, n)])
    return np.datetime64(start) + offsets.astype("timedelta64[D]")


def _dd(prices: list[float], kind: m.InputKind = "prices") -> tuple[m.DrawdownInfo, np.ndarray]:
    days = _days(len(prices))
    res = m.compute_metrics(np.array(prices), days, ["X"], kind=kind)["X"]
    return res.drawdown, days


def test_drawdown_peak_trough_recovery_by_hand() -> None:
    dd, days = _dd([100, 110, 99, 88, 121, 110, 132, 120])
    assert dd.max_drawdown == pytest.approx(88 / 110 - 1, rel=1e-12)
    assert dd.peak_date == _to_date(days[1])
    assert dd.trough_date == _to_date(days[3])
    assert dd.recovery_date == _to_date(days[4])
    assert dd.recovered
    assert dd.duration_periods == 3
    assert dd.duration_days == int((days[4] - days[1]).astype(int))


def test_drawdown_counts_a_first_day_loss_from_the_starting_wealth() -> None:
    dd, days = _dd([100, 90, 95, 101])
    assert dd.max_drawdown == pytest.approx(-0.1, rel=1e-12)
    assert dd.peak_date == _to_date(days[0])  # the first price is the initial peak
    assert dd.trough_date == _to_date(days[1])
    assert dd.recovery_date == _to_date(days[3])
    assert dd.duration_periods == 3


def test_drawdown_first_day_loss_with_returns_input_on_row_zero() -> None:
    dd, days = _dd([-0.1, 0.05, 0.06], kind="returns")
    assert dd.max_drawdown == pytest.approx(-0.1, rel=1e-12)
    # No earlier row: the starting wealth carries the first return's date.
    assert dd.peak_date == dd.trough_date == _to_date(days[0])
    assert dd.recovery_date == _to_date(days[2])
    assert dd.duration_periods == 3


def test_drawdown_peak_on_the_first_return_of_a_returns_input() -> None:
    # The first return is a gain, so the peak is *after* it: 2 periods to recovery.
    dd, days = _dd([0.01, -0.05, 0.1], kind="returns")
    assert dd.peak_date == _to_date(days[0])
    assert dd.trough_date == _to_date(days[1])
    assert dd.recovery_date == _to_date(days[2])
    assert dd.duration_periods == 2


def test_drawdown_not_recovered_runs_to_the_last_observation() -> None:
    dd, days = _dd([100, 120, 90, 100])
    assert dd.max_drawdown == pytest.approx(-0.25, rel=1e-12)
    assert dd.peak_date == _to_date(days[1])
    assert dd.recovery_date is None
    assert not dd.recovered
    assert dd.duration_periods == 2
    assert dd.duration_days == int((days[3] - days[1]).astype(int))


def test_drawdown_peak_is_the_last_visit_of_the_high_before_the_trough() -> None:
    dd, days = _dd([100, 110, 100, 110, 99])
    assert dd.peak_date == _to_date(days[3])
    assert dd.trough_date == _to_date(days[4])
    assert dd.max_drawdown == pytest.approx(99 / 110 - 1, rel=1e-12)


def test_no_drawdown_and_undefined_ratios_are_nan() -> None:
    res = m.compute_metrics(np.array([100.0, 101, 102, 103]), _days(4), ["UP"])["UP"]
    assert res.drawdown == m.DrawdownInfo(0.0, None, None, None, 0, 0)
    assert math.isnan(res.calmar)
    assert math.isnan(res.sortino)  # no downside at all
    flat = m.compute_metrics(np.array([0.01] * 5), _days(5), ["F"], kind="returns")["F"]
    assert math.isnan(flat.sharpe)
    assert flat.volatility == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------------
# Rolling metrics
# ---------------------------------------------------------------------------


def _rolling_oracle(metric: str, x: np.ndarray, b: np.ndarray | None, w: int) -> np.ndarray:
    out = []
    for end in range(w, x.size + 1):
        win = x[end - w : end]
        if metric == "volatility":
            out.append(np.std(win, ddof=1) * math.sqrt(P))
        elif metric == "sharpe":
            ex = win - RF_P
            out.append(ex.mean() / np.std(ex, ddof=1) * math.sqrt(P))
        elif metric == "beta":
            assert b is not None
            bw = b[end - w : end]
            out.append(np.cov(win, bw, ddof=1)[0, 1] / np.var(bw, ddof=1))
        else:
            wealth = np.cumprod(1 + win)
            peak = np.maximum.accumulate(np.concatenate([[1.0], wealth]))[1:]
            out.append(float(np.min(wealth / peak - 1)))
    return np.array(out)


@pytest.mark.parametrize("metric", ["volatility", "sharpe", "beta", "drawdown"])
def test_rolling_metric_matches_loop_and_empyrical(sample, metric: m.RollingMetricName) -> None:
    _symbols, prices, dates, bench = sample
    x = prices[1:, 0] / prices[:-1, 0] - 1.0
    b = bench[1:] / bench[:-1] - 1.0
    got = m.rolling_metric(
        x, dates[1:], metric, 63, benchmark_returns=b, periods_per_year=P, risk_free=RF_ANNUAL
    )
    assert np.isnan(got.values[:62]).all()
    np.testing.assert_allclose(got.values[62:], _rolling_oracle(metric, x, b, 63), rtol=1e-9)
    empyrical_roll = {
        "volatility": lambda: ep.roll_annual_volatility(x, window=63),
        "sharpe": lambda: ep.roll_sharpe_ratio(x, window=63, risk_free=RF_P),
        "beta": lambda: ep.roll_beta(x, b, window=63),
        "drawdown": lambda: ep.roll_max_drawdown(x, window=63),
    }[metric]()
    np.testing.assert_allclose(got.values[62:], empyrical_roll, rtol=1e-9)
    assert np.array_equal(got.dates, dates[1:])


def test_rolling_skips_missing_returns(gapped) -> None:
    _names, prices, dates, bench = gapped
    rets = m.simple_returns(prices[:, 1])  # GE with 400 random holes
    b = m.simple_returns(bench)
    for metric in ("volatility", "beta"):
        got = m.rolling_metric(rets, dates, metric, 21, benchmark_returns=b)
        mask = ~np.isnan(rets) & (~np.isnan(b) if metric == "beta" else True)
        rows = np.flatnonzero(mask)
        expected = _rolling_oracle(metric, rets[mask], b[mask], 21)
        np.testing.assert_allclose(got.values[rows[20:]], expected, rtol=1e-9)
        others = np.setdiff1d(np.arange(dates.size), rows[20:])
        assert np.isnan(got.values[others]).all()


# ---------------------------------------------------------------------------
# Portfolio
# ---------------------------------------------------------------------------


def _period_key(day: date, rule: str) -> tuple[int, ...]:
    if rule == "weekly":
        return tuple(day.isocalendar()[:2])
    if rule == "monthly":
        return (day.year, day.month)
    if rule == "quarterly":
        return (day.year, (day.month - 1) // 3)
    return (day.year,)


def _portfolio_oracle(prices: np.ndarray, days: np.ndarray, w: np.ndarray, rule: str) -> list:
    """Simulate units held; rebalance at the close of each period's last row."""
    last = prices[0].copy()
    value = 1.0
    units = w * value / last
    out = [math.nan]
    dlist = [_to_date(d) for d in days]
    for t in range(1, prices.shape[0]):
        price = np.where(np.isnan(prices[t]), last, prices[t])
        new_value = float(np.sum(units * price))
        out.append(new_value / value - 1.0)
        value, last = new_value, price
        is_period_end = t + 1 < len(dlist) and _period_key(dlist[t], rule) != _period_key(
            dlist[t + 1], rule
        )
        if rule == "daily" or (rule not in ("none", "daily") and is_period_end):
            units = w * value / price
    return out


@pytest.mark.parametrize("rule", ["none", "daily", "weekly", "monthly", "quarterly", "annual"])
def test_portfolio_returns_match_unit_simulation(sample, rule: m.Rebalance) -> None:
    _symbols, prices, dates, _ = sample
    sub = prices[:1500, :4].copy()
    sub[700:705, 2] = np.nan  # a gap is carried at the last price
    w = np.array([0.4, 0.3, 0.2, 0.1])
    got = m.portfolio_returns(sub, dates[:1500], w, rule)
    np.testing.assert_allclose(got, _portfolio_oracle(sub, dates[:1500], w, rule), rtol=1e-9)


def test_rebalancing_rules_actually_differ(sample) -> None:
    _, prices, dates, _ = sample
    w = np.full(4, 0.25)
    series = {
        r: m.portfolio_returns(prices[:800, :4], dates[:800], w, r)
        for r in ("none", "daily", "monthly")
    }
    assert not np.allclose(series["none"][1:], series["daily"][1:])
    assert not np.allclose(series["monthly"][1:], series["daily"][1:])


def test_short_portfolio_allowed_only_with_flag(sample) -> None:
    _, prices, dates, _ = sample
    w = np.array([1.3, -0.3])
    with pytest.raises(m.MetricsInputError) as err:
        m.portfolio_returns(prices[:300, :2], dates[:300], w, "monthly")
    assert err.value.field == "weights"
    got = m.portfolio_returns(prices[:300, :2], dates[:300], w, "monthly", allow_short=True)
    expected = _portfolio_oracle(prices[:300, :2], dates[:300], w, "monthly")
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def _cov_oracle(r: np.ndarray) -> np.ndarray:
    k = r.shape[1]
    out = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            xi, xj = r[:, i], r[:, j]
            out[i, j] = np.sum((xi - xi.mean()) * (xj - xj.mean())) / (r.shape[0] - 1) * P
    return out


def test_covariance_correlation_and_risk_contributions(sample) -> None:
    _, prices, _, _ = sample
    rets = m.simple_returns(prices[:, :6])
    rets[50:60, 3] = np.nan  # listwise deletion drops these rows for every asset
    complete = rets[~np.isnan(rets).any(axis=1)]
    cov = m.covariance_matrix(rets, P)
    np.testing.assert_allclose(cov, _cov_oracle(complete), rtol=1e-9)
    np.testing.assert_allclose(m.correlation_matrix(rets), np.corrcoef(complete.T), rtol=1e-9)

    w = np.array([0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    risk = m.risk_contributions(w, cov)
    sigma = math.sqrt(w @ cov @ w)
    assert risk.portfolio_volatility == pytest.approx(sigma, rel=1e-12)
    # Euler: c_i = w_i * d(sigma)/d(w_i); check the derivative numerically.
    h = 1e-6
    for i in range(w.size):
        up, down = w.copy(), w.copy()
        up[i] += h
        down[i] -= h
        grad = (math.sqrt(up @ cov @ up) - math.sqrt(down @ cov @ down)) / (2 * h)
        assert risk.contributions[i] == pytest.approx(w[i] * grad, rel=1e-6)
    assert risk.contributions.sum() == pytest.approx(sigma, rel=1e-12)
    assert risk.shares.sum() == pytest.approx(1.0, abs=1e-12)


def test_analyse_portfolio_bundles_consistent_results(sample) -> None:
    symbols, prices, dates, bench = sample
    w = [0.25, 0.25, 0.25, 0.25]
    out = m.analyse_portfolio(
        prices[:, :4], dates, symbols[:4], w, "quarterly", benchmark=bench, risk_free=0.02
    )
    port = m.portfolio_returns(prices[:, :4], dates, w, "quarterly")
    np.testing.assert_array_equal(out.returns, port)
    r = port[1:]
    assert out.metrics.sharpe == pytest.approx(
        ep.sharpe_ratio(r, risk_free=(1.02) ** (1 / 252) - 1), rel=REL
    )
    assert out.metrics.relative is not None
    assert out.metrics.relative.beta == pytest.approx(
        ep.beta(r, bench[1:] / bench[:-1] - 1), rel=REL
    )
    assert out.risk.shares.sum() == pytest.approx(1.0)
    assert out.symbols == tuple(symbols[:4])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

GOOD = np.array([[100.0, 50.0], [101.0, 51.0], [102.0, 49.0], [100.0, 52.0]])
GOOD_DAYS = _days(4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"periods_per_year": 0}, "periods_per_year"),
        ({"periods_per_year": 367}, "periods_per_year"),
        ({"periods_per_year": float("nan")}, "periods_per_year"),
        ({"periods_per_year": "daily"}, "periods_per_year"),
        ({"risk_free": -1.0}, "risk_free"),
        ({"risk_free": 1.5}, "risk_free"),
        ({"kind": "levels"}, "kind"),
        ({"values": GOOD[:2]}, "dates"),
        ({"values": GOOD[:2], "dates": GOOD_DAYS[:2]}, "values"),
        ({"values": -GOOD}, "values"),
        ({"values": GOOD - 102.0, "kind": "returns"}, "values"),
        ({"values": np.where(GOOD > 101, np.inf, GOOD)}, "values"),
        ({"dates": GOOD_DAYS[::-1]}, "dates"),
        ({"symbols": ["A"]}, "symbols"),
        ({"symbols": ["A", "A"]}, "symbols"),
        ({"benchmark": np.array([1.0, 2.0])}, "benchmark"),
    ],
)
def test_compute_metrics_rejects_bad_input(kwargs: dict, field: str) -> None:
    args = {"values": GOOD, "dates": GOOD_DAYS, "symbols": ["A", "B"]} | kwargs
    with pytest.raises(m.MetricsInputError) as err:
        m.compute_metrics(args.pop("values"), args.pop("dates"), args.pop("symbols"), **args)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert field in str(err.value)


def test_fewer_than_two_returns_names_the_symbol() -> None:
    values = GOOD.copy()
    values[1:3, 1] = np.nan  # B keeps two prices -> one return
    with pytest.raises(m.MetricsInputError, match="too few for B") as err:
        m.compute_metrics(values, GOOD_DAYS, ["A", "B"])
    assert err.value.field == "values"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: m.rolling_metric(GOOD[:, 0], GOOD_DAYS, "volatility", 5), "window"),
        (lambda: m.rolling_metric(GOOD[:, 0], GOOD_DAYS, "volatility", 1), "window"),
        (lambda: m.rolling_metric(GOOD[:, 0], GOOD_DAYS, "volatility", 2.5), "window"),  # type: ignore[arg-type]
        (lambda: m.rolling_metric(GOOD[:, 0], GOOD_DAYS, "omega", 2), "metric"),  # type: ignore[arg-type]
        (lambda: m.rolling_metric(GOOD[:, 0], GOOD_DAYS, "beta", 2), "benchmark_returns"),
        (lambda: m.rolling_metric(GOOD[:, 0] - 200, GOOD_DAYS, "volatility", 2), "returns"),
        (lambda: m.portfolio_returns(GOOD, GOOD_DAYS, [0.5, 0.4999]), "weights"),
        (lambda: m.portfolio_returns(GOOD, GOOD_DAYS, [0.5, 0.5, 0.0]), "weights"),
        (lambda: m.portfolio_returns(GOOD, GOOD_DAYS, [1.2, -0.2]), "weights"),
        (lambda: m.portfolio_returns(GOOD, GOOD_DAYS, [1.0, 0.0], "hourly"), "rebalance"),  # type: ignore[arg-type]
        (
            lambda: m.portfolio_returns(
                np.vstack([[np.nan, 50.0], GOOD[1:]]), GOOD_DAYS, [0.5, 0.5]
            ),
            "prices",
        ),
        (lambda: m.risk_contributions([0.5, 0.5], np.zeros((2, 2))), "covariance"),
        (lambda: m.covariance_matrix(np.array([[0.1, np.nan], [0.2, 0.1]])), "returns"),
    ],
)
def test_other_functions_reject_bad_input(call, field: str) -> None:
    with pytest.raises(m.MetricsInputError) as err:
        call()
    assert err.value.field == field


def test_weights_within_tolerance_are_accepted() -> None:
    out = m.portfolio_returns(GOOD, GOOD_DAYS, [0.5 + 4e-10, 0.5])
    assert out.shape == (4,)


# ---------------------------------------------------------------------------
# Commentary
# ---------------------------------------------------------------------------


def test_rules_commentary_is_deterministic_and_built_from_the_numbers(sample, results) -> None:
    _symbols, _, dates, bench = sample
    subset = {s: results[s] for s in ("MSFT", "AAPL", "GE")}
    subset |= m.compute_metrics(bench, dates, ["SP500"], risk_free=RF_ANNUAL)
    text = rules_commentary(subset, "SP500")
    reordered = dict(reversed(list(subset.items())))
    assert rules_commentary(reordered, "SP500") == text
    paragraphs = text.split("\n\n")
    assert [p.split(" ", 1)[0] for p in paragraphs] == ["SP500", "AAPL", "GE", "MSFT"]
    aapl = subset["AAPL"]
    assert f"{aapl.cagr * 100:+.1f}%" in paragraphs[1]
    assert f"{aapl.drawdown.max_drawdown * 100:+.1f}%" in paragraphs[1]
    assert aapl.drawdown.peak_date.isoformat() in paragraphs[1]
    assert aapl.drawdown.trough_date.isoformat() in paragraphs[1]
    assert f"{-aapl.var_95 * 100:.2f}%" in paragraphs[1]
    assert "Against SP500" in paragraphs[1]
    assert "Against" not in paragraphs[0]
    # A different number gives a different text.
    changed = dict(subset)
    changed["AAPL"] = dataclasses.replace(aapl, sharpe=-0.3)
    assert rules_commentary(changed, "SP500") != text
    assert "negative (Sharpe -0.30" in rules_commentary(changed, "SP500")


def test_relative_figures_over_fewer_days_say_so(sample, results) -> None:
    symbols, prices, dates, bench = sample
    short = bench.copy()
    short[: len(short) // 2] = np.nan  # the benchmark starts half-way
    aapl = prices[:, [symbols.index("AAPL")]]
    res = m.compute_metrics(aapl, dates, ["AAPL"], benchmark=short, benchmark_symbol="SP500")
    relative = res["AAPL"].relative
    assert relative is not None
    n = relative.n_common
    assert n < res["AAPL"].n_returns
    window = f"{relative.first_date.isoformat()} to {relative.last_date.isoformat()}"
    assert f"Against SP500 (over the {n:,} returns it shares with the benchmark, {window})" in (
        rules_commentary(res, "SP500")
    )
    nothing = np.full_like(bench, np.nan)
    nothing[-2:] = bench[-2:]  # one common return: no relative figures, said in words
    res = m.compute_metrics(aapl, dates, ["AAPL"], benchmark=nothing, benchmark_symbol="SP500")
    text = rules_commentary(res, "SP500")
    assert "There are no figures against SP500: it has too little data in this window." in text
    assert "beta" not in text
    full = rules_commentary({"AAPL": results["AAPL"]}, "SP500")
    assert "Against SP500 it had" in full  # every return in common: nothing to say


def test_rules_commentary_handles_missing_values_and_no_benchmark() -> None:
    res = m.compute_metrics(np.array([0.01] * 5), _days(5), ["F"], kind="returns")
    text = rules_commentary(res, None)
    assert "Sharpe n/a" in text
    assert "no drawdown" in text
    assert rules_commentary({}, None) == "No metrics were available to comment on."


def test_a_benchmark_without_enough_common_returns_is_blamed_and_the_rest_stands() -> None:
    bench = np.full(GOOD.shape[0], np.nan)
    bench[-2:] = [100.0, 101.0]  # one return, on the last day only
    res = m.compute_metrics(GOOD, GOOD_DAYS, ["A", "B"], benchmark=bench, benchmark_symbol="IDX")
    alone = m.compute_metrics(GOOD, GOOD_DAYS, ["A", "B"])
    for s in ("A", "B"):
        assert res[s].relative is None
        assert res[s].relative_unavailable.startswith(
            f"the benchmark IDX shares 1 return with {s} in the window"
        )
        assert "too little data there" in res[s].relative_unavailable
        # The absolute figures are those computed without a benchmark.
        assert dataclasses.replace(res[s], relative_unavailable="") == alone[s]


def test_the_common_window_is_the_first_and_last_day_both_have_a_return(sample) -> None:
    symbols, prices, dates, bench = sample
    short = bench.copy()
    short[:300] = np.nan  # the benchmark starts late ...
    short[-50:] = np.nan  # ... and ends early
    res = m.compute_metrics(prices, dates, symbols, benchmark=short, benchmark_symbol="SP500")
    b_ret = np.isfinite(short[1:]) & np.isfinite(short[:-1])
    for i, s in enumerate(symbols):
        p = prices[:, i]
        joint = b_ret & np.isfinite(p[1:]) & np.isfinite(p[:-1])
        rows = np.flatnonzero(joint) + 1  # a return is dated by its second price
        rel = res[s].relative
        assert rel is not None
        assert rel.n_common == joint.sum()
        assert (rel.first_date, rel.last_date) == (dates[rows[0]], dates[rows[-1]])
    dense = m.compute_metrics(prices[:, :1], dates, symbols[:1], benchmark=bench)
    rel = dense[symbols[0]].relative
    assert rel is not None and rel.last_date == dense[symbols[0]].end_date
