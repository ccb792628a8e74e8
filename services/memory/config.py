"""Settings of the memory service (environment variable = field name in upper case)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from libs.common.config import CommonSettings


class MemorySettings(CommonSettings):
    service_name: ClassVar[str] = "memory"
    full_service_name: ClassVar[str] = "finsight.memory.v1.MemoryService"

    memory_grpc_port: int = Field(50052, ge=0, le=65535)
    memory_metrics_port: int = Field(9102, ge=0, le=65535)
    memory_db_path: Path | None = Field(
        None, description="DuckDB file; default <data dir>/memory.duckdb"
    )

    @property
    def grpc_port(self) -> int:
        return self.memory_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.memory_metrics_port

    @property
    def db_path(self) -> Path:
        return self.memory_db_path or self.finsight_data_dir / "memory.duckdb"
