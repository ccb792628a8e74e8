"""Domain types of the gateway (no protobuf, no grpc)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.llm_gateway.pricing import Usage

ROLES = ("system", "user", "assistant")
ResponseFormat = Literal["text", "json_object"]
CachePolicy = Literal["auto", "disabled", "enabled", "refresh"]


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES once validated; anything else is reported as unknown
    content: str


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    response_format: ResponseFormat = "text"
    cache_policy: CachePolicy = "auto"
    cache_ttl_s: int = 0
    # A JSON Schema document as JSON text ("" = none); needs response_format "json_object"
    # (the servicer maps RESPONSE_FORMAT_UNSPECIFIED to it when a schema is given).
    json_schema: str = ""


@dataclass
class Completion:
    """A finished answer (or, for streams, the summary sent after the last delta)."""

    content: str
    reasoning: str
    finish_reason: str
    usage: Usage
    cost_nanos: int
    provider: str
    model: str
    route: str
    attempts: int
    cached: bool = False
    truncated: bool = False
    dropped: list[int] = field(default_factory=list)
    provider_request_id: str = ""
    # Kind → identifiers replaced by placeholders before the provider saw the prompt.
    redactions: dict[str, int] = field(default_factory=dict)
    # json_schema requests: the first answer failed validation and the repair round fixed it.
    schema_repaired: bool = False


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    inputs: list[str]
    dimensions: int = 0  # 0: the model's own
    cache_policy: CachePolicy = "auto"  # auto caches: embeddings are deterministic
    cache_ttl_s: int = 0


@dataclass
class Embeddings:
    """The answer to an EmbedRequest (the fields `Gateway._account` shares with Completion)."""

    vectors: list[list[float]]
    usage: Usage  # prompt tokens only
    cost_nanos: int
    provider: str
    model: str  # configured model name
    route: str
    attempts: int
    cached: bool = False
    provider_request_id: str = ""
    redactions: dict[str, int] = field(default_factory=dict)

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""


@dataclass(frozen=True)
class TokenCount:
    model: str
    prompt_tokens: int
    context_window: int
    max_output_tokens: int
    message_tokens: list[int]
