"""A real memory service in-process: real DuckDB file, real Redis-protocol server, real gRPC
on an ephemeral port. `Memory` gives tests a stub plus the running parts (app.db, app.hot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.server import ServiceHost, start_service
from services.memory.config import MemorySettings
from services.memory.main import POLICIES, MemoryApp, build
from tests.conftest import Keys, make_settings


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


@pytest.fixture
async def memory(tmp_path: Path, redis_url: str, api_keys: Keys) -> AsyncIterator[Memory]:
    # A prefix of this test's own: tests share one Redis server, and each service flushes
    # its prefix at start-up.
    server = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
    )
    yield server
    await server.close()


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
    from services.memory import storage

    return await memory.app.db.read("test_counts", storage.user_row_counts, tenant, user_id)
