"""The restore drill (`make restore-drill`, libs/common/restore_drill.py): it backs up both
databases under a write load, restores them into a fresh location, and its verification
passes on a faithful copy and fails on a tampered one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import psycopg
import pytest

from libs.common import restore_drill
from libs.common.pg import with_database
from libs.common.restore_drill import (
    Options,
    Report,
    Window,
    Write,
    check_writes,
    duckdb_checksums,
    run_drill,
    verify_duckdb,
    verify_postgres,
)


def assert_complete(report: Report) -> None:
    """Every table equal to the backup, every write acknowledged before it restored, none
    sent after it, and a measured recovery time."""
    assert report.ok, report.text()
    assert report.load_writes > 0 and not report.load_errors
    assert set(report.databases) == {"memory", "analytics"}
    for name, db in report.databases.items():
        assert db.backup_bytes > 0 and db.tables, name
        assert all(t["equal"] for t in db.tables.values()), db.tables
        w = db.writes
        assert w["acknowledged_before_backup"] > 0, (name, w)
        assert w["restored_of_those"] == w["acknowledged_before_backup"], (name, w)
        assert w["restored_of_those_after"] == 0, (name, w)
    assert 0 < report.serving_s < report.recovery_s
    text = report.text()
    assert "OK" in text and f"{report.recovery_s:.2f}s" in text
    assert json.loads(json.dumps(report.as_dict()))["ok"] is True


@pytest.mark.timeout(300)
async def test_duckdb_drill_restores_verifies_and_catches_a_tampered_copy(
    tmp_path: Path,
) -> None:
    report = await run_drill(Options(store="duckdb", workdir=tmp_path / "drill", keep=True))
    assert_complete(report)
    memory = report.databases["memory"]
    assert {"messages", "facts", "consent", "sequence session_no_seq"} <= set(memory.tables)
    assert memory.tables["messages"]["rows"] >= memory.writes["acknowledged_before_backup"]

    backup = Path(memory.backup_path)
    expected = duckdb_checksums(backup)
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(backup, copy)
    assert verify_duckdb(expected, copy) == []

    conn = duckdb.connect(str(copy))
    conn.execute("DELETE FROM messages WHERE rowid = (SELECT min(rowid) FROM messages)")
    conn.close()
    problems = verify_duckdb(expected, copy)
    assert len(problems) == 1 and problems[0].startswith("messages:"), problems

    shutil.copyfile(backup, copy)  # the same number of rows, one value changed
    conn = duckdb.connect(str(copy))
    conn.execute("UPDATE consent SET long_term_memory = NOT long_term_memory")
    conn.close()
    problems = verify_duckdb(expected, copy)
    assert len(problems) == 1 and problems[0].startswith("consent:"), problems
    assert "checksum" in problems[0]


@pytest.mark.timeout(300)
async def test_postgres_drill_restores_and_verifies(tmp_path: Path) -> None:
    report = await run_drill(Options(store="postgres", workdir=tmp_path / "drill"))
    assert_complete(report)
    assert "finsight_schema_migrations" in report.databases["memory"].tables


async def test_pg_dump_restore_checksums_catch_a_tampered_copy(pg_url: str, tmp_path: Path) -> None:
    """pg_dump in a snapshot and pg_restore into a new database, as the drill does: the
    copy verifies against the snapshot's checksums until a row goes or changes."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE n_seq")
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY DEFAULT nextval('n_seq'), v text)")
        conn.execute("INSERT INTO t (v) SELECT 'row ' || g FROM generate_series(1, 50) g")
    sums, window, size, _ = await restore_drill.backup_postgres(pg_url, tmp_path / "t.dump")
    assert window.started <= window.finished and size > 0
    assert set(sums) == {"t"} and sums["t"].rows == 50
    name = f"{pg_url.rsplit('/', 1)[1]}_restored"
    restored = await restore_drill.restore_postgres(tmp_path / "t.dump", pg_url, name)
    try:
        assert restored == with_database(pg_url, name)
        assert verify_postgres(sums, restored) == []
        assert restore_drill.pg_url_sequence_problems(restored) == (1, [])
        with psycopg.connect(restored, autocommit=True) as conn:
            conn.execute("UPDATE t SET v = 'changed' WHERE id = 7")
        problems = verify_postgres(sums, restored)
        assert len(problems) == 1 and problems[0].startswith("t: 50 rows"), problems
        with psycopg.connect(restored, autocommit=True) as conn:
            conn.execute("DELETE FROM t WHERE id = 8")
            conn.execute("SELECT setval('n_seq', 1)")
        problems = verify_postgres(sums, restored)
        assert [p.split(":")[0] for p in problems] == ["t", "sequence n_seq"], problems
        assert "behind t.id (largest 50)" in problems[1]
    finally:
        restore_drill.drop_postgres(pg_url, name)


def test_writes_are_judged_against_the_backup_window() -> None:
    window = Window(started=10.0, finished=12.0)
    writes = [
        Write("before", sent=8.0, acked=9.0),
        Write("during", sent=9.5, acked=11.0),
        Write("after", sent=12.5, acked=13.0),
    ]
    figures, problems = check_writes("memory", writes, window, {"before", "during"})
    assert problems == []
    assert figures["acknowledged_before_backup"] == 1 and figures["during_backup"] == 1
    _, problems = check_writes("memory", writes, window, {"during", "after"})
    assert len(problems) == 2
    assert "acknowledged before the backup are missing: ['before']" in problems[0]
    assert "sent after the backup are in it: ['after']" in problems[1]


def test_targets_of_a_running_stack_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        restore_drill.main(["--memory-target", "127.0.0.1:1"])
    assert exc.value.code == 2
    assert "go together" in capsys.readouterr().err


def test_a_running_stack_needs_its_keys_file_and_database_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attached mode: the restored services load the stack's keys file (so the key's tenant
    reads its data), and PostgreSQL mode restores next to the databases it is given."""
    for var in ("FINSIGHT_API_KEY", "FINSIGHT_API_KEYS_FILE", "MEMORY_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "key").write_text("k-123\n")
    monkeypatch.setenv("FINSIGHT_API_KEY_FILE", str(tmp_path / "key"))

    def options(store: str = "duckdb") -> Options:
        return Options(store=store, memory_target="127.0.0.1:1", analytics_target="127.0.0.1:2")

    with pytest.raises(ValueError, match="--keys-file"):
        restore_drill._attached_source(options())
    monkeypatch.setenv("FINSIGHT_API_KEYS_FILE", str(tmp_path / "keys.json"))
    source = restore_drill._attached_source(options())
    assert source.key == "k-123" and source.keys_file == tmp_path / "keys.json"
    assert source.store == "duckdb" and source.urls == {}
    with pytest.raises(ValueError, match="MEMORY_DATABASE_URL"):
        restore_drill._attached_source(options("postgres"))
    monkeypatch.setenv("MEMORY_DATABASE_URL", "postgresql:///m")
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", "postgresql:///a")
    source = restore_drill._attached_source(options("postgres"))
    assert source.urls == {"memory": "postgresql:///m", "analytics": "postgresql:///a"}
