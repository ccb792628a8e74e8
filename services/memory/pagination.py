"""Opaque page tokens of GetHistory and ListFacts, and serving a page from a cached window.

A token names the session, the order and the boundary sequence the next page continues
from; it is base64url JSON (opaque to callers, who must only echo it back). A token used
with another session or order is INVALID_ARGUMENT.

`page_from_window` answers exactly what the database path answers, or None when the window
cannot prove it (then the database serves the page). The database path reads `size + 1`
rows and issues a token when more rows exist; stored sequences are contiguous from the
oldest retained message to the latest (retention only ever removes a prefix of a session).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from libs.common.errors import InvalidArgument
from services.memory.hot_tier import Window
from services.memory.models import FactsPageKey, Order, Page


def encode_token(session_id: str, order: Order, boundary: int) -> str:
    raw = json.dumps(
        {"s": session_id, "o": order.value, "b": boundary}, separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, session_id: str, order: Order) -> int | None:
    """The boundary sequence of a token (None for an empty token = first page)."""
    if not token:
        return None
    bad = InvalidArgument.field("page_token", "is not a page token of this session and order")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, dict)
        or data.get("s") != session_id
        or data.get("o") != order.value
        or not isinstance(data.get("b"), int)
        or isinstance(data.get("b"), bool)
        or data["b"] < 0
    ):
        raise bad
    return int(data["b"])


def page_from_window(
    window: Window, order: Order, boundary: int | None, size: int, first: int = 1
) -> Page | None:
    """The page from the window, or None when the window cannot prove it. `first` is the
    session's first retained sequence (1 unless retention removed a prefix; a shared store
    reads it from the database): a window starting there holds the session's beginning."""
    lo, hi = window.lo, window.hi
    starts_session = lo <= first
    if order is Order.ASC:
        after = boundary or 0
        if after + 1 < lo and not starts_session:
            return None  # older messages than the window holds may exist
        start = max(after + 1, lo)
        last = min(start + size - 1, hi)
        messages = window.between(start, last) if start <= last else []
        return Page(messages, last if last < hi else None)
    before = hi + 1 if boundary is None else boundary
    if before > hi + 1:
        return None
    start = before - size
    if start > lo:  # the window holds start - 1, so a further page exists
        return Page(list(reversed(window.between(start, before - 1))), start)
    if starts_session:
        begin = max(start, lo)
        messages = window.between(begin, before - 1) if begin <= before - 1 else []
        return Page(list(reversed(messages)), None)
    return None


# -- ListFacts -------------------------------------------------------------------------------
# A ListFacts token names the last fact of its page (created_us, fact_id) and a digest of the
# request it continues (tenant, user, kinds, history): used with another request it is
# INVALID_ARGUMENT, like a GetHistory token of another session.
def facts_binding(tenant: str, user_id: str, kinds: Sequence[str], include_history: bool) -> str:
    raw = json.dumps([tenant, user_id, sorted(set(kinds)), include_history], separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode_facts_token(binding: str, key: FactsPageKey) -> str:
    raw = json.dumps(
        {"r": binding, "c": key.created_us, "f": key.fact_id}, separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_facts_token(token: str, binding: str) -> FactsPageKey | None:
    """Where the page continues (None for an empty token = first page)."""
    if not token:
        return None
    bad = InvalidArgument.field(
        "page_token", "is not a page token of this user, kinds and include_history"
    )
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, dict)
        or data.get("r") != binding
        or not isinstance(data.get("c"), int)
        or isinstance(data.get("c"), bool)
        or not isinstance(data.get("f"), str)
    ):
        raise bad
    return FactsPageKey(int(data["c"]), data["f"])
