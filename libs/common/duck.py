"""DuckDB for a service: one database per process, never blocking the event loop.

- Reads run on a bounded thread pool, each on its own cursor.
- Writes go through a group committer: concurrent write jobs are gathered
  (up to `max_batch`) and run in ONE transaction on the single writer thread;
  each caller's future resolves only after COMMIT returns, so an acknowledged
  write is durable, and many RPCs share one fsync. If a batch fails, its jobs
  are retried one transaction each, so one bad job cannot fail its neighbours.
- Versioned SQL migrations (`NNN_name.sql`) are applied once at open, in a
  transaction each, and recorded in `schema_migrations` with a checksum; an
  edited, already-applied migration stops start-up.
- Online backup (`COPY FROM DATABASE` into a new file, serialised with writes)
  and offline restore.

Every statement is timed into `finsight_db_query_seconds{db,statement}` by a
stable statement name (never SQL text), and slow ones are logged; each `read` and
`write` is a `db.system.name=duckdb` client span of that name (`libs.common.dbspans`),
from the call to its result (for a write: queueing, the group's transaction and COMMIT).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from libs.common import metrics
from libs.common.dbspans import duckdb_spans
from libs.common.migrations import Migration, MigrationError, load_migrations, pending

log = logging.getLogger(__name__)
T = TypeVar("T")
Cursor = duckdb.DuckDBPyConnection


def _memory_usage(cur: Cursor) -> int:
    row = cur.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
    return int(row[0] or 0) if row else 0


def _warm_arrow_scans(conn: duckdb.DuckDBPyConnection) -> None:
    """DuckDB imports pandas on its first scan of an Arrow table (~0.4-0.6 s): take that
    here, before the service reports SERVING, not on the first write a caller makes."""
    import pyarrow as pa

    conn.register("finsight_warm_up", pa.table({"x": [1]}))
    try:
        conn.execute("SELECT count(*) FROM finsight_warm_up").fetchall()
    finally:
        conn.unregister("finsight_warm_up")


def apply_migrations(conn: Cursor, migrations: list[Migration]) -> list[int]:
    """Apply what is pending; return the versions applied now."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,
            applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)""")
    applied = {
        v: c for v, c in conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    }
    done = []
    for m in pending(applied, migrations, "DuckDB"):
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(m.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)",
                [m.version, m.name, m.checksum],
            )
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        done.append(m.version)
        log.info("migration applied", extra={"version": m.version, "migration": m.name})
    return done


@dataclass
class _Job:
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any] = field(repr=False)


class Database:
    """The process's DuckDB file. Create, `await open()`, use, `await close()`."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        migrations_dir: Path | None = None,
        workers: int = 4,
        max_batch: int = 256,
        slow_query_ms: float = 200.0,
        memory_limit: str | None = None,
        threads: int = 0,
    ) -> None:
        self.path = Path(path)
        # DuckDB's own defaults (80% of the RAM and one thread per CPU it sees) are the
        # node's in a container; the pod's limits belong here.
        self.config: dict[str, str | bool | int | float | list[str]] = {}
        if memory_limit:
            self.config["memory_limit"] = memory_limit
        if threads:
            self.config["threads"] = threads
        self.name = name
        self.migrations_dir = migrations_dir
        self.max_batch = max_batch
        self.slow_query_ms = slow_query_ms
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-db")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-dbw")
        self._queue: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._spans = duckdb_spans(name)

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> list[int]:
        """Open the file and apply pending migrations; return the versions applied."""
        loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await loop.run_in_executor(
            self._writer, partial(duckdb.connect, str(self.path), config=self.config)
        )
        applied: list[int] = []
        if self.migrations_dir is not None:
            migrations = load_migrations(self.migrations_dir)
            applied = await loop.run_in_executor(
                self._writer, apply_migrations, self._conn, migrations
            )
        await loop.run_in_executor(self._writer, _warm_arrow_scans, self._conn)
        self._wake = asyncio.Event()
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"{self.name}-committer")
        return applied

    async def memory_bytes(self) -> int:
        """What DuckDB's buffer manager holds now (its own accounting, in bytes)."""
        return await self.read("memory_usage", _memory_usage)

    async def close(self) -> None:
        """Finish queued writes, then close the file."""
        self._closing = True
        if self._writer_task is not None:
            assert self._wake is not None
            self._wake.set()
            await self._writer_task
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._writer, conn.close)
        self._readers.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._closing

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            raise RuntimeError(f"database {self.name} is not open")
        return self._conn.cursor()

    # -- reads -------------------------------------------------------------------------------
    async def read(self, statement: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(cursor, *args)` on the reader pool; `statement` names it in metrics."""
        with self._spans.span(statement, statement):
            return await asyncio.get_running_loop().run_in_executor(
                self._readers, self._timed, statement, fn, args
            )

    def _timed(self, statement: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        cur = self._cursor()
        started = time.perf_counter()
        try:
            return fn(cur, *args)
        finally:
            cur.close()
            self._observe(statement, time.perf_counter() - started)

    def _observe(self, statement: str, seconds: float) -> None:
        metrics.observe_statement(self.name, statement, seconds, self.slow_query_ms)

    # -- writes (group commit) ---------------------------------------------------------------
    async def write(self, statement: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(cursor, *args)` inside a committed transaction; return once durable.

        `fn` must not BEGIN/COMMIT itself, and must be safe to re-run after a rollback.
        """
        if self._wake is None or self._closing:
            raise RuntimeError(f"database {self.name} is not accepting writes")
        with self._spans.span(statement, statement):
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._queue.append(_Job(statement, fn, args, future))
            self._wake.set()
            return await future

    async def _write_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                live = [job for job in batch if not job.future.cancelled()]
                if not live:
                    continue
                outcomes = await loop.run_in_executor(self._writer, self._commit, live)
                for job, (ok, value) in zip(live, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)
            if self._closing and not self._queue:
                return

    def _commit(self, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        metrics.DB_BATCH_SIZE.labels(self.name).observe(len(jobs))
        assert self._conn is not None
        conn = self._conn
        if len(jobs) > 1:
            try:
                return [(True, r) for r in self._transaction(conn, jobs)]
            except Exception:
                log.info(
                    "group commit failed; retrying jobs one by one",
                    extra={"db": self.name, "jobs": len(jobs)},
                )
        out: list[tuple[bool, Any]] = []
        for job in jobs:
            try:
                out.append((True, self._transaction(conn, [job])[0]))
            except Exception as exc:
                out.append((False, exc))
        return out

    def _transaction(self, conn: duckdb.DuckDBPyConnection, jobs: list[_Job]) -> list[Any]:
        conn.execute("BEGIN TRANSACTION")
        try:
            results = []
            for job in jobs:
                started = time.perf_counter()
                results.append(job.fn(conn, *job.args))
                self._observe(job.name, time.perf_counter() - started)
            started = time.perf_counter()
            conn.execute("COMMIT")
            self._observe("commit", time.perf_counter() - started)
            return results
        except Exception:
            conn.execute("ROLLBACK")
            raise

    # -- backup and restore ------------------------------------------------------------------
    async def backup(self, dest: Path) -> Path:
        """Copy the live database into a new file at `dest` (atomic rename), while serving."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.unlink(missing_ok=True)

        def copy(conn: duckdb.DuckDBPyConnection) -> None:
            source = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            conn.execute(f"ATTACH '{_sql_path(tmp)}' AS finsight_backup")
            try:
                conn.execute(f'COPY FROM DATABASE "{source}" TO finsight_backup')
            finally:
                conn.execute("DETACH finsight_backup")

        started = time.perf_counter()
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"database {self.name} is not open")
        await asyncio.get_running_loop().run_in_executor(self._writer, copy, conn)
        os.replace(tmp, dest)
        self._observe("backup", time.perf_counter() - started)
        log.info("backup written", extra={"db": self.name, "path": str(dest)})
        return dest


def restore(backup: Path, target: Path) -> None:
    """Replace `target` with a verified copy of `backup`. The service must be stopped."""
    check = duckdb.connect(str(backup), read_only=True)
    try:
        check.execute("SELECT count(*) FROM schema_migrations").fetchone()
    finally:
        check.close()
    tmp = target.with_name(target.name + ".restoring")
    shutil.copyfile(backup, tmp)
    Path(str(target) + ".wal").unlink(missing_ok=True)
    os.replace(tmp, target)


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


__all__ = [
    "Cursor",
    "Database",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "load_migrations",
    "restore",
]
