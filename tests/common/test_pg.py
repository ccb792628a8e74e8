"""libs.common.pg against a real PostgreSQL server: migrations under concurrency, retries of
real deadlocks, unavailability and recovery, metrics, and the URL settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from libs.common.config import ConfigError, load_settings
from libs.common.errors import Unavailable
from libs.common.migrations import MigrationError
from libs.common.pg import MIGRATIONS_TABLE, Conn, PgDatabase, describe_url
from services.memory.config import MemorySettings
from tests.postgres import PostgresServer


def _migrations(tmp_path: Path, *scripts: str) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    for i, sql in enumerate(scripts, start=1):
        (folder / f"{i:03d}_step{i}.sql").write_text(sql)
    return folder


_SCHEMA = (
    "CREATE TABLE items (tenant TEXT NOT NULL, id INT NOT NULL, n INT NOT NULL, "
    "PRIMARY KEY (tenant, id));",
    "ALTER TABLE items ADD COLUMN note TEXT; INSERT INTO items VALUES ('a', 1, 0, NULL), "
    "('a', 2, 0, NULL);",
)


async def _count(conn: Conn, sql: str) -> int:
    row = await (await conn.execute(sql)).fetchone()
    assert row is not None
    return int(row[0])


async def test_replicas_starting_together_apply_each_migration_once(
    tmp_path: Path, pg_url: str
) -> None:
    folder = _migrations(tmp_path, *_SCHEMA)
    replicas = [PgDatabase(pg_url, name="svc", migrations_dir=folder) for _ in range(4)]
    applied = await asyncio.gather(*(db.open() for db in replicas))
    try:
        assert sorted(v for done in applied for v in done) == [1, 2]
        assert (
            await replicas[0].read(
                "count", _count, f"SELECT count(*) FROM {MIGRATIONS_TABLE} WHERE service = 'svc'"
            )
            == 2
        )
        assert await replicas[3].read("count", _count, "SELECT count(*) FROM items") == 2
    finally:
        await asyncio.gather(*(db.close() for db in replicas))
    again = PgDatabase(pg_url, name="svc", migrations_dir=folder)
    assert await again.open() == []
    await again.close()


async def test_two_services_in_one_database_keep_their_own_bookkeeping(
    tmp_path: Path, pg_url: str
) -> None:
    a = _migrations(tmp_path / "a", "CREATE TABLE a_rows (tenant TEXT PRIMARY KEY);")
    b = _migrations(tmp_path / "b", "CREATE TABLE b_rows (tenant TEXT PRIMARY KEY);")
    first = PgDatabase(pg_url, name="memory", migrations_dir=a)
    second = PgDatabase(pg_url, name="analytics", migrations_dir=b)
    assert await first.open() == [1]
    assert await second.open() == [1]  # its own version 1, not "already applied"
    await first.close()
    await second.close()


async def test_two_services_starting_together_in_a_new_database_both_migrate(
    tmp_path: Path, pg_url: str
) -> None:
    # Their migration locks differ, but the bookkeeping table they create is one. Holding
    # their locks and letting go of all at once makes them reach it together.
    names = [f"svc{i}" for i in range(4)]
    services = [
        PgDatabase(
            pg_url,
            name=name,
            migrations_dir=_migrations(tmp_path / name, f"CREATE TABLE {name} (tenant TEXT);"),
        )
        for name in names
    ]
    gate = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    for name in names:
        await gate.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"finsight-migrations:{name}"]
        )
    opening = asyncio.gather(*(db.open() for db in services))
    try:
        await asyncio.sleep(0.5)  # every service is connected and waiting for its lock
        await gate.close()
        assert await opening == [[1]] * 4
    finally:
        await asyncio.gather(*(db.close() for db in services))


async def test_an_edited_or_unknown_migration_stops_start_up(tmp_path: Path, pg_url: str) -> None:
    folder = _migrations(tmp_path / "v2", *_SCHEMA)
    db = PgDatabase(pg_url, name="svc", migrations_dir=folder)
    await db.open()
    await db.close()

    edited = _migrations(tmp_path / "edited", _SCHEMA[0], _SCHEMA[1] + " SELECT 1;")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await PgDatabase(pg_url, name="svc", migrations_dir=edited).open()

    older = _migrations(tmp_path / "v1", _SCHEMA[0])  # an image from before migration 002
    with pytest.raises(MigrationError, match=r"\[2\].*newer release"):
        await PgDatabase(pg_url, name="svc", migrations_dir=older).open()


async def test_a_failed_migration_leaves_nothing_half_applied(tmp_path: Path, pg_url: str) -> None:
    folder = _migrations(tmp_path, _SCHEMA[0], "CREATE TABLE half (x INT); SELECT 1/0;")
    db = PgDatabase(pg_url, name="svc", migrations_dir=folder)
    with pytest.raises(psycopg.errors.DivisionByZero):
        await db.open()
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables").fetchall()}
        versions = conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall()
    assert "items" in tables and "half" not in tables
    assert versions == [(1,)]


async def test_a_deadlock_is_retried_inside_the_service(tmp_path: Path, pg_url: str) -> None:
    db = PgDatabase(pg_url, name="svc", migrations_dir=_migrations(tmp_path, *_SCHEMA))
    await db.open()
    both_locked = asyncio.Barrier(2)
    attempts: list[str] = []

    async def swap(conn: Conn, first: int, second: int, who: str) -> None:
        attempts.append(who)
        await conn.execute("UPDATE items SET n = n + 1 WHERE tenant = 'a' AND id = %s", [first])
        if attempts.count(who) == 1:  # first attempt: make sure both hold their first lock
            await asyncio.wait_for(both_locked.wait(), 5)
        await conn.execute("UPDATE items SET n = n + 1 WHERE tenant = 'a' AND id = %s", [second])

    try:
        await asyncio.gather(db.write("swap", swap, 1, 2, "x"), db.write("swap", swap, 2, 1, "y"))
        totals = await db.read("count", _count, "SELECT sum(n) FROM items")
    finally:
        await db.close()
    assert totals == 4  # both transactions committed exactly once
    assert len(attempts) == 3  # the deadlock victim ran again
    retried = REGISTRY.get_sample_value(
        "finsight_db_transaction_retries_total", {"db": "svc", "statement": "swap"}
    )
    assert retried and retried >= 1


async def test_database_down_answers_unavailable_then_recovers(tmp_path: Path) -> None:
    server = PostgresServer.start(tmp_path / "pg")
    url = server.create_database()
    db = PgDatabase(url, name="svc", pool_min=1, pool_timeout_s=1.0, connect_timeout_s=1.0)
    try:
        await db.open()
        assert await db.read("count", _count, "SELECT 1") == 1
        server.stop()
        with pytest.raises(Unavailable) as err:
            await db.read("count", _count, "SELECT 1")
        assert err.value.retry_after and err.value.reason == "DATABASE_UNAVAILABLE"
        assert not await db.ping()
        server = PostgresServer.start(tmp_path / "pg")  # the same data directory
        for _ in range(100):
            if await db.ping():
                break
            await asyncio.sleep(0.1)
        assert await db.read("count", _count, "SELECT 2") == 2
    finally:
        await db.close()
        server.stop()


async def test_connections_killed_by_the_server_are_replaced_on_checkout(pg_url: str) -> None:
    db = PgDatabase(pg_url, name="svc", pool_min=2)
    await db.open()
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'finsight-svc'"
            )
        for _ in range(5):  # no request sees the dead connections
            assert await db.read("count", _count, "SELECT 1") == 1
    finally:
        await db.close()


async def test_statements_and_the_pool_are_measured(pg_url: str) -> None:
    db = PgDatabase(pg_url, name="measured", pool_min=1, pool_max=3)
    await db.open()
    try:
        await db.read("one_row", _count, "SELECT 1")
        assert REGISTRY.get_sample_value("finsight_db_pool_max", {"db": "measured"}) == 3
        assert (REGISTRY.get_sample_value("finsight_db_pool_size", {"db": "measured"}) or 0) >= 1
        assert REGISTRY.get_sample_value("finsight_db_pool_in_use", {"db": "measured"}) == 0
        assert (
            REGISTRY.get_sample_value(
                "finsight_db_query_seconds_count", {"db": "measured", "statement": "one_row"}
            )
            == 1
        )
        waits = REGISTRY.get_sample_value("finsight_db_pool_wait_seconds_count", {"db": "measured"})
        assert (waits or 0) >= 1
    finally:
        await db.close()
    assert REGISTRY.get_sample_value("finsight_db_pool_size", {"db": "measured"}) is None


async def test_snapshot_reads_see_one_state(tmp_path: Path, pg_url: str) -> None:
    db = PgDatabase(pg_url, name="svc", migrations_dir=_migrations(tmp_path, *_SCHEMA))
    await db.open()

    async def two_counts(conn: Conn) -> tuple[int, int]:
        first = await _count(conn, "SELECT count(*) FROM items")
        with psycopg.connect(pg_url, autocommit=True) as other:  # a commit in between
            other.execute("INSERT INTO items VALUES ('a', 3, 0, NULL)")
        return first, await _count(conn, "SELECT count(*) FROM items")

    try:
        assert await db.snapshot("two_counts", two_counts) == (2, 2)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await db.snapshot("write_in_snapshot", _count, "INSERT INTO items VALUES ('a', 9, 0)")
    finally:
        await db.close()


def test_database_url_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://finsight:s3cret-pw@db.example:5432/memory?sslmode=require\n")
    with monkeypatch.context() as env:
        env.setenv("MEMORY_DATABASE_URL_FILE", str(secret))
        settings = load_settings(MemorySettings, _env_file=None, finsight_auth_enabled=False)
    assert settings.database_url is not None and "s3cret-pw" in settings.database_url
    assert "s3cret-pw" in settings.secret_values()[0]  # the log redactor masks it
    assert describe_url(settings.database_url) == "postgresql://finsight@db.example:5432/memory"

    unix = load_settings(
        MemorySettings,
        _env_file=None,
        finsight_auth_enabled=False,
        memory_database_url="postgresql:///memory?host=/var/run/postgresql",
    )
    assert unix.database_url == "postgresql:///memory?host=/var/run/postgresql"
    assert (
        load_settings(MemorySettings, _env_file=None, finsight_auth_enabled=False).database_url
        is None
    )

    for bad in (
        "mysql://root:pw@x/db",
        "postgresql://u:pw@host:notaport/db",
        "postgresql://u:pw@host/db?nosuch=1",
    ):
        with pytest.raises(ConfigError) as err:
            load_settings(
                MemorySettings, _env_file=None, finsight_auth_enabled=False, memory_database_url=bad
            )
        assert "MEMORY_DATABASE_URL" in str(err.value)
        assert "pw" not in str(err.value)  # never echo the secret back
    with pytest.raises(ConfigError, match="FINSIGHT_PG_POOL_MIN"):
        load_settings(
            MemorySettings,
            _env_file=None,
            finsight_auth_enabled=False,
            finsight_pg_pool_min=20,
            finsight_pg_pool_max=10,
        )
