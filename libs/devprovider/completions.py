"""Chat completion content: the deterministic reply, usage, and its JSON / SSE encodings."""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libs.devprovider.wire import json_bytes

# A "token" is a word with its leading whitespace, like BPE pieces; the last one keeps any
# trailing whitespace so that joined pieces rebuild the text exactly.
_WORD_RE = re.compile(r"\s*\S+\s*$|\s*\S+")


# Streamed tool-call arguments are cut into pieces of this many characters.
ARGUMENT_PIECE_CHARS = 7


@dataclass(frozen=True)
class Reply:
    pieces: list[str]
    reasoning_pieces: list[str]
    finish_reason: str
    usage: dict[str, Any]
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI form: id, type, function

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning(self) -> str | None:
        return "".join(self.reasoning_pieces) if self.reasoning_pieces else None


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _words(text: str) -> list[str]:
    """Split into 'tokens'; ``"".join(_words(t)) == t`` unless ``t`` is only whitespace."""
    return _WORD_RE.findall(text)


def _reply_text(body: Mapping[str, Any], action: Mapping[str, Any]) -> str:
    if "content" in action:
        return str(action["content"])
    last_user = _last_user_text(body["messages"])
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    ):
        schema = _asked_schema(body["messages"], response_format)
        if schema is not None:  # a model that follows the schema it was given
            return json.dumps(example_of(schema, "echo: " + last_user), ensure_ascii=False)
        return json.dumps({"echo": last_user}, ensure_ascii=False)
    return "echo: " + last_user


def _asked_schema(
    messages: Sequence[Mapping[str, Any]], response_format: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The JSON Schema the request asks the answer to follow: OpenAI's native
    `json_schema` format, or a system message ending with one after "JSON Schema" (what the
    gateway sends a provider without native structured output)."""
    native = response_format.get("json_schema")
    if isinstance(native, dict) and isinstance(native.get("schema"), dict):
        return native["schema"]
    for message in reversed(messages):
        text = _content_text(message.get("content"))
        if message.get("role") == "system" and "JSON Schema" in text and "\n" in text:
            try:
                found = json.loads(text.rsplit("\n", 1)[1])
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
    return None


def example_of(schema: Mapping[str, Any], text: str) -> Any:
    """A small value valid against common schemas (objects with their required properties,
    arrays, strings, numbers, enums, consts): strings are `text`, arrays empty unless
    `minItems` asks otherwise."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {
            name: example_of(properties.get(name) or {}, text)
            for name in schema.get("required") or ()
        }
    if kind == "array":
        items = schema.get("items") or {}
        return [example_of(items, text) for _ in range(int(schema.get("minItems", 0)))]
    if kind in ("number", "integer"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return int(low) + (1 if "exclusiveMinimum" in schema else 0)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


def _cut_at_stop(text: str, stop: object) -> str:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
    return text[: min(cuts)] if cuts else text


def _scripted_calls(action: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """An action's `tool_calls` ([{"name", "arguments" (text or object), "id"?}]) in
    OpenAI's form."""
    calls = []
    for i, raw in enumerate(action.get("tool_calls") or ()):
        arguments = raw.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            {
                "id": str(raw.get("id") or f"call_dev_{i}"),
                "type": "function",
                "function": {"name": str(raw["name"]), "arguments": arguments},
            }
        )
    return tuple(calls)


def build_reply(body: Mapping[str, Any], action: Mapping[str, Any]) -> Reply:
    calls = _scripted_calls(action)
    text = _reply_text(body, action) if not calls or "content" in action else ""
    pieces = _words(_cut_at_stop(text, body.get("stop")))
    finish_reason = "tool_calls" if calls else "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and len(pieces) > max_tokens:
        pieces, finish_reason = pieces[:max_tokens], "length"
    reasoning = _words(str(action.get("reasoning_content", "")))
    call_tokens = sum(len(_words(c["function"]["arguments"])) + 1 for c in calls)
    usage = _usage(body["messages"], len(pieces) + call_tokens, len(reasoning), action.get("usage"))
    return Reply(pieces, reasoning, str(action.get("finish_reason", finish_reason)), usage, calls)


def _usage(
    messages: Sequence[Mapping[str, Any]],
    content_tokens: int,
    reasoning_tokens: int,
    override: Mapping[str, Any] | None,
) -> dict[str, Any]:
    prompt = sum(1 + len(_content_text(m.get("content")).split()) for m in messages)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": content_tokens + reasoning_tokens,
        "total_tokens": 0,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": prompt,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
    override = override or {}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(usage.get(key), dict):
            usage[key] = {**usage[key], **value}
        else:
            usage[key] = value
    # Keep derived fields consistent with whatever the test overrode.
    if "prompt_cache_miss_tokens" not in override:
        usage["prompt_cache_miss_tokens"] = (
            usage["prompt_tokens"] - usage["prompt_cache_hit_tokens"]
        )
    if "prompt_tokens_details" not in override:
        usage["prompt_tokens_details"]["cached_tokens"] = usage["prompt_cache_hit_tokens"]
    if "total_tokens" not in override:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def completion_payload(entry_id: int, model: str, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = list(reply.tool_calls)
        message["content"] = reply.content or None  # as OpenAI sends a call without text
    return {
        "id": f"chatcmpl-dev-{entry_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_devprovider",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": reply.usage,
    }


@dataclass(frozen=True)
class StreamEvents:
    role: bytes
    deltas: list[bytes]
    tail: bytes  # final chunk, optional usage chunk, [DONE]


def stream_events(entry_id: int, body: Mapping[str, Any], reply: Reply) -> StreamEvents:
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base: dict[str, Any] = {
        "id": f"chatcmpl-dev-{entry_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "system_fingerprint": "fp_devprovider",
    }
    if include_usage:
        base["usage"] = None  # OpenAI sends an explicit null on every chunk but the last

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + json_bytes({**base, "choices": [choice]}) + b"\n\n"

    deltas = [event({"reasoning_content": p}) for p in reply.reasoning_pieces]
    deltas += [event({"content": p}) for p in reply.pieces]
    for index, call in enumerate(reply.tool_calls):
        # As OpenAI streams a call: id, type and name first, then the arguments in pieces.
        function = call["function"]
        head = {"index": index, "id": call["id"], "type": "function"}
        deltas.append(
            event(
                {"tool_calls": [{**head, "function": {"name": function["name"], "arguments": ""}}]}
            )
        )
        arguments = function["arguments"]
        for start in range(0, len(arguments), ARGUMENT_PIECE_CHARS):
            piece = arguments[start : start + ARGUMENT_PIECE_CHARS]
            deltas.append(
                event({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    tail = event({}, reply.finish_reason)
    if include_usage:
        tail += b"data: " + json_bytes({**base, "choices": [], "usage": reply.usage}) + b"\n\n"
    tail += b"data: [DONE]\n\n"
    return StreamEvents(event({"role": "assistant", "content": ""}), deltas, tail)


def validate_chat_body(body: object) -> str | None:
    """Return a 400 message for a malformed chat request, None when it is acceptable."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "'model' is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "every message needs a string 'role'"
    problem = _tool_problem(body, messages)
    if problem is not None:
        return problem
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return "'max_tokens' must be a positive integer"
    if not isinstance(body.get("stream", False), bool):
        return "'stream' must be a boolean"
    return None


def _tool_problem(body: Mapping[str, Any], messages: list[dict[str, Any]]) -> str | None:
    """What OpenAI-compatible servers reject about tools: malformed definitions, a tool
    message answering no earlier call, a call left unanswered."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return "'tools' must be a non-empty array"
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(function, dict):  # type: ignore[union-attr]
                return "every tool needs type 'function' and a 'function' object"
            if not isinstance(function.get("name"), str):
                return "every tool function needs a string 'name'"
    elif "tool_choice" in body:
        return "'tool_choice' is only allowed when 'tools' are specified"
    pending: set[str] = set()
    for message in messages:
        role = message["role"]
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                return "a 'tool' message must answer a tool call of the assistant message before it"
            pending.discard(message["tool_call_id"])
            continue
        if pending:
            return "an assistant message with 'tool_calls' must be followed by their tool messages"
        for call in message.get("tool_calls") or ():
            pending.add(call.get("id"))
    if pending:
        return "an assistant message with 'tool_calls' must be followed by their tool messages"
    return None


def retry_after_header(action: Mapping[str, Any]) -> str | None:
    value = action.get("retry_after")
    if value is None or isinstance(value, str):
        return value
    if action.get("retry_after_format") == "http-date":
        return email.utils.formatdate(time.time() + value, usegmt=True)
    return str(int(value)) if float(value).is_integer() else str(value)
