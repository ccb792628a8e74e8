"""Domain types of the gateway (no protobuf, no grpc)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.llm_gateway.pricing import Usage

ROLES = ("system", "user", "assistant", "tool")
ResponseFormat = Literal["text", "json_object"]
CachePolicy = Literal["auto", "disabled", "enabled", "refresh"]
ToolChoiceMode = Literal["", "auto", "none", "required", "function"]  # "": not set


@dataclass(frozen=True)
class ToolCall:
    """A function call of the model (or one echoed back in an assistant message)."""

    id: str
    name: str
    arguments: str  # JSON text as the model wrote it

    def wire(self) -> dict[str, object]:
        """The OpenAI chat-completions form."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""  # JSON Schema text; "" = no arguments


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES once validated; anything else is reported as unknown
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    tool_call_id: str = ""  # tool messages only

    def wire(self) -> dict[str, object]:
        """The OpenAI chat-completions form."""
        out: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.wire() for call in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out

    @property
    def counted_text(self) -> str:
        """What the model reads of this message, for token counting: the content, plus each
        tool call's name and arguments."""
        if not self.tool_calls:
            return self.content
        calls = "".join(f"\n{call.name}({call.arguments})" for call in self.tool_calls)
        return self.content + calls


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
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoiceMode = ""
    tool_choice_name: str = ""  # tool_choice "function": the tool to call


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
    tool_calls: list[ToolCall] = field(default_factory=list)
    provider_key_id: str = ""  # the provider's deployment that answered


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
    provider_key_id: str = ""

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call (id and name on the call's first piece only)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class TokenCount:
    model: str
    prompt_tokens: int
    context_window: int
    max_output_tokens: int
    message_tokens: list[int]
