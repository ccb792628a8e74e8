"""Settings of the analytics service (environment variable = field name in upper case)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from libs.common.config import CommonSettings


class AnalyticsSettings(CommonSettings):
    service_name: ClassVar[str] = "analytics"
    full_service_name: ClassVar[str] = "finsight.analytics.v1.AnalyticsService"

    analytics_grpc_port: int = Field(50053, ge=0, le=65535)
    analytics_metrics_port: int = Field(9103, ge=0, le=65535)
    analytics_db_path: Path | None = Field(
        None, description="DuckDB file; default <data dir>/analytics.duckdb"
    )
    analytics_database_url: SecretStr | None = Field(
        None,
        description="postgresql:// URI of the production store (or ANALYTICS_DATABASE_URL_FILE); "
        "unset = the DuckDB file",
    )
    analytics_memory_target: str = Field(
        "dns:///127.0.0.1:50052", description="memory service address"
    )
    analytics_llm_gateway_target: str = Field(
        "dns:///127.0.0.1:50051", description="llm_gateway address"
    )

    analytics_load_sample_data: bool = Field(
        True, description="Load the bundled sample data into the shared data set when it is empty"
    )
    analytics_ingest_max_rows: int = Field(
        2_000_000,
        ge=1,
        le=100_000_000,
        description="Most rows one IngestBars stream may carry (buffered, ~100 bytes a row)",
    )
    analytics_series_cache_max_rows: int = Field(
        5_000_000,
        ge=0,
        le=500_000_000,
        description="Adjusted-close rows kept in process for metric requests (12 bytes a "
        "row; dropped when data changes; 0 = read the series from the database every time)",
    )
    analytics_cache_ttl_s: int = Field(
        3600, ge=0, le=7 * 86400, description="Lifetime of cached metric results (0 = no cache)"
    )
    analytics_context_token_budget: int = Field(
        4096, ge=256, le=131_072, description="Token budget of the memory context in Analyze"
    )
    analytics_answer_max_tokens: int = Field(
        800, ge=16, le=8192, description="Most completion tokens of an Analyze narrative"
    )
    analytics_llm_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Longest wait for the LLM gateway in Analyze"
    )
    analytics_llm_deadline_share: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="Share of the caller's remaining deadline the gateway may use in Analyze",
    )
    analytics_memory_timeout_s: float = Field(
        3.0, gt=0, le=60, description="Longest wait for each memory call in Analyze"
    )
    analytics_grounding_policy: Literal["annotate", "reject", "off"] = Field(
        "annotate",
        description="What Analyze does with an answer whose figures do not all match the "
        "computed metrics: annotate (return it, unverified figures listed and marked), reject "
        "(replace a model answer by the rule-based one), off (no check)",
    )
    analytics_structured_answers: bool = Field(
        True,
        description="Ask the model for a JSON answer citing the metric behind each figure "
        "(checked exactly); false for providers without JSON output",
    )

    @property
    def grpc_port(self) -> int:
        return self.analytics_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.analytics_metrics_port

    @property
    def db_path(self) -> Path:
        return self.analytics_db_path or self.finsight_data_dir / "analytics.duckdb"
