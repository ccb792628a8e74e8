"""gRPC servicer: protobuf ↔ domain translation for LlmGatewayService, nothing else.

Requests protobuf cannot parse (e.g. invalid UTF-8 in a string field) never reach it: the
kit's interceptor answers them with INVALID_ARGUMENT naming the field (libs/common/wire.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import grpc
from google.type import date_pb2, money_pb2

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import Violations
from services.llm_gateway.domain import (
    Completion,
    CompletionRequest,
    Delta,
    EmbedRequest,
    Tool,
    ToolCall,
)
from services.llm_gateway.domain import Message as ChatMessage
from services.llm_gateway.gateway import CatalogView, Gateway
from services.llm_gateway.pricing import Pricing, Usage, nanos_to_units, usd_to_nanos

SERVICE = "finsight.llm.v1.LlmGatewayService"

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_TOOL_CHOICE = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: "",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
    pb.TOOL_CHOICE_MODE_FUNCTION: "function",
}
_FORMATS = {
    pb.RESPONSE_FORMAT_UNSPECIFIED: "text",
    pb.RESPONSE_FORMAT_TEXT: "text",
    pb.RESPONSE_FORMAT_JSON_OBJECT: "json_object",
}
_CACHE = {
    pb.CACHE_POLICY_UNSPECIFIED: "auto",
    pb.CACHE_POLICY_DISABLED: "disabled",
    pb.CACHE_POLICY_ENABLED: "enabled",
    pb.CACHE_POLICY_REFRESH: "refresh",
}
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "insufficient_system_resource": pb.FINISH_REASON_INSUFFICIENT_SYSTEM_RESOURCE,
}
_CIRCUIT = {
    "closed": pb.CIRCUIT_STATE_CLOSED,
    "open": pb.CIRCUIT_STATE_OPEN,
    "half-open": pb.CIRCUIT_STATE_HALF_OPEN,
}


class LlmGatewayServicer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        completion = await self.gateway.complete(_completion_request(request))
        return pb.CompleteResponse(
            content=completion.content,
            reasoning_content=completion.reasoning,
            finish_reason=_FINISH.get(completion.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=_usage(completion.usage),
            cost=_money(completion.cost_nanos),
            provider=completion.provider,
            model=completion.model,
            route=completion.route,
            attempts=completion.attempts,
            cached=completion.cached,
            truncated=completion.truncated,
            dropped_message_indices=completion.dropped,
            provider_request_id=completion.provider_request_id,
            redactions=_redactions(completion.redactions),
            schema_repaired=completion.schema_repaired,
            tool_calls=_tool_calls(completion.tool_calls),
            provider_key_id=completion.provider_key_id,
        )

    async def StreamComplete(
        self, request: pb.StreamCompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        async for item in self.gateway.stream(_completion_request(request)):
            if isinstance(item, Delta):
                yield pb.StreamCompleteResponse(
                    delta=pb.CompletionDelta(
                        content=item.content,
                        reasoning_content=item.reasoning,
                        tool_calls=[
                            pb.ToolCallDelta(
                                index=c.index, id=c.id, name=c.name, arguments=c.arguments
                            )
                            for c in item.tool_calls
                        ],
                    )
                )
            else:
                yield pb.StreamCompleteResponse(end=_end(item))

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        result = await self.gateway.embed(
            EmbedRequest(
                model=request.model,
                inputs=list(request.inputs),
                dimensions=request.dimensions,
                cache_policy=_CACHE.get(request.cache_policy, f"unknown:{request.cache_policy}"),  # type: ignore[arg-type]
                cache_ttl_s=request.cache_ttl_seconds,
            )
        )
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in result.vectors],
            dimensions=result.dimensions,
            usage=_usage(result.usage),
            cost=_money(result.cost_nanos),
            provider=result.provider,
            model=result.model,
            route=result.route,
            attempts=result.attempts,
            cached=result.cached,
            redactions=_redactions(result.redactions),
            provider_key_id=result.provider_key_id,
        )

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        req = request
        count = await self.gateway.count_tokens(req.model, _messages(req.messages))
        return pb.CountTokensResponse(
            prompt_tokens=count.prompt_tokens,
            model=count.model,
            context_window=count.context_window,
            max_output_tokens=count.max_output_tokens,
            message_tokens=count.message_tokens,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        out = _list_models(self.gateway.list_models())
        for info in out.providers:  # the state shared by the replicas (breaker.py)
            breaker = self.gateway.breakers.get(info.name)
            if breaker is not None and info.available:
                shared = breaker.shared_state
                info.shared_circuit_state = (
                    _CIRCUIT[shared] if shared else pb.CIRCUIT_STATE_UNSPECIFIED
                )
                info.shared_consecutive_failures = breaker.shared_failures
        return out

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageResponse:
        req = request
        v = Violations()
        start = _date(req.range.start, "range.start", v) if req.range.HasField("start") else None
        end = _date(req.range.end, "range.end", v) if req.range.HasField("end") else None
        v.raise_if_any()
        report = await self.gateway.usage(start, end, req.model)
        out = pb.GetUsageResponse()
        total, cost, requests = Usage(), 0, 0
        for row in report.rows:
            out.rows.append(
                pb.UsageRow(
                    date=date_pb2.Date(year=row.day.year, month=row.day.month, day=row.day.day),
                    model=row.model,
                    usage=_usage(row.usage),
                    cost=_money(row.cost_nanos),
                    requests=row.requests,
                    cache_hits=row.cache_hits,
                )
            )
            total, cost, requests = (
                total + row.usage,
                cost + row.cost_nanos,
                requests + row.requests,
            )
        out.total_usage.CopyFrom(_usage(total))
        out.total_cost.CopyFrom(_money(cost))
        out.total_requests = requests
        if report.daily_budget_nanos is not None:
            out.daily_budget.CopyFrom(_money(report.daily_budget_nanos))
            out.remaining_budget_today.CopyFrom(_money(report.remaining_today_nanos or 0))
            if report.daily_budget_nanos > 0 and report.spent_today_nanos is not None:
                out.budget_used_fraction = report.spent_today_nanos / report.daily_budget_nanos
            if report.projected_exhaustion is not None:
                out.projected_exhaustion_time.FromDatetime(report.projected_exhaustion)
        return out


# -- translation helpers ---------------------------------------------------------------------
def _messages(messages: Any) -> list[ChatMessage]:
    return [
        ChatMessage(
            _ROLES.get(m.role, "" if m.role == 0 else f"ROLE_{m.role}"),
            m.content,
            tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
            m.tool_call_id,
        )
        for m in messages
    ]


def _tool_calls(calls: list[ToolCall]) -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def _completion_request(req: pb.CompleteRequest | pb.StreamCompleteRequest) -> CompletionRequest:
    json_schema = req.json_schema if isinstance(req, pb.CompleteRequest) else ""
    response_format = req.response_format
    if json_schema and response_format == pb.RESPONSE_FORMAT_UNSPECIFIED:
        response_format = pb.RESPONSE_FORMAT_JSON_OBJECT
    return CompletionRequest(
        model=req.model,
        messages=_messages(req.messages),
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        temperature=req.temperature if req.HasField("temperature") else None,
        top_p=req.top_p if req.HasField("top_p") else None,
        stop=list(req.stop),
        response_format=_FORMATS.get(response_format, f"unknown:{response_format}"),  # type: ignore[arg-type]
        cache_policy=_CACHE.get(req.cache_policy, f"unknown:{req.cache_policy}"),  # type: ignore[arg-type]
        cache_ttl_s=req.cache_ttl_seconds,
        json_schema=json_schema,
        tools=[Tool(t.name, t.description, t.parameters) for t in req.tools],
        tool_choice=_TOOL_CHOICE.get(req.tool_choice.mode, f"unknown:{req.tool_choice.mode}"),  # type: ignore[arg-type]
        tool_choice_name=req.tool_choice.function_name,
    )


def _usage(usage: Usage) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(
        prompt_tokens=usage.prompt,
        completion_tokens=usage.completion,
        cached_prompt_tokens=usage.cached_prompt,
        reasoning_tokens=usage.reasoning,
        total_tokens=usage.total,
    )


def _money(nanos: int) -> money_pb2.Money:
    units, rest = nanos_to_units(max(0, nanos))
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def _end(c: Completion) -> pb.CompletionEnd:
    return pb.CompletionEnd(
        finish_reason=_FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=_usage(c.usage),
        cost=_money(c.cost_nanos),
        provider=c.provider,
        model=c.model,
        route=c.route,
        attempts=c.attempts,
        cached=c.cached,
        truncated=c.truncated,
        dropped_message_indices=c.dropped,
        provider_request_id=c.provider_request_id,
        redactions=_redactions(c.redactions),
        tool_calls=_tool_calls(c.tool_calls),
        provider_key_id=c.provider_key_id,
    )


def _redactions(counts: dict[str, int]) -> list[common_pb2.Redaction]:
    return [common_pb2.Redaction(kind=kind, count=count) for kind, count in sorted(counts.items())]


def _pricing(p: Pricing) -> pb.ModelPricing:
    out = pb.ModelPricing(
        input_cache_hit_per_million=_money(usd_to_nanos(p.input_cache_hit_per_mtok)),
        input_cache_miss_per_million=_money(usd_to_nanos(p.input_cache_miss_per_mtok)),
        output_per_million=_money(usd_to_nanos(p.output_per_mtok)),
    )
    if p.as_of is not None:
        out.as_of.CopyFrom(date_pb2.Date(year=p.as_of.year, month=p.as_of.month, day=p.as_of.day))
    return out


def _list_models(view: CatalogView) -> pb.ListModelsResponse:
    out = pb.ListModelsResponse()
    for mv in view.models:
        m = mv.model
        out.models.append(
            pb.ModelInfo(
                name=m.name,
                provider=m.provider,
                provider_model=m.provider_model,
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                default_max_tokens=m.default_max_tokens,
                pricing=_pricing(m.pricing),
                available=mv.available,
                circuit_state=_CIRCUIT.get(mv.circuit_state, pb.CIRCUIT_STATE_UNSPECIFIED),
                kind=m.kind,
                structured_output=m.structured_output,
                tool_calling=m.tool_calling,
            )
        )
    for r in view.routes:
        out.routes.append(
            pb.RouteInfo(
                alias=r.alias,
                models=list(r.models),
                context_fallback_model=r.context_fallback or "",
                kind=r.kind,
            )
        )
    for p in view.providers:
        out.providers.append(
            pb.ProviderInfo(
                name=p.name,
                base_url=p.base_url,
                available=p.available,
                circuit_state=_CIRCUIT.get(p.circuit_state, pb.CIRCUIT_STATE_UNSPECIFIED),
                consecutive_failures=p.failures,
            )
        )
        info = out.providers[-1]
        for k in p.keys:
            key = info.keys.add(
                id=k.id,
                base_url=k.base_url,
                weight=k.weight,
                available=k.available,
                in_flight=k.in_flight,
            )
            if k.cooling_until is not None:
                key.cooling_down_until.FromDatetime(k.cooling_until)
    return out


def _date(d: date_pb2.Date, field: str, v: Violations) -> date | None:
    try:
        return date(d.year, d.month, d.day)
    except ValueError:
        v.add(field, "must be a full, valid calendar date")
        return None
