"""Operator RPCs every stateful service registers: online DuckDB backups.

Only the process that owns a DuckDB file can open it (a second process gets
"Could not set lock", even read-only), so a backup cannot be taken from the
outside: the service takes it itself (`Database.backup`, `COPY FROM DATABASE`
while serving). Kubernetes runs it on a schedule with this module's client:

    python -m libs.common.admin backup --target dns:///memory:50052

which authenticates with `FINSIGHT_API_KEY` (a key with the `<service>.admin`
scope) and exits non-zero when the backup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Gauge, Histogram

from finsight.common.v1 import admin_pb2, admin_pb2_grpc
from libs.common import metrics
from libs.common.duck import Database
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.interceptors import MethodPolicy
from libs.common.pg import PgDatabase

log = logging.getLogger(__name__)

BACKUP_LAST_SUCCESS = Gauge(
    "finsight_backup_last_success_timestamp_seconds",
    "Unix time of the last successful backup of a database.",
    ("db",),
)
BACKUP_SECONDS = Histogram(
    "finsight_backup_duration_seconds",
    "Time an online backup took.",
    ("db",),
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
BACKUP_BYTES = Gauge("finsight_backup_size_bytes", "Size of the last backup file.", ("db",))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, db: Database | PgDatabase, backup_dir: Path, keep: int) -> None:
        self.db = db
        self.backup_dir = backup_dir
        self.keep = keep
        self._lock = asyncio.Lock()  # one backup at a time

    async def Backup(
        self, request: admin_pb2.BackupRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BackupResponse:
        if not isinstance(self.db, Database):
            raise FailedPrecondition(
                f"{self.db.name} stores its data in PostgreSQL, which this RPC does not back "
                "up: take backups with pg_dump or continuous archiving (point-in-time "
                "recovery) through the database operator (docs/runbook.md, 'Backups')",
                reason="BACKUP_BY_DATABASE_OPERATOR",
            )
        async with self._lock:
            started = time.monotonic()
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            dest = self.backup_dir / f"{self.db.name}-{stamp}.duckdb"
            try:
                await self.db.backup(dest)
            except Exception as exc:  # surfaced to the operator with a stable reason
                raise Unavailable(
                    f"backup failed: {type(exc).__name__}", reason="BACKUP_FAILED"
                ) from exc
            elapsed = time.monotonic() - started
            size = dest.stat().st_size
            kept = self._prune()
            log.info(
                "backup taken",
                extra={
                    "db": self.db.name,
                    "path": str(dest),
                    "size_bytes": size,
                    "duration_s": round(elapsed, 3),
                },
            )
            BACKUP_LAST_SUCCESS.labels(self.db.name).set(time.time())
            BACKUP_SECONDS.labels(self.db.name).observe(elapsed)
            BACKUP_BYTES.labels(self.db.name).set(size)
            done = timestamp_pb2.Timestamp()
            done.GetCurrentTime()
            return admin_pb2.BackupResponse(
                path=str(dest),
                size_bytes=size,
                completed_at=done,
                duration_seconds=elapsed,
                kept=kept,
            )

    def _prune(self) -> int:
        # Partial files of interrupted backups (e.g. a killed pod) are never restorable.
        for partial in self.backup_dir.glob(f"{self.db.name}-*.duckdb.partial"):
            partial.unlink(missing_ok=True)
        backups = sorted(self.backup_dir.glob(f"{self.db.name}-*.duckdb"))
        for old in backups[: max(0, len(backups) - self.keep)]:
            old.unlink(missing_ok=True)
        return min(len(backups), self.keep)


def register_admin(host: object, db: Database | PgDatabase) -> None:
    """Add AdminService to a ServiceHost: `Backup` needs the `<service>.admin` scope."""
    from libs.common.server import ServiceHost

    assert isinstance(host, ServiceHost)
    settings = host.settings
    backup_dir = settings.finsight_backup_dir or settings.finsight_data_dir / "backups"
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(db, Path(backup_dir), settings.finsight_backup_keep), host.server
    )
    host.add_service_name(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)
    host.add_policy(
        "Backup", MethodPolicy(scope=f"{settings.service_name}.admin", method_class="admin")
    )


async def _backup(target: str, key: str | None, timeout: float) -> int:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            reply = await stub.Backup(admin_pb2.BackupRequest(), metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            print(f"backup failed: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(
        f"backup written: {reply.path} ({reply.size_bytes} bytes, "
        f"{reply.duration_seconds:.2f}s, {reply.kept} kept)"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m libs.common.admin")
    sub = parser.add_subparsers(dest="cmd", required=True)
    backup = sub.add_parser("backup", help="ask a service to back up its database now")
    backup.add_argument("--target", required=True, help="host:port or dns:///host:port")
    backup.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    key = os.environ.get("FINSIGHT_API_KEY")
    key_file = os.environ.get("FINSIGHT_API_KEY_FILE")
    if not key and key_file:
        key = Path(key_file).read_text().strip()
    sys.exit(asyncio.run(_backup(args.target, key, args.timeout)))


if __name__ == "__main__":
    main()


async def open_service_database(host: object, path: Path, migrations_dir: Path) -> Database:
    """The owning service's DuckDB: opened with its migrations, closed on shutdown, backed
    up through AdminService, and part of readiness (`duckdb`)."""
    from libs.common.server import ServiceHost

    assert isinstance(host, ServiceHost)
    settings = host.settings
    db = Database(
        path,
        name=settings.service_name,
        migrations_dir=migrations_dir,
        workers=settings.finsight_db_workers,
        slow_query_ms=settings.finsight_db_slow_query_ms,
        memory_limit=settings.finsight_db_memory_limit,
        threads=settings.finsight_db_threads,
    )
    await db.open()
    host.on_shutdown(db.close)
    register_admin(host, db)

    async def db_ready() -> bool:
        if db.is_open:  # the readiness round also exports DuckDB's memory, best effort:
            with contextlib.suppress(Exception):  # busy readers must not fail readiness
                used = await asyncio.wait_for(db.memory_bytes(), timeout=0.5)
                metrics.DB_MEMORY_BYTES.labels(db.name).set(used)
        return db.is_open

    host.add_readiness_check("duckdb", db_ready)
    return db


async def open_service_store(
    host: object, duck_path: Path, duck_migrations: Path, pg_migrations: Path
) -> Database | PgDatabase:
    """The owning service's durable store, chosen by configuration only: PostgreSQL when
    `<SERVICE>_DATABASE_URL` is set (no DuckDB file is created then), else the DuckDB file.
    Opened with its migrations, closed on shutdown, part of readiness, and registered
    with AdminService."""
    from libs.common.server import ServiceHost

    assert isinstance(host, ServiceHost)
    settings = host.settings
    url = settings.database_url
    if url is None:
        return await open_service_database(host, duck_path, duck_migrations)
    db = PgDatabase(
        url,
        name=settings.service_name,
        migrations_dir=pg_migrations,
        pool_min=settings.finsight_pg_pool_min,
        pool_max=settings.finsight_pg_pool_max,
        pool_timeout_s=settings.finsight_pg_pool_timeout_s,
        connect_timeout_s=settings.finsight_pg_connect_timeout_s,
        statement_timeout_ms=settings.finsight_pg_statement_timeout_ms,
        prepare_threshold=settings.finsight_pg_prepare_threshold,
        slow_query_ms=settings.finsight_db_slow_query_ms,
    )
    await db.open()
    host.on_shutdown(db.close)
    register_admin(host, db)
    host.add_readiness_check("postgresql", db.ping)
    return db
