"""Domain metrics of the analytics service (Prometheus).

Named `telemetry` because `services.analytics.metrics` is the financial metric engine.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BARS_INGESTED = Counter(
    "finsight_analytics_bars_ingested_total",
    "Bars received by IngestBars, by outcome (inserted, updated, unchanged, rejected).",
    ("outcome",),
)
RESULT_CACHE = Counter(
    "finsight_analytics_result_cache_total",
    "Metric result cache lookups, by outcome (hit, miss, error).",
    ("outcome",),
)
COMMENTARY = Counter(
    "finsight_analytics_commentary_total",
    "Analyze answers, by commentary source (llm, rules) and fallback reason.",
    ("source", "reason"),
)
SAMPLE_LOAD_SECONDS = Histogram(
    "finsight_analytics_sample_load_seconds",
    "Time to load the sample data on first start.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120),
)
SAMPLE_LOADS = Counter(
    "finsight_analytics_sample_loads_total",
    "Sample data checks at start-up, by outcome (loaded: this replica wrote it; present: "
    "it was there, loaded before or by another replica).",
    ("outcome",),
)
