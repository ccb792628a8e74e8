"""Schema-checked JSON: the caller's JSON Schema, the answer's validation, the repair prompt.

The schema is checked with `jsonschema` (Draft 2020-12) before any provider is called. An
answer is one JSON value valid against it; a first answer that is not gets one repair round
(the bad answer and its errors sent back), see `Gateway.complete`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from libs.common.errors import FailedPrecondition, Violations

MAX_SCHEMA_BYTES = 64 * 1024
MAX_REPORTED_ERRORS = 10
_MAX_ERROR_CHARS = 200
SCHEMA_MISMATCH = "SCHEMA_MISMATCH"


@dataclass(frozen=True)
class AnswerSchema:
    """A checked schema: its parsed document and a validator."""

    document: Any
    validator: Draft202012Validator

    @cached_property
    def instruction(self) -> str:
        """The system message asking for JSON when the provider cannot enforce the schema."""
        return (
            "Answer with one JSON object only (no prose, no code fences) that is valid "
            "against this JSON Schema (Draft 2020-12):\n"
            + json.dumps(self.document, ensure_ascii=False, separators=(",", ":"))
        )

    def response_format(self) -> dict[str, Any]:
        """OpenAI's native structured output request."""
        return {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": self.document, "strict": True},
        }

    def check(self, text: str) -> tuple[str | None, list[str]]:
        """(the answer re-serialised compactly, []) when valid; else (None, the errors as
        `path: message`, at most MAX_REPORTED_ERRORS)."""
        value, problem = parse_answer(text)
        if problem is not None:
            return None, [problem]
        errors = sorted(self.validator.iter_errors(value), key=lambda e: e.json_path)
        if errors:
            out = [_clip(f"{e.json_path}: {e.message}") for e in errors[:MAX_REPORTED_ERRORS]]
            if len(errors) > MAX_REPORTED_ERRORS:
                out.append(f"… and {len(errors) - MAX_REPORTED_ERRORS} more")
            return None, out
        return compact(value), []


def load_schema(
    text: str, violations: Violations, field: str = "json_schema"
) -> AnswerSchema | None:
    """A JSON Schema given as text (the request's `json_schema`, a tool's `parameters`),
    checked; a violation on `field` when it is not one."""
    if not text:
        return None
    if len(text) > MAX_SCHEMA_BYTES // 4 and len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        violations.add(field, f"at most {MAX_SCHEMA_BYTES} bytes of UTF-8")
        return None
    try:
        document = json.loads(text)
    except ValueError as exc:
        violations.add(field, f"not valid JSON: {exc}")
        return None
    if not isinstance(document, dict):
        violations.add(field, "must be a JSON object (a JSON Schema document)")
        return None
    try:
        Draft202012Validator.check_schema(document)
    except SchemaError as exc:
        where = exc.json_path if exc.path else "$"
        violations.add(field, _clip(f"not a valid JSON Schema at {where}: {exc.message}"))
        return None
    return AnswerSchema(document, Draft202012Validator(document))


def parse_answer(text: str) -> tuple[Any, str | None]:
    """The JSON value of an answer (one surrounding ``` fence tolerated), or a problem."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        if body.startswith("json"):
            body = body[4:]
        body = body.strip()
    if not body:
        return None, "$: the answer is empty, not JSON"
    try:
        return json.loads(body), None
    except ValueError as exc:
        return None, _clip(f"$: the answer is not valid JSON ({exc})")


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def repair_message(errors: list[str]) -> str:
    return (
        "Your answer is not valid against the JSON Schema:\n"
        + "\n".join(f"- {e}" for e in errors)
        + "\nReply with the corrected JSON only, nothing else."
    )


def mismatch(errors: list[str], *, repaired: bool) -> FailedPrecondition:
    tried = "after one repair round" if repaired else "(no room left for a repair round)"
    return FailedPrecondition(
        f"the model's answer does not match json_schema {tried}: " + "; ".join(errors),
        reason=SCHEMA_MISMATCH,
        # Bounded (≤ 10 errors of ≤ 200 characters): status details travel in a trailer, and
        # gRPC's metadata limit is 8 KiB.
        metadata={"errors": "\n".join(errors)},
    )


def _clip(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
