"""The gateway's use cases: validate → fit → limits → cache → route → account.

Order of a completion (every step before the provider call can refuse the request):
  1. validation (INVALID_ARGUMENT with every field violation; no provider is called);
  2. route resolution (FAILED_PRECONDITION when no provider of the route is configured);
  3. context fitting per chain link (window - max_tokens; oldest turns dropped first);
  4. tenant RPM (a cache hit still counts as a request);
  5. response cache read (deterministic requests only; hits spend no tokens nor budget);
  6. tenant TPM and daily budget reservation;
  7. the route's chain (retries, breakers, fallback);
  8. accounting in one Redis round trip: usage counters, budget settlement, usage event,
     cache write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.context import current_identity, remaining_time
from libs.common.errors import DeadlineExceeded, FinsightError, Unavailable, Violations
from libs.common.tokens import (
    CONVERSATION_OVERHEAD,
    ContextOverflowError,
    count_many,
    fit_messages,
    message_costs,
)
from libs.common.tracing import tracer
from services.llm_gateway import metrics
from services.llm_gateway.breaker import ProviderBreaker
from services.llm_gateway.cache import ResponseCache, cache_key
from services.llm_gateway.catalog import Catalog, Model, Route
from services.llm_gateway.domain import (
    Completion,
    CompletionRequest,
    Delta,
    Message,
    TokenCount,
)
from services.llm_gateway.limits import Reservation, TenantLimiter
from services.llm_gateway.pricing import Usage
from services.llm_gateway.providers import DeadlineSpent, ProviderError
from services.llm_gateway.router import Link, OpenStream, Router
from services.llm_gateway.usage import UsageEvent, UsageLedger, UsageRowData
from services.llm_gateway.validation import check_completion, check_messages, check_model

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

# Prompts larger than this are tokenized off the event loop (tokenizers releases the GIL).
_INLINE_TOKENIZE_BYTES = 32 * 1024
# Time kept back from the caller's deadline to send the answer.
_DEADLINE_MARGIN_S = 0.01
MAX_USAGE_DAYS = 366
DEFAULT_USAGE_DAYS = 30


@dataclass
class Plan:
    route: Route
    links: list[Link]
    max_cost_nanos: int
    reserve_tokens: int
    cache_key: str | None = None
    cache_read: bool = False
    cache_write: bool = False
    cache_ttl_s: int = 0


@dataclass
class UsageReport:
    rows: list[UsageRowData]
    daily_budget_nanos: int | None
    remaining_today_nanos: int | None


@dataclass
class ModelView:
    model: Model
    available: bool
    circuit_state: str


@dataclass
class ProviderView:
    name: str
    base_url: str
    available: bool
    circuit_state: str
    failures: int


@dataclass
class CatalogView:
    models: list[ModelView] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    providers: list[ProviderView] = field(default_factory=list)


class Gateway:
    def __init__(
        self,
        *,
        catalog: Catalog,
        router: Router,
        breakers: dict[str, ProviderBreaker],
        limiter: TenantLimiter,
        cache: ResponseCache,
        ledger: UsageLedger,
        redis: Redis,
        max_messages: int,
        max_prompt_bytes: int,
        cache_enabled: bool,
        stream_max_s: float,
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.breakers = breakers
        self.limiter = limiter
        self.cache = cache
        self.ledger = ledger
        self.redis = redis
        self.max_messages = max_messages
        self.max_prompt_bytes = max_prompt_bytes
        self.cache_enabled = cache_enabled
        self.stream_max_s = stream_max_s

    # -- Complete -----------------------------------------------------------------------------
    async def complete(self, request: CompletionRequest) -> Completion:
        plan = await self.plan(request)
        tenant = current_identity().tenant
        deadline = _deadline()
        primary = plan.links[0]
        try:
            hit = await self._cache_hit(plan)
            if hit is not None:
                await self.limiter.admit(tenant, tokens=0, max_cost_nanos=0)
                await self._account(plan, hit, None, outcome="ok")
                return hit
            reservation = await self.limiter.admit(
                tenant, tokens=plan.reserve_tokens, max_cost_nanos=plan.max_cost_nanos
            )
            try:
                routed = await self.router.complete(plan.route.alias, plan.links, deadline)
            except BaseException:
                await asyncio.shield(self.limiter.release(reservation))
                raise
            answer, link = routed.answer, routed.link
            usage = answer.usage or _estimate_usage(link, answer.content, answer.reasoning)
            completion = Completion(
                content=answer.content,
                reasoning=answer.reasoning,
                finish_reason=answer.finish_reason,
                usage=usage,
                cost_nanos=link.model.pricing.cost_nanos(usage),
                provider=link.provider.name,
                model=answer.model or link.model.provider_model,
                route=plan.route.alias,
                attempts=routed.attempts,
                truncated=bool(link.dropped),
                dropped=list(link.dropped),
                provider_request_id=answer.request_id,
            )
            await self._account(plan, completion, reservation, outcome="ok", link=link)
            return completion
        except FinsightError as exc:
            metrics.REQUESTS.labels(primary.provider.name, primary.model.name, exc.reason).inc()
            raise

    # -- StreamComplete -----------------------------------------------------------------------
    async def stream(self, request: CompletionRequest) -> AsyncIterator[Delta | Completion]:
        """Deltas, then the summary Completion; errors after the first delta are
        UNAVAILABLE (PROVIDER_STREAM_INTERRUPTED) with the partial usage recorded."""
        started = time.perf_counter()
        plan = await self.plan(request)
        tenant = current_identity().tenant
        deadline = _deadline()
        primary = plan.links[0]
        try:
            hit = await self._cache_hit(plan)
            if hit is not None:
                await self.limiter.admit(tenant, tokens=0, max_cost_nanos=0)
                await self._account(plan, hit, None, outcome="ok")
                yield Delta(hit.content, hit.reasoning)
                yield hit
                return
            reservation = await self.limiter.admit(
                tenant, tokens=plan.reserve_tokens, max_cost_nanos=plan.max_cost_nanos
            )
            try:
                opened = await self.router.open_stream(plan.route.alias, plan.links, deadline)
            except BaseException:
                await asyncio.shield(self.limiter.release(reservation))
                raise
        except FinsightError as exc:
            metrics.REQUESTS.labels(primary.provider.name, primary.model.name, exc.reason).inc()
            raise
        async with aclosing(self._relay(plan, opened, reservation, deadline, started)) as items:
            async for item in items:
                yield item

    async def _relay(
        self,
        plan: Plan,
        opened: OpenStream,
        reservation: Reservation,
        deadline: float | None,
        started: float,
    ) -> AsyncGenerator[Delta | Completion, None]:
        link = opened.link
        labels = (link.provider.name, link.model.name)
        stream_deadline = time.monotonic() + self.stream_max_s
        caller_bound = deadline is not None and deadline < stream_deadline
        if deadline is not None:
            stream_deadline = min(stream_deadline, deadline)
        outcome = "cancelled"
        error: BaseException | None = None
        try:
            delta = opened.first
            if delta is not None:
                metrics.TTFT_SECONDS.labels(*labels).observe(time.perf_counter() - started)
            while delta is not None:
                yield Delta(delta.content, delta.reasoning)
                try:
                    async with asyncio.timeout_at(stream_deadline):
                        delta = await opened.stream.next_delta()
                except TimeoutError:
                    if caller_bound:
                        raise DeadlineSpent from None
                    raise ProviderError(
                        link.provider.name, "stream deadline reached", kind="timeout"
                    ) from None
            outcome = "ok"
        except DeadlineSpent:
            outcome = "deadline"
            raise DeadlineExceeded(
                "the deadline expired while the answer was streaming",
                reason="DEADLINE_EXCEEDED",
                metadata={"provider": link.provider.name},
            ) from None
        except ProviderError as exc:
            outcome, error = "interrupted", exc
            raise Unavailable(
                f"provider {link.provider.name} stream interrupted after the first token: "
                f"{exc.message}",
                reason="PROVIDER_STREAM_INTERRUPTED",
                retry_after=1.0,
                metadata={"provider": link.provider.name},
            ) from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            await asyncio.shield(self._finish_stream(plan, opened, reservation, outcome, error))
        state = opened.stream.state
        yield self._stream_completion(plan, opened, state.usage)

    async def _finish_stream(
        self,
        plan: Plan,
        opened: OpenStream,
        reservation: Reservation,
        outcome: str,
        error: BaseException | None,
    ) -> None:
        await opened.close(error)
        completion = self._stream_completion(plan, opened, opened.stream.state.usage)
        metrics_outcome = "ok" if outcome == "ok" else f"stream_{outcome}"
        await self._account(
            plan,
            completion,
            reservation,
            outcome=outcome,
            link=opened.link,
            metrics_outcome=metrics_outcome,
            store=outcome == "ok",
        )

    def _stream_completion(self, plan: Plan, opened: OpenStream, usage: Usage | None) -> Completion:
        state, link = opened.stream.state, opened.link
        content, reasoning = "".join(state.content_parts), "".join(state.reasoning_parts)
        usage = usage or _estimate_usage(link, content, reasoning)
        return Completion(
            content=content,
            reasoning=reasoning,
            finish_reason=state.finish_reason,
            usage=usage,
            cost_nanos=link.model.pricing.cost_nanos(usage),
            provider=link.provider.name,
            model=state.model or link.model.provider_model,
            route=plan.route.alias,
            attempts=opened.attempts,
            truncated=bool(link.dropped),
            dropped=list(link.dropped),
            provider_request_id=state.request_id,
        )

    # -- planning -----------------------------------------------------------------------------
    async def plan(self, request: CompletionRequest) -> Plan:
        route, violations = check_completion(
            self.catalog, request, max_messages=self.max_messages, max_bytes=self.max_prompt_bytes
        )
        violations.raise_if_any()
        size = sum(len(m.content) for m in request.messages)
        if size > _INLINE_TOKENIZE_BYTES:
            links = await asyncio.to_thread(self._links, route, request)
        else:
            links = self._links(route, request)
        plan = Plan(
            route=route,
            links=links,
            max_cost_nanos=max(_max_cost(link) for link in links),
            reserve_tokens=max(link.prompt_tokens + link.body["max_tokens"] for link in links),
        )
        self._plan_cache(plan, request)
        return plan

    def _links(self, route: Route, request: CompletionRequest) -> list[Link]:
        chain = [self.catalog.models[name] for name in route.models]
        links: list[Link] = []
        overflow: ContextOverflowError | None = None
        fits: dict[int, Any] = {}
        for index, model in enumerate(chain):
            try:
                link = self._link(model, request, fits)
            except ContextOverflowError as exc:
                overflow = overflow or exc
                continue
            if index == 0 and link.dropped and route.context_fallback:
                try:  # a larger-context model takes the whole conversation instead
                    bigger = self._link(self.catalog.models[route.context_fallback], request, fits)
                except ContextOverflowError:
                    bigger = None
                if bigger is not None and not bigger.dropped:
                    return [bigger]
            links.append(link)
        if not links and route.context_fallback:
            try:
                return [self._link(self.catalog.models[route.context_fallback], request, fits)]
            except ContextOverflowError as exc:
                overflow = exc
        if not links:
            assert overflow is not None
            v = Violations()
            v.add(
                "messages",
                f"prompt needs at least {overflow.required_tokens} tokens "
                f"(system messages + last user message) but only "
                f"{overflow.budget_tokens} fit (context window - max_tokens)",
            )
            v.raise_if_any()
        return links

    def _link(self, model: Model, request: CompletionRequest, fits: dict[int, Any]) -> Link:
        max_tokens = min(request.max_tokens or model.default_max_tokens, model.max_output_tokens)
        budget = model.context_window - max_tokens
        fit = fits.get(budget)
        if fit is None:
            fit = fits[budget] = fit_messages(request.messages, budget)
        kept: list[Message] = fit.kept
        body: dict[str, Any] = {
            "model": model.provider_model,
            "messages": [{"role": m.role, "content": m.content} for m in kept],
            "max_tokens": max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        metrics.child(metrics.PROMPT_TOKENS, model.name).observe(fit.total_tokens)
        if fit.dropped_indices:
            metrics.TRUNCATIONS.labels(model.name).inc()
        provider = self.catalog.providers[model.provider]
        return Link(model, provider, body, fit.total_tokens, tuple(fit.dropped_indices))

    def _plan_cache(self, plan: Plan, request: CompletionRequest) -> None:
        policy = request.cache_policy
        if not self.cache_enabled or policy == "disabled":
            return
        deterministic = request.temperature == 0
        plan.cache_read = policy == "enabled" or (policy == "auto" and deterministic)
        plan.cache_write = plan.cache_read or policy == "refresh"
        if not plan.cache_write:
            return
        plan.cache_ttl_s = request.cache_ttl_s
        plan.cache_key = cache_key(
            current_identity().tenant,
            {
                "route": plan.route.alias,
                "messages": [[m.role, m.content] for m in request.messages],
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "stop": request.stop,
                "response_format": request.response_format,
            },
        )

    async def _cache_hit(self, plan: Plan) -> Completion | None:
        if not plan.cache_read or plan.cache_key is None:
            return None
        hit = await self.cache.get(plan.cache_key)
        if hit is None:
            return None
        hit.cached, hit.cost_nanos, hit.attempts = True, 0, 0
        hit.route, hit.provider_request_id = plan.route.alias, ""
        return hit

    # -- accounting ---------------------------------------------------------------------------
    async def _account(
        self,
        plan: Plan,
        completion: Completion,
        reservation: Reservation | None,
        *,
        outcome: str,
        link: Link | None = None,
        metrics_outcome: str | None = None,
        store: bool = True,
    ) -> None:
        identity = current_identity()
        model_name = link.model.name if link else plan.links[0].model.name
        provider = completion.provider
        billed = Usage() if completion.cached else completion.usage
        event = UsageEvent(
            tenant=identity.tenant,
            caller=identity.caller,
            route=plan.route.alias,
            model=model_name,
            provider=provider,
            usage=billed,
            cost_nanos=completion.cost_nanos,
            cached=completion.cached,
            outcome=outcome,
            provider_request_id=completion.provider_request_id,
        )
        label = "cache_hit" if completion.cached else (metrics_outcome or "ok")
        metrics.child(metrics.REQUESTS, provider, model_name, label).inc()
        if not completion.cached:
            for kind, value in (
                ("prompt", billed.prompt),
                ("completion", billed.completion),
                ("cached_prompt", billed.cached_prompt),
                ("reasoning", billed.reasoning),
            ):
                if value:
                    metrics.child(metrics.TOKENS, provider, model_name, kind).inc(value)
            metrics.child(metrics.COST_USD, provider, model_name).inc(completion.cost_nanos / 1e9)
        settlement = (
            None
            if reservation is None
            else TenantLimiter.settlement(reservation, completion.cost_nanos, billed.total)
        )
        writes = [self.ledger.record(event, settlement)]
        if store and not completion.cached and plan.cache_write and plan.cache_key is not None:
            writes.append(self.cache.put(plan.cache_key, completion, plan.cache_ttl_s))
        try:
            if len(writes) == 1:
                await writes[0]
            else:
                await asyncio.gather(*writes)
        except (RedisError, OSError) as exc:
            # The answer exists and is returned; losing its accounting is logged loudly.
            log.error(
                "usage accounting failed",
                extra={
                    "error": type(exc).__name__,
                    "tenant": identity.tenant,
                    "model": model_name,
                    "cost_nanos": completion.cost_nanos,
                },
            )

    # -- CountTokens, ListModels, GetUsage ------------------------------------------------------
    async def count_tokens(self, model_name: str, messages: list[Message]) -> TokenCount:
        v = Violations()
        route = check_model(self.catalog, model_name, v)
        check_messages(
            messages,
            v,
            max_messages=self.max_messages,
            max_bytes=self.max_prompt_bytes,
            need_user=False,
        )
        v.raise_if_any()
        assert route is not None
        model = self.catalog.models[route.models[0]]
        pairs = [(m.role, m.content) for m in messages]
        if sum(len(m.content) for m in messages) > _INLINE_TOKENIZE_BYTES:
            costs = await asyncio.to_thread(message_costs, pairs)
        else:
            costs = message_costs(pairs)
        return TokenCount(
            model.name,
            CONVERSATION_OVERHEAD + sum(costs),
            model.context_window,
            model.max_output_tokens,
            costs,
        )

    def list_models(self) -> CatalogView:
        view = CatalogView(routes=list(self.catalog.routes.values()))
        for provider in self.catalog.providers.values():
            breaker = self.breakers.get(provider.name)
            view.providers.append(
                ProviderView(
                    provider.name,
                    provider.base_url,
                    provider.available,
                    breaker.state if breaker and provider.available else "",
                    breaker.failures if breaker else 0,
                )
            )
        states = {p.name: p.circuit_state for p in view.providers}
        for model in self.catalog.models.values():
            provider = self.catalog.providers[model.provider]
            view.models.append(ModelView(model, provider.available, states[provider.name]))
        return view

    async def usage(self, start: date | None, end: date | None, model: str) -> UsageReport:
        tenant = current_identity().tenant
        today = datetime.now(UTC).date()
        end = end or today
        start = start or end - timedelta(days=DEFAULT_USAGE_DAYS - 1)
        v = Violations()
        if start > end:
            v.add("range", "start must not be after end")
        elif (end - start).days + 1 > MAX_USAGE_DAYS:
            v.add("range", f"at most {MAX_USAGE_DAYS} days")
        if model and model not in self.catalog.models:
            v.add("model", f"unknown model {model!r}")
        v.raise_if_any()
        try:
            rows = await self.ledger.report(tenant, start, end, model or None)
            budget = self.limiter.policy.for_tenant(tenant).daily_budget_nanos
            remaining = None
            if budget is not None:
                remaining = max(0, budget - await self.limiter.spent_today(tenant))
        except (RedisError, OSError):
            raise Unavailable(
                "usage store unavailable; retry shortly",
                reason="USAGE_STORE_UNAVAILABLE",
                retry_after=1.0,
            ) from None
        return UsageReport(rows, budget, remaining)


def _deadline() -> float | None:
    left = remaining_time()
    return None if left is None else time.monotonic() + left - _DEADLINE_MARGIN_S


def _max_cost(link: Link) -> int:
    return link.model.pricing.max_cost_nanos(link.prompt_tokens, int(link.body["max_tokens"]))


def _estimate_usage(link: Link, content: str, reasoning: str) -> Usage:
    """Usage when the provider reported none (e.g. a stream cut before its usage chunk)."""
    texts: Sequence[str] = [t for t in (content, reasoning) if t]
    completion = sum(count_many(list(texts))) if texts else 0
    return Usage(
        prompt=link.prompt_tokens,
        completion=completion,
        reasoning=count_many([reasoning])[0] if reasoning else 0,
    )
