"""GenAI spans per provider attempt, domain metrics, and the retry/cost arithmetic."""

from __future__ import annotations

from decimal import Decimal

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from libs.common.tracing import configure_tracing
from libs.devprovider import DevProviderControl
from services.llm_gateway.pricing import Pricing, Usage
from services.llm_gateway.providers import ProviderError, parse_retry_after
from services.llm_gateway.retry import RetryPolicy
from tests.llm_gateway.conftest import Gw

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
        assert attrs["gen_ai.system"] == "deepseek"
        assert attrs["gen_ai.request.model"] == "deepseek-chat"
        assert attrs["gen_ai.request.max_tokens"] == 20
        assert attrs["gen_ai.request.temperature"] == 0.5
    assert failed["http.response.status_code"] == 503
    assert not first.status.is_ok
    assert ok["gen_ai.response.model"] == "deepseek-chat"
    assert ok["gen_ai.usage.input_tokens"] == 3
    assert ok["gen_ai.usage.output_tokens"] == 3
    # Both attempts belong to the RPC's trace.
    assert first.context is not None and second.context is not None
    assert first.context.trace_id == second.context.trace_id


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
