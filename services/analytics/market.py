"""The analytics use cases behind the RPCs: ingest, read, metrics, rolling, portfolio.

Domain layer: validates requests (field paths are the request's), resolves symbols through
storage, pivots prices into the matrix the metric engine wants, runs the engine off the
event loop, and turns engine input errors into INVALID_ARGUMENT. No grpc, no protobuf.

Reads take a :class:`~services.analytics.storage.TenantView` (`view(tenant)`, once per
request): the data versions the request reads at, checked against the database once, so a
result and the version it reports (and is cached under) always belong together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np
import numpy.typing as npt

from libs.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from libs.common.tracing import tracer
from services.analytics import factors as factor_engine
from services.analytics import metrics as engine
from services.analytics import tables as table_engine
from services.analytics.bars import (
    MICROS,
    SYMBOL_RULE,
    BarColumns,
    Rejection,
    SeriesInput,
    valid_symbol,
    validate_stream,
)
from services.analytics.storage import MarketStore, PricePanel, SymbolSummary, TenantView

_tracer = tracer(__name__)

MAX_METRIC_SYMBOLS: Final = 500
MAX_PORTFOLIO_HOLDINGS: Final = 100
MAX_REJECTIONS_LISTED: Final = 1000
RETURNS_RULE: Final = (
    "simple returns of adjusted close between consecutive available prices; "
    "missing prices are skipped, never filled with zero returns"
)
TAIL_RULE: Final = (
    "historical VaR = (1-c) percentile with linear interpolation (negative = loss); "
    "historical CVaR = mean of the worst floor((n-1)(1-c))+1 returns; "
    "parametric VaR = mean + z(1-c)*std(ddof=1); "
    "parametric CVaR = mean - std*phi(z(1-c))/(1-c) (Gaussian expected shortfall)"
)
REFERENCE: Final = "empyrical(-reloaded) definitions; docs/analytics.md"
MOMENTS_RULE: Final = (
    "population skewness m3/m2^1.5 and excess kurtosis m4/m2^2 - 3 (scipy.stats skew / "
    "kurtosis defaults, bias=True; not pandas' bias-corrected estimators)"
)
WIN_RATE_RULE: Final = (
    "count(r > 0) / count(r != 0): zero returns are neither wins nor losses "
    "(QuantStats' win_rate); positive_share keeps them in the denominator"
)
CAPTURE_RULE: Final = (
    "empyrical: up/down capture = ann(r)/ann(b) over the common periods with b > 0 / b < 0, "
    "ann(x) = prod(1+x)^(P/n) - 1; capture_ratio = up/down; total_capture over all common "
    "periods"
)
TAIL_RATIO_RULE: Final = (
    "|95th percentile| / |5th percentile| of returns, linear interpolation "
    "(empyrical and QuantStats defaults)"
)
TREYNOR_RULE: Final = (
    "mean(r - rf_p) * P / beta over the common periods (arithmetic annualised excess return, "
    "the numerator of Sharpe; QuantStats uses the total compounded return - rf)"
)
CORNISH_FISHER_RULE: Final = (
    "VaR = mean + z_cf*std(ddof=1), z_cf = z + (z^2-1)S/6 + (z^3-3z)K/24 - (2z^3-5z)S^2/36 "
    "with population skew S and excess kurtosis K; CVaR = mean of that VaR over tail levels "
    "u <= 1-c (closed form)"
)
CALENDAR_RULE: Final = (
    "calendar months / years compounded from the returns dated in them (a return belongs to "
    "the period of its closing price); a partial first or last period counts"
)


@dataclass(frozen=True, slots=True)
class DateWindow:
    start: date | None
    end: date | None


@dataclass(frozen=True, slots=True)
class Conventions:
    periods_per_year: float
    ddof: int
    risk_free_annual: float
    risk_free_per_period: float
    returns_rule: str = RETURNS_RULE
    tail_rule: str = TAIL_RULE
    reference: str = REFERENCE
    omega_threshold_annual: float = 0.0
    omega_threshold_per_period: float = 0.0
    moments_rule: str = MOMENTS_RULE
    win_rate_rule: str = WIN_RATE_RULE
    capture_rule: str = CAPTURE_RULE
    tail_ratio_rule: str = TAIL_RATIO_RULE
    treynor_rule: str = TREYNOR_RULE
    cornish_fisher_rule: str = CORNISH_FISHER_RULE
    calendar_rule: str = CALENDAR_RULE


@dataclass(frozen=True, slots=True)
class MetricParams:
    periods_per_year: float
    risk_free: float
    # The Omega ratio's threshold as an annual rate; None = the risk-free rate.
    omega_threshold: float | None = None

    def conventions(self) -> Conventions:
        threshold = self.risk_free if self.omega_threshold is None else self.omega_threshold
        return Conventions(
            self.periods_per_year,
            1,
            self.risk_free,
            engine.per_period_risk_free(self.risk_free, self.periods_per_year),
            omega_threshold_annual=threshold,
            omega_threshold_per_period=engine.omega_threshold_per_period(
                self.omega_threshold, self.risk_free, self.periods_per_year
            ),
        )


@dataclass(frozen=True, slots=True)
class MetricsResult:
    metrics: list[engine.SymbolMetrics]  # request order
    conventions: Conventions
    data_version: int
    # Drawdown / period tables by symbol (empty when none were requested).
    tables: dict[str, table_engine.SeriesTables] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RollingResult:
    symbol: str
    metric: engine.RollingMetricName
    window: int
    days: list[date]
    values: list[float]
    conventions: Conventions
    data_version: int


@dataclass(frozen=True, slots=True)
class PortfolioResult:
    analysis: engine.PortfolioAnalysis
    conventions: Conventions
    data_version: int
    tables: table_engine.SeriesTables | None = None  # of the portfolio series, if requested


FACTOR_RETURNS_RULE: Final = (
    "simple returns of adjusted close between consecutive days on which the subject and "
    "every factor have a price (one common interval per observation); excess returns = "
    "return - per-period risk-free, except for factors flagged excess_return"
)
FACTOR_REFERENCE: Final = (
    "OLS with an intercept as statsmodels OLS / RollingOLS (classic or HAC Newey-West "
    "standard errors); docs/analytics.md, Factor exposure"
)


@dataclass(frozen=True, slots=True)
class FactorExposureResult:
    exposure: factor_engine.FactorExposure
    conventions: Conventions
    data_version: int


@dataclass(frozen=True, slots=True)
class IngestSummary:
    received: int
    inserted: int
    updated: int
    unchanged: int
    rejected: int
    rejections: list[Rejection]  # the first MAX_REJECTIONS_LISTED
    data_version: int
    duplicates_collapsed: int = 0


# -- request validation helpers --------------------------------------------------------------


def check_params(v: Violations, periods_per_year: float, risk_free: float) -> MetricParams:
    """0 periods per year means the daily default (252)."""
    ppy = float(periods_per_year) or float(engine.DEFAULT_PERIODS_PER_YEAR)
    v.check(
        math.isfinite(ppy) and engine.MIN_PERIODS_PER_YEAR <= ppy <= engine.MAX_PERIODS_PER_YEAR,
        "periods_per_year",
        f"must be between {engine.MIN_PERIODS_PER_YEAR:g} and "
        f"{engine.MAX_PERIODS_PER_YEAR:g} (0 = 252), got {periods_per_year!r}",
    )
    rf = float(risk_free)
    v.check(
        math.isfinite(rf) and -1.0 < rf < 1.0,
        "risk_free_rate",
        f"annual rate as a fraction in (-1, 1), got {risk_free!r}",
    )
    return MetricParams(ppy, rf)


def check_omega_threshold(v: Violations, params: MetricParams, threshold: float) -> MetricParams:
    """`params` with the Omega threshold (an annual rate in (-1, 1)) when it is valid."""
    value = float(threshold)
    if not v.check(
        math.isfinite(value) and -1.0 < value < 1.0,
        "omega_threshold_annual",
        f"annual rate as a fraction in (-1, 1), got {threshold!r}",
    ):
        return params
    return dataclasses.replace(params, omega_threshold=value)


def check_window(v: Violations, window: DateWindow, field: str = "range") -> None:
    if window.start is not None and window.end is not None and window.start > window.end:
        v.add(f"{field}.start", f"start {window.start} is after end {window.end}")


def check_symbol(v: Violations, symbol: str, field: str) -> bool:
    if not symbol:
        v.add(field, "required")
        return False
    return v.check(valid_symbol(symbol), field, f"invalid symbol {symbol[:40]!r}: {SYMBOL_RULE}")


def check_symbols(v: Violations, symbols: Sequence[str], field: str, limit: int) -> None:
    if not symbols:
        v.add(field, "at least one symbol is required")
        return
    v.check(len(symbols) <= limit, field, f"at most {limit} symbols, got {len(symbols)}")
    seen: set[str] = set()
    for i, s in enumerate(symbols[:limit]):
        if check_symbol(v, s, f"{field}[{i}]"):
            v.check(s not in seen, f"{field}[{i}]", f"duplicate symbol {s!r}")
            seen.add(s)


_ENGINE_FIELDS: Final = {
    "values": "symbols",
    "prices": "range",
    "returns": "range",
    "dates": "range",
    "risk_free": "risk_free_rate",
    "omega_threshold": "omega_threshold_annual",
}


def engine_error(
    exc: engine.MetricsInputError, fields: dict[str, str] | None = None
) -> InvalidArgument:
    """An engine input error as INVALID_ARGUMENT on the request's field."""
    mapping = {**_ENGINE_FIELDS, **(fields or {})}
    return InvalidArgument.field(mapping.get(exc.field, exc.field), exc.message)


@dataclass(frozen=True, slots=True)
class _Matrix:
    symbols: list[str]  # column order
    days: npt.NDArray[np.datetime64]
    prices: npt.NDArray[np.float64]  # (rows, columns), NaN = no price


def pivot(panel: PricePanel, columns: list[str]) -> _Matrix:
    """Long adjusted closes -> (union of days, columns) matrix of float prices, in O(n).

    micro-units / 1e6 is the correctly rounded double of the stored decimal, the same
    number `float(Decimal(text))` gives for the file's text.
    """
    if panel.days.size == 0:
        return _Matrix(columns, np.zeros(0, dtype="datetime64[D]"), np.zeros((0, len(columns))))
    first = int(panel.days.min())
    offsets = panel.days - first
    present = np.zeros(int(offsets.max()) + 1, dtype=bool)
    present[offsets] = True
    row_of = np.cumsum(present) - 1
    days = (np.flatnonzero(present) + first).astype("datetime64[D]")
    matrix = np.full((days.shape[0], len(columns)), np.nan)
    matrix[row_of[offsets], panel.columns] = panel.adj_close_micros / MICROS
    return _Matrix(columns, days, matrix)


class MarketAnalytics:
    """The use cases, over one :class:`MarketStore`."""

    def __init__(self, store: MarketStore, *, max_ingest_rows: int = 2_000_000) -> None:
        self.store = store
        self.max_ingest_rows = max_ingest_rows

    # -- data ---------------------------------------------------------------------------
    async def ingest(
        self, tenant: str, series: Sequence[SeriesInput], reject_all: bool
    ) -> IngestSummary:
        with _tracer.start_as_current_span("analytics.validate_bars") as span:
            checked = await asyncio.to_thread(validate_stream, series)
            span.set_attribute("bars.received", checked.received)
            span.set_attribute("bars.rejected", len(checked.rejections))
        if reject_all and checked.rejections:
            raise InvalidArgument(
                f"{len(checked.rejections)} invalid rows; nothing written (REJECT_ALL)",
                violations=[_violation(r) for r in checked.rejections[:100]],
            )
        counts = await self.store.upsert(tenant, checked.bars)
        return IngestSummary(
            received=checked.received,
            inserted=counts.inserted,
            updated=counts.updated,
            unchanged=counts.unchanged,
            rejected=len(checked.rejections),
            rejections=checked.rejections[:MAX_REJECTIONS_LISTED],
            data_version=counts.data_version,
            duplicates_collapsed=checked.duplicates_collapsed,
        )

    async def view(self, tenant: str) -> TenantView:
        """What one request of `tenant` reads (one version check)."""
        return await self.store.view(tenant)

    async def list_symbols(self, view: TenantView) -> tuple[list[SymbolSummary], int]:
        return await self.store.list_symbols(view)

    async def bars(self, view: TenantView, symbol: str, window: DateWindow) -> BarColumns:
        v = Violations()
        check_symbol(v, symbol, "symbol")
        check_window(v, window)
        v.raise_if_any()
        bars = await self.store.bars(view, symbol, window.start, window.end)
        if bars is None:
            raise _unknown([symbol])
        return bars

    async def _matrix(
        self, view: TenantView, columns: list[str], window: DateWindow, benchmark: str = ""
    ) -> tuple[_Matrix, int, str]:
        """The price matrix of `columns` in the window, its data version, and why the
        `benchmark` column (one of them, optional) cannot serve ("" when it can).

        A window in which a symbol has fewer than two prices is the caller's error, naming
        the symbols and their ranges; when only the benchmark lacks them, the absolute
        figures still stand, so that is no error but the returned reason."""
        panel = await self.store.adj_closes(view, columns, window.start, window.end)
        if panel.missing:
            raise _unknown(panel.missing)
        with _tracer.start_as_current_span("analytics.pivot"):
            matrix = pivot(panel, panel.symbols)
        priced = np.isfinite(matrix.prices).sum(axis=0)
        empty = [c for c, n in zip(matrix.symbols, priced.tolist(), strict=True) if n < 2]
        if not empty or (window.start is None and window.end is None):
            return matrix, panel.data_version, ""
        if empty != [benchmark]:
            raise await self._outside(view, empty, window)
        ranges = await self._ranges(view, empty, window)
        return matrix, panel.data_version, f"the benchmark {ranges[0]}, so no relative figures"

    async def _ranges(self, view: TenantView, symbols: list[str], window: DateWindow) -> list[str]:
        """Per symbol: "X has data from A to B" (or "X has no data")."""
        listed, _ = await self.store.list_symbols(view)
        have = {s.symbol: s for s in listed}
        return [
            f"{s} has data from {have[s].first_day} to {have[s].last_day}, not in the range "
            f"{_asked(window)}"
            if s in have
            else f"{s} has no data"
            for s in symbols
        ]

    async def _outside(
        self, view: TenantView, symbols: list[str], window: DateWindow
    ) -> InvalidArgument:
        """The error of a window in which some symbols have fewer than two prices (no
        return): which ones, and the range each does have."""
        listed, _ = await self.store.list_symbols(view)
        have = {s.symbol: s for s in listed}
        asked = _asked(window)
        parts = [
            f"{s} has data from {have[s].first_day} to {have[s].last_day}"
            if s in have
            else f"{s} has no data"
            for s in symbols
        ]
        message = (
            f"not enough data in the range {asked} for {', '.join(symbols)} (at least two "
            f"prices are needed): {'; '.join(parts)}"
        )
        return InvalidArgument(
            message,
            [FieldViolation("range", message)],
            reason="NO_DATA_IN_RANGE",
            metadata={"symbols": ",".join(symbols)},
        )

    # -- metrics ------------------------------------------------------------------------
    async def compute_metrics(
        self,
        view: TenantView,
        symbols: Sequence[str],
        window: DateWindow,
        benchmark: str,
        params: MetricParams,
        tables: TableRequest | None = None,
    ) -> MetricsResult:
        columns = list(dict.fromkeys([*symbols, *([benchmark] if benchmark else [])]))
        matrix, version, unusable = await self._matrix(view, columns, window, benchmark)
        values = matrix.prices[:, [columns.index(s) for s in symbols]]
        bench = matrix.prices[:, columns.index(benchmark)] if benchmark and not unusable else None
        with _tracer.start_as_current_span("analytics.compute_metrics") as span:
            span.set_attribute("analytics.symbols", len(symbols))
            span.set_attribute("analytics.rows", int(matrix.days.shape[0]))
            try:
                result = await asyncio.to_thread(
                    engine.compute_metrics,
                    values,
                    matrix.days,
                    list(symbols),
                    kind="prices",
                    benchmark=bench,
                    benchmark_symbol=benchmark or "benchmark",
                    periods_per_year=params.periods_per_year,
                    risk_free=params.risk_free,
                    omega_threshold=params.omega_threshold,
                )
            except engine.MetricsInputError as exc:
                raise engine_error(exc) from exc
        out = [_without_benchmark(result[s], unusable) for s in symbols]
        extra = await _tables(values, matrix.days, list(symbols), "prices", tables)
        return MetricsResult(out, params.conventions(), version, extra)

    async def rolling(
        self,
        view: TenantView,
        symbol: str,
        metric: engine.RollingMetricName,
        window_size: int,
        window: DateWindow,
        benchmark: str,
        params: MetricParams,
    ) -> RollingResult:
        relative = metric in engine.BENCHMARK_ROLLING_METRICS
        columns = list(dict.fromkeys([symbol, *([benchmark] if relative else [])]))
        matrix, version, _ = await self._matrix(view, columns, window)
        returns = engine.simple_returns(matrix.prices)
        bench = returns[:, columns.index(benchmark)] if relative else None
        with _tracer.start_as_current_span("analytics.rolling_metric"):
            try:
                series = await asyncio.to_thread(
                    engine.rolling_metric,
                    returns[:, 0],
                    matrix.days,
                    metric,
                    window_size,
                    benchmark_returns=bench,
                    periods_per_year=params.periods_per_year,
                    risk_free=params.risk_free,
                )
            except engine.MetricsInputError as exc:
                raise engine_error(exc) from exc
        defined = ~np.isnan(series.values)
        return RollingResult(
            symbol,
            metric,
            series.window,
            series.dates[defined].tolist(),
            series.values[defined].tolist(),
            params.conventions(),
            version,
        )

    async def correlations(
        self, view: TenantView, symbols: Sequence[str], window: DateWindow
    ) -> dict[frozenset[str], float]:
        """Pearson correlation of daily simple returns for each pair of `symbols`, on the
        days all of them have a return."""
        columns = list(dict.fromkeys(symbols))
        if len(columns) < 2:
            return {}
        matrix, _, _ = await self._matrix(view, columns, window)
        with _tracer.start_as_current_span("analytics.correlations"):
            corr = await asyncio.to_thread(
                engine.correlation_matrix, engine.simple_returns(matrix.prices)
            )
        return {
            frozenset((a, b)): float(corr[i, j])
            for i, a in enumerate(columns)
            for j, b in enumerate(columns)
            if i < j
        }

    async def data_end(self, view: TenantView, symbols: Sequence[str]) -> date | None:
        """The last day every one of `symbols` has data (None when one has none)."""
        listed, _ = await self.list_symbols(view)
        last = {s.symbol: s.last_day for s in listed}
        days = [last.get(s) for s in symbols]
        return None if any(d is None for d in days) else min(d for d in days if d is not None)

    async def portfolio(
        self,
        view: TenantView,
        symbols: Sequence[str],
        weights: Sequence[float],
        window: DateWindow,
        rebalance: engine.Rebalance,
        benchmark: str,
        allow_short: bool,
        params: MetricParams,
        tables: TableRequest | None = None,
    ) -> PortfolioResult:
        columns = list(dict.fromkeys([*symbols, *([benchmark] if benchmark else [])]))
        matrix, version, unusable = await self._matrix(view, columns, window, benchmark)
        asset_cols = [columns.index(s) for s in symbols]
        prices = matrix.prices[:, asset_cols]
        # Asset rows only (a benchmark-only day is not a portfolio day), from the first day
        # on which every asset has a price.
        has_any = ~np.isnan(prices).all(axis=1)
        prices, days = prices[has_any], matrix.days[has_any]
        bench = (
            matrix.prices[has_any, columns.index(benchmark)] if benchmark and not unusable else None
        )
        first = _first_rows(prices)
        if window.start is not None and first.max(initial=0) > 0:
            late = [s for s, row in zip(symbols, first.tolist(), strict=True) if row > 0]
            raise InvalidArgument.field(
                "range.start",
                f"no price on the first day of the range ({days[0] if days.size else 'n/a'}) "
                f"for: {', '.join(late)}; start later or leave start unset",
            )
        start_row = int(first.max(initial=0))
        prices, days = prices[start_row:], days[start_row:]
        bench = bench[start_row:] if bench is not None else None
        with _tracer.start_as_current_span("analytics.analyse_portfolio"):
            try:
                analysis = await asyncio.to_thread(
                    engine.analyse_portfolio,
                    prices,
                    days,
                    list(symbols),
                    np.asarray(weights, dtype=np.float64),
                    rebalance,
                    allow_short=allow_short,
                    benchmark=bench,
                    benchmark_symbol=benchmark or "benchmark",
                    periods_per_year=params.periods_per_year,
                    risk_free=params.risk_free,
                )
            except engine.MetricsInputError as exc:
                raise engine_error(exc, {"weights": "holdings"}) from exc
        if unusable:
            metrics = _without_benchmark(analysis.metrics, unusable)
            analysis = dataclasses.replace(analysis, metrics=metrics)
        extra = await _tables(analysis.returns, analysis.dates, ["portfolio"], "returns", tables)
        return PortfolioResult(analysis, params.conventions(), version, extra.get("portfolio"))

    async def factor_exposure(
        self,
        view: TenantView,
        subject: str | factor_engine.PortfolioSubject,
        factors: Sequence[tuple[str, bool]],
        window: DateWindow,
        params: MetricParams,
        *,
        rolling_window: int = 0,
        standard_errors: factor_engine.StandardErrorType = "classic",
        hac_lags: int = 0,
    ) -> FactorExposureResult:
        """OLS of the subject's excess returns on the factors' (see `factors.py`)."""
        names = [f for f, _ in factors]
        held = (
            list(subject.symbols)
            if isinstance(subject, factor_engine.PortfolioSubject)
            else [subject]
        )
        columns = list(dict.fromkeys([*held, *names]))
        matrix, version, _ = await self._matrix(view, columns, window)
        with _tracer.start_as_current_span("analytics.factor_exposure") as span:
            span.set_attribute(
                "analytics.subject_kind", "symbol" if isinstance(subject, str) else "portfolio"
            )
            span.set_attribute("analytics.factors", len(names))
            span.set_attribute("analytics.rows", int(matrix.days.shape[0]))
            span.set_attribute("analytics.rolling_window", rolling_window)
            span.set_attribute("analytics.standard_errors", standard_errors)
            try:
                exposure = await asyncio.to_thread(
                    factor_engine.exposure_from_matrix,
                    matrix.prices,
                    matrix.days,
                    matrix.symbols,
                    subject,
                    names,
                    excess=[e for _, e in factors],
                    periods_per_year=params.periods_per_year,
                    risk_free=params.risk_free,
                    rolling_window=rolling_window,
                    standard_errors=standard_errors,
                    hac_lags=hac_lags,
                )
            except factor_engine.CollinearFactorsError as exc:
                span.set_attribute("analytics.collinear", ",".join(exc.factors))
                raise FailedPrecondition(
                    exc.message,
                    reason="COLLINEAR_FACTORS",
                    metadata={"factors": ",".join(exc.factors)},
                ) from exc
            except engine.MetricsInputError as exc:
                raise engine_error(exc, {"weights": "portfolio.holdings"}) from exc
            span.set_attribute("analytics.observations", exposure.observations)
        conventions = dataclasses.replace(
            params.conventions(),
            returns_rule=FACTOR_RETURNS_RULE,
            tail_rule="",
            reference=FACTOR_REFERENCE,
        )
        return FactorExposureResult(exposure, conventions, version)


@dataclass(frozen=True, slots=True)
class TableRequest:
    """The drawdown / period tables a metric request asks for (see tables.py)."""

    drawdowns: int = 0  # table size, 0-MAX_DRAWDOWN_TABLE
    periods: bool = False  # monthly and yearly returns

    @property
    def wanted(self) -> bool:
        return self.drawdowns > 0 or self.periods


def check_tables(v: Violations, drawdowns: int, periods: bool) -> TableRequest:
    """`drawdown_table_size` must be 0-MAX_DRAWDOWN_TABLE."""
    v.check(
        0 <= drawdowns <= table_engine.MAX_DRAWDOWN_TABLE,
        "drawdown_table_size",
        f"must be 0-{table_engine.MAX_DRAWDOWN_TABLE} (0 = no drawdown table), got {drawdowns}",
    )
    return TableRequest(drawdowns, periods)


async def _tables(
    values: npt.NDArray[np.float64],
    days: npt.NDArray[np.datetime64],
    symbols: list[str],
    kind: engine.InputKind,
    request: TableRequest | None,
) -> dict[str, table_engine.SeriesTables]:
    """The requested tables of the columns (none: an empty dict), off the event loop."""
    if request is None or not request.wanted:
        return {}
    with _tracer.start_as_current_span("analytics.compute_tables"):
        try:
            return await asyncio.to_thread(
                table_engine.compute_tables,
                values,
                days,
                symbols,
                kind=kind,
                drawdowns=request.drawdowns,
                periods=request.periods,
            )
        except engine.MetricsInputError as exc:
            raise engine_error(exc, {"drawdowns": "drawdown_table_size"}) from exc


def _asked(window: DateWindow) -> str:
    return f"{window.start or 'the first day'} to {window.end or 'the last day'}"


def _without_benchmark(m: engine.SymbolMetrics, reason: str) -> engine.SymbolMetrics:
    """`m` with the reason its relative figures are missing, when there is one."""
    return dataclasses.replace(m, relative_unavailable=reason) if reason else m


def _first_rows(prices: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Row of each column's first price (rows when a column has none)."""
    valid = ~np.isnan(prices)
    first = np.argmax(valid, axis=0).astype(np.intp)
    first[~valid.any(axis=0)] = prices.shape[0]
    return first


def _unknown(symbols: Sequence[str]) -> NotFound:
    return NotFound(
        f"no data for symbol(s): {', '.join(symbols)}",
        reason="UNKNOWN_SYMBOL",
        metadata={"symbols": ",".join(symbols)},
    )


def _violation(r: Rejection) -> FieldViolation:
    where = f"messages[{r.message_index}].series[{r.series_index}]"
    if r.row_index >= 0:
        where += f".rows[{r.row_index}]"
    return FieldViolation(where, r.reason)
