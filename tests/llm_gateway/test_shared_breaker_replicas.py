"""Two gateway replicas as separate processes share a provider's circuit through Redis.

`python -m services.llm_gateway` twice (spawned by `libs.common.devstack.DevStack`, as
`make run` spawns services), on ephemeral ports, both on a Redis-protocol server of the
test's own and the dev provider (in this process, so its request log shows every call
that reached it).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc as pb_grpc
from libs.common.devstack import SERVICES, DevStack, ServiceSpec, without_settings
from libs.common.errors import status_info
from libs.common.server import wait_for_serving
from libs.devprovider import DEFAULT_API_KEY, DevProvider
from tests.conftest import Keys, RedisProcess, free_port, write_keys

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = next(spec for spec in SERVICES if spec.name == "llm_gateway")
FAIL_MAX = 4
RESET_S = 2.0
POLL_S = 0.1


class Replica:
    def __init__(self, name: str, port: int, metrics_port: int) -> None:
        self.name = name
        self.port = port
        self.metrics_port = metrics_port
        self.spec = ServiceSpec(
            name,
            GATEWAY.module,
            GATEWAY.health_name,
            GATEWAY.port_var,
            port,
            GATEWAY.metrics_var,
            metrics_port,
        )
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LlmGatewayServiceStub(self.channel)


class Replicas:
    def __init__(self, stack: DevStack, keys: Keys, replicas: list[Replica]) -> None:
        self.stack = stack
        self.keys = keys
        self.all = replicas

    async def complete(self, replica: Replica, text: str) -> pb.CompleteResponse:
        request = pb.CompleteRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
            max_tokens=8,
        )
        return await replica.stub.Complete(
            request, metadata=self.keys.metadata(self.keys.alice), timeout=10
        )

    async def refusal(self, replica: Replica, text: str) -> tuple[grpc.StatusCode, str | None]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self.complete(replica, text)
        info = status_info(err.value)
        return info.code, info.reason

    async def provider_info(self, replica: Replica) -> pb.ProviderInfo:
        reply = await replica.stub.ListModels(
            pb.ListModelsRequest(), metadata=self.keys.metadata(self.keys.admin), timeout=5
        )
        return next(p for p in reply.providers if p.name == "deepseek")


@pytest.fixture
async def replicas(
    tmp_path: Path, private_redis: RedisProcess, provider: DevProvider
) -> AsyncIterator[Replicas]:
    provider.state.reset()
    keys = write_keys(tmp_path / "api-keys.json")
    env = without_settings(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(
        {
            "FINSIGHT_ENV": "dev",
            "FINSIGHT_BIND_HOST": "127.0.0.1",
            "FINSIGHT_DATA_DIR": str(tmp_path / "data"),
            "FINSIGHT_AUTH_ENABLED": "true",
            "FINSIGHT_API_KEYS_FILE": str(keys.path),
            "FINSIGHT_DRAIN_DELAY_S": "0.2",
            "FINSIGHT_READINESS_INTERVAL_S": "0.2",
            "FINSIGHT_RATE_LIMIT_RPS": "1000",
            "FINSIGHT_RATE_LIMIT_BURST": "2000",
            "REDIS_URL": private_redis.url,
            "DEEPSEEK_API_KEY": DEFAULT_API_KEY,
            "DEEPSEEK_BASE_URL": provider.root_url,
            "LLM_GATEWAY_MAX_RETRIES": "0",
            "LLM_GATEWAY_CACHE_ENABLED": "false",
            "LLM_GATEWAY_BREAKER_FAIL_MAX": str(FAIL_MAX),
            "LLM_GATEWAY_BREAKER_RESET_S": str(RESET_S),
            "LLM_GATEWAY_SHARED_BREAKER": "true",
            "LLM_GATEWAY_SHARED_BREAKER_POLL_S": str(POLL_S),
            "LLM_GATEWAY_CLIENT_SHARDS": "1",
        }
    )
    stack = DevStack(env, cwd=tmp_path, log_dir=tmp_path / "logs")
    started = [Replica(f"llm_gateway-{i}", free_port(), free_port()) for i in (1, 2)]
    try:
        for r in started:
            await stack.start_service(
                r.spec,
                {GATEWAY.port_var: str(r.port), GATEWAY.metrics_var: str(r.metrics_port)},
            )
        await asyncio.gather(
            *(wait_for_serving(r.target, GATEWAY.health_name, timeout=120) for r in started)
        )
        yield Replicas(stack, keys, started)
    finally:
        for r in started:
            await r.channel.close()
        for r in started:
            await stack.stop_service(r.name, timeout=30)
        provider.state.reset()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_failures_on_both_replicas_open_the_circuit_of_both_and_one_trial_closes_it(
    replicas: Replicas, provider: DevProvider
) -> None:
    one, two = replicas.all
    run = uuid.uuid4().hex[:8]
    provider.state.script(default={"status": 500})
    # FAIL_MAX failures split across the replicas: neither saw enough to open on its own.
    for i in range(FAIL_MAX):
        code, reason = await replicas.refusal((one, two)[i % 2], f"{run} fail {i}")
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(provider.state.log) == FAIL_MAX

    async def both_open() -> bool:
        infos = [await replicas.provider_info(r) for r in (one, two)]
        return all(i.shared_circuit_state == pb.CIRCUIT_STATE_OPEN for i in infos)

    learned_s = await wait_until(both_open, timeout=5)
    assert learned_s < 1.0  # within a few polls (LLM_GATEWAY_SHARED_BREAKER_POLL_S=0.1)
    for replica in (one, two):
        info = await replicas.provider_info(replica)
        assert info.circuit_state == pb.CIRCUIT_STATE_OPEN
        assert info.consecutive_failures == FAIL_MAX // 2  # its own count: below FAIL_MAX
    # Both refuse without contacting the provider.
    sent = len(provider.state.log)
    for replica in (one, two):
        code, reason = await replicas.refusal(replica, f"{run} refused")
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert len(provider.state.log) == sent

    # After the reset timeout: half-open on both, then one trial (slow, so the other
    # replica's call comes while it runs) closes the circuit for both.
    async def both_half_open() -> bool:
        infos = [await replicas.provider_info(r) for r in (one, two)]
        return all(i.shared_circuit_state == pb.CIRCUIT_STATE_HALF_OPEN for i in infos)

    await wait_until(both_half_open, timeout=RESET_S + 3)
    provider.state.script([{"delay_ms": 800}], default=None)
    trial = asyncio.create_task(replicas.complete(one, f"{run} trial"))
    await asyncio.sleep(0.3)
    code, reason = await replicas.refusal(two, f"{run} during the trial")
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    reply = await trial
    assert reply.content == f"echo: {run} trial"
    assert len(provider.state.log) == sent + 1  # the trial, and only it

    async def both_closed() -> bool:
        infos = [await replicas.provider_info(r) for r in (one, two)]
        return all(
            i.shared_circuit_state == pb.CIRCUIT_STATE_CLOSED
            and i.circuit_state == pb.CIRCUIT_STATE_CLOSED
            for i in infos
        )

    assert await wait_until(both_closed, timeout=5) < 1.0
    for replica in (one, two):
        reply = await replicas.complete(replica, f"{run} after {replica.name}")
        assert reply.content == f"echo: {run} after {replica.name}"
