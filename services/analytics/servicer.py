"""gRPC servicer: protobuf <-> domain translation for AnalyticsService, nothing else.

Validation of request shapes that only exist in protobuf (dates, enums, ranges) happens
here while translating; every rule about the data itself lives in the domain modules.
Results of the metric RPCs are cached as serialized responses (see `cache.py`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
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
from libs.common.errors import InvalidArgument, PermissionDenied, Violations
from services.analytics import metrics as engine
from services.analytics.analyze import AnalyzeInput, AnalyzeOutcome, Analyzer, GroundingResult
from services.analytics.bars import BarColumns, Rejection, SeriesInput
from services.analytics.cache import ResultCache
from services.analytics.market import (
    MAX_METRIC_SYMBOLS,
    MAX_PORTFOLIO_HOLDINGS,
    Conventions,
    DateWindow,
    MarketAnalytics,
    MetricParams,
    PortfolioResult,
    check_params,
    check_symbol,
    check_symbols,
    check_window,
)
from services.analytics.storage import SHARED_TENANT, TenantView
from services.analytics.telemetry import BARS_INGESTED

DEFAULT_PAGE_SIZE: Final = 10_000
MAX_PAGE_SIZE: Final = 50_000
M = TypeVar("M", bound=Message)

_ROLLING: Final[dict[int, engine.RollingMetricName]] = {
    pb.ROLLING_METRIC_VOLATILITY: "volatility",
    pb.ROLLING_METRIC_SHARPE: "sharpe",
    pb.ROLLING_METRIC_BETA: "beta",
    pb.ROLLING_METRIC_DRAWDOWN: "drawdown",
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
    )


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
        v.raise_if_any()

        async def compute(view: TenantView) -> pb.ComputeMetricsResponse:
            result = await self.market.compute_metrics(
                view, symbols, window, request.benchmark, params
            )
            return pb.ComputeMetricsResponse(
                metrics=[series_metrics_pb(m) for m in result.metrics],
                conventions=conventions_pb(result.conventions),
                data_version=result.data_version,
            )

        return await self._cached("ComputeMetrics", request, pb.ComputeMetricsResponse, compute)

    async def RollingMetrics(
        self, request: pb.RollingMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollingMetricsResponse:
        v = Violations()
        check_symbol(v, request.symbol, "symbol")
        metric = _ROLLING.get(request.metric)
        v.check(metric is not None, "metric", "required: one of VOLATILITY, SHARPE, BETA, DRAWDOWN")
        v.check(request.window >= 2, "window", f"must be at least 2, got {request.window}")
        if metric == "beta":
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
        symbols = [h.symbol for h in request.holdings]
        weights = [h.weight for h in request.holdings]
        check_symbols(v, symbols, "holdings", MAX_PORTFOLIO_HOLDINGS)
        for i, w in enumerate(weights):
            if not math.isfinite(w):
                v.add(f"holdings[{i}].weight", "must be finite")
            elif w < 0 and not request.allow_short:
                v.add(f"holdings[{i}].weight", "negative weight needs allow_short")
        total = math.fsum(weights)
        if symbols and math.isfinite(total):
            v.check(
                abs(total - 1.0) <= engine.WEIGHT_SUM_TOLERANCE,
                "holdings",
                f"weights must sum to 1 (within 1e-9), sum is {total!r}",
            )
        rebalance = _REBALANCE.get(request.rebalance)
        v.check(rebalance is not None, "rebalance", "unknown rebalancing rule")
        if request.benchmark:
            check_symbol(v, request.benchmark, "benchmark")
        window = window_from(v, request)
        params = params_from(v, request)
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
            metrics=series_metrics_pb(a.metrics),
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
        if request.include_returns:
            defined = ~np.isnan(a.returns)
            out.returns.extend(
                pb.SeriesPoint(date=to_pb_date(d), value=x)
                for d, x in zip(a.dates[defined].tolist(), a.returns[defined].tolist(), strict=True)
            )
        return out

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
