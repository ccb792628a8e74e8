"""Garbage on the port, HTTP/1 clients, malformed and oversized messages: the server stays up."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.common.conftest import Echo, start_echo
from tests.common.test_server import health_of
from tests.conftest import Keys

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _raw(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), timeout=2)
    except TimeoutError:
        return b""
    finally:
        writer.close()


@pytest.fixture
async def small_echo(tmp_path: Path, redis_url: str, api_keys: Keys) -> AsyncIterator[Echo]:
    server = await start_echo(tmp_path, redis_url, api_keys, finsight_max_message_bytes=64 * 1024)
    yield server
    await server.close()


async def test_garbage_and_http1_on_the_grpc_port(small_echo: Echo) -> None:
    port = small_echo.host.bound_port
    assert port is not None
    await _raw(port, os.urandom(8192))
    await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _raw(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512))  # bad frames
    assert await health_of(small_echo.target, "") == SERVING


async def test_oversized_message_is_refused_and_server_stays_up(
    small_echo: Echo, api_keys: Keys
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_echo.unary("Echo")(
            b"x" * (128 * 1024), metadata=api_keys.metadata(api_keys.alice)
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        await small_echo.unary("Echo")(b"ok", metadata=api_keys.metadata(api_keys.alice)) == b"ok"
    )


async def test_malformed_protobuf_is_refused_without_taking_the_server_down(
    small_echo: Echo,
) -> None:
    check = small_echo.channel.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await health_of(small_echo.target, "") == SERVING


async def test_unknown_method_is_unimplemented(small_echo: Echo, api_keys: Keys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_echo.unary("NoSuchMethod")(b"", metadata=api_keys.metadata(api_keys.alice))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_invalid_utf8_is_invalid_argument_naming_the_field(small_echo: Echo) -> None:
    from libs.common.errors import status_info

    # HealthCheckRequest.service (field 1, string) holding invalid UTF-8.
    check = small_echo.channel.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(b"\x0a\x03\xff\xfe\xfd", timeout=5)
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in info.field_violations] == [
        ("service", "is not valid UTF-8")
    ]
