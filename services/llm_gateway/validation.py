"""Request validation: every problem reported at once, before any provider is called."""

from __future__ import annotations

import math
import re

from libs.common.errors import FailedPrecondition, Violations
from services.llm_gateway.catalog import MAX_EMBED_INPUTS, Catalog, Route
from services.llm_gateway.domain import ROLES, CompletionRequest, EmbedRequest, Message, Tool
from services.llm_gateway.schema import AnswerSchema, load_schema
from services.llm_gateway.specs import ModelKind

MAX_STOP_SEQUENCES = 16
MAX_CACHE_TTL_S = 7 * 24 * 3600
MAX_EMBED_INPUT_BYTES = 32 * 1024
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION = 4096
MAX_TOOL_CALLS_PER_MESSAGE = 128
MAX_TOOL_CALL_ID = 256
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_model(
    catalog: Catalog, name: str, violations: Violations, kind: ModelKind = "chat"
) -> Route | None:
    """The route `name` resolves to, if it is of `kind`; else a violation on `model`."""
    route = catalog.resolve(name, kind)
    if route is None:
        known = sorted(
            {r.alias for r in catalog.routes.values() if r.kind == kind}
            | {m.name for m in catalog.models.values() if m.kind == kind}
        )
        violations.add(
            "model",
            f"unknown {kind} model or route {name!r}; known: {', '.join(known) or 'none'}",
        )
        return None
    if route.kind != kind:
        violations.add(
            "model",
            f"{route.alias!r} is an embedding model/route: use it with Embed, not {_RPC[kind]}"
            if route.kind == "embedding"
            else f"{route.alias!r} is a chat model/route: Embed needs an embedding one "
            '(ListModels, kind "embedding")',
        )
        return None
    return route


_RPC = {"chat": "Complete/StreamComplete/CountTokens", "embedding": "Embed"}


def no_embedding_route() -> FailedPrecondition:
    return FailedPrecondition(
        "no embedding route is configured: name an embedding model or route in `model`, or "
        'configure one (LLM_GATEWAY_MODELS entry with "kind": "embedding", a route in '
        "LLM_GATEWAY_ROUTES, LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE; docs/llm_gateway.md, "
        "Embeddings)",
        reason="NO_EMBEDDING_ROUTE",
        metadata={"settings": "LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE"},
    )


def check_embed(catalog: Catalog, request: EmbedRequest) -> Route:
    """Validate an EmbedRequest (every violation at once); return its route."""
    if not request.model and not catalog.default_embedding_route:
        raise no_embedding_route()
    v = Violations()
    route = check_model(catalog, request.model, v, "embedding")
    limit = MAX_EMBED_INPUTS
    if route is not None:
        limit = min(catalog.models[m].max_inputs for m in route.models)
    if not request.inputs:
        v.add("inputs", "at least one input is required")
    elif len(request.inputs) > limit:
        v.add(
            "inputs",
            f"at most {limit} inputs are accepted"
            + (f" by {route.alias}" if route is not None and limit < MAX_EMBED_INPUTS else ""),
        )
    else:
        for i, text in enumerate(request.inputs):
            if not text.strip():
                v.add(f"inputs[{i}]", "must not be empty or only whitespace")
            elif len(text) > MAX_EMBED_INPUT_BYTES // 4 and (
                len(text.encode("utf-8", errors="surrogatepass")) > MAX_EMBED_INPUT_BYTES
            ):
                v.add(f"inputs[{i}]", f"at most {MAX_EMBED_INPUT_BYTES} bytes of UTF-8")
    if request.dimensions < 0:
        v.add("dimensions", "must be 0 (the model's own) or positive")
    elif route is not None and request.dimensions:
        native = [catalog.models[m].dimensions for m in route.models]
        if any(d and request.dimensions > d for d in native):
            v.add("dimensions", f"must be at most {min(d for d in native if d)} for {route.alias}")
    if request.cache_policy not in ("auto", "disabled", "enabled", "refresh"):
        v.add("cache_policy", f"unknown cache policy {request.cache_policy}")
    if not 0 <= request.cache_ttl_s <= MAX_CACHE_TTL_S:
        v.add("cache_ttl_seconds", f"must be between 0 and {MAX_CACHE_TTL_S}")
    v.raise_if_any()
    assert route is not None
    return route


def check_messages(
    messages: list[Message],
    violations: Violations,
    *,
    max_messages: int,
    max_bytes: int,
    need_user: bool = True,
) -> None:
    if not messages:
        violations.add("messages", "at least one message is required")
        return
    if len(messages) > max_messages:
        violations.add("messages", f"at most {max_messages} messages are accepted")
        return  # refused whole, without checking each entry
    total = 0
    unanswered: dict[str, int] = {}  # tool call id → index of the assistant message
    seen_ids: set[str] = set()
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            violations.add(
                f"messages[{i}].role",
                f"unknown role {message.role or 'ROLE_UNSPECIFIED'}; "
                "use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL",
            )
        if message.role != "tool" and unanswered:
            _unanswered(unanswered, violations)
        if not message.content.strip() and not (message.role == "assistant" and message.tool_calls):
            violations.add(f"messages[{i}].content", "must not be empty")
        total += len(message.content.encode("utf-8", errors="surrogatepass"))
        if message.tool_calls:
            if message.role != "assistant":
                violations.add(
                    f"messages[{i}].tool_calls", "only ROLE_ASSISTANT messages carry them"
                )
            total += _check_calls(i, message, seen_ids, unanswered, violations)
        if message.role == "tool":
            if not message.tool_call_id:
                violations.add(
                    f"messages[{i}].tool_call_id", "required on ROLE_TOOL (the call it answers)"
                )
            elif unanswered.pop(message.tool_call_id, None) is None:
                violations.add(
                    f"messages[{i}].tool_call_id",
                    f"{message.tool_call_id[:MAX_TOOL_CALL_ID]!r} answers no tool call of the "
                    "assistant message before it (or one already answered)",
                )
        elif message.tool_call_id:
            violations.add(f"messages[{i}].tool_call_id", "only ROLE_TOOL messages carry one")
    if unanswered:
        _unanswered(unanswered, violations)
    if total > max_bytes:
        violations.add("messages", f"prompt is {total} bytes; at most {max_bytes} are accepted")
    if need_user and not any(m.role == "user" for m in messages):
        violations.add("messages", "at least one ROLE_USER message is required")


def _check_calls(
    i: int,
    message: Message,
    seen_ids: set[str],
    unanswered: dict[str, int],
    violations: Violations,
) -> int:
    """Check an assistant message's tool calls; return their size in bytes."""
    if len(message.tool_calls) > MAX_TOOL_CALLS_PER_MESSAGE:
        violations.add(f"messages[{i}].tool_calls", f"at most {MAX_TOOL_CALLS_PER_MESSAGE}")
        return 0
    size = 0
    for j, call in enumerate(message.tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not call.id or len(call.id) > MAX_TOOL_CALL_ID:
            violations.add(f"{where}.id", f"1-{MAX_TOOL_CALL_ID} characters required")
        elif call.id in seen_ids:
            violations.add(f"{where}.id", f"{call.id!r} is used by an earlier tool call")
        else:
            seen_ids.add(call.id)
            unanswered[call.id] = i
        if not TOOL_NAME.fullmatch(call.name):
            violations.add(f"{where}.name", "1-64 characters of a-z, A-Z, 0-9, _ and -")
        size += len(call.arguments.encode("utf-8", errors="surrogatepass")) + len(call.name)
    return size


def _unanswered(unanswered: dict[str, int], violations: Violations) -> None:
    for call_id, index in unanswered.items():
        violations.add(
            f"messages[{index}].tool_calls",
            f"tool call {call_id!r} has no ROLE_TOOL answer right after its message",
        )
    unanswered.clear()


def check_tools(
    request: CompletionRequest, route: Route | None, catalog: Catalog, v: Violations
) -> None:
    """The request's tools and tool_choice (and that its route can call tools)."""
    tools: list[Tool] = request.tools
    if len(tools) > MAX_TOOLS:
        v.add("tools", f"at most {MAX_TOOLS} tools are accepted")
        return
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not TOOL_NAME.fullmatch(tool.name):
            v.add(f"tools[{i}].name", "1-64 characters of a-z, A-Z, 0-9, _ and -")
        elif tool.name in names:
            v.add(f"tools[{i}].name", f"{tool.name!r} is defined twice")
        names.add(tool.name)
        if len(tool.description) > MAX_TOOL_DESCRIPTION:
            v.add(f"tools[{i}].description", f"at most {MAX_TOOL_DESCRIPTION} characters")
        schema = load_schema(tool.parameters, v, f"tools[{i}].parameters")
        if schema is not None and schema.document.get("type") != "object":
            v.add(f"tools[{i}].parameters", 'must be an object schema ("type": "object")')
    choice = request.tool_choice
    if choice not in ("", "auto", "none", "required", "function"):
        v.add("tool_choice.mode", f"unknown tool choice mode {choice}")
    elif choice and not tools:
        v.add("tool_choice", "needs `tools`")
    elif choice == "function":
        if not request.tool_choice_name:
            v.add("tool_choice.function_name", "required with TOOL_CHOICE_MODE_FUNCTION")
        elif request.tool_choice_name not in names:
            v.add(
                "tool_choice.function_name", f"{request.tool_choice_name!r} is not one of `tools`"
            )
    elif request.tool_choice_name:
        v.add("tool_choice.function_name", "only with TOOL_CHOICE_MODE_FUNCTION")
    if tools and request.json_schema:
        v.add("json_schema", "cannot be combined with `tools` (an answer may be tool calls)")
    if (
        tools
        and route is not None
        and not any(catalog.models[m].tool_calling for m in route.models)
    ):
        v.add("tools", f"no model of {route.alias!r} supports tool calling (ListModels)")


def check_completion(
    catalog: Catalog, request: CompletionRequest, *, max_messages: int, max_bytes: int
) -> tuple[Route, Violations, AnswerSchema | None]:
    """Validate everything that does not need the tokenizer; return the route (and the
    checked `json_schema`, if any)."""
    v = Violations()
    route = check_model(catalog, request.model, v)
    check_messages(request.messages, v, max_messages=max_messages, max_bytes=max_bytes)
    if request.max_tokens is not None:
        limit = (
            min((catalog.models[m].max_output_tokens for m in route.models), default=0)
            if route
            else 0
        )
        if request.max_tokens < 1:
            v.add("max_tokens", "must be at least 1")
        elif route is not None and request.max_tokens > limit:
            v.add("max_tokens", f"must be at most {limit} for {route.alias}")
    if request.temperature is not None and not (
        math.isfinite(request.temperature) and 0 <= request.temperature <= 2
    ):
        v.add("temperature", "must be between 0 and 2")
    if request.top_p is not None and not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        v.add("top_p", "must be greater than 0 and at most 1")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        v.add("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for i, seq in enumerate(request.stop[:MAX_STOP_SEQUENCES]):
        if not seq:
            v.add(f"stop[{i}]", "must not be empty")
    if request.response_format not in ("text", "json_object"):
        v.add("response_format", f"unknown response format {request.response_format}")
    schema = load_schema(request.json_schema, v)
    if request.json_schema and request.response_format != "json_object":
        v.add(
            "response_format",
            "must be RESPONSE_FORMAT_UNSPECIFIED or RESPONSE_FORMAT_JSON_OBJECT with json_schema",
        )
    if request.cache_policy not in ("auto", "disabled", "enabled", "refresh"):
        v.add("cache_policy", f"unknown cache policy {request.cache_policy}")
    if not 0 <= request.cache_ttl_s <= MAX_CACHE_TTL_S:
        v.add("cache_ttl_seconds", f"must be between 0 and {MAX_CACHE_TTL_S}")
    check_tools(request, route, catalog, v)
    return route, v, schema  # type: ignore[return-value]
