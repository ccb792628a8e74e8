"""A tiny real gRPC service (bytes in, bytes out) to exercise the platform kit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from redis.asyncio import Redis

from libs.common import context
from libs.common.clients import create_channel
from libs.common.config import CommonSettings
from libs.common.errors import InvalidArgument
from libs.common.interceptors import MethodPolicy
from libs.common.server import ServiceHost, start_service
from libs.common.tracing import current_trace_id
from tests.conftest import Keys, make_settings

SERVICE = "test.v1.EchoService"


class EchoSettings(CommonSettings):
    service_name: ClassVar[str] = "echo"
    full_service_name: ClassVar[str] = SERVICE
    echo_grpc_port: int = 0
    echo_metrics_port: int = 0
    echo_downstream: str = ""

    @property
    def grpc_port(self) -> int:
        return self.echo_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.echo_metrics_port


POLICIES = {"Admin": MethodPolicy(scope="echo.admin", method_class="admin")}


def _echo_handlers(settings: EchoSettings, state: dict[str, Any]) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return request

    async def whoami(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        ident = context.current_identity()
        return json.dumps(
            {
                "caller": ident.caller,
                "tenant": ident.tenant,
                "remaining": context.remaining_time(),
                "trace_id": current_trace_id(),
            }
        ).encode()

    async def boom(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internals: password=hunter2 at /srv/db")

    async def invalid(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument.field("messages[0].content", "must not be empty")

    async def slow(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        state["slow_started"].set()
        await asyncio.sleep(float(request.decode() or "1"))
        return b"done"

    async def stream(request: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request.decode() or "3")):
            yield str(i).encode()

    async def downstream(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        """Call the downstream echo's WhoAmI; report what it saw plus our own trace id."""
        channel = state.setdefault("channel", create_channel(settings.echo_downstream, settings))
        call = channel.unary_unary(f"/{SERVICE}/WhoAmI")
        seen = json.loads(await call(b""))
        return json.dumps({"downstream": seen, "trace_id": current_trace_id()}).encode()

    def unary(fn: Callable[..., Awaitable[bytes]]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": unary(echo),
            "WhoAmI": unary(whoami),
            "Boom": unary(boom),
            "Invalid": unary(invalid),
            "Slow": unary(slow),
            "Admin": unary(echo),
            "Downstream": unary(downstream),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )


class Echo:
    """A running echo server and what a test needs to call it."""

    def __init__(self, host: ServiceHost, state: dict[str, Any], ready: dict[str, bool]) -> None:
        self.host = host
        self.state = state
        self.ready = ready
        self.target = f"127.0.0.1:{host.bound_port}"
        self.channel = grpc.aio.insecure_channel(self.target)

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")

    async def close(self) -> None:
        await self.channel.close()
        await self.host.drain_and_stop()
        channel = self.state.get("channel")
        if channel is not None:
            await channel.close()


async def start_echo(tmp_path: Path, redis_url: str, keys: Keys | None, **overrides: Any) -> Echo:
    settings = make_settings(EchoSettings, tmp_path, redis_url, keys, **overrides)
    state: dict[str, Any] = {"slow_started": asyncio.Event()}
    ready = {"dep": True}

    async def setup(host: ServiceHost, redis: Redis) -> None:
        host.server.add_generic_rpc_handlers((_echo_handlers(settings, state),))

        async def dep_ready() -> bool:
            return ready["dep"]

        host.add_readiness_check("dep", dep_ready)

    host = await start_service(settings, setup, policies=POLICIES)
    return Echo(host, state, ready)


@pytest.fixture
async def echo(tmp_path: Path, redis_url: str, api_keys: Keys) -> AsyncIterator[Echo]:
    server = await start_echo(tmp_path, redis_url, api_keys)
    yield server
    await server.close()
