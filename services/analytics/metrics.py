"""Vectorised performance and risk metrics for the analytics service.

Pure domain code: numpy plus the standard library only (no gRPC, protobuf,
DuckDB, pandas or scipy), so it can be unit-tested and benchmarked on its own.

Input
-----
A 2-D float64 array of *prices* (``kind="prices"``, adjusted close) or of
*simple returns* (``kind="returns"``): rows are periods in strictly increasing
date order, columns are symbols, ``NaN`` marks a missing observation.  A 1-D
array is treated as a single column.  ``dates`` is a vector of
``numpy.datetime64[D]`` (anything ``np.asarray(..., "datetime64[D]")`` accepts)
with one entry per row.  Internally every reduction runs over all symbols at
once on a ``(symbols, periods)`` array; there is no per-symbol Python loop in
the hot path.

Conventions (empyrical's, made explicit)
-----------------------------------------
Let ``P`` be ``periods_per_year`` (default 252) and ``r`` a symbol's returns.

* **Returns and gaps.**  With price input a return is computed between
  consecutive *available* prices of the same symbol: for a row ``t`` with a
  price, ``r_t = p_t / p_prev - 1`` where ``p_prev`` is that symbol's last
  earlier non-NaN price.  A return is therefore never filled with zero; a
  price gap simply makes the next return span several rows (it is stored on
  the row of the price that closes the gap, and counts as *one* return).  The
  symbol's first available price produces no return.  With return input,
  ``NaN`` returns are skipped.  ``N`` is the number of non-NaN returns of that
  symbol, and every statistic below uses exactly those ``N`` values, as
  empyrical does when it is given the same series with the NaNs dropped.
  (empyrical's ``annual_return`` uses ``len(returns)`` *including* NaNs, so
  the oracle tests pass it the NaN-free series.)
* **Standard deviation** is the sample one (``ddof=1``); annualisation
  multiplies by ``sqrt(P)``.
* **Risk-free rate** ``rf`` is given as an annual rate and converted to a
  per-period rate ``rf_p = (1 + rf) ** (1 / P) - 1`` (QuantStats'
  ``deannualize``; pass ``rf_p`` as ``risk_free`` to empyrical).
* **Total return** ``prod(1 + r) - 1``;
  **CAGR** ``(1 + total) ** (P / N) - 1`` (gaps do not add periods).
* **Annualised volatility** ``std(r, ddof=1) * sqrt(P)``.
* **Sharpe** ``mean(r - rf_p) / std(r - rf_p, ddof=1) * sqrt(P)``.
* **Sortino** ``mean(r - rf_p) * P / (sqrt(mean(min(r - rf_p, 0) ** 2)) *
  sqrt(P))``: the downside deviation averages the squared shortfalls over
  all ``N`` periods (not only the losing ones), as empyrical's
  ``downside_risk`` with ``required_return=rf_p``.
* **Max drawdown** is the most negative ``W_t / max(1, W_0..W_t) - 1`` of the
  wealth index ``W_t = prod(1 + r)`` (a negative fraction).  The starting
  wealth 1.0 counts as the first peak, so a loss on the first day is a
  drawdown (empyrical anchors the series at 100).  Trough = first period at
  the minimum; peak = last period at or before the trough where wealth was at
  its running maximum; recovery = first later period where wealth is back at
  (or above) the peak, ``None`` if it never is.  Duration runs from peak to
  recovery, or to the symbol's last observation if not recovered, counted in
  the symbol's own returns (``duration_periods``) and in calendar days
  (``duration_days``).  The starting wealth is dated on the row of the
  symbol's first price (price input) or the row before its first return
  (return input); if the first return sits on row 0 of a return input there
  is no earlier row and the first return's date is used.
* **Calmar** ``CAGR / |max drawdown|``.
* **Historical VaR** at confidence ``c``: the ``q = 1 - c`` quantile of the
  returns with linear interpolation between order statistics (numpy's default
  ``percentile``, i.e. empyrical's ``value_at_risk(r, cutoff=q)``), negative
  = loss.  ``q`` is taken as the exact decimal 0.05 / 0.01 (not the float
  ``1 - 0.95``), so the index arithmetic is the same as empyrical's.
* **Historical CVaR** the mean of the worst ``floor((N - 1) * q) + 1``
  returns (empyrical's ``conditional_value_at_risk``).
* **Parametric VaR** ``mean(r) + z_q * std(r, ddof=1)`` with ``z_q`` the
  standard normal ``q`` quantile (QuantStats' ``value_at_risk``).
* **Beta** ``cov(r - rf_p, b - rf_p) / var(b - rf_p)`` over the periods where
  both the symbol and the benchmark have a return (the constant ``rf_p``
  cancels); beta is NaN when the benchmark variance is below 1e-30, as in
  empyrical.
* **Alpha** is Jensen's alpha annualised geometrically,
  ``(1 + mean(r - rf_p - beta * (b - rf_p))) ** P - 1``, over the same common
  periods: exactly empyrical's ``alpha``.
* **Tracking error** ``std(r - b, ddof=1) * sqrt(P)`` and **information
  ratio** ``mean(r - b) / std(r - b, ddof=1) * sqrt(P)`` over the common
  periods.  empyrical has no tracking-error function and its
  ``excess_sharpe`` is the *un-annualised* ratio, so
  ``information_ratio == excess_sharpe * sqrt(P)``.
* **Skew / kurtosis** are the population (biased) moment ratios
  ``m3 / m2 ** 1.5`` and excess kurtosis ``m4 / m2 ** 2 - 3``, i.e.
  ``scipy.stats.skew`` / ``scipy.stats.kurtosis`` with default arguments,
  which is what empyrical lists as its skew/kurtosis statistics.
* **Best / worst period** the largest / smallest single return and its date
  (first occurrence).  **Positive share** ``count(r > 0) / N`` (a zero
  return is not positive and stays in the denominator).
* A ratio whose denominator is zero (constant returns, no drawdown, no
  downside) is reported as ``NaN`` ("undefined"), never as an infinity.
  empyrical returns ``inf`` for some of these (e.g. Sortino without
  downside); Calmar without drawdown is NaN in both.

The extended set (oracles: empyrical, QuantStats, SciPy; see
``tests/analytics/test_metrics_extended.py`` and docs/analytics.md for why
each convention was chosen where the libraries disagree):

* **Omega** ``sum(max(r - tau, 0)) / sum(max(tau - r, 0))``, ``tau`` the
  per-period risk-free rate, or the given annual threshold converted the same
  way (it replaces the risk-free rate): empyrical's ``omega_ratio``.
* **Tail ratio** ``|q95| / |q05|`` (linear percentiles; empyrical /
  QuantStats).  **Stability** R^2 of ``cumsum(log1p(r))`` on ``0..N-1``
  (empyrical's ``stability_of_timeseries``).
* **Win rate** ``count(r > 0) / count(r != 0)`` (QuantStats' ``win_rate``).
* **Parametric CVaR** ``mean - std * phi(z_q) / q`` (Gaussian expected
  shortfall, QuantStats' parametric ``cvar``).  **Cornish-Fisher VaR**
  ``mean + z_cf * std`` with the population skew / excess kurtosis and
  ``std`` ddof=1; **Cornish-Fisher CVaR** the average of that VaR over the
  tail levels ``u <= q`` (closed form in :func:`_cornish_fisher`).
* **Best / worst month and year**: calendar periods compounded from the
  returns dated in them (QuantStats' ``best``/``worst`` with ``aggregate="ME"``
  / ``"YE"``), dated by the period's first and last calendar day.
* **Captures** over the common periods: ``ann(r | b > 0) / ann(b | b > 0)``
  (up), the same for ``b < 0`` (down), up / down (capture ratio) and over all
  common periods (total), ``ann(x) = prod(1 + x) ** (P / n) - 1``: empyrical's
  ``up_capture``, ``down_capture``, ``up_down_capture``, ``capture``.
* **Treynor** ``mean(r - rf_p) * P / beta`` over the common periods.

Where QuantStats (0.0.86) differs
---------------------------------
* Gaps: it builds returns with ``pct_change(fill_method=None)``, so the
  return spanning a price gap is dropped (NaN) instead of being computed
  between the surrounding prices.  Older QuantStats releases went further and
  filled missing returns with 0, which lowers volatility and flatters ratios.
* ``conditional_value_at_risk`` / ``cvar`` defaults to the Gaussian
  (parametric) expected shortfall, not the historical tail mean.
* ``greeks`` alpha is arithmetic, ``(mean(r) - beta * mean(b)) * P``, without
  risk-free adjustment or compounding; its ``information_ratio`` is not
  annualised.
* ``skew`` / ``kurtosis`` are pandas' bias-corrected estimators.
* ``win_rate`` excludes zero returns from the denominator.
* Its ``max_drawdown``, ``sharpe``, ``sortino``, ``volatility`` and ``cagr``
  (``count()`` periods) agree with the definitions above.

Portfolios
----------
:func:`portfolio_returns` values a portfolio of the price columns: weights are
fractions of portfolio value, must sum to 1 within 1e-9 and be non-negative
unless ``allow_short`` is set.  ``rebalance="none"`` buys once at the first
row and holds; ``"daily"`` restores the target weights at every close;
``"weekly"``, ``"monthly"``, ``"quarterly"``, ``"annual"`` restore them at the
close of the last row of each calendar week (Monday-Sunday), month, quarter
and year.  No transaction costs.  Every asset needs a price on the first row;
later missing prices carry the last known price (the holding is marked at its
last price), so the move over a gap is booked on the row that ends it, as
for single symbols.  Covariance is the sample covariance (``ddof=1``) of the
asset returns on the rows where *all* assets have a return (listwise
deletion, which keeps the matrix positive semi-definite) multiplied by ``P``
(annualised).  Risk contributions are the Euler decomposition of the
annualised portfolio volatility ``sigma_p = sqrt(w' S w)``: ``c_i = w_i (S
w)_i / sigma_p`` (they sum to ``sigma_p``) and shares ``c_i / sigma_p`` (sum
to 1).

Implementation
--------------
Everything runs on a ``(symbols, periods)`` array with one numpy operation per
step for all symbols.  Without gaps (every symbol has a return on every
period after the first) a view of the returns is used directly; otherwise
missing returns are zero-filled and a mask keeps them out of means, moments,
tails and the drawdown dates.  Tail quantiles use ``np.partition`` and sort
only the few smallest returns (one partition serves both tails when there
are no gaps); matrix-vector products use einsum, not BLAS.  On 500 symbols x
10 years of daily prices the full extended metric set takes about 95 ms on a
busy 2-core machine (``benchmarks/bench_metrics.py``), ~300x faster than
empyrical called per symbol and 8-14x faster than its 2-D paths in the same
run (the ratio moves with the machine's load).

Validation
----------
Bad input raises :class:`MetricsInputError` (a ``ValueError``) whose
``field`` names the offending argument.  ``periods_per_year`` must be a
finite number in [1, 366]: dates have day resolution, so there can be at most
one period per calendar day.  ``risk_free`` must lie in (-1, 1) (i.e. -100%
to +100% a year).  Every symbol needs at least 2 returns (and at least 2
returns in common with the benchmark); prices must be > 0 and returns >= -1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from statistics import NormalDist
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
DateArray = npt.NDArray[np.datetime64]

InputKind = Literal["prices", "returns"]
RollingMetricName = Literal[
    "volatility",
    "sharpe",
    "beta",
    "drawdown",
    "sortino",
    "information_ratio",
    "downside_capture",
]
# Rolling metrics computed against the benchmark (they need ``benchmark_returns``).
BENCHMARK_ROLLING_METRICS: Final[frozenset[str]] = frozenset(
    {"beta", "information_ratio", "downside_capture"}
)
Rebalance = Literal["none", "daily", "weekly", "monthly", "quarterly", "annual"]

DEFAULT_PERIODS_PER_YEAR: Final = 252
MIN_PERIODS_PER_YEAR: Final = 1.0
MAX_PERIODS_PER_YEAR: Final = 366.0
WEIGHT_SUM_TOLERANCE: Final = 1e-9
MIN_RETURNS: Final = 2
# Tail probabilities of the 95% / 99% VaR written as decimals: 1 - 0.95 in
# floating point is 0.050000000000000044, which would shift floor((n-1)q).
TAIL_95: Final = 0.05
TAIL_99: Final = 0.01
# Same threshold as empyrical's beta: below it the benchmark is treated as flat.
_MIN_BENCHMARK_VARIANCE: Final = 1e-30


class MetricsInputError(ValueError):
    """Invalid input for a metric computation; ``field`` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatedReturn:
    """A single-period return and the date of the row it belongs to."""

    value: float
    date: date


@dataclass(frozen=True, slots=True)
class DrawdownInfo:
    """Maximum drawdown and its timing (see module docstring for the rules)."""

    max_drawdown: float  # <= 0, fraction of the running peak
    peak_date: date | None  # None when there was no drawdown at all
    trough_date: date | None
    recovery_date: date | None  # None when not (yet) recovered
    duration_periods: int  # peak -> recovery (or last observation)
    duration_days: int

    @property
    def recovered(self) -> bool:
        return self.recovery_date is not None


@dataclass(frozen=True, slots=True)
class BenchmarkRelative:
    """Metrics of a symbol relative to the benchmark, over common periods."""

    benchmark: str
    beta: float
    alpha: float  # annualised geometrically (Jensen, empyrical)
    tracking_error: float  # annualised
    information_ratio: float  # annualised
    n_common: int
    first_date: date  # the common window: first and last day both have a return
    last_date: date
    # Capture ratios over the common periods on which the benchmark rose / fell
    # (empyrical's up_capture / down_capture), their ratio (up_down_capture) and the
    # capture over all common periods (empyrical's capture); NaN when undefined.
    up_capture: float = math.nan
    down_capture: float = math.nan
    capture_ratio: float = math.nan
    total_capture: float = math.nan
    treynor: float = math.nan  # mean(r - rf_p) * P / beta


@dataclass(frozen=True, slots=True)
class PeriodReturn:
    """The compounded return of one calendar month or year."""

    value: float
    period_start: date  # first calendar day of the period
    period_end: date  # last calendar day of the period
    n_returns: int  # returns compounded (a partial first / last period has fewer)


@dataclass(frozen=True, slots=True)
class SymbolMetrics:
    """The full metric set of one symbol."""

    symbol: str
    start_date: date  # date of the starting wealth (see module docstring)
    end_date: date  # date of the last return
    n_returns: int
    total_return: float
    cagr: float
    volatility: float  # annualised
    sharpe: float
    sortino: float
    calmar: float
    drawdown: DrawdownInfo
    var_95: float  # historical, negative = loss
    var_99: float
    cvar_95: float  # historical
    cvar_99: float
    parametric_var_95: float  # Gaussian
    parametric_var_99: float
    skew: float
    kurtosis: float  # excess
    best: DatedReturn
    worst: DatedReturn
    positive_share: float
    relative: BenchmarkRelative | None
    # Why `relative` is None although a benchmark was asked for ("" otherwise).
    relative_unavailable: str = ""
    # -- the extended set (defaults only for hand-built instances) --
    omega: float = math.nan  # threshold: per-period risk-free unless given
    tail_ratio: float = math.nan  # |q95| / |q05|
    stability: float = math.nan  # R^2 of cumulative log return on time
    win_rate: float = math.nan  # count(r > 0) / count(r != 0)
    parametric_cvar_95: float = math.nan  # Gaussian expected shortfall
    parametric_cvar_99: float = math.nan
    cornish_fisher_var_95: float = math.nan
    cornish_fisher_var_99: float = math.nan
    cornish_fisher_cvar_95: float = math.nan
    cornish_fisher_cvar_99: float = math.nan
    best_month: PeriodReturn | None = None
    worst_month: PeriodReturn | None = None
    best_year: PeriodReturn | None = None
    worst_year: PeriodReturn | None = None


@dataclass(frozen=True, slots=True)
class RollingSeries:
    """A rolling metric aligned with the input dates (NaN where undefined)."""

    metric: RollingMetricName
    window: int
    dates: DateArray
    values: FloatArray


@dataclass(frozen=True, slots=True)
class RiskContributions:
    """Euler decomposition of annualised portfolio volatility."""

    portfolio_volatility: float
    contributions: FloatArray  # w_i (S w)_i / sigma_p, sums to sigma_p
    shares: FloatArray  # contributions / sigma_p, sums to 1


@dataclass(frozen=True, slots=True)
class PortfolioAnalysis:
    """Everything the portfolio endpoint reports, computed in one call."""

    symbols: tuple[str, ...]
    weights: FloatArray
    rebalance: Rebalance
    dates: DateArray
    returns: FloatArray  # portfolio returns, NaN on the first row
    metrics: SymbolMetrics
    covariance: FloatArray  # annualised
    correlation: FloatArray
    risk: RiskContributions


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_periods_per_year(periods_per_year: float) -> float:
    try:
        value = float(periods_per_year)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError("periods_per_year", "must be a number") from exc
    if not math.isfinite(value) or not MIN_PERIODS_PER_YEAR <= value <= MAX_PERIODS_PER_YEAR:
        raise MetricsInputError(
            "periods_per_year",
            f"must be between {MIN_PERIODS_PER_YEAR:g} and {MAX_PERIODS_PER_YEAR:g}, "
            f"got {periods_per_year!r}",
        )
    return value


def _check_risk_free(risk_free: float) -> float:
    try:
        value = float(risk_free)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError("risk_free", "must be a number") from exc
    if not math.isfinite(value) or not -1.0 < value < 1.0:
        raise MetricsInputError("risk_free", f"annual rate must be in (-1, 1), got {risk_free!r}")
    return value


def per_period_risk_free(risk_free: float, periods_per_year: float) -> float:
    """Convert an annual risk-free rate to the per-period rate (geometric)."""
    rf = _check_risk_free(risk_free)
    p = _check_periods_per_year(periods_per_year)
    return float((1.0 + rf) ** (1.0 / p) - 1.0)


def omega_threshold_per_period(
    threshold: float | None, risk_free: float, periods_per_year: float
) -> float:
    """The Omega ratio's per-period threshold: the annual ``threshold`` converted like
    the risk-free rate, or the per-period risk-free rate when it is None."""
    if threshold is None:
        return per_period_risk_free(risk_free, periods_per_year)
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError("omega_threshold", "must be a number") from exc
    if not math.isfinite(value) or not -1.0 < value < 1.0:
        raise MetricsInputError(
            "omega_threshold", f"annual rate must be in (-1, 1), got {threshold!r}"
        )
    p = _check_periods_per_year(periods_per_year)
    return float((1.0 + value) ** (1.0 / p) - 1.0)


def _as_dates(dates: npt.ArrayLike, n_rows: int) -> DateArray:
    try:
        out = np.asarray(dates, dtype="datetime64[D]")
    except (TypeError, ValueError) as exc:
        raise MetricsInputError("dates", "not convertible to datetime64[D]") from exc
    if out.ndim != 1 or out.shape[0] != n_rows:
        raise MetricsInputError("dates", f"need one date per row ({n_rows}), got shape {out.shape}")
    if np.isnat(out).any():
        raise MetricsInputError("dates", "contains NaT")
    if n_rows > 1 and not bool((out[1:] > out[:-1]).all()):
        raise MetricsInputError("dates", "must be strictly increasing")
    return out


def _as_matrix(values: npt.ArrayLike, field: str) -> FloatArray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError(field, "not convertible to float64") from exc
    if arr.ndim == 1:
        arr = arr[:, np.newaxis]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MetricsInputError(field, f"need a non-empty 2-D array, got shape {arr.shape}")
    if np.isinf(arr).any():
        raise MetricsInputError(field, "contains infinite values")
    return arr


def _check_symbols(symbols: Sequence[str], n_columns: int) -> tuple[str, ...]:
    names = tuple(str(s) for s in symbols)
    if len(names) != n_columns:
        raise MetricsInputError(
            "symbols", f"need one symbol per column ({n_columns}), got {len(names)}"
        )
    if len(set(names)) != len(names):
        raise MetricsInputError("symbols", "symbols must be unique")
    return names


def _check_kind(kind: str) -> InputKind:
    if kind not in get_args(InputKind):
        raise MetricsInputError("kind", f"must be 'prices' or 'returns', got {kind!r}")
    return kind  # type: ignore[return-value]


def _check_value_domain(rows: FloatArray, kind: InputKind, field: str) -> None:
    """Prices must be positive and returns cannot lose more than everything."""
    with np.errstate(invalid="ignore"):
        bad = rows <= 0.0 if kind == "prices" else rows < -1.0
    if bad.any():
        what = "prices must be > 0" if kind == "prices" else "returns must be >= -1"
        raise MetricsInputError(field, what)


# ---------------------------------------------------------------------------
# Returns construction
# ---------------------------------------------------------------------------


def _last_valid_index(valid: BoolArray) -> IntArray:
    """Per row: index of the latest valid column at or before t, or -1."""
    n = valid.shape[-1]
    idx = np.where(valid, np.arange(n, dtype=np.intp), np.intp(-1))
    return np.maximum.accumulate(idx, axis=-1)


def _returns_from_prices_rows(prices: FloatArray, has_nan: bool) -> FloatArray:
    """Returns between consecutive available prices, on a (symbols, periods) array."""
    out = np.full(prices.shape, np.nan)
    if not has_nan:  # the common case: a plain ratio of neighbours
        np.divide(prices[:, 1:], prices[:, :-1], out=out[:, 1:])
        out[:, 1:] -= 1.0
        return out
    valid = ~np.isnan(prices)
    last = _last_valid_index(valid)
    prev_idx = np.full_like(last, -1)
    prev_idx[:, 1:] = last[:, :-1]
    prev_price = np.take_along_axis(prices, np.maximum(prev_idx, 0), axis=1)
    has_return = valid & (prev_idx >= 0)
    np.divide(prices, prev_price, out=out, where=has_return)
    out[has_return] -= 1.0
    return out


def simple_returns(prices: npt.ArrayLike) -> FloatArray:
    """Simple returns between consecutive available prices, same shape as input.

    Row ``t`` of a column holds ``p_t / p_prev - 1`` when the column has a
    price on row ``t`` and an earlier one; otherwise NaN (never 0).
    """
    matrix = _as_matrix(prices, "prices")
    _check_value_domain(matrix, "prices", "prices")
    rows = np.ascontiguousarray(matrix.T)
    out: FloatArray = np.ascontiguousarray(
        _returns_from_prices_rows(rows, bool(np.isnan(rows).any())).T
    )
    return out.reshape(np.shape(prices)) if np.ndim(prices) == 1 else out


@dataclass(frozen=True, slots=True)
class _Panel:
    """Returns laid out (symbols, periods) plus bookkeeping per symbol.

    ``x`` is the working array: ``returns[:, offset:]`` with missing returns
    replaced by 0, so products, sums and ``> 0`` counts need no mask.  When
    every symbol has a return on every period from ``offset`` on (no gaps),
    ``mask`` is None and ``x`` is a view; otherwise ``mask`` marks real
    returns and ``offset`` is 0.  Indices found on ``x`` are shifted back by
    ``offset``.
    """

    returns: FloatArray  # (K, T), NaN = no return
    x: FloatArray  # (K, T - offset)
    mask: BoolArray | None  # (K, T - offset); None = all real returns
    offset: int
    n: IntArray  # (K,) number of returns
    base: IntArray  # (K,) row of the starting wealth
    last: IntArray  # (K,) row of the last return
    base_has_return: BoolArray  # (K,) base row itself carries a return (return input)


def _first_true(mask: BoolArray) -> IntArray:
    """Index of the first True per row (0 when there is none)."""
    return np.argmax(mask, axis=1).astype(np.intp)


def _last_true(mask: BoolArray) -> IntArray:
    """Index of the last True per row (T-1 when there is none)."""
    n = mask.shape[1]
    return (n - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.intp)


def _dense_offset(valid: BoolArray) -> int | None:
    """First period with any return if every symbol has all returns from there on."""
    offset = int(np.argmax(valid.any(axis=0)))
    return offset if bool(valid[:, offset:].all()) else None


def _build_panel(rows: FloatArray, kind: InputKind) -> _Panel:
    """Turn (K, T) prices or returns into the returns panel used by all metrics."""
    has_nan = bool(np.isnan(rows).any())
    returns = _returns_from_prices_rows(rows, has_nan) if kind == "prices" else rows
    k, t = returns.shape
    if not has_nan and kind == "prices" and t > 1:
        offset: int | None = 1  # row 0 has no return, every later row does
        valid = None
    else:
        valid = ~np.isnan(returns)
        offset = _dense_offset(valid)
    if offset is not None:
        # No gaps: every symbol starts on `offset` and has a return on every later row.
        base = np.full(k, max(offset - 1, 0), dtype=np.intp)
        return _Panel(
            returns,
            returns[:, offset:],
            None,
            offset,
            np.full(k, t - offset, dtype=np.intp),
            base,
            np.full(k, t - 1, dtype=np.intp),
            np.full(k, offset == 0),
        )
    assert valid is not None
    if kind == "prices":
        base = _first_true(~np.isnan(rows))
    else:
        base = np.maximum(_first_true(valid) - 1, 0)
    return _Panel(
        returns,
        np.where(valid, returns, 0.0),
        valid,
        0,
        valid.sum(axis=1).astype(np.intp),
        base,
        _last_true(valid),
        valid[np.arange(k), base],
    )


def _require_min_returns(n: IntArray, symbols: Sequence[str], field: str) -> None:
    short = [s for s, count in zip(symbols, n.tolist(), strict=True) if count < MIN_RETURNS]
    if short:
        listed = ", ".join(short[:10]) + (" ..." if len(short) > 10 else "")
        raise MetricsInputError(
            field, f"need at least {MIN_RETURNS} returns per symbol; too few for {listed}"
        )


def too_few_common(benchmark: str, symbol: str, n_common: int) -> str:
    """Why a symbol has no relative figures: the benchmark's fault, said so."""
    return (
        f"the benchmark {benchmark} shares {n_common} return{'s' * (n_common != 1)} with "
        f"{symbol} in the window (at least {MIN_RETURNS} are needed): it has too little data "
        "there; the absolute figures are unaffected"
    )


# ---------------------------------------------------------------------------
# Vectorised metric blocks (all operate on (K, T) arrays along axis 1)
# ---------------------------------------------------------------------------


def _safe_divide(num: FloatArray, den: FloatArray) -> FloatArray:
    """num / den with NaN wherever the denominator is zero or NaN."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=(den != 0.0) & ~np.isnan(den))
    return out


def _rowdot(a: FloatArray, b: FloatArray) -> FloatArray:
    """Row-wise sum of a * b without materialising the product."""
    out: FloatArray = np.einsum("ij,ij->i", a, b)
    return out


def _rowvec(a: FloatArray, v: FloatArray) -> FloatArray:
    """a @ v for a (K, T) matrix and a (T,) vector.  einsum's own loop, not BLAS: a
    multithreaded BLAS gemv is several times slower on a busy machine."""
    out: FloatArray = np.einsum("ij,j->i", a, v)
    return out


def _centred(x: FloatArray, mean: FloatArray, mask: BoolArray | None) -> FloatArray:
    """x - mean per row, with 0 where there is no observation."""
    dev = x - mean[:, np.newaxis]
    if mask is not None:
        dev *= mask
    return dev


@dataclass(frozen=True, slots=True)
class _Moments:
    mean: FloatArray
    std: FloatArray  # ddof=1
    skew: FloatArray
    kurtosis: FloatArray


def _moments(panel: _Panel) -> _Moments:
    n = panel.n.astype(np.float64)
    mean = panel.x.sum(axis=1) / n
    dev = _centred(panel.x, mean, panel.mask)
    dev2 = dev * dev
    m2 = dev2.sum(axis=1) / n
    m3 = _rowdot(dev2, dev) / n
    m4 = _rowdot(dev2, dev2) / n
    std = np.sqrt(m2 * n / (n - 1.0))
    # scipy returns NaN when m2 is numerically zero relative to the mean.
    flat = m2 <= (np.finfo(np.float64).resolution * mean) ** 2
    m2_safe = np.where(flat, np.nan, m2)
    return _Moments(mean, std, m3 / m2_safe**1.5, m4 / m2_safe**2 - 3.0)


def _sortino(panel: _Panel, excess_mean: FloatArray, rf_p: float, p: float) -> FloatArray:
    shortfall = panel.x - rf_p
    np.minimum(shortfall, 0.0, out=shortfall)
    if panel.mask is not None:
        shortfall *= panel.mask
    downside = np.sqrt(_rowdot(shortfall, shortfall) / panel.n) * math.sqrt(p)
    return _safe_divide(excess_mean * p, downside)


@dataclass(frozen=True, slots=True)
class _Drawdowns:
    growth: FloatArray  # final wealth prod(1 + r), a by-product of the wealth path
    max_drawdown: FloatArray
    peak: IntArray  # row of the peak (the base row when the peak is the start)
    trough: IntArray
    recovery: IntArray  # -1 when not recovered
    periods: IntArray
    has_drawdown: BoolArray


def _underwater(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Drawdown from the running peak (the starting wealth 1.0 is the first peak)
    and the final wealth ``prod(1 + r)`` per row, from one wealth path."""
    wealth = 1.0 + x
    np.cumprod(wealth, axis=1, out=wealth)
    growth = wealth[:, -1].copy()
    peak = np.maximum.accumulate(wealth, axis=1)
    np.maximum(peak, 1.0, out=peak)
    wealth -= peak  # (W - M) / M, as empyrical, for bit-level agreement
    wealth /= peak
    return wealth, growth


def _drawdowns(panel: _Panel) -> _Drawdowns:
    dd, growth = _underwater(panel.x)
    rows = np.arange(dd.shape[0])
    col = np.arange(dd.shape[1], dtype=np.intp)
    trough = np.argmin(dd, axis=1).astype(np.intp)
    at_peak = dd == 0.0  # wealth equals its running maximum
    if panel.mask is not None:
        at_peak &= panel.mask
    before = at_peak & (col <= trough[:, np.newaxis])
    from_start = ~before.any(axis=1)
    after = at_peak & (col > trough[:, np.newaxis])
    has_recovery = after.any(axis=1)
    off = panel.offset
    peak = np.where(from_start, panel.base, _last_true(before) + off)
    recovery = np.where(has_recovery, _first_true(after) + off, -1)
    end = np.where(has_recovery, recovery, panel.last)
    # A start-of-wealth peak on a row that carries a return sits *before*
    # that return, so the return belongs to the drawdown.
    extra = from_start & panel.base_has_return
    if panel.mask is None:
        periods = end - peak + extra
    else:
        counts = np.cumsum(panel.mask, axis=1, dtype=np.intp)
        periods = counts[rows, end] - counts[rows, peak] + extra
    mdd = dd[rows, trough]
    return _Drawdowns(growth, mdd, peak, trough + off, recovery, periods.astype(np.intp), mdd < 0.0)


@dataclass(frozen=True, slots=True)
class _Tails:
    var: dict[float, FloatArray]
    cvar: dict[float, FloatArray]
    upper: FloatArray  # the (1 - TAIL_95) = 95th percentile, for the tail ratio


def _sorted_head(data: FloatArray, deepest: int) -> FloatArray:
    """The ``deepest + 1`` smallest values of each row, sorted ascending.

    A partition followed by a sort of the head is ~3x cheaper than sorting
    whole rows; missing returns are NaN and partition/sort put them last.
    """
    head = np.partition(data, deepest, axis=1)[:, : deepest + 1]
    head.sort(axis=1)
    return head


def _tail_heads(panel: _Panel, low: int, high: int) -> tuple[FloatArray, FloatArray]:
    """The ``low + 1`` smallest returns and minus the ``high + 1`` largest of each
    row, both sorted ascending (the top tail as the bottom tail of ``-r``).

    Without gaps one partition at both ends serves the two tails; with gaps the
    missing returns are NaN (sorted last) and each end gets its own partition.
    """
    if panel.mask is None:
        t = panel.x.shape[1]
        if low < t - 1 - high:
            both = np.partition(panel.x, [low, t - 1 - high], axis=1)
            head = np.sort(both[:, : low + 1], axis=1)
            top = np.sort(both[:, t - 1 - high :], axis=1)
            return head, -top[:, ::-1]
        return _sorted_head(panel.x, low), _sorted_head(-panel.x, high)
    head = _sorted_head(np.where(panel.mask, panel.x, np.nan), low)
    return head, _sorted_head(np.where(panel.mask, -panel.x, np.nan), high)


def _tails(panel: _Panel, tails: Sequence[float]) -> _Tails:
    """Historical VaR / CVaR at each tail probability, and the 95th percentile.

    The percentile is minus the ``TAIL_95`` quantile of ``-r``: the same order
    statistics and interpolation weights as ``np.percentile(r, 95)``.
    """
    n = panel.n
    lo = {q: np.floor((n - 1) * q).astype(np.intp) for q in tails}
    # Same float arithmetic as empyrical: int((n - 1) * cutoff) + 1 values.
    size = {q: ((n - 1) * q).astype(np.intp) + 1 for q in tails}
    deepest = int(max(max(int(lo[q].max()) + 1, int(size[q].max())) for q in tails))
    cap = int(n.max()) - 1
    upper_lo = np.floor((n - 1) * TAIL_95).astype(np.intp)
    head, top = _tail_heads(panel, min(deepest, cap), min(int(upper_lo.max()) + 1, cap))
    rows = np.arange(head.shape[0])
    running = np.cumsum(head, axis=1)
    var = {q: _interpolated_quantile(head, rows, n, q, lo[q]) for q in tails}
    cvar = {q: running[rows, size[q] - 1] / size[q] for q in tails}
    upper = -_interpolated_quantile(top, rows, n, TAIL_95, upper_lo)
    return _Tails(var, cvar, upper)


def _interpolated_quantile(
    ordered: FloatArray, rows: IntArray, n: IntArray, q: float, lo: IntArray
) -> FloatArray:
    """numpy's 'linear' percentile on the first n sorted values of each row."""
    h = (n - 1) * q
    hi = np.minimum(lo + 1, n - 1)
    frac = h - lo
    a = ordered[rows, lo]
    b = ordered[rows, hi]
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end for accuracy.
    return np.where(frac >= 0.5, b - diff * (1.0 - frac), a + diff * frac)


def _omega(panel: _Panel, threshold: float) -> FloatArray:
    """sum(max(r - tau, 0)) / sum(max(tau - r, 0)); NaN without a loss below tau."""
    shortfall = panel.x - threshold
    gains = np.maximum(shortfall, 0.0)
    np.minimum(shortfall, 0.0, out=shortfall)
    if panel.mask is not None:
        gains *= panel.mask
        shortfall *= panel.mask
    return _safe_divide(gains.sum(axis=1), -shortfall.sum(axis=1))


def _stability(panel: _Panel, logs: FloatArray) -> FloatArray:
    """R^2 of the OLS fit of the cumulative log return on the return index 0..N-1.

    Centred sums (the index mean is (N - 1) / 2 and its sum of squares
    N (N^2 - 1) / 12 in closed form); missing returns add log(1) = 0 to the
    cumulative sum and are left out of the fit.  NaN for a flat path.
    ``logs`` is ``log1p(panel.x)``; it is overwritten (the cumulative sum is
    taken in place).
    """
    n = panel.n.astype(np.float64)
    path = np.cumsum(logs, axis=1, out=logs)
    if panel.mask is None:
        y_mean = path.sum(axis=1) / n
        path -= y_mean[:, np.newaxis]
        index = np.arange(path.shape[1], dtype=np.float64) - (n[0] - 1.0) / 2.0
        sty = _rowvec(path, index)
    else:
        y_mean = np.where(panel.mask, path, 0.0).sum(axis=1) / n
        path = _centred(path, y_mean, panel.mask)
        index = np.cumsum(panel.mask, axis=1, dtype=np.float64)
        index -= ((n + 1.0) / 2.0)[:, np.newaxis]  # 1-based count minus its mean
        sty = _rowdot(path, index)  # path is 0 where there is no return
    syy = _rowdot(path, path)
    stt = n * (n * n - 1.0) / 12.0
    return np.minimum(_safe_divide(sty * sty, stt * syy), 1.0)


def _cornish_fisher(moments: _Moments, q: float) -> tuple[FloatArray, FloatArray]:
    """Cornish-Fisher VaR and CVaR at tail probability ``q``.

    VaR = mean + z_cf * std with the expanded quantile
    z_cf = z + (z^2 - 1) S / 6 + (z^3 - 3z) K / 24 - (2z^3 - 5z) S^2 / 36
    (S population skew, K population excess kurtosis, std ddof=1).  CVaR is
    the mean of that VaR over the tail levels u <= q, (1/q) int_0^q VaR(u) du,
    which integrates in closed form to
    mean - std * phi(z) / q * (1 + z S / 6 + (z^2 - 1) K / 24 - (2z^2 - 1) S^2 / 36).
    """
    normal = NormalDist()
    z = normal.inv_cdf(q)
    s, k = moments.skew, moments.kurtosis
    z_cf = z + (z * z - 1.0) * s / 6.0 + (z**3 - 3.0 * z) * k / 24.0
    z_cf -= (2.0 * z**3 - 5.0 * z) * s * s / 36.0
    factor = 1.0 + z * s / 6.0 + (z * z - 1.0) * k / 24.0 - (2.0 * z * z - 1.0) * s * s / 36.0
    var = moments.mean + z_cf * moments.std
    cvar = moments.mean - moments.std * (normal.pdf(z) / q) * factor
    return var, cvar


@dataclass(frozen=True, slots=True)
class _Calendar:
    """Best and worst compounded calendar-period return per symbol."""

    best: FloatArray
    worst: FloatArray
    best_key: IntArray  # period number (datetime64[M] or [Y] as an integer)
    worst_key: IntArray
    best_count: IntArray
    worst_count: IntArray


def _segment_starts(keys: npt.NDArray[np.int64]) -> IntArray:
    change = np.ones(keys.shape[0], dtype=bool)
    change[1:] = keys[1:] != keys[:-1]
    return np.flatnonzero(change).astype(np.intp)


def _calendar_extremes(
    log_growth: FloatArray, counts: IntArray, keys: npt.NDArray[np.int64]
) -> _Calendar:
    """Best / worst of the periods a symbol has returns in (first on ties)."""
    valid = counts > 0
    value = np.expm1(log_growth)  # prod(1 + r) - 1
    best = np.argmax(np.where(valid, value, -np.inf), axis=1)
    worst = np.argmin(np.where(valid, value, np.inf), axis=1)
    rows = np.arange(value.shape[0])
    return _Calendar(
        value[rows, best],
        value[rows, worst],
        keys[best],
        keys[worst],
        counts[rows, best],
        counts[rows, worst],
    )


def _calendar(panel: _Panel, logs: FloatArray, days: DateArray) -> tuple[_Calendar, _Calendar]:
    """Calendar months and years compounded from the returns dated in them.

    A return belongs to the period of the row it is stored on (the day of its
    closing price); periods are contiguous because dates increase, so one
    ``add.reduceat`` of ``logs = log1p(x)`` per period kind gives the log
    growth (years from the months), and ``expm1`` the compounded return.
    """
    own_days = days[panel.offset :]
    months = own_days.astype("datetime64[M]").astype(np.int64)
    starts = _segment_starts(months)
    month_growth = np.add.reduceat(logs, starts, axis=1)
    if panel.mask is None:
        sizes = np.diff(np.append(starts, months.shape[0])).astype(np.intp)
        month_counts = np.broadcast_to(sizes, month_growth.shape)
    else:
        month_counts = np.add.reduceat(panel.mask, starts, axis=1, dtype=np.intp)
    month_keys = months[starts]
    years = month_keys // 12  # datetime64[M] counts months from 1970-01
    year_starts = _segment_starts(years)
    year_growth = np.add.reduceat(month_growth, year_starts, axis=1)
    year_counts = np.add.reduceat(month_counts, year_starts, axis=1, dtype=np.intp)
    return (
        _calendar_extremes(month_growth, month_counts, month_keys),
        _calendar_extremes(year_growth, year_counts, years[year_starts]),
    )


@dataclass(frozen=True, slots=True)
class _Relative:
    beta: FloatArray
    alpha: FloatArray
    tracking_error: FloatArray
    information_ratio: FloatArray
    n_common: IntArray
    first: IntArray  # (K,) period of the first / last common return (the common window)
    last: IntArray
    captures: _Captures
    treynor: FloatArray


@dataclass(frozen=True, slots=True)
class _Captures:
    up: FloatArray
    down: FloatArray
    total: FloatArray


def _annualised_growth(growth: FloatArray, n: FloatArray | IntArray, p: float) -> FloatArray:
    """growth ** (P / n) - 1, NaN where there are no periods (empyrical's annual_return)."""
    n_float = np.asarray(n, dtype=np.float64)
    exponent = _safe_divide(np.full(n_float.shape, p), n_float)
    with np.errstate(invalid="ignore"):
        out: FloatArray = growth**exponent - 1.0
    return out


def _capture_part(x: FloatArray, b: FloatArray, part: BoolArray, p: float) -> FloatArray:
    """Annualised growth of x over b on the periods in ``part`` (rows of x)."""
    n = np.broadcast_to(part, x.shape).sum(axis=-1)
    grow_x = np.where(part, 1.0 + x, 1.0).prod(axis=-1)
    grow_b = np.where(part, 1.0 + b, 1.0).prod(axis=-1)
    return _safe_divide(_annualised_growth(grow_x, n, p), _annualised_growth(grow_b, n, p))


def _captures(x: FloatArray, b: FloatArray, n: IntArray, p: float) -> _Captures:
    """Capture ratios of (K, T) returns against the benchmark ``b`` ((T,) or (K, T)).

    Both are 0 outside the common periods, so a 0 benchmark return (neither up nor
    down, as in empyrical) and a missing one drop out alike; ``n`` counts the common
    periods.
    """
    total = _safe_divide(
        _annualised_growth(np.prod(1.0 + x, axis=1), n, p),
        _annualised_growth(np.prod(1.0 + b, axis=-1), n, p),
    )
    return _Captures(_capture_part(x, b, b > 0.0, p), _capture_part(x, b, b < 0.0, p), total)


def _captures_dense(x: FloatArray, logs: FloatArray, b: FloatArray, p: float) -> _Captures:
    """:func:`_captures` when every symbol shares every period with the benchmark:
    the log growth over the up, down and all periods is one matrix product,
    ``ann = expm1(P / n * sum(log1p(r)))``."""
    lb = np.log1p(b)
    if not (np.isfinite(logs).all() and np.isfinite(lb).all()):  # a -100% return
        return _captures(x, b, np.full(x.shape[0], x.shape[1], dtype=np.intp), p)
    parts = np.stack([b > 0.0, b < 0.0, np.ones(b.shape, dtype=bool)]).astype(np.float64)
    counts = parts.sum(axis=1)
    ann_x = np.expm1(_safe_divide(np.einsum("ij,kj->ik", logs, parts) * p, counts))
    ann_b = np.expm1(_safe_divide((parts @ lb) * p, counts))
    ratio = _safe_divide(ann_x, ann_b)
    return _Captures(ratio[:, 0], ratio[:, 1], ratio[:, 2])


def _beta_from(cov: FloatArray, var: FloatArray) -> FloatArray:
    return _safe_divide(cov, np.where(var < _MIN_BENCHMARK_VARIANCE, 0.0, var))


def _active_stats(
    active: FloatArray, mask: BoolArray | None, n: IntArray, p: float
) -> tuple[FloatArray, FloatArray]:
    """Annualised tracking error and information ratio of active returns (0 = none).

    ``active`` is a scratch array (the callers pass a fresh ``x - b``): it is
    centred in place.
    """
    mean = active.sum(axis=1) / n
    dev = active
    dev -= mean[:, np.newaxis]
    if mask is not None:
        dev *= mask
    std = np.sqrt(_safe_divide(_rowdot(dev, dev), (n - 1).astype(np.float64)))
    return std * math.sqrt(p), _safe_divide(mean, std) * math.sqrt(p)


def _relative(
    panel: _Panel,
    logs: FloatArray,
    bench: FloatArray,
    bench_valid: BoolArray,
    rf_p: float,
    p: float,
) -> _Relative:
    """Relative figures; ``logs`` is ``log1p(panel.x)`` (read only)."""
    b = bench[panel.offset :]
    b_valid = bench_valid[panel.offset :]
    if panel.mask is None and bool(b_valid.all()):
        return _relative_dense(panel.x, logs, b, rf_p, p, panel.offset)
    joint = b_valid[np.newaxis, :] if panel.mask is None else panel.mask & b_valid
    return _relative_masked(
        panel.x, b, np.broadcast_to(joint, panel.x.shape), rf_p, p, panel.offset
    )


def _relative_dense(
    x: FloatArray, logs: FloatArray, b: FloatArray, rf_p: float, p: float, offset: int
) -> _Relative:
    """Every symbol and the benchmark observed on the same periods: vector algebra."""
    k, t = x.shape
    n = np.full(k, t, dtype=np.intp)
    b_mean = float(b.mean())
    b_dev = b - b_mean
    var = np.full(k, float(b_dev @ b_dev) / t)
    beta = _beta_from(_rowvec(x, b_dev) / t, var)
    # mean(r - rf - beta (b - rf)) = mean(r) - rf - beta (mean(b) - rf)
    x_mean = x.sum(axis=1) / t
    residual_mean = x_mean - rf_p - beta * (b_mean - rf_p)
    tracking_error, information_ratio = _active_stats(x - b, None, n, p)
    first, last = np.full(k, offset, dtype=np.intp), np.full(k, offset + t - 1, dtype=np.intp)
    alpha = (1.0 + residual_mean) ** p - 1.0
    treynor = _safe_divide((x_mean - rf_p) * p, beta)
    return _Relative(
        beta,
        alpha,
        tracking_error,
        information_ratio,
        n,
        first,
        last,
        _captures_dense(x, logs, b, p),
        treynor,
    )


def _relative_masked(
    x: FloatArray, b: FloatArray, joint: BoolArray, rf_p: float, p: float, offset: int
) -> _Relative:
    """General case: each symbol uses the periods it shares with the benchmark."""
    n = joint.sum(axis=1).astype(np.intp)
    bb = np.where(joint, b, 0.0)
    b_mean = bb.sum(axis=1) / n
    b_dev = _centred(bb, b_mean, joint)
    xx = np.where(joint, x, 0.0)
    var = _rowdot(b_dev, b_dev) / n
    beta = _beta_from(_rowdot(b_dev, xx) / n, var)
    residual = (xx - rf_p) - beta[:, np.newaxis] * (bb - rf_p)
    residual_mean = np.where(joint, residual, 0.0).sum(axis=1) / n
    tracking_error, information_ratio = _active_stats(xx - bb, joint, n, p)
    first = offset + np.argmax(joint, axis=1)
    last = offset + joint.shape[1] - 1 - np.argmax(joint[:, ::-1], axis=1)
    alpha = (1.0 + residual_mean) ** p - 1.0
    treynor = _safe_divide((xx.sum(axis=1) / n - rf_p) * p, beta)
    return _Relative(
        beta,
        alpha,
        tracking_error,
        information_ratio,
        n,
        first,
        last,
        _captures(xx, bb, n, p),
        treynor,
    )


# ---------------------------------------------------------------------------
# Public entry point: all metrics for many symbols
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _BenchmarkPanel:
    name: str
    returns: FloatArray  # (T,)
    valid: BoolArray


def _benchmark_panel(
    benchmark: npt.ArrayLike, kind: InputKind, n_rows: int, name: str
) -> _BenchmarkPanel:
    column = _as_matrix(benchmark, "benchmark")
    if column.shape != (n_rows, 1):
        raise MetricsInputError(
            "benchmark", f"need one value per row ({n_rows}), got shape {np.shape(benchmark)}"
        )
    _check_value_domain(column, kind, "benchmark")
    row = np.ascontiguousarray(column.T)
    returns = _returns_from_prices_rows(row, True)[0] if kind == "prices" else row[0]
    return _BenchmarkPanel(name, returns, ~np.isnan(returns))


def compute_metrics(
    values: npt.ArrayLike,
    dates: npt.ArrayLike,
    symbols: Sequence[str],
    *,
    kind: InputKind = "prices",
    benchmark: npt.ArrayLike | None = None,
    benchmark_symbol: str = "benchmark",
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
    risk_free: float = 0.0,
    omega_threshold: float | None = None,
) -> dict[str, SymbolMetrics]:
    """Compute the full metric set for every column at once.

    ``values`` is (periods, symbols) prices or simple returns (``kind``);
    ``benchmark`` is an optional (periods,) vector of the same kind on the same
    dates, named ``benchmark_symbol`` in the results.  ``omega_threshold`` is
    the Omega ratio's threshold as an annual rate (None: the risk-free rate).
    Returns a dict keyed by symbol in column order.  Raises
    :class:`MetricsInputError`.
    """
    checked_kind = _check_kind(kind)
    p = _check_periods_per_year(periods_per_year)
    rf_p = per_period_risk_free(risk_free, p)
    threshold_p = omega_threshold_per_period(omega_threshold, risk_free, p)
    matrix = _as_matrix(values, "values")
    names = _check_symbols(symbols, matrix.shape[1])
    day_array = _as_dates(dates, matrix.shape[0])
    _check_value_domain(matrix, checked_kind, "values")
    panel = _build_panel(np.ascontiguousarray(matrix.T), checked_kind)
    _require_min_returns(panel.n, names, "values")
    relative = None
    # log1p of the returns (0 where missing): the dense captures read it, the
    # stability fit then turns it into the cumulative log return in place.
    with np.errstate(divide="ignore"):  # log(0) of a -100% return is -inf
        logs = np.log1p(panel.x)
    if benchmark is not None:
        bench = _benchmark_panel(benchmark, checked_kind, matrix.shape[0], benchmark_symbol)
        relative = _relative(panel, logs, bench.returns, bench.valid, rf_p, p)
    table = _metric_table(panel, rf_p, p)
    extended = _extended_table(panel, table, day_array, threshold_p, logs)
    return _assemble(names, day_array, panel, table, extended, relative, benchmark_symbol)


@dataclass(frozen=True, slots=True)
class _MetricTable:
    total_return: FloatArray
    cagr: FloatArray
    volatility: FloatArray
    sharpe: FloatArray
    sortino: FloatArray
    calmar: FloatArray
    moments: _Moments
    drawdowns: _Drawdowns
    tails: _Tails
    parametric_var: dict[float, FloatArray]
    best: IntArray  # row
    worst: IntArray
    positive: IntArray  # count(r > 0)
    positive_share: FloatArray


def _extreme_rows(panel: _Panel) -> tuple[IntArray, IntArray]:
    """Rows of the best and worst return (first occurrence)."""
    if panel.mask is None:
        best, worst = np.argmax(panel.x, axis=1), np.argmin(panel.x, axis=1)
    else:
        best = np.argmax(np.where(panel.mask, panel.x, -np.inf), axis=1)
        worst = np.argmin(np.where(panel.mask, panel.x, np.inf), axis=1)
    return best + panel.offset, worst + panel.offset


def _metric_table(panel: _Panel, rf_p: float, p: float) -> _MetricTable:
    drawdowns = _drawdowns(panel)
    growth = drawdowns.growth  # missing returns are 0 in x, so they do not compound
    cagr = growth ** (p / panel.n) - 1.0
    moments = _moments(panel)
    excess_mean = moments.mean - rf_p
    normal = NormalDist()
    best, worst = _extreme_rows(panel)
    positive = np.count_nonzero(panel.x > 0.0, axis=1)
    return _MetricTable(
        total_return=growth - 1.0,
        cagr=cagr,
        volatility=moments.std * math.sqrt(p),
        sharpe=_safe_divide(excess_mean, moments.std) * math.sqrt(p),
        sortino=_sortino(panel, excess_mean, rf_p, p),
        calmar=_safe_divide(cagr, np.abs(drawdowns.max_drawdown)),
        moments=moments,
        drawdowns=drawdowns,
        tails=_tails(panel, (TAIL_95, TAIL_99)),
        parametric_var={
            q: moments.mean + normal.inv_cdf(q) * moments.std for q in (TAIL_95, TAIL_99)
        },
        best=best,
        worst=worst,
        positive=positive,
        positive_share=_safe_divide(positive.astype(np.float64), panel.n.astype(np.float64)),
    )


@dataclass(frozen=True, slots=True)
class _ExtendedTable:
    omega: FloatArray
    tail_ratio: FloatArray
    stability: FloatArray
    win_rate: FloatArray
    parametric_cvar: dict[float, FloatArray]
    cornish_fisher_var: dict[float, FloatArray]
    cornish_fisher_cvar: dict[float, FloatArray]
    months: _Calendar
    years: _Calendar


def _extended_table(
    panel: _Panel, table: _MetricTable, days: DateArray, threshold_p: float, logs: FloatArray
) -> _ExtendedTable:
    """The extended set; consumes ``logs`` (see :func:`_stability`)."""
    moments = table.moments
    normal = NormalDist()
    upper = table.tails.upper
    lower = table.tails.var[TAIL_95]
    positive = table.positive.astype(np.float64)
    # Missing returns are 0 in x, so every non-zero entry is a real, non-zero return.
    non_zero = np.count_nonzero(panel.x, axis=1).astype(np.float64)
    cornish_fisher = {q: _cornish_fisher(moments, q) for q in (TAIL_95, TAIL_99)}
    months, years = _calendar(panel, logs, days)  # before _stability overwrites logs
    return _ExtendedTable(
        omega=_omega(panel, threshold_p),
        tail_ratio=_safe_divide(np.abs(upper), np.abs(lower)),
        stability=_stability(panel, logs),
        win_rate=_safe_divide(positive, non_zero),
        parametric_cvar={
            q: moments.mean - moments.std * (normal.pdf(normal.inv_cdf(q)) / q)
            for q in (TAIL_95, TAIL_99)
        },
        cornish_fisher_var={q: v for q, (v, _) in cornish_fisher.items()},
        cornish_fisher_cvar={q: c for q, (_, c) in cornish_fisher.items()},
        months=months,
        years=years,
    )


def _to_date(day: np.datetime64) -> date:
    value = day.astype("datetime64[D]").item()
    assert isinstance(value, date)
    return value


def _drawdown_infos(dd: _Drawdowns, days: list[date], last: list[int]) -> list[DrawdownInfo]:
    out = []
    rows = zip(
        dd.has_drawdown.tolist(),
        dd.max_drawdown.tolist(),
        dd.peak.tolist(),
        dd.trough.tolist(),
        dd.recovery.tolist(),
        dd.periods.tolist(),
        last,
        strict=True,
    )
    for has, mdd, peak, trough, recovery, periods, end_row in rows:
        if not has:
            out.append(DrawdownInfo(0.0, None, None, None, 0, 0))
            continue
        end = recovery if recovery >= 0 else end_row
        out.append(
            DrawdownInfo(
                max_drawdown=mdd,
                peak_date=days[peak],
                trough_date=days[trough],
                recovery_date=days[recovery] if recovery >= 0 else None,
                duration_periods=periods,
                duration_days=(days[end] - days[peak]).days,
            )
        )
    return out


def _relative_infos(
    rel: _Relative | None, name: str, k: int, days: list[date]
) -> list[BenchmarkRelative | None]:
    """Per symbol: its relative figures, or None when it shares too few returns."""
    if rel is None:
        return [None] * k
    caps = rel.captures
    rows = zip(
        rel.beta.tolist(),
        rel.alpha.tolist(),
        rel.tracking_error.tolist(),
        rel.information_ratio.tolist(),
        rel.n_common.tolist(),
        [days[i] for i in rel.first.tolist()],
        [days[i] for i in rel.last.tolist()],
        caps.up.tolist(),
        caps.down.tolist(),
        _safe_divide(caps.up, caps.down).tolist(),
        caps.total.tolist(),
        rel.treynor.tolist(),
        strict=True,
    )
    return [BenchmarkRelative(name, *row) if row[4] >= MIN_RETURNS else None for row in rows]


def _unavailable(names: tuple[str, ...], rel: _Relative | None, bench_name: str) -> list[str]:
    if rel is None:
        return [""] * len(names)
    return [
        "" if n >= MIN_RETURNS else too_few_common(bench_name, s, n)
        for s, n in zip(names, rel.n_common.tolist(), strict=True)
    ]


def _dated(panel: _Panel, rows: IntArray, days: list[date]) -> list[DatedReturn]:
    values = panel.returns[np.arange(rows.size), rows].tolist()
    return [DatedReturn(v, days[r]) for v, r in zip(values, rows.tolist(), strict=True)]


def _period_spans(keys: IntArray, unit: str) -> dict[int, tuple[date, date]]:
    """First and last calendar day of each period number (datetime64[unit] as int)."""
    distinct = np.unique(keys)
    starts = distinct.astype(f"datetime64[{unit}]")
    first: list[date] = starts.astype("datetime64[D]").tolist()
    last: list[date] = ((starts + 1).astype("datetime64[D]") - 1).tolist()
    return dict(zip(distinct.tolist(), zip(first, last, strict=True), strict=True))


def _period_returns(cal: _Calendar, monthly: bool) -> dict[str, list[PeriodReturn]]:
    spans = _period_spans(np.concatenate([cal.best_key, cal.worst_key]), "M" if monthly else "Y")

    def boxed(values: FloatArray, keys: IntArray, counts: IntArray) -> list[PeriodReturn]:
        return [
            PeriodReturn(v, *spans[key], count)
            for v, key, count in zip(values.tolist(), keys.tolist(), counts.tolist(), strict=True)
        ]

    unit = "month" if monthly else "year"
    return {
        f"best_{unit}": boxed(cal.best, cal.best_key, cal.best_count),
        f"worst_{unit}": boxed(cal.worst, cal.worst_key, cal.worst_count),
    }


_FIELD_NAMES: Final = [f.name for f in dataclasses.fields(SymbolMetrics)]
_EXTENDED_FIELDS: Final = tuple(_FIELD_NAMES[_FIELD_NAMES.index("relative_unavailable") + 1 :])


def _extended_columns(ext: _ExtendedTable) -> dict[str, list[object]]:
    """The extended fields of SymbolMetrics by name, one list entry per symbol."""
    return {
        "omega": ext.omega.tolist(),
        "tail_ratio": ext.tail_ratio.tolist(),
        "stability": ext.stability.tolist(),
        "win_rate": ext.win_rate.tolist(),
        "parametric_cvar_95": ext.parametric_cvar[TAIL_95].tolist(),
        "parametric_cvar_99": ext.parametric_cvar[TAIL_99].tolist(),
        "cornish_fisher_var_95": ext.cornish_fisher_var[TAIL_95].tolist(),
        "cornish_fisher_var_99": ext.cornish_fisher_var[TAIL_99].tolist(),
        "cornish_fisher_cvar_95": ext.cornish_fisher_cvar[TAIL_95].tolist(),
        "cornish_fisher_cvar_99": ext.cornish_fisher_cvar[TAIL_99].tolist(),
        **_period_returns(ext.months, monthly=True),
        **_period_returns(ext.years, monthly=False),
    }


def _assemble(
    names: tuple[str, ...],
    day_array: DateArray,
    panel: _Panel,
    tab: _MetricTable,
    ext: _ExtendedTable,
    rel: _Relative | None,
    bench_name: str,
) -> dict[str, SymbolMetrics]:
    """Box the vectorised arrays into per-symbol dataclasses (O(K), via plain lists)."""
    days: list[date] = day_array.tolist()
    extended = _extended_columns(ext)
    # They follow relative_unavailable in SymbolMetrics, in this order.
    assert tuple(extended) == _EXTENDED_FIELDS
    last = panel.last.tolist()
    columns = zip(
        names,
        [days[i] for i in panel.base.tolist()],
        [days[i] for i in last],
        panel.n.tolist(),
        tab.total_return.tolist(),
        tab.cagr.tolist(),
        tab.volatility.tolist(),
        tab.sharpe.tolist(),
        tab.sortino.tolist(),
        tab.calmar.tolist(),
        _drawdown_infos(tab.drawdowns, days, last),
        tab.tails.var[TAIL_95].tolist(),
        tab.tails.var[TAIL_99].tolist(),
        tab.tails.cvar[TAIL_95].tolist(),
        tab.tails.cvar[TAIL_99].tolist(),
        tab.parametric_var[TAIL_95].tolist(),
        tab.parametric_var[TAIL_99].tolist(),
        tab.moments.skew.tolist(),
        tab.moments.kurtosis.tolist(),
        _dated(panel, tab.best, days),
        _dated(panel, tab.worst, days),
        tab.positive_share.tolist(),
        _relative_infos(rel, bench_name, len(names), days),
        _unavailable(names, rel, bench_name),
        *extended.values(),
        strict=True,
    )
    return {row[0]: SymbolMetrics(*row) for row in columns}


# ---------------------------------------------------------------------------
# Rolling metrics
# ---------------------------------------------------------------------------


def _windows(x: FloatArray, window: int) -> FloatArray:
    view: FloatArray = np.lib.stride_tricks.sliding_window_view(x, window)
    return view


def _rolling_std(win: FloatArray) -> FloatArray:
    out: FloatArray = np.std(win, axis=1, ddof=1)
    return out


def _rolling_values(
    metric: RollingMetricName,
    x: FloatArray,
    b: FloatArray | None,
    window: int,
    rf_p: float,
    p: float,
) -> FloatArray:
    """The metric for every full window of the compressed observations."""
    win = _windows(x, window)
    if metric == "volatility":
        return _rolling_std(win) * math.sqrt(p)
    if metric == "sharpe":
        excess = win - rf_p
        return _safe_divide(excess.mean(axis=1), _rolling_std(excess)) * math.sqrt(p)
    if metric == "sortino":
        excess = win - rf_p
        shortfall = np.minimum(excess, 0.0)
        downside = np.sqrt((shortfall * shortfall).mean(axis=1)) * math.sqrt(p)
        return _safe_divide(excess.mean(axis=1) * p, downside)
    if metric in BENCHMARK_ROLLING_METRICS:
        assert b is not None
        return _rolling_relative(metric, win, _windows(b, window), p)
    wealth = np.cumprod(1.0 + win, axis=1)
    peak = np.maximum.accumulate(np.maximum(wealth, 1.0), axis=1)
    out: FloatArray = ((wealth - peak) / peak).min(axis=1)
    return out


def _rolling_relative(
    metric: RollingMetricName, win: FloatArray, bwin: FloatArray, p: float
) -> FloatArray:
    """Beta, information ratio or downside capture of each window against its benchmark."""
    if metric == "information_ratio":
        active = win - bwin
        return _safe_divide(active.mean(axis=1), _rolling_std(active)) * math.sqrt(p)
    if metric == "downside_capture":
        return _capture_part(win, bwin, bwin < 0.0, p)
    b_dev = bwin - bwin.mean(axis=1, keepdims=True)
    var = (b_dev * b_dev).mean(axis=1)
    cov = (b_dev * win).mean(axis=1)
    return _safe_divide(cov, np.where(var < _MIN_BENCHMARK_VARIANCE, 0.0, var))


def _check_window(window: int, available: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int | np.integer):
        raise MetricsInputError("window", "must be an integer")
    if window < 2:
        raise MetricsInputError("window", f"must be at least 2, got {window}")
    if window > available:
        raise MetricsInputError(
            "window", f"window {window} is longer than the {available} available returns"
        )
    return int(window)


def _as_return_vector(values: npt.ArrayLike, field: str) -> FloatArray:
    arr = _as_matrix(values, field)
    if arr.shape[1] != 1:
        raise MetricsInputError(field, "need a 1-D series of returns")
    _check_value_domain(arr, "returns", field)
    return arr[:, 0]


def rolling_metric(
    returns: npt.ArrayLike,
    dates: npt.ArrayLike,
    metric: RollingMetricName,
    window: int,
    *,
    benchmark_returns: npt.ArrayLike | None = None,
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
    risk_free: float = 0.0,
) -> RollingSeries:
    """A trailing-window metric over one return series.

    The window spans the last ``window`` *available* returns (NaN rows are
    skipped, as everywhere); for the benchmark metrics (``beta``,
    ``information_ratio``, ``downside_capture``) only rows where both the
    series and ``benchmark_returns`` have a return count.  The value is stored
    on the row of the window's last return; other rows are NaN.  Metrics:
    ``volatility`` (annualised, ddof=1), ``sharpe`` (annualised, per-period
    risk-free), ``sortino`` (as the full-period Sortino, over the window),
    ``beta`` (cov/var), ``information_ratio`` (annualised), ``downside_capture``
    (the window's periods with a falling benchmark; NaN in a window without
    one), ``drawdown`` (maximum drawdown inside the window, wealth starting at
    1.0 before the window's first return -- what empyrical's
    ``roll_max_drawdown`` computes).
    """
    if metric not in get_args(RollingMetricName):
        raise MetricsInputError("metric", f"unknown rolling metric {metric!r}")
    p = _check_periods_per_year(periods_per_year)
    rf_p = per_period_risk_free(risk_free, p)
    x = _as_return_vector(returns, "returns")
    days = _as_dates(dates, x.shape[0])
    mask = ~np.isnan(x)
    b: FloatArray | None = None
    if metric in BENCHMARK_ROLLING_METRICS:
        if benchmark_returns is None:
            raise MetricsInputError("benchmark_returns", f"required for rolling {metric}")
        b_full = _as_return_vector(benchmark_returns, "benchmark_returns")
        if b_full.shape != x.shape:
            raise MetricsInputError("benchmark_returns", "need one value per row")
        mask &= ~np.isnan(b_full)
        b = b_full[mask]
    positions = np.flatnonzero(mask)
    size = _check_window(window, positions.size)
    values = np.full(x.shape, np.nan)
    values[positions[size - 1 :]] = _rolling_values(metric, x[mask], b, size, rf_p, p)
    return RollingSeries(metric=metric, window=size, dates=days, values=values)


# ---------------------------------------------------------------------------
# Portfolios
# ---------------------------------------------------------------------------


def _check_weights(weights: npt.ArrayLike, n_assets: int, allow_short: bool) -> FloatArray:
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsInputError("weights", "not convertible to float64") from exc
    if w.ndim != 1 or w.shape[0] != n_assets:
        raise MetricsInputError(
            "weights", f"need one weight per asset ({n_assets}), got shape {w.shape}"
        )
    if not np.isfinite(w).all():
        raise MetricsInputError("weights", "must be finite")
    if not allow_short and bool((w < 0.0).any()):
        raise MetricsInputError("weights", "negative weights need allow_short=True")
    total = float(w.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise MetricsInputError(
            "weights", f"must sum to 1 within {WEIGHT_SUM_TOLERANCE:g}, sum is {total!r}"
        )
    return w


def _period_keys(days: DateArray, rebalance: Rebalance) -> npt.NDArray[np.int64]:
    """An integer label per row that changes exactly when a new period starts."""
    day_numbers = days.astype(np.int64)
    if rebalance == "weekly":
        # Day 0 (1970-01-01) is a Thursday; +3 makes weeks start on Monday.
        return (day_numbers + 3) // 7
    months = days.astype("datetime64[M]").astype(np.int64)
    if rebalance == "monthly":
        return months
    if rebalance == "quarterly":
        return months // 3
    return days.astype("datetime64[Y]").astype(np.int64)


def _rebalance_base(days: DateArray, rebalance: Rebalance) -> IntArray:
    """Row whose close prices define the current holdings, for every row.

    Holdings are reset to the target weights at the close of ``base[t]``;
    base[0] = 0 because the portfolio is bought at the first close.
    """
    n = days.shape[0]
    rows = np.arange(n, dtype=np.intp)
    if rebalance == "none":
        return np.zeros(n, dtype=np.intp)
    if rebalance == "daily":
        return np.maximum(rows - 1, 0)
    keys = _period_keys(days, rebalance)
    starts = np.zeros(n, dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    base = np.where(starts, rows - 1, 0)
    return np.maximum.accumulate(base)


def _filled_prices(prices: FloatArray) -> FloatArray:
    """Carry each asset's last known price forward (prices is (T, K))."""
    if np.isnan(prices[0]).any():
        raise MetricsInputError("prices", "every asset needs a price on the first row")
    rows_first = np.ascontiguousarray(prices.T)
    last = _last_valid_index(~np.isnan(rows_first))
    filled = np.take_along_axis(rows_first, last, axis=1)
    return np.ascontiguousarray(filled.T)


def portfolio_returns(
    prices: npt.ArrayLike,
    dates: npt.ArrayLike,
    weights: npt.ArrayLike,
    rebalance: Rebalance = "none",
    *,
    allow_short: bool = False,
) -> FloatArray:
    """Simple returns of a weighted portfolio of the price columns, shape (T,).

    Row 0 is NaN (the buy); see the module docstring for the rebalancing and
    missing-price rules.  With shorting allowed the portfolio value can reach
    zero, after which returns are undefined: that raises MetricsInputError.
    """
    if rebalance not in get_args(Rebalance):
        raise MetricsInputError("rebalance", f"unknown rebalance rule {rebalance!r}")
    matrix = _as_matrix(prices, "prices")
    _check_value_domain(matrix, "prices", "prices")
    w = _check_weights(weights, matrix.shape[1], allow_short)
    days = _as_dates(dates, matrix.shape[0])
    if matrix.shape[0] < MIN_RETURNS + 1:
        raise MetricsInputError("prices", "need at least 3 rows of prices")
    filled = _filled_prices(matrix)
    base = _rebalance_base(days, rebalance)
    # Growth of each sleeve since the last rebalance, weighted: G(t) = sum w P(t)/P(base).
    anchor = filled[base]
    growth_now = (filled[1:] / anchor[1:]) @ w
    growth_prev = (filled[:-1] / anchor[1:]) @ w
    if bool((growth_prev <= 0.0).any()):
        raise MetricsInputError("weights", "portfolio value fell to zero or below")
    out = np.full(matrix.shape[0], np.nan)
    out[1:] = growth_now / growth_prev - 1.0
    return out


def _complete_rows(returns: npt.ArrayLike, min_rows: int = MIN_RETURNS) -> FloatArray:
    matrix = _as_matrix(returns, "returns")
    _check_value_domain(matrix, "returns", "returns")
    complete = matrix[~np.isnan(matrix).any(axis=1)]
    if complete.shape[0] < min_rows:
        raise MetricsInputError(
            "returns", f"need at least {min_rows} rows where every asset has a return"
        )
    return complete


def covariance_matrix(
    returns: npt.ArrayLike, periods_per_year: float = DEFAULT_PERIODS_PER_YEAR
) -> FloatArray:
    """Annualised sample covariance (ddof=1, x P) of (T, K) returns, listwise NaN deletion."""
    p = _check_periods_per_year(periods_per_year)
    complete = _complete_rows(returns)
    cov: FloatArray = np.atleast_2d(np.cov(complete, rowvar=False, ddof=1)) * p
    return cov


def correlation_from_covariance(cov: FloatArray) -> FloatArray:
    """Correlation matrix from a covariance matrix; NaN rows/cols for flat assets."""
    sd = np.sqrt(np.diag(cov))
    corr = _safe_divide(cov, np.outer(sd, sd))
    np.fill_diagonal(corr, np.where(sd > 0.0, 1.0, np.nan))
    return np.clip(corr, -1.0, 1.0)


def correlation_matrix(returns: npt.ArrayLike) -> FloatArray:
    """Pearson correlation of (T, K) returns on the rows where all assets have one."""
    return correlation_from_covariance(covariance_matrix(returns, DEFAULT_PERIODS_PER_YEAR))


def risk_contributions(
    weights: npt.ArrayLike, covariance: npt.ArrayLike, *, allow_short: bool = False
) -> RiskContributions:
    """Euler risk decomposition: c_i = w_i (S w)_i / sigma_p, shares c_i / sigma_p."""
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not np.isfinite(cov).all():
        raise MetricsInputError("covariance", "need a finite square matrix")
    w = _check_weights(weights, cov.shape[0], allow_short)
    marginal = cov @ w
    variance = float(w @ marginal)
    if not variance > 0.0:
        raise MetricsInputError("covariance", "portfolio variance is not positive")
    sigma = math.sqrt(variance)
    contributions = w * marginal / sigma
    return RiskContributions(sigma, contributions, contributions / sigma)


def analyse_portfolio(
    prices: npt.ArrayLike,
    dates: npt.ArrayLike,
    symbols: Sequence[str],
    weights: npt.ArrayLike,
    rebalance: Rebalance = "monthly",
    *,
    allow_short: bool = False,
    benchmark: npt.ArrayLike | None = None,
    benchmark_symbol: str = "benchmark",
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
    risk_free: float = 0.0,
    portfolio_name: str = "portfolio",
) -> PortfolioAnalysis:
    """Portfolio returns, their full metric set, covariance/correlation and risk split.

    ``benchmark`` (optional) is a price vector on the same dates.
    """
    matrix = _as_matrix(prices, "prices")
    names = _check_symbols(symbols, matrix.shape[1])
    w = _check_weights(weights, len(names), allow_short)
    days = _as_dates(dates, matrix.shape[0])
    port = portfolio_returns(matrix, days, w, rebalance, allow_short=allow_short)
    bench_returns = None if benchmark is None else simple_returns(benchmark)
    metrics = compute_metrics(
        port,
        days,
        [portfolio_name],
        kind="returns",
        benchmark=bench_returns,
        benchmark_symbol=benchmark_symbol,
        periods_per_year=periods_per_year,
        risk_free=risk_free,
    )[portfolio_name]
    cov = covariance_matrix(simple_returns(matrix), periods_per_year)
    return PortfolioAnalysis(
        symbols=names,
        weights=w,
        rebalance=rebalance,
        dates=days,
        returns=port,
        metrics=metrics,
        covariance=cov,
        correlation=correlation_from_covariance(cov),
        risk=risk_contributions(w, cov, allow_short=allow_short),
    )
