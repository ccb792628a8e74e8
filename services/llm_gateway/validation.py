"""Request validation: every problem reported at once, before any provider is called."""

from __future__ import annotations

import math

from libs.common.errors import Violations
from services.llm_gateway.catalog import Catalog, Route
from services.llm_gateway.domain import ROLES, CompletionRequest, Message

MAX_STOP_SEQUENCES = 16
MAX_CACHE_TTL_S = 7 * 24 * 3600


def check_model(catalog: Catalog, name: str, violations: Violations) -> Route | None:
    route = catalog.resolve(name)
    if route is None:
        known = sorted(set(catalog.routes) | set(catalog.models))
        violations.add("model", f"unknown model or route {name!r}; known: {', '.join(known)}")
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
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            violations.add(
                f"messages[{i}].role",
                f"unknown role {message.role or 'ROLE_UNSPECIFIED'}; "
                "use ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
            )
        if not message.content.strip():
            violations.add(f"messages[{i}].content", "must not be empty")
        total += len(message.content.encode("utf-8", errors="surrogatepass"))
    if total > max_bytes:
        violations.add("messages", f"prompt is {total} bytes; at most {max_bytes} are accepted")
    if need_user and not any(m.role == "user" for m in messages):
        violations.add("messages", "at least one ROLE_USER message is required")


def check_completion(
    catalog: Catalog, request: CompletionRequest, *, max_messages: int, max_bytes: int
) -> tuple[Route, Violations]:
    """Validate everything that does not need the tokenizer; return the route."""
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
    if request.cache_policy not in ("auto", "disabled", "enabled", "refresh"):
        v.add("cache_policy", f"unknown cache policy {request.cache_policy}")
    if not 0 <= request.cache_ttl_s <= MAX_CACHE_TTL_S:
        v.add("cache_ttl_seconds", f"must be between 0 and {MAX_CACHE_TTL_S}")
    return route, v  # type: ignore[return-value]
