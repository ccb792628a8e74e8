"""Server bootstrap: health names, readiness, drain, reflection, errors, metrics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libs.common.errors import status_info
from tests.common.conftest import SERVICE, Echo, start_echo
from tests.conftest import Keys

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(target: str, name: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=2
        )
        return int(reply.status)


async def test_health_names_follow_readiness_and_drain(echo: Echo, api_keys: Keys) -> None:
    for name in ("", "liveness", SERVICE):
        assert await health_of(echo.target, name) == SERVING, name

    echo.ready["dep"] = False  # a dependency goes away: readiness drops, liveness stays
    await asyncio.sleep(0.5)
    assert await health_of(echo.target, SERVICE) == NOT_SERVING
    assert await health_of(echo.target, "liveness") == SERVING
    echo.ready["dep"] = True
    await asyncio.sleep(0.5)
    assert await health_of(echo.target, SERVICE) == SERVING

    # An RPC in flight when the drain starts still completes.
    echo.host.settings.finsight_drain_delay_s = 0.5
    slow = asyncio.ensure_future(
        echo.unary("Slow")(b"1.0", metadata=api_keys.metadata(api_keys.alice), timeout=10)
    )
    await echo.state["slow_started"].wait()
    drain = asyncio.ensure_future(echo.host.drain_and_stop())
    await asyncio.sleep(0.2)
    for name in ("", SERVICE):
        assert await health_of(echo.target, name) == NOT_SERVING
    assert await slow == b"done"
    await drain


async def test_reflection_lists_the_services(echo: Echo) -> None:
    async with grpc.aio.insecure_channel(echo.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_unexpected_exception_is_internal_with_opaque_error_id(
    echo: Echo, api_keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo.unary("Boom")(b"", metadata=api_keys.metadata(api_keys.alice))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INTERNAL
    error_id = info.metadata["error_id"]
    assert error_id in info.message
    for leaked in ("secret", "hunter2", "/srv/db", "Traceback", "RuntimeError"):
        assert leaked not in info.message and leaked not in (err.value.debug_error_string() or "")
    logged = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
    assert any(r.exc_info for r in logged), "the stack trace belongs in the log"


async def test_invalid_argument_carries_field_violations(echo: Echo, api_keys: Keys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo.unary("Invalid")(b"", metadata=api_keys.metadata(api_keys.alice))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in info.field_violations] == [
        ("messages[0].content", "must not be empty")
    ]


async def test_metrics_use_go_grpc_prometheus_names(echo: Echo, api_keys: Keys) -> None:
    md = api_keys.metadata(api_keys.alice)
    for _ in range(3):
        await echo.unary("Echo")(b"x", metadata=md)
    with pytest.raises(grpc.aio.AioRpcError):
        await echo.unary("Echo")(b"x")  # no key
    stream = echo.channel.unary_stream(f"/{SERVICE}/Stream")
    assert [m async for m in stream(b"2", metadata=md)] == [b"0", b"1"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{echo.host.bound_metrics_port}/metrics")).text
    labels = f'grpc_method="Echo",grpc_service="{SERVICE}",grpc_type="unary"'
    assert f"grpc_server_started_total{{{labels}}}" in text
    assert f'grpc_server_handled_total{{grpc_code="OK",{labels}}}' in text
    assert f'grpc_server_handled_total{{grpc_code="UNAUTHENTICATED",{labels}}}' in text
    assert f"grpc_server_handling_seconds_bucket{{{labels},le=" in text
    assert (
        f'grpc_server_msg_sent_total{{grpc_method="Stream",grpc_service="{SERVICE}",'
        f'grpc_type="server_stream"}}'
    ) in text


async def test_access_log_line_per_rpc(
    echo: Echo, api_keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finsight.access")
    await echo.unary("Echo")(b"x", metadata=api_keys.metadata(api_keys.alice))
    lines = [
        r
        for r in caplog.records
        if r.name == "finsight.access" and getattr(r, "grpc_method", "") == "Echo"
    ]
    assert lines, "one access log line per RPC"
    line = lines[-1]
    assert (line.grpc_code, line.caller, line.tenant) == ("OK", "alice", "acme")  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]


async def test_sigterm_drains_a_real_service_process(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    """The memory service as its own process: SIGTERM → NOT_SERVING → clean exit 0."""
    from tests.conftest import free_port

    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "FINSIGHT_DATA_DIR": str(tmp_path),
        "REDIS_URL": redis_url,
        "FINSIGHT_API_KEYS_FILE": str(api_keys.path),
        "MEMORY_GRPC_PORT": str(port),
        "MEMORY_METRICS_PORT": str(free_port()),
        "FINSIGHT_DRAIN_DELAY_S": "1.0",
    }
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.memory",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        from libs.common.server import wait_for_serving

        await wait_for_serving(f"127.0.0.1:{port}", "finsight.memory.v1.MemoryService", timeout=60)
        proc.terminate()
        await asyncio.sleep(0.3)
        assert (
            await health_of(f"127.0.0.1:{port}", "finsight.memory.v1.MemoryService") == NOT_SERVING
        )
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = (await proc.stdout.read()).decode() if proc.stdout else ""
    assert '"msg": "draining"' in out and '"msg": "stopped"' in out


async def test_two_echo_servers_start_on_ephemeral_ports(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    a = await start_echo(tmp_path / "a", redis_url, api_keys)
    b = await start_echo(tmp_path / "b", redis_url, api_keys)
    try:
        assert a.host.bound_port != b.host.bound_port
        assert a.host.bound_metrics_port != b.host.bound_metrics_port
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(("grace_s", "outcome"), [(30.0, "done"), (0.3, "UNAVAILABLE")])
async def test_a_recycled_connection_lets_what_is_in_flight_finish_within_the_grace(
    tmp_path: Path, redis_url: str, api_keys: Keys, grace_s: float, outcome: str
) -> None:
    # Connections are recycled after 1 s; a 3 s call on one survives only with the grace.
    echo = await start_echo(
        tmp_path,
        redis_url,
        api_keys,
        finsight_max_connection_age_s=1.0,
        finsight_max_connection_age_grace_s=grace_s,
    )
    try:
        md = api_keys.metadata(api_keys.alice)
        try:
            got = (await echo.unary("Slow")(b"3.0", metadata=md, timeout=10)).decode()
        except grpc.aio.AioRpcError as err:
            got = err.code().name
        assert got == outcome
        assert await echo.unary("Echo")(b"x", metadata=md, timeout=5) == b"x"  # reconnects
    finally:
        await echo.close()
