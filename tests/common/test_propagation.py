"""Trace context and deadlines cross service boundaries through the channel factory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.common.tracing import configure_tracing
from tests.common.conftest import Echo, start_echo
from tests.conftest import Keys

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


@pytest.fixture
async def pair(tmp_path: Path, redis_url: str, api_keys: Keys) -> AsyncIterator[tuple[Echo, Echo]]:
    downstream = await start_echo(tmp_path / "b", redis_url, api_keys)
    upstream = await start_echo(
        tmp_path / "a",
        redis_url,
        api_keys,
        echo_downstream=downstream.target,
        finsight_default_deadline_s=7.0,
    )
    yield upstream, downstream
    await upstream.close()
    await downstream.close()


async def test_one_trace_id_across_two_servers(pair: tuple[Echo, Echo], api_keys: Keys) -> None:
    upstream, _ = pair
    _EXPORTER.clear()
    reply = json.loads(
        await upstream.unary("Downstream")(
            b"", metadata=api_keys.metadata(api_keys.alice), timeout=5
        )
    )
    assert reply["trace_id"] and reply["trace_id"] == reply["downstream"]["trace_id"]
    spans = [
        s
        for s in _EXPORTER.get_finished_spans()
        if format(s.context.trace_id, "032x") == reply["trace_id"]
    ]
    names = sorted(s.name for s in spans)
    # server span upstream, client span upstream→downstream, server span downstream
    assert names.count("/test.v1.EchoService/WhoAmI") == 2
    assert "/test.v1.EchoService/Downstream" in names
    server_down = next(
        s for s in spans if s.name == "/test.v1.EchoService/WhoAmI" and s.kind.name == "SERVER"
    )
    client = next(
        s for s in spans if s.kind.name == "CLIENT" and s.name == "/test.v1.EchoService/WhoAmI"
    )  # (the rate limiter's Redis round trips are CLIENT spans too)
    assert server_down.parent is not None and server_down.parent.span_id == client.context.span_id


async def test_caller_identity_is_forwarded_downstream(
    pair: tuple[Echo, Echo], api_keys: Keys
) -> None:
    upstream, _ = pair
    reply = json.loads(
        await upstream.unary("Downstream")(b"", metadata=api_keys.metadata(api_keys.bob), timeout=5)
    )
    assert (reply["downstream"]["caller"], reply["downstream"]["tenant"]) == ("bob", "globex")


async def test_downstream_deadline_never_outlives_the_caller(
    pair: tuple[Echo, Echo], api_keys: Keys
) -> None:
    upstream, _ = pair
    reply = json.loads(
        await upstream.unary("Downstream")(
            b"", metadata=api_keys.metadata(api_keys.alice), timeout=1.5
        )
    )
    remaining = reply["downstream"]["remaining"]
    assert remaining is not None and 0.5 < remaining <= 1.5


async def test_default_cap_applies_when_caller_sets_no_deadline(
    pair: tuple[Echo, Echo], api_keys: Keys
) -> None:
    upstream, _ = pair
    reply = json.loads(
        await upstream.unary("Downstream")(b"", metadata=api_keys.metadata(api_keys.alice))
    )
    remaining = reply["downstream"]["remaining"]
    # The 7 s cap, read downstream from the propagated deadline: gRPC carries it with
    # millisecond rounding and the two sides read different clocks, so allow a hair above.
    assert remaining is not None and 5.0 < remaining <= 7.0 + 0.05
