"""A real analytics service (DuckDB file, Redis, gRPC on an ephemeral port) for the suite.

One service per session with the sample data loaded into the shared data set (that load
is what a first `make run` does). Tests that write use their own symbols or their own
tenant, so they do not depend on each other's order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, start_service, wait_for_serving
from services.analytics.config import AnalyticsSettings
from services.analytics.main import POLICIES, setup
from tests.conftest import free_port, make_settings


@dataclass(frozen=True)
class AnalyticsKeys:
    path: Path
    writer_a: str = "k-writer-a-0001"  # tenant acme: analytics + analytics.write
    writer_b: str = "k-writer-b-0002"  # tenant globex: analytics + analytics.write
    reader_a: str = "k-reader-a-0003"  # tenant acme: analytics only (no write)
    narrow: str = "k-narrow-0004"  # tenant acme: no analytics scope

    def md(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)


def write_analytics_keys(path: Path) -> AnalyticsKeys:
    keys = AnalyticsKeys(path)
    rw = ["analytics", "analytics.write", "memory", "llm_gateway"]
    entries = [
        key_entry(keys.writer_a, caller="writer-a", tenant="acme", scopes=rw, key_id="wa"),
        key_entry(keys.writer_b, caller="writer-b", tenant="globex", scopes=rw, key_id="wb"),
        key_entry(
            keys.reader_a,
            caller="reader-a",
            tenant="acme",
            scopes=["analytics", "memory", "llm_gateway"],
            key_id="ra",
        ),
        key_entry(keys.narrow, caller="narrow", tenant="acme", scopes=["nothing"], key_id="n"),
    ]
    path.write_text(json.dumps({"keys": entries}))
    return keys


@dataclass
class Running:
    host: ServiceHost
    channel: grpc.aio.Channel
    stub: analytics_pb2_grpc.AnalyticsServiceAsyncStub
    keys: AnalyticsKeys
    settings: AnalyticsSettings

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.host.bound_port}"


async def start_analytics(
    tmp: Path, redis_url: str, keys: AnalyticsKeys, **overrides: Any
) -> Running:
    values: dict[str, Any] = {
        # Nothing listens there unless a test says otherwise: Analyze degrades.
        "analytics_memory_target": f"127.0.0.1:{free_port()}",
        "analytics_llm_gateway_target": f"127.0.0.1:{free_port()}",
        "finsight_rate_limit_rps": 10_000.0,
        "finsight_rate_limit_burst": 10_000,
        **overrides,
    }
    settings = make_settings(AnalyticsSettings, tmp, redis_url, keys, **values)  # type: ignore[arg-type]
    host = await start_service(settings, setup, policies=POLICIES)
    await wait_for_serving(f"127.0.0.1:{host.bound_port}", settings.full_service_name, timeout=90)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.bound_port}")
    stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
    return Running(host, channel, stub, keys, settings)


@pytest.fixture(scope="session")
async def analytics(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("analytics")
    keys = write_analytics_keys(tmp / "keys.json")
    running = await start_analytics(tmp, redis_url, keys)
    yield running
    await running.channel.close()
    await running.host.drain_and_stop()


def date_pb(text: str) -> Any:
    from google.type import date_pb2

    y, m, d = (int(x) for x in text.split("-"))
    return date_pb2.Date(year=y, month=m, day=d)


def series(
    symbol: str, rows: list[tuple[str, float, float, float, float, float, int]]
) -> pb.BarSeries:
    """A BarSeries from (date, open, high, low, close, adj_close, volume) rows (prices as text-exact floats)."""
    out = pb.BarSeries(symbol=symbol)
    for day, o, h, lo, c, a, v in rows:
        out.dates.append(date_pb(day))
        out.open_micros.append(round(o * 1_000_000))
        out.high_micros.append(round(h * 1_000_000))
        out.low_micros.append(round(lo * 1_000_000))
        out.close_micros.append(round(c * 1_000_000))
        out.adj_close_micros.append(round(a * 1_000_000))
        out.volumes.append(v)
    return out
