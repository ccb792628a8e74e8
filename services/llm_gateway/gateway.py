"""The gateway's use cases: validate → fit → limits → cache → route → account.

Order of a completion (every step before the provider call can refuse the request):
  1. validation (INVALID_ARGUMENT with every field violation; no provider is called);
  2. route resolution (FAILED_PRECONDITION when no provider of the route is configured);
  3. personal data screening per chain link (placeholders for `redact` links; links whose
     policy is `block` are left out, FAILED_PRECONDITION PII_BLOCKED when none is left);
  4. context fitting per chain link (window - max_tokens; oldest turns dropped first);
  5. tenant RPM (a cache hit still counts as a request);
  6. response cache read (deterministic requests only; hits spend no tokens nor budget);
  7. tenant TPM and daily budget reservation;
  8. the route's chain (retries, breakers, fallback);
  9. accounting in one Redis round trip: usage counters, budget settlement, usage event,
     cache write (the cache holds the redacted prompt's key and the redacted answer);
 10. placeholders restored in what the caller receives.

With `json_schema`, step 8's answer is validated against the schema; an invalid one is
accounted (never cached) and sent back once with its errors (a second admission, call and
accounting: the repair round); the caller gets the validated JSON with the usage and cost of
both calls, or FAILED_PRECONDITION SCHEMA_MISMATCH.

Embed follows the same steps with the inputs in place of the messages (no context fitting:
each link's inputs are counted with the gateway's tokenizer for TPM and budget), the cache
read by default (embeddings are deterministic), and no placeholder restoring (vectors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.context import current_identity, deferred_caller_limit, remaining_time
from libs.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FinsightError,
    Unavailable,
    Violations,
)
from libs.common.tokens import (
    CONVERSATION_OVERHEAD,
    ContextOverflowError,
    FitResult,
    count_many,
    fit_messages,
    message_costs,
)
from libs.common.tracing import tracer
from services.llm_gateway import metrics
from services.llm_gateway.accounting import AfterAnswer
from services.llm_gateway.breaker import ProviderBreaker
from services.llm_gateway.cache import ResponseCache, cache_key
from services.llm_gateway.catalog import Catalog, Model, Route
from services.llm_gateway.domain import (
    Completion,
    CompletionRequest,
    Delta,
    Embeddings,
    EmbedRequest,
    Message,
    TokenCount,
    ToolCall,
    ToolCallDelta,
)
from services.llm_gateway.limits import Reservation, TenantLimiter
from services.llm_gateway.pii import (
    PiiDetector,
    PiiPolicy,
    Redactor,
    StreamRestorer,
    effective_policy,
)
from services.llm_gateway.pricing import Usage
from services.llm_gateway.providers import DeadlineSpent, ProviderError
from services.llm_gateway.router import Link, OpenStream, Routed, Router
from services.llm_gateway.schema import AnswerSchema, mismatch, repair_message
from services.llm_gateway.usage import UsageEvent, UsageLedger, UsageRowData, project_exhaustion
from services.llm_gateway.validation import (
    check_completion,
    check_embed,
    check_messages,
    check_model,
)

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
_Routed = TypeVar("_Routed")

# Prompts larger than this are tokenized off the event loop (tokenizers releases the GIL).
_INLINE_TOKENIZE_BYTES = 32 * 1024
# Time kept back from the caller's deadline to send the answer.
_DEADLINE_MARGIN_S = 0.01
MAX_USAGE_DAYS = 366
DEFAULT_USAGE_DAYS = 30


@dataclass
class PiiScreen:
    """The personal data of one request and what each model of its route may receive."""

    policies: dict[str, PiiPolicy]  # model name → effective policy
    redactor: Redactor | None = None  # None: every model of the route gets `allow`
    redacted: list[Message] | None = None  # the messages with placeholders; None: none found
    redacted_texts: list[str] | None = None  # the screened texts with placeholders

    @property
    def found(self) -> bool:
        return self.redactor is not None and self.redactor.found

    def blocks(self, model: str) -> bool:
        return self.found and self.policies[model] == "block"

    def restore(self, text: str) -> str:
        return self.redactor.restore(text) if self.redactor is not None else text

    def restorer(self) -> StreamRestorer | None:
        return self.redactor.restorer() if self.found and self.redactor is not None else None


@dataclass
class Plan:
    route: Route
    links: list[Link]
    max_cost_nanos: int
    reserve_tokens: int
    pii: PiiScreen
    cache_key: str | None = None
    cache_read: bool = False
    cache_write: bool = False
    cache_ttl_s: int = 0
    schema: AnswerSchema | None = None  # the request's checked json_schema

    def redactions(self, link: Link) -> dict[str, int]:
        """What the caller is told was kept from the provider that answered via `link`."""
        if not link.redacted or self.pii.redactor is None:
            return {}
        return self.pii.redactor.summary()

    def cacheable(self, link: Link | None) -> bool:
        # An answer from a provider that saw the values may hold them: never stored.
        return not self.pii.found or (link is not None and link.redacted > 0)

    def restored(self, completion: Completion) -> Completion:
        if not self.pii.found:
            return completion
        return dataclasses.replace(
            completion,
            content=self.pii.restore(completion.content),
            reasoning=self.pii.restore(completion.reasoning),
            tool_calls=[
                dataclasses.replace(call, arguments=self.pii.restore(call.arguments))
                for call in completion.tool_calls
            ],
        )


class _DeltaRestorer:
    """Placeholders restored in streamed text and tool-call arguments; one split across
    deltas is held back until it is complete (or proves not to be one)."""

    def __init__(self, pii: PiiScreen) -> None:
        self._new = pii.restorer
        self._content = self._restorer()
        self._reasoning = self._restorer()
        self._calls: dict[int, StreamRestorer] = {}

    def _restorer(self) -> StreamRestorer:
        restorer = self._new()
        assert restorer is not None  # only built when personal data was found
        return restorer

    def feed(self, content: str, reasoning: str, calls: Sequence[ToolCallDelta]) -> Delta | None:
        pieces = []
        for piece in calls:
            restorer = self._calls.get(piece.index)
            if restorer is None:
                restorer = self._calls[piece.index] = self._restorer()
            arguments = restorer.feed(piece.arguments)
            if piece.id or piece.name or arguments:
                pieces.append(dataclasses.replace(piece, arguments=arguments))
        return _delta(self._content.feed(content), self._reasoning.feed(reasoning), pieces)

    def flush(self) -> Delta | None:
        pieces = [
            ToolCallDelta(index, arguments=rest)
            for index, restorer in sorted(self._calls.items())
            if (rest := restorer.flush())
        ]
        return _delta(self._content.flush(), self._reasoning.flush(), pieces)


def _delta(content: str, reasoning: str, calls: list[ToolCallDelta]) -> Delta | None:
    return Delta(content, reasoning, tuple(calls)) if content or reasoning or calls else None


@dataclass
class UsageReport:
    rows: list[UsageRowData]
    daily_budget_nanos: int | None
    remaining_today_nanos: int | None
    spent_today_nanos: int | None = None  # recorded cost today (what the thresholds compare)
    projected_exhaustion: datetime | None = None


@dataclass
class ModelView:
    model: Model
    available: bool
    circuit_state: str


@dataclass
class KeyView:
    id: str
    base_url: str
    weight: int
    available: bool
    in_flight: int
    cooling_until: datetime | None  # wall clock; None when not cooling down


@dataclass
class ProviderView:
    name: str
    base_url: str
    available: bool
    circuit_state: str
    failures: int
    keys: list[KeyView] = field(default_factory=list)


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
        pii_policy: PiiPolicy = "redact",
        pii_detector: PiiDetector | None = None,
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
        self.pii_policy: PiiPolicy = pii_policy
        self.pii_detector = pii_detector or PiiDetector()
        self.after = AfterAnswer()

    async def _admit(self, tenant: str, *, tokens: int, max_cost_nanos: int) -> Reservation:
        """The tenant limits' admission, after this replica's pending accounting of the
        tenant (accounting.py: its settlements and TPM refunds count as they always did)."""
        await self.after.settled(tenant)
        return await self.limiter.admit(
            tenant,
            tokens=tokens,
            max_cost_nanos=max_cost_nanos,
            # The caller's rate limit, in the same round trip (main.py: limit_in_handler).
            caller=deferred_caller_limit(),
        )

    # -- Complete -----------------------------------------------------------------------------
    async def complete(self, request: CompletionRequest) -> Completion:
        plan = await self.plan(request)
        tenant = current_identity().tenant
        deadline = _deadline()
        primary = plan.links[0]
        try:
            hit = await self._cache_hit(plan)
            if hit is not None:
                await self._admit(tenant, tokens=0, max_cost_nanos=0)
                await self._account(plan, hit, None, outcome="ok")
                return plan.restored(hit)
            reservation = await self._admit(
                tenant, tokens=plan.reserve_tokens, max_cost_nanos=plan.max_cost_nanos
            )
            routed = await self._reserved(
                reservation, self.router.complete(plan.route.alias, plan.links, deadline)
            )
            completion = self._completion(plan, routed)
            if plan.schema is not None:
                return await self._schema_checked(
                    plan, plan.schema, completion, routed.link, reservation, deadline
                )
            # Accounted (and cached) as the provider answered: with placeholders, not values.
            await self._account(plan, completion, reservation, outcome="ok", link=routed.link)
            return plan.restored(completion)
        except FinsightError as exc:
            metrics.REQUESTS.labels(primary.provider.name, primary.model.name, exc.reason).inc()
            raise

    def _completion(self, plan: Plan, routed: Routed) -> Completion:
        answer = routed.answer
        return _completion_of(
            plan,
            routed.link,
            routed.attempts,
            content=answer.content,
            reasoning=answer.reasoning,
            finish_reason=answer.finish_reason,
            model=answer.model,
            request_id=answer.request_id,
            usage=answer.usage,
            tool_calls=answer.tool_calls,
            key_id=answer.key_id,
        )

    async def _schema_checked(
        self,
        plan: Plan,
        schema: AnswerSchema,
        first: Completion,
        link: Link,
        reservation: Reservation,
        deadline: float | None,
    ) -> Completion:
        """Validate the answer against the request's schema; repair once with the errors.

        Each provider call is admitted and accounted on its own; the returned completion sums
        both. Only a validated answer is cached. The answer is checked as the provider wrote
        it (with placeholders, if any), so the repair prompt carries no personal values."""
        valid, errors = schema.check(first.content)
        if valid is not None:
            first.content = valid
            await self._account(plan, first, reservation, outcome="ok", link=link)
            return plan.restored(first)
        await self._account(plan, first, reservation, outcome="ok", link=link, store=False)
        repair = _repair_link(link, first.content, errors)
        if repair is None:
            raise mismatch([plan.pii.restore(e) for e in errors], repaired=False)
        second_reservation = await self._admit(
            current_identity().tenant,
            tokens=repair.prompt_tokens + int(repair.body["max_tokens"]),
            max_cost_nanos=_max_cost(repair),
        )
        routed = await self._reserved(
            second_reservation, self.router.complete(plan.route.alias, [repair], deadline)
        )
        second = self._completion(plan, routed)
        valid, errors = schema.check(second.content)
        final = dataclasses.replace(
            second,
            content=valid if valid is not None else second.content,
            usage=first.usage + second.usage,
            cost_nanos=first.cost_nanos + second.cost_nanos,
            attempts=first.attempts + second.attempts,
            schema_repaired=True,
        )
        await self._account(
            plan,
            second,
            second_reservation,
            outcome="ok",
            link=routed.link,
            store=valid is not None,
            stored=final,
        )
        if valid is None:
            raise mismatch([plan.pii.restore(e) for e in errors], repaired=True)
        return plan.restored(final)

    async def _reserved(self, reservation: Reservation, call: Awaitable[_Routed]) -> _Routed:
        """`call`'s result; its reservation released when it fails (settled by accounting
        when it succeeds)."""
        try:
            return await call
        except BaseException:
            await asyncio.shield(self.limiter.release(reservation))
            raise

    # -- Embed --------------------------------------------------------------------------------
    async def embed(self, request: EmbedRequest) -> Embeddings:
        """Vectors for `request.inputs`, through the same steps as a completion: validation,
        personal data screening, RPM, cache, TPM + budget, the chain, accounting."""
        route = check_embed(self.catalog, request)
        size = sum(len(t) for t in request.inputs)
        if size > _INLINE_TOKENIZE_BYTES:
            plan = await asyncio.to_thread(self._embed_plan, route, request)
        else:
            plan = self._embed_plan(route, request)
        tenant = current_identity().tenant
        deadline = _deadline()
        primary = plan.links[0]
        try:
            hit = await self._embed_cache_hit(plan)
            if hit is not None:
                await self._admit(tenant, tokens=0, max_cost_nanos=0)
                await self._account(plan, hit, None, outcome="ok")
                return hit
            reservation = await self._admit(
                tenant, tokens=plan.reserve_tokens, max_cost_nanos=plan.max_cost_nanos
            )
            routed = await self._reserved(
                reservation, self.router.embed(plan.route.alias, plan.links, deadline)
            )
            answer, link = routed.answer, routed.link
            usage = answer.usage or Usage(prompt=link.prompt_tokens)
            result = Embeddings(
                vectors=answer.vectors,
                usage=usage,
                cost_nanos=link.model.pricing.cost_nanos(usage),
                provider=link.provider.name,
                model=link.model.name,
                route=plan.route.alias,
                attempts=routed.attempts,
                provider_request_id=answer.request_id,
                redactions=plan.redactions(link),
                provider_key_id=answer.key_id,
            )
            await self._account(plan, result, reservation, outcome="ok", link=link)
            return result
        except FinsightError as exc:
            metrics.REQUESTS.labels(primary.provider.name, primary.model.name, exc.reason).inc()
            raise

    def _embed_plan(self, route: Route, request: EmbedRequest) -> Plan:
        pii = self._screen_texts(route, request.inputs)
        tokens: list[int] | None = None
        redacted_tokens: list[int] | None = None
        links: list[Link] = []
        for name in route.models:
            if pii.blocks(name):
                continue
            model = self.catalog.models[name]
            redact = pii.redacted_texts is not None and pii.policies[name] == "redact"
            texts = pii.redacted_texts if redact and pii.redacted_texts else request.inputs
            if redact:
                redacted_tokens = redacted_tokens or count_many(texts)
                counts = redacted_tokens
            else:
                tokens = tokens or count_many(texts)
                counts = tokens
            body: dict[str, Any] = {
                "model": model.provider_model,
                "input": list(texts),
                "encoding_format": "float",
            }
            if request.dimensions:
                body["dimensions"] = request.dimensions
            prompt_tokens = sum(counts)
            metrics.child(metrics.PROMPT_TOKENS, model.name).observe(prompt_tokens)
            redacted = sum(pii.redactor.counts.values()) if redact and pii.redactor else 0
            provider = self.catalog.providers[model.provider]
            links.append(Link(model, provider, body, prompt_tokens, (), redacted))
        plan = Plan(
            route=route,
            links=links,
            max_cost_nanos=max(
                link.model.pricing.cost_nanos(Usage(prompt=link.prompt_tokens)) for link in links
            ),
            reserve_tokens=max(link.prompt_tokens for link in links),
            pii=pii,
        )
        policy = request.cache_policy
        if self.cache_enabled and policy != "disabled":
            # Embeddings are deterministic: the default (`auto`) reads and writes the cache.
            plan.cache_read = policy in ("auto", "enabled")
            plan.cache_write = True
            plan.cache_ttl_s = request.cache_ttl_s
            inputs = pii.redacted_texts if pii.redacted_texts is not None else request.inputs
            plan.cache_key = cache_key(
                current_identity().tenant,
                {
                    "op": "embeddings",
                    "route": route.alias,
                    "inputs": inputs,
                    "dimensions": request.dimensions,
                },
            )
        return plan

    async def _embed_cache_hit(self, plan: Plan) -> Embeddings | None:
        if not plan.cache_read or plan.cache_key is None:
            return None
        await self.after.settled(current_identity().tenant)  # a repeat sees the last answer
        hit = await self.cache.get_embeddings(plan.cache_key)
        return None if hit is None else _as_cached(hit, plan)

    # -- StreamComplete -----------------------------------------------------------------------
    async def stream(self, request: CompletionRequest) -> AsyncIterator[Delta | Completion]:
        """Deltas, then the summary Completion; errors after the first delta are
        UNAVAILABLE (PROVIDER_STREAM_INTERRUPTED) with the partial usage recorded."""
        started = time.perf_counter()
        if request.json_schema:
            v = Violations()
            v.add("json_schema", "schema-checked JSON is offered on Complete only, not streams")
            v.raise_if_any()
        plan = await self.plan(request)
        tenant = current_identity().tenant
        deadline = _deadline()
        primary = plan.links[0]
        try:
            hit = await self._cache_hit(plan)
            if hit is not None:
                await self._admit(tenant, tokens=0, max_cost_nanos=0)
                await self._account(plan, hit, None, outcome="ok")
                yield Delta(plan.pii.restore(hit.content), plan.pii.restore(hit.reasoning))
                yield hit
                return
            reservation = await self._admit(
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
        # Placeholders are restored as they stream; one split across deltas is held back
        # until it is complete (or proves not to be one).
        restore = _DeltaRestorer(plan.pii) if link.redacted and plan.pii.found else None
        try:
            delta = opened.first
            if delta is not None:
                metrics.TTFT_SECONDS.labels(*labels).observe(time.perf_counter() - started)
            while delta is not None:
                if restore is None:
                    yield Delta(delta.content, delta.reasoning, delta.tool_calls)
                else:
                    restored = restore.feed(delta.content, delta.reasoning, delta.tool_calls)
                    if restored is not None:
                        yield restored
                try:
                    async with asyncio.timeout_at(stream_deadline):
                        delta = await opened.stream.next_delta()
                except TimeoutError:
                    if caller_bound:
                        raise DeadlineSpent from None
                    raise ProviderError(
                        link.provider.name, "stream deadline reached", kind="timeout"
                    ) from None
            rest = restore.flush() if restore is not None else None
            if rest is not None:
                yield rest
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
        state = opened.stream.state
        return _completion_of(
            plan,
            opened.link,
            opened.attempts,
            content="".join(state.content_parts),
            reasoning="".join(state.reasoning_parts),
            finish_reason=state.finish_reason,
            model=state.model,
            request_id=state.request_id,
            usage=usage,
            tool_calls=state.tool_calls,
            key_id=state.key_id,
        )

    # -- planning -----------------------------------------------------------------------------
    async def plan(self, request: CompletionRequest) -> Plan:
        route, violations, schema = check_completion(
            self.catalog, request, max_messages=self.max_messages, max_bytes=self.max_prompt_bytes
        )
        violations.raise_if_any()
        size = sum(len(m.content) for m in request.messages) + len(request.json_schema)
        if size > _INLINE_TOKENIZE_BYTES:
            pii, links = await asyncio.to_thread(self._screen_and_link, route, request, schema)
        else:
            pii, links = self._screen_and_link(route, request, schema)
        plan = Plan(
            route=route,
            links=links,
            max_cost_nanos=max(_max_cost(link) for link in links),
            reserve_tokens=max(link.prompt_tokens + link.body["max_tokens"] for link in links),
            pii=pii,
            schema=schema,
        )
        self._plan_cache(plan, request)
        return plan

    def _screen_and_link(
        self, route: Route, request: CompletionRequest, schema: AnswerSchema | None = None
    ) -> tuple[PiiScreen, list[Link]]:
        pii = self._screen(route, request)
        return pii, self._links(route, request, pii, schema)

    # -- personal data --------------------------------------------------------------------------
    def _screen(self, route: Route, request: CompletionRequest) -> PiiScreen:
        """Contents and tool-call arguments are screened (a tool's result is a message's
        content); tool definitions are the operator's, not personal data."""
        texts = [m.content for m in request.messages]
        for m in request.messages:
            texts.extend(call.arguments for call in m.tool_calls)
        screen = self._screen_texts(route, texts)
        if screen.redacted_texts is not None:
            redacted = iter(screen.redacted_texts[len(request.messages) :])
            screen.redacted = [
                dataclasses.replace(
                    m,
                    content=text,
                    tool_calls=tuple(
                        dataclasses.replace(call, arguments=next(redacted)) for call in m.tool_calls
                    ),
                )
                for m, text in zip(request.messages, screen.redacted_texts, strict=False)
            ]
        return screen

    def _screen_texts(self, route: Route, texts: list[str]) -> PiiScreen:
        """Find personal data in `texts` (messages' contents, or Embed's inputs) and decide
        per link; FAILED_PRECONDITION PII_BLOCKED when every available link blocks it."""
        names = [*route.models, *([route.context_fallback] if route.context_fallback else [])]
        policies = {
            name: effective_policy(
                route.pii_policy,
                self.pii_policy,
                external=self.catalog.providers[self.catalog.models[name].provider].external,
            )
            for name in names
        }
        screen = PiiScreen(policies)
        if all(policy == "allow" for policy in policies.values()):
            return screen  # nothing to look for: every provider of the route may see it all
        redactor = screen.redactor = Redactor(self.pii_detector)
        redactor.reserve(texts)
        redacted = [redactor.redact(text) for text in texts]
        if not redactor.found:
            return screen
        screen.redacted_texts = redacted
        blocked = [n for n in names if policies[n] == "block"]
        open_ = [
            n
            for n in names
            if policies[n] != "block"
            and self.catalog.providers[self.catalog.models[n].provider].available
        ]
        outcome = "blocked" if blocked and not open_ else "redacted"
        if outcome == "redacted" and not any(policies[n] == "redact" for n in open_):
            outcome = "allowed"
        _observe_pii(route, redactor, outcome)
        if outcome == "blocked":
            kinds = ",".join(redactor.kinds)
            raise FailedPrecondition(
                f"the prompt holds personal data ({kinds}) and the personal-data policy of "
                f"route {route.alias!r} blocks it from leaving for "
                f"{', '.join(sorted({self.catalog.models[n].provider for n in blocked}))}; "
                "remove it, or ask an operator for a route that redacts it",
                reason="PII_BLOCKED",
                metadata={"kinds": kinds, "route": route.alias},
            )
        return screen

    # -- context fitting ------------------------------------------------------------------------
    def _links(
        self,
        route: Route,
        request: CompletionRequest,
        pii: PiiScreen,
        schema: AnswerSchema | None = None,
    ) -> list[Link]:
        def usable(name: str) -> bool:
            return not pii.blocks(name) and (
                not request.tools or self.catalog.models[name].tool_calling
            )

        chain = [self.catalog.models[name] for name in route.models if usable(name)]
        links: list[Link] = []
        overflow: ContextOverflowError | None = None
        fits: dict[tuple[int, bool], Any] = {}
        tools = _tools_wire(request)  # once per request: every link sends the same
        fallback = route.context_fallback
        if fallback and not usable(fallback):
            fallback = None
        for index, model in enumerate(chain):
            try:
                link = self._link(model, request, fits, pii, tools, schema)
            except ContextOverflowError as exc:
                overflow = overflow or exc
                continue
            if index == 0 and link.dropped and fallback:
                try:  # a larger-context model takes the whole conversation instead
                    bigger = self._link(
                        self.catalog.models[fallback], request, fits, pii, tools, schema
                    )
                except ContextOverflowError:
                    bigger = None
                if bigger is not None and not bigger.dropped:
                    return [bigger]
            links.append(link)
        if not links and fallback:
            try:
                return [
                    self._link(self.catalog.models[fallback], request, fits, pii, tools, schema)
                ]
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

    def _link(
        self,
        model: Model,
        request: CompletionRequest,
        fits: dict[tuple[int, bool], Any],
        pii: PiiScreen,
        tools: tuple[list[dict[str, Any]], int] | None,
        schema: AnswerSchema | None = None,
    ) -> Link:
        max_tokens = min(request.max_tokens or model.default_max_tokens, model.max_output_tokens)
        budget = model.context_window - max_tokens
        instruction_tokens = 0
        if schema is not None and not model.structured_output:
            # The schema goes into an extra system message (an upper bound of its cost: as a
            # further system message).
            instruction_tokens = message_costs([("system", "-"), ("system", schema.instruction)])[1]
            budget -= instruction_tokens
        if tools:
            instruction_tokens += tools[1]
            budget -= tools[1]
        redact = pii.redacted is not None and pii.policies[model.name] == "redact"
        messages = pii.redacted if redact and pii.redacted is not None else request.messages
        fit = fits.get((budget, redact))
        if fit is None:
            fit = fits[budget, redact] = _fit(messages, budget)
        kept: list[Message] = fit.kept
        body: dict[str, Any] = {
            "model": model.provider_model,
            "messages": [m.wire() for m in kept],
            "max_tokens": max_tokens,
        }
        if tools:
            body["tools"] = tools[0]
            if request.tool_choice in ("auto", "none", "required"):
                body["tool_choice"] = request.tool_choice
            elif request.tool_choice == "function":
                body["tool_choice"] = {
                    "type": "function",
                    "function": {"name": request.tool_choice_name},
                }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        prompt_tokens = fit.total_tokens
        if schema is not None and model.structured_output:
            body["response_format"] = schema.response_format()
        elif request.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        if schema is not None and not model.structured_output:
            body["messages"].append({"role": "system", "content": schema.instruction})
        prompt_tokens += instruction_tokens
        metrics.child(metrics.PROMPT_TOKENS, model.name).observe(prompt_tokens)
        if fit.dropped_indices:
            metrics.TRUNCATIONS.labels(model.name).inc()
        provider = self.catalog.providers[model.provider]
        redacted = sum(pii.redactor.counts.values()) if redact and pii.redactor else 0
        return Link(model, provider, body, prompt_tokens, tuple(fit.dropped_indices), redacted)

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
        # Keyed on the prompt with placeholders: the key derives from no personal value, and
        # the stored (redacted) answer serves any request that differs only in those values.
        messages = plan.pii.redacted if plan.pii.redacted is not None else request.messages
        fingerprint: dict[str, object] = {
            "route": plan.route.alias,
            # Tool calls and ids only where present: other requests keep the keys they had.
            "messages": [
                [m.role, m.content]
                if not m.tool_calls and not m.tool_call_id
                else [
                    m.role,
                    m.content,
                    m.tool_call_id,
                    [dataclasses.astuple(c) for c in m.tool_calls],
                ]
                for m in messages
            ],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
            "response_format": request.response_format,
        }
        if plan.schema is not None:  # only then: the keys of other requests stay as they were
            fingerprint["json_schema"] = plan.schema.document
        if request.tools:
            fingerprint["tools"] = [dataclasses.astuple(t) for t in request.tools]
            fingerprint["tool_choice"] = [request.tool_choice, request.tool_choice_name]
        plan.cache_key = cache_key(current_identity().tenant, fingerprint)

    async def _cache_hit(self, plan: Plan) -> Completion | None:
        if not plan.cache_read or plan.cache_key is None:
            return None
        await self.after.settled(current_identity().tenant)  # a repeat sees the last answer
        hit = await self.cache.get(plan.cache_key)
        return None if hit is None else _as_cached(hit, plan)

    # -- accounting ---------------------------------------------------------------------------
    async def _account(
        self,
        plan: Plan,
        completion: Completion | Embeddings,
        reservation: Reservation | None,
        *,
        outcome: str,
        link: Link | None = None,
        metrics_outcome: str | None = None,
        store: bool = True,
        stored: Completion | None = None,
    ) -> None:
        """Record one provider call (or cache hit); `stored` is what the cache keeps instead
        of `completion` (a repaired answer: the sum of both calls)."""
        identity = current_identity()
        if isinstance(completion, Embeddings) and completion.cached:
            model_name = completion.model  # the model that computed the stored vectors
        else:
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
            redactions=completion.redactions,
            operation="embeddings" if isinstance(completion, Embeddings) else "chat",
            provider_key_id="" if completion.cached else completion.provider_key_id,
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
        budget = self.limiter.policy.for_tenant(identity.tenant).daily_budget_nanos
        writes: list[Coroutine[Any, Any, Any]] = [
            self.ledger.record(event, settlement, budget_nanos=budget)
        ]
        if (
            store
            and not completion.cached
            and plan.cache_write
            and plan.cache_key is not None
            and plan.cacheable(link)
        ):
            writes.append(self.cache.put(plan.cache_key, stored or completion, plan.cache_ttl_s))
        # After the answer (services/llm_gateway/accounting.py): the reservation already
        # holds the maximum cost, and the tenant's next admission here waits for this write.
        await self.after.submit(
            identity.tenant,
            _written(writes, tenant=identity.tenant, model=model_name, cost=completion.cost_nanos),
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
        pairs = [(m.role, m.counted_text) for m in messages]
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
        now, wall = time.monotonic(), datetime.now(UTC)
        for provider in self.catalog.providers.values():
            breaker = self.breakers.get(provider.name)
            client = self.router.clients.get(provider.name)
            live = {s.id: s for s in client.balancer.slots} if client is not None else {}
            keys = []
            for d in provider.deployments:
                slot = live.get(d.id)
                cooling = slot is not None and slot.cool_until > now
                keys.append(
                    KeyView(
                        d.id,
                        d.base_url,
                        d.weight,
                        not provider.requires_key or bool(d.key.current()),
                        slot.in_flight if slot is not None else 0,
                        wall + timedelta(seconds=slot.cool_until - now)
                        if cooling and slot is not None
                        else None,
                    )
                )
            view.providers.append(
                ProviderView(
                    provider.name,
                    provider.base_url,
                    provider.available,
                    breaker.state if breaker and provider.available else "",
                    breaker.failures if breaker else 0,
                    keys,
                )
            )
        states = {p.name: p.circuit_state for p in view.providers}
        for model in self.catalog.models.values():
            provider = self.catalog.providers[model.provider]
            view.models.append(ModelView(model, provider.available, states[provider.name]))
        return view

    async def usage(self, start: date | None, end: date | None, model: str) -> UsageReport:
        tenant = current_identity().tenant
        now = datetime.now(UTC)
        today = now.date()
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
        await self.after.settled()  # this replica's answers so far are in Redis
        try:
            rows = await self.ledger.report(tenant, start, end, model or None)
            budget = self.limiter.policy.for_tenant(tenant).daily_budget_nanos
            remaining = spent = projected = None
            if budget is not None:
                remaining = max(0, budget - await self.limiter.spent_today(tenant))
                spent = await self.ledger.cost_today(tenant, now)
                projected = project_exhaustion(now, spent, remaining)
        except (RedisError, OSError):
            raise Unavailable(
                "usage store unavailable; retry shortly",
                reason="USAGE_STORE_UNAVAILABLE",
                retry_after=1.0,
            ) from None
        return UsageReport(rows, budget, remaining, spent, projected)


def _observe_pii(route: Route, redactor: Redactor, outcome: str) -> None:
    """Metric, span attributes and a log line with kinds and counts, never the values."""
    summary = redactor.summary()
    for kind, count in summary.items():
        metrics.child(metrics.PII_REDACTIONS, kind, outcome).inc(count)
    span = trace.get_current_span()
    span.set_attribute("finsight.llm.pii.outcome", outcome)
    span.set_attribute("finsight.llm.pii.count", sum(summary.values()))
    span.set_attribute("finsight.llm.pii.kinds", list(summary))
    for kind, count in summary.items():
        span.set_attribute(f"finsight.llm.pii.{kind.lower()}", count)
    log.info(
        "personal data in prompt",
        extra={"route": route.alias, "pii_outcome": outcome, "pii": summary},
    )


async def _written(
    writes: list[Coroutine[Any, Any, Any]], *, tenant: str, model: str, cost: int
) -> None:
    """An answer's accounting writes (one round trip each, concurrently)."""
    try:
        if len(writes) == 1:
            await writes[0]
        else:
            await asyncio.gather(*writes)
    except (RedisError, OSError) as exc:
        # The answer was returned; losing its accounting is logged loudly.
        log.error(
            "usage accounting failed",
            extra={
                "error": type(exc).__name__,
                "tenant": tenant,
                "model": model,
                "cost_nanos": cost,
            },
        )


def _deadline() -> float | None:
    left = remaining_time()
    return None if left is None else time.monotonic() + left - _DEADLINE_MARGIN_S


def _fit(messages: list[Message], budget: int) -> FitResult[Message]:
    """fit_messages over what the model reads of each message (tool calls included)."""
    fit = fit_messages([(m.role, m.counted_text) for m in messages], budget)
    dropped = set(fit.dropped_indices)
    kept = [m for i, m in enumerate(messages) if i not in dropped]
    return FitResult(kept, fit.dropped_indices, fit.total_tokens)


def _tools_wire(request: CompletionRequest) -> tuple[list[dict[str, Any]], int] | None:
    """The request's tools in OpenAI's form, and what they cost in prompt tokens: templates
    render the definitions into the prompt, so they count as a further system message
    holding their JSON (an upper bound: the JSON's punctuation)."""
    if not request.tools:
        return None
    tools = []
    for tool in request.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = (
            json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
        )
        tools.append({"type": "function", "function": function})
    text = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
    return tools, message_costs([("system", "-"), ("system", text)])[1]


def _max_cost(link: Link) -> int:
    return link.model.pricing.max_cost_nanos(link.prompt_tokens, int(link.body["max_tokens"]))


def _repair_link(link: Link, bad: str, errors: list[str]) -> Link | None:
    """The link's request again, plus the bad answer and its validation errors; None when
    they do not fit the model's context window."""
    fix = repair_message(errors)
    bad = bad or "(empty)"
    extra = sum(message_costs([("assistant", bad), ("user", fix)]))
    prompt_tokens = link.prompt_tokens + extra
    if prompt_tokens + int(link.body["max_tokens"]) > link.model.context_window:
        return None
    messages = [
        *link.body["messages"],
        {"role": "assistant", "content": bad},
        {"role": "user", "content": fix},
    ]
    return dataclasses.replace(
        link, body={**link.body, "messages": messages}, prompt_tokens=prompt_tokens
    )


def _estimate_usage(link: Link, content: str, reasoning: str) -> Usage:
    """Usage when the provider reported none (e.g. a stream cut before its usage chunk)."""
    texts: Sequence[str] = [t for t in (content, reasoning) if t]
    completion = sum(count_many(list(texts))) if texts else 0
    return Usage(
        prompt=link.prompt_tokens,
        completion=completion,
        reasoning=count_many([reasoning])[0] if reasoning else 0,
    )


_Answer = TypeVar("_Answer", Completion, Embeddings)


def _as_cached(hit: _Answer, plan: Plan) -> _Answer:
    """A stored answer as this request receives it: free, no attempts, this route."""
    hit.cached, hit.cost_nanos, hit.attempts = True, 0, 0
    hit.route, hit.provider_request_id, hit.provider_key_id = plan.route.alias, "", ""
    hit.redactions = plan.redactions(plan.links[0])
    return hit


def _completion_of(
    plan: Plan,
    link: Link,
    attempts: int,
    *,
    content: str,
    reasoning: str,
    finish_reason: str,
    model: str,
    request_id: str,
    usage: Usage | None,
    tool_calls: list[ToolCall],
    key_id: str,
) -> Completion:
    """A provider's answer (whole or streamed) as the caller receives it; usage estimated
    when the provider sent none."""
    usage = usage or _estimate_usage(
        link, Message("assistant", content, tuple(tool_calls)).counted_text, reasoning
    )
    return Completion(
        content=content,
        reasoning=reasoning,
        finish_reason=finish_reason,
        usage=usage,
        cost_nanos=link.model.pricing.cost_nanos(usage),
        provider=link.provider.name,
        model=model or link.model.provider_model,
        route=plan.route.alias,
        attempts=attempts,
        truncated=bool(link.dropped),
        dropped=list(link.dropped),
        provider_request_id=request_id,
        redactions=plan.redactions(link),
        tool_calls=list(tool_calls),
        provider_key_id=key_id,
    )
