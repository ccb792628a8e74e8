"""PostgreSQL for a service: a bounded async pool, timed statements, safe migrations.

The production store of memory and analytics (`MEMORY_DATABASE_URL`,
`ANALYTICS_DATABASE_URL`); `libs.common.duck` is the embedded one. Same shape:

- `read(name, fn, *args)` runs `await fn(conn, *args)` on a pooled connection
  (autocommit: one statement, one snapshot; `snapshot=True` wraps several statements
  in one REPEATABLE READ READ ONLY transaction).
- `write(name, fn, *args)` runs `fn` inside one transaction and returns after COMMIT, so
  an acknowledged write is durable. A serialization failure or deadlock rolls back and
  re-runs `fn` (it must derive everything from what it reads, as for DuckDB's group
  committer); callers never see those.
- A database that cannot be reached (connection refused or lost, the pool exhausted past
  its wait, a server restarting) answers `Unavailable` with a retry delay: the caller
  gets UNAVAILABLE + RetryInfo, never a stack trace, and the pool reconnects by itself.
- Migrations (`NNN_name.sql`, see `libs.common.migrations`) are applied under a
  session-level advisory lock per service, so of several replicas starting at once exactly
  one applies them and the others wait, then find nothing to do. Bookkeeping lives in
  `finsight_schema_migrations`, keyed by service: memory and analytics may share a
  database and never collide.

Every statement is timed into `finsight_db_query_seconds{db,statement}` under the same
stable names as the DuckDB path, with a `db.system=postgresql` client span of that name;
the pool's size, connections in use, waiting requests and wait time are exported.
Server-side prepared statements: psycopg prepares a query after it ran
`prepare_threshold` times on a connection (0 = never).

Poolers: the session settings (statement_timeout, idle_in_transaction_session_timeout,
the UTC time zone) are set once per connection and the migration lock is a session-level
advisory lock, so a PgBouncer in front must run in *session* mode; transaction pooling
would move later transactions to server connections without those settings.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from psycopg import errors as pg_errors
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from libs.common import metrics
from libs.common.dbspans import ClientSpan, DbSpans
from libs.common.errors import Unavailable
from libs.common.migrations import Migration, load_migrations, pending

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
Conn = psycopg.AsyncConnection[Any]

# Transient conflicts between concurrent transactions: safe to re-run the transaction.
RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
# The database is not usable right now (down, restarting, unreachable, too busy).
_UNAVAILABLE = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests)
_RETRY_AFTER_S = 1.0
MIGRATIONS_TABLE = "finsight_schema_migrations"

POOL_WAIT_SECONDS = Histogram(
    "finsight_db_pool_wait_seconds",
    "Time a request waited for a PostgreSQL connection from the pool.",
    ("db",),
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
DB_RETRIES = Counter(
    "finsight_db_transaction_retries_total",
    "Transactions re-run after a serialization failure or deadlock, by statement.",
    ("db", "statement"),
)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def describe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def with_database(url: str, dbname: str) -> str:
    """`url` naming database `dbname` instead (host, port, user and query kept)."""
    return urlsplit(url)._replace(path=f"/{dbname}").geturl()


class _PoolCollector:
    """Pool gauges read at scrape time (psycopg_pool's own counters), for every open pool."""

    def __init__(self) -> None:
        self.databases: weakref.WeakSet[PgDatabase] = weakref.WeakSet()

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "finsight_db_pool_size", "PostgreSQL connections the pool holds.", labels=["db"]
        )
        in_use = GaugeMetricFamily(
            "finsight_db_pool_in_use", "Pool connections lent to a request now.", labels=["db"]
        )
        waiting = GaugeMetricFamily(
            "finsight_db_pool_waiting", "Requests waiting for a connection now.", labels=["db"]
        )
        limit = GaugeMetricFamily(
            "finsight_db_pool_max", "Most connections the pool may open.", labels=["db"]
        )
        for db in list(self.databases):
            pool = db._pool
            if pool is None or pool.closed:
                continue
            stats = pool.get_stats()
            n = stats.get("pool_size", 0)
            size.add_metric([db.name], n)
            in_use.add_metric([db.name], max(0, n - stats.get("pool_available", 0)))
            waiting.add_metric([db.name], stats.get("requests_waiting", 0))
            limit.add_metric([db.name], pool.max_size)
        yield from (size, in_use, waiting, limit)


_COLLECTOR = _PoolCollector()
REGISTRY.register(_COLLECTOR)  # type: ignore[arg-type]


class PgDatabase:
    """A service's PostgreSQL database. Create, `await open()`, use, `await close()`."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        migrations_dir: Path | None = None,
        pool_min: int = 2,
        pool_max: int = 10,
        pool_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        statement_timeout_ms: int = 30_000,
        prepare_threshold: int = 5,
        slow_query_ms: float = 200.0,
        max_retries: int = 5,
    ) -> None:
        if not is_postgres_url(url):
            raise ValueError("a PostgreSQL URL starts with postgresql:// or postgres://")
        self.url = url
        self.name = name
        self.migrations_dir = migrations_dir
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.pool_timeout_s = pool_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.prepare_threshold = prepare_threshold
        self.slow_query_ms = slow_query_ms
        self.max_retries = max_retries
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None
        self._closing = False
        info = psycopg.conninfo.conninfo_to_dict(url)
        self._dbname = str(info.get("dbname") or "")
        port = str(info.get("port") or "").split(",")[0]
        # One span per statement, a leaf, only inside a trace (libs/common/dbspans.py).
        self._spans = DbSpans(
            "postgresql",
            namespace=self._dbname,
            server_address=str(info.get("host") or "").split(",")[0] or None,
            server_port=int(port) if port.isdigit() else None,
            summary=True,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": self.prepare_threshold or None,
        }
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(1, round(self.connect_timeout_s))
        if "application_name" not in given:
            kwargs["application_name"] = f"finsight-{self.name}"
        return kwargs

    async def _configure(self, conn: Conn) -> None:
        # Per session, once per new connection: statements and forgotten transactions are
        # bounded on the server, whatever the client does.
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false), "
            "set_config('timezone', 'UTC', false)",
            [f"{self.statement_timeout_ms}ms", f"{max(self.statement_timeout_ms, 60_000)}ms"],
        )

    async def open(self) -> list[int]:
        """Apply pending migrations (one replica at a time), then open the pool; return the
        versions this process applied."""
        applied: list[int] = []
        if self.migrations_dir is not None:
            applied = await self.migrate(load_migrations(self.migrations_dir))
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.url,
            kwargs=self._connect_kwargs(),
            min_size=self.pool_min,
            max_size=self.pool_max,
            timeout=self.pool_timeout_s,
            max_waiting=0,
            configure=self._configure,
            # A connection that broke while idle (server restart, failover) is found and
            # replaced on checkout instead of failing the request that drew it.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            reconnect_timeout=0,  # never give up: Kubernetes' readiness says we are down
            name=f"finsight-{self.name}",
            open=False,
        )
        await self._pool.open(wait=True, timeout=max(self.connect_timeout_s, 1.0))
        _COLLECTOR.databases.add(self)
        log.info(
            "postgresql pool open",
            extra={"db": self.name, "url": describe_url(self.url), "pool_max": self.pool_max},
        )
        return applied

    async def migrate(self, migrations: list[Migration]) -> list[int]:
        kwargs = self._connect_kwargs()
        async with await psycopg.AsyncConnection.connect(self.url, **kwargs) as conn:
            await self._configure(conn)
            # Session-level lock: held across the per-migration transactions, released when
            # this connection closes (also when the process dies half-way).
            await conn.execute(
                "SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                [f"finsight-migrations:{self.name}"],
            )
            # The bookkeeping table is shared by the services of a database, which migrate
            # under locks of their own, and CREATE TABLE IF NOT EXISTS fails against a
            # concurrent twin: its creation takes one lock common to all services.
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    [f"finsight-migrations:{MIGRATIONS_TABLE}"],
                )
                await conn.execute(f"""
                    CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
                        service    TEXT        NOT NULL,
                        version    INTEGER     NOT NULL,
                        name       TEXT        NOT NULL,
                        checksum   TEXT        NOT NULL,
                        applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                        PRIMARY KEY (service, version))""")
            rows = await (
                await conn.execute(
                    f"SELECT version, checksum FROM {MIGRATIONS_TABLE} WHERE service = %s",
                    [self.name],
                )
            ).fetchall()
            done = []
            for m in pending(dict(rows), migrations, f"{self.name} PostgreSQL"):
                async with conn.transaction():
                    await conn.execute(m.sql.encode())  # no parameters: a multi-statement script
                    await conn.execute(
                        f"INSERT INTO {MIGRATIONS_TABLE} (service, version, name, checksum) "
                        "VALUES (%s, %s, %s, %s)",
                        [self.name, m.version, m.name, m.checksum],
                    )
                done.append(m.version)
                log.info(
                    "migration applied",
                    extra={"db": self.name, "version": m.version, "migration": m.name},
                )
            return done

    async def close(self) -> None:
        self._closing = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            _COLLECTOR.databases.discard(self)
            await pool.close()

    @property
    def is_open(self) -> bool:
        return self._pool is not None and not self._closing and not self._pool.closed

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """Readiness: a connection answers `SELECT 1` within `timeout_s`."""
        if self._pool is None or self._closing:
            return False
        try:
            async with self._pool.connection(timeout=timeout_s) as conn:
                await conn.execute("SELECT 1")
            return True
        except Exception:  # any failure means "not usable now"; the reason is logged by psycopg
            return False

    # -- statements --------------------------------------------------------------------------
    def _span(self, statement: str) -> ClientSpan:
        return self._spans.span(statement, statement)

    def _observe(self, statement: str, seconds: float) -> None:
        metrics.observe_statement(self.name, statement, seconds, self.slow_query_ms)

    def _pool_or_raise(self) -> psycopg_pool.AsyncConnectionPool[Conn]:
        if self._pool is None or self._closing:
            raise Unavailable(
                f"the {self.name} database is closing",
                reason="DATABASE_UNAVAILABLE",
                retry_after=_RETRY_AFTER_S,
            )
        return self._pool

    async def read(
        self,
        statement: str,
        fn: Callable[Concatenate[Conn, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`await fn(conn, *args)` on a pooled connection; `statement` names it."""
        return await self._run(statement, fn, args, kwargs, transaction=False)

    async def snapshot(
        self,
        statement: str,
        fn: Callable[Concatenate[Conn, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Like `read`, inside one REPEATABLE READ READ ONLY transaction: every statement
        of `fn` sees the same committed state."""
        return await self._run(statement, fn, args, kwargs, transaction=False, snapshot=True)

    async def write(
        self,
        statement: str,
        fn: Callable[Concatenate[Conn, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`await fn(conn, *args)` inside one transaction; returns after COMMIT. Re-run on
        a serialization failure or deadlock, so `fn` must be safe to re-run."""
        return await self._run(statement, fn, args, kwargs, transaction=True)

    async def _run(
        self,
        statement: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        transaction: bool,
        snapshot: bool = False,
    ) -> T:
        pool = self._pool_or_raise()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RETRYABLE),
            stop=stop_after_attempt(self.max_retries if transaction or snapshot else 1),
            wait=wait_random_exponential(multiplier=0.005, max=0.2),
            reraise=True,
        )
        with self._span(statement):
            try:
                async for attempt in retrying:
                    with attempt:
                        if attempt.retry_state.attempt_number > 1:
                            DB_RETRIES.labels(self.name, statement).inc()
                        return await self._once(
                            pool, statement, fn, args, kwargs, transaction, snapshot
                        )
            except _UNAVAILABLE as exc:
                raise Unavailable(
                    f"the {self.name} database is unavailable; retry shortly",
                    reason="DATABASE_UNAVAILABLE",
                    retry_after=_RETRY_AFTER_S,
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Conn],
        statement: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        transaction: bool,
        snapshot: bool,
    ) -> T:
        asked = time.perf_counter()
        async with pool.connection() as conn:
            started = time.perf_counter()
            POOL_WAIT_SECONDS.labels(self.name).observe(started - asked)
            try:
                if transaction:
                    async with conn.transaction():
                        return await fn(conn, *args, **kwargs)
                if snapshot:
                    async with conn.transaction():
                        await conn.execute(
                            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                        )
                        return await fn(conn, *args, **kwargs)
                return await fn(conn, *args, **kwargs)
            finally:
                self._observe(statement, time.perf_counter() - started)


__all__ = ["RETRYABLE", "Conn", "PgDatabase", "describe_url", "is_postgres_url", "with_database"]
