"""The server: one asyncio protocol per TCP connection, routing, the provider endpoints,
the control API, and ``DevProvider`` (served on the current event loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, cast

from libs.devprovider.completions import (
    Reply,
    build_reply,
    completion_payload,
    retry_after_header,
    stream_events,
    validate_chat_body,
)
from libs.devprovider.embeddings import embeddings_payload, validate_embeddings_body
from libs.devprovider.state import DEFAULT_API_KEY, ProviderState, ScriptError
from libs.devprovider.wire import (
    LAST_CHUNK,
    BadRequest,
    Request,
    RequestParser,
    error_payload,
    frame,
    full_response,
    json_bytes,
    response_head,
)

log = logging.getLogger(__name__)

MODEL_IDS = ("deepseek-chat", "deepseek-reasoner")
DEFAULT_KEEPALIVE_INTERVAL_MS = 100.0

_COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})


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
        self._parser = RequestParser()
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
        except BadRequest as exc:
            self.write(full_response(exc.status, error_payload(exc.status, exc.message), (), False))
            self.close()
            return
        if request is None:
            if self._parser.take_continue():
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._task = asyncio.get_running_loop().create_task(self._serve(request))
        self._app.tasks.add(self._task)
        self._task.add_done_callback(self._app.tasks.discard)

    async def _serve(self, request: Request) -> bool:
        try:
            keep_alive = await self._app.handle(self, request)
        except Exception:
            log.exception("devprovider handler failed")
            self.write(full_response(500, error_payload(500, "devprovider internal error")))
            keep_alive = False
        self._task = None
        if keep_alive and not self._gone:
            self._pump()  # pipelined requests may already be buffered
        elif not self._gone:
            self.close()
        return keep_alive


class _App:
    def __init__(self, state: ProviderState) -> None:
        self.state = state
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[bool]] = set()

    async def handle(self, conn: _Connection, req: Request) -> bool:
        """Serve one request; return whether the connection may be reused."""
        if req.path.startswith("/_control/"):
            conn.write(self._control(req))
            return req.keep_alive
        entry = self.state.record(req)
        start = time.monotonic()
        try:
            if req.path in _COMPLETION_PATHS:
                await self._completion(conn, req, entry)
            elif req.path in _EMBEDDING_PATHS:
                await self._embeddings(conn, req, entry)
            elif req.path in _MODEL_PATHS:
                self._models(conn, req, entry)
            else:
                self._send_error(conn, req, entry, 404, f"unknown path {req.path}")
        finally:
            entry["end_ts"] = time.time()
            entry["duration_ms"] = round((time.monotonic() - start) * 1000, 3)
        return req.keep_alive and not conn.gone

    # -- provider endpoints --------------------------------------------------------------

    def _authorized(self, req: Request) -> bool:
        expected = self.state.api_key
        return not expected or req.headers.get("authorization") == f"Bearer {expected}"

    def _models(self, conn: _Connection, req: Request, entry: dict[str, Any]) -> None:
        if not self._authorized(req):
            self._send_error(conn, req, entry, 401)
            return
        data = [{"id": m, "object": "model", "owned_by": "devprovider"} for m in MODEL_IDS]
        conn.write(full_response(200, {"object": "list", "data": data}, (), req.keep_alive))
        entry.update(status=200, outcome="ok")

    async def _scripted(
        self,
        conn: _Connection,
        req: Request,
        entry: dict[str, Any],
        problem: Callable[[object], str | None],
    ) -> dict[str, Any] | None:
        """What chat completions and embeddings share: method, key and body checks, then the
        next scripted action's delay, hang, drop or error status. Returns the action when a
        200 answer is to be sent, None when the request has been dealt with."""
        if req.method != "POST":
            self._send_error(conn, req, entry, 405)
            return None
        if not self._authorized(req):
            self._send_error(conn, req, entry, 401)
            return None
        message = problem(entry["body"])
        if message is not None:
            self._send_error(conn, req, entry, 400, message)
            return None
        action = self.state.next_action()
        entry.update(action=action, stream=bool(entry["body"].get("stream")))
        delay_s = (self.state.latency_ms + float(action.get("delay_ms", 0))) / 1000
        if not await conn.wait(delay_s):
            _mark_cancelled(entry)
            return None
        if action.get("hang"):
            await conn.wait(None)
            _mark_cancelled(entry)
            return None
        if action.get("drop"):
            conn.abort()
            entry["outcome"] = "dropped"
            return None
        status = int(action.get("status", 200))
        if status != 200:
            self._send_error(conn, req, entry, status, action=action)
            return None
        return action

    async def _completion(self, conn: _Connection, req: Request, entry: dict[str, Any]) -> None:
        action = await self._scripted(conn, req, entry, validate_chat_body)
        if action is None:
            return
        body: dict[str, Any] = entry["body"]
        reply = build_reply(body, action)
        if entry["stream"]:
            await self._send_stream(conn, req, entry, action, reply)
        else:
            payload = completion_payload(entry["id"], body["model"], reply)
            await self._send_json(conn, req, entry, action, payload)

    async def _embeddings(self, conn: _Connection, req: Request, entry: dict[str, Any]) -> None:
        action = await self._scripted(conn, req, entry, validate_embeddings_body)
        if action is None:
            return
        payload = embeddings_payload(entry["id"], entry["body"], action.get("usage"))
        await self._send_json(conn, req, entry, action, payload)

    def _send_error(
        self,
        conn: _Connection,
        req: Request,
        entry: dict[str, Any],
        status: int,
        message: str | None = None,
        action: Mapping[str, Any] | None = None,
    ) -> None:
        action = action or {}
        payload = error_payload(
            status,
            action.get("message", message),
            action.get("error_type"),
            action.get("error_code"),
        )
        headers = _extra_headers(entry, action)
        retry_after = retry_after_header(action)
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        conn.write(full_response(status, payload, headers, req.keep_alive))
        entry.update(status=status, outcome="error")

    async def _keepalive(self, conn: _Connection, action: Mapping[str, Any], line: bytes) -> bool:
        """Send DeepSeek-style keep-alive lines; False if the client left meanwhile."""
        interval_s = float(action.get("keepalive_interval_ms", DEFAULT_KEEPALIVE_INTERVAL_MS))
        for _ in range(int(action.get("keepalive_lines", 0))):
            conn.write(frame(line))
            if not await conn.wait(interval_s / 1000):
                return False
        return True

    async def _send_json(
        self,
        conn: _Connection,
        req: Request,
        entry: dict[str, Any],
        action: Mapping[str, Any],
        answer: dict[str, Any],
    ) -> None:
        """A 200 JSON answer (or the action's `body` instead), with the action's keep-alive
        lines and cut."""
        payload = json_bytes(action.get("body", answer))
        headers = [("Content-Type", "application/json"), *_extra_headers(entry, action)]
        entry["status"] = 200
        if not action.get("keepalive_lines") and "cut_after_chunks" not in action:
            headers.append(("Content-Length", str(len(payload))))
            conn.write(response_head(200, headers, req.keep_alive) + payload)
            entry["outcome"] = "ok"
            return
        # Keep-alive lines make the body length unknown up front, hence chunked encoding.
        chunked = bool(action.get("keepalive_lines"))
        length_header = ("Transfer-Encoding", "chunked") if chunked else None
        headers.append(length_header or ("Content-Length", str(len(payload))))
        conn.write(response_head(200, headers, req.keep_alive))
        if not await self._keepalive(conn, action, b"\n"):
            _mark_cancelled(entry)
            return
        if "cut_after_chunks" in action:
            half = payload[: len(payload) // 2]
            conn.write(frame(half) if chunked else half)
            conn.abort()
            entry["outcome"] = "cut"
            return
        conn.write(frame(payload) + LAST_CHUNK)
        entry["outcome"] = "ok"

    async def _send_stream(
        self,
        conn: _Connection,
        req: Request,
        entry: dict[str, Any],
        action: Mapping[str, Any],
        reply: Reply,
    ) -> None:
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            *_extra_headers(entry, action),
        ]
        entry["status"] = 200
        conn.write(response_head(200, headers, req.keep_alive))
        if not await self._keepalive(conn, action, b": keep-alive\n\n"):
            _mark_cancelled(entry)
            return
        events = stream_events(entry["id"], entry["body"], reply)
        conn.write(frame(events.role))
        cut = action.get("cut_after_chunks")
        delay_s = float(action.get("chunk_delay_ms", 0)) / 1000
        for index, delta in enumerate(events.deltas):
            if cut is not None and index >= cut:
                break
            if not await conn.wait(delay_s) or not await conn.drain():
                _mark_cancelled(entry)
                return
            conn.write(frame(delta))
            entry["chunks_sent"] += 1
        if cut is not None:
            conn.abort()
            entry["outcome"] = "cut"
            return
        conn.write(frame(events.tail) + LAST_CHUNK)
        entry["outcome"] = "cancelled" if conn.gone else "ok"
        entry["cancelled"] = conn.gone

    # -- control API ---------------------------------------------------------------------

    def _control(self, req: Request) -> bytes:
        route = (req.method, req.path)
        try:
            if route == ("POST", "/_control/script"):
                self._script(req.body)
                return full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("POST", "/_control/reset"):
                self.state.reset()
                return full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("GET", "/_control/state"):
                return full_response(200, self.state.summary(), (), req.keep_alive)
            if route == ("GET", "/_control/requests"):
                since = int(req.query.get("since", ["0"])[0])
                entries = [e for e in self.state.log if e["id"] > since]
                return full_response(200, {"requests": entries}, (), req.keep_alive)
        except (ScriptError, ValueError) as exc:
            return full_response(400, error_payload(400, str(exc)), (), req.keep_alive)
        return full_response(404, error_payload(404, f"unknown control route {route}"))

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
