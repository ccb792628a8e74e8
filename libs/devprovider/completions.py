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


@dataclass(frozen=True)
class Reply:
    pieces: list[str]
    reasoning_pieces: list[str]
    finish_reason: str
    usage: dict[str, Any]

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
        return json.dumps({"echo": last_user}, ensure_ascii=False)
    return "echo: " + last_user


def _cut_at_stop(text: str, stop: object) -> str:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
    return text[: min(cuts)] if cuts else text


def build_reply(body: Mapping[str, Any], action: Mapping[str, Any]) -> Reply:
    pieces = _words(_cut_at_stop(_reply_text(body, action), body.get("stop")))
    finish_reason = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and len(pieces) > max_tokens:
        pieces, finish_reason = pieces[:max_tokens], "length"
    reasoning = _words(str(action.get("reasoning_content", "")))
    usage = _usage(body["messages"], len(pieces), len(reasoning), action.get("usage"))
    return Reply(pieces, reasoning, str(action.get("finish_reason", finish_reason)), usage)


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
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return "'max_tokens' must be a positive integer"
    if not isinstance(body.get("stream", False), bool):
        return "'stream' must be a boolean"
    return None


def retry_after_header(action: Mapping[str, Any]) -> str | None:
    value = action.get("retry_after")
    if value is None or isinstance(value, str):
        return value
    if action.get("retry_after_format") == "http-date":
        return email.utils.formatdate(time.time() + value, usegmt=True)
    return str(int(value)) if float(value).is_integer() else str(value)
