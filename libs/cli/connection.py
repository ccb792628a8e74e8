"""How the `finsight` CLI reaches the services: targets, key, TLS, rich errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from libs.common.errors import StatusInfo, status_info

DEFAULT_PORTS = {"llm_gateway": 50051, "memory": 50052, "analytics": 50053}
PORT_VARS = {
    "llm_gateway": "LLM_GATEWAY_GRPC_PORT",
    "memory": "MEMORY_GRPC_PORT",
    "analytics": "ANALYTICS_GRPC_PORT",
}
HEALTH_NAMES = {
    "llm_gateway": "finsight.llm.v1.LlmGatewayService",
    "memory": "finsight.memory.v1.MemoryService",
    "analytics": "finsight.analytics.v1.AnalyticsService",
}


@dataclass(frozen=True)
class Connection:
    """Where the services are and who the CLI is (same auth as any caller)."""

    host: str
    key: str | None
    ca_file: Path | None
    timeout: float

    @classmethod
    def from_env(
        cls, *, host: str | None, key_file: Path | None, ca_file: Path | None, timeout: float
    ) -> Connection:
        key = os.environ.get("FINSIGHT_API_KEY")
        data_dir = Path(os.environ.get("FINSIGHT_DATA_DIR", "var"))
        for candidate in (key_file, data_dir / "dev-api-key"):
            if not key and candidate is not None and candidate.is_file():
                key = candidate.read_text().strip()
        return cls(host or os.environ.get("FINSIGHT_HOST", "127.0.0.1"), key, ca_file, timeout)

    def target(self, service: str) -> str:
        port = os.environ.get(PORT_VARS[service], str(DEFAULT_PORTS[service]))
        return f"{self.host}:{port}"

    def channel(self, service: str) -> grpc.aio.Channel:
        target = self.target(service)
        if self.ca_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
            return grpc.aio.secure_channel(target, creds)
        return grpc.aio.insecure_channel(target)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),) if self.key else ()


MAX_SHOWN_VIOLATIONS = 20


def describe_error(error: grpc.aio.AioRpcError) -> tuple[StatusInfo, list[str]]:
    """The status of a failed call in plain words, field violations included."""
    info = status_info(error)
    lines = [f"{info.code.name}: {info.message}"]
    if info.reason and info.reason != info.code.name:
        lines[0] += f" (reason {info.reason})"
    lines += [f"  {key}: {value}" for key, value in sorted(info.metadata.items())]
    shown = info.field_violations[:MAX_SHOWN_VIOLATIONS]
    lines += [f"  - {v.field}: {v.description}" for v in shown]
    if len(info.field_violations) > len(shown):
        lines.append(f"  … and {len(info.field_violations) - len(shown)} more (see --json)")
    lines += [f"  - quota {q.subject}: {q.description}" for q in info.quota]
    if info.retry_after is not None:
        lines.append(f"  retry after {info.retry_after:.1f}s")
    return info, lines


def error_json(info: StatusInfo) -> dict[str, Any]:
    """The `--json` form of a failed call: every detail, nothing cut."""
    return {
        "error": {
            "code": info.code.name,
            "message": info.message,
            "reason": info.reason,
            "metadata": info.metadata,
            "field_violations": [
                {"field": v.field, "description": v.description} for v in info.field_violations
            ],
            "quota_violations": [
                {"subject": q.subject, "description": q.description} for q in info.quota
            ],
            "retry_after_s": info.retry_after,
        }
    }
