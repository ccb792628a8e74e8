"""Settings of the analytics service (environment variable = field name in upper case)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from libs.common.config import CommonSettings


class AnalyticsSettings(CommonSettings):
    service_name: ClassVar[str] = "analytics"
    full_service_name: ClassVar[str] = "finsight.analytics.v1.AnalyticsService"

    analytics_grpc_port: int = Field(50053, ge=0, le=65535)
    analytics_metrics_port: int = Field(9103, ge=0, le=65535)
    analytics_db_path: Path | None = Field(
        None, description="DuckDB file; default <data dir>/analytics.duckdb"
    )
    analytics_memory_target: str = Field(
        "dns:///127.0.0.1:50052", description="memory service address"
    )
    analytics_llm_gateway_target: str = Field(
        "dns:///127.0.0.1:50051", description="llm_gateway address"
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
