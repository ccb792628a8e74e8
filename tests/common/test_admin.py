"""The Backup RPC: online backup by the owning process, admin scope, pruning, metric."""

from __future__ import annotations

from pathlib import Path

import duckdb
import grpc
import httpx
import pytest
from redis.asyncio import Redis

from finsight.common.v1 import admin_pb2, admin_pb2_grpc
from libs.common.admin import register_admin
from libs.common.duck import Database
from libs.common.server import ServiceHost, start_service
from tests.common.conftest import EchoSettings
from tests.conftest import Keys, make_settings


async def test_backup_rpc_writes_a_complete_copy_and_prunes(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    settings = make_settings(EchoSettings, tmp_path, redis_url, api_keys, finsight_backup_keep=2)
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_t.sql").write_text("CREATE TABLE t (x INTEGER);")
    db = Database(tmp_path / "echo.duckdb", name="echo", migrations_dir=migrations)

    async def setup(host: ServiceHost, redis: Redis) -> None:
        await db.open()
        host.on_shutdown(db.close)
        register_admin(host, db)

    host = await start_service(settings, setup)
    try:
        await db.write("insert", lambda c: c.execute("INSERT INTO t SELECT range FROM range(100)"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.bound_port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Backup(
                    admin_pb2.BackupRequest(), metadata=api_keys.metadata(api_keys.alice)
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            replies = [
                await stub.Backup(
                    admin_pb2.BackupRequest(), metadata=api_keys.metadata(api_keys.admin)
                )
                for _ in range(3)
            ]
        assert [r.kept for r in replies] == [1, 2, 2]
        backups = sorted((tmp_path / "backups").glob("echo-*.duckdb"))
        assert [str(p) for p in backups] == [replies[1].path, replies[2].path]
        conn = duckdb.connect(replies[2].path, read_only=True)
        assert conn.execute("SELECT count(*), sum(x) FROM t").fetchone() == (100, 4950)
        conn.close()
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{host.bound_metrics_port}/metrics")).text
        assert 'finsight_backup_last_success_timestamp_seconds{db="echo"}' in text
    finally:
        await host.drain_and_stop()
