"""How the `finsight` CLI reaches the services: targets, key, TLS, rich errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
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


class KeyFileError(Exception):
    """`--key-file` names a file that cannot be used: a usage error (exit 2)."""


@dataclass
class Connection:
    """Where the services are and who the CLI is (same auth as any caller).

    The key: `--key-file` when given (a file that cannot be read is an error, never a silent
    fall-back to another key), else `FINSIGHT_API_KEY`, else `$FINSIGHT_DATA_DIR/dev-api-key`
    (default `./var/dev-api-key`, relative to the current directory, written by `make run`).
    `looked` says where it looked, for the error of a call that was refused.
    """

    host: str
    key: str | None
    ca_file: Path | None
    timeout: float
    key_source: str = ""
    looked: tuple[str, ...] = ()
    # Per-service "host:port" overrides; "*" is `--target` (the service a command calls).
    targets: dict[str, str] = field(default_factory=dict)
    last_service: str = ""  # the service of the last channel opened (for error hints)
    # The running command's flag behind a request field, for field violations: a user of
    # the CLI set a flag, not a field (the field stays in --json, the API's contract).
    field_flag: Callable[[str], str | None] = field(default=lambda _name: None, repr=False)

    @classmethod
    def from_env(
        cls,
        *,
        host: str | None,
        key_file: Path | None,
        ca_file: Path | None,
        timeout: float,
        targets: dict[str, str] | None = None,
    ) -> Connection:
        key, source, looked = _find_key(key_file)
        return cls(
            host or os.environ.get("FINSIGHT_HOST", "127.0.0.1"),
            key,
            ca_file,
            timeout,
            source,
            looked,
            dict(targets or {}),
        )

    def target(self, service: str) -> str:
        if service in self.targets:
            return self.targets[service]
        if "*" in self.targets:
            return self.targets["*"]
        port = os.environ.get(PORT_VARS[service], str(DEFAULT_PORTS[service]))
        return f"{self.host}:{port}"

    def channel(self, service: str) -> grpc.aio.Channel:
        self.last_service = service
        target = self.target(service)
        if self.ca_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
            return grpc.aio.secure_channel(target, creds)
        return grpc.aio.insecure_channel(target)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),) if self.key else ()


def _find_key(key_file: Path | None) -> tuple[str | None, str, tuple[str, ...]]:
    """The key, where it came from, and where the CLI looked (in order)."""
    if key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as err:
            raise KeyFileError(
                f"--key-file {key_file}: cannot read it ({err.strerror or err})"
            ) from err
        if not key:
            raise KeyFileError(f"--key-file {key_file}: the file is empty")
        return key, f"--key-file {key_file}", (f"--key-file {key_file}",)
    looked = []
    env_key = os.environ.get("FINSIGHT_API_KEY", "").strip()
    if env_key:
        return env_key, "FINSIGHT_API_KEY", ("FINSIGHT_API_KEY",)
    looked.append("FINSIGHT_API_KEY (not set)")
    looked.append("--key-file (not given)")
    dev = (Path(os.environ.get("FINSIGHT_DATA_DIR", "var")) / "dev-api-key").absolute()
    if dev.is_file():
        key = dev.read_text().strip()
        if key:
            return key, str(dev), (*looked, str(dev))
        looked.append(f"{dev} (empty)")
    else:
        looked.append(f"{dev} (not found: `make run` writes it, in the project directory)")
    return None, "", tuple(looked)


# How a channel reports that nothing answered (no server behind the address).
_NO_SERVER = ("failed to connect", "connection refused", "dns resolution failed", "unreachable")


def hints(info: StatusInfo, conn: Connection | None) -> list[str]:
    """What the CLI knows that the server's words do not say: where it looked for a key,
    which address it tried."""
    if conn is None:
        return []
    code = info.code.name
    if code == "UNAUTHENTICATED":
        if conn.key is None:
            return ["  no API key was sent; looked in: " + "; ".join(conn.looked)]
        return [f"  the key from {conn.key_source} was refused"]
    if code == "PERMISSION_DENIED" and conn.key_source:
        return [f"  (the key from {conn.key_source})"]
    text = info.message.lower()
    if code == "UNAVAILABLE" and not info.reason and any(w in text for w in _NO_SERVER):
        service = conn.last_service or "the service"
        flag = f"--{service.replace('_', '-')}-target" if conn.last_service else "--target"
        return [
            f"  nothing answered at {conn.target(service) if conn.last_service else conn.host} "
            f"({service}): is the suite running? Start it with `make run`, or point --host "
            f"or {flag} at it"
        ]
    return []


MAX_SHOWN_VIOLATIONS = 20


def describe_error(
    error: grpc.aio.AioRpcError, conn: Connection | None = None
) -> tuple[StatusInfo, list[str]]:
    """The status of a failed call in plain words, field violations included, and what the
    CLI knows about why (`hints`)."""
    info = status_info(error)
    lines = [f"{info.code.name}: {info.message}"]
    if info.reason and info.reason != info.code.name:
        lines[0] += f" (reason {info.reason})"
    lines += [f"  {key}: {value}" for key, value in sorted(info.metadata.items())]
    shown = info.field_violations[:MAX_SHOWN_VIOLATIONS]
    flag = conn.field_flag if conn is not None else (lambda _name: None)
    lines += [f"  - {flag(v.field) or v.field}: {v.description}" for v in shown]
    if len(info.field_violations) > len(shown):
        lines.append(f"  … and {len(info.field_violations) - len(shown)} more (see --json)")
    lines += [f"  - quota {q.subject}: {q.description}" for q in info.quota]
    if info.retry_after is not None:
        lines.append(f"  retry after {info.retry_after:.1f}s")
    lines += hints(info, conn)
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
