"""Fixtures: the dev provider over real HTTP, and a real gateway on an ephemeral gRPC port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc as pb_grpc
from libs.common.server import ServiceHost, start_service
from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.catalog import Provider
from services.llm_gateway.config import GatewaySettings
from services.llm_gateway.deployments import Deployment, KeySource
from services.llm_gateway.main import setup
from services.llm_gateway.providers import ProviderClient
from tests.conftest import Keys, make_settings

# Fast retries so failure tests stay quick; the policy itself is tested with real waits.
FAST = {
    "llm_gateway_retry_base_s": 0.01,
    "llm_gateway_retry_max_backoff_s": 0.05,
    "llm_gateway_attempt_timeout_s": 5.0,
}


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def system(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=text)


def assistant(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text)


class Gw:
    """A running gateway and a stub to call it as a given tenant."""

    def __init__(self, host: ServiceHost, keys: Keys | None) -> None:
        self.host = host
        self.keys = keys
        self.target = f"127.0.0.1:{host.bound_port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LlmGatewayServiceStub(self.channel)

    def md(self, who: str = "alice") -> tuple[tuple[str, str], ...]:
        assert self.keys is not None
        return self.keys.metadata(getattr(self.keys, who))

    async def complete(
        self, text: str = "hello there", who: str = "alice", timeout: float = 10, **fields: Any
    ) -> pb.CompleteResponse:
        fields.setdefault("messages", [user(text)])
        return await self.stub.Complete(
            pb.CompleteRequest(**fields), metadata=self.md(who), timeout=timeout
        )

    async def accounted(self, who: str = "alice") -> pb.GetUsageResponse:
        """GetUsage, which waits for this gateway's pending accounting of the tenant: after
        it, the answers so far are in Redis (counters, usage stream) and the metrics
        (services/llm_gateway/accounting.py)."""
        return await self.stub.GetUsage(pb.GetUsageRequest(), metadata=self.md(who))

    async def close(self) -> None:
        await self.channel.close()
        await self.host.drain_and_stop()


async def start_gateway(
    tmp_path: Path,
    redis_url: str,
    keys: Keys | None,
    provider: DevProvider | None,
    **overrides: Any,
) -> Gw:
    values: dict[str, Any] = dict(FAST)
    if provider is not None:
        values["deepseek_api_key"] = DEFAULT_API_KEY
        values["deepseek_base_url"] = provider.root_url
    values.update(overrides)
    settings = make_settings(GatewaySettings, tmp_path, redis_url, keys, **values)
    host = await start_service(settings, setup)
    return Gw(host, keys)


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[DevProvider]:
    async with DevProvider() as running:
        yield running


@pytest.fixture
async def control(provider: DevProvider) -> AsyncIterator[DevProviderControl]:
    provider.state.reset()
    async with DevProviderControl(provider.base_url) as c:
        yield c
    provider.state.reset()


def dev_provider_spec(base_url: str, *, max_connections: int = 4) -> Provider:
    """The dev provider as a catalog Provider (one deployment, the dev key), for client-level
    tests."""
    return Provider(
        name="dev",
        base_url=base_url,
        deployments=(Deployment("default", base_url, KeySource(DEFAULT_API_KEY)),),
        requires_key=True,
        system="deepseek",
        max_connections=max_connections,
        attempt_timeout_s=5,
        max_retries=0,
        key_setting="DEEPSEEK_API_KEY",
    )


# A minimal chat body for ProviderClient-level tests.
BODY: dict[str, Any] = {
    "model": "deepseek-chat",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture
async def client(provider: DevProvider) -> AsyncIterator[ProviderClient]:
    """A ProviderClient on the dev provider (reset before and after)."""
    provider.state.reset()
    c = ProviderClient(
        dev_provider_spec(provider.root_url),
        shards=2,
        connect_s=1,
        read_s=5,
        write_s=5,
        pool_s=1,
        keepalive_expiry_s=5,
    )
    yield c
    await c.aclose()
    provider.state.reset()


GatewayFactory = Callable[..., Awaitable[Gw]]


@pytest.fixture
async def gateway_with(
    tmp_path: Path, redis_url: str, api_keys: Keys, provider: DevProvider
) -> AsyncIterator[GatewayFactory]:
    """`await gateway_with(**settings)`: a gateway on the dev provider with those settings
    overridden, closed after the test."""
    started: list[Gw] = []

    async def start(**overrides: Any) -> Gw:
        running = await start_gateway(tmp_path, redis_url, api_keys, provider, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


@pytest.fixture
async def gw(
    tmp_path: Path,
    redis_url: str,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> AsyncIterator[Gw]:
    running = await start_gateway(tmp_path, redis_url, api_keys, provider)
    yield running
    await running.close()
