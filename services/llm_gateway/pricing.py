"""Model facts and cost arithmetic (USD, exact: integer nano-dollars, never floats).

The shipped defaults are DeepSeek's V3.2 price list as published on 2025-09-29
(https://api-docs.deepseek.com/quick_start/pricing). DeepSeek changes prices and limits,
so each model carries the date its facts were taken (`prices_as_of`), and every fact can be
overridden by configuration (`LLM_GATEWAY_MODELS`, see docs/llm_gateway.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

NANOS_PER_UNIT = 1_000_000_000
_TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per one million tokens

DEEPSEEK_PRICES_AS_OF = date(2025, 9, 29)


@dataclass(frozen=True)
class Usage:
    """Tokens of one completion (or a sum). `prompt` includes `cached_prompt`."""

    prompt: int = 0
    completion: int = 0
    cached_prompt: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt + other.prompt,
            self.completion + other.completion,
            self.cached_prompt + other.cached_prompt,
            self.reasoning + other.reasoning,
        )


@dataclass(frozen=True)
class Pricing:
    """USD per one million tokens, and the day the figures were taken from the provider."""

    input_cache_hit_per_mtok: Decimal
    input_cache_miss_per_mtok: Decimal
    output_per_mtok: Decimal
    as_of: date | None = None

    def cost_nanos(self, usage: Usage) -> int:
        """Cost of `usage` in nano-USD, rounded half-up once (not per token class)."""
        hit = min(max(usage.cached_prompt, 0), max(usage.prompt, 0))
        miss = max(usage.prompt, 0) - hit
        total = (
            Decimal(hit) * self.input_cache_hit_per_mtok
            + Decimal(miss) * self.input_cache_miss_per_mtok
            + Decimal(max(usage.completion, 0)) * self.output_per_mtok
        )
        nanos = total * NANOS_PER_UNIT / _TOKENS_PER_PRICE_UNIT
        return int(nanos.quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def max_cost_nanos(self, prompt_tokens: int, max_tokens: int) -> int:
        """Upper bound of a request's cost: every prompt token a cache miss, full output."""
        return self.cost_nanos(Usage(prompt=prompt_tokens, completion=max_tokens))


@dataclass(frozen=True)
class ModelFacts:
    """What the gateway must know about a model to route, fit and price a request."""

    provider: str
    context_window: int
    max_output_tokens: int
    default_max_tokens: int
    pricing: Pricing
    provider_model: str | None = None
    structured_output: bool = False  # response_format json_schema accepted upstream
    tool_calling: bool = True  # `tools` accepted upstream


_DEEPSEEK_V32 = Pricing(
    input_cache_hit_per_mtok=Decimal("0.028"),
    input_cache_miss_per_mtok=Decimal("0.28"),
    output_per_mtok=Decimal("0.42"),
    as_of=DEEPSEEK_PRICES_AS_OF,
)

# Context window 128K (131,072 tokens) for both; max output 8K for deepseek-chat (default
# 4K) and 64K for deepseek-reasoner (default 32K), per DeepSeek's 2025-09-29 documentation.
DEFAULT_MODELS: dict[str, ModelFacts] = {
    "deepseek-chat": ModelFacts("deepseek", 131_072, 8_192, 4_096, _DEEPSEEK_V32),
    # DeepSeek documents function calling for deepseek-chat only (a reasoner request with
    # tools is served by deepseek-chat upstream): the gateway routes tools to chat models.
    "deepseek-reasoner": ModelFacts(
        "deepseek", 131_072, 65_536, 32_768, _DEEPSEEK_V32, tool_calling=False
    ),
}

DEFAULT_ROUTES: dict[str, list[str]] = {
    "default": ["deepseek-chat"],
    "reasoning": ["deepseek-reasoner"],
}


def nanos_to_units(nanos: int) -> tuple[int, int]:
    """Split non-negative nano-USD into (whole dollars, nanos) as google.type.Money wants."""
    return divmod(nanos, NANOS_PER_UNIT)


def usd_to_nanos(usd: Decimal) -> int:
    return int((usd * NANOS_PER_UNIT).quantize(Decimal(1), rounding=ROUND_HALF_UP))
