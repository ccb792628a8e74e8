"""DuckDB helper: migrations, group commit, backup and restore on real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import duckdb
import pytest

from libs.common.duck import Database, MigrationError, restore


def write_migrations(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "001_items.sql").write_text(
        "CREATE SEQUENCE item_ids; CREATE TABLE items (id BIGINT PRIMARY KEY DEFAULT "
        "nextval('item_ids'), name TEXT NOT NULL UNIQUE, price DECIMAL(18, 6));"
    )
    (directory / "002_tags.sql").write_text("ALTER TABLE items ADD COLUMN tag TEXT;")
    return directory


def insert(cur: duckdb.DuckDBPyConnection, name: str, price: str) -> int:
    row = cur.execute(
        "INSERT INTO items (name, price) VALUES (?, ?) RETURNING id", [name, price]
    ).fetchone()
    assert row is not None
    return int(row[0])


def rows(cur: duckdb.DuckDBPyConnection) -> list[tuple[object, ...]]:
    return cur.execute("SELECT id, name, price, tag FROM items ORDER BY id").fetchall()


async def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    migrations = write_migrations(tmp_path / "migrations")
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=migrations)
    assert await db.open() == [1, 2]
    await db.close()
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=migrations)
    assert await db.open() == []
    recorded = await db.read(
        "versions",
        lambda c: c.execute(
            "SELECT version, name FROM schema_migrations ORDER BY version"
        ).fetchall(),
    )
    assert recorded == [(1, "items"), (2, "tags")]
    await db.close()


async def test_an_edited_applied_migration_stops_start_up(tmp_path: Path) -> None:
    migrations = write_migrations(tmp_path / "migrations")
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=migrations)
    await db.open()
    await db.close()
    (migrations / "002_tags.sql").write_text("ALTER TABLE items ADD COLUMN label TEXT;")
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=migrations)
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await db.open()


async def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    migrations = write_migrations(tmp_path / "migrations")
    (migrations / "003_bad.sql").write_text("CREATE TABLE half (x INT); SELECT * FROM nowhere;")
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=migrations)
    with pytest.raises(duckdb.Error):
        await db.open()
    conn = duckdb.connect(str(tmp_path / "a.duckdb"))
    tables = {
        r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()]
    conn.close()
    assert "half" not in tables and versions == [1, 2]


async def test_group_commit_batches_and_isolates_a_failing_job(tmp_path: Path) -> None:
    db = Database(tmp_path / "a.duckdb", name="t", migrations_dir=write_migrations(tmp_path / "m"))
    await db.open()
    try:
        names = [f"n{i}" for i in range(50)] + ["n7"]  # the duplicate violates UNIQUE
        results = await asyncio.gather(
            *(db.write("insert", insert, n, "1.5") for n in names), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], duckdb.ConstraintException)
        stored = await db.read("rows", rows)
        assert sorted(str(r[1]) for r in stored) == sorted(set(names))
    finally:
        await db.close()


async def test_backup_while_serving_then_restore_gives_identical_data(tmp_path: Path) -> None:
    path = tmp_path / "live.duckdb"
    db = Database(path, name="t", migrations_dir=write_migrations(tmp_path / "m"))
    await db.open()
    for i in range(20):
        await db.write("insert", insert, f"item{i}", f"{i}.000123")
    before = await db.read("rows", rows)
    backup = await db.backup(tmp_path / "backups" / "t.duckdb")
    await db.write("insert", insert, "after-backup", "9")  # not in the backup
    await db.close()

    restore(backup, path)
    db = Database(path, name="t", migrations_dir=write_migrations(tmp_path / "m"))
    assert await db.open() == []  # migrations recorded in the backup too
    assert await db.read("rows", rows) == before
    assert await db.write("insert", insert, "next", "1") == 21  # sequences restored
    await db.close()


async def test_memory_limit_and_threads_reach_duckdb(tmp_path: Path) -> None:
    db = Database(tmp_path / "limited.duckdb", name="t", memory_limit="256MiB", threads=1)
    await db.open()
    try:
        settings = await db.read(
            "t",
            lambda cur: cur.execute(
                "SELECT current_setting('memory_limit'), current_setting('threads')"
            ).fetchone(),
        )
        assert settings == ("256.0 MiB", 1)
        before = await db.memory_bytes()
        await db.write(
            "t",
            lambda cur: cur.execute(
                "CREATE TABLE big AS SELECT range AS i, repeat('x', 100) AS s FROM range(200000)"
            ),
        )
        assert await db.memory_bytes() > before  # DuckDB's own accounting of its buffers
    finally:
        await db.close()
