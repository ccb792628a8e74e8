"""`make restore-drill`: prove the backups restore, and time the recovery.

    python -m libs.common.restore_drill [--store duckdb|postgres] [--json] [--keep]

One command, on a fresh machine too: it starts memory and analytics of its own (as
`make run` spawns them, `libs.common.devstack`, on free ports under a temporary directory;
PostgreSQL mode: a local PostgreSQL 16 from the `pgserver` wheel), writes seed data, and
keeps a light write load running (AppendMessages and IngestBars streams) while it backs up
each database:

- DuckDB mode: `AdminService/Backup` of each service, the RPC the backup CronJobs call;
- PostgreSQL mode: `pg_dump -Fc` (the `pgserver` binaries) of each database, inside an
  exported snapshot, with the snapshot's per-table checksums taken in the same snapshot.

Then it restores each backup into a fresh location (DuckDB: `libs.common.duck.restore`, as
the restore Job does, into a new data directory; PostgreSQL: `pg_restore` into a new
database), verifies the copy and starts memory and analytics on it, and reports the
recovery time: restore + checksums + start to SERVING + reads, in seconds.

What "verified" means, honestly while writes continue:

1. **The restored copy equals the backup:** row count and a content checksum per table
   (an order-independent sum of row hashes) of the restored database against the backup's
   own snapshot: the backup file (DuckDB, with every sequence's last value too) or the
   snapshot pg_dump dumped (PostgreSQL, checksummed in that snapshot while writes went on;
   sequences are not transactional there, so each one that feeds a column must instead be
   past the column's largest value, or the next insert would reuse a key).
2. **The backup holds what was acknowledged:** every write acknowledged before the backup
   started is served by the restored services; no write sent after the backup finished is
   (DuckDB's copy runs on the writer thread, a PostgreSQL snapshot sees only earlier
   commits); writes in flight meanwhile are there whole or not at all.
3. **The restored services serve:** SERVING on their readiness names, GetHistory, Recall
   and GetConsent (memory), ListSymbols and GetBars (analytics), and one write each.

Against a stack that is already running instead (`--memory-target`, `--analytics-target`
and the key in `FINSIGHT_API_KEY(_FILE)`, a key with `memory.*`/`analytics.*` and
`*.admin` scopes; `--keys-file`: the keys file the restored services load, so the key's
tenant reads its data; PostgreSQL mode: `MEMORY_DATABASE_URL` / `ANALYTICS_DATABASE_URL`,
roles that may create a database). It writes a user `restore-drill` (sessions and facts)
and symbols `DRILL.<run>.<n>` into that tenant, and restores into this machine's
directory or a new database on the same server (dropped at the end unless `--keep`).
DuckDB mode reads the backup file at the path the service reports, so run it where the
backups volume is mounted.

Exit code 0 when every check passed, 1 when one failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import grpc

from finsight.analytics.v1 import analytics_pb2 as an
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.common.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from finsight.memory.v1 import memory_pb2 as mem
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.devstack import (
    DevStack,
    ServiceSpec,
    ensure_dev_key,
    topology,
    without_settings,
)
from libs.common.pg import describe_url, with_database

ROOT = Path(__file__).resolve().parents[2]
STORED = ("memory", "analytics")
DRILL_USER = "restore-drill"
SESSIONS = 4  # the load's appends rotate over this many sessions
BARS = 20  # rows per ingested series
SEED_APPENDS, SEED_STREAMS, SEED_FACTS = 20, 5, 5
CALL_TIMEOUT_S = 20.0


# -- checksums -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSum:
    """A table's row count and content checksum (sequences: rows = last value, no sum)."""

    rows: int
    checksum: str


Sums = dict[str, TableSum]


def duckdb_checksums(path: Path) -> Sums:
    """Per table of a DuckDB file (opened read-only: the file must not be in use):
    count(*) and the sum of DuckDB's row hashes; per sequence its last value."""
    import duckdb

    conn = duckdb.connect(str(path), read_only=True)
    try:
        db = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
                "AND schema_name = 'main' AND NOT temporary ORDER BY table_name",
                [db],
            ).fetchall()
        ]
        out: Sums = {}
        for table in tables:
            rows, total = conn.execute(
                f'SELECT count(*), coalesce(sum(hash(finsight_row)::HUGEINT), 0) FROM "{table}" '
                "AS finsight_row"
            ).fetchone()  # type: ignore[misc]
            out[table] = TableSum(int(rows), format(int(total), "x"))
        for name, last in conn.execute(
            "SELECT sequence_name, last_value FROM duckdb_sequences() WHERE database_name = ? "
            "AND NOT temporary",
            [db],
        ).fetchall():
            out[f"sequence {name}"] = TableSum(int(last or 0), "")
        return out
    finally:
        conn.close()


def pg_checksums(conn: Any) -> Sums:
    """The same for the tables of the current schema of a PostgreSQL connection, in its
    current transaction (its snapshot): count(*) and the sum of 64 bits of md5(row as
    text). Sequences are left out: they are not transactional, so no snapshot holds their
    value at the time of the dump (`pg_sequence_problems` checks them instead)."""
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        ).fetchall()
    ]
    out: Sums = {}
    for table in tables:
        rows, total = conn.execute(
            "SELECT count(*), coalesce(sum(('x' || left(md5(finsight_row::text), 16))"
            f'::bit(64)::bigint::numeric), 0) FROM "{table}" AS finsight_row'
        ).fetchone()
        out[table] = TableSum(int(rows), format(int(total) % (1 << 128), "x"))
    return out


_PG_SEQUENCE_COLUMNS = """
SELECT c.relname, a.attname, s.relname
FROM pg_attrdef d
JOIN pg_class c ON c.oid = d.adrelid
JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid
JOIN pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S'
WHERE c.relnamespace = current_schema()::regnamespace
UNION
SELECT c.relname, a.attname, s.relname
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_depend dep ON dep.refclassid = 'pg_class'::regclass AND dep.refobjid = c.oid
  AND dep.refobjsubid = a.attnum AND dep.deptype = 'i'
JOIN pg_class s ON s.oid = dep.objid AND s.relkind = 'S'
WHERE c.relnamespace = current_schema()::regnamespace AND a.attidentity <> ''
ORDER BY 1, 2
"""


def pg_sequence_problems(conn: Any) -> tuple[int, list[str]]:
    """Each sequence that feeds a column (a `nextval` default or an identity) must be past
    the column's largest value, or the next insert after a restore reuses a key. Returns
    how many were checked, and the problems."""
    checked, problems = 0, []
    for table, column, sequence in conn.execute(_PG_SEQUENCE_COLUMNS).fetchall():
        top = conn.execute(f'SELECT max("{column}") FROM "{table}"').fetchone()[0]
        last, called = conn.execute(f'SELECT last_value, is_called FROM "{sequence}"').fetchone()
        checked += 1
        if top is not None and (top > last or (top == last and not called)):
            problems.append(
                f"sequence {sequence}: at {last}, behind {table}.{column} (largest {top}): "
                "the next insert would reuse a key"
            )
    return checked, problems


def pg_url_checksums(url: str) -> Sums:
    import psycopg

    with psycopg.connect(url) as conn:
        return pg_checksums(conn)


def pg_url_sequence_problems(url: str) -> tuple[int, list[str]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return pg_sequence_problems(conn)


def compare(expected: Mapping[str, TableSum], actual: Mapping[str, TableSum]) -> list[str]:
    """What differs between two checksum sets, one line each (empty: identical)."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want is None:
            problems.append(f"{name}: in the restored copy only")
        elif got is None:
            problems.append(f"{name}: missing from the restored copy")
        elif want != got:
            problems.append(
                f"{name}: {got.rows} rows (checksum {got.checksum or '-'}), the backup has "
                f"{want.rows} (checksum {want.checksum or '-'})"
            )
    return problems


def verify_duckdb(expected: Mapping[str, TableSum], path: Path) -> list[str]:
    """Problems of a restored DuckDB file against the backup's checksums."""
    return compare(expected, duckdb_checksums(path))


def verify_postgres(expected: Mapping[str, TableSum], url: str) -> list[str]:
    """Problems of a restored PostgreSQL database against the snapshot's checksums, and
    sequences behind their columns."""
    return compare(expected, pg_url_checksums(url)) + pg_url_sequence_problems(url)[1]


# -- the write load --------------------------------------------------------------------------


@dataclass
class Write:
    key: str  # memory: the client message id; analytics: the symbol
    sent: float
    acked: float | None = None
    error: str | None = None


@dataclass
class Window:
    """When a backup ran: from just before it was asked for to just after it answered."""

    started: float
    finished: float


def user_message(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def bar_series(symbol: str, seed: int) -> an.BarSeries:
    from google.type import date_pb2

    first = date(2010, 1, 4)
    days = [first + timedelta(days=i) for i in range(BARS)]
    close = [50_000_000 + 10_000 * (seed % 97) + 5_000 * i for i in range(BARS)]
    return an.BarSeries(
        symbol=symbol,
        dates=[date_pb2.Date(year=d.year, month=d.month, day=d.day) for d in days],
        open_micros=close,
        high_micros=[c + 500_000 for c in close],
        low_micros=[c - 500_000 for c in close],
        close_micros=close,
        adj_close_micros=close,
        volumes=[1_000 + i for i in range(BARS)],
    )


class Load:
    """One appender and one ingester against the source, `interval` seconds apart each,
    recording when every write was sent and acknowledged."""

    def __init__(
        self,
        memory: memory_pb2_grpc.MemoryServiceStub,
        analytics: analytics_pb2_grpc.AnalyticsServiceStub,
        metadata: tuple[tuple[str, str], ...],
        run: str,
        interval: float,
    ) -> None:
        self.memory, self.analytics, self.md = memory, analytics, metadata
        self.run, self.interval = run, interval
        self.appends: list[Write] = []
        self.streams: list[Write] = []
        self.stopping = asyncio.Event()

    def session(self, n: int) -> str:
        return f"{DRILL_USER}-{self.run}-{n % SESSIONS}"

    def symbol(self, n: int) -> str:
        return f"DRILL.{self.run}.{n}"

    async def append(self) -> Write:
        n = len(self.appends)
        write = Write(f"{self.run}-{n}", time.monotonic())
        self.appends.append(write)
        request = mem.AppendMessagesRequest(
            session_id=self.session(n),
            user_id=DRILL_USER,
            messages=[
                mem.NewMessage(message=user_message(f"drill {n}"), client_message_id=write.key)
            ],
        )
        try:
            await self.memory.AppendMessages(request, metadata=self.md, timeout=CALL_TIMEOUT_S)
            write.acked = time.monotonic()
        except grpc.aio.AioRpcError as err:
            write.error = f"{err.code().name}: {err.details()}"
        return write

    async def ingest(self) -> Write:
        n = len(self.streams)
        write = Write(self.symbol(n), time.monotonic())
        self.streams.append(write)

        async def messages() -> AsyncIterator[an.IngestBarsRequest]:
            yield an.IngestBarsRequest(series=[bar_series(write.key, n)])

        try:
            reply = await self.analytics.IngestBars(
                messages(), metadata=self.md, timeout=CALL_TIMEOUT_S
            )
            if reply.rejected:
                write.error = f"{reply.rejected} bars rejected"
            else:
                write.acked = time.monotonic()
        except grpc.aio.AioRpcError as err:
            write.error = f"{err.code().name}: {err.details()}"
        return write

    async def _loop(self, one: Callable[[], Any]) -> None:
        while not self.stopping.is_set():
            await one()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.interval)

    async def seed(self) -> None:
        for _ in range(SEED_APPENDS):
            await self.append()
        for _ in range(SEED_STREAMS):
            await self.ingest()
        await self.memory.SetConsent(
            mem.SetConsentRequest(user_id=DRILL_USER, long_term_memory=True),
            metadata=self.md,
            timeout=CALL_TIMEOUT_S,
        )
        await self.memory.Remember(
            mem.RememberRequest(
                user_id=DRILL_USER,
                facts=[
                    mem.NewFact(text=f"restore drill fact {self.run} number {i}", kind="note")
                    for i in range(SEED_FACTS)
                ],
            ),
            metadata=self.md,
            timeout=CALL_TIMEOUT_S,
        )

    def start(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._loop(self.append)),
            asyncio.create_task(self._loop(self.ingest)),
        ]

    def errors(self) -> list[str]:
        return [f"{w.key}: {w.error}" for w in (*self.appends, *self.streams) if w.error]


def classify(writes: Iterable[Write], window: Window) -> tuple[set[str], set[str], set[str]]:
    """(acknowledged before the backup started, sent after it finished, the rest)."""
    before, after, during = set(), set(), set()
    for w in writes:
        if w.acked is not None and w.acked < window.started:
            before.add(w.key)
        elif w.sent > window.finished:
            after.add(w.key)
        else:
            during.add(w.key)
    return before, after, during


def check_writes(
    kind: str, writes: list[Write], window: Window, present: set[str]
) -> tuple[dict[str, int], list[str]]:
    """Figures and problems of one database's writes against what the restored copy serves."""
    before, after, during = classify(writes, window)
    problems = []
    lost = sorted(before - present)
    if lost:
        problems.append(
            f"{kind}: {len(lost)} acknowledged before the backup are missing: {lost[:5]}"
        )
    late = sorted(after & present)
    if late:
        problems.append(f"{kind}: {len(late)} sent after the backup are in it: {late[:5]}")
    figures = {
        "acknowledged_before_backup": len(before),
        "restored_of_those": len(before & present),
        "during_backup": len(during),
        "restored_of_those_during": len(during & present),
        "sent_after_backup": len(after),
        "restored_of_those_after": len(after & present),
    }
    return figures, problems


# -- the stacks ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    env = without_settings(os.environ)  # the caller's settings never reach the drill
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(
        {
            "FINSIGHT_ENV": "dev",
            "FINSIGHT_LOG_LEVEL": "INFO",
            "FINSIGHT_BIND_HOST": "127.0.0.1",
            "FINSIGHT_DRAIN_DELAY_S": "0",
            "FINSIGHT_RATE_LIMIT_RPS": "1000",
            "FINSIGHT_RATE_LIMIT_BURST": "2000",
            "FINSIGHT_DB_WORKERS": "2",
        }
    )
    return env


class Stack:
    """memory and analytics as processes (no gateway: Analyze is not part of the drill),
    with an embedded Valkey of their own, spawned by `DevStack` as `make run` does."""

    def __init__(
        self,
        root: Path,
        keys_file: Path,
        urls: Mapping[str, str] | None = None,
        *,
        sample_data: bool,
    ) -> None:
        self.root = root
        self.stopped = False
        env = base_env() | {
            "FINSIGHT_DATA_DIR": str(root / "data"),
            "FINSIGHT_BACKUP_DIR": str(root / "backups"),
            "FINSIGHT_API_KEYS_FILE": str(keys_file),
            "ANALYTICS_LOAD_SAMPLE_DATA": "true" if sample_data else "false",
            # No gateway runs: a port nothing listens on (Analyze would answer from rules).
            "ANALYTICS_LLM_GATEWAY_TARGET": f"dns:///127.0.0.1:{free_port()}",
        }
        self.specs: list[ServiceSpec] = [s for s in topology("duckdb") if s.name in STORED]
        for spec in self.specs:
            env[spec.port_var] = str(free_port())
            env[spec.metrics_var] = str(free_port())
        for service, url in (urls or {}).items():
            env[f"{service.upper()}_DATABASE_URL"] = url
        root.mkdir(parents=True, exist_ok=True)
        self.dev = DevStack(env, cwd=root, log_dir=root / "logs")
        self.dev.env.setdefault("ANALYTICS_MEMORY_TARGET", self.dev.service_target("memory"))

    def target(self, service: str) -> str:
        return self.dev.target(next(s for s in self.specs if s.name == service))

    async def up(self, timeout: float = 180) -> float:
        """Start both services; seconds until both report SERVING."""
        started = time.monotonic()
        self.dev.start_redis()
        for spec in self.specs:
            await self.dev.start_service(spec)
        try:
            await self.dev.await_serving(self.specs, timeout=timeout, announce=False)
        except BaseException as exc:
            await self.down()
            raise RuntimeError(f"{exc}; logs in {self.root / 'logs'}") from exc
        return time.monotonic() - started

    async def down(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.dev.stop()


@dataclass
class Source:
    """The stack whose databases are backed up."""

    memory_target: str
    analytics_target: str
    key: str | None
    keys_file: Path
    store: str
    urls: dict[str, str] = field(default_factory=dict)  # PostgreSQL mode: the DSNs


def metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


# -- backup and restore ----------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """A PostgreSQL client binary: from the `pgserver` wheel (the same major version as its
    server), else the PATH's."""
    with contextlib.suppress(ImportError):
        import pgserver

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install the pgserver wheel or PostgreSQL's client")
    return found


async def _run(*command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} exited with {proc.returncode}: {out.decode()[-2000:]}"
        )


async def backup_duckdb(source: Source, service: str) -> tuple[Path, Window, int]:
    """`AdminService/Backup` of one service: the file, when it ran, its size."""
    target = source.memory_target if service == "memory" else source.analytics_target
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        started = time.monotonic()
        reply = await stub.Backup(
            admin_pb2.BackupRequest(), metadata=metadata(source.key), timeout=900
        )
        finished = time.monotonic()
    return Path(reply.path), Window(started, finished), int(reply.size_bytes)


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url)


async def backup_postgres(url: str, dump: Path) -> tuple[Sums, Window, int, float]:
    """pg_dump of one database in an exported snapshot, and the checksums of that same
    snapshot (taken while pg_dump runs; writes go on). The window is the snapshot's
    (acknowledged before it started: in it; sent after it was taken: not in it, a
    REPEATABLE READ snapshot being fixed at the transaction's first statement); the last
    figure is the whole backup's time."""
    conn = await asyncio.to_thread(_connect, url)
    try:
        started = time.monotonic()
        await asyncio.to_thread(conn.execute, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur = await asyncio.to_thread(conn.execute, "SELECT pg_export_snapshot()")
        snapshot = cur.fetchone()[0]  # type: ignore[index]
        taken = time.monotonic()
        dumping = _run(
            pg_bin("pg_dump"),
            "--format=custom",
            f"--snapshot={snapshot}",
            f"--file={dump}",
            f"--dbname={url}",
        )
        sums, _ = await asyncio.gather(asyncio.to_thread(pg_checksums, conn), dumping)
        await asyncio.to_thread(conn.rollback)
    finally:
        await asyncio.to_thread(conn.close)
    elapsed = time.monotonic() - started
    return sums, Window(started, taken), await asyncio.to_thread(os.path.getsize, dump), elapsed


def _database_name(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).path.lstrip("/")


async def restore_postgres(dump: Path, source_url: str, name: str) -> str:
    """A new database `name` on the source's server, filled by pg_restore; its URL."""
    import psycopg

    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    url = with_database(source_url, name)
    await _run(
        pg_bin("pg_restore"),
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        f"--dbname={url}",
        str(dump),
    )
    return url


def drop_postgres(source_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


# -- reads on the restored services ----------------------------------------------------------


async def memory_contents(
    target: str, md: tuple[tuple[str, str], ...], run: str
) -> tuple[set[str], list[str]]:
    """Client message ids the restored memory serves for the drill's sessions, and problems
    of its other reads and of a write."""
    problems = []
    present: set[str] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        for n in range(SESSIONS):
            token = ""
            while True:
                page = await stub.GetHistory(
                    mem.GetHistoryRequest(
                        session_id=f"{DRILL_USER}-{run}-{n}",
                        user_id=DRILL_USER,
                        page_size=500,
                        page_token=token,
                    ),
                    metadata=md,
                    timeout=CALL_TIMEOUT_S,
                )
                sequences = [m.sequence for m in page.messages]
                if sequences != sorted(sequences):
                    problems.append(f"memory: session {n} out of order")
                present |= {m.client_message_id for m in page.messages}
                token = page.next_page_token
                if not token:
                    break
        consent = await stub.GetConsent(
            mem.GetConsentRequest(user_id=DRILL_USER), metadata=md, timeout=CALL_TIMEOUT_S
        )
        if not consent.consent.long_term_memory:
            problems.append("memory: the drill user's consent was not restored")
        recalled = await stub.Recall(
            mem.RecallRequest(user_id=DRILL_USER, query=f"restore drill fact {run}", k=50),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        texts = {f.fact.text for f in recalled.facts}
        wanted = {f"restore drill fact {run} number {i}" for i in range(SEED_FACTS)}
        if not wanted <= texts:
            problems.append(f"memory: Recall misses facts {sorted(wanted - texts)}")
        try:
            await stub.AppendMessages(
                mem.AppendMessagesRequest(
                    session_id=f"{DRILL_USER}-{run}-after-restore",
                    user_id=DRILL_USER,
                    messages=[mem.NewMessage(message=user_message("written after the restore"))],
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            problems.append(f"memory: a write after the restore failed: {err.code().name}")
    return present, problems


async def analytics_contents(
    target: str, md: tuple[tuple[str, str], ...], run: str
) -> tuple[set[str], list[str]]:
    """Drill symbols the restored analytics serves (whole), and problems."""
    problems = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        listed = await stub.ListSymbols(
            an.ListSymbolsRequest(), metadata=md, timeout=CALL_TIMEOUT_S
        )
        counts = {
            s.symbol: s.bar_count for s in listed.symbols if s.symbol.startswith(f"DRILL.{run}.")
        }
        partial = {s: c for s, c in counts.items() if c != BARS}
        if partial:
            problems.append(f"analytics: series restored in part: {sorted(partial.items())[:5]}")
        first = f"DRILL.{run}.0"
        if first in counts:
            rows = 0
            async for page in stub.GetBars(
                an.GetBarsRequest(symbol=first), metadata=md, timeout=CALL_TIMEOUT_S
            ):
                rows += len(page.bars.dates)
            if rows != BARS:
                problems.append(f"analytics: GetBars {first} answered {rows} bars, not {BARS}")

        async def one() -> AsyncIterator[an.IngestBarsRequest]:
            yield an.IngestBarsRequest(series=[bar_series(f"DRILL.{run}.restored", 0)])

        try:
            await stub.IngestBars(one(), metadata=md, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            problems.append(f"analytics: a write after the restore failed: {err.code().name}")
    return set(counts) - set(partial), problems


# -- the drill -------------------------------------------------------------------------------


@dataclass
class DatabaseReport:
    backup_path: str
    backup_bytes: int
    backup_s: float
    restored_to: str
    restore_s: float = 0.0
    checksum_s: float = 0.0
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    sequences_checked: int = 0  # PostgreSQL: sequences checked against their columns
    writes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    store: str
    run: str
    workdir: str
    source_start_s: float | None = None
    load_writes: int = 0
    load_errors: list[str] = field(default_factory=list)
    databases: dict[str, DatabaseReport] = field(default_factory=dict)
    serving_s: float = 0.0  # start of the restored services to SERVING
    reads_s: float = 0.0
    recovery_s: float = 0.0  # restores + checksums + start to SERVING + reads
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not d.problems for d in self.databases.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def text(self) -> str:
        lines = [
            f"restore drill ({self.store}, run {self.run}): {'OK' if self.ok else 'FAILED'}",
            f"  write load: {self.load_writes} writes, {len(self.load_errors)} failed",
        ]
        for name, d in self.databases.items():
            equal = sum(1 for t in d.tables.values() if t["equal"])
            w = d.writes
            lines += [
                f"  {name}: backup {d.backup_bytes:,} bytes in {d.backup_s:.2f}s -> {d.restored_to}",
                f"    restore {d.restore_s:.2f}s, checksums {d.checksum_s:.2f}s: "
                + (
                    f"{equal}/{len(d.tables)} tables equal to the snapshot, "
                    f"sequences checked against their columns: {d.sequences_checked}"
                    if self.store == "postgres"
                    else f"{equal}/{len(d.tables)} tables and sequences equal to the backup"
                ),
                f"    writes: {w.get('restored_of_those', 0)}/{w.get('acknowledged_before_backup', 0)}"
                f" acknowledged before the backup restored, "
                f"{w.get('restored_of_those_during', 0)}/{w.get('during_backup', 0)} in flight, "
                f"{w.get('restored_of_those_after', 0)}/{w.get('sent_after_backup', 0)} sent after",
            ]
            lines += [f"    PROBLEM {p}" for p in d.problems]
        lines += [
            f"  restored services SERVING after {self.serving_s:.2f}s, reads and writes "
            f"{self.reads_s:.2f}s",
            f"  recovery time (restore + verify + start + reads): {self.recovery_s:.2f}s",
        ]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class Options:
    store: str = "duckdb"
    workdir: Path | None = None
    keep: bool = False
    load_interval_s: float = 0.05
    memory_target: str | None = None
    analytics_target: str | None = None
    keys_file: Path | None = None
    database_urls: dict[str, str] = field(default_factory=dict)


async def run_drill(options: Options) -> Report:
    """The whole drill (see the module docstring); never raises for a failed check."""
    run = uuid.uuid4().hex[:6]
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="finsight-restore-drill-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report(store=options.store, run=run, workdir=str(workdir))
    own = options.memory_target is None
    source_stack: Stack | None = None
    pg_dir: Path | None = None
    restored_dbs: dict[str, str] = {}
    source: Source
    try:
        if own:
            key, keys_file = ensure_dev_key(workdir)
            urls: dict[str, str] = {}
            if options.store == "postgres":
                urls, pg_dir = await asyncio.to_thread(_start_postgres, workdir / "postgres")
            source_stack = Stack(workdir / "source", keys_file, urls, sample_data=True)
            report.source_start_s = round(await source_stack.up(), 2)
            source = Source(
                source_stack.target("memory"),
                source_stack.target("analytics"),
                key,
                keys_file,
                options.store,
                urls,
            )
        else:
            source = _attached_source(options)
        await _drill(source, options, workdir, run, report, restored_dbs, source_stack)
    except Exception as exc:  # a failed step is a failed drill, with its reason
        report.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if source_stack is not None:
            await source_stack.down()
        if restored_dbs and not options.keep:
            for service, name in restored_dbs.items():
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(drop_postgres, source.urls[service], name)
        if pg_dir is not None:
            from libs.common import pglocal

            await asyncio.to_thread(pglocal.stop, pg_dir)
        if not options.keep and options.workdir is None and report.ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _start_postgres(folder: Path) -> tuple[dict[str, str], Path]:
    import psycopg

    from libs.common import pglocal

    admin = pglocal.start(folder)
    urls = {}
    with psycopg.connect(admin, autocommit=True) as conn:
        for service in STORED:
            conn.execute(f'CREATE DATABASE "finsight_{service}"'.encode())
            urls[service] = with_database(admin, f"finsight_{service}")
    return urls, folder


def _attached_source(options: Options) -> Source:
    if not (options.memory_target and options.analytics_target):
        raise ValueError("--memory-target and --analytics-target go together")
    key = os.environ.get("FINSIGHT_API_KEY")
    key_file = os.environ.get("FINSIGHT_API_KEY_FILE")
    if not key and key_file:
        key = Path(key_file).read_text().strip()
    keys_file = options.keys_file or (
        Path(os.environ["FINSIGHT_API_KEYS_FILE"])
        if os.environ.get("FINSIGHT_API_KEYS_FILE")
        else None
    )
    if keys_file is None:
        raise ValueError("--keys-file (the keys file the restored services load) is required")
    urls = dict(options.database_urls)
    if options.store == "postgres":
        for service in STORED:
            urls.setdefault(service, os.environ.get(f"{service.upper()}_DATABASE_URL", ""))
            if not urls[service]:
                raise ValueError(
                    f"{service.upper()}_DATABASE_URL is required with --store postgres"
                )
    return Source(
        options.memory_target or "",
        options.analytics_target or "",
        key,
        keys_file,
        options.store,
        urls,
    )


async def _drill(
    source: Source,
    options: Options,
    workdir: Path,
    run: str,
    report: Report,
    restored_dbs: dict[str, str],
    source_stack: Stack | None,
) -> None:
    md = metadata(source.key)
    expected: dict[str, Sums] = {}
    windows: dict[str, Window] = {}
    dumps: dict[str, Path] = {}
    async with (
        grpc.aio.insecure_channel(source.memory_target) as memory_channel,
        grpc.aio.insecure_channel(source.analytics_target) as analytics_channel,
    ):
        load = Load(
            memory_pb2_grpc.MemoryServiceStub(memory_channel),
            analytics_pb2_grpc.AnalyticsServiceStub(analytics_channel),
            md,
            run,
            options.load_interval_s,
        )
        await load.seed()
        tasks = load.start()
        try:
            await asyncio.sleep(1.0)  # the load is flowing before the first backup starts
            for service in STORED:
                if source.store == "duckdb":
                    path, window, size = await backup_duckdb(source, service)
                    dumps[service] = path
                    seconds = window.finished - window.started
                else:
                    dumps[service] = workdir / "backups" / f"{service}-{run}.dump"
                    dumps[service].parent.mkdir(parents=True, exist_ok=True)
                    sums, window, size, seconds = await backup_postgres(
                        source.urls[service], dumps[service]
                    )
                    expected[service] = sums
                windows[service] = window
                report.databases[service] = DatabaseReport(
                    backup_path=str(dumps[service]),
                    backup_bytes=size,
                    backup_s=round(seconds, 3),
                    restored_to="",
                )
            await asyncio.sleep(0.5)  # and goes on after the last one
        finally:
            load.stopping.set()
            await asyncio.gather(*tasks)
    report.load_writes = len(load.appends) + len(load.streams)
    report.load_errors = load.errors()
    if report.load_errors:
        report.problems.append(f"{len(report.load_errors)} writes failed while the backups ran")
    if source_stack is not None:  # the source is gone, as in a real loss: free its CPU
        await source_stack.down()

    # -- recovery: restore, checksums, start, reads (timed) --
    began = time.monotonic()
    restored_root = workdir / "restored"
    urls: dict[str, str] = {}
    for service in STORED:
        d = report.databases[service]
        t0 = time.monotonic()
        if source.store == "duckdb":
            from libs.common.duck import restore

            target = restored_root / "data" / f"{service}.duckdb"
            target.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(restore, dumps[service], target)
            d.restore_s = round(time.monotonic() - t0, 3)
            d.restored_to = str(target)
            t1 = time.monotonic()
            want = await asyncio.to_thread(duckdb_checksums, dumps[service])
            got = await asyncio.to_thread(duckdb_checksums, target)
        else:
            name = f"{_database_name(source.urls[service])}_drill_{run}"
            urls[service] = await restore_postgres(dumps[service], source.urls[service], name)
            restored_dbs[service] = name
            d.restore_s = round(time.monotonic() - t0, 3)
            d.restored_to = describe_url(urls[service])
            t1 = time.monotonic()
            want = expected[service]
            got = await asyncio.to_thread(pg_url_checksums, urls[service])
            d.sequences_checked, problems = await asyncio.to_thread(
                pg_url_sequence_problems, urls[service]
            )
            d.problems += problems
        d.checksum_s = round(time.monotonic() - t1, 3)
        d.problems += compare(want, got)
        d.tables = {
            name: {"rows": s.rows, "checksum": s.checksum, "equal": got.get(name) == s}
            for name, s in sorted(want.items())
        }
    restored = Stack(restored_root, source.keys_file, urls, sample_data=False)
    report.serving_s = round(await restored.up(), 2)
    try:
        t2 = time.monotonic()
        (messages, memory_problems), (symbols, analytics_problems) = await asyncio.gather(
            memory_contents(restored.target("memory"), md, run),
            analytics_contents(restored.target("analytics"), md, run),
        )
        report.reads_s = round(time.monotonic() - t2, 2)
        report.recovery_s = round(time.monotonic() - began, 2)
    finally:
        await restored.down()
    for service, writes, present, extra in (
        ("memory", load.appends, messages, memory_problems),
        ("analytics", load.streams, symbols, analytics_problems),
    ):
        figures, problems = check_writes(service, writes, windows[service], present)
        report.databases[service].writes = figures
        report.databases[service].problems += extra + problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m libs.common.restore_drill",
        description="Back up memory and analytics under a write load, restore the backups "
        "into a fresh location, verify and time the recovery.",
    )
    parser.add_argument(
        "--store", choices=("duckdb", "postgres"), default=os.environ.get("STORE") or "duckdb"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (and restored databases)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="work directory (default: a new temporary one)"
    )
    parser.add_argument(
        "--load-interval", type=float, default=0.05, help="seconds between writes of each writer"
    )
    parser.add_argument(
        "--memory-target", help="a running memory (host:port) instead of the drill's own"
    )
    parser.add_argument("--analytics-target", help="a running analytics (host:port)")
    parser.add_argument(
        "--keys-file", type=Path, help="keys file for the restored services (attached mode)"
    )
    args = parser.parse_args(argv)
    options = Options(
        store=args.store,
        workdir=args.workdir,
        keep=args.keep,
        load_interval_s=args.load_interval,
        memory_target=args.memory_target,
        analytics_target=args.analytics_target,
        keys_file=args.keys_file,
    )
    if bool(options.memory_target) != bool(options.analytics_target):
        parser.error("--memory-target and --analytics-target go together")
    # The stacks' own progress lines go to stderr: stdout carries the report only.
    with contextlib.redirect_stdout(sys.stderr):
        report = asyncio.run(run_drill(options))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    if not report.ok:
        print(f"work directory kept: {report.workdir}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
