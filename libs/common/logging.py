"""Structured JSON logs: one object per line, with trace ids and secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace

# Bearer tokens, provider keys (sk-...), and `key=value` pairs whose key says secret. Each
# pattern comes with the literals it cannot match without: a line (most access-log lines)
# that holds none of them skips the regular expression, which is most of the cost of a line.
_PATTERNS: list[tuple[re.Pattern[str], tuple[str, ...], bool]] = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), ("bearer",), True),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), ("sk-",), False),
    (
        re.compile(
            r"(?i)((?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{4,}"
        ),
        ("api", "token", "secret", "password"),
        True,
    ),
]
_REDACTED = "[REDACTED]"


class Redactor:
    """Masks secret patterns and any exact secret values this process knows about."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add_values(self, values: Iterable[str]) -> None:
        self._values.update(v for v in values if len(v) >= 6)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, _REDACTED)
        # casefold() folds at least what re.IGNORECASE matches (e.g. U+017F to "s"), so a line
        # whose folded text lacks every trigger cannot match that pattern.
        folded = text.casefold()
        for pattern, triggers, ignore_case in _PATTERNS:
            haystack = folded if ignore_case else text
            if any(t in haystack for t in triggers):
                text = pattern.sub(_mask, text)
        return text


def _mask(match: re.Match[str]) -> str:
    return (match.group(1) if match.groups() else "") + _REDACTED


redact = Redactor()

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(service: str, level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Route all logging to stdout as JSON lines. Idempotent."""
    redact.add_values(secrets)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root.handlers = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "grpc._cython"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ThrottledLog:
    """A warning that every request would repeat while a dependency is down (Redis away:
    every rate-limit check, cache read, budget check fails): logged the first time, then
    at most once per `interval_s` per message, with `suppressed` = how many occurrences
    since the last line. The metrics count every occurrence; the log tells when and why."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, msg: str, *, extra: dict[str, Any] | None = None) -> None:
        self.log(logging.WARNING, msg, extra=extra)

    def log(self, level: int, msg: str, *, extra: dict[str, Any] | None = None) -> None:
        now = self.clock()
        last = self._last.get(msg)
        if last is not None and now - last < self.interval_s:
            self._suppressed[msg] = self._suppressed.get(msg, 0) + 1
            return
        self._last[msg] = now
        suppressed = self._suppressed.pop(msg, 0)
        self.logger.log(level, msg, extra={**(extra or {}), "suppressed": suppressed})
