"""Client spans for the database round trips a request waits for (Redis, DuckDB).

The OpenTelemetry database conventions, at the cost of one span per *logical* round trip
(a Lua script, a pipeline, one command), never one per command inside it:

* kind CLIENT; `db.system.name` (and the older `db.system`, as `libs.common.pg` sets for
  PostgreSQL): `redis` or `duckdb`;
* the span name is the round trip's stable name (what the conventions call its query
  summary): what it is for, never the keys or the query text. Redis round trips are named
  `<service>.<component>.<action>` (`llm.limits.admit`, `memory.hot_tier.lookup`,
  `ratelimit.take` for the kit's); SQL statements by the statement name that also labels
  `finsight_db_query_seconds` (`session_tail`: the same on DuckDB and PostgreSQL, where it
  is also `db.query.summary` and `db.operation.name`, as pg.py sets them);
* `db.operation.name` of Redis: the command (`EVALSHA`, `GET`, `SET`, `ZRANGE`, `UNLINK`);
  a pipeline of several commands is `MULTI` (a transaction) or `BATCH`, with
  `db.operation.batch.size`;
* `server.address` / `server.port` (Redis: the pool's host and port, or its socket path);
  DuckDB: `db.namespace`, the database's name. Not the Redis database index (always 0
  here): an attribute on every span costs more than it tells;
* a failure ends the span with status ERROR and `error.type` (the exception's class;
  Redis error replies also set `db.response.status_code` to their prefix, e.g. NOSCRIPT).
  No stack-trace event: while Redis is down every request fails the same way.

Cost, measured on the 2 shared cores of the benchmarks: starting and ending a span ~45 µs
of CPU, encoding it for OTLP ~100 µs more in the exporting thread (most of it per
attribute), so a Redis span carries the five attributes above and nothing that repeats
its name; unsampled traces (FINSIGHT_TRACE_SAMPLE_RATIO) pay neither. The alternative,
opentelemetry-instrumentation-redis, costs more per command, still emits the old
attribute names (`db.statement`, `net.peer.name`) and never sees the Lua scripts that
`libs.common.ratelimit.ScriptBatcher` writes on the socket itself (admission, accounting,
the rate limit: most of the request path's Redis time).

The spans are leaves: they are not made current (nothing runs inside a round trip that
could start a span), which saves attaching and detaching a context per call. And they are
only made inside a trace: a round trip with no current span (a readiness probe's query, a
background sweep that has no span of its own) would be a trace of one span, noise that
costs as much as a useful one.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

_tracer = trace.get_tracer(__name__)

# redis-py strips the prefix of the error replies it maps to a class of its own.
_REDIS_ERROR_PREFIXES: tuple[tuple[type[RedisError], str], ...] = (
    (NoScriptError, "NOSCRIPT"),
    (ReadOnlyError, "READONLY"),
    (BusyLoadingError, "LOADING"),
    (ExecAbortError, "EXECABORT"),
    (OutOfMemoryError, "OOM"),
)


def redis_error_prefix(exc: RedisError) -> str:
    """The error reply's prefix (`db.response.status_code`): WRONGTYPE, NOSCRIPT, ERR, ..."""
    for cls, prefix in _REDIS_ERROR_PREFIXES:
        if isinstance(exc, cls):
            return prefix
    first = str(exc).split(" ", 1)[0]
    return first if first.isalpha() and first.isupper() else "ERR"


class ClientSpan:
    """`with spans.span(...) as span:` one round trip (a plain class: cheaper than
    `contextlib.contextmanager`, which this runs a few times per request)."""

    __slots__ = ("_attributes", "_name", "_span")

    def __init__(self, name: str, attributes: dict[str, Any]) -> None:
        self._name = name
        self._attributes = attributes

    def __enter__(self) -> Span:
        if trace.get_current_span().get_span_context().is_valid:
            self._span = _tracer.start_span(
                self._name, kind=SpanKind.CLIENT, attributes=self._attributes
            )
        else:  # outside any trace: no span (see the module docstring)
            self._span = INVALID_SPAN
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if exc is not None and span.is_recording():
            span.set_attribute("error.type", type(exc).__qualname__)
            if isinstance(exc, (ResponseError, BusyLoadingError)):  # an error reply
                span.set_attribute("db.response.status_code", redis_error_prefix(exc))
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
        span.end()


class DbSpans:
    """The client spans of one database (connection pool): the attributes that never change
    are computed once, the per-span ones once per (name, operation, batch size)."""

    def __init__(
        self,
        system: str,
        *,
        namespace: str | None = None,
        server_address: str | None = None,
        server_port: int | None = None,
        summary: bool = False,
    ) -> None:
        base: dict[str, Any] = {"db.system": system, "db.system.name": system}
        if namespace is not None:
            base["db.namespace"] = namespace
        if server_address:
            base["server.address"] = server_address
        if server_port:
            base["server.port"] = server_port
        self.base = base
        self.summary = summary  # also set `db.query.summary` to the name (SQL, as pg.py)
        self._attributes: dict[tuple[str, str, int], dict[str, Any]] = {}

    def span(self, name: str, operation: str, batch_size: int = 0) -> ClientSpan:
        """A span for one round trip named `name` running `operation` (see the module
        docstring); `batch_size` is the number of commands of a pipeline (≥ 2)."""
        key = (name, operation, batch_size)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = dict(self.base)
            attributes["db.operation.name"] = operation
            if self.summary:
                attributes["db.query.summary"] = name
            if batch_size >= 2:
                attributes["db.operation.batch.size"] = batch_size
            if len(self._attributes) < 1024:  # names are code constants; a bound all the same
                self._attributes[key] = attributes
        return ClientSpan(name, attributes)

    def pipeline(self, name: str, commands: int, *, transaction: bool, command: str) -> ClientSpan:
        """A span for a pipeline of `commands` commands: `command` when it holds one,
        else MULTI (transaction) or BATCH."""
        if commands == 1:
            return self.span(name, command)
        return self.span(name, "MULTI" if transaction else "BATCH", commands)


_redis_spans: weakref.WeakKeyDictionary[Redis, DbSpans] = weakref.WeakKeyDictionary()


def redis_spans(redis: Redis) -> DbSpans:
    """The spans of a Redis client (one `DbSpans` per client, its server read once)."""
    spans = _redis_spans.get(redis)
    if spans is None:
        pool = getattr(redis, "connection_pool", None)
        kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", None) or {}
        address = kwargs.get("path") or kwargs.get("host")
        port = kwargs.get("port") if not kwargs.get("path") else None
        spans = _redis_spans[redis] = DbSpans(
            "redis",
            server_address=str(address) if address else None,
            server_port=int(port) if port else None,
        )
    return spans


def duckdb_spans(name: str) -> DbSpans:
    """The spans of an embedded DuckDB database named `name` (no server)."""
    return DbSpans("duckdb", namespace=name, summary=True)
