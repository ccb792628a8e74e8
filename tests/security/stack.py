"""The three services in-process, wired together, for the security and fuzz suites.

Real parts: each service is started with its own `setup` through the kit's
`start_service` on an ephemeral port, with its own DuckDB file, a Redis-protocol
server of the stack's own (so usage ledgers, caches and rate buckets of other tests
never mix in), and the dev LLM provider over real HTTP. Analytics calls memory and
the gateway over gRPC exactly as in `make run`, so `Analyze` exercises the whole path.

Keys: the suite's standard identities (tests/conftest.py `write_keys`) plus two writers
(`analytics.write`) so that IngestBars can be exercised per tenant.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from finsight.analytics.v1 import analytics_pb2
from finsight.common.v1 import admin_pb2
from finsight.llm.v1 import llm_gateway_pb2
from finsight.memory.v1 import memory_pb2
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, start_service, wait_for_serving
from libs.devprovider import DEFAULT_API_KEY, DevProvider
from services.analytics import main as analytics_main
from services.analytics.config import AnalyticsSettings
from services.llm_gateway import main as gateway_main
from services.llm_gateway.config import GatewaySettings
from services.memory import main as memory_main
from services.memory.config import MemorySettings
from services.memory.main import MemoryApp
from tests.conftest import Keys, RedisProcess, make_settings, write_keys

# Figures of the last run of each suite (docs/reliability.md quotes them).
RESULTS_DIR = Path(__file__).resolve().parents[2] / ".build" / "reliability"

MEMORY = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]
ANALYTICS = analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"]
GATEWAY = llm_gateway_pb2.DESCRIPTOR.services_by_name["LlmGatewayService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]

# Which gRPC services each process serves (AdminService only where there is a database).
SERVED: dict[str, tuple[ServiceDescriptor, ...]] = {
    "llm_gateway": (GATEWAY,),
    "memory": (MEMORY, ADMIN),
    "analytics": (ANALYTICS, ADMIN),
}
READINESS = {
    "llm_gateway": GATEWAY.full_name,
    "memory": MEMORY.full_name,
    "analytics": ANALYTICS.full_name,
}


@dataclass(frozen=True)
class StackKeys:
    """The standard test identities plus tenant writers for analytics."""

    base: Keys
    alice_writer: str = "k-alice-writer-666666"  # acme: every service scope + analytics.write
    bob_writer: str = "k-bob-writer-777777"  # globex: same
    memory_only: str = "k-memory-only-888888"  # acme: scope "memory" only

    @property
    def path(self) -> Path:
        return self.base.path

    def key(self, who: str) -> str:
        return getattr(self, who) if who in _OWN else getattr(self.base, who)

    def md(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key(who)}"),)

    def all_plaintext(self) -> list[str]:
        b = self.base
        return [
            b.admin,
            b.alice,
            b.alice_rotated,
            b.bob,
            b.expired,
            b.narrow,
            self.alice_writer,
            self.bob_writer,
            self.memory_only,
        ]


_OWN = {"alice_writer", "bob_writer", "memory_only"}


def write_stack_keys(path: Path) -> StackKeys:
    base = write_keys(path)
    keys = StackKeys(base)
    data = json.loads(path.read_text())
    scopes = ["llm_gateway", "memory", "analytics", "analytics.write"]
    data["keys"] += [
        key_entry(keys.alice_writer, caller="alice-w", tenant="acme", scopes=scopes, key_id="aw"),
        key_entry(keys.bob_writer, caller="bob-w", tenant="globex", scopes=scopes, key_id="bw"),
        key_entry(keys.memory_only, caller="mem", tenant="acme", scopes=["memory"], key_id="mo"),
    ]
    path.write_text(json.dumps(data))
    return keys


@dataclass
class Stack:
    keys: StackKeys
    redis: RedisProcess
    provider: DevProvider
    hosts: dict[str, ServiceHost]
    memory_app: MemoryApp
    analytics_db: Any  # analytics' libs.common.duck.Database or libs.common.pg.PgDatabase
    # Credentials of the test's own client when the services require TLS (None: plaintext).
    credentials: grpc.ChannelCredentials | None = None
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.hosts[service].bound_port}"

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self.channels:
            target = self.target(service)
            self.channels[service] = (
                grpc.aio.secure_channel(target, self.credentials)
                if self.credentials is not None
                else grpc.aio.insecure_channel(target)
            )
        return self.channels[service]

    async def healthy(self) -> bool:
        """Every process answers health and reports its service SERVING."""
        for name in self.hosts:
            stub = health_pb2_grpc.HealthStub(self.channel(name))
            for svc in ("", READINESS[name]):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
        return True

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        # analytics first: it holds channels to the other two
        for name in ("analytics", "memory", "llm_gateway"):
            if name in self.hosts:
                await self.hosts[name].drain_and_stop()
        await self.provider.stop()
        self.redis.stop()


def fast_stop(**overrides: Any) -> dict[str, Any]:
    return {"finsight_drain_delay_s": 0.0, "finsight_shutdown_grace_s": 2.0, **overrides}


async def start_stack(
    tmp: Path,
    *,
    memory: dict[str, Any] | None = None,
    analytics: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
    common: dict[str, Any] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Stack:
    """All three services with a private Redis and the dev provider. `common` applies to
    every service (e.g. TLS settings); `credentials` are the test client's under TLS."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys = write_stack_keys(tmp / "api-keys.json")
    redis = RedisProcess(tmp / "valkey")
    redis.start()
    provider = DevProvider()
    await provider.start()
    shared = fast_stop(**{"finsight_rate_limit_enabled": False, **(common or {})})
    hosts: dict[str, ServiceHost] = {}
    holder: dict[str, Any] = {}
    try:
        gw_values: dict[str, Any] = {
            "deepseek_api_key": DEFAULT_API_KEY,
            "deepseek_base_url": provider.root_url,
            "llm_gateway_retry_base_s": 0.01,
            "llm_gateway_retry_max_backoff_s": 0.05,
            "llm_gateway_rpm": 0,
            "llm_gateway_tpm": 0,
            **shared,
            **(gateway or {}),
        }
        gw_settings = make_settings(
            GatewaySettings, tmp / "gateway", redis.url, keys.base, **gw_values
        )
        hosts["llm_gateway"] = await start_service(gw_settings, gateway_main.setup)

        async def memory_setup(host: ServiceHost, r: Redis) -> None:
            holder["memory"] = await memory_main.build(host, r)

        mem_values: dict[str, Any] = {"memory_purge_interval_s": 0, **shared, **(memory or {})}
        mem_settings = make_settings(
            MemorySettings, tmp / "memory", redis.url, keys.base, **mem_values
        )
        hosts["memory"] = await start_service(
            mem_settings, memory_setup, policies=memory_main.POLICIES
        )

        async def analytics_setup(host: ServiceHost, r: Redis) -> None:
            await analytics_main.setup(host, r)
            holder["analytics_db"] = _find_db(host)

        an_values: dict[str, Any] = {
            "analytics_load_sample_data": False,
            "analytics_memory_target": f"127.0.0.1:{hosts['memory'].bound_port}",
            "analytics_llm_gateway_target": f"127.0.0.1:{hosts['llm_gateway'].bound_port}",
            **shared,
            **(analytics or {}),
        }
        an_settings = make_settings(
            AnalyticsSettings, tmp / "analytics", redis.url, keys.base, **an_values
        )
        hosts["analytics"] = await start_service(
            an_settings, analytics_setup, policies=analytics_main.POLICIES
        )
        stack = Stack(
            keys, redis, provider, hosts, holder["memory"], holder["analytics_db"], credentials
        )
        for name, host in hosts.items():
            await wait_for_serving(
                f"127.0.0.1:{host.bound_port}", READINESS[name], timeout=60, credentials=credentials
            )
        return stack
    except BaseException:
        for host in reversed(list(hosts.values())):
            await host.drain_and_stop()
        await provider.stop()
        redis.stop()
        raise


def _find_db(host: ServiceHost) -> Any:
    """The analytics database (DuckDB or PostgreSQL), reached through the cleanup
    registered by `setup`."""
    from libs.common.duck import Database
    from libs.common.pg import PgDatabase

    for cleanup in host._cleanups:
        owner = getattr(cleanup, "__self__", None)
        if isinstance(owner, Database | PgDatabase):
            return owner
    raise AssertionError("analytics database not found")


# -- data ------------------------------------------------------------------------------------
def _pb_date(d: date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def random_walk_series(symbol: str, days: int, seed: int) -> analytics_pb2.BarSeries:
    """Weekday bars of a seeded random walk (prices in micro-units)."""
    rnd = random.Random(seed)
    out = analytics_pb2.BarSeries(symbol=symbol)
    price = 100.0
    d = date(2023, 1, 2)
    while len(out.dates) < days:
        if d.weekday() < 5:
            price *= 1 + rnd.gauss(0.0003, 0.012)
            close = round(price * 1_000_000)
            high, low = round(close * 1.01), round(close * 0.99)
            out.dates.append(_pb_date(d))
            out.open_micros.append(close)
            out.high_micros.append(high)
            out.low_micros.append(low)
            out.close_micros.append(close)
            out.adj_close_micros.append(close)
            out.volumes.append(rnd.randint(1000, 10_000_000))
        d += timedelta(days=1)
    return out


async def ingest(
    stack: Stack, who: str, symbols: Sequence[str], days: int = 260
) -> analytics_pb2.IngestBarsResponse:
    from finsight.analytics.v1 import analytics_pb2_grpc

    stub = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))

    async def requests() -> Any:
        for i, s in enumerate(symbols):
            yield analytics_pb2.IngestBarsRequest(series=[random_walk_series(s, days, seed=i)])

    return await stub.IngestBars(requests(), metadata=stack.keys.md(who), timeout=30)


async def consent_and_remember(
    stack: Stack, who: str, user: str, facts: Sequence[memory_pb2.NewFact]
) -> list[str]:
    """Give `user` long-term-memory consent and store `facts`; the stored fact ids."""
    from finsight.memory.v1 import memory_pb2_grpc

    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    md = stack.keys.md(who)
    await mem.SetConsent(
        memory_pb2.SetConsentRequest(user_id=user, long_term_memory=True), metadata=md
    )
    reply = await mem.Remember(
        memory_pb2.RememberRequest(user_id=user, facts=list(facts)), metadata=md
    )
    return [f.fact_id for f in reply.facts]


# -- generic calls by descriptor ------------------------------------------------------------
def method_path(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


async def call_raw(
    channel: grpc.aio.Channel,
    service: ServiceDescriptor,
    method: MethodDescriptor,
    payload: bytes | Sequence[bytes],
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> tuple[grpc.StatusCode, list[bytes], grpc.aio.AioRpcError | None]:
    """Call any RPC with already-serialized request bytes; never raises for a status."""
    path = method_path(service, method)
    messages = [payload] if isinstance(payload, bytes) else list(payload)
    md = tuple(metadata)
    try:
        if method.client_streaming and not method.server_streaming:
            mc = channel.stream_unary(path)

            async def gen() -> Any:
                for m in messages:
                    yield m

            reply = await mc(gen(), metadata=md, timeout=timeout)
            return grpc.StatusCode.OK, [reply], None
        if method.server_streaming:
            call = channel.unary_stream(path)(messages[0], metadata=md, timeout=timeout)
            out = [item async for item in call]
            return grpc.StatusCode.OK, out, None
        reply = await channel.unary_unary(path)(messages[0], metadata=md, timeout=timeout)
        return grpc.StatusCode.OK, [reply], None
    except grpc.aio.AioRpcError as err:
        return err.code(), [], err


def every_method() -> list[tuple[str, ServiceDescriptor, MethodDescriptor]]:
    """(process, service, method) for every RPC the three processes serve."""
    return [
        (process, service, method)
        for process, services in SERVED.items()
        for service in services
        for method in service.methods
    ]


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)
