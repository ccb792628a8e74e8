"""Input limits of the memory service and the checks that enforce them.

Every check appends to a `Violations` collector under the field path the caller sent
(`messages[2].message.content`), so one INVALID_ARGUMENT reports every bad field; callers
raise before anything is written. docs/memory.md lists the limits.
"""

from __future__ import annotations

import math
import re

from libs.common.errors import Violations

MAX_ID_CHARS = 128
MAX_CONTENT_BYTES = 32 * 1024
MAX_BATCH_MESSAGES = 100
MAX_BATCH_BYTES = 1024 * 1024
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_FACT_BYTES = 2 * 1024
MAX_BATCH_FACTS = 100
MAX_TAGS = 16
MAX_TAG_CHARS = 64
MAX_KIND_CHARS = 32
MAX_FILTER_VALUES = 16
MAX_QUERY_BYTES = 2 * 1024
MAX_BUILD_QUERY_BYTES = 32 * 1024
MAX_PREAMBLE_BYTES = 8 * 1024
DEFAULT_K, MAX_K = 10, 100
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
MIN_BUDGET, MAX_BUDGET = 256, 131_072
MAX_CONTEXT_FACTS = 50
MAX_FORGET_IDS = 1000
DEFAULT_IMPORTANCE = 0.5
DEFAULT_KIND = "general"

_ID = re.compile(r"[A-Za-z0-9._:@-]+")
_TAG = re.compile(r"[A-Za-z0-9._:-]+")
_KIND = re.compile(r"[a-z0-9_]+")
_STORED_ID = {"fct": re.compile(r"fct_[0-9a-f]{32}"), "msg": re.compile(r"msg_[0-9a-f]{32}")}


def check_id(v: Violations, field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            v.add(field, "is required")
        return
    if len(value) > MAX_ID_CHARS:
        v.add(field, f"must be at most {MAX_ID_CHARS} characters")
    elif not _ID.fullmatch(value):
        v.add(field, "may only contain letters, digits and . _ : @ -")


def check_text(
    v: Violations, field: str, value: str, *, max_bytes: int, required: bool = True
) -> int:
    """Check a free-text field; returns its UTF-8 size."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if not value.strip():
        if required:
            v.add(field, "must not be empty")
        return size
    if size > max_bytes:
        v.add(field, f"must be at most {max_bytes} bytes of UTF-8 (got {size})")
    elif "\x00" in value:
        v.add(field, "must not contain NUL characters")
    return size


def check_stored_id(v: Violations, field: str, value: str, prefix: str) -> None:
    if not _STORED_ID[prefix].fullmatch(value):
        v.add(field, f"is not a valid id (expected {prefix}_ followed by 32 hex digits)")


def check_kind(v: Violations, field: str, value: str) -> None:
    if len(value) > MAX_KIND_CHARS or not _KIND.fullmatch(value):
        v.add(field, f"must be 1-{MAX_KIND_CHARS} characters of a-z, 0-9 and _")


def check_tag(v: Violations, field: str, value: str) -> None:
    if not value or len(value) > MAX_TAG_CHARS or not _TAG.fullmatch(value):
        v.add(field, f"must be 1-{MAX_TAG_CHARS} characters of letters, digits and . _ : -")


def check_importance(v: Violations, field: str, value: float) -> None:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        v.add(field, "must be between 0 and 1")


def check_range(
    v: Violations, field: str, value: int, low: int, high: int, *, zero_means_default: bool = True
) -> None:
    if value == 0 and zero_means_default:
        return
    if not low <= value <= high:
        v.add(
            field,
            f"must be between {low} and {high}" + (" (0 = default)" if zero_means_default else ""),
        )


def check_metadata(v: Violations, field: str, metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        v.add(field, f"at most {MAX_METADATA_ENTRIES} entries")
        return
    for key, value in sorted(metadata.items()):
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            v.add(f"{field}[{key!r}]", f"keys must be 1-{MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS or "\x00" in value:
            v.add(
                f"{field}[{key!r}]",
                f"values must be at most {MAX_METADATA_VALUE_CHARS} characters, no NUL",
            )
