"""Providers, models and routes resolved from settings (the gateway's routing table).

Built once at start-up; any inconsistency (a route naming an unknown model, a model on an
unknown provider, a missing price) is a configuration error reported with every problem at
once, so the process exits before serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from services.llm_gateway.deployments import DEFAULT_ID, Deployment, KeySource
from services.llm_gateway.pii import PiiPolicy
from services.llm_gateway.pricing import DEFAULT_MODELS, DEFAULT_ROUTES, Pricing
from services.llm_gateway.specs import DEEPSEEK, ModelKind, ModelSpec, ProviderSpec, fixed_key

if TYPE_CHECKING:
    from services.llm_gateway.config import GatewaySettings


class CatalogError(ValueError):
    """The provider/model/route configuration is inconsistent."""


# Requests may carry at most this many texts (EmbedRequest.inputs), the default of a model's
# `max_inputs` (OpenAI accepts 2048, vLLM/TEI fewer by default).
MAX_EMBED_INPUTS = 256
DEFAULT_EMBED_INPUT_TOKENS = 8192


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    deployments: tuple[Deployment, ...]  # at least one (keys and base URLs balanced)
    requires_key: bool
    system: str  # gen_ai.provider.name
    max_connections: int
    attempt_timeout_s: float
    max_retries: int
    key_setting: str  # what to set to enable it (for FAILED_PRECONDITION messages)
    external: bool = True  # outside the deployment: the personal-data policy applies

    @property
    def available(self) -> bool:
        return not self.requires_key or any(d.key.current() for d in self.deployments)


@dataclass(frozen=True)
class Model:
    name: str
    provider: str
    provider_model: str
    context_window: int
    max_output_tokens: int
    default_max_tokens: int
    pricing: Pricing
    kind: ModelKind = "chat"
    max_inputs: int = 0  # embedding models: most texts per request
    dimensions: int = 0  # embedding models: the model's own vector size (0: unknown)
    structured_output: bool = False  # chat: response_format json_schema accepted upstream
    tool_calling: bool = False  # chat: `tools` accepted upstream


@dataclass(frozen=True)
class Route:
    alias: str
    models: tuple[str, ...]
    context_fallback: str | None = None
    pii_policy: PiiPolicy | None = None  # None: by provider (see pii.effective_policy)
    kind: ModelKind = "chat"  # the kind of every model of the chain


@dataclass
class Catalog:
    providers: dict[str, Provider]
    models: dict[str, Model]
    routes: dict[str, Route]
    default_route: str
    default_embedding_route: str = ""  # "" = none configured
    problems: list[str] = field(default_factory=list)

    def resolve(self, name: str, kind: ModelKind = "chat") -> Route | None:
        """A route alias, or a model name as a route of one; None if unknown. An empty name
        is the default route of `kind` (None for embeddings when none is configured)."""
        name = name or (self.default_route if kind == "chat" else self.default_embedding_route)
        route = self.routes.get(name)
        if route is not None:
            return route
        model = self.models.get(name)
        if model is not None:
            return Route(alias=name, models=(name,), kind=model.kind)
        return None

    @property
    def any_provider_available(self) -> bool:
        return any(p.available for p in self.providers.values())


def build_catalog(settings: GatewaySettings) -> Catalog:
    problems: list[str] = []
    providers = _providers(settings, problems)
    models = _models(settings, providers, problems)
    routes = _routes(settings, models, problems)
    if settings.llm_gateway_default_route not in routes and (
        settings.llm_gateway_default_route not in models
    ):
        problems.append(
            f"LLM_GATEWAY_DEFAULT_ROUTE: unknown route or model "
            f"{settings.llm_gateway_default_route!r}"
        )
    default_route = routes.get(settings.llm_gateway_default_route) or (
        models.get(settings.llm_gateway_default_route)
    )
    if default_route is not None and default_route.kind != "chat":
        problems.append(
            f"LLM_GATEWAY_DEFAULT_ROUTE: {settings.llm_gateway_default_route!r} is an embedding "
            "route or model; name a chat one"
        )
    embedding = settings.llm_gateway_default_embedding_route or ""
    if embedding:
        found = routes.get(embedding) or models.get(embedding)
        if found is None:
            problems.append(
                f"LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE: unknown route or model {embedding!r}"
            )
        elif found.kind != "embedding":
            problems.append(
                f"LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE: {embedding!r} is a chat route or model; "
                'name one whose models have "kind": "embedding"'
            )
    if problems:
        raise CatalogError("; ".join(problems))
    return Catalog(providers, models, routes, settings.llm_gateway_default_route, embedding)


def _providers(settings: GatewaySettings, problems: list[str]) -> dict[str, Provider]:
    specs: dict[str, ProviderSpec] = {}
    deepseek_key = settings.deepseek_api_key
    specs[DEEPSEEK] = ProviderSpec.model_validate(
        {"base_url": settings.deepseek_base_url, "api_key": deepseek_key, "system": "deepseek"}
    )
    for name, spec in settings.llm_gateway_providers.items():
        if (
            name == DEEPSEEK
            and spec.api_key is None
            and spec.api_key_env is None
            and (spec.api_key_file is None)
        ):
            spec = spec.model_copy(update={"api_key": deepseek_key})
        specs[name] = spec
    out: dict[str, Provider] = {}
    for name, spec in specs.items():
        if not spec.base_url.startswith(("http://", "https://")):
            problems.append(f"provider {name!r}: base_url must start with http:// or https://")
        deployments = _deployments(name, spec, problems)
        key_setting = (
            "DEEPSEEK_API_KEY"
            if name == DEEPSEEK and spec.api_key_env is None
            else spec.api_key_env or f"LLM_GATEWAY_PROVIDERS[{name}].api_key_env"
        )
        out[name] = Provider(
            name=name,
            base_url=spec.base_url.rstrip("/"),
            deployments=deployments,
            requires_key=spec.requires_key,
            system=spec.system or name,
            max_connections=spec.max_connections or settings.llm_gateway_max_connections,
            attempt_timeout_s=spec.attempt_timeout_s or settings.llm_gateway_attempt_timeout_s,
            max_retries=(
                settings.llm_gateway_max_retries if spec.max_retries is None else spec.max_retries
            ),
            key_setting=key_setting,
            external=spec.external,
        )
    return out


def _deployments(name: str, spec: ProviderSpec, problems: list[str]) -> tuple[Deployment, ...]:
    """The provider's deployments; without `deployments`, one from its own URL and key. A
    deployment without a key of its own uses the provider's."""

    def source(inline: Any, env: str | None, path: Path | None, where: str) -> KeySource:
        value = fixed_key(inline, env)
        if value is not None or path is None:
            return KeySource(value)
        try:
            return KeySource(path=path)
        except OSError as exc:
            problems.append(f"{where}: cannot read api_key_file: {exc.strerror}")
            return KeySource()

    where = f"provider {name!r}"
    own = source(spec.api_key, spec.api_key_env, spec.api_key_file, where)
    base = spec.base_url.rstrip("/")
    if not spec.deployments:
        return (Deployment(DEFAULT_ID, base, own),)
    out = []
    seen: set[str] = set()
    for d in spec.deployments:
        at = f"{where} deployment {d.id!r}"
        if d.id in seen:
            problems.append(f"{at}: id used twice")
        seen.add(d.id)
        url = (d.base_url or base).rstrip("/")
        if not url.startswith(("http://", "https://")):
            problems.append(f"{at}: base_url must start with http:// or https://")
        has_own = d.api_key is not None or d.api_key_env is not None or d.api_key_file is not None
        key = source(d.api_key, d.api_key_env, d.api_key_file, at) if has_own else own
        out.append(Deployment(d.id, url, key, d.weight))
    return tuple(out)


def _models(
    settings: GatewaySettings, providers: dict[str, Provider], problems: list[str]
) -> dict[str, Model]:
    out: dict[str, Model] = {}
    names = list(DEFAULT_MODELS) + [
        n for n in settings.llm_gateway_models if n not in DEFAULT_MODELS
    ]
    for name in names:
        base = DEFAULT_MODELS.get(name)
        spec = settings.llm_gateway_models.get(name)
        kind = (spec and spec.kind) or "chat"  # every shipped model is a chat model
        if kind == "embedding":
            if spec is not None and (model := _embedding_model(name, spec, providers, problems)):
                out[name] = model
            continue
        if spec is not None:
            stray = [f for f in _EMBEDDING_ONLY if getattr(spec, f) is not None]
            if stray:
                problems.append(
                    f"LLM_GATEWAY_MODELS[{name}]: {', '.join(stray)} apply to embedding models "
                    '("kind": "embedding") only'
                )
                continue
        provider = (spec and spec.provider) or (base and base.provider)
        window = (spec and spec.context_window) or (base and base.context_window)
        max_out = (spec and spec.max_output_tokens) or (base and base.max_output_tokens)
        default_max = (spec and spec.default_max_tokens) or (base and base.default_max_tokens)
        prices = [
            _pick(
                spec and spec.input_cache_hit_per_mtok,
                base and base.pricing.input_cache_hit_per_mtok,
            ),
            _pick(
                spec and spec.input_cache_miss_per_mtok,
                base and base.pricing.input_cache_miss_per_mtok,
            ),
            _pick(spec and spec.output_per_mtok, base and base.pricing.output_per_mtok),
        ]
        as_of = (spec and spec.prices_as_of) or (base and base.pricing.as_of) or None
        where = f"LLM_GATEWAY_MODELS[{name}]"
        missing = [
            n
            for n, v in (
                ("provider", provider),
                ("context_window", window),
                ("max_output_tokens", max_out),
            )
            if not v
        ]
        if any(p is None for p in prices):
            missing.append("input_cache_hit_per_mtok/input_cache_miss_per_mtok/output_per_mtok")
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        assert isinstance(provider, str) and isinstance(window, int) and isinstance(max_out, int)
        if provider not in providers:
            problems.append(f"{where}: unknown provider {provider!r}")
            continue
        if max_out >= window:
            problems.append(f"{where}: max_output_tokens must be below context_window")
            continue
        default_max = min(int(default_max or max_out), max_out)
        hit, miss, output = (cast(Decimal, p) for p in prices)
        out[name] = Model(
            name=name,
            provider=provider,
            provider_model=(spec and spec.provider_model) or (base and base.provider_model) or name,
            context_window=window,
            max_output_tokens=max_out,
            default_max_tokens=default_max,
            pricing=Pricing(hit, miss, output, as_of),
            structured_output=bool(
                spec.structured_output
                if spec is not None and spec.structured_output is not None
                else base and base.structured_output
            ),
            tool_calling=bool(
                spec.tool_calling
                if spec is not None and spec.tool_calling is not None
                else (base.tool_calling if base is not None else True)
            ),
        )
    return out


_EMBEDDING_ONLY = ("input_per_mtok", "max_inputs", "dimensions")
_CHAT_ONLY = (
    "structured_output",
    "tool_calling",
    "max_output_tokens",
    "default_max_tokens",
    "input_cache_hit_per_mtok",
    "input_cache_miss_per_mtok",
    "output_per_mtok",
)


def _embedding_model(
    name: str, spec: ModelSpec, providers: dict[str, Provider], problems: list[str]
) -> Model | None:
    where = f"LLM_GATEWAY_MODELS[{name}]"
    missing = [f for f in ("provider", "input_per_mtok") if getattr(spec, f) is None]
    if missing:
        problems.append(f"{where}: missing {', '.join(missing)} (embedding model)")
        return None
    stray = [f for f in _CHAT_ONLY if getattr(spec, f) is not None]
    if stray:
        problems.append(
            f"{where}: {', '.join(stray)} apply to chat models only (this one has "
            '"kind": "embedding"; its price is input_per_mtok)'
        )
        return None
    assert spec.provider is not None and spec.input_per_mtok is not None
    if spec.provider not in providers:
        problems.append(f"{where}: unknown provider {spec.provider!r}")
        return None
    price = spec.input_per_mtok
    return Model(
        name=name,
        provider=spec.provider,
        provider_model=spec.provider_model or name,
        context_window=spec.context_window or DEFAULT_EMBED_INPUT_TOKENS,
        max_output_tokens=0,
        default_max_tokens=0,
        pricing=Pricing(price, price, Decimal(0), spec.prices_as_of),
        kind="embedding",
        max_inputs=min(spec.max_inputs or MAX_EMBED_INPUTS, MAX_EMBED_INPUTS),
        dimensions=spec.dimensions or 0,
    )


def _pick(*values: object) -> object:
    for value in values:
        if value is not None:
            return value
    return None


def _routes(
    settings: GatewaySettings, models: dict[str, Model], problems: list[str]
) -> dict[str, Route]:
    raw: dict[str, tuple[list[str], str | None, PiiPolicy | None]] = {
        alias: (list(chain), None, None) for alias, chain in DEFAULT_ROUTES.items()
    }
    for alias, spec in settings.llm_gateway_routes.items():
        raw[alias] = (spec.models, spec.context_fallback, spec.pii_policy)
    out: dict[str, Route] = {}
    for alias, (chain, fallback, pii_policy) in raw.items():
        unknown = [m for m in [*chain, *([fallback] if fallback else [])] if m not in models]
        if unknown:
            problems.append(f"LLM_GATEWAY_ROUTES[{alias}]: unknown model(s) {', '.join(unknown)}")
            continue
        kinds = {models[m].kind for m in chain}
        if len(kinds) > 1:
            problems.append(
                f"LLM_GATEWAY_ROUTES[{alias}]: mixes chat and embedding models; a route is "
                "one or the other"
            )
            continue
        kind = kinds.pop()
        if kind == "embedding" and fallback:
            problems.append(
                f"LLM_GATEWAY_ROUTES[{alias}]: context_fallback applies to chat routes only"
            )
            continue
        if fallback and models[fallback].kind != "chat":
            problems.append(
                f"LLM_GATEWAY_ROUTES[{alias}]: context_fallback {fallback!r} is an embedding model"
            )
            continue
        out[alias] = Route(alias, tuple(chain), fallback, pii_policy, kind)
    return out
