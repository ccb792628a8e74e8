"""`make run`'s orchestrator: embedded Redis, three services SERVING, clean stop; and
`make run STORE=postgres`: a local PostgreSQL and two replicas of memory and analytics."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from libs.common.devstack import REPLICA_PORT_STEP, SERVICES, service_of, topology
from tests.common.test_server import health_of
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("store", ["duckdb", "postgres"])
async def test_devstack_brings_up_the_suite_and_stops_cleanly(tmp_path: Path, store: str) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "FINSIGHT_", "MEMORY_", "ANALYTICS_", "DEVSTACK_"))
    }
    ports = {}
    for spec in SERVICES:
        ports[spec.name] = free_port()
        env[spec.port_var] = str(ports[spec.name])
        env[spec.metrics_var] = str(free_port())
    env["DEVSTACK_REDIS_PORT"] = str(free_port())  # never the default 16379
    env["FINSIGHT_DATA_DIR"] = str(tmp_path / "var")
    env["FINSIGHT_DRAIN_DELAY_S"] = "0.2"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libs.common.devstack",
        "--store",
        store,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(90):
            while not any("Ctrl-C (or SIGTERM) stops everything" in line for line in lines):
                raw = await proc.stdout.readline()
                assert raw, "devstack exited early:\n" + "\n".join(lines[-30:])
                lines.append(raw.decode())
        for spec in topology(store):
            base = ports[service_of(spec)]
            target = f"127.0.0.1:{base + spec.port_offset}"
            assert await health_of(target, spec.health_name) == (
                health_pb2.HealthCheckResponse.SERVING
            )
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert key.startswith("fsk_") and any(key in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), timeout=60)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    tail = rest.decode()
    assert "all stopped" in tail and "redis | stopped" in tail
    assert f"redis://127.0.0.1:{env['DEVSTACK_REDIS_PORT']}" in "".join(lines)
    for spec in topology(store):
        assert f"{spec.name} SERVING after" in "".join(lines)
    if store == "postgres":
        assert "postgres | stopped" in tail
        assert not (tmp_path / "var" / "memory.duckdb").exists()  # no DuckDB file at all
        assert topology(store)[-1].port_offset == REPLICA_PORT_STEP
