"""OpenAI-compatible chat-completions and embeddings client over httpx (one per provider).

A provider may hold several deployments (keys and base URLs, deployments.py): each attempt
picks one (weighted, least in flight), says which in its answer or error (`key_id`, never
the key) and in an HTTP client span, and cools it down alone after a 429/401/403.

Every attempt has an *absolute* deadline on top of httpx's connect/read/write/pool
timeouts: DeepSeek keeps queued requests open for up to 10 minutes by sending blank lines
(or `: keep-alive` SSE comments), which reset an idle read timeout forever.

CPU: httpx's pool scans its connections under a lock for every request, which costs a lot
under concurrency (encode/httpx#3215); the provider's pool is therefore split over
`LLM_GATEWAY_CLIENT_SHARDS` clients, used round-robin, each with its share of the
connections (see the benchmark in docs/llm_gateway.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import itertools
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast

import httpx
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from libs.common.tracing import tracer
from services.llm_gateway import metrics
from services.llm_gateway.catalog import Provider
from services.llm_gateway.deployments import Balancer, Slot
from services.llm_gateway.domain import ToolCall, ToolCallDelta
from services.llm_gateway.pricing import Usage
from services.llm_gateway.transport import AiohttpTransport, env_proxy

# httpcore runs `import sniffio` each time it creates a lock or event (several times per
# request). When sniffio is not installed every such import walks sys.path again: ~0.3 ms of
# CPU per request. A None entry makes the import fail at once, with the same outcome
# (httpcore then assumes asyncio, as it does without sniffio).
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

_tracer = tracer(__name__)
USER_AGENT = "finsight-llm-gateway"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_ERROR_MESSAGE = 300


class DeadlineSpent(Exception):
    """The caller's deadline, not the provider, ended the attempt (or leaves no time for
    another): the caller gets DEADLINE_EXCEEDED, and the breaker does not count it (like a
    cancellation, it says nothing about the provider)."""


class ProviderError(Exception):
    """One failed attempt. `status` is the HTTP status, or None for transport failures."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        kind: str = "status",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.status = status
        self.kind = kind  # status | connect | timeout | protocol
        self.retry_after = retry_after
        self.key_id = ""  # the deployment that answered (or failed to)
        # Another key of the provider can take the retry at once (this one cools down).
        self.retry_elsewhere = False

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUSES or self.retry_elsewhere

    @property
    def client_error(self) -> bool:
        """4xx other than 429: the request (or the account), not the provider, is at fault."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 429

    @property
    def outcome(self) -> str:
        """A bounded metric label."""
        return f"http_{self.status}" if self.status is not None else self.kind


@dataclass
class ProviderAnswer:
    """A complete (non-streamed, or fully streamed) answer."""

    content: str
    reasoning: str
    finish_reason: str
    usage: Usage | None
    model: str
    request_id: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    key_id: str = ""


@dataclass
class EmbeddingAnswer:
    """Vectors in input order, as one provider answered."""

    vectors: list[list[float]]
    usage: Usage | None  # None: the provider sent no `usage.prompt_tokens`
    model: str
    request_id: str
    key_id: str = ""

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


@dataclass
class StreamDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass
class _PartialCall:
    position: int  # 0, 1, … in order of first appearance (what the pieces are renumbered to)
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    """What an open stream has carried so far (read by the router for accounting)."""

    model: str = ""
    request_id: str = ""
    key_id: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
    content_parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)  # by the provider's index
    done: bool = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls assembled from their pieces, in order of first appearance (the positions
        their streamed pieces carry)."""
        return [ToolCall(c.id, c.name, "".join(c.arguments)) for c in self.calls.values()]

    def absorb_calls(self, raw: object) -> tuple[ToolCallDelta, ...]:
        """Fold one chunk's `delta.tool_calls` into the calls; the pieces, renumbered 0, 1, …
        in order of first appearance. Raises _Malformed on a piece that is not a call."""
        if not raw:
            return ()
        if not isinstance(raw, list):
            raise _Malformed("`tool_calls` is not a list")
        pieces = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise _Malformed("a tool call piece is not an object")
            index = item.get("index", len(self.calls) - 1 if self.calls else 0)
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise _Malformed("a tool call piece has a bad index")
            function = item.get("function") or {}
            if not isinstance(function, Mapping):
                raise _Malformed("a tool call piece has a bad `function`")
            call = self.calls.get(index)
            new = call is None
            if call is None:
                call = self.calls[index] = _PartialCall(len(self.calls))
            call_id = str(item.get("id") or "")
            name = str(function.get("name") or "")
            arguments = _arguments_text(function.get("arguments"))
            if call_id and not call.id:
                call.id = call_id
            else:
                call_id = ""
            call.name += name
            if arguments:
                call.arguments.append(arguments)
            if new or call_id or name or arguments:
                pieces.append(ToolCallDelta(call.position, call_id, name, arguments))
        return tuple(pieces)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def parse_usage(raw: object) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    prompt = _int(raw.get("prompt_tokens"))
    cached = _int(raw.get("prompt_cache_hit_tokens"))  # DeepSeek
    details = raw.get("prompt_tokens_details")
    if not cached and isinstance(details, Mapping):  # OpenAI
        cached = _int(details.get("cached_tokens"))
    reasoning = 0
    out_details = raw.get("completion_tokens_details")
    if isinstance(out_details, Mapping):
        reasoning = _int(out_details.get("reasoning_tokens"))
    return Usage(
        prompt=prompt,
        completion=_int(raw.get("completion_tokens")),
        cached_prompt=cached,
        reasoning=reasoning,
    )


def _arguments_text(value: object) -> str:
    """A call's arguments as JSON text (some servers send an object instead of a string)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_tool_calls(raw: object) -> list[ToolCall]:
    """`message.tool_calls` of a whole answer; raises _Malformed on anything else."""
    if not raw:
        return []
    if not isinstance(raw, list):
        raise _Malformed("`tool_calls` is not a list")
    calls = []
    for i, item in enumerate(raw):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping) or not function.get("name"):
            raise _Malformed(f"tool_calls[{i}] has no function name")
        calls.append(
            ToolCall(
                str(item.get("id") or f"call_{i}"),
                str(function["name"]),
                _arguments_text(function.get("arguments")),
            )
        )
    return calls


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


@dataclass
class _Target(Slot):
    """A deployment with its URLs and the headers of its current key."""

    chat_text: str = ""
    embeddings_text: str = ""
    address: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        base = self.deployment.base_url
        self.chat_text = f"{base}/chat/completions"
        self.embeddings_text = f"{base}/embeddings"
        self.chat_url = httpx.URL(self.chat_text)
        self.embeddings_url = httpx.URL(self.embeddings_text)
        self.address = self.chat_url.host
        self.port = self.chat_url.port or (443 if self.chat_url.scheme == "https" else 80)
        self._key: str | None = None
        self._headers = self._build(None)

    def headers(self) -> tuple[httpx.Headers, httpx.Headers]:
        """(JSON, event-stream) headers with the deployment's current key (rebuilt when the
        key file changed)."""
        key = self.deployment.key.current()
        if key != self._key:
            self._headers = self._build(key)
        return self._headers

    def _build(self, key: str | None) -> tuple[httpx.Headers, httpx.Headers]:
        self._key = key
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Headers(headers), httpx.Headers({**headers, "Accept": "text/event-stream"})


class ProviderClient:
    """Sends chat completions to one provider over a bounded keep-alive pool.

    Requests are `httpx.Request`s handed straight to an httpx transport, without
    `httpx.AsyncClient` in front: the client's per-request work (URL and header merging,
    cookie jar, auth and redirect machinery) cost ~0.4 ms of CPU per request here and the
    gateway uses none of it (fixed URL and headers, no cookies, no redirects). Timeouts are
    httpx's, passed in the request's `timeout` extension as the client would.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        shards: int,
        connect_s: float,
        read_s: float,
        write_s: float,
        pool_s: float,
        keepalive_expiry_s: float,
        transport: str = "aiohttp",
        rate_limit_cooldown_s: float = 30.0,
        auth_cooldown_s: float = 300.0,
    ) -> None:
        self.provider = provider
        self._timeouts = {"connect": connect_s, "read": read_s, "write": write_s, "pool": pool_s}
        self.balancer = Balancer(
            provider.name,
            [_Target(d) for d in provider.deployments],
            rate_limit_cooldown_s=rate_limit_cooldown_s,
            auth_cooldown_s=auth_cooldown_s,
        )
        # One TLS context for all transports (building one loads the CA bundle, ~70 ms), and
        # none for a plain-HTTP provider (a local vLLM/Ollama, the dev provider).
        tls = any(d.base_url.startswith("https:") for d in provider.deployments)
        ssl_context = httpx.create_ssl_context() if tls else None
        self._transports: list[httpx.AsyncBaseTransport]
        if transport == "aiohttp":
            # One pool, O(1) per request: no sharding needed (see transport.py).
            self._transports = [
                AiohttpTransport(
                    max_connections=provider.max_connections,
                    keepalive_expiry_s=keepalive_expiry_s,
                    ssl_context=ssl_context,
                )
            ]
        else:  # httpx's own httpcore pool, sharded (encode/httpx#3215)
            shards = max(1, min(shards, provider.max_connections))
            per_shard = max(1, provider.max_connections // shards)
            self._transports = [
                httpx.AsyncHTTPTransport(
                    verify=ssl_context if ssl_context is not None else False,
                    limits=httpx.Limits(
                        max_connections=per_shard,
                        max_keepalive_connections=per_shard,
                        keepalive_expiry=keepalive_expiry_s,
                    ),
                    proxy=env_proxy(provider.base_url),
                )
                for _ in range(shards)
            ]
        self._next = itertools.cycle(self._transports)

    async def aclose(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self._transports), return_exceptions=True)

    async def send(
        self, payload: bytes, target: _Target, *, stream: bool = False, embeddings: bool = False
    ) -> httpx.Response:
        """POST `payload` to the deployment's `/chat/completions` (or `/embeddings`); the
        response's body is not read yet (`aread()` or iterate it, then `aclose()`). httpx
        errors propagate."""
        json_headers, stream_headers = target.headers()
        request = httpx.Request(
            "POST",
            target.embeddings_url if embeddings else target.chat_url,
            headers=stream_headers if stream else json_headers,
            content=payload,
            extensions={"timeout": self._timeouts},
        )
        return await next(self._next).handle_async_request(request)

    def _begin(self, target: _Target, embeddings: bool = False) -> Span:
        """The HTTP client span of one attempt (a child of the GenAI attempt span)."""
        target.in_flight += 1
        url = target.embeddings_text if embeddings else target.chat_text
        return _tracer.start_span(
            "POST",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "url.full": url,
                "server.address": target.address,
                "server.port": target.port,
                "finsight.llm.key_id": target.id,
            },
        )

    def _end(self, target: _Target, span: Span, error: ProviderError | None, status: int) -> None:
        target.in_flight -= 1
        if status:
            span.set_attribute("http.response.status_code", status)
        outcome = "ok"
        if error is not None:
            error.key_id = target.id
            outcome = error.outcome
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, error.message[:200]))
            if error.status is not None and self.balancer.refused(
                target, error.status, error.retry_after
            ):
                error.retry_elsewhere = True
                error.retry_after = None  # the cooled key's wait is not the next key's
        metrics.child(metrics.KEY_REQUESTS, self.provider.name, target.id, outcome).inc()
        span.end()

    # -- non-streaming ------------------------------------------------------------------------
    async def _post_json(
        self, body: dict[str, Any], *, timeout_s: float, embeddings: bool = False
    ) -> tuple[bytes, str]:
        """POST to the deployment the balancer picks and read the whole 200 answer within
        `timeout_s` (absolute): (the body, the deployment's id), or ProviderError (status,
        timeout, transport) naming the deployment."""
        payload = json.dumps(body, ensure_ascii=False).encode()
        target = cast(_Target, self.balancer.pick())
        span = self._begin(target, embeddings)
        error: ProviderError | None = None
        status = 0
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    response = await self.send(payload, target, embeddings=embeddings)
                    status = response.status_code
                    try:
                        content = await response.aread()
                    finally:
                        await response.aclose()
            except TimeoutError:
                error = self._timeout(timeout_s)
            except httpx.HTTPError as exc:
                error = self._transport(exc)
            else:
                if status != 200:
                    error = self._status_error(status, response.headers, content)
        finally:
            self._end(target, span, error, status)
        if error is not None:
            raise error
        return content, target.id

    async def complete(self, body: dict[str, Any], *, timeout_s: float) -> ProviderAnswer:
        """POST and read the whole answer within `timeout_s` (absolute), or raise ProviderError."""
        content, key_id = await self._post_json(body, timeout_s=timeout_s)
        try:
            data = json.loads(content)
            choice = data["choices"][0]
            message = choice.get("message") or {}
            return ProviderAnswer(
                content=message.get("content") or "",
                reasoning=message.get("reasoning_content") or "",
                finish_reason=choice.get("finish_reason") or "",
                usage=parse_usage(data.get("usage")),
                model=str(data.get("model") or body.get("model", "")),
                request_id=str(data.get("id") or ""),
                tool_calls=parse_tool_calls(message.get("tool_calls")),
                key_id=key_id,
            )
        except _Malformed as exc:
            raise ProviderError(
                self.provider.name, f"provider sent a malformed answer: {exc}", kind="protocol"
            ) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError(
                self.provider.name, "provider sent a malformed answer", kind="protocol"
            ) from None

    # -- embeddings ---------------------------------------------------------------------------
    async def embed(self, body: dict[str, Any], *, timeout_s: float) -> EmbeddingAnswer:
        """POST `{base_url}/embeddings` (OpenAI format) and return one vector per input, in
        input order. An answer that is not one finite vector of one common length per input
        (by `data[i].index`) is a malformed answer: ProviderError kind `protocol`, retried
        and fallen back like a dropped response."""
        content, key_id = await self._post_json(body, timeout_s=timeout_s, embeddings=True)
        expected = len(body.get("input") or ())
        try:
            data = json.loads(content)
            vectors = _vectors(data["data"], expected, body.get("dimensions"))
        except _Malformed as exc:
            raise ProviderError(
                self.provider.name, f"provider sent malformed embeddings: {exc}", kind="protocol"
            ) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError(
                self.provider.name, "provider sent a malformed answer", kind="protocol"
            ) from None
        raw_usage = data.get("usage")
        prompt = raw_usage.get("prompt_tokens") if isinstance(raw_usage, Mapping) else None
        usage = None
        if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
            usage = Usage(prompt=prompt)
        return EmbeddingAnswer(
            vectors,
            usage,
            str(data.get("model") or body.get("model", "")),
            str(data.get("id") or ""),
            key_id,
        )

    # -- streaming ----------------------------------------------------------------------------
    def stream(self, body: dict[str, Any]) -> ProviderStream:
        return ProviderStream(self, body)

    # -- error construction -------------------------------------------------------------------
    def _timeout(self, timeout_s: float) -> ProviderError:
        return ProviderError(
            self.provider.name,
            f"provider {self.provider.name} did not answer within {timeout_s:.1f}s",
            kind="timeout",
        )

    def _transport(self, exc: httpx.HTTPError) -> ProviderError:
        if isinstance(exc, httpx.TimeoutException):
            kind = "timeout"
        elif isinstance(exc, httpx.ConnectError):
            kind = "connect"
        else:
            kind = "protocol"  # dropped connection, truncated body, bad framing
        return ProviderError(
            self.provider.name, f"provider {self.provider.name}: {type(exc).__name__}", kind=kind
        )

    def _status_error(self, status: int, headers: httpx.Headers, content: bytes) -> ProviderError:
        detail = ""
        try:
            err = json.loads(content).get("error")
            if isinstance(err, Mapping):
                detail = str(err.get("message") or "")
            elif isinstance(err, str):
                detail = err
        except (ValueError, AttributeError):
            pass
        detail = detail[:_MAX_ERROR_MESSAGE]
        message = f"provider {self.provider.name} answered HTTP {status}"
        if detail:
            message += f": {detail}"
        return ProviderError(
            self.provider.name,
            message,
            status=status,
            retry_after=parse_retry_after(headers.get("retry-after")),
        )


class _Malformed(ValueError):
    pass


def _vectors(items: object, expected: int, dimensions: object) -> list[list[float]]:
    if not isinstance(items, list):
        raise _Malformed("`data` is not a list")
    if len(items) != expected:
        raise _Malformed(f"{len(items)} vectors for {expected} inputs")
    slots: list[list[float] | None] = [None] * expected
    for position, item in enumerate(items):
        index = item.get("index", position) if isinstance(item, Mapping) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < expected:
            raise _Malformed(f"bad index at data[{position}]")
        if slots[index] is not None:
            raise _Malformed(f"index {index} twice")
        vector = item.get("embedding") if isinstance(item, Mapping) else None
        if not isinstance(vector, list) or not vector:
            raise _Malformed(f"data[{position}].embedding is not a list of numbers")
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in vector
        ):
            raise _Malformed(f"data[{position}].embedding holds a non-finite or non-number")
        slots[index] = [float(x) for x in vector]
    vectors = [v for v in slots if v is not None]
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise _Malformed(f"vectors of different lengths {sorted(lengths)}")
    if isinstance(dimensions, int) and dimensions and lengths != {dimensions}:
        raise _Malformed(f"vectors of {lengths.pop()} dimensions, {dimensions} asked for")
    return vectors


class ProviderStream:
    """An SSE chat-completion stream: `async with` it, then `await next_delta()` until None.

    Leaving the `async with` (normally, by error or by cancellation) closes the HTTP
    response, so a cancelled gRPC call cancels the provider request.
    """

    def __init__(self, client: ProviderClient, body: dict[str, Any]) -> None:
        self._client = client
        self._body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self._cm: Any = None
        self._lines: AsyncIterator[str] | None = None
        self.state = StreamState(model=str(body.get("model", "")))
        self._open: tuple[_Target, Span] | None = None  # until the HTTP span has ended
        self._status = 0

    async def __aenter__(self) -> Self:
        payload = json.dumps(self._body, ensure_ascii=False).encode()
        client = self._client
        target = cast(_Target, client.balancer.pick())
        self.state.key_id = target.id
        self._open = (target, client._begin(target))
        try:
            try:
                response = await client.send(payload, target, stream=True)
            except httpx.HTTPError as exc:
                raise client._transport(exc) from None
            self._status = response.status_code
            if response.status_code != 200:
                try:
                    content = await response.aread()
                except httpx.HTTPError:
                    content = b""
                finally:
                    await response.aclose()
                raise client._status_error(response.status_code, response.headers, content)
        except BaseException as exc:
            self._finish(exc)
            raise
        self._cm = response
        self._lines = response.aiter_lines()
        return self

    def _finish(self, exc: BaseException | None) -> None:
        """End the HTTP span once (and free the deployment's in-flight slot)."""
        if self._open is not None:
            target, span = self._open
            self._open = None
            error = exc if isinstance(exc, ProviderError) else None
            if exc is not None and error is None:
                span.set_attribute("error.type", type(exc).__name__)
            self._client._end(target, span, error, self._status)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._cm is not None:
                await self._cm.aclose()
        finally:
            self._finish(exc)

    async def next_delta(self) -> StreamDelta | None:
        """The next non-empty delta, or None at the end of the stream. Keep-alive comments
        and blank lines are skipped (they never count as progress)."""
        assert self._lines is not None
        state = self.state
        while not state.done:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                if not state.finish_reason:
                    raise ProviderError(
                        self._client.provider.name,
                        "provider stream ended without a final chunk",
                        kind="protocol",
                    ) from None
                state.done = True
                return None
            except httpx.HTTPError as exc:
                raise self._client._transport(exc) from None
            if not line.startswith("data:"):
                continue  # blank line, `: keep-alive` comment, event:/id: fields
            data = line[5:].strip()
            if data == "[DONE]":
                state.done = True
                return None
            delta = self._absorb(data)
            if delta is not None:
                return delta
        return None

    def _absorb(self, data: str) -> StreamDelta | None:
        state = self.state
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ProviderError(
                self._client.provider.name, "provider sent a malformed event", kind="protocol"
            ) from None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            raise ProviderError(
                self._client.provider.name,
                f"provider stream error: {str(chunk['error'])[:_MAX_ERROR_MESSAGE]}",
                kind="protocol",
            )
        state.model = str(chunk.get("model") or state.model)
        state.request_id = str(chunk.get("id") or state.request_id)
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            state.usage = usage
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
        raw = choice.get("delta") or {}
        content = raw.get("content") or ""
        reasoning = raw.get("reasoning_content") or ""
        try:
            calls = state.absorb_calls(raw.get("tool_calls"))
        except _Malformed as exc:
            raise ProviderError(
                self._client.provider.name,
                f"provider sent a malformed event: {exc}",
                kind="protocol",
            ) from None
        if not content and not reasoning and not calls:
            return None
        if content:
            state.content_parts.append(content)
        if reasoning:
            state.reasoning_parts.append(reasoning)
        return StreamDelta(content, reasoning, calls)
