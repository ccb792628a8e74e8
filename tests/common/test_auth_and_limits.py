"""Authentication, scopes, key rotation and reload, and per-caller rate limits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from libs.common.auth import key_entry
from libs.common.errors import status_info
from tests.common.conftest import SERVICE, Echo, start_echo
from tests.common.test_server import NOT_SERVING, SERVING, health_of
from tests.conftest import Keys, RedisProcess


async def call_status(echo: Echo, method: str, metadata: tuple[tuple[str, str], ...] | None):
    try:
        await echo.unary(method)(b"x", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return status_info(err)
    return None


@pytest.mark.parametrize(
    ("who", "code", "reason"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
        ("k-unknown-999999", grpc.StatusCode.UNAUTHENTICATED, "API_KEY_UNKNOWN"),
        ("expired", grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED"),
        ("narrow", grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
    ],
)
async def test_rejections(
    echo: Echo, api_keys: Keys, who: str | None, code: grpc.StatusCode, reason: str
) -> None:
    key = getattr(api_keys, who, who) if who else None
    info = await call_status(echo, "Echo", api_keys.metadata(key) if key else None)
    assert info is not None and (info.code, info.reason) == (code, reason)


async def test_malformed_authorization_header_is_unauthenticated(echo: Echo) -> None:
    info = await call_status(echo, "Echo", (("authorization", "Basic dXNlcjpwdw=="),))
    assert info is not None and info.code == grpc.StatusCode.UNAUTHENTICATED


async def test_rotated_keys_both_work_and_identify_the_same_caller(
    echo: Echo, api_keys: Keys
) -> None:
    for key in (api_keys.alice, api_keys.alice_rotated):
        seen = json.loads(await echo.unary("WhoAmI")(b"", metadata=api_keys.metadata(key)))
        assert (seen["caller"], seen["tenant"]) == ("alice", "acme")


async def test_admin_scope_is_required_for_admin_methods(echo: Echo, api_keys: Keys) -> None:
    info = await call_status(echo, "Admin", api_keys.metadata(api_keys.alice))
    assert info is not None and info.code == grpc.StatusCode.PERMISSION_DENIED
    assert await call_status(echo, "Admin", api_keys.metadata(api_keys.admin)) is None


async def test_health_is_exempt_from_auth(echo: Echo) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(echo.channel).Check(
        health_pb2.HealthCheckRequest(service="")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_file_reloads_without_restart(echo: Echo, api_keys: Keys) -> None:
    new_key = "k-carol-777777"
    info = await call_status(echo, "Echo", api_keys.metadata(new_key))
    assert info is not None and info.code == grpc.StatusCode.UNAUTHENTICATED
    data = json.loads(api_keys.path.read_text())
    data["keys"].append(key_entry(new_key, caller="carol", tenant="acme", scopes=["echo"]))
    # Revoke alice's first key in the same change.
    data["keys"] = [k for k in data["keys"] if k["id"] != "alice-1"]
    api_keys.path.write_text(json.dumps(data))
    await asyncio.sleep(1.2)  # the store re-checks the file at most once a second
    assert await call_status(echo, "Echo", api_keys.metadata(new_key)) is None
    info = await call_status(echo, "Echo", api_keys.metadata(api_keys.alice))
    assert info is not None and info.reason == "API_KEY_UNKNOWN"
    assert await call_status(echo, "Echo", api_keys.metadata(api_keys.alice_rotated)) is None


async def test_broken_keys_file_keeps_previous_keys(echo: Echo, api_keys: Keys) -> None:
    api_keys.path.write_text("{not json")
    await asyncio.sleep(1.2)
    assert await call_status(echo, "Echo", api_keys.metadata(api_keys.alice)) is None


async def test_rate_limit_returns_resource_exhausted_with_retry_info(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    echo = await start_echo(
        tmp_path, redis_url, api_keys, finsight_rate_limit_rps=0.5, finsight_rate_limit_burst=3
    )
    try:
        md = api_keys.metadata(api_keys.bob)
        results = [await call_status(echo, "Echo", md) for _ in range(5)]
        assert results[:3] == [None, None, None]
        limited = results[3]
        assert limited is not None and limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limited.reason == "RATE_LIMITED"
        assert limited.retry_after is not None and 0 < limited.retry_after <= 2.0
        assert limited.quota and limited.quota[0].subject == "caller:bob"
        # Another caller has a bucket of its own.
        assert await call_status(echo, "Echo", api_keys.metadata(api_keys.alice)) is None
    finally:
        await echo.close()


@pytest.mark.parametrize(
    ("mode", "expected"), [("open", None), ("closed", grpc.StatusCode.UNAVAILABLE)]
)
async def test_rate_limiter_follows_fail_mode_when_redis_is_down(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    mode: str,
    expected: grpc.StatusCode | None,
) -> None:
    echo = await start_echo(
        tmp_path, private_redis.url, api_keys, finsight_rate_limit_fail_mode=mode
    )
    try:
        md = api_keys.metadata(api_keys.alice)
        assert await call_status(echo, "Echo", md) is None
        private_redis.stop()
        info = await call_status(echo, "Echo", md)
        assert (info.code if info else None) == expected
        if info is not None:
            assert info.retry_after is not None
        # Readiness: Redis is watched (the gauge drops) but gates only when failing closed.
        for _ in range(100):
            if echo.host.check_results.get("redis") is False:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # the round that saw it has set the health status
        assert echo.host.check_results["redis"] is False
        assert await health_of(echo.target, SERVICE) == (SERVING if mode == "open" else NOT_SERVING)
        assert await health_of(echo.target, "liveness") == SERVING
        private_redis.start()
        await asyncio.sleep(0.3)
        assert await call_status(echo, "Echo", md) is None  # recovers without a restart
        for _ in range(100):
            if await health_of(echo.target, SERVICE) == SERVING:
                break
            await asyncio.sleep(0.1)
        assert await health_of(echo.target, SERVICE) == SERVING
    finally:
        await echo.close()
