"""Analyze end to end: real memory and gateway services in-process, the dev LLM provider
over real HTTP, and the rule-based fallback when the gateway fails, is too slow or is gone.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.memory.v1 import memory_pb2, memory_pb2_grpc
from libs.common.errors import status_info
from libs.common.server import ServiceHost, start_service
from libs.common.tracing import configure_tracing
from services.analytics import metrics as engine
from services.analytics.commentary import rules_commentary
from services.analytics.file_bars import group_by_symbol
from services.analytics.importer import read_bars
from services.analytics.sample_loader import SAMPLE_DIR
from services.llm_gateway.config import GatewaySettings
from services.llm_gateway.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.main import setup as gateway_setup
from services.memory.config import MemorySettings
from services.memory.main import POLICIES as MEMORY_POLICIES
from services.memory.main import setup as memory_setup
from tests.analytics.conftest import Running, start_analytics, write_analytics_keys
from tests.analytics.test_service_metrics import columns
from tests.conftest import make_settings

SYMBOLS = ["AAPL", "MSFT"]
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


QUESTION = "Which of the two had the better risk-adjusted return?"


@dataclass
class Stack:
    analytics: Running
    memory_host: ServiceHost
    gateway_host: ServiceHost
    provider: DevProvider
    control: DevProviderControl

    def memory_stub(self) -> tuple[grpc.aio.Channel, memory_pb2_grpc.MemoryServiceStub]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.memory_host.bound_port}")
        return channel, memory_pb2_grpc.MemoryServiceStub(channel)


def sample_series() -> list[pb.BarSeries]:
    bars = read_bars(SAMPLE_DIR / "sp500_dataset.csv.gz", layout="wide").bars
    bars += read_bars(SAMPLE_DIR / "sp500_index.csv.gz", layout="wide").bars
    groups, _ = group_by_symbol([b for b in bars if b.symbol in {*SYMBOLS, "SP500"}])
    out = []
    for g in groups:
        s = pb.BarSeries(symbol=g.symbol)
        for day in g.days:
            s.dates.add(year=day.year, month=day.month, day=day.day)
        s.open_micros.extend(g.open)
        s.high_micros.extend(g.high)
        s.low_micros.extend(g.low)
        s.close_micros.extend(g.close)
        s.adj_close_micros.extend(g.adj_close)
        s.volumes.extend(g.volume)
        out.append(s)
    return out


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("analyze")
    keys = write_analytics_keys(tmp / "keys.json")
    async with DevProvider() as provider, DevProviderControl(provider.base_url) as control:
        (tmp / "mem").mkdir()
        (tmp / "gw").mkdir()
        memory_host = await start_service(
            make_settings(
                MemorySettings, tmp / "mem", redis_url, keys,  # type: ignore[arg-type]
                finsight_rate_limit_enabled=False, memory_redis_prefix=f"t-{tmp.name}",
                memory_purge_interval_s=0,
            ),
            memory_setup,
            policies=MEMORY_POLICIES,
        )  # fmt: skip
        gateway_host = await start_service(
            make_settings(
                GatewaySettings, tmp / "gw", redis_url, keys,  # type: ignore[arg-type]
                finsight_rate_limit_enabled=False, deepseek_api_key=DEFAULT_API_KEY,
                deepseek_base_url=provider.root_url, llm_gateway_retry_base_s=0.01,
                llm_gateway_retry_max_backoff_s=0.05, llm_gateway_attempt_timeout_s=5.0,
                llm_gateway_breaker_fail_max=1000,
            ),
            gateway_setup,
        )  # fmt: skip
        analytics = await start_analytics(
            tmp,
            redis_url,
            keys,
            analytics_load_sample_data=False,
            analytics_memory_target=f"127.0.0.1:{memory_host.bound_port}",
            analytics_llm_gateway_target=f"127.0.0.1:{gateway_host.bound_port}",
        )
        reply = await analytics.stub.IngestBars(
            iter([pb.IngestBarsRequest(series=sample_series())]),
            metadata=keys.md(keys.writer_a),
        )
        assert reply.inserted == 3 * 8313
        yield Stack(analytics, memory_host, gateway_host, provider, control)
        await analytics.channel.close()
        await analytics.host.drain_and_stop()
        await gateway_host.drain_and_stop()
        await memory_host.drain_and_stop()


def expected_rules() -> str:
    prices, dates = columns([*SYMBOLS, "SP500"])
    metrics = engine.compute_metrics(
        prices[:, :2], dates, SYMBOLS, benchmark=prices[:, 2], benchmark_symbol="SP500"
    )
    return rules_commentary(metrics, "SP500")


def request(session: str, **fields: object) -> pb.AnalyzeRequest:
    values: dict[str, object] = {
        "session_id": session, "user_id": "u-1", "symbols": SYMBOLS, "question": QUESTION,
        "benchmark": "SP500",
    }  # fmt: skip
    values.update(fields)
    return pb.AnalyzeRequest(**values)  # type: ignore[arg-type]


async def test_llm_answers_from_the_computed_numbers_and_memory_keeps_the_exchange(
    stack: Stack,
) -> None:
    await stack.control.reset()
    a = stack.analytics
    md = a.keys.md(a.keys.reader_a)
    reply = await a.stub.Analyze(request("sess-llm"), metadata=md, timeout=20)
    assert reply.commentary_source == pb.COMMENTARY_SOURCE_LLM
    assert list(reply.warnings) == []
    assert reply.narrative == f"echo: {QUESTION}"  # the dev provider echoes the last user turn
    assert reply.model == "deepseek-chat"
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens > reply.usage.prompt_tokens
    assert re.fullmatch(r"[0-9a-f]{32}", reply.trace_id)
    assert [m.symbol for m in reply.metrics] == SYMBOLS

    # What the model was given: our instructions, the computed numbers, then the question.
    sent = (await stack.control.requests())[-1]["body"]["messages"]
    assert sent[0]["role"] == "system" and "Use only the numbers" in sent[0]["content"]
    numbers = next(m["content"] for m in sent if m["content"].startswith("METRICS"))
    aapl = reply.metrics[0]
    assert f"Sharpe {aapl.sharpe:.3f}" in numbers
    assert f"CAGR {aapl.cagr * 100:+.2f}%" in numbers
    assert f"beta {aapl.relative.beta:.3f}" in numbers
    assert sent[-1] == {"role": "user", "content": QUESTION}

    channel, memory = stack.memory_stub()
    async with channel:
        history = await memory.GetHistory(
            memory_pb2.GetHistoryRequest(session_id="sess-llm", user_id="u-1"), metadata=md
        )
    assert [(m.message.role, m.message.content) for m in history.messages] == [
        (2, QUESTION),
        (3, reply.narrative),
    ]
    assert history.messages[1].metadata["commentary_source"] == "llm"

    # One trace across the three services: the memory and gateway server spans share it.
    names = {
        s.name for s in _EXPORTER.get_finished_spans()
        if format(s.context.trace_id, "032x") == reply.trace_id
    }  # fmt: skip
    assert {
        "/finsight.analytics.v1.AnalyticsService/Analyze",
        "/finsight.memory.v1.MemoryService/BuildContext",
        "/finsight.memory.v1.MemoryService/AppendMessages",
        "/finsight.llm.v1.LlmGatewayService/Complete",
        "analytics.compute_metrics",
        "analytics.analyze.complete",
    } <= names

    # The next turn of the same session carries the previous exchange as context.
    await a.stub.Analyze(request("sess-llm", question="And the drawdowns?"), metadata=md)
    sent = (await stack.control.requests())[-1]["body"]["messages"]
    contents = [m["content"] for m in sent]
    assert QUESTION in contents and reply.narrative in contents
    assert contents[-1] == "And the drawdowns?"


async def test_gateway_failure_falls_back_to_rules(stack: Stack) -> None:
    a = stack.analytics
    await stack.control.set_default({"status": 503})
    try:
        reply = await a.stub.Analyze(
            request("sess-503", question="Is the 503 case handled?"),
            metadata=a.keys.md(a.keys.reader_a),
            timeout=20,
        )
    finally:
        await stack.control.reset()
    assert reply.commentary_source == pb.COMMENTARY_SOURCE_RULES
    assert reply.narrative == expected_rules()
    assert reply.model == "" and not reply.HasField("usage")
    assert [w.split(":")[0] for w in reply.warnings] == ["llm_unavailable"]
    assert "UNAVAILABLE" in reply.warnings[0]


async def test_a_slow_gateway_is_cut_at_its_share_of_the_deadline(stack: Stack) -> None:
    a = stack.analytics
    await stack.control.set_default({"delay_ms": 10_000})
    started = time.monotonic()
    try:
        reply = await a.stub.Analyze(
            request("sess-slow", question="Is a slow gateway cut?"),
            metadata=a.keys.md(a.keys.reader_a),
            timeout=3.0,
        )
    finally:
        await stack.control.reset()
    elapsed = time.monotonic() - started
    assert reply.commentary_source == pb.COMMENTARY_SOURCE_RULES
    assert elapsed < 3.0
    assert reply.warnings[0].startswith("llm_unavailable: DEADLINE_EXCEEDED")
    # The answer was still stored: the fallback left time for memory.
    channel, memory = stack.memory_stub()
    async with channel:
        history = await memory.GetHistory(
            memory_pb2.GetHistoryRequest(session_id="sess-slow", user_id="u-1"),
            metadata=a.keys.md(a.keys.reader_a),
        )
    assert [m.message.content for m in history.messages] == [
        "Is a slow gateway cut?",
        reply.narrative,
    ]


async def test_analyze_without_memory_and_gateway_still_answers(analytics: Running) -> None:
    """The session service points at ports where nothing listens."""
    reply = await analytics.stub.Analyze(
        request("sess-dark"), metadata=analytics.keys.md(analytics.keys.reader_a), timeout=20
    )
    assert reply.commentary_source == pb.COMMENTARY_SOURCE_RULES
    assert reply.narrative == expected_rules()
    assert [w.split(":")[0] for w in reply.warnings] == [
        "memory_context_unavailable",
        "llm_unavailable",
        "memory_store_failed",
    ]
    assert np.isfinite(reply.metrics[0].sharpe)
    # The channels now know both are unreachable: the next Analyze degrades without
    # calling (and waiting out the retry policy's backoff), with the same answer.
    again = await analytics.stub.Analyze(
        request("sess-dark"), metadata=analytics.keys.md(analytics.keys.reader_a), timeout=20
    )
    assert again.narrative == reply.narrative
    assert [w.split(": ", 1)[1].split(":")[0] for w in again.warnings] == [
        "UNAVAILABLE UNREACHABLE"
    ] * 3


async def test_bad_analyze_requests_name_the_field(analytics: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.Analyze(
            pb.AnalyzeRequest(session_id="bad id", user_id="", symbols=[], question=""),
            metadata=analytics.keys.md(analytics.keys.reader_a),
        )
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(v.field for v in info.field_violations) == [
        "question", "session_id", "symbols", "user_id"]  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.Analyze(
            request("sess-x", symbols=["NOSUCH"]),
            metadata=analytics.keys.md(analytics.keys.reader_a),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_no_llm_provider_configured_gives_rules_commentary(
    tmp_path: Path, redis_url: str
) -> None:
    keys = write_analytics_keys(tmp_path / "keys.json")
    (tmp_path / "gw").mkdir()
    gateway_host = await start_service(
        make_settings(
            GatewaySettings, tmp_path / "gw", redis_url, keys,  # type: ignore[arg-type]
            finsight_rate_limit_enabled=False,
        ),
        gateway_setup,
    )  # fmt: skip
    analytics = await start_analytics(
        tmp_path,
        redis_url,
        keys,
        analytics_load_sample_data=False,
        analytics_llm_gateway_target=f"127.0.0.1:{gateway_host.bound_port}",
    )
    try:
        await analytics.stub.IngestBars(
            iter([pb.IngestBarsRequest(series=sample_series())]),
            metadata=keys.md(keys.writer_a),
        )
        reply = await analytics.stub.Analyze(
            # A question of its own: the gateway's response cache (shared Redis) would
            # otherwise answer a prompt another test already sent.
            request("sess-none", question="What if no provider is configured?"),
            metadata=keys.md(keys.reader_a),
            timeout=20,
        )
    finally:
        await analytics.channel.close()
        await analytics.host.drain_and_stop()
        await gateway_host.drain_and_stop()
    assert reply.commentary_source == pb.COMMENTARY_SOURCE_RULES
    assert reply.narrative == expected_rules()
    llm = next(w for w in reply.warnings if w.startswith("llm_unavailable"))
    assert "FAILED_PRECONDITION NO_PROVIDER_CONFIGURED" in llm
