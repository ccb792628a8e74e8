"""GenAI spans per provider attempt, domain metrics, and the retry/cost arithmetic."""

from __future__ import annotations

from decimal import Decimal

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from libs.common.tracing import build_resource, configure_tracing
from libs.devprovider import DevProvider, DevProviderControl
from services.llm_gateway.pricing import Pricing, Usage
from services.llm_gateway.providers import ProviderError, parse_retry_after
from services.llm_gateway.retry import RetryPolicy
from tests.llm_gateway.conftest import GatewayFactory, Gw
from tests.llm_gateway.test_stream import collect, stream

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_span_per_attempt_with_genai_attributes(
    gw: Gw, control: DevProviderControl
) -> None:
    _EXPORTER.clear()
    await control.script({"status": 503})
    await gw.complete("trace me", temperature=0.5, max_tokens=20)
    spans = [s for s in _EXPORTER.get_finished_spans() if s.name == "chat deepseek-chat"]
    assert len(spans) == 2
    first, second = sorted(
        spans, key=lambda s: str(dict(s.attributes or {})["finsight.llm.attempt"])
    )
    failed, ok = dict(first.attributes or {}), dict(second.attributes or {})
    for attrs in (failed, ok):
        assert attrs["gen_ai.provider.name"] == "deepseek"
        assert "gen_ai.system" not in attrs  # deprecated
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == "deepseek-chat"
        assert attrs["gen_ai.request.max_tokens"] == 20
        assert attrs["gen_ai.request.temperature"] == 0.5
        assert attrs["server.address"] == "127.0.0.1"
        assert isinstance(attrs["server.port"], int) and attrs["server.port"] > 0
    assert failed["http.response.status_code"] == 503
    assert failed["error.type"] == "http_503"
    assert not first.status.is_ok
    assert "gen_ai.response.id" not in failed
    assert ok["gen_ai.response.model"] == "deepseek-chat"
    assert ok["gen_ai.response.id"]
    assert ok["gen_ai.response.finish_reasons"] == ("stop",)
    assert ok["gen_ai.usage.input_tokens"] == 3
    assert ok["gen_ai.usage.output_tokens"] == 3
    assert isinstance(ok["finsight.llm.cost_usd"], float) and ok["finsight.llm.cost_usd"] > 0
    # Both attempts belong to the RPC's trace.
    assert first.context is not None and second.context is not None
    assert first.context.trace_id == second.context.trace_id


async def test_stream_span_carries_response_attributes(gw: Gw) -> None:
    _EXPORTER.clear()
    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "deepseek",
        "gen_ai_request_model": "deepseek-chat",
    }
    before = sample("gen_ai_client_operation_duration_seconds_count", **labels)
    text, end = await collect(stream(gw, "stream me"))
    assert text and end is not None
    (span,) = [s for s in _EXPORTER.get_finished_spans() if s.name == "chat deepseek-chat"]
    attrs = dict(span.attributes or {})
    assert attrs["finsight.llm.stream"] is True
    assert attrs["gen_ai.provider.name"] == "deepseek"
    assert attrs["gen_ai.response.id"]
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.output_tokens"] == end.usage.completion_tokens
    assert sample("gen_ai_client_operation_duration_seconds_count", **labels) == before + 1


async def test_genai_client_metrics(gw: Gw) -> None:
    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "deepseek",
        "gen_ai_request_model": "deepseek-chat",
    }
    before_in = sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input")
    before_out = sample("gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output")
    before_calls = sample("gen_ai_client_operation_duration_seconds_count", **labels)
    reply = await gw.complete("measure me")
    assert sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") == (
        before_in + reply.usage.prompt_tokens
    )
    assert (
        sample("gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output")
        == before_out + 1
    )
    assert sample("gen_ai_client_operation_duration_seconds_count", **labels) == before_calls + 1
    # The semconv bucket boundaries.
    assert bounds("gen_ai_client_token_usage") == [4.0**n for n in range(14)]
    assert bounds("gen_ai_client_operation_duration_seconds") == [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92
    ]  # fmt: skip


async def test_embed_attempt_spans_and_genai_metrics(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    from tests.llm_gateway.test_embed import embed, embedding_settings, unique

    gw = await gateway_with(**embedding_settings(provider.base_url))
    labels = {
        "gen_ai_operation_name": "embeddings",
        "gen_ai_provider_name": "devembed",
        "gen_ai_request_model": "dev-embed",
    }
    before_in = sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input")
    before_calls = sample("gen_ai_client_operation_duration_seconds_count", **labels)
    _EXPORTER.clear()
    await control.script({"status": 503})
    reply = await embed(gw, unique("trace", "these texts"), dimensions=32)
    spans = [s for s in _EXPORTER.get_finished_spans() if s.name == "embeddings dev-embed"]
    assert len(spans) == 2
    first, second = sorted(
        spans, key=lambda s: str(dict(s.attributes or {})["finsight.llm.attempt"])
    )
    failed, ok = dict(first.attributes or {}), dict(second.attributes or {})
    for attrs in (failed, ok):
        assert attrs["gen_ai.operation.name"] == "embeddings"
        assert attrs["gen_ai.provider.name"] == "devembed"
        assert attrs["gen_ai.request.model"] == "dev-embed"
        assert attrs["gen_ai.request.encoding_formats"] == ("float",)
        assert attrs["gen_ai.embeddings.dimension.count"] == 32
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == provider.port
        assert "gen_ai.request.max_tokens" not in attrs
    assert failed["error.type"] == "http_503"
    assert ok["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert "gen_ai.usage.output_tokens" not in ok
    assert ok["gen_ai.response.id"] and ok["gen_ai.response.model"] == "dev-embed"
    assert isinstance(ok["finsight.llm.cost_usd"], float) and ok["finsight.llm.cost_usd"] > 0
    # The RPC's own (server) span is the attempts' parent.
    parents = {s.parent.span_id for s in spans if s.parent is not None}
    assert len(parents) == 1
    assert sample("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") == (
        before_in + reply.usage.prompt_tokens
    )
    assert sample("gen_ai_client_operation_duration_seconds_count", **labels) == before_calls + 2
    assert (
        sample("llm_gateway_requests_total", provider="devembed", model="dev-embed", outcome="ok")
        >= 1
    )


def bounds(histogram: str) -> list[float]:
    les = {
        float(s.labels["le"])
        for metric in REGISTRY.collect()
        if metric.name == histogram
        for s in metric.samples
        if s.name == f"{histogram}_bucket"
    }
    return sorted(les - {float("inf")})


def test_resource_uses_kubernetes_names_and_current_semconv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "k8s.pod.name=llm-gateway-7d9-abc,k8s.namespace.name=finsight-prod,"
        "k8s.node.name=node-1,service.instance.id=finsight-prod.llm-gateway-7d9-abc.llm-gateway",
    )
    attrs = dict(build_resource("llm_gateway", release="1.2.3", environment="prod").attributes)
    assert attrs["service.name"] == "llm-gateway"
    assert attrs["service.namespace"] == "finsight"
    assert attrs["service.version"] == "1.2.3"
    assert attrs["deployment.environment.name"] == "prod"
    assert "deployment.environment" not in attrs
    assert attrs["k8s.pod.name"] == "llm-gateway-7d9-abc"
    assert attrs["k8s.namespace.name"] == "finsight-prod"
    assert attrs["k8s.node.name"] == "node-1"
    assert attrs["service.instance.id"] == "finsight-prod.llm-gateway-7d9-abc.llm-gateway"
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    plain = dict(build_resource("memory").attributes)
    assert plain["service.name"] == "memory"
    assert plain["service.instance.id"]  # a UUID per process outside Kubernetes
    assert build_resource("analytics").attributes["service.name"] == "analytics"


async def test_domain_metrics(gw: Gw, control: DevProviderControl) -> None:
    labels = {"provider": "deepseek", "model": "deepseek-chat"}
    before_ok = sample("llm_gateway_requests_total", **labels, outcome="ok")
    before_retry = sample("llm_gateway_retries_total", **labels, outcome="http_502")
    before_tokens = sample("llm_gateway_tokens_total", **labels, kind="completion")
    before_hit = sample("llm_gateway_cache_total", result="hit")
    await control.script({"status": 502})
    reply = await gw.complete("count me", temperature=0)
    await gw.complete("count me", temperature=0)
    assert sample("llm_gateway_requests_total", **labels, outcome="ok") == before_ok + 1
    assert sample("llm_gateway_retries_total", **labels, outcome="http_502") == before_retry + 1
    assert sample("llm_gateway_tokens_total", **labels, kind="completion") == (
        before_tokens + reply.usage.completion_tokens
    )
    assert sample("llm_gateway_cache_total", result="hit") == before_hit + 1
    assert sample("llm_gateway_breaker_state", provider="deepseek") == 0
    assert sample("llm_gateway_attempt_seconds_count", **labels, outcome="ok") > 0


def test_backoff_is_full_jitter_and_respects_retry_after_every_time() -> None:
    policy = RetryPolicy(max_retries=5, base_s=0.1, max_backoff_s=1.0, retry_after_cap_s=10)
    waits = [policy.wait_s(n, None) for n in range(1, 6) for _ in range(200)]
    assert min(waits) >= 0 and max(waits) <= 1.0
    assert max(policy.wait_s(1, None) for _ in range(200)) <= 0.1
    hinted = ProviderError("p", "429", status=429, retry_after=2.5)
    assert all(policy.wait_s(n, hinted) >= 2.5 for n in range(1, 6))
    assert policy.wait_s(1, ProviderError("p", "429", status=429, retry_after=60)) == 10


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None
    assert (parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT") or 0) > 50


def test_cost_is_exact_integer_nanos_per_token_class() -> None:
    p = Pricing(Decimal("0.028"), Decimal("0.28"), Decimal("0.42"))
    assert p.cost_nanos(Usage(prompt=1_000_000, completion=0)) == 280_000_000
    assert p.cost_nanos(Usage(prompt=1_000_000, cached_prompt=1_000_000)) == 28_000_000
    assert p.cost_nanos(Usage(completion=1_000_000)) == 420_000_000
    assert p.cost_nanos(Usage(prompt=1500, cached_prompt=1000, completion=300)) == (
        1000 * 28 + 500 * 280 + 300 * 420
    )
    odd = Pricing(Decimal("0.0375"), Decimal("0.15"), Decimal("0.6"))
    assert odd.cost_nanos(Usage(prompt=3, cached_prompt=3)) == 113  # 112.5 rounds half-up once
