"""Settings of the LLM gateway (environment variable = field name in upper case).

DeepSeek needs nothing but `DEEPSEEK_API_KEY` (or `DEEPSEEK_API_KEY_FILE`), and optionally
`DEEPSEEK_BASE_URL`. Further providers, model facts and routes are JSON settings:

    LLM_GATEWAY_PROVIDERS='{"openai": {"base_url": "https://api.openai.com/v1",
                            "api_key_env": "OPENAI_API_KEY"}}'
    LLM_GATEWAY_MODELS='{"gpt-4o-mini": {"provider": "openai", "context_window": 128000,
                         "max_output_tokens": 16384, "input_cache_hit_per_mtok": "0.075",
                         "input_cache_miss_per_mtok": "0.15", "output_per_mtok": "0.60",
                         "prices_as_of": "2025-10-01"}}'
    LLM_GATEWAY_ROUTES='{"default": {"models": ["deepseek-chat", "gpt-4o-mini"]}}'

Entries are merged over the shipped defaults (docs/llm_gateway.md lists them): a model entry
may override single facts of a shipped model (e.g. only its prices).
"""

from __future__ import annotations

import os
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import ClassVar, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from libs.common.config import CommonSettings
from services.llm_gateway.pii import DEFAULT_PHONE_REGION, PiiPolicy

DEEPSEEK = "deepseek"
DEEPSEEK_DEFAULT_BASE_URL = "https://api.deepseek.com"


class ProviderSpec(BaseModel):
    """An OpenAI-compatible provider. Unset knobs take the LLM_GATEWAY_* defaults."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="Base URL; `/chat/completions` is appended")
    api_key: SecretStr | None = Field(None, description="Key inline (prefer api_key_env/_file)")
    api_key_env: str | None = Field(None, description="Environment variable holding the key")
    api_key_file: Path | None = Field(None, description="File holding the key (secret mount)")
    requires_key: bool = Field(True, description="False for keyless local servers (vLLM, Ollama)")
    system: str | None = Field(None, description="gen_ai.system value; default: the name")
    max_connections: int | None = Field(None, ge=1, le=10_000)
    attempt_timeout_s: float | None = Field(None, gt=0, le=3600)
    max_retries: int | None = Field(None, ge=0, le=10)
    external: bool = Field(
        True,
        description="Outside the deployment: LLM_GATEWAY_PII_POLICY applies (false for a "
        "model server you run yourself)",
    )

    def resolved_key(self) -> str | None:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.api_key_file is not None:
            return self.api_key_file.read_text(encoding="utf-8").strip() or None
        return None


class ModelSpec(BaseModel):
    """Facts about a model; every field optional so an entry can override a shipped default."""

    model_config = ConfigDict(extra="forbid")

    provider: str | None = None
    provider_model: str | None = Field(None, description="Id sent upstream; default: the name")
    context_window: int | None = Field(None, ge=256)
    max_output_tokens: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(None, ge=1)
    input_cache_hit_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    input_cache_miss_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    output_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    prices_as_of: date | None = None


class RouteSpec(BaseModel):
    """An alias and its ordered chain of model names."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)
    context_fallback: str | None = Field(
        None, description="Larger-context model for prompts that do not fit the first model"
    )
    pii_policy: PiiPolicy | None = Field(
        None,
        description="allow | redact | block for every provider of this route; unset = "
        "LLM_GATEWAY_PII_POLICY for external providers, allow for the others",
    )


class TenantLimitsSpec(BaseModel):
    """Per-tenant overrides of the default limits (unset = the default; 0 = unlimited)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    daily_budget_usd: Decimal | None = Field(None, ge=0)


class GatewaySettings(CommonSettings):
    service_name: ClassVar[str] = "llm_gateway"
    full_service_name: ClassVar[str] = "finsight.llm.v1.LlmGatewayService"

    llm_gateway_grpc_port: int = Field(50051, ge=0, le=65535)
    llm_gateway_metrics_port: int = Field(9101, ge=0, le=65535)

    # -- providers, models, routes ----------------------------------------------------------
    deepseek_api_key: SecretStr | None = Field(
        None, description="DeepSeek API key: setting it is all that enables DeepSeek"
    )
    deepseek_base_url: str = Field(
        DEEPSEEK_DEFAULT_BASE_URL, description="DeepSeek (or a compatible stand-in) base URL"
    )
    llm_gateway_providers: dict[str, ProviderSpec] = Field(
        default_factory=dict, description="JSON: extra OpenAI-compatible providers by name"
    )
    llm_gateway_models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="JSON: model facts and prices merged over the shipped DeepSeek defaults",
    )
    llm_gateway_routes: dict[str, RouteSpec] = Field(
        default_factory=dict, description="JSON: route aliases merged over the shipped ones"
    )
    llm_gateway_default_route: str = Field("default", description="Route used when model is empty")

    # -- HTTP client (per provider; a provider entry may override some) ---------------------
    llm_gateway_max_connections: int = Field(
        100, ge=1, le=10_000, description="Pool size per provider"
    )
    llm_gateway_http_transport: Literal["aiohttp", "httpcore"] = Field(
        "aiohttp",
        description="Wire of the httpx clients: aiohttp (fast) or httpx's own httpcore",
    )
    llm_gateway_client_shards: int = Field(
        4,
        ge=1,
        le=64,
        description="httpcore transport only: httpx clients per provider sharing the pool (CPU)",
    )
    llm_gateway_keepalive_expiry_s: float = Field(30.0, gt=0, le=600)
    llm_gateway_connect_timeout_s: float = Field(5.0, gt=0, le=120)
    llm_gateway_read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Idle timeout between bytes (keep-alive lines reset it)"
    )
    llm_gateway_write_timeout_s: float = Field(10.0, gt=0, le=600)
    llm_gateway_pool_timeout_s: float = Field(5.0, gt=0, le=600)
    llm_gateway_attempt_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Absolute time per attempt (streams: until the first token)",
    )
    llm_gateway_stream_max_s: float = Field(
        600.0, gt=0, le=7200, description="Absolute cap on one streamed answer"
    )

    # -- retries and breaker ----------------------------------------------------------------
    llm_gateway_max_retries: int = Field(2, ge=0, le=10, description="Retries per chain link")
    llm_gateway_retry_base_s: float = Field(0.2, gt=0, le=60, description="First backoff ceiling")
    llm_gateway_retry_max_backoff_s: float = Field(8.0, gt=0, le=300)
    llm_gateway_retry_after_cap_s: float = Field(
        20.0, ge=0, le=600, description="Longest provider Retry-After the gateway waits for"
    )
    llm_gateway_breaker_fail_max: int = Field(5, ge=1, le=1000)
    llm_gateway_breaker_reset_s: float = Field(30.0, gt=0, le=3600)

    # -- input limits -----------------------------------------------------------------------
    llm_gateway_max_messages: int = Field(2048, ge=1, le=100_000)
    llm_gateway_max_prompt_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest total message content (UTF-8 bytes) accepted",
    )

    # -- tenant limits and budgets ----------------------------------------------------------
    llm_gateway_rpm: int = Field(
        600, ge=0, description="Completions per minute per tenant (0 = off)"
    )
    llm_gateway_tpm: int = Field(
        2_000_000, ge=0, description="Tokens per minute per tenant (0 = off)"
    )
    llm_gateway_daily_budget_usd: Decimal | None = Field(
        None, ge=0, description="Daily cost budget per tenant in USD (unset = unlimited)"
    )
    llm_gateway_tenant_limits: dict[str, TenantLimitsSpec] = Field(
        default_factory=dict, description="JSON: per-tenant rpm/tpm/daily_budget_usd overrides"
    )

    # -- cache and accounting ---------------------------------------------------------------
    llm_gateway_cache_enabled: bool = True
    llm_gateway_cache_ttl_s: int = Field(3600, ge=1, le=604_800)
    llm_gateway_cache_max_entry_bytes: int = Field(512 * 1024, ge=1024, le=16 * 1024 * 1024)
    llm_gateway_usage_retention_days: int = Field(400, ge=1, le=3650)
    llm_gateway_usage_stream: str = Field(
        "llm:usage-events", description="Redis Stream receiving one event per completion"
    )
    llm_gateway_usage_stream_maxlen: int = Field(1_000_000, ge=1000)

    # -- personal data ----------------------------------------------------------------------
    llm_gateway_pii_policy: PiiPolicy = Field(
        "redact",
        description="Personal data in prompts to external providers: allow | redact "
        "(placeholders out, originals restored in the answer) | block (FAILED_PRECONDITION)",
    )
    llm_gateway_pii_phone_region: str = Field(
        DEFAULT_PHONE_REGION,
        min_length=2,
        max_length=3,
        description="Region (ISO 3166 alpha-2) of phone numbers written without +country code",
    )

    @property
    def grpc_port(self) -> int:
        return self.llm_gateway_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.llm_gateway_metrics_port

    @model_validator(mode="after")
    def _check_catalog(self) -> GatewaySettings:
        # Imported here: the catalog module imports this one for the spec types.
        from services.llm_gateway.catalog import CatalogError, build_catalog

        try:
            build_catalog(self)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        if self.llm_gateway_pii_phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"LLM_GATEWAY_PII_PHONE_REGION: unknown region "
                f"{self.llm_gateway_pii_phone_region!r} (ISO 3166 alpha-2, e.g. US, GB, DE)"
            )
        if self.llm_gateway_stream_max_s > self.finsight_max_connection_age_grace_s:
            raise ValueError(
                "LLM_GATEWAY_STREAM_MAX_S must not exceed FINSIGHT_MAX_CONNECTION_AGE_GRACE_S: "
                "a stream still running when its connection is recycled would be cut"
            )
        return self
