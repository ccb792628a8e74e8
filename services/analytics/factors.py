"""Factor exposure: OLS of a series' excess returns on factor returns (numpy only).

Pure domain code like :mod:`services.analytics.metrics` (numpy and the standard library;
no gRPC, storage, pandas, scipy or statsmodels), so it can be tested against statsmodels
and benchmarked on its own.

Model
-----
For the subject (a symbol, or a portfolio valued like ComputePortfolio) with simple
returns ``r_t`` and factors ``f_1..f_K``::

    r_t - rf_p = alpha + sum_k beta_k * x_kt + e_t,   x_kt = f_kt - rf_p  (a plain factor)
                                                      x_kt = f_kt         (an excess factor)

fitted by ordinary least squares with an intercept (``alpha``, per period).

Conventions
-----------
* **Factors are price series** the tenant ingested (ETF closes, or a return series
  ingested as its cumulative index ``100 * prod(1 + f)``): their returns are simple
  returns of adjusted close, computed exactly like every other return. A factor flagged
  *excess* (a long-short factor such as SMB, HML, MOM, or an index of market excess
  returns ``Mkt-RF``) is used as is; any other factor has the per-period risk-free rate
  subtracted. The subject always has it subtracted.
* **Common window**: only the days on which the subject *and every factor* have a price
  are kept, and returns are computed between consecutive kept days, so every observation
  spans the same interval for all series (a day missing in one factor merges two periods
  into one for all of them, never a one-day return against a two-day one). The number of
  observations is the number of those returns; ``first_date`` / ``last_date`` are the days
  of the first and last of them.
* ``rf_p = (1 + rf) ** (1 / P) - 1`` as everywhere (``P`` periods per year).
* **Standard errors**: classic (non-robust) by default, ``s^2 (X'X)^-1`` with
  ``s^2 = SSR / (n - K - 1)``; ``"hac"`` is Newey-West: ``(X'X)^-1 S (X'X)^-1`` with
  ``S = sum_{l=-L..L} w_l sum_t u_t u_{t-l} x_t x_{t-l}'`` and Bartlett weights
  ``w_l = 1 - |l| / (L + 1)``, no small-sample correction: statsmodels'
  ``OLS(...).fit(cov_type="HAC", cov_kwds={"maxlags": L})``. ``L = 0`` picks
  ``floor(4 (n / 100) ** (2 / 9))`` (Newey-West 1994, statsmodels' default lag rule).
  t-statistics are ``coefficient / standard error`` (NaN when the error is 0).
* **R²** is centred, ``1 - SSR / sum((y - mean y)^2)``; **adjusted R²**
  ``1 - (n - 1) / (n - K - 1) * (1 - R²)``.
* **Alpha** is reported per period and annualised geometrically, ``(1 + alpha) ** P - 1``
  (the convention of ComputeMetrics' Jensen's alpha: with one factor, the benchmark, and no
  gaps it is that alpha exactly). Its t-statistic is the per-period one.
* **Residual volatility** ``sqrt(SSR / (n - K - 1)) * sqrt(P)`` (annualised residual
  standard error).
* **Rolling**: the same regression over every trailing window of ``W`` observations of the
  common window, dated on the window's last return: loadings, alpha (annualised) and R².
  A window in which the factors are collinear has NaN values.

Validation
----------
At least ``K + 2`` common returns (one more than the parameters, so the residual variance
is defined), a rolling window from ``K + 2`` to the number of observations, and factors
that are not collinear: a factor constant over the window, or a set of factors of which
one is (numerically) a linear combination of the others, raises
:class:`CollinearFactorsError` naming them. "Numerically" means the smallest singular value
of the centred, unit-norm factor matrix is below ``COLLINEAR_RCOND`` (1e-5) times the
largest, i.e. a combination of the factors explains all but about 1e-10 of a factor's
variance; the loadings of such factors are not identified.

Implementation
--------------
Householder QR (``numpy.linalg.qr``) of the design matrix; the rolling fit runs batched QR
on strided windows (no Python loop over windows; windows are processed in blocks to bound
memory), so every window is solved exactly, without cumulative cross-product drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from services.analytics import metrics as engine

FloatArray = npt.NDArray[np.float64]
DateArray = npt.NDArray[np.datetime64]
StandardErrorType = Literal["classic", "hac"]

MAX_FACTORS: Final = 20
COLLINEAR_RCOND: Final = 1e-5
# A coefficient of a null vector of the factor matrix above this (relative to the largest)
# marks its factor as part of the collinear set.
_NULL_VECTOR_SHARE: Final = 1e-3
# Rolling windows per block: block * window * (K + 1) doubles stay around 32 MB at most.
_ROLLING_BLOCK_VALUES: Final = 4_000_000


class FactorInputError(engine.MetricsInputError):
    """Invalid input for a factor regression; ``field`` names the request field."""


class CollinearFactorsError(ValueError):
    """The factors do not identify their loadings; ``factors`` names them."""

    def __init__(self, factors: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.factors = list(factors)
        self.message = message


@dataclass(frozen=True, slots=True)
class OlsFit:
    """OLS with an intercept: index 0 of the arrays is the intercept, then the factors."""

    params: FloatArray
    bse: FloatArray
    tvalues: FloatArray
    rsquared: float
    rsquared_adj: float
    residual_std: float  # per period: sqrt(SSR / df_resid)
    nobs: int
    df_resid: int
    hac_lags: int  # lags used (0 for classic standard errors)


@dataclass(frozen=True, slots=True)
class RollingFit:
    """Per window (dated on its last observation): params (windows, 1 + K), R²."""

    window: int
    end_rows: npt.NDArray[np.intp]  # index of each window's last observation
    params: FloatArray
    rsquared: FloatArray


@dataclass(frozen=True, slots=True)
class FactorLoading:
    factor: str
    excess: bool
    loading: float
    standard_error: float
    t_stat: float


@dataclass(frozen=True, slots=True)
class RollingExposure:
    window: int
    dates: list[date]
    loadings: dict[str, list[float]]  # per factor, one value per date
    alpha_annual: list[float]
    r_squared: list[float]


@dataclass(frozen=True, slots=True)
class FactorExposure:
    subject: str
    loadings: list[FactorLoading]
    alpha: float  # per period
    alpha_annual: float
    alpha_standard_error: float
    alpha_t_stat: float
    r_squared: float
    adj_r_squared: float
    residual_volatility: float  # annualised
    observations: int
    first_date: date
    last_date: date
    standard_errors: StandardErrorType
    hac_lags: int
    rolling: RollingExposure | None


# -- OLS ---------------------------------------------------------------------------------------


def _design(x: FloatArray) -> FloatArray:
    return np.column_stack([np.ones(x.shape[0]), x])


def newey_west_lags(nobs: int) -> int:
    """floor(4 (n / 100) ** (2 / 9)): statsmodels' (and Newey-West 1994's) default."""
    return math.floor(4.0 * (nobs / 100.0) ** (2.0 / 9.0))


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0.0)
    return out


def ols(
    y: npt.ArrayLike,
    x: npt.ArrayLike,
    *,
    standard_errors: StandardErrorType = "classic",
    hac_lags: int = 0,
) -> OlsFit:
    """OLS of ``y`` (n,) on an intercept and the columns of ``x`` (n, K); no NaNs.

    The caller checks rank (see :func:`check_collinear`); ``hac_lags`` 0 means the
    Newey-West default rule.
    """
    yv = np.asarray(y, dtype=np.float64)
    design = _design(np.asarray(x, dtype=np.float64).reshape(yv.shape[0], -1))
    n, p = design.shape
    df_resid = n - p
    if df_resid < 1:
        raise FactorInputError("range", f"need at least {p + 1} observations, got {n}")
    q, r = np.linalg.qr(design)
    params = np.linalg.solve(r, q.T @ yv)
    resid = yv - design @ params
    ssr = float(resid @ resid)
    r_inv = np.linalg.solve(r, np.eye(p))
    xtx_inv = r_inv @ r_inv.T
    lags = 0
    if standard_errors == "hac":
        lags = hac_lags or newey_west_lags(n)
        scores = design * resid[:, None]
        s = scores.T @ scores
        for lag in range(1, min(lags, n - 1) + 1):
            cross = scores[lag:].T @ scores[:-lag]
            s += (1.0 - lag / (lags + 1.0)) * (cross + cross.T)
        cov = xtx_inv @ s @ xtx_inv
    else:
        cov = xtx_inv * (ssr / df_resid)
    bse = np.sqrt(np.maximum(np.diag(cov), 0.0))
    centred = yv - yv.mean()
    tss = float(centred @ centred)
    r2 = 1.0 - ssr / tss if tss > 0.0 else math.nan
    return OlsFit(
        params=params,
        bse=bse,
        tvalues=_ratio(params, bse),
        rsquared=r2,
        rsquared_adj=1.0 - (n - 1) / df_resid * (1.0 - r2),
        residual_std=math.sqrt(ssr / df_resid),
        nobs=n,
        df_resid=df_resid,
        hac_lags=lags,
    )


def rolling_ols(y: npt.ArrayLike, x: npt.ArrayLike, window: int) -> RollingFit:
    """OLS over every trailing window of ``window`` rows (batched QR, blocks of windows).

    A window whose factors are collinear (or constant) gets NaN params and R².
    """
    yv = np.asarray(y, dtype=np.float64)
    design = _design(np.asarray(x, dtype=np.float64).reshape(yv.shape[0], -1))
    n, p = design.shape
    if not p + 1 <= window <= n:
        raise FactorInputError(
            "rolling_window", f"must be between {p + 1} and the {n} observations, got {window}"
        )
    count = n - window + 1
    # QR of the augmented [X y] of each window gives everything: with R = [[R_x, z], [0, s]],
    # the coefficients solve R_x b = z, SSR = s^2, and because column 0 is the intercept,
    # ||R[1:, j]|| is column j's centred norm (TSS for y, the collinearity scale for x).
    augmented = np.column_stack([design, yv])
    views = np.lib.stride_tricks.sliding_window_view(augmented, window, axis=0)  # (m, p+1, W)
    params = np.full((count, p), np.nan)
    rsquared = np.full(count, np.nan)
    block = max(1, _ROLLING_BLOCK_VALUES // (window * (p + 1)))
    for lo in range(0, count, block):
        hi = min(lo + block, count)
        window_rows = np.ascontiguousarray(views[lo:hi].transpose(0, 2, 1))
        r: FloatArray = np.asarray(np.linalg.qr(window_rows, mode="r"))
        centred = np.linalg.norm(r[:, 1:, 1:], axis=1)  # (b, K + 1): factors, then y
        left = np.abs(np.diagonal(r, axis1=1, axis2=2))[:, 1:p]
        # A factor with (almost) nothing left after the intercept and the earlier factors:
        # the window does not identify the loadings.
        scale = centred[:, :-1]
        ok = (scale > 0.0).all(axis=1) & (left > COLLINEAR_RCOND * scale).all(axis=1)
        r_x = np.where(ok[:, None, None], r[:, :p, :p], np.eye(p))
        coef = np.linalg.solve(r_x, r[:, :p, p : p + 1])[..., 0]
        r2 = 1.0 - _ratio(r[:, p, p] ** 2, centred[:, -1] ** 2)
        coef[~ok] = np.nan
        r2[~ok] = np.nan
        params[lo:hi] = coef
        rsquared[lo:hi] = r2
    end_rows = np.arange(window - 1, n, dtype=np.intp)
    return RollingFit(window, end_rows, params, rsquared)


def check_collinear(x: npt.ArrayLike, names: Sequence[str]) -> None:
    """Raise :class:`CollinearFactorsError` when the factors (with the intercept) are
    rank-deficient: a factor constant over the window, or a (numerically) linear
    combination of the others (see the module docstring for the threshold)."""
    matrix = np.asarray(x, dtype=np.float64).reshape(-1, len(names))
    centred = matrix - matrix.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    scale = np.abs(matrix).max(axis=0, initial=0.0) * math.sqrt(matrix.shape[0])
    flat = [s for s, nrm, sc in zip(names, norms.tolist(), scale.tolist(), strict=True)
            if nrm <= 1e-14 * sc or nrm == 0.0]  # fmt: skip
    if flat:
        raise CollinearFactorsError(
            flat,
            f"factor(s) {', '.join(flat)} are constant over the common window: collinear with "
            "the intercept, their loadings are not identified",
        )
    unit = centred / norms
    _, sv, vt = np.linalg.svd(unit, full_matrices=False)
    small = sv < COLLINEAR_RCOND * sv[0]
    if not small.any():
        return
    null = np.abs(vt[small])
    involved = (null >= _NULL_VECTOR_SHARE * null.max(axis=1, keepdims=True)).any(axis=0)
    named = [s for s, hit in zip(names, involved.tolist(), strict=True) if hit]
    raise CollinearFactorsError(
        named,
        f"factors {', '.join(named)} are collinear over the common window (one is a linear "
        f"combination of the others, to within {COLLINEAR_RCOND:g} in singular value): their "
        "loadings are not identified; drop one of them",
    )


# -- from prices ------------------------------------------------------------------------------


def _to_date(day: np.datetime64) -> date:
    out: date = day.astype("datetime64[D]").item()
    return out


def common_returns(
    subject: FloatArray, factors: FloatArray, dates: DateArray
) -> tuple[FloatArray, FloatArray, DateArray]:
    """Simple returns of the subject (T,) and the factors (T, K) between consecutive days on
    which all of them have a price; the dates are those of the returns."""
    prices = np.column_stack([subject, factors])
    keep = np.isfinite(prices).all(axis=1)
    kept = prices[keep]
    returns = kept[1:] / kept[:-1] - 1.0
    return returns[:, 0], returns[:, 1:], dates[keep][1:]


@dataclass(frozen=True, slots=True)
class PortfolioSubject:
    """A portfolio regressed as the subject (valued as ComputePortfolio values it)."""

    symbols: tuple[str, ...]
    weights: tuple[float, ...]
    rebalance: engine.Rebalance
    allow_short: bool


def portfolio_wealth(
    prices: FloatArray,
    dates: DateArray,
    weights: npt.ArrayLike,
    rebalance: engine.Rebalance,
    *,
    allow_short: bool,
) -> FloatArray:
    """The portfolio's value (1 on its first day), shape (T,): defined on the days any asset
    has a price from the first day on which every asset has one, NaN before and on days no
    asset has a price (missing prices carry the last one, as in ComputePortfolio)."""
    out = np.full(prices.shape[0], np.nan)
    has_any = ~np.isnan(prices).all(axis=1)
    complete = np.flatnonzero(~np.isnan(prices).any(axis=1))
    if complete.size == 0:
        raise FactorInputError("range", "no day in the range on which every holding has a price")
    rows = np.flatnonzero(has_any)
    rows = rows[rows >= complete[0]]
    if rows.size < 2:
        raise FactorInputError("range", "the holdings have fewer than 2 common days in the range")
    returns = engine.portfolio_returns(
        prices[rows], dates[rows], weights, rebalance, allow_short=allow_short
    )
    wealth = np.ones(rows.size)
    wealth[1:] = np.cumprod(1.0 + returns[1:])
    out[rows] = wealth
    return out


def exposure_from_matrix(
    prices: FloatArray,
    dates: DateArray,
    columns: Sequence[str],
    subject: str | PortfolioSubject,
    factor_names: Sequence[str],
    **kwargs: Any,
) -> FactorExposure:
    """:func:`factor_exposure` on a (days, columns) price matrix holding the subject's
    (or its holdings') and the factors' prices."""
    if isinstance(subject, PortfolioSubject):
        assets = prices[:, [columns.index(s) for s in subject.symbols]]
        subject_prices = portfolio_wealth(
            assets,
            dates,
            np.asarray(subject.weights, dtype=np.float64),
            subject.rebalance,
            allow_short=subject.allow_short,
        )
        name = "portfolio"
    else:
        subject_prices, name = prices[:, columns.index(subject)], subject
    factor_prices = prices[:, [columns.index(f) for f in factor_names]]
    return factor_exposure(
        subject_prices, factor_prices, dates, factor_names, subject=name, **kwargs
    )


def _annual(per_period: FloatArray | float, periods_per_year: float) -> FloatArray:
    base = np.asarray(1.0 + np.asarray(per_period, dtype=np.float64))
    out = np.full(base.shape, np.nan)
    np.power(base, periods_per_year, out=out, where=base > 0.0)
    return out - 1.0


def factor_exposure(
    subject_prices: npt.ArrayLike,
    factor_prices: npt.ArrayLike,
    dates: npt.ArrayLike,
    factor_names: Sequence[str],
    *,
    subject: str = "subject",
    excess: Sequence[bool] | None = None,
    periods_per_year: float = engine.DEFAULT_PERIODS_PER_YEAR,
    risk_free: float = 0.0,
    rolling_window: int = 0,
    standard_errors: StandardErrorType = "classic",
    hac_lags: int = 0,
) -> FactorExposure:
    """The regression of the module docstring, from prices (NaN = no price that day)."""
    names = list(factor_names)
    k = len(names)
    y_prices = np.asarray(subject_prices, dtype=np.float64).reshape(-1)
    f_prices = np.asarray(factor_prices, dtype=np.float64).reshape(y_prices.shape[0], k)
    days = np.asarray(dates, dtype="datetime64[D]")
    flags = [False] * k if excess is None else list(excess)
    if not 1 <= k <= MAX_FACTORS:
        raise FactorInputError("factors", f"1-{MAX_FACTORS} factors, got {k}")
    if len(set(names)) != k:
        raise FactorInputError("factors", "factors must be distinct")
    if len(flags) != k:
        raise FactorInputError("factors", "one excess flag per factor")
    rf_p = engine.per_period_risk_free(risk_free, periods_per_year)
    r, f, r_days = common_returns(y_prices, f_prices, days)
    n = r.shape[0]
    need = k + 2
    if n < need:
        window = f"{_to_date(r_days[0])} to {_to_date(r_days[-1])}" if n else "no common day pair"
        raise FactorInputError(
            "range",
            f"{subject} and the factors have {n} common returns in the range ({window}); "
            f"{k} factor(s) need at least {need}",
        )
    y = r - rf_p
    x = f - np.where(np.asarray(flags, dtype=bool), 0.0, rf_p)
    check_collinear(x, names)
    fit = ols(y, x, standard_errors=standard_errors, hac_lags=hac_lags)
    rolling = None
    if rolling_window:
        if not need <= rolling_window <= n:
            raise FactorInputError(
                "rolling_window",
                f"must be between {need} (the factors plus 2) and the {n} common returns, "
                f"got {rolling_window}",
            )
        roll = rolling_ols(y, x, rolling_window)
        rolling = RollingExposure(
            window=rolling_window,
            dates=[_to_date(d) for d in r_days[roll.end_rows]],
            loadings={s: roll.params[:, i + 1].tolist() for i, s in enumerate(names)},
            alpha_annual=_annual(roll.params[:, 0], periods_per_year).tolist(),
            r_squared=roll.rsquared.tolist(),
        )
    alpha = float(fit.params[0])
    return FactorExposure(
        subject=subject,
        loadings=[
            FactorLoading(
                s,
                flags[i],
                float(fit.params[i + 1]),
                float(fit.bse[i + 1]),
                float(fit.tvalues[i + 1]),
            )
            for i, s in enumerate(names)
        ],
        alpha=alpha,
        alpha_annual=float(_annual(alpha, periods_per_year)),
        alpha_standard_error=float(fit.bse[0]),
        alpha_t_stat=float(fit.tvalues[0]),
        r_squared=fit.rsquared,
        adj_r_squared=fit.rsquared_adj,
        residual_volatility=fit.residual_std * math.sqrt(periods_per_year),
        observations=n,
        first_date=_to_date(r_days[0]),
        last_date=_to_date(r_days[-1]),
        standard_errors=standard_errors,
        hac_lags=fit.hac_lags,
        rolling=rolling,
    )
