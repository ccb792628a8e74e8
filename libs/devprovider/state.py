"""Scripted actions and the provider's mutable state (queue, sticky default, request log)."""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libs.devprovider.wire import Request

DEFAULT_API_KEY = "sk-devprovider"

_NUMBER = (int, float)
_ACTION_TYPES: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "retry_after": (int, float, str),
    "retry_after_format": (str,),
    "message": (str,),
    "error_type": (str,),
    "error_code": (str,),
    "delay_ms": _NUMBER,
    "hang": (bool,),
    "drop": (bool,),
    "cut_after_chunks": (int,),
    "chunk_delay_ms": _NUMBER,
    "keepalive_lines": (int,),
    "keepalive_interval_ms": _NUMBER,
    "content": (str,),
    "reasoning_content": (str,),
    "tool_calls": (list,),
    "finish_reason": (str,),
    "usage": (dict,),
    "headers": (dict,),
    "body": (dict, list, str, int, float),
    "times": (int,),
}


class ScriptError(ValueError):
    """A control request carried an invalid action."""


def validate_action(raw: object) -> dict[str, Any]:
    """Check an action's keys and value types; return a plain-dict copy."""
    if not isinstance(raw, Mapping):
        raise ScriptError(f"an action must be a JSON object, got {type(raw).__name__}")
    action = dict(raw)
    unknown = sorted(set(action) - set(_ACTION_TYPES))
    if unknown:
        raise ScriptError(f"unknown action keys {unknown}; allowed: {sorted(_ACTION_TYPES)}")
    for key, value in action.items():
        allowed = _ACTION_TYPES[key]
        # bool is an int subclass: only accept it where bool is meant.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ScriptError(f"action key {key!r} has invalid value {value!r}")
    if action.get("retry_after_format", "seconds") not in ("seconds", "http-date"):
        raise ScriptError("retry_after_format must be 'seconds' or 'http-date'")
    return action


def _expand_actions(raw_actions: Iterable[object]) -> list[dict[str, Any]]:
    expanded: list[dict[str, Any]] = []
    for raw in raw_actions:
        action = validate_action(raw)
        times = action.pop("times", 1)
        expanded.extend(dict(action) for _ in range(times))
    return expanded


@dataclass
class ProviderState:
    """Mutable provider state; lives on the event loop thread of the server."""

    api_key: str | None = DEFAULT_API_KEY
    latency_ms: float = 0.0
    log_limit: int = 10_000
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    default: dict[str, Any] | None = None
    log: deque[dict[str, Any]] = field(init=False)
    _ids: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = deque(maxlen=self.log_limit)
        self._ids = itertools.count(1)

    def script(
        self,
        actions: Iterable[object] = (),
        *,
        default: object = ...,
        replace: bool = False,
    ) -> None:
        """Queue one-shot actions and/or set the sticky default (``...`` keeps it)."""
        new_actions = _expand_actions(actions)
        new_default = self.default if default is ... else default
        if new_default is not None:
            new_default = validate_action(new_default)
        if replace:
            self.queue.clear()
        self.queue.extend(new_actions)
        self.default = new_default

    def reset(self) -> None:
        self.queue.clear()
        self.default = None
        self.log.clear()

    def next_action(self) -> dict[str, Any]:
        if self.queue:
            return self.queue.popleft()
        return dict(self.default) if self.default else {}

    def summary(self) -> dict[str, Any]:
        return {"queued": list(self.queue), "default": self.default, "latency_ms": self.latency_ms}

    def record(self, req: Request) -> dict[str, Any]:
        """Append a request-log entry for ``req`` and return it (mutated as it progresses)."""
        entry: dict[str, Any] = {
            "id": next(self._ids),
            "ts": time.time(),
            "mono": time.monotonic(),
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "body": None,
            "action": None,
            "stream": False,
            "status": None,
            "outcome": None,
            "cancelled": False,
            "chunks_sent": 0,
        }
        try:
            entry["body"] = json.loads(req.body) if req.body else None
        except ValueError:
            entry["body_raw"] = req.body.decode("utf-8", "replace")
        self.log.append(entry)
        return entry
