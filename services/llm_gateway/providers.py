"""OpenAI-compatible chat-completions and embeddings client over httpx (one per provider).

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
from typing import Any, Self

import httpx

from services.llm_gateway.catalog import Provider
from services.llm_gateway.pricing import Usage
from services.llm_gateway.transport import AiohttpTransport, env_proxy

# httpcore runs `import sniffio` each time it creates a lock or event (several times per
# request). When sniffio is not installed every such import walks sys.path again: ~0.3 ms of
# CPU per request. A None entry makes the import fail at once, with the same outcome
# (httpcore then assumes asyncio, as it does without sniffio).
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

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

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUSES

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


@dataclass
class EmbeddingAnswer:
    """Vectors in input order, as one provider answered."""

    vectors: list[list[float]]
    usage: Usage | None  # None: the provider sent no `usage.prompt_tokens`
    model: str
    request_id: str

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


@dataclass
class StreamDelta:
    content: str = ""
    reasoning: str = ""


@dataclass
class StreamState:
    """What an open stream has carried so far (read by the router for accounting)."""

    model: str = ""
    request_id: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
    content_parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    done: bool = False


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


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


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
    ) -> None:
        self.provider = provider
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        self._headers = httpx.Headers(headers)
        self._stream_headers = httpx.Headers({**headers, "Accept": "text/event-stream"})
        self._timeouts = {"connect": connect_s, "read": read_s, "write": write_s, "pool": pool_s}
        self.url = f"{provider.base_url}/chat/completions"
        self._url = httpx.URL(self.url)
        self.embeddings_url = f"{provider.base_url}/embeddings"
        self._embeddings_url = httpx.URL(self.embeddings_url)
        # One TLS context for all transports (building one loads the CA bundle, ~70 ms), and
        # none for a plain-HTTP provider (a local vLLM/Ollama, the dev provider).
        tls = self.url.startswith("https:")
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
                    proxy=env_proxy(self.url),
                )
                for _ in range(shards)
            ]
        self._next = itertools.cycle(self._transports)

    async def aclose(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self._transports), return_exceptions=True)

    async def send(
        self, payload: bytes, *, stream: bool = False, url: httpx.URL | None = None
    ) -> httpx.Response:
        """POST `payload` (to `/chat/completions` unless `url` says otherwise); the response's
        body is not read yet (`aread()` or iterate it, then `aclose()`). httpx errors
        propagate."""
        request = httpx.Request(
            "POST",
            url or self._url,
            headers=self._stream_headers if stream else self._headers,
            content=payload,
            extensions={"timeout": self._timeouts},
        )
        return await next(self._next).handle_async_request(request)

    # -- non-streaming ------------------------------------------------------------------------
    async def _post_json(
        self, body: dict[str, Any], *, timeout_s: float, url: httpx.URL | None = None
    ) -> bytes:
        """POST and read the whole 200 answer within `timeout_s` (absolute), or raise
        ProviderError (status, timeout, transport)."""
        payload = json.dumps(body, ensure_ascii=False).encode()
        try:
            async with asyncio.timeout(timeout_s):
                response = await self.send(payload, url=url)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            raise self._timeout(timeout_s) from None
        except httpx.HTTPError as exc:
            raise self._transport(exc) from None
        if response.status_code != 200:
            raise self._status_error(response.status_code, response.headers, content)
        return content

    async def complete(self, body: dict[str, Any], *, timeout_s: float) -> ProviderAnswer:
        """POST and read the whole answer within `timeout_s` (absolute), or raise ProviderError."""
        content = await self._post_json(body, timeout_s=timeout_s)
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
            )
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
        content = await self._post_json(body, timeout_s=timeout_s, url=self._embeddings_url)
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

    async def __aenter__(self) -> Self:
        payload = json.dumps(self._body, ensure_ascii=False).encode()
        try:
            response = await self._client.send(payload, stream=True)
        except httpx.HTTPError as exc:
            raise self._client._transport(exc) from None
        if response.status_code != 200:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            raise self._client._status_error(response.status_code, response.headers, content)
        self._cm = response
        self._lines = response.aiter_lines()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._cm is not None:
            await self._cm.aclose()

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
        if not content and not reasoning:
            return None
        if content:
            state.content_parts.append(content)
        if reasoning:
            state.reasoning_parts.append(reasoning)
        return StreamDelta(content, reasoning)
