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
GROUNDING_FIGURES = Counter(
    "finsight_analytics_grounding_figures_total",
    "Figures of Analyze answers checked against the computed metrics, by commentary source "
    "(llm, rules) and result (verified, unverified).",
    ("source", "result"),
)
GROUNDING_OUTCOMES = Counter(
    "finsight_analytics_grounding_outcomes_total",
    "Grounding checks of Analyze answers, by policy (annotate, reject, off) and outcome "
    "(verified, annotated, rejected, skipped).",
    ("policy", "outcome"),
)
STRUCTURED_ANSWERS = Counter(
    "finsight_analytics_structured_answers_total",
    "Model answers asked for in the structured (cited) contract, by outcome (valid, "
    "repaired: by the gateway's repair round, mismatch: the rule-based answer replaced it, "
    "free_text: read as prose).",
    ("outcome",),
)
QUESTIONS_FLAGGED = Counter(
    "finsight_analytics_questions_flagged_total",
    "Analyze questions the instruction screen flagged, by signal.",
    ("signal",),
)
FACTOR_REGRESSIONS = Counter(
    "finsight_analytics_factor_regressions_total",
    "ComputeFactorExposure regressions computed (result-cache hits not counted), by subject "
    "(symbol, portfolio) and outcome (ok, collinear, invalid, not_found).",
    ("subject", "outcome"),
)
OPTIMIZATIONS = Counter(
    "finsight_analytics_optimizations_total",
    "OptimizePortfolio problems solved (result-cache hits not counted), by objective and "
    "outcome (optimal, infeasible, not_converged, invalid, error).",
    ("objective", "outcome"),
)
OPTIMIZATION_SECONDS = Histogram(
    "finsight_analytics_optimization_seconds",
    "Time of one OptimizePortfolio computation (read, estimate, solve, evaluate), by objective.",
    ("objective",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
