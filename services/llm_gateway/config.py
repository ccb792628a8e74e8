"""Settings of the LLM gateway (environment variable = field name in upper case)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.config import CommonSettings


class GatewaySettings(CommonSettings):
    service_name: ClassVar[str] = "llm_gateway"
    full_service_name: ClassVar[str] = "finsight.llm.v1.LlmGatewayService"

    llm_gateway_grpc_port: int = Field(50051, ge=0, le=65535)
    llm_gateway_metrics_port: int = Field(9101, ge=0, le=65535)

    @property
    def grpc_port(self) -> int:
        return self.llm_gateway_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.llm_gateway_metrics_port
