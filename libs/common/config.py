"""Typed settings for every service, validated once at start-up.

Each setting is an environment variable whose name is the field name in upper
case (`MEMORY_GRPC_PORT`), so `.env.example`, the Kubernetes ConfigMaps and
this module name things the same way. A secret may instead be read from a file
named by `<NAME>_FILE` (Kubernetes Secret mounts). Invalid configuration is
reported all at once, in one message, and the process exits non-zero.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Environment = Literal["dev", "staging", "prod"]

# Values that mark a secret as "not really set": refused in prod.
PLACEHOLDER_MARKERS = ("changeme", "change-me", "placeholder", "replace-me", "example", "xxxx")


class ConfigError(Exception):
    """Configuration is invalid; `str()` is the readable, complete report."""


class FileSecretSource(PydanticBaseSettingsSource):
    """`<NAME>_FILE=/path` supplies the value of secret field `<NAME>` from that file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(f"{field_name.upper()}_FILE")
        if not path or not _is_secret(field):
            return None, field_name, False
        try:
            return Path(path).read_text(encoding="utf-8").strip(), field_name, False
        except OSError as exc:
            raise ValueError(
                f"{field_name.upper()}_FILE: cannot read {path}: {exc.strerror}"
            ) from exc

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                out[key] = value
        return out


def _is_secret(field: FieldInfo) -> bool:
    return field.annotation is SecretStr or "SecretStr" in str(field.annotation)


class CommonSettings(BaseSettings):
    """Settings every service reads. Field name = environment variable name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Which service this model configures, e.g. "memory"; set by subclasses.
    service_name: ClassVar[str] = ""
    # The gRPC full service name reported as the readiness health name.
    full_service_name: ClassVar[str] = ""

    finsight_env: Environment = Field(
        "dev", description="dev, staging or prod; prod refuses insecure settings"
    )
    finsight_data_dir: Path = Field(
        Path("var"), description="Local data directory (DuckDB files, dev keys)"
    )
    finsight_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    finsight_bind_host: str = Field(
        "127.0.0.1", description="Interface the gRPC and metrics ports bind to"
    )
    finsight_release: str = Field("dev", description="Release tag reported in logs and traces")

    redis_password: SecretStr | None = Field(
        None, description="Redis password, kept out of REDIS_URL (use REDIS_PASSWORD_FILE in k8s)"
    )
    redis_url: str | None = Field(
        None, description="redis:// URL; unset: `make run` starts an embedded server"
    )
    finsight_redis_max_connections: int = Field(64, ge=1, le=10_000)
    finsight_redis_timeout_s: float = Field(0.5, gt=0, le=30)

    finsight_auth_enabled: bool = True
    finsight_api_keys_file: Path | None = Field(None, description="JSON file of hashed API keys")
    finsight_auth_exempt_health: bool = Field(True, description="Health and reflection need no key")
    finsight_service_api_key: SecretStr | None = Field(
        None,
        description="Key this service presents downstream when it has no caller key to forward",
    )

    finsight_tls_cert_file: Path | None = None
    finsight_tls_key_file: Path | None = None
    finsight_tls_client_ca_file: Path | None = Field(
        None, description="Set to require client certificates (mTLS)"
    )
    finsight_tls_ca_file: Path | None = Field(
        None, description="CA that signs the servers this service calls"
    )
    finsight_allow_plaintext: bool = Field(
        False, description="Allow no TLS in prod (e.g. behind a mesh)"
    )

    finsight_rate_limit_enabled: bool = True
    finsight_rate_limit_rps: float = Field(
        200.0, gt=0, description="Sustained requests/s per caller and method class"
    )
    finsight_rate_limit_burst: int = Field(400, ge=1)
    finsight_rate_limit_fail_mode: Literal["open", "closed"] = Field(
        "open",
        description="Redis unreachable: admit calls unlimited (open) or refuse them and "
        "let readiness follow Redis (closed)",
    )

    finsight_max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    finsight_keepalive_time_s: float = Field(30.0, gt=0)
    finsight_max_reconnect_backoff_s: float = Field(
        2.0,
        gt=0,
        le=120,
        description="Longest wait between reconnection attempts to a service that is gone "
        "(gRPC's default grows to 120 s; recovery waits for it)",
    )
    finsight_max_connection_age_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="Client connections are recycled after this long, so clients re-resolve "
        "and spread over new pods",
    )
    finsight_max_connection_age_grace_s: float = Field(
        900.0,
        ge=0,
        le=86_400,
        description="RPCs in flight on a recycled connection get this long to finish: longer "
        "than the longest stream (LLM_GATEWAY_STREAM_MAX_S) or ingest, or they are cut",
    )
    finsight_shutdown_grace_s: float = Field(10.0, ge=0, le=300)
    finsight_drain_delay_s: float = Field(
        2.0, ge=0, le=60, description="NOT_SERVING before the listener closes"
    )
    finsight_default_deadline_s: float = Field(
        30.0, gt=0, le=600, description="Cap for downstream calls with no caller deadline"
    )
    finsight_readiness_interval_s: float = Field(2.0, gt=0, le=60)
    finsight_db_workers: int = Field(4, ge=1, le=64, description="Threads for blocking DuckDB work")
    finsight_db_slow_query_ms: float = Field(200.0, ge=0)
    finsight_db_memory_limit: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="DuckDB's memory limit (e.g. 1GiB; unset = DuckDB's default, 80% of the "
        "RAM it sees, which in a container may be the node's)",
    )
    finsight_db_threads: int = Field(
        0, ge=0, le=256, description="DuckDB's worker threads (0 = one per CPU it sees)"
    )
    finsight_pg_pool_min: int = Field(
        2, ge=0, le=1000, description="PostgreSQL connections each process keeps open"
    )
    finsight_pg_pool_max: int = Field(
        10,
        ge=1,
        le=1000,
        description="Most PostgreSQL connections per process (replicas x this must stay "
        "under the server's max_connections)",
    )
    finsight_pg_pool_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Longest wait for a free pooled connection before UNAVAILABLE",
    )
    finsight_pg_connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Longest wait for a new PostgreSQL connection"
    )
    finsight_pg_statement_timeout_ms: int = Field(
        30_000,
        ge=100,
        le=3_600_000,
        description="Server-side cap of one statement (statement_timeout)",
    )
    finsight_pg_prepare_threshold: int = Field(
        5,
        ge=0,
        le=1000,
        description="Executions after which a query is prepared server-side on a connection "
        "(0 = never, for transaction-mode poolers)",
    )
    finsight_backup_dir: Path | None = Field(
        None, description="Where the Backup RPC writes; default <data dir>/backups"
    )
    finsight_backup_keep: int = Field(7, ge=1, le=1000, description="Backups kept per database")

    otel_exporter_otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector, e.g. http://otel-collector:4317"
    )
    finsight_trace_sample_ratio: float = Field(1.0, ge=0, le=1)

    sentry_dsn: SecretStr | None = Field(
        None, description="Sentry-compatible DSN; set to report unexpected exceptions"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, FileSecretSource(settings_cls), dotenv_settings)

    # -- per-service values, overridden by subclasses ---------------------------------
    @property
    def grpc_port(self) -> int:
        raise NotImplementedError

    @property
    def metrics_port(self) -> int:
        raise NotImplementedError

    @property
    def database_url(self) -> str | None:
        """PostgreSQL URL of the service's durable store (its `<SERVICE>_DATABASE_URL`
        field, for the services that have one); None = its embedded DuckDB file."""
        url = getattr(self, f"{self.service_name}_database_url", None)
        return url.get_secret_value() or None if isinstance(url, SecretStr) else None

    @property
    def database_url_setting(self) -> str:
        return f"{self.service_name.upper()}_DATABASE_URL"

    @property
    def tls_enabled(self) -> bool:
        return self.finsight_tls_cert_file is not None

    def secret_values(self) -> list[str]:
        """Every secret value set, so the log redactor can mask them."""
        out = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                out.append(value.get_secret_value())
        return out

    @model_validator(mode="after")
    def _check_consistency(self) -> CommonSettings:
        problems: list[str] = []
        if (self.finsight_tls_cert_file is None) != (self.finsight_tls_key_file is None):
            problems.append("FINSIGHT_TLS_CERT_FILE and FINSIGHT_TLS_KEY_FILE must be set together")
        if self.finsight_tls_client_ca_file and not self.tls_enabled:
            problems.append(
                "FINSIGHT_TLS_CLIENT_CA_FILE (mTLS) needs FINSIGHT_TLS_CERT_FILE/KEY_FILE"
            )
        if self.finsight_auth_enabled and self.finsight_api_keys_file is None:
            problems.append("FINSIGHT_API_KEYS_FILE is required when FINSIGHT_AUTH_ENABLED=true")
        if self.database_url is not None:
            problem = database_url_problem(self.database_url)
            if problem:
                problems.append(f"{self.database_url_setting}: {problem}")
        if self.finsight_pg_pool_min > self.finsight_pg_pool_max:
            problems.append("FINSIGHT_PG_POOL_MIN must not exceed FINSIGHT_PG_POOL_MAX")
        if self.finsight_env == "prod":
            problems.extend(self._prod_problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _prod_problems(self) -> list[str]:
        problems = []
        if not self.finsight_auth_enabled:
            problems.append("prod refuses FINSIGHT_AUTH_ENABLED=false")
        if not self.tls_enabled and not self.finsight_allow_plaintext:
            problems.append(
                "prod refuses plaintext gRPC: set FINSIGHT_TLS_CERT_FILE/KEY_FILE "
                "or FINSIGHT_ALLOW_PLAINTEXT=true explicitly"
            )
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and _is_placeholder(value.get_secret_value()):
                problems.append(f"prod refuses a placeholder value for {name.upper()}")
        return problems


def database_url_problem(url: str) -> str | None:
    """Why `url` is not a usable libpq connection URI (None when it is). Any libpq URI is
    accepted: TCP hosts, several hosts, or a Unix socket as `?host=/path`."""
    if not url.startswith(("postgresql://", "postgres://")):
        return "must be a postgresql:// URI (unset it to use the embedded DuckDB file)"
    import psycopg.conninfo

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except Exception:  # psycopg's message may echo the password: say only what is wrong
        return "is not a valid libpq connection URI"
    ports = str(params.get("port") or "")
    if ports and not all(p.isdigit() for p in ports.split(",")):
        return "has a port that is not a number"
    return None


def _is_placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(marker in lowered for marker in PLACEHOLDER_MARKERS)


S = TypeVar("S", bound=CommonSettings)


def format_validation_error(cls: type[CommonSettings], exc: ValidationError) -> str:
    lines = [
        f"Invalid configuration for {cls.service_name or cls.__name__} "
        f"({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''}):"
    ]
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]).upper()
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if not loc or isinstance(got, dict) or got is None else f" (got {got!r})"
        if loc and _is_secret(cls.model_fields.get(loc.lower(), FieldInfo())):
            shown = ""  # never echo a secret back
        lines.append(f"  - {loc + ': ' if loc else ''}{msg}{shown}")
    return "\n".join(lines)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build and validate `cls`; raise ConfigError with every problem listed."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc)) from None
    except ValueError as exc:  # raised by a settings source, e.g. an unreadable *_FILE
        raise ConfigError(f"Invalid configuration for {cls.service_name}:\n  - {exc}") from None


def load_settings_or_exit(cls: type[S]) -> S:
    """For `main()`: print the readable report to stderr and exit 2 on bad config."""
    try:
        return load_settings(cls)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
