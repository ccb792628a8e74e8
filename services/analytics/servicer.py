"""gRPC servicer: protobuf <-> domain translation for AnalyticsService, nothing else.

Validation of request shapes that only exist in protobuf (dates, enums, ranges) happens
here while translating; every rule about the data itself lives in the domain modules.
Results of the metric RPCs are cached as serialized responses (see `cache.py`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import date
from typing import Final, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message
from google.type import date_pb2, money_pb2

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.common.v1 import common_pb2
from libs.common.context import current_tenant
from libs.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from services.analytics import factors as factor_engine
from services.analytics import metrics as engine
from services.analytics import optimize as opt
from services.analytics import tables as table_engine
from services.analytics.analyze import AnalyzeInput, AnalyzeOutcome, Analyzer, GroundingResult
from services.analytics.bars import BarColumns, Rejection, SeriesInput
from services.analytics.cache import ResultCache
from services.analytics.market import (
    MAX_METRIC_SYMBOLS,
    MAX_PORTFOLIO_HOLDINGS,
    Conventions,
    DateWindow,
    FactorExposureResult,
    MarketAnalytics,
    MetricParams,
    MetricsResult,
    PortfolioResult,
    TableRequest,
    check_omega_threshold,
    check_params,
    check_symbol,
    check_symbols,
    check_tables,
    check_window,
)
from services.analytics.portfolio_optimization import (
    BoundsInput,
    GroupInput,
    OptimizeInput,
    OptimizeResult,
    optimize_portfolio,
)
from services.analytics.portfolio_optimization import check_input as check_optimize_input
from services.analytics.storage import SHARED_TENANT, TenantView
from services.analytics.telemetry import BARS_INGESTED, FACTOR_REGRESSIONS

DEFAULT_PAGE_SIZE: Final = 10_000
MAX_PAGE_SIZE: Final = 50_000
M = TypeVar("M", bound=Message)

_ROLLING: Final[dict[int, engine.RollingMetricName]] = {
    pb.ROLLING_METRIC_VOLATILITY: "volatility",
    pb.ROLLING_METRIC_SHARPE: "sharpe",
    pb.ROLLING_METRIC_BETA: "beta",
    pb.ROLLING_METRIC_DRAWDOWN: "drawdown",
    pb.ROLLING_METRIC_SORTINO: "sortino",
    pb.ROLLING_METRIC_INFORMATION_RATIO: "information_ratio",
    pb.ROLLING_METRIC_DOWNSIDE_CAPTURE: "downside_capture",
}
_REBALANCE: Final[dict[int, engine.Rebalance]] = {
    pb.REBALANCE_UNSPECIFIED: "monthly",
    pb.REBALANCE_NONE: "none",
    pb.REBALANCE_DAILY: "daily",
    pb.REBALANCE_WEEKLY: "weekly",
    pb.REBALANCE_MONTHLY: "monthly",
    pb.REBALANCE_QUARTERLY: "quarterly",
    pb.REBALANCE_ANNUAL: "annual",
}
_REBALANCE_PB: Final = {v: k for k, v in _REBALANCE.items() if k != pb.REBALANCE_UNSPECIFIED}


# -- small converters ------------------------------------------------------------------------


def to_pb_date(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def from_pb_date(v: Violations, value: date_pb2.Date, field: str) -> date | None:
    """A set google.type.Date -> date; an all-zero (unset) date -> None."""
    if value.year == 0 and value.month == 0 and value.day == 0:
        return None
    try:
        return date(value.year, value.month, value.day)
    except ValueError:
        v.add(field, "must be a full calendar date (year 1-9999, month and day set)")
        return None


def window_from(v: Violations, request: Message, field: str = "range") -> DateWindow:
    rng: common_pb2.DateRange = getattr(request, field)
    start = from_pb_date(v, rng.start, f"{field}.start") if rng.HasField("start") else None
    end = from_pb_date(v, rng.end, f"{field}.end") if rng.HasField("end") else None
    window = DateWindow(start, end)
    check_window(v, window, field)
    return window


def conventions_pb(c: Conventions) -> pb.Conventions:
    return pb.Conventions(
        periods_per_year=c.periods_per_year,
        ddof=c.ddof,
        risk_free_rate_annual=c.risk_free_annual,
        risk_free_rate_per_period=c.risk_free_per_period,
        returns_rule=c.returns_rule,
        tail_rule=c.tail_rule,
        reference=c.reference,
        omega_threshold_annual=c.omega_threshold_annual,
        omega_threshold_per_period=c.omega_threshold_per_period,
        moments_rule=c.moments_rule,
        win_rate_rule=c.win_rate_rule,
        capture_rule=c.capture_rule,
        tail_ratio_rule=c.tail_ratio_rule,
        treynor_rule=c.treynor_rule,
        cornish_fisher_rule=c.cornish_fisher_rule,
        calendar_rule=c.calendar_rule,
    )


def period_return_pb(r: engine.PeriodReturn | None) -> pb.CalendarPeriodReturn | None:
    if r is None:
        return None
    return pb.CalendarPeriodReturn(
        value=r.value,
        period_start=to_pb_date(r.period_start),
        period_end=to_pb_date(r.period_end),
        return_count=r.n_returns,
    )


def drawdown_period_pb(d: table_engine.DrawdownPeriod) -> pb.DrawdownPeriod:
    out = pb.DrawdownPeriod(
        depth=d.depth,
        peak_date=to_pb_date(d.peak_date),
        trough_date=to_pb_date(d.trough_date),
        recovered=d.recovered,
        periods_to_trough=d.periods_to_trough,
        days_to_trough=d.days_to_trough,
        duration_periods=d.duration_periods,
        duration_days=d.duration_days,
    )
    if d.recovery_date is not None:
        out.recovery_date.CopyFrom(to_pb_date(d.recovery_date))
    return out


def table_period_pb(r: table_engine.TablePeriod) -> pb.CalendarPeriodReturn:
    return pb.CalendarPeriodReturn(
        value=r.value,
        period_start=to_pb_date(r.period_start),
        period_end=to_pb_date(r.period_end),
        return_count=r.n_returns,
        partial=r.partial,
    )


def add_tables_pb(out: pb.SeriesMetrics, t: table_engine.SeriesTables | None) -> pb.SeriesMetrics:
    """The drawdown and period tables of one series into its SeriesMetrics (in place)."""
    if t is not None:
        out.drawdown_periods.extend(drawdown_period_pb(d) for d in t.drawdowns)
        out.monthly_returns.extend(table_period_pb(r) for r in t.monthly)
        out.yearly_returns.extend(table_period_pb(r) for r in t.yearly)
    return out


def metrics_response_pb(
    result: MetricsResult, tables: TableRequest | None = None
) -> pb.ComputeMetricsResponse:
    """ComputeMetricsResponse of a result (runs in a worker thread: large tables take ~0.1 s)."""
    out = pb.ComputeMetricsResponse(
        metrics=[
            add_tables_pb(series_metrics_pb(m), result.tables.get(m.symbol)) for m in result.metrics
        ],
        conventions=conventions_pb(result.conventions),
        data_version=result.data_version,
    )
    if tables is not None and tables.wanted:
        out.conventions.table_rule = table_engine.TABLE_RULE
    return out


def series_metrics_pb(m: engine.SymbolMetrics) -> pb.SeriesMetrics:
    dd = m.drawdown
    drawdown = pb.Drawdown(
        max_drawdown=dd.max_drawdown,
        recovered=dd.recovered,
        duration_periods=dd.duration_periods,
        duration_days=dd.duration_days,
    )
    if dd.peak_date is not None:
        drawdown.peak_date.CopyFrom(to_pb_date(dd.peak_date))
    if dd.trough_date is not None:
        drawdown.trough_date.CopyFrom(to_pb_date(dd.trough_date))
    if dd.recovery_date is not None:
        drawdown.recovery_date.CopyFrom(to_pb_date(dd.recovery_date))
    out = pb.SeriesMetrics(
        symbol=m.symbol,
        start_date=to_pb_date(m.start_date),
        end_date=to_pb_date(m.end_date),
        return_count=m.n_returns,
        total_return=m.total_return,
        cagr=m.cagr,
        volatility=m.volatility,
        sharpe=m.sharpe,
        sortino=m.sortino,
        calmar=m.calmar,
        drawdown=drawdown,
        var_95=m.var_95,
        var_99=m.var_99,
        cvar_95=m.cvar_95,
        cvar_99=m.cvar_99,
        parametric_var_95=m.parametric_var_95,
        parametric_var_99=m.parametric_var_99,
        skew=m.skew,
        kurtosis=m.kurtosis,
        best=pb.DatedReturn(value=m.best.value, date=to_pb_date(m.best.date)),
        worst=pb.DatedReturn(value=m.worst.value, date=to_pb_date(m.worst.date)),
        positive_share=m.positive_share,
        relative_unavailable=m.relative_unavailable,
        omega_ratio=m.omega,
        tail_ratio=m.tail_ratio,
        stability=m.stability,
        win_rate=m.win_rate,
        parametric_cvar_95=m.parametric_cvar_95,
        parametric_cvar_99=m.parametric_cvar_99,
        cornish_fisher_var_95=m.cornish_fisher_var_95,
        cornish_fisher_var_99=m.cornish_fisher_var_99,
        cornish_fisher_cvar_95=m.cornish_fisher_cvar_95,
        cornish_fisher_cvar_99=m.cornish_fisher_cvar_99,
        best_month=period_return_pb(m.best_month),
        worst_month=period_return_pb(m.worst_month),
        best_year=period_return_pb(m.best_year),
        worst_year=period_return_pb(m.worst_year),
    )
    if m.relative is not None:
        r = m.relative
        out.relative.CopyFrom(
            pb.BenchmarkRelative(
                benchmark=r.benchmark,
                beta=r.beta,
                alpha=r.alpha,
                tracking_error=r.tracking_error,
                information_ratio=r.information_ratio,
                common_periods=r.n_common,
                first_common_date=to_pb_date(r.first_date),
                last_common_date=to_pb_date(r.last_date),
                up_capture=r.up_capture,
                down_capture=r.down_capture,
                capture_ratio=r.capture_ratio,
                total_capture=r.total_capture,
                treynor=r.treynor,
            )
        )
    return out


def bar_series_pb(bars: BarColumns, symbol: str) -> pb.BarSeries:
    out = pb.BarSeries(symbol=symbol)
    out.dates.extend(to_pb_date(d) for d in bars.days.tolist())
    out.open_micros.extend(bars.open.tolist())
    out.high_micros.extend(bars.high.tolist())
    out.low_micros.extend(bars.low.tolist())
    out.close_micros.extend(bars.close.tolist())
    out.adj_close_micros.extend(bars.adj_close.tolist())
    out.volumes.extend(bars.volume.tolist())
    return out


def series_inputs(message_index: int, request: pb.IngestBarsRequest) -> list[SeriesInput]:
    """Protobuf columns -> numpy columns (runs in a worker thread: ~1 us per row)."""
    out = []
    for i, s in enumerate(request.series):
        ymd = np.array([(d.year, d.month, d.day) for d in s.dates], dtype=np.int64).reshape(-1, 3)
        out.append(
            SeriesInput(
                message_index,
                i,
                s.symbol,
                ymd[:, 0],
                ymd[:, 1],
                ymd[:, 2],
                np.array(s.open_micros, dtype=np.int64),
                np.array(s.high_micros, dtype=np.int64),
                np.array(s.low_micros, dtype=np.int64),
                np.array(s.close_micros, dtype=np.int64),
                np.array(s.adj_close_micros, dtype=np.int64),
                np.array(s.volumes, dtype=np.int64),
            )
        )
    return out


def rejection_pb(r: Rejection) -> pb.RejectedBar:
    out = pb.RejectedBar(
        message_index=r.message_index,
        series_index=r.series_index,
        row_index=r.row_index,
        symbol=r.symbol,
        reason=r.reason,
    )
    if r.day is not None:
        out.date.CopyFrom(to_pb_date(r.day))
    return out


def params_from(v: Violations, request: Message) -> MetricParams:
    return check_params(
        v,
        getattr(request, "periods_per_year"),  # noqa: B009 - shared by several request types
        getattr(request, "risk_free_rate"),  # noqa: B009
    )


def check_holdings(
    v: Violations, holdings: Sequence[pb.Holding], allow_short: bool, field: str
) -> tuple[list[str], list[float]]:
    """The symbols and weights of `holdings` (ComputePortfolio, a factor regression's
    portfolio), their violations added to `v`: distinct valid symbols, finite weights, no
    negative one without `allow_short`, a sum of 1 within the engine's tolerance."""
    symbols = [h.symbol for h in holdings]
    weights = [h.weight for h in holdings]
    check_symbols(v, symbols, field, MAX_PORTFOLIO_HOLDINGS)
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            v.add(f"{field}[{i}].weight", "must be finite")
        elif w < 0 and not allow_short:
            v.add(f"{field}[{i}].weight", "negative weight needs allow_short")
    if symbols and all(math.isfinite(w) for w in weights):
        try:
            total = math.fsum(weights)
        except OverflowError:  # e.g. 1e308 + 1e308: fsum raises instead of returning inf
            total = math.inf
        v.check(
            abs(total - 1.0) <= engine.WEIGHT_SUM_TOLERANCE,
            field,
            f"weights must sum to 1 (within 1e-9), sum is {total!r}",
        )
    return symbols, weights


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(
        self, market: MarketAnalytics, cache: ResultCache, analyzer: Analyzer | None = None
    ) -> None:
        self.market = market
        self.cache = cache
        self.analyzer = analyzer

    async def _cached(
        self,
        method: str,
        request: Message,
        cls: type[M],
        compute: Callable[[TenantView], Awaitable[M]],
    ) -> M:
        # One version check per request; the computation reads at (or past) this view.
        view = await self.market.view(current_tenant())
        if not self.cache.enabled:
            return await compute(view)
        version = view.data_version
        key = ResultCache.key(
            view.tenant, version, method, request.SerializeToString(deterministic=True)
        )
        hit = await self.cache.get(key)
        if hit is not None:
            return cls.FromString(hit)
        response = await compute(view)
        # Only a result computed at the version in the key may be stored under it.
        if getattr(response, "data_version", None) == version:
            await self.cache.put(key, response.SerializeToString())
        return response

    # -- data --------------------------------------------------------------------------------
    async def IngestBars(
        self,
        request_iterator: AsyncIterator[pb.IngestBarsRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.IngestBarsResponse:
        tenant = current_tenant()
        if tenant == SHARED_TENANT:
            raise PermissionDenied("the shared reference tenant cannot be written over the API")
        series: list[SeriesInput] = []
        reject_all: bool | None = None
        rows = 0
        index = 0
        async for message in request_iterator:
            if reject_all is None:
                reject_all = message.on_invalid == pb.INVALID_ROW_POLICY_REJECT_ALL
            rows += sum(len(s.dates) for s in message.series)
            if rows > self.market.max_ingest_rows:
                raise InvalidArgument.field(
                    f"messages[{index}]",
                    f"the stream exceeds {self.market.max_ingest_rows} rows; split it into "
                    "several IngestBars calls (nothing was written)",
                )
            series.extend(await asyncio.to_thread(series_inputs, index, message))
            index += 1
        summary = await self.market.ingest(tenant, series, bool(reject_all))
        for outcome in ("inserted", "updated", "unchanged", "rejected"):
            BARS_INGESTED.labels(outcome).inc(getattr(summary, outcome))
        return pb.IngestBarsResponse(
            received=summary.received,
            inserted=summary.inserted,
            updated=summary.updated,
            unchanged=summary.unchanged,
            rejected=summary.rejected,
            rejections=[rejection_pb(r) for r in summary.rejections],
            data_version=summary.data_version,
            duplicates_collapsed=summary.duplicates_collapsed,
        )

    async def ListSymbols(
        self, request: pb.ListSymbolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSymbolsResponse:
        symbols, version = await self.market.list_symbols(await self.market.view(current_tenant()))
        return pb.ListSymbolsResponse(
            symbols=[
                pb.SymbolInfo(
                    symbol=s.symbol,
                    first_date=to_pb_date(s.first_day),
                    last_date=to_pb_date(s.last_day),
                    bar_count=s.bar_count,
                    source=pb.DATA_SOURCE_SHARED if s.shared else pb.DATA_SOURCE_TENANT,
                )
                for s in symbols
            ],
            data_version=version,
        )

    async def GetBars(
        self, request: pb.GetBarsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetBarsResponse]:
        v = Violations()
        window = window_from(v, request)
        page = request.page_size or DEFAULT_PAGE_SIZE
        v.check(1 <= page <= MAX_PAGE_SIZE, "page_size", f"must be 0-{MAX_PAGE_SIZE} (0 = 10,000)")
        v.raise_if_any()
        view = await self.market.view(current_tenant())
        bars = await self.market.bars(view, request.symbol, window)
        for start in range(0, max(len(bars), 1), page):
            chunk = bars.take(np.arange(start, min(start + page, len(bars))))
            yield pb.GetBarsResponse(
                bars=await asyncio.to_thread(bar_series_pb, chunk, request.symbol)
            )

    # -- metrics -----------------------------------------------------------------------------
    async def ComputeMetrics(
        self, request: pb.ComputeMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeMetricsResponse:
        v = Violations()
        symbols = list(request.symbols)
        check_symbols(v, symbols, "symbols", MAX_METRIC_SYMBOLS)
        if request.benchmark:
            check_symbol(v, request.benchmark, "benchmark")
        window = window_from(v, request)
        params = params_from(v, request)
        if request.HasField("omega_threshold_annual"):
            params = check_omega_threshold(v, params, request.omega_threshold_annual)
        tables = check_tables(v, request.drawdown_table_size, request.period_returns)
        v.raise_if_any()

        async def compute(view: TenantView) -> pb.ComputeMetricsResponse:
            result = await self.market.compute_metrics(
                view, symbols, window, request.benchmark, params, tables
            )
            return await asyncio.to_thread(metrics_response_pb, result, tables)

        return await self._cached("ComputeMetrics", request, pb.ComputeMetricsResponse, compute)

    async def RollingMetrics(
        self, request: pb.RollingMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollingMetricsResponse:
        v = Violations()
        check_symbol(v, request.symbol, "symbol")
        metric = _ROLLING.get(request.metric)
        v.check(
            metric is not None,
            "metric",
            "required: one of VOLATILITY, SHARPE, BETA, DRAWDOWN, SORTINO, INFORMATION_RATIO, "
            "DOWNSIDE_CAPTURE",
        )
        v.check(request.window >= 2, "window", f"must be at least 2, got {request.window}")
        if metric in engine.BENCHMARK_ROLLING_METRICS:
            check_symbol(v, request.benchmark, "benchmark")
        window = window_from(v, request)
        params = params_from(v, request)
        v.raise_if_any()
        assert metric is not None

        async def compute(view: TenantView) -> pb.RollingMetricsResponse:
            result = await self.market.rolling(
                view,
                request.symbol,
                metric,
                request.window,
                window,
                request.benchmark,
                params,
            )
            return pb.RollingMetricsResponse(
                symbol=result.symbol,
                metric=request.metric,
                window=result.window,
                points=[
                    pb.SeriesPoint(date=to_pb_date(d), value=x)
                    for d, x in zip(result.days, result.values, strict=True)
                ],
                conventions=conventions_pb(result.conventions),
                data_version=result.data_version,
            )

        return await self._cached("RollingMetrics", request, pb.RollingMetricsResponse, compute)

    async def ComputePortfolio(
        self, request: pb.ComputePortfolioRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputePortfolioResponse:
        v = Violations()
        symbols, weights = check_holdings(v, request.holdings, request.allow_short, "holdings")
        rebalance = _REBALANCE.get(request.rebalance)
        v.check(rebalance is not None, "rebalance", "unknown rebalancing rule")
        if request.benchmark:
            check_symbol(v, request.benchmark, "benchmark")
        window = window_from(v, request)
        params = params_from(v, request)
        tables = check_tables(v, request.drawdown_table_size, request.period_returns)
        v.raise_if_any()
        assert rebalance is not None

        async def compute(view: TenantView) -> pb.ComputePortfolioResponse:
            result = await self.market.portfolio(
                view,
                symbols,
                weights,
                window,
                rebalance,
                request.benchmark,
                request.allow_short,
                params,
                tables,
            )
            return await asyncio.to_thread(self._portfolio_pb, request, result)

        return await self._cached("ComputePortfolio", request, pb.ComputePortfolioResponse, compute)

    @staticmethod
    def _portfolio_pb(
        request: pb.ComputePortfolioRequest, result: PortfolioResult
    ) -> pb.ComputePortfolioResponse:
        a = result.analysis
        names = list(a.symbols)
        out = pb.ComputePortfolioResponse(
            metrics=add_tables_pb(series_metrics_pb(a.metrics), result.tables),
            covariance=pb.Matrix(symbols=names, values=a.covariance.ravel().tolist()),
            correlation=pb.Matrix(symbols=names, values=a.correlation.ravel().tolist()),
            risk_contributions=[
                pb.RiskContribution(symbol=s, weight=w, contribution=c, share=sh)
                for s, w, c, sh in zip(
                    names,
                    a.weights.tolist(),
                    a.risk.contributions.tolist(),
                    a.risk.shares.tolist(),
                    strict=True,
                )
            ],
            portfolio_volatility=a.risk.portfolio_volatility,
            rebalance=_REBALANCE_PB[a.rebalance],
            conventions=conventions_pb(result.conventions),
            data_version=result.data_version,
        )
        if result.tables is not None:
            out.conventions.table_rule = table_engine.TABLE_RULE
        if request.include_returns:
            defined = ~np.isnan(a.returns)
            out.returns.extend(
                pb.SeriesPoint(date=to_pb_date(d), value=x)
                for d, x in zip(a.dates[defined].tolist(), a.returns[defined].tolist(), strict=True)
            )
        return out

    # -- factor exposure ---------------------------------------------------------------------
    async def ComputeFactorExposure(
        self, request: pb.ComputeFactorExposureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeFactorExposureResponse:
        v = Violations()
        subject: str | factor_engine.PortfolioSubject
        kind = request.WhichOneof("subject")
        if kind == "portfolio":
            subject = self._factor_portfolio(v, request.portfolio)
        else:
            check_symbol(v, request.symbol, "symbol")
            subject = request.symbol
        names = [f.symbol for f in request.factors]
        if not names:
            v.add("factors", "at least one factor is required")
        v.check(
            len(names) <= factor_engine.MAX_FACTORS,
            "factors",
            f"at most {factor_engine.MAX_FACTORS} factors, got {len(names)}",
        )
        seen: set[str] = set()
        for i, name in enumerate(names[: factor_engine.MAX_FACTORS]):
            field = f"factors[{i}].symbol"
            if not check_symbol(v, name, field):
                continue
            v.check(name not in seen, field, f"duplicate factor {name!r}")
            v.check(name != subject, field, f"{name!r} is the subject itself")
            seen.add(name)
        if isinstance(subject, factor_engine.PortfolioSubject) and len(subject.symbols) == 1:
            only = subject.symbols[0]
            v.check(only not in seen, "portfolio.holdings", f"{only!r} is also a factor")
        rolling = request.rolling_window
        v.check(
            rolling == 0 or rolling >= len(names) + 2,
            "rolling_window",
            f"0 (none) or at least the factors plus 2 ({len(names) + 2}), got {rolling}",
        )
        se = _STANDARD_ERRORS.get(request.standard_errors)
        v.check(se is not None, "standard_errors", "unknown standard error type")
        v.check(
            0 <= request.hac_lags <= 1000, "hac_lags", f"must be 0-1000, got {request.hac_lags}"
        )
        window = window_from(v, request)
        params = params_from(v, request)
        v.raise_if_any()
        assert se is not None
        kind_label = (
            "portfolio" if isinstance(subject, factor_engine.PortfolioSubject) else "symbol"
        )

        async def compute(view: TenantView) -> pb.ComputeFactorExposureResponse:
            try:
                result = await self.market.factor_exposure(
                    view,
                    subject,
                    [(f.symbol, f.excess_return) for f in request.factors],
                    window,
                    params,
                    rolling_window=rolling,
                    standard_errors=se,
                    hac_lags=request.hac_lags,
                )
            except (InvalidArgument, FailedPrecondition, NotFound) as exc:
                outcome = {
                    InvalidArgument: "invalid",
                    FailedPrecondition: "collinear",
                    NotFound: "not_found",
                }[type(exc)]
                FACTOR_REGRESSIONS.labels(kind_label, outcome).inc()
                raise
            FACTOR_REGRESSIONS.labels(kind_label, "ok").inc()
            return await asyncio.to_thread(factor_exposure_pb, result)

        return await self._cached(
            "ComputeFactorExposure", request, pb.ComputeFactorExposureResponse, compute
        )

    @staticmethod
    def _factor_portfolio(
        v: Violations, portfolio: pb.FactorPortfolio
    ) -> factor_engine.PortfolioSubject:
        symbols, weights = check_holdings(
            v, portfolio.holdings, portfolio.allow_short, "portfolio.holdings"
        )
        rebalance = _REBALANCE.get(portfolio.rebalance)
        v.check(rebalance is not None, "portfolio.rebalance", "unknown rebalancing rule")
        return factor_engine.PortfolioSubject(
            tuple(symbols), tuple(weights), rebalance or "monthly", portfolio.allow_short
        )

    # -- optimisation ------------------------------------------------------------------------
    async def OptimizePortfolio(
        self, request: pb.OptimizePortfolioRequest, context: grpc.aio.ServicerContext
    ) -> pb.OptimizePortfolioResponse:
        v = Violations()
        params = params_from(v, request)
        inputs = optimize_input_from(v, request)
        spec = check_optimize_input(v, inputs, params)
        v.raise_if_any()
        assert spec is not None

        async def compute(view: TenantView) -> pb.OptimizePortfolioResponse:
            result = await optimize_portfolio(self.market, view, inputs, spec, params)
            return await asyncio.to_thread(optimize_response_pb, result)

        return await self._cached(
            "OptimizePortfolio", request, pb.OptimizePortfolioResponse, compute
        )

    # -- analyze -----------------------------------------------------------------------------
    async def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeResponse:
        assert self.analyzer is not None, "Analyze needs the memory and gateway channels"
        v = Violations()
        window = window_from(v, request)
        params = params_from(v, request)
        if request.benchmark:
            check_symbol(v, request.benchmark, "benchmark")
        check_symbols(v, list(request.symbols), "symbols", 20)
        self.analyzer.check_request(
            v, request.session_id, request.user_id, request.question, request.model
        )
        v.raise_if_any()
        outcome: AnalyzeOutcome = await self.analyzer.analyze(
            AnalyzeInput(
                tenant=current_tenant(),
                session_id=request.session_id,
                user_id=request.user_id,
                symbols=list(request.symbols),
                question=request.question,
                benchmark=request.benchmark,
                window=window,
                params=params,
                model=request.model,
            )
        )
        out = pb.AnalyzeResponse(
            metrics=[series_metrics_pb(m) for m in outcome.metrics.metrics],
            conventions=conventions_pb(outcome.metrics.conventions),
            narrative=outcome.narrative,
            commentary_source=_SOURCES[outcome.source],
            model=outcome.model,
            trace_id=outcome.trace_id,
            warnings=outcome.warnings,
            data_version=outcome.metrics.data_version,
            grounding=grounding_pb(outcome.grounding),
            window_source=outcome.window_source,
            question_injection_signals=outcome.question_signals,
            flagged_fact_ids=outcome.flagged_fact_ids,
            redactions=[common_pb2.Redaction(kind=k, count=n) for k, n in outcome.redactions],
        )
        if outcome.optimization is not None:
            out.optimization.CopyFrom(
                await asyncio.to_thread(optimize_response_pb, outcome.optimization)
            )
        if outcome.window.start is not None:
            out.window.start.CopyFrom(to_pb_date(outcome.window.start))
        if outcome.window.end is not None:
            out.window.end.CopyFrom(to_pb_date(outcome.window.end))
        if outcome.usage is not None:
            u = outcome.usage
            out.usage.CopyFrom(
                common_pb2.TokenUsage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    cached_prompt_tokens=u.cached_prompt_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                    total_tokens=u.total_tokens,
                )
            )
            units, nanos = divmod(u.cost_nanos, 1_000_000_000)
            out.cost.CopyFrom(money_pb2.Money(currency_code=u.currency, units=units, nanos=nanos))
        return out


_SOURCES: Final = {
    "llm": pb.COMMENTARY_SOURCE_LLM,
    "rules": pb.COMMENTARY_SOURCE_RULES,
    "rejected": pb.COMMENTARY_SOURCE_GROUNDING_REJECTED,
}
_POLICIES: Final = {
    "annotate": pb.GROUNDING_POLICY_ANNOTATE,
    "reject": pb.GROUNDING_POLICY_REJECT,
    "off": pb.GROUNDING_POLICY_OFF,
}
_OUTCOMES: Final = {
    "verified": pb.GROUNDING_OUTCOME_VERIFIED,
    "annotated": pb.GROUNDING_OUTCOME_ANNOTATED,
    "rejected": pb.GROUNDING_OUTCOME_REJECTED,
    "skipped": pb.GROUNDING_OUTCOME_SKIPPED,
}


def grounding_pb(g: GroundingResult) -> pb.Grounding:
    return pb.Grounding(
        figures_checked=g.report.figures_checked,
        unverified_figures=[
            pb.UnverifiedFigure(text=u.text, start=u.start, end=u.end, reason=u.reason)
            for u in g.report.unverified
        ],
        policy=_POLICIES[g.policy],
        outcome=_OUTCOMES[g.outcome],
        cited=g.cited,
    )


_STANDARD_ERRORS: Final[dict[int, factor_engine.StandardErrorType]] = {
    pb.STANDARD_ERROR_TYPE_UNSPECIFIED: "classic",
    pb.STANDARD_ERROR_TYPE_CLASSIC: "classic",
    pb.STANDARD_ERROR_TYPE_HAC: "hac",
}
_STANDARD_ERRORS_PB: Final = {
    "classic": pb.STANDARD_ERROR_TYPE_CLASSIC,
    "hac": pb.STANDARD_ERROR_TYPE_HAC,
}


def _points(days: list[date], values: list[float]) -> list[pb.SeriesPoint]:
    return [pb.SeriesPoint(date=to_pb_date(d), value=x) for d, x in zip(days, values, strict=True)]


def factor_exposure_pb(result: FactorExposureResult) -> pb.ComputeFactorExposureResponse:
    e = result.exposure
    out = pb.ComputeFactorExposureResponse(
        subject=e.subject,
        loadings=[
            pb.FactorLoading(
                factor=f.factor,
                excess_return=f.excess,
                loading=f.loading,
                standard_error=f.standard_error,
                t_stat=f.t_stat,
            )
            for f in e.loadings
        ],
        alpha=e.alpha,
        alpha_annualized=e.alpha_annual,
        alpha_standard_error=e.alpha_standard_error,
        alpha_t_stat=e.alpha_t_stat,
        r_squared=e.r_squared,
        adj_r_squared=e.adj_r_squared,
        residual_volatility=e.residual_volatility,
        observations=e.observations,
        first_date=to_pb_date(e.first_date),
        last_date=to_pb_date(e.last_date),
        standard_errors=_STANDARD_ERRORS_PB[e.standard_errors],
        hac_lags=e.hac_lags,
        conventions=conventions_pb(result.conventions),
        data_version=result.data_version,
    )
    if e.rolling is not None:
        r = e.rolling
        out.rolling_window = r.window
        out.rolling_loadings.extend(
            pb.RollingLoading(factor=name, points=_points(r.dates, values))
            for name, values in r.loadings.items()
        )
        out.rolling_alpha.extend(_points(r.dates, r.alpha_annual))
        out.rolling_r_squared.extend(_points(r.dates, r.r_squared))
    return out


# -- OptimizePortfolio -----------------------------------------------------------------------
_OBJECTIVES: Final[dict[int, opt.Objective]] = {
    pb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE: "min_variance",
    pb.OPTIMIZATION_OBJECTIVE_MAX_SHARPE: "max_sharpe",
    pb.OPTIMIZATION_OBJECTIVE_MIN_CVAR: "min_cvar",
    pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY: "risk_parity",
    pb.OPTIMIZATION_OBJECTIVE_HRP: "hrp",
}
_OBJECTIVES_PB: Final = {v: k for k, v in _OBJECTIVES.items()}
_RETURN_ESTIMATORS: Final[dict[int, opt.ReturnEstimator]] = {
    pb.RETURN_ESTIMATOR_UNSPECIFIED: "sample",
    pb.RETURN_ESTIMATOR_SAMPLE: "sample",
    pb.RETURN_ESTIMATOR_EXPONENTIAL: "exponential",
}
_COVARIANCE_ESTIMATORS: Final[dict[int, opt.CovarianceEstimator]] = {
    pb.COVARIANCE_ESTIMATOR_UNSPECIFIED: "sample",
    pb.COVARIANCE_ESTIMATOR_SAMPLE: "sample",
    pb.COVARIANCE_ESTIMATOR_EXPONENTIAL: "exponential",
    pb.COVARIANCE_ESTIMATOR_LEDOIT_WOLF: "ledoit_wolf",
}


def _optional(message: Message, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


def optimize_input_from(v: Violations, r: pb.OptimizePortfolioRequest) -> OptimizeInput:
    """The request as plain values; enum and date problems are collected in `v`."""
    objective = _OBJECTIVES.get(r.objective)
    returns = _RETURN_ESTIMATORS.get(r.return_estimator)
    v.check(returns is not None, "return_estimator", "unknown estimator")
    covariance = _COVARIANCE_ESTIMATORS.get(r.covariance_estimator)
    v.check(covariance is not None, "covariance_estimator", "unknown estimator")
    rebalance = _REBALANCE.get(r.rebalance)
    v.check(rebalance is not None, "rebalance", "unknown rebalancing rule")
    window = window_from(v, r, "range")
    evaluation = window_from(v, r, "evaluation_range") if r.HasField("evaluation_range") else None
    return OptimizeInput(
        symbols=tuple(r.symbols),
        objective=objective,
        window=window,
        evaluation=evaluation,
        return_estimator=returns or "sample",
        covariance_estimator=covariance or "sample",
        half_life=r.half_life,
        allow_short=r.allow_short,
        min_weight=_optional(r, "min_weight"),
        max_weight=_optional(r, "max_weight"),
        bounds=tuple(
            BoundsInput(b.symbol, _optional(b, "min_weight"), _optional(b, "max_weight"))
            for b in r.bounds
        ),
        groups=tuple(
            GroupInput(
                g.name, tuple(g.symbols), _optional(g, "max_weight"), _optional(g, "min_weight")
            )
            for g in r.groups
        ),
        target_return=_optional(r, "target_return"),
        target_volatility=_optional(r, "target_volatility"),
        current=tuple((h.symbol, h.weight) for h in r.current_weights),
        max_turnover=_optional(r, "max_turnover"),
        confidence=r.cvar_confidence,
        rebalance=rebalance or "monthly",
        benchmark=r.benchmark,
        frontier_points=r.frontier_points,
    )


def optimize_response_pb(result: OptimizeResult) -> pb.OptimizePortfolioResponse:
    spec, est, sol = result.spec, result.estimates, result.solution
    names = list(spec.symbols)
    weights = sol.weights.tolist()
    vols = np.sqrt(np.clip(np.diag(est.cov), 0.0, None)).tolist()
    out = pb.OptimizePortfolioResponse(
        weights=[pb.Holding(symbol=s, weight=w) for s, w in zip(names, weights, strict=True)],
        objective=_OBJECTIVES_PB[spec.objective],
        objective_value=sol.objective_value,
        expected_return=sol.expected_return,
        expected_volatility=sol.volatility,
        expected_sharpe=sol.sharpe,
        risk_contributions=[
            pb.RiskContribution(symbol=s, weight=w, contribution=c, share=sh)
            for s, w, c, sh in zip(
                names,
                weights,
                sol.risk.contributions.tolist(),
                sol.risk.shares.tolist(),
                strict=True,
            )
        ],
        assets=[
            pb.AssetEstimate(symbol=s, expected_return=m, volatility=sd)
            for s, m, sd in zip(names, est.mu.tolist(), vols, strict=True)
        ],
        covariance=pb.Matrix(symbols=names, values=est.cov.ravel().tolist()),
        shrinkage=est.shrinkage,
        estimation_window=common_pb2.DateRange(
            start=to_pb_date(result.estimation_first), end=to_pb_date(result.estimation_last)
        ),
        estimation_periods=int(est.returns.shape[0]),
        evaluation=series_metrics_pb(result.evaluation.analysis.metrics),
        out_of_sample=result.out_of_sample,
        rebalance=_REBALANCE_PB[result.rebalance],
        solver=pb.SolverReport(
            solver=sol.solver, status=sol.status, iterations=sol.iterations, seconds=sol.seconds
        ),
        frontier=[
            pb.FrontierPoint(
                target_return=p.target_return,
                expected_return=p.expected_return,
                volatility=p.volatility,
                sharpe=p.sharpe,
                weights=p.weights.tolist(),
            )
            for p in sol.frontier
        ],
        conventions=conventions_pb(result.params.conventions()),
        data_version=result.data_version,
    )
    out.optimization_rule = opt.describe(spec)
    return out
