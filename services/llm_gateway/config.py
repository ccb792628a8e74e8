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

An embedding model has `"kind": "embedding"` and a price per million input tokens:

    LLM_GATEWAY_MODELS='{"bge-m3": {"kind": "embedding", "provider": "tei",
                         "provider_model": "BAAI/bge-m3", "input_per_mtok": "0"}}'
    LLM_GATEWAY_ROUTES='{"embed": {"models": ["bge-m3"]}}'
    LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE=embed

Entries are merged over the shipped defaults (docs/llm_gateway.md lists them): a model entry
may override single facts of a shipped model (e.g. only its prices).
"""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar, Literal

import phonenumbers
from pydantic import Field, SecretStr, model_validator

from libs.common.config import CommonSettings
from services.llm_gateway.catalog import CatalogError, build_catalog
from services.llm_gateway.pii import DEFAULT_PHONE_REGION, PiiPolicy
from services.llm_gateway.specs import (
    DEEPSEEK,
    DEEPSEEK_DEFAULT_BASE_URL,
    ModelSpec,
    ProviderSpec,
    RouteSpec,
    TenantLimitsSpec,
)

__all__ = [
    "DEEPSEEK",
    "DEEPSEEK_DEFAULT_BASE_URL",
    "GatewaySettings",
    "ModelSpec",
    "ProviderSpec",
    "RouteSpec",
    "TenantLimitsSpec",
]


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
    llm_gateway_default_embedding_route: str | None = Field(
        None,
        description="Embedding route (or model) used when Embed's model is empty; unset = none "
        "(Embed then needs a model, see docs/llm_gateway.md, Embeddings)",
    )

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
    llm_gateway_breaker_fail_max: int = Field(
        5,
        ge=1,
        le=1000,
        description="Consecutive provider failures that open its circuit (per replica, and "
        "across replicas with the shared breaker)",
    )
    llm_gateway_key_rate_limit_cooldown_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="A provider key that answered 429 without Retry-After rests this long "
        "(its other keys serve meanwhile)",
    )
    llm_gateway_key_auth_cooldown_s: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="A provider key that answered 401/403 rests this long, unless its key "
        "file changes first (its other keys serve meanwhile)",
    )
    llm_gateway_breaker_reset_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds an open circuit refuses calls before a trial"
    )
    llm_gateway_shared_breaker: bool = Field(
        True,
        description="Share each provider's circuit among gateway replicas through Redis "
        "(docs/llm_gateway.md, Shared breaker); false: every replica on its own",
    )
    llm_gateway_shared_breaker_poll_s: float = Field(
        0.25,
        ge=0.02,
        le=10,
        description="How often a replica reads the shared circuits (one Redis round trip): "
        "the longest it keeps calling a provider another replica's failures opened",
    )
    llm_gateway_shared_breaker_window_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Shared failure count expires this long after its last failure",
    )

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
