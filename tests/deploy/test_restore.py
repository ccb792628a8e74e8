"""The documented DuckDB restore: the example restore Jobs are valid, meet the workload
policies, mount the StatefulSets' own claims (in every DuckDB-mode overlay), and their
script really restores a backup taken by `Database.backup` (real DuckDB files), refusing
while the file is in use. PostgreSQL mode restores through the database operator
(tests/deploy/test_postgres.py checks its example)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from libs.common.duck import Database
from libs.common.envdoc import settings_models
from tests.deploy.conftest import (
    BACKUP_JOBS,
    DUCKDB_OVERLAYS,
    K8S,
    K8S_VERSIONS,
    ROOT,
    Rendered,
    pod_spec,
    run,
    tool,
)
from tests.deploy.policy import workload_problems

MODELS = {m.service_name: m for m in settings_models()}
EXAMPLES = {s: K8S / "examples" / f"restore-{s}-job.yaml" for s in BACKUP_JOBS.values()}


def _docs(service: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLES[service].read_text()) if d]


def _job(service: str) -> dict[str, Any]:
    (job,) = [d for d in _docs(service) if d["kind"] == "Job"]
    return job


def _container(service: str) -> dict[str, Any]:
    (c,) = pod_spec(_job(service))["containers"]
    return dict(c)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_examples_pass_strict_schema_validation(version: str) -> None:
    """The restore Jobs (and the example Secrets) are applied by hand: validate them too."""
    examples = sorted((K8S / "examples").glob("*.yaml"))
    assert set(EXAMPLES.values()) <= set(examples)
    run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, examples))


@pytest.mark.parametrize("service", BACKUP_JOBS.values())
def test_restore_jobs_meet_the_workload_policies(service: str) -> None:
    docs = _docs(service)
    job = _job(service)
    assert workload_problems(job) == []
    assert job["spec"]["backoffLimit"] == 0, "a failed restore is for a person to look at"
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["name"] == pod_spec(job)["serviceAccountName"]
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
@pytest.mark.parametrize("service", BACKUP_JOBS.values())
def test_restore_jobs_mount_the_statefulsets_claims_where_the_service_does(
    overlays: dict[str, Rendered], service: str, overlay: str
) -> None:
    """Claim names are <template>-<statefulset>-0 and the paths are the pod's, so the
    file the Job replaces is the one the service opens."""
    r = overlays[overlay]
    sts = r.get("StatefulSet", service)
    (server,) = pod_spec(sts)["containers"]
    server_mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    spec = pod_spec(_job(service))
    c = _container(service)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    templates = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert claims == {t: f"{t}-{service}-0" for t in templates}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    server_env = {e["name"]: e.get("value") for e in server["env"]}
    assert mounts["data"] == server_mounts["data"] == r.config()["FINSIGHT_DATA_DIR"]
    assert mounts["backups"] == server_mounts["backups"] == server_env["FINSIGHT_BACKUP_DIR"]
    assert env["BACKUP_DIR"] == mounts["backups"]
    model = MODELS[BACKUP_JOBS[f"{service}-backup"]]
    settings = model.model_construct(finsight_data_dir=Path(mounts["data"]))
    assert env["DB_FILE"] == str(settings.db_path)  # type: ignore[attr-defined]
    assert env["DB_NAME"] == service


def test_restore_jobs_run_the_same_script() -> None:
    scripts = {s: _container(s)["command"] for s in EXAMPLES}
    assert all(cmd[:2] == ["python", "-c"] for cmd in scripts.values())
    assert len({cmd[2] for cmd in scripts.values()}) == 1


def _restore(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the memory example's script as the Job runs it, with its env remapped to tmp."""
    c = _container("memory")
    job_env = {e["name"]: e["value"] for e in c["env"]}
    job_env |= {"DB_FILE": str(tmp / "data" / "memory.duckdb"), "BACKUP_DIR": str(tmp / "backups")}
    return subprocess.run(
        [sys.executable, *c["command"][1:]],
        env=dict(os.environ) | job_env | env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _database(tmp: Path) -> Database:
    migrations = tmp / "migrations"
    migrations.mkdir(exist_ok=True)
    (migrations / "001_t.sql").write_text("CREATE TABLE t (x INTEGER);")
    db = Database(tmp / "data" / "memory.duckdb", name="memory", migrations_dir=migrations)
    (tmp / "data").mkdir(exist_ok=True)
    await db.open()
    return db


async def _insert(db: Database, first: int, count: int) -> None:
    await db.write(
        "insert", lambda c: c.execute(f"INSERT INTO t SELECT {first} + range FROM range({count})")
    )


def _rows(path: Path) -> int:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
    finally:
        conn.close()
    assert row is not None
    return int(row[0])


async def test_restore_script_restores_the_newest_backup_and_keeps_the_current_file(
    tmp_path: Path,
) -> None:
    db = await _database(tmp_path)
    await _insert(db, 0, 10)
    await db.backup(tmp_path / "backups" / "memory-20260101T000000000000Z.duckdb")
    await _insert(db, 10, 10)
    await db.backup(tmp_path / "backups" / "memory-20260101T010000000000Z.duckdb")
    await _insert(db, 20, 10)  # written after the last backup: lost by the restore
    await db.close()
    target = tmp_path / "data" / "memory.duckdb"
    assert _rows(target) == 30

    done = _restore(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "memory-20260101T010000000000Z.duckdb" in done.stdout
    assert _rows(target) == 20
    (aside,) = (tmp_path / "backups" / "pre-restore").iterdir()
    assert _rows(aside / "memory.duckdb") == 30, "the replaced file is kept"
    # The service's pruning (memory-*.duckdb in the backup dir) never sees the copy aside.
    assert sorted(p.name for p in (tmp_path / "backups").glob("memory-*.duckdb")) == [
        "memory-20260101T000000000000Z.duckdb",
        "memory-20260101T010000000000Z.duckdb",
    ]

    done = _restore(tmp_path, BACKUP="memory-20260101T000000000000Z.duckdb", SAVE_CURRENT="false")
    assert done.returncode == 0, done.stderr
    assert _rows(target) == 10
    assert len(list((tmp_path / "backups" / "pre-restore").iterdir())) == 1


async def test_restore_script_refuses_while_the_service_holds_the_database(
    tmp_path: Path,
) -> None:
    db = await _database(tmp_path)
    try:
        await _insert(db, 0, 5)
        await db.backup(tmp_path / "backups" / "memory-20260101T000000000000Z.duckdb")
        await _insert(db, 5, 5)
        done = _restore(tmp_path)
        assert done.returncode != 0
        assert "is in use: scale the StatefulSet to 0 first" in done.stderr
        assert not (tmp_path / "backups" / "pre-restore").exists()
        assert await db.read("count", lambda c: c.execute("SELECT count(*) FROM t").fetchone()) == (
            10,
        )
    finally:
        await db.close()


def test_restore_script_stops_on_a_missing_backup(tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    done = _restore(tmp_path)
    assert done.returncode != 0
    assert "no memory-*.duckdb in" in done.stderr
    done = _restore(tmp_path, BACKUP="memory-19990101T000000000000Z.duckdb")
    assert done.returncode != 0
    assert "no backup file" in done.stderr
    assert not (tmp_path / "data" / "memory.duckdb").exists()
