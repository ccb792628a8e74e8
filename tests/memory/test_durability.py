"""An acknowledged append survives SIGKILL: `python -m services.memory` as a real process, on
a DuckDB file and on PostgreSQL (where the restarted process also shares the Redis windows
the killed one may have left without its last write-throughs)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc

from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.server import wait_for_serving
from tests.conftest import Keys, free_port
from tests.memory.conftest import msg

SERVICE = "finsight.memory.v1.MemoryService"


async def start(
    tmp_path: Path, redis_url: str, keys: Keys, port: int, database_url: str | None = None
) -> asyncio.subprocess.Process:
    env = {
        "PATH": "/usr/bin:/bin",
        "FINSIGHT_DATA_DIR": str(tmp_path),
        "REDIS_URL": redis_url,
        "FINSIGHT_API_KEYS_FILE": str(keys.path),
        "MEMORY_GRPC_PORT": str(port),
        "MEMORY_METRICS_PORT": str(free_port()),
        "MEMORY_REDIS_PREFIX": f"kill-{tmp_path.name}",
        "FINSIGHT_RATE_LIMIT_ENABLED": "false",
        **({"MEMORY_DATABASE_URL": database_url} if database_url else {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.memory",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_for_serving(f"127.0.0.1:{port}", SERVICE, timeout=60)
    return proc


async def test_acknowledged_appends_survive_sigkill(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    port = free_port()
    md = api_keys.metadata(api_keys.alice)
    proc = await start(tmp_path, redis_url, api_keys, port, database_url)
    acked: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)

            async def writer(w: int) -> None:
                for i in range(1000):
                    content = f"w{w}-{i}"
                    await stub.AppendMessages(
                        pb.AppendMessagesRequest(
                            session_id=f"s{w}", user_id="u1", messages=[msg(content)]
                        ),
                        metadata=md,
                    )
                    acked.append(content)

            tasks = [asyncio.create_task(writer(w)) for w in range(8)]
            while len(acked) < 200:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # mid-stream: some appends are in flight
            await proc.wait()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    proc = await start(tmp_path, redis_url, api_keys, port, database_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            stored: set[str] = set()
            for w in range(8):
                page = await stub.GetHistory(
                    pb.GetHistoryRequest(session_id=f"s{w}", page_size=500), metadata=md
                )
                seqs = [m.sequence for m in page.messages]
                assert seqs == list(range(1, len(seqs) + 1))  # gap-free after recovery
                stored |= {m.message.content for m in page.messages}
        assert len(acked) >= 200
        assert set(acked) <= stored  # every acknowledged append is there
    finally:
        proc.terminate()
        await proc.wait()
