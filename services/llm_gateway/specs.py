"""The JSON setting entries of the gateway (providers, models, routes, tenant limits).

Their own module so that `config` (the settings) and `catalog` (the routing table built from
them) both import these without importing each other.
"""

from __future__ import annotations

import os
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.llm_gateway.pii import PiiPolicy

DEEPSEEK = "deepseek"
DEEPSEEK_DEFAULT_BASE_URL = "https://api.deepseek.com"
ModelKind = Literal["chat", "embedding"]


class DeploymentSpec(BaseModel):
    """One key (and optionally another base URL) of a provider; see deployments.py."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Names the deployment in usage, spans and metrics (never the key)",
    )
    base_url: str | None = Field(None, description="Default: the provider's base_url")
    api_key: SecretStr | None = Field(None, description="Key inline (prefer api_key_env/_file)")
    api_key_env: str | None = Field(None, description="Environment variable holding the key")
    api_key_file: Path | None = Field(
        None, description="File holding the key, re-read when it changes (rotation)"
    )
    weight: int = Field(1, ge=1, le=1000, description="Share of the load (relative)")


class ProviderSpec(BaseModel):
    """An OpenAI-compatible provider. Unset knobs take the LLM_GATEWAY_* defaults."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        description="Base URL; `/chat/completions` (and `/embeddings`) is appended"
    )
    api_key: SecretStr | None = Field(None, description="Key inline (prefer api_key_env/_file)")
    api_key_env: str | None = Field(None, description="Environment variable holding the key")
    api_key_file: Path | None = Field(None, description="File holding the key (secret mount)")
    requires_key: bool = Field(True, description="False for keyless local servers (vLLM, Ollama)")
    system: str | None = Field(None, description="gen_ai.provider.name value; default: the name")
    max_connections: int | None = Field(None, ge=1, le=10_000)
    attempt_timeout_s: float | None = Field(None, gt=0, le=3600)
    max_retries: int | None = Field(None, ge=0, le=10)
    external: bool = Field(
        True,
        description="Outside the deployment: LLM_GATEWAY_PII_POLICY applies (false for a "
        "model server you run yourself)",
    )
    deployments: list[DeploymentSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Several keys / base URLs balanced by weight and in-flight requests, "
        "each cooled down on its own after 429/401/403; empty = one, from the fields above",
    )


def fixed_key(inline: SecretStr | None, env: str | None) -> str | None:
    """An inline key, else the environment variable's value, else None."""
    if inline is not None and inline.get_secret_value():
        return inline.get_secret_value()
    if env and os.environ.get(env):
        return os.environ[env]
    return None


class ModelSpec(BaseModel):
    """Facts about a model; every field optional so an entry can override a shipped default.

    `kind` "embedding" makes an Embed-only model (OpenAI-compatible `/embeddings`): it needs
    `provider` and `input_per_mtok`; `context_window` is then the most tokens one input may
    have (default 8192), and the chat facts (max_output_tokens, output price…) do not apply.
    """

    model_config = ConfigDict(extra="forbid")

    kind: ModelKind | None = Field(None, description="chat (default) or embedding")
    provider: str | None = None
    provider_model: str | None = Field(None, description="Id sent upstream; default: the name")
    context_window: int | None = Field(None, ge=256)
    max_output_tokens: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(None, ge=1)
    input_cache_hit_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    input_cache_miss_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    output_per_mtok: Decimal | None = Field(None, ge=0, description="USD per 1M tokens")
    prices_as_of: date | None = None
    structured_output: bool | None = Field(
        None,
        description="Chat models: the provider accepts response_format json_schema (native "
        "schema-constrained output); default false (DeepSeek: json_object only)",
    )
    tool_calling: bool | None = Field(
        None,
        description="Chat models: the provider accepts `tools` (function calling); default "
        "true (shipped deepseek-reasoner: false)",
    )
    # -- embedding models -------------------------------------------------------------------
    input_per_mtok: Decimal | None = Field(
        None, ge=0, description="Embedding models: USD per 1M input tokens"
    )
    max_inputs: int | None = Field(
        None, ge=1, le=2048, description="Embedding models: most texts per provider request"
    )
    dimensions: int | None = Field(
        None, ge=1, le=65_536, description="Embedding models: the model's own vector size"
    )


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
