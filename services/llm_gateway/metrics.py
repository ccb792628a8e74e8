"""Domain metrics of the LLM gateway (the kit already counts RPCs by method and code).

Label values are bounded: providers, models and routes come from configuration, outcomes
from a fixed vocabulary; never a tenant or a request id.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 131072)

REQUESTS = Counter(
    "llm_gateway_requests_total",
    "Completions by provider, model and outcome (ok, cache_hit, or the final error reason).",
    ("provider", "model", "outcome"),
)
ATTEMPT_SECONDS = Histogram(
    "llm_gateway_attempt_seconds",
    "Duration of one provider attempt (streams: until the first token), by outcome.",
    ("provider", "model", "outcome"),
    buckets=_LATENCY,
)
TTFT_SECONDS = Histogram(
    "llm_gateway_time_to_first_token_seconds",
    "Streaming: time from the RPC's start to the first token sent.",
    ("provider", "model"),
    buckets=_LATENCY,
)
TOKENS = Counter(
    "llm_gateway_tokens_total",
    "Tokens billed by providers, by kind (prompt, completion, cached_prompt, reasoning).",
    ("provider", "model", "kind"),
)
COST_USD = Counter(
    "llm_gateway_cost_usd_total",
    "Cost of completions in USD (accounting uses exact integers).",
    ("provider", "model"),
)
CACHE = Counter(
    "llm_gateway_cache_total", "Response-cache lookups by result (hit, miss, error).", ("result",)
)
RETRIES = Counter(
    "llm_gateway_retries_total",
    "Retries after a failed attempt, by the attempt's outcome.",
    ("provider", "model", "outcome"),
)
FALLBACKS = Counter(
    "llm_gateway_fallbacks_total",
    "Moves to the next link of a route's chain.",
    ("route", "from_model", "to_model", "reason"),
)
BREAKER_STATE = Gauge(
    "llm_gateway_breaker_state",
    "Circuit state per provider: 0 closed, 1 open, 2 half-open.",
    ("provider",),
)
BREAKER_TRANSITIONS = Counter(
    "llm_gateway_breaker_transitions_total",
    "Circuit state changes per provider.",
    ("provider", "state"),
)
SHARED_BREAKER_STATE = Gauge(
    "llm_gateway_shared_breaker_state",
    "Circuit state shared by the gateway replicas, as this one last read it from Redis: "
    "-1 unknown (Redis unreachable: the local breaker decides alone), 0 closed, 1 open, "
    "2 half-open.",
    ("provider",),
)
KEY_COOLDOWNS = Counter(
    "llm_gateway_key_cooldowns_total",
    "A provider key (deployment) put to rest after a 429 (rate_limited) or 401/403 (auth); "
    "the provider's other keys keep serving.",
    ("provider", "key_id", "reason"),
)
KEY_REQUESTS = Counter(
    "llm_gateway_key_attempts_total",
    "Provider attempts by key (deployment) id and HTTP outcome (ok, http_<status>, timeout, "
    "connect, protocol): how the balancer spreads the load.",
    ("provider", "key_id", "outcome"),
)
SHARED_BREAKER_OPENS = Counter(
    "llm_gateway_shared_breaker_opens_total",
    "Shared circuits seen opening, by source: this_replica (its report crossed the "
    "threshold or its trial failed) or other_replica (read from Redis).",
    ("provider", "source"),
)
SHARED_BREAKER_REDIS_ERRORS = Counter(
    "llm_gateway_shared_breaker_redis_errors_total",
    "Redis operations of the shared breaker that failed (poll, report, trial); until the "
    "next good poll each replica decides on its local breakers alone.",
    ("operation",),
)
for _operation in ("poll", "report", "trial"):  # exported from start-up, for alerts
    SHARED_BREAKER_REDIS_ERRORS.labels(_operation)
LIMIT_REJECTIONS = Counter(
    "llm_gateway_limit_rejections_total",
    "Requests refused by a tenant limit (rpm, tpm, budget).",
    ("limit",),
)
TRUNCATIONS = Counter(
    "llm_gateway_truncations_total",
    "Prompts whose oldest turns were dropped to fit the window.",
    ("model",),
)
PII_REDACTIONS = Counter(
    "llm_gateway_pii_redactions_total",
    "Personal identifiers found in prompts, by kind and policy outcome (redacted, blocked, "
    "allowed).",
    ("kind", "outcome"),
)
# OpenTelemetry GenAI client metrics (semantic-convention names, labels and buckets);
# `gen_ai.client.token.usage` and `gen_ai.client.operation.duration` in OTLP terms.
_GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864
)  # fmt: skip
_GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92
)  # fmt: skip
_GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
GENAI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per provider call by gen_ai_token_type (input, output).",
    (*_GENAI_LABELS, "gen_ai_token_type"),
    buckets=_GENAI_TOKEN_BUCKETS,
)
GENAI_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of one provider call (streams: until the last chunk).",
    _GENAI_LABELS,
    buckets=_GENAI_DURATION_BUCKETS,
)
BUDGET_THRESHOLD_CROSSED = Counter(
    "llm_gateway_budget_threshold_crossed_total",
    "Tenants whose recorded cost reached a fraction (0.8, 1.0) of their daily budget, once "
    "per tenant, UTC day and threshold (the tenant is in the log line and the usage stream).",
    ("threshold",),
)
for _threshold in ("0.8", "1.0"):  # exported from start-up, so alerts see a zero series
    BUDGET_THRESHOLD_CROSSED.labels(_threshold)
PROMPT_TOKENS = Histogram(
    "llm_gateway_prompt_tokens",
    "Prompt tokens per request as counted by the gateway.",
    ("model",),
    buckets=_TOKENS,
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: `.labels()` takes a lock and builds a key on
    every call, several times per request on the hot path. Label values are bounded (see
    above), so is this cache."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found
