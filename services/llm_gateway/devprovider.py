"""Local OpenAI/DeepSeek-compatible LLM provider for tests and benchmarks (dev only).

Production code must never import this module; it exists so that the llm_gateway can be
exercised end to end (retries, timeouts, streaming, cancellation) without a real provider.
It is a real HTTP/1.1 server (keep-alive, pipelining, chunked SSE) built on asyncio
protocols only, so it needs no dependency beyond the standard library (``httpx`` is imported
lazily by ``DevProviderControl``).

Running it
    python -m services.llm_gateway.devprovider --port 8089 [--latency-ms 50]
        [--api-key KEY | --no-auth] [--default-action JSON] [--log-limit N]
    python -m services.llm_gateway.devprovider --bench [--latency-ms 50]
        [--bench-requests 20000] [--bench-concurrency 100] [--bench-stream]

    The first stdout line is ``LISTENING http://HOST:PORT`` (``--port 0`` picks a free port).
    ``--bench`` starts a provider in a child process and loads it from this process with a
    raw-socket keep-alive client, then prints the figures as JSON.

From Python
    ``async with DevProvider() as p:`` serves in-process on an ephemeral 127.0.0.1 port
    (``p.base_url`` ends in ``/v1``, ``p.root_url`` does not; ``p.state`` is the live state).
    ``with DevProviderProcess(latency_ms=50) as p:`` (or ``async with``) runs it in a child
    process so it does not share the CPU of the process under test. ``run_load(...)`` is the
    load generator used by ``--bench``.

Provider endpoints (require ``Authorization: Bearer <key>``; default key ``sk-devprovider``)
    POST /v1/chat/completions and /chat/completions (DeepSeek's base URL has no /v1)
        OpenAI chat body: model, messages, max_tokens, temperature, top_p, stop, stream,
        stream_options.include_usage, response_format. Reply content is deterministic:
        ``"echo: " + <last user message>`` (``{"echo": ...}`` JSON for
        ``response_format.type == "json_object"``), cut at the first ``stop`` string and at
        ``max_tokens`` "tokens" (a token here is a whitespace-separated word).
        usage: prompt_tokens = sum over messages of (1 + words in content); completion_tokens
        = words of content + reasoning; total_tokens; prompt_cache_hit_tokens = 0;
        prompt_cache_miss_tokens = prompt_tokens; prompt_tokens_details.cached_tokens;
        completion_tokens_details.reasoning_tokens.
        Streaming: ``text/event-stream`` over chunked encoding: a role chunk, one chunk per
        word, a final chunk with finish_reason, a usage chunk with ``choices: []`` when
        ``stream_options.include_usage``, then ``data: [DONE]``.
    GET /v1/models (and /models): OpenAI list format.
    Errors use the OpenAI body ``{"error": {"message", "type", "param", "code"}}``; a wrong
    key gives 401 (and consumes no scripted action).

Control API (no auth; JSON in and out)
    POST /_control/script   {"actions": [ACTION, ...], "default": ACTION | null,
                             "replace": false}
        Appends one-shot actions to a FIFO queue: each completion request consumes one. When
        the queue is empty the sticky ``default`` action applies (``null`` clears it; omit
        the key to keep it). ``replace`` empties the queue first. A bare JSON list is taken
        as ``actions``. Unknown keys are rejected with 400 so typos fail loudly.
    POST /_control/reset    clears queue, default action and request log.
    GET  /_control/state    {"queued": [...], "default": ..., "latency_ms": ...}.
    GET  /_control/requests[?since=ID]
        {"requests": [ENTRY, ...]}, oldest first, newest ``--log-limit`` kept. ENTRY: id, ts
        (epoch s), mono (time.monotonic, comparable across local processes), method, path,
        headers (lower-case names), body (parsed JSON or null, raw text in body_raw), action,
        stream, status, outcome (ok | error | dropped | cut | cancelled), cancelled (the
        client went away before the answer was complete), chunks_sent, end_ts, duration_ms.

ACTION keys (combine freely; all optional)
    status: int            answer with this status and an OpenAI error body (any code, e.g.
                           400 401 402 422 429 500 502 503 504); message, error_type,
                           error_code override the body fields.
    retry_after: number | str
                           Retry-After header: a number is seconds; a string is sent verbatim
                           (e.g. an HTTP-date); with retry_after_format "http-date" a number
                           is rendered as the HTTP-date that many seconds from now.
    delay_ms: number       wait before answering (on top of the global --latency-ms).
    hang: true             accept and never answer until the client goes away.
    drop: true             close the TCP connection without any response.
    cut_after_chunks: k    stream k delta chunks, then abort the connection (no final chunk,
                           no [DONE]); non-streaming: send half of the body, then abort.
    chunk_delay_ms: number wait between streamed delta chunks.
    keepalive_lines: n, keepalive_interval_ms: m (default 100)
                           DeepSeek's queueing behaviour: send the 200 headers, then n blank
                           lines (non-stream, body is chunked) or n ``: keep-alive`` SSE
                           comments (stream), one every m ms, then the real answer. A huge n
                           never answers while bytes keep flowing.
    content: str           fixed reply text (still subject to stop/max_tokens).
    reasoning_content: str reasoning text (message.reasoning_content / reasoning deltas).
    finish_reason: str     override the finish reason.
    usage: {...}           merged over the computed usage (totals are recomputed unless given).
    headers: {...}         extra response headers.
    times: n               expand into n identical queue entries.

    Order of events: latency + delay_ms, then hang / drop / status, then (for 200) headers,
    keep-alive lines and the answer. Client disconnects are noticed at every wait and logged as
    ``cancelled: true``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import http
import itertools
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_API_KEY",
    "DevProvider",
    "DevProviderControl",
    "DevProviderProcess",
    "LoadResult",
    "ProviderState",
    "ScriptError",
    "main",
    "run_load",
    "validate_action",
]

log = logging.getLogger(__name__)

DEFAULT_API_KEY = "sk-devprovider"
MODEL_IDS = ("deepseek-chat", "deepseek-reasoner")
READY_PREFIX = "LISTENING "
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_KEEPALIVE_INTERVAL_MS = 100.0

_COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
_LAST_CHUNK = b"0\r\n\r\n"
# A "token" is a word with its leading whitespace, like BPE pieces; the last one keeps any
# trailing whitespace so that joined pieces rebuild the text exactly.
_WORD_RE = re.compile(r"\s*\S+\s*$|\s*\S+")

_NUMBER = (int, float)
_ACTION_TYPES: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "retry_after": (int, float, str),
    "retry_after_format": (str,),
    "message": (str,),
    "error_type": (str,),
    "error_code": (str,),
    "delay_ms": _NUMBER,
    "hang": (bool,),
    "drop": (bool,),
    "cut_after_chunks": (int,),
    "chunk_delay_ms": _NUMBER,
    "keepalive_lines": (int,),
    "keepalive_interval_ms": _NUMBER,
    "content": (str,),
    "reasoning_content": (str,),
    "finish_reason": (str,),
    "usage": (dict,),
    "headers": (dict,),
    "times": (int,),
}

# (error type, default message, error code) per status, after OpenAI's and DeepSeek's docs.
_ERROR_DEFAULTS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request body", None),
    401: (
        "authentication_error",
        "Authentication Fails, the API key is invalid",
        "invalid_api_key",
    ),
    402: ("insufficient_quota", "Insufficient Balance", "insufficient_balance"),
    404: ("invalid_request_error", "Not found", None),
    405: ("invalid_request_error", "Method not allowed", None),
    413: ("invalid_request_error", "Request body too large", None),
    422: ("invalid_request_error", "Invalid Parameters", None),
    429: ("rate_limit_error", "Rate Limit Reached", "rate_limit_exceeded"),
    500: ("server_error", "Server Error", None),
    502: ("server_error", "Bad Gateway", None),
    503: ("server_error", "Server Overloaded", None),
    504: ("server_error", "Gateway Timeout", None),
}


# --------------------------------------------------------------------------------------
# Scripted actions and state
# --------------------------------------------------------------------------------------


class ScriptError(ValueError):
    """A control request carried an invalid action."""


def validate_action(raw: object) -> dict[str, Any]:
    """Check an action's keys and value types; return a plain-dict copy."""
    if not isinstance(raw, Mapping):
        raise ScriptError(f"an action must be a JSON object, got {type(raw).__name__}")
    action = dict(raw)
    unknown = sorted(set(action) - set(_ACTION_TYPES))
    if unknown:
        raise ScriptError(f"unknown action keys {unknown}; allowed: {sorted(_ACTION_TYPES)}")
    for key, value in action.items():
        allowed = _ACTION_TYPES[key]
        # bool is an int subclass: only accept it where bool is meant.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ScriptError(f"action key {key!r} has invalid value {value!r}")
    if action.get("retry_after_format", "seconds") not in ("seconds", "http-date"):
        raise ScriptError("retry_after_format must be 'seconds' or 'http-date'")
    return action


def _expand_actions(raw_actions: Iterable[object]) -> list[dict[str, Any]]:
    expanded: list[dict[str, Any]] = []
    for raw in raw_actions:
        action = validate_action(raw)
        times = action.pop("times", 1)
        expanded.extend(dict(action) for _ in range(times))
    return expanded


@dataclass
class ProviderState:
    """Mutable provider state; lives on the event loop thread of the server."""

    api_key: str | None = DEFAULT_API_KEY
    latency_ms: float = 0.0
    log_limit: int = 10_000
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    default: dict[str, Any] | None = None
    log: deque[dict[str, Any]] = field(init=False)
    _ids: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = deque(maxlen=self.log_limit)
        self._ids = itertools.count(1)

    def script(
        self,
        actions: Iterable[object] = (),
        *,
        default: object = ...,
        replace: bool = False,
    ) -> None:
        """Queue one-shot actions and/or set the sticky default (``...`` keeps it)."""
        new_actions = _expand_actions(actions)
        new_default = self.default if default is ... else default
        if new_default is not None:
            new_default = validate_action(new_default)
        if replace:
            self.queue.clear()
        self.queue.extend(new_actions)
        self.default = new_default

    def reset(self) -> None:
        self.queue.clear()
        self.default = None
        self.log.clear()

    def next_action(self) -> dict[str, Any]:
        if self.queue:
            return self.queue.popleft()
        return dict(self.default) if self.default else {}

    def summary(self) -> dict[str, Any]:
        return {"queued": list(self.queue), "default": self.default, "latency_ms": self.latency_ms}

    def record(self, req: _Request) -> dict[str, Any]:
        """Append a request-log entry for ``req`` and return it (mutated as it progresses)."""
        entry: dict[str, Any] = {
            "id": next(self._ids),
            "ts": time.time(),
            "mono": time.monotonic(),
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "body": None,
            "action": None,
            "stream": False,
            "status": None,
            "outcome": None,
            "cancelled": False,
            "chunks_sent": 0,
        }
        try:
            entry["body"] = json.loads(req.body) if req.body else None
        except ValueError:
            entry["body_raw"] = req.body.decode("utf-8", "replace")
        self.log.append(entry)
        return entry


# --------------------------------------------------------------------------------------
# HTTP/1.1 wire format
# --------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query)

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


_Head = tuple[str, str, str, dict[str, str]]


class _RequestParser:
    """Incremental parser: Content-Length and chunked request bodies, pipelining."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: _Head | None = None
        self._continue_sent = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_continue(self) -> bool:
        """True once per request whose client waits for ``100 Continue`` before the body."""
        if self._head is None or self._continue_sent:
            return False
        self._continue_sent = self._head[3].get("expect", "").lower() == "100-continue"
        return self._continue_sent

    def next_request(self) -> _Request | None:
        if self._head is None and not self._parse_head():
            return None
        assert self._head is not None
        method, target, version, headers = self._head
        body = self._take_body(headers)
        if body is None:
            return None
        self._head = None
        self._continue_sent = False
        return _Request(method, target, version, headers, body)

    def _parse_head(self) -> bool:
        while self._buf.startswith(b"\r\n"):  # RFC 9112: ignore blank lines before a request
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large")
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, f"malformed request line {lines[0]!r}")
        self._head = (parts[0], parts[1], parts[2], _parse_headers(lines[1:]))
        return True

    def _take_body(self, headers: Mapping[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._take_chunked()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest(400, "invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest(413, "request body too large")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return body

    def _take_chunked(self) -> bytes | None:
        # Decode without consuming until the whole body is buffered: simple and restartable.
        pos, total = 0, 0
        parts: list[bytes] = []
        while True:
            eol = self._buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = _chunk_size(bytes(self._buf[pos:eol]))
            pos = eol + 2
            if size == 0:
                return self._finish_chunked(pos, parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BadRequest(413, "request body too large")
            if len(self._buf) < pos + size + 2:
                return None
            parts.append(bytes(self._buf[pos : pos + size]))
            pos += size + 2

    def _finish_chunked(self, pos: int, parts: list[bytes]) -> bytes | None:
        while True:  # skip trailer fields up to the empty line
            eol = self._buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            if eol == pos:
                del self._buf[: eol + 2]
                return b"".join(parts)
            pos = eol + 2


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise _BadRequest(400, "invalid chunk size") from None


def _parse_headers(lines: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400, f"malformed header line {line!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _head(status: int, headers: Iterable[tuple[str, str]], keep_alive: bool = True) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "Server: finsight-devprovider"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _frame(data: bytes) -> bytes:
    """One chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _full_response(
    status: int,
    payload: object,
    headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool = True,
) -> bytes:
    body = _json_bytes(payload)
    all_headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *headers,
    ]
    return _head(status, all_headers, keep_alive) + body


def _error_payload(
    status: int, message: str | None = None, error_type: str | None = None, code: str | None = None
) -> dict[str, Any]:
    default_type, default_message, default_code = _ERROR_DEFAULTS.get(
        status, ("api_error", f"devprovider scripted error {status}", None)
    )
    return {
        "error": {
            "message": message or default_message,
            "type": error_type or default_type,
            "param": None,
            "code": code or default_code,
        }
    }


# --------------------------------------------------------------------------------------
# Connection: one asyncio protocol per TCP connection
# --------------------------------------------------------------------------------------


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class _Connection(asyncio.Protocol):
    """Parses requests, runs one handler at a time and tracks client disconnects.

    A plain Protocol (rather than streams) gives ``connection_lost``/``eof_received`` as
    callbacks, which is how hanging or sleeping handlers learn that the client went away.
    """

    def __init__(self, app: _App) -> None:
        self._app = app
        self._parser = _RequestParser()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[bool] | None = None
        self._gone = False
        self._paused = False
        self._waiters: set[asyncio.Future[bool]] = set()
        self._drain_waiters: set[asyncio.Future[bool]] = set()

    # -- asyncio.Protocol callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._app.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        self._pump()

    def eof_received(self) -> bool | None:
        # HTTP clients do not half-close while waiting for an answer: EOF means "gone".
        self._mark_gone()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_gone()
        self._app.connections.discard(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in list(self._drain_waiters):
            _resolve(waiter, True)

    # -- API for handlers ----------------------------------------------------------------

    @property
    def gone(self) -> bool:
        return self._gone

    def write(self, data: bytes) -> None:
        if not self._gone and self._transport is not None:
            self._transport.write(data)

    def abort(self) -> None:
        """Close the socket at once, discarding buffered output (a 'dropped' connection)."""
        if self._transport is not None:
            self._transport.abort()
        self._mark_gone()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever); return False as soon as the client is gone."""
        if self._gone:
            return False
        if seconds is not None and seconds <= 0:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _resolve, waiter, True)
        self._waiters.add(waiter)
        try:
            return await waiter
        finally:
            self._waiters.discard(waiter)
            if timer is not None:
                timer.cancel()

    async def drain(self) -> bool:
        """Wait for the transport's write buffer to drain; False if the client is gone."""
        if self._gone:
            return False
        if not self._paused:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._drain_waiters.add(waiter)
        try:
            return await waiter
        finally:
            self._drain_waiters.discard(waiter)

    # -- internals -----------------------------------------------------------------------

    def _mark_gone(self) -> None:
        self._gone = True
        for waiter in [*self._waiters, *self._drain_waiters]:
            _resolve(waiter, False)

    def _pump(self) -> None:
        """Start a handler for the next complete request unless one is already running."""
        if self._task is not None or self._gone:
            return
        try:
            request = self._parser.next_request()
        except _BadRequest as exc:
            self.write(
                _full_response(exc.status, _error_payload(exc.status, exc.message), (), False)
            )
            self.close()
            return
        if request is None:
            if self._parser.take_continue():
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._task = asyncio.get_running_loop().create_task(self._serve(request))
        self._app.tasks.add(self._task)
        self._task.add_done_callback(self._app.tasks.discard)

    async def _serve(self, request: _Request) -> bool:
        try:
            keep_alive = await self._app.handle(self, request)
        except Exception:
            log.exception("devprovider handler failed")
            self.write(_full_response(500, _error_payload(500, "devprovider internal error")))
            keep_alive = False
        self._task = None
        if keep_alive and not self._gone:
            self._pump()  # pipelined requests may already be buffered
        elif not self._gone:
            self.close()
        return keep_alive


# --------------------------------------------------------------------------------------
# Chat completion content
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    pieces: list[str]
    reasoning_pieces: list[str]
    finish_reason: str
    usage: dict[str, Any]

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning(self) -> str | None:
        return "".join(self.reasoning_pieces) if self.reasoning_pieces else None


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _words(text: str) -> list[str]:
    """Split into 'tokens'; ``"".join(_words(t)) == t`` unless ``t`` is only whitespace."""
    return _WORD_RE.findall(text)


def _reply_text(body: Mapping[str, Any], action: Mapping[str, Any]) -> str:
    if "content" in action:
        return str(action["content"])
    last_user = _last_user_text(body["messages"])
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return json.dumps({"echo": last_user}, ensure_ascii=False)
    return "echo: " + last_user


def _cut_at_stop(text: str, stop: object) -> str:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
    return text[: min(cuts)] if cuts else text


def _build_reply(body: Mapping[str, Any], action: Mapping[str, Any]) -> _Reply:
    pieces = _words(_cut_at_stop(_reply_text(body, action), body.get("stop")))
    finish_reason = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and len(pieces) > max_tokens:
        pieces, finish_reason = pieces[:max_tokens], "length"
    reasoning = _words(str(action.get("reasoning_content", "")))
    usage = _usage(body["messages"], len(pieces), len(reasoning), action.get("usage"))
    return _Reply(pieces, reasoning, str(action.get("finish_reason", finish_reason)), usage)


def _usage(
    messages: Sequence[Mapping[str, Any]],
    content_tokens: int,
    reasoning_tokens: int,
    override: Mapping[str, Any] | None,
) -> dict[str, Any]:
    prompt = sum(1 + len(_content_text(m.get("content")).split()) for m in messages)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": content_tokens + reasoning_tokens,
        "total_tokens": 0,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": prompt,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
    override = override or {}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(usage.get(key), dict):
            usage[key] = {**usage[key], **value}
        else:
            usage[key] = value
    # Keep derived fields consistent with whatever the test overrode.
    if "prompt_cache_miss_tokens" not in override:
        usage["prompt_cache_miss_tokens"] = (
            usage["prompt_tokens"] - usage["prompt_cache_hit_tokens"]
        )
    if "prompt_tokens_details" not in override:
        usage["prompt_tokens_details"]["cached_tokens"] = usage["prompt_cache_hit_tokens"]
    if "total_tokens" not in override:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def _completion_payload(entry_id: int, model: str, reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return {
        "id": f"chatcmpl-dev-{entry_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_devprovider",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": reply.usage,
    }


@dataclass(frozen=True)
class _StreamEvents:
    role: bytes
    deltas: list[bytes]
    tail: bytes  # final chunk, optional usage chunk, [DONE]


def _stream_events(entry_id: int, body: Mapping[str, Any], reply: _Reply) -> _StreamEvents:
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base: dict[str, Any] = {
        "id": f"chatcmpl-dev-{entry_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "system_fingerprint": "fp_devprovider",
    }
    if include_usage:
        base["usage"] = None  # OpenAI sends an explicit null on every chunk but the last

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + _json_bytes({**base, "choices": [choice]}) + b"\n\n"

    deltas = [event({"reasoning_content": p}) for p in reply.reasoning_pieces]
    deltas += [event({"content": p}) for p in reply.pieces]
    tail = event({}, reply.finish_reason)
    if include_usage:
        tail += b"data: " + _json_bytes({**base, "choices": [], "usage": reply.usage}) + b"\n\n"
    tail += b"data: [DONE]\n\n"
    return _StreamEvents(event({"role": "assistant", "content": ""}), deltas, tail)


def _validate_chat_body(body: object) -> str | None:
    """Return a 400 message for a malformed chat request, None when it is acceptable."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "'model' is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "every message needs a string 'role'"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return "'max_tokens' must be a positive integer"
    if not isinstance(body.get("stream", False), bool):
        return "'stream' must be a boolean"
    return None


def _retry_after(action: Mapping[str, Any]) -> str | None:
    value = action.get("retry_after")
    if value is None or isinstance(value, str):
        return value
    if action.get("retry_after_format") == "http-date":
        return email.utils.formatdate(time.time() + value, usegmt=True)
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------------------
# Application: routing, completions, control API
# --------------------------------------------------------------------------------------


class _App:
    def __init__(self, state: ProviderState) -> None:
        self.state = state
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[bool]] = set()

    async def handle(self, conn: _Connection, req: _Request) -> bool:
        """Serve one request; return whether the connection may be reused."""
        if req.path.startswith("/_control/"):
            conn.write(self._control(req))
            return req.keep_alive
        entry = self.state.record(req)
        start = time.monotonic()
        try:
            if req.path in _COMPLETION_PATHS:
                await self._completion(conn, req, entry)
            elif req.path in _MODEL_PATHS:
                self._models(conn, req, entry)
            else:
                self._send_error(conn, req, entry, 404, f"unknown path {req.path}")
        finally:
            entry["end_ts"] = time.time()
            entry["duration_ms"] = round((time.monotonic() - start) * 1000, 3)
        return req.keep_alive and not conn.gone

    # -- provider endpoints --------------------------------------------------------------

    def _authorized(self, req: _Request) -> bool:
        expected = self.state.api_key
        return not expected or req.headers.get("authorization") == f"Bearer {expected}"

    def _models(self, conn: _Connection, req: _Request, entry: dict[str, Any]) -> None:
        if not self._authorized(req):
            self._send_error(conn, req, entry, 401)
            return
        data = [{"id": m, "object": "model", "owned_by": "devprovider"} for m in MODEL_IDS]
        conn.write(_full_response(200, {"object": "list", "data": data}, (), req.keep_alive))
        entry.update(status=200, outcome="ok")

    async def _completion(self, conn: _Connection, req: _Request, entry: dict[str, Any]) -> None:
        if req.method != "POST":
            self._send_error(conn, req, entry, 405)
            return
        if not self._authorized(req):
            self._send_error(conn, req, entry, 401)
            return
        problem = _validate_chat_body(entry["body"])
        if problem is not None:
            self._send_error(conn, req, entry, 400, problem)
            return
        body: dict[str, Any] = entry["body"]
        action = self.state.next_action()
        entry.update(action=action, stream=bool(body.get("stream")))
        delay_s = (self.state.latency_ms + float(action.get("delay_ms", 0))) / 1000
        if not await conn.wait(delay_s):
            _mark_cancelled(entry)
            return
        if action.get("hang"):
            await conn.wait(None)
            _mark_cancelled(entry)
            return
        if action.get("drop"):
            conn.abort()
            entry["outcome"] = "dropped"
            return
        status = int(action.get("status", 200))
        if status != 200:
            self._send_error(conn, req, entry, status, action=action)
            return
        reply = _build_reply(body, action)
        if entry["stream"]:
            await self._send_stream(conn, req, entry, action, reply)
        else:
            await self._send_completion(conn, req, entry, action, reply)

    def _send_error(
        self,
        conn: _Connection,
        req: _Request,
        entry: dict[str, Any],
        status: int,
        message: str | None = None,
        action: Mapping[str, Any] | None = None,
    ) -> None:
        action = action or {}
        payload = _error_payload(
            status,
            action.get("message", message),
            action.get("error_type"),
            action.get("error_code"),
        )
        headers = _extra_headers(entry, action)
        retry_after = _retry_after(action)
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        conn.write(_full_response(status, payload, headers, req.keep_alive))
        entry.update(status=status, outcome="error")

    async def _keepalive(self, conn: _Connection, action: Mapping[str, Any], line: bytes) -> bool:
        """Send DeepSeek-style keep-alive lines; False if the client left meanwhile."""
        interval_s = float(action.get("keepalive_interval_ms", DEFAULT_KEEPALIVE_INTERVAL_MS))
        for _ in range(int(action.get("keepalive_lines", 0))):
            conn.write(_frame(line))
            if not await conn.wait(interval_s / 1000):
                return False
        return True

    async def _send_completion(
        self,
        conn: _Connection,
        req: _Request,
        entry: dict[str, Any],
        action: Mapping[str, Any],
        reply: _Reply,
    ) -> None:
        payload = _json_bytes(_completion_payload(entry["id"], entry["body"]["model"], reply))
        headers = [("Content-Type", "application/json"), *_extra_headers(entry, action)]
        entry["status"] = 200
        if not action.get("keepalive_lines") and "cut_after_chunks" not in action:
            headers.append(("Content-Length", str(len(payload))))
            conn.write(_head(200, headers, req.keep_alive) + payload)
            entry["outcome"] = "ok"
            return
        # Keep-alive lines make the body length unknown up front, hence chunked encoding.
        chunked = bool(action.get("keepalive_lines"))
        length_header = ("Transfer-Encoding", "chunked") if chunked else None
        headers.append(length_header or ("Content-Length", str(len(payload))))
        conn.write(_head(200, headers, req.keep_alive))
        if not await self._keepalive(conn, action, b"\n"):
            _mark_cancelled(entry)
            return
        if "cut_after_chunks" in action:
            half = payload[: len(payload) // 2]
            conn.write(_frame(half) if chunked else half)
            conn.abort()
            entry["outcome"] = "cut"
            return
        conn.write(_frame(payload) + _LAST_CHUNK)
        entry["outcome"] = "ok"

    async def _send_stream(
        self,
        conn: _Connection,
        req: _Request,
        entry: dict[str, Any],
        action: Mapping[str, Any],
        reply: _Reply,
    ) -> None:
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            *_extra_headers(entry, action),
        ]
        entry["status"] = 200
        conn.write(_head(200, headers, req.keep_alive))
        if not await self._keepalive(conn, action, b": keep-alive\n\n"):
            _mark_cancelled(entry)
            return
        events = _stream_events(entry["id"], entry["body"], reply)
        conn.write(_frame(events.role))
        cut = action.get("cut_after_chunks")
        delay_s = float(action.get("chunk_delay_ms", 0)) / 1000
        for index, delta in enumerate(events.deltas):
            if cut is not None and index >= cut:
                break
            if not await conn.wait(delay_s) or not await conn.drain():
                _mark_cancelled(entry)
                return
            conn.write(_frame(delta))
            entry["chunks_sent"] += 1
        if cut is not None:
            conn.abort()
            entry["outcome"] = "cut"
            return
        conn.write(_frame(events.tail) + _LAST_CHUNK)
        entry["outcome"] = "cancelled" if conn.gone else "ok"
        entry["cancelled"] = conn.gone

    # -- control API ---------------------------------------------------------------------

    def _control(self, req: _Request) -> bytes:
        route = (req.method, req.path)
        try:
            if route == ("POST", "/_control/script"):
                self._script(req.body)
                return _full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("POST", "/_control/reset"):
                self.state.reset()
                return _full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("GET", "/_control/state"):
                return _full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("GET", "/_control/requests"):
                since = int(req.query.get("since", ["0"])[0])
                entries = [e for e in self.state.log if e["id"] > since]
                return _full_response(200, {"requests": entries}, (), req.keep_alive)
        except (ScriptError, ValueError) as exc:
            return _full_response(400, _error_payload(400, str(exc)), (), req.keep_alive)
        return _full_response(404, _error_payload(404, f"unknown control route {route}"))

    def _script(self, raw_body: bytes) -> None:
        payload = json.loads(raw_body or b"{}")
        if isinstance(payload, list):
            payload = {"actions": payload}
        if not isinstance(payload, dict):
            raise ScriptError("script body must be an object or a list of actions")
        unknown = sorted(set(payload) - {"actions", "default", "replace"})
        if unknown:
            raise ScriptError(f"unknown script keys {unknown}")
        actions = payload.get("actions", [])
        if not isinstance(actions, list):
            raise ScriptError("'actions' must be a list")
        default = payload.get("default", ...)
        self.state.script(actions, default=default, replace=bool(payload.get("replace")))


def _extra_headers(entry: Mapping[str, Any], action: Mapping[str, Any]) -> list[tuple[str, str]]:
    headers = [("x-request-id", f"dev-{entry['id']}")]
    headers.extend((str(k), str(v)) for k, v in dict(action.get("headers") or {}).items())
    return headers


def _mark_cancelled(entry: dict[str, Any]) -> None:
    entry.update(outcome="cancelled", cancelled=True)


# --------------------------------------------------------------------------------------
# Public server wrappers
# --------------------------------------------------------------------------------------


class DevProvider:
    """The provider served on the current event loop (tests)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = DEFAULT_API_KEY,
        latency_ms: float = 0.0,
        log_limit: int = 10_000,
    ) -> None:
        self.host = host
        self.port = port
        self.state = ProviderState(api_key=api_key, latency_ms=latency_ms, log_limit=log_limit)
        self._app = _App(self.state)
        self._server: asyncio.Server | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (``.../v1``); DeepSeek-style clients may use ``root_url``."""
        return f"{self.root_url}/v1"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._app), self.host, self.port, backlog=2048
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, abort open connections and wait for their handlers."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._app.connections):
            conn.abort()
        if self._app.tasks:
            await asyncio.wait(list(self._app.tasks), timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


class DevProviderProcess:
    """The provider in a child process, so it does not share the CPU of the code under test."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = DEFAULT_API_KEY,
        latency_ms: float = 0.0,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.latency_ms = latency_ms
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "services.llm_gateway.devprovider"]
        command += ["--host", self.host, "--port", str(self.port)]
        command += ["--latency-ms", str(self.latency_ms)]
        command += ["--no-auth"] if self.api_key is None else ["--api-key", self.api_key]
        return command + self.extra_args

    def start(self) -> None:
        env = dict(os.environ)
        root = str(_repo_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self._command(), stdout=subprocess.PIPE, cwd=root, env=env)
        try:
            url = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        self.port = urllib.parse.urlsplit(url).port or self.port

    def _read_ready_line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("devprovider child did not report its port in time")
                if selector.select(remaining):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        code = self._proc.poll()
                        raise RuntimeError(f"devprovider child exited early (code {code})")
                    buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"unexpected devprovider ready line {line!r}")
        return line[len(READY_PREFIX) :].strip()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class DevProviderControl:
    """Async client for the control API (works for in-process and child-process providers)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        import httpx  # deferred: the server itself must not need httpx

        root = url.rstrip("/")
        root = root.removesuffix("/v1")
        self._client: httpx.AsyncClient = httpx.AsyncClient(base_url=root, timeout=timeout)

    async def script(
        self,
        *actions: Mapping[str, Any],
        default: Mapping[str, Any] | EllipsisType | None = ...,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Queue one-shot ``actions``; ``default=`` sets (or with None clears) the sticky one."""
        payload: dict[str, Any] = {"actions": list(actions), "replace": replace}
        if default is not ...:
            payload["default"] = default
        return await self._call("POST", "/_control/script", payload)

    async def set_default(self, action: Mapping[str, Any] | None) -> dict[str, Any]:
        return await self.script(default=action)

    async def reset(self) -> None:
        await self._call("POST", "/_control/reset")

    async def state(self) -> dict[str, Any]:
        return await self._call("GET", "/_control/state")

    async def requests(self, since: int = 0) -> list[dict[str, Any]]:
        result = await self._call("GET", f"/_control/requests?since={since}")
        return list(result["requests"])

    async def _call(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        response = await self._client.request(method, path, json=payload)
        response.raise_for_status()
        return cast(dict[str, Any], response.json())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --------------------------------------------------------------------------------------
# Load generator (benchmarks)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bench_request(base_url: str, api_key: str | None, stream: bool) -> tuple[str, int, bytes]:
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = _json_bytes(
        {
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "benchmark ping with a few words"}],
            "max_tokens": 16,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {url.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"{auth}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked) and return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = _parse_headers(head[:-4].decode("latin-1").split("\r\n")[1:])
    if "chunked" in headers.get("transfer-encoding", ""):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status


async def run_load(
    base_url: str,
    *,
    requests: int = 5_000,
    concurrency: int = 100,
    api_key: str | None = DEFAULT_API_KEY,
    stream: bool = False,
    time_limit_s: float = 120.0,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections share ``requests`` requests.

    Bounded by both the request count and ``time_limit_s`` so it always stops by itself.
    """
    host, port, request = _bench_request(base_url, api_key, stream)
    tickets = iter(range(requests))
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + time_limit_s

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in tickets:
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            writer.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
    seconds = time.perf_counter() - started
    errors += sum(isinstance(r, BaseException) for r in results)
    return _summarise(latencies, errors, seconds)


def _summarise(latencies: list[float], errors: int, seconds: float) -> LoadResult:
    ordered = sorted(latencies) or [0.0]

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return LoadResult(
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=round(ordered[-1] * 1000, 2),
    )


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.llm_gateway.devprovider",
        description="Local OpenAI/DeepSeek-compatible provider for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument(
        "--latency-ms", type=float, default=None, help="fixed latency (serve: 0, --bench: 50)"
    )
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="expected Bearer key")
    parser.add_argument("--no-auth", action="store_true", help="accept any or no key")
    parser.add_argument("--default-action", type=json.loads, help="sticky action as JSON")
    parser.add_argument("--log-limit", type=int, default=10_000, help="request-log entries kept")
    parser.add_argument("--bench", action="store_true", help="measure throughput and exit")
    parser.add_argument("--bench-requests", type=int, default=20_000)
    parser.add_argument("--bench-concurrency", type=int, default=100)
    parser.add_argument("--bench-stream", action="store_true")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    provider = DevProvider(
        host=args.host,
        port=args.port,
        api_key=None if args.no_auth else args.api_key,
        latency_ms=args.latency_ms or 0.0,
        log_limit=args.log_limit,
    )
    if args.default_action is not None:
        provider.state.script(default=args.default_action)
    await provider.start()
    print(f"{READY_PREFIX}{provider.root_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await provider.stop()
    return 0


async def _bench(args: argparse.Namespace) -> int:
    latency = 50.0 if args.latency_ms is None else args.latency_ms
    async with DevProviderProcess(latency_ms=latency) as provider:
        common: dict[str, Any] = {
            "concurrency": args.bench_concurrency,
            "stream": args.bench_stream,
        }
        await run_load(provider.base_url, requests=min(2_000, args.bench_requests), **common)
        result = await run_load(provider.base_url, requests=args.bench_requests, **common)
    report = {"latency_ms": latency, **common, **result.as_dict()}
    print(json.dumps(report))
    return 0 if result.errors == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    runner: Callable[[argparse.Namespace], Any] = _bench if args.bench else _serve
    with contextlib.suppress(KeyboardInterrupt):
        return int(asyncio.run(runner(args)))
    return 130


if __name__ == "__main__":
    sys.exit(main())
