"""Routes: try a chain of provider+model links in order, with retries, breakers and fallback.

A link is skipped (next link tried) when its provider's breaker is open, its retries are
spent, or it answered 401/402/403/404; a 400/422 stops the chain (another provider would
reject the same request). Every attempt gets a span with the OpenTelemetry GenAI
attributes and is bounded by an absolute deadline: the provider's attempt timeout, capped by
the caller's deadline.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from libs.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    FinsightError,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from libs.common.tracing import tracer
from services.llm_gateway import metrics
from services.llm_gateway.breaker import CircuitOpen, ProviderBreaker
from services.llm_gateway.catalog import Model, Provider
from services.llm_gateway.pricing import Usage
from services.llm_gateway.providers import (
    DeadlineSpent,
    EmbeddingAnswer,
    ProviderAnswer,
    ProviderClient,
    ProviderError,
    ProviderStream,
    StreamDelta,
)
from services.llm_gateway.retry import MIN_ATTEMPT_S, RetryPolicy

T = TypeVar("T")
A = TypeVar("A", ProviderAnswer, EmbeddingAnswer)
_tracer = tracer(__name__)


@dataclass(frozen=True)
class Link:
    """One element of a chain, with the provider request body prepared for it."""

    model: Model
    provider: Provider
    body: dict[str, Any]
    prompt_tokens: int = 0  # as counted by the gateway, after fitting
    dropped: tuple[int, ...] = ()  # request message indices dropped to fit this model
    redacted: int = 0  # identifiers replaced by placeholders in body (0: sent as written)


@dataclass
class Routed:
    answer: ProviderAnswer
    link: Link
    attempts: int


@dataclass
class RoutedEmbedding:
    answer: EmbeddingAnswer
    link: Link
    attempts: int


@dataclass
class OpenStream:
    """A stream that delivered its first delta; the caller must `close()` it."""

    stream: ProviderStream
    first: StreamDelta | None
    link: Link
    attempts: int
    span: Span
    started: float = 0.0  # perf_counter at the attempt's start (gen_ai operation duration)

    async def close(self, error: BaseException | None = None) -> None:
        await self.stream.__aexit__(None, None, None)
        state = self.stream.state
        _finish_span(
            self.span,
            self.link,
            state.model,
            state.usage,
            error,
            response_id=state.request_id,
            finish_reason=state.finish_reason,
            key_id=state.key_id,
            end=True,
        )
        _observe_duration(self.link, self.started)


class _LinkFailed(Exception):
    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class Router:
    def __init__(
        self,
        clients: dict[str, ProviderClient],
        breakers: dict[str, ProviderBreaker],
        policy: RetryPolicy,
    ) -> None:
        self.clients = clients
        self.breakers = breakers
        self.policy = policy

    # -- unary ------------------------------------------------------------------------------
    async def complete(self, route: str, links: Sequence[Link], deadline: float | None) -> Routed:
        async def run(
            link: Link, attempt_no: int, timeout: float, caller_bound: bool
        ) -> ProviderAnswer:
            client = self.clients[link.provider.name]
            return await self._unary(
                link, attempt_no, caller_bound, client.complete(link.body, timeout_s=timeout)
            )

        answer, link, attempts = await self._chain(route, links, deadline, run)
        return Routed(answer, link, attempts)

    async def embed(
        self, route: str, links: Sequence[Link], deadline: float | None
    ) -> RoutedEmbedding:
        """One `/embeddings` call over the chain: the same attempts, retries, breakers,
        fallback, deadlines and spans as `complete` (operation `embeddings`)."""

        async def run(
            link: Link, attempt_no: int, timeout: float, caller_bound: bool
        ) -> EmbeddingAnswer:
            client = self.clients[link.provider.name]
            return await self._unary(
                link, attempt_no, caller_bound, client.embed(link.body, timeout_s=timeout)
            )

        answer, link, attempts = await self._chain(route, links, deadline, run)
        return RoutedEmbedding(answer, link, attempts)

    async def _unary(
        self,
        link: Link,
        attempt_no: int,
        caller_bound: bool,
        call: Coroutine[Any, Any, A],
    ) -> A:
        """One attempt of a unary provider call: span, breaker, metrics, deadline mapping."""
        with self._attempt_span(link, attempt_no) as span:
            started = time.perf_counter()
            outcome = "ok"
            try:
                async with self.breakers[link.provider.name].attempt():
                    try:
                        answer = await call
                    except ProviderError as exc:
                        if caller_bound and exc.kind == "timeout":
                            raise DeadlineSpent from exc
                        raise
            except BaseException as exc:
                outcome = _outcome(exc)
                _finish_span(span, link, None, None, exc)
                raise
            finally:
                call.close()  # no-op once awaited; frees it if the breaker refused the call
                elapsed = time.perf_counter() - started
                metrics.child(
                    metrics.ATTEMPT_SECONDS, link.provider.name, link.model.name, outcome
                ).observe(elapsed)
                _genai_child(metrics.GENAI_DURATION, link).observe(elapsed)
            if isinstance(answer, ProviderAnswer):
                _finish_span(
                    span,
                    link,
                    answer.model,
                    answer.usage,
                    None,
                    response_id=answer.request_id,
                    finish_reason=answer.finish_reason,
                    key_id=answer.key_id,
                )
            elif isinstance(answer, EmbeddingAnswer):
                span.set_attribute("gen_ai.embeddings.dimension.count", answer.dimensions)
                _finish_span(
                    span,
                    link,
                    answer.model,
                    answer.usage or Usage(prompt=link.prompt_tokens),
                    None,
                    response_id=answer.request_id,
                    key_id=answer.key_id,
                )
            return answer

    # -- streaming --------------------------------------------------------------------------
    async def open_stream(
        self, route: str, links: Sequence[Link], deadline: float | None
    ) -> OpenStream:
        """Open a stream and read its first delta, with retries and fallback; nothing has
        been sent to the caller yet, so every failure here may still be retried."""

        async def run(
            link: Link, attempt_no: int, timeout: float, caller_bound: bool
        ) -> OpenStream:
            span = _tracer.start_span(
                f"chat {link.model.provider_model}",
                kind=trace.SpanKind.CLIENT,
                attributes=_request_attributes(link, attempt_no, True),
            )
            started = time.perf_counter()
            stream = self.clients[link.provider.name].stream(link.body)
            outcome = "ok"
            try:
                async with self.breakers[link.provider.name].attempt():
                    try:
                        async with asyncio.timeout(timeout):
                            await stream.__aenter__()
                            first = await stream.next_delta()
                    except TimeoutError:
                        if caller_bound:
                            raise DeadlineSpent from None
                        raise self.clients[link.provider.name]._timeout(timeout) from None
            except BaseException as exc:
                outcome = _outcome(exc)
                await stream.__aexit__(None, None, None)
                _finish_span(span, link, None, None, exc, end=True)
                _observe_duration(link, started)
                raise
            finally:
                metrics.ATTEMPT_SECONDS.labels(
                    link.provider.name, link.model.name, outcome
                ).observe(time.perf_counter() - started)
            return OpenStream(stream, first, link, attempt_no, span, started)

        opened, _, attempts = await self._chain(route, links, deadline, run)
        opened.attempts = attempts
        return opened

    # -- the chain ----------------------------------------------------------------------------
    async def _chain(
        self,
        route: str,
        links: Sequence[Link],
        deadline: float | None,
        run: Callable[[Link, int, float, bool], Awaitable[T]],
    ) -> tuple[T, Link, int]:
        usable = [link for link in links if link.provider.available]
        if not usable:
            raise no_provider_error(links)
        attempts = 0
        errors: list[BaseException] = []
        for index, link in enumerate(usable):
            try:
                result, made = await self._link(link, deadline, run, attempts)
                return result, link, attempts + made
            except _LinkFailed as failed:
                attempts += failed.attempts
                errors.append(failed.error)
                if not _falls_back(failed.error) or index + 1 == len(usable):
                    break
                metrics.FALLBACKS.labels(
                    route, link.model.name, usable[index + 1].model.name, _outcome(failed.error)
                ).inc()
        raise map_error(errors, attempts)

    async def _link(
        self,
        link: Link,
        deadline: float | None,
        run: Callable[[Link, int, float, bool], Awaitable[T]],
        attempts_before: int,
    ) -> tuple[T, int]:
        made = 0

        async def attempt() -> T:
            nonlocal made
            timeout = link.provider.attempt_timeout_s
            caller_bound = False  # the caller's deadline, not the provider's timeout, ends it
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < MIN_ATTEMPT_S:
                    raise DeadlineSpent
                caller_bound = left < timeout
                timeout = min(timeout, left)
            made += 1
            return await run(link, attempts_before + made, timeout, caller_bound)

        def on_retry(error: BaseException, sleep_s: float) -> None:
            metrics.RETRIES.labels(link.provider.name, link.model.name, _outcome(error)).inc()

        try:
            result = await self.policy.run(
                attempt, deadline=deadline, max_retries=link.provider.max_retries, on_retry=on_retry
            )
        except (ProviderError, CircuitOpen, DeadlineSpent) as exc:
            raise _LinkFailed(exc, made) from exc
        return result, made

    def _attempt_span(self, link: Link, attempt_no: int) -> Any:
        return _tracer.start_as_current_span(
            f"{_operation(link)} {link.model.provider_model}",
            kind=trace.SpanKind.CLIENT,
            attributes=_request_attributes(link, attempt_no, False),
            record_exception=False,
            set_status_on_exception=False,
        )


# -- spans (OpenTelemetry GenAI semantic conventions) -------------------------------------------
@functools.lru_cache(maxsize=64)
def _server(base_url: str) -> tuple[str, int]:
    """`server.address` and `server.port` of a provider base URL."""
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def _operation(link: Link) -> str:
    """`gen_ai.operation.name` of a link's calls."""
    return "embeddings" if link.model.kind == "embedding" else "chat"


def _request_attributes(link: Link, attempt_no: int, stream: bool) -> dict[str, Any]:
    body = link.body
    address, port = _server(link.provider.base_url)
    operation = _operation(link)
    attrs: dict[str, Any] = {
        "gen_ai.provider.name": link.provider.system,
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": link.model.provider_model,
        "server.address": address,
        "server.port": port,
        "finsight.llm.provider": link.provider.name,
        "finsight.llm.attempt": attempt_no,
        "finsight.llm.stream": stream,
        "finsight.llm.pii.redacted": link.redacted,
    }
    if operation == "embeddings":
        attrs["gen_ai.request.encoding_formats"] = (str(body.get("encoding_format", "float")),)
        attrs["finsight.llm.embed.inputs"] = len(body.get("input") or ())
        if body.get("dimensions"):
            attrs["gen_ai.embeddings.dimension.count"] = body["dimensions"]
        return attrs
    attrs["gen_ai.request.max_tokens"] = body.get("max_tokens", 0)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            attrs[f"gen_ai.request.{key}"] = body[key]
    if body.get("tools"):
        attrs["finsight.llm.request.tools"] = len(body["tools"])
    return attrs


def _finish_span(
    span: Span,
    link: Link,
    response_model: str | None,
    usage: Usage | None,
    error: BaseException | None,
    *,
    response_id: str = "",
    finish_reason: str = "",
    key_id: str = "",
    end: bool = False,
) -> None:
    """Response attributes and token-usage metrics (and, for manually started stream
    spans, the end)."""
    if response_model:
        span.set_attribute("gen_ai.response.model", response_model)
    if response_id:
        span.set_attribute("gen_ai.response.id", response_id)
    if isinstance(error, ProviderError):
        key_id = error.key_id
    if key_id:  # which of the provider's keys (deployments) served the attempt
        span.set_attribute("finsight.llm.key_id", key_id)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", (finish_reason,))
    if usage is not None:
        chat = link.model.kind == "chat"
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt)
        if chat:
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion)
        span.set_attribute(
            "finsight.llm.cost_usd", link.model.pricing.cost_nanos(usage) / 1_000_000_000
        )
        _genai_child(metrics.GENAI_TOKEN_USAGE, link, "input").observe(usage.prompt)
        if chat:  # embeddings have no output tokens
            _genai_child(metrics.GENAI_TOKEN_USAGE, link, "output").observe(usage.completion)
    if error is not None:
        span.set_attribute("error.type", _outcome(error))
        if isinstance(error, CircuitOpen):  # refused by this replica's or the shared state
            span.set_attribute("finsight.llm.circuit.scope", error.scope)
        if isinstance(error, ProviderError) and error.status is not None:
            span.set_attribute("http.response.status_code", error.status)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    if end:
        span.end()


def _genai_child(metric: Any, link: Link, *extra: str) -> Any:
    return metrics.child(
        metric, _operation(link), link.provider.system, link.model.provider_model, *extra
    )


def _observe_duration(link: Link, started: float) -> None:
    _genai_child(metrics.GENAI_DURATION, link).observe(time.perf_counter() - started)


# -- error mapping ------------------------------------------------------------------------------
def _outcome(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return exc.outcome
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, DeadlineSpent):
        return "deadline"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _falls_back(error: BaseException) -> bool:
    if isinstance(error, DeadlineSpent):
        return False
    return not (isinstance(error, ProviderError) and error.status in (400, 422))


def no_provider_error(links: Sequence[Link]) -> FailedPrecondition:
    settings = sorted({link.provider.key_setting for link in links})
    models = ", ".join(link.model.name for link in links)
    return FailedPrecondition(
        f"no LLM provider is configured for {models}: set {' or '.join(settings)} "
        f"(see docs/llm_gateway.md)",
        reason="NO_PROVIDER_CONFIGURED",
        metadata={"settings": ",".join(settings)},
    )


def map_error(errors: Sequence[BaseException], attempts: int) -> FinsightError:
    """The caller's error for a chain whose every usable link failed (last error wins,
    RetryInfo from the soonest time any link may work again)."""
    last = errors[-1]
    meta = {"attempts": str(attempts)}
    hints = [h for h in (getattr(e, "retry_after", None) for e in errors) if h is not None]
    retry_after = min(hints) if hints else None
    if isinstance(last, DeadlineSpent):
        return DeadlineExceeded(
            "the deadline expired before the provider answered",
            reason="DEADLINE_EXCEEDED",
            metadata=meta,
        )
    if isinstance(last, CircuitOpen):
        meta["provider"] = last.provider
        return Unavailable(
            f"provider {last.provider} is failing (circuit open); retry later",
            reason="PROVIDER_CIRCUIT_OPEN",
            metadata=meta,
            retry_after=max(retry_after or 1.0, 0.1),
        )
    assert isinstance(last, ProviderError), last
    meta["provider"] = last.provider
    if last.status is not None:
        meta["http_status"] = str(last.status)
    status = last.status
    if status in (400, 422):
        return InvalidArgument(
            last.message,
            [FieldViolation("request", last.message)],
            reason="PROVIDER_INVALID_REQUEST",
            metadata=meta,
        )
    if status in (401, 403):
        return Unavailable(
            f"provider {last.provider} refused the gateway's credentials "
            f"(HTTP {status}); an operator must fix its API key",
            reason="PROVIDER_AUTH",
            metadata=meta,
        )
    if status == 402:
        return ResourceExhausted(
            f"provider {last.provider}: insufficient account balance (HTTP 402)",
            reason="PROVIDER_INSUFFICIENT_BALANCE",
            metadata=meta,
            quota=[QuotaViolation(f"provider:{last.provider}", "account balance")],
        )
    if status == 429:
        return Unavailable(
            f"{last.message}; retries spent",
            reason="PROVIDER_RATE_LIMITED",
            metadata=meta,
            retry_after=retry_after if retry_after else 1.0,
        )
    if status is not None and 400 <= status < 500:
        return FailedPrecondition(last.message, reason="PROVIDER_REJECTED", metadata=meta)
    return Unavailable(
        f"{last.message}; retries spent",
        reason="PROVIDER_UNAVAILABLE",
        metadata=meta,
        retry_after=retry_after if retry_after else 1.0,
    )
