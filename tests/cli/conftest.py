"""The whole suite in-process for the CLI: real gateway (dev provider over HTTP), memory and
analytics on ephemeral ports, wired to each other as `make run` wires them.

The CLI's `main([...])` runs in a worker thread (`run_cli`): it starts its own event loop
with `asyncio.run`, as it does from a terminal, while the services keep serving on the
test session's loop. The stack is started once per session; every test uses symbols and
users of its own. The identities belong to a tenant of this run only, so the shared Redis
server (usage ledger, result cache) holds nothing another test module wrote for them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.cli.main import main
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, start_service, wait_for_serving
from libs.devprovider import DEFAULT_API_KEY, DevProvider
from services.analytics.config import AnalyticsSettings
from services.analytics.main import POLICIES as ANALYTICS_POLICIES
from services.analytics.main import setup as analytics_setup
from services.llm_gateway.config import GatewaySettings
from services.llm_gateway.main import setup as gateway_setup
from services.memory.config import MemorySettings
from services.memory.main import POLICIES as MEMORY_POLICIES
from services.memory.main import setup as memory_setup
from tests.conftest import make_settings, weekdays

# Synthetic daily prices the analytics service is loaded with (the sample data is off: it
# takes seconds to load and tests must not depend on its contents).
SYMBOLS = ("CLIX", "CLIY", "CLIZ")
BENCHMARK = "CLIBM"
FIRST_DAY = date(2023, 1, 2)
DAYS = 260


@dataclass(frozen=True)
class CliKeys:
    path: Path
    tenant: str
    admin: str  # scope *: what a developer's key from `make run` can do
    reader: str  # no analytics.write: IngestBars is refused


@dataclass
class Stack:
    keys: CliKeys
    ports: dict[str, int]
    hosts: list[ServiceHost]
    provider: DevProvider

    def env(self, monkeypatch: pytest.MonkeyPatch, key: str | None = None) -> None:
        monkeypatch.setenv("LLM_GATEWAY_GRPC_PORT", str(self.ports["llm_gateway"]))
        monkeypatch.setenv("MEMORY_GRPC_PORT", str(self.ports["memory"]))
        monkeypatch.setenv("ANALYTICS_GRPC_PORT", str(self.ports["analytics"]))
        monkeypatch.setenv("FINSIGHT_API_KEY", key or self.keys.admin)
        monkeypatch.delenv("FINSIGHT_HOST", raising=False)
        monkeypatch.setenv("COLUMNS", "220")  # rich tables: no wrapped or cut cells


def write_cli_keys(path: Path) -> CliKeys:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    keys = CliKeys(path, tenant, admin=f"k-cli-admin-{tenant}", reader=f"k-cli-reader-{tenant}")
    entries = [
        key_entry(keys.admin, caller="cli-admin", tenant=tenant, scopes=["*"], key_id="a"),
        key_entry(
            keys.reader,
            caller="cli-reader",
            tenant=tenant,
            scopes=["analytics", "memory", "llm_gateway"],
            key_id="r",
        ),
    ]
    path.write_text(json.dumps({"keys": entries}))
    return keys


def trading_days(n: int) -> list[date]:
    return weekdays(FIRST_DAY, n)


def synthetic_closes(seed: int, n: int) -> list[int]:
    """A random walk of closes in micro-units (prices with 4 decimals)."""
    rng = np.random.default_rng(seed)
    prices = 100.0 * np.cumprod(1.0 + rng.normal(0.0004, 0.015, n))
    return [int(round(p, 4) * 1_000_000) for p in prices]


def bar_series(symbol: str, days: list[date], closes: list[int]) -> pb.BarSeries:
    s = pb.BarSeries(symbol=symbol)
    for d in days:
        s.dates.add(year=d.year, month=d.month, day=d.day)
    s.open_micros.extend(closes)
    s.high_micros.extend(c + 500_000 for c in closes)
    s.low_micros.extend(c - 500_000 for c in closes)
    s.close_micros.extend(closes)
    s.adj_close_micros.extend(closes)
    s.volumes.extend(1_000 for _ in closes)
    return s


async def load_prices(port: int, key: str) -> None:
    import grpc

    days = trading_days(DAYS)
    series = [
        bar_series(symbol, days, synthetic_closes(seed, DAYS))
        for seed, symbol in enumerate((*SYMBOLS, BENCHMARK))
    ]

    async def requests() -> AsyncIterator[pb.IngestBarsRequest]:
        yield pb.IngestBarsRequest(series=series)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await analytics_pb2_grpc.AnalyticsServiceStub(channel).IngestBars(
            requests(), metadata=(("authorization", f"Bearer {key}"),), timeout=30
        )
    assert reply.inserted == DAYS * (len(SYMBOLS) + 1), reply


def port_of(host: ServiceHost) -> int:
    assert host.bound_port is not None
    return host.bound_port


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("cli")
    keys = write_cli_keys(tmp / "keys.json")
    hosts: list[ServiceHost] = []
    async with DevProvider() as provider:
        try:
            gateway = await start_service(
                make_settings(
                    GatewaySettings,
                    tmp / "gw",
                    redis_url,
                    keys,  # type: ignore[arg-type]
                    deepseek_api_key=DEFAULT_API_KEY,
                    deepseek_base_url=provider.root_url,
                    llm_gateway_daily_budget_usd="5",
                    llm_gateway_retry_base_s=0.01,
                    llm_gateway_retry_max_backoff_s=0.05,
                    # `finsight embed`: an embedding model on the dev provider.
                    llm_gateway_models={
                        "dev-embed": {
                            "kind": "embedding",
                            "provider": "deepseek",
                            "input_per_mtok": "0.02",
                            "dimensions": 64,
                        }
                    },
                    llm_gateway_routes={"embed": {"models": ["dev-embed"]}},
                    llm_gateway_default_embedding_route="embed",
                ),
                gateway_setup,
            )
            hosts.append(gateway)
            memory = await start_service(
                make_settings(
                    MemorySettings,
                    tmp / "memory",
                    redis_url,
                    keys,  # type: ignore[arg-type]
                    memory_redis_prefix=f"t-{keys.tenant}",
                    memory_purge_interval_s=0,
                    finsight_rate_limit_enabled=False,
                ),
                memory_setup,
                policies=MEMORY_POLICIES,
            )
            hosts.append(memory)
            analytics_settings = make_settings(
                AnalyticsSettings,
                tmp / "analytics",
                redis_url,
                keys,  # type: ignore[arg-type]
                analytics_memory_target=f"127.0.0.1:{memory.bound_port}",
                analytics_llm_gateway_target=f"127.0.0.1:{gateway.bound_port}",
                analytics_load_sample_data=False,
                # The dev provider echoes the question: plain text keeps the answers
                # readable here (the structured contract is tested in test_analyze.py).
                analytics_structured_answers=False,
                finsight_rate_limit_enabled=False,
            )
            analytics = await start_service(
                analytics_settings, analytics_setup, policies=ANALYTICS_POLICIES
            )
            hosts.append(analytics)
            for host, name in (
                (gateway, GatewaySettings.full_service_name),
                (memory, MemorySettings.full_service_name),
                (analytics, AnalyticsSettings.full_service_name),
            ):
                await wait_for_serving(f"127.0.0.1:{host.bound_port}", name, timeout=60)
            ports = {
                "llm_gateway": port_of(gateway),
                "memory": port_of(memory),
                "analytics": port_of(analytics),
            }
            await load_prices(ports["analytics"], keys.admin)
            yield Stack(keys, ports, hosts, provider)
        finally:
            for host in reversed(hosts):
                await host.drain_and_stop()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Any]:
    """`await cli("metrics", "CLIX", key=...)`: the CLI's main() against the stack."""
    stack.env(monkeypatch)

    async def run(*argv: str, key: str | None = None) -> Result:
        if key is not None:
            monkeypatch.setenv("FINSIGHT_API_KEY", key)
        capsys.readouterr()  # start clean
        code = await asyncio.to_thread(main, list(argv))
        captured = capsys.readouterr()
        if key is not None:
            monkeypatch.setenv("FINSIGHT_API_KEY", stack.keys.admin)
        return Result(code, captured.out, captured.err)

    yield run
