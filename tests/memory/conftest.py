"""A real memory service in-process: real DuckDB file or real PostgreSQL database (the
`backend` fixture: the main test modules run on both), real Redis-protocol server, real
gRPC on an ephemeral port. `Memory` gives tests a stub plus the running parts (app.store,
app.db, app.hot); `store` is a bare `MemoryStore` on either backend (contract tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.duck import Database
from libs.common.pg import PgDatabase
from libs.common.server import ServiceHost, start_service
from services.memory.config import MemorySettings
from services.memory.main import MIGRATIONS, POLICIES, MemoryApp, build
from services.memory.store import MemoryStore, open_store
from tests.conftest import Keys, make_settings

BACKENDS = ("duckdb", "postgresql")


class Memory:
    """A running memory service and what a test needs to call it."""

    def __init__(self, host: ServiceHost, app: MemoryApp, keys: Keys) -> None:
        self.host = host
        self.app = app
        self.keys = keys
        self.target = f"127.0.0.1:{host.bound_port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)

    def md(self, who: str = "alice") -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(getattr(self.keys, who))

    async def wait_trusted(self) -> None:
        import asyncio

        for _ in range(200):
            if self.app.hot.trusted:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("hot tier never became trusted")

    async def close(self) -> None:
        await self.channel.close()
        await self.host.drain_and_stop()


async def start_memory(tmp_path: Path, redis_url: str, keys: Keys, **overrides: Any) -> Memory:
    overrides.setdefault("finsight_rate_limit_enabled", False)
    settings = make_settings(MemorySettings, tmp_path, redis_url, keys, **overrides)
    holder: dict[str, MemoryApp] = {}

    async def setup(host: ServiceHost, redis: Redis) -> None:
        holder["app"] = await build(host, redis)

    host = await start_service(settings, setup, policies=POLICIES)
    memory = Memory(host, holder["app"], keys)
    await memory.wait_trusted()
    return memory


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store under test; a module or test pins one with
    `@pytest.mark.parametrize("backend", ["duckdb"])` (e.g. when it reads DuckDB's SQL)."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """MEMORY_DATABASE_URL for the backend: a fresh PostgreSQL database, or None (DuckDB)."""
    return str(request.getfixturevalue("pg_url")) if backend == "postgresql" else None


@pytest.fixture
async def memory(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> AsyncIterator[Memory]:
    # A prefix of this test's own: tests share one Redis server, and a DuckDB-backed
    # service flushes its prefix at start-up.
    server = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_database_url=database_url,
    )
    assert server.app.store.backend == ("postgresql" if database_url else "duckdb")
    yield server
    await server.close()


async def open_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Database | PgDatabase:
    db: Database | PgDatabase
    if backend == "duckdb":
        db = Database(tmp_path / "store.duckdb", name="memory_test", migrations_dir=MIGRATIONS)
    else:
        db = PgDatabase(
            request.getfixturevalue("pg_url"),
            name="memory",
            migrations_dir=MIGRATIONS / "postgresql",
        )
    await db.open()
    return db


@pytest.fixture
async def store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[MemoryStore]:
    """A `MemoryStore` on a fresh database of the backend, migrated."""
    db = await open_database(backend, tmp_path, request)
    yield open_store(db)
    await db.close()


def msg(content: str, role: int = 2, cid: str = "", **metadata: str) -> pb.NewMessage:
    from finsight.common.v1 import common_pb2

    return pb.NewMessage(
        message=common_pb2.ChatMessage(role=role, content=content),
        client_message_id=cid,
        metadata=metadata,
    )


async def rpc_error(call: Any) -> Any:
    """Await a call expected to fail; return its decoded status (libs.common.errors.StatusInfo)."""
    from libs.common.errors import status_info

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return status_info(err.value)


async def counts(memory: Memory, user_id: str, tenant: str = "acme") -> dict[str, int]:
    return await memory.app.store.user_row_counts(tenant, user_id)


async def sql(memory: Memory, statement: str, *, write: bool = False) -> list[tuple[Any, ...]]:
    """Run one SQL statement on the service's own database, whichever backend (tests that
    look behind the service's back or set up states it cannot reach by RPC)."""
    db = memory.app.db
    if isinstance(db, Database):

        def run_duck(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(statement)
            return [] if write else list(cur.fetchall())

        return await (db.write if write else db.read)("test_sql", run_duck)

    async def run_pg(conn: Any) -> list[tuple[Any, ...]]:
        cur = await conn.execute(statement)
        return [] if write else list(await cur.fetchall())

    return await (db.write if write else db.read)("test_sql", run_pg)
