"""Opaque page tokens of GetHistory, and serving a page from a cached window.

A token names the session, the order and the boundary sequence the next page continues
from; it is base64url JSON (opaque to callers, who must only echo it back). A token used
with another session or order is INVALID_ARGUMENT.

`page_from_window` answers exactly what the DuckDB path answers, or None when the window
cannot prove it (then DuckDB serves the page). The DuckDB path reads `size + 1` rows and
issues a token when more rows exist; sequences in DuckDB are contiguous from the oldest
retained message to the latest (retention only ever removes a prefix of a session).
"""

from __future__ import annotations

import base64
import binascii
import json

from libs.common.errors import InvalidArgument
from services.memory.hot_tier import Window
from services.memory.models import Order, Page


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


def page_from_window(window: Window, order: Order, boundary: int | None, size: int) -> Page | None:
    lo, hi = window.lo, window.hi
    if order is Order.ASC:
        after = boundary or 0
        if after + 1 < lo:
            return None  # older messages than the window holds may exist
        last = min(after + size, hi)
        messages = window.between(after + 1, last) if after + 1 <= last else []
        return Page(messages, last if last < hi else None)
    before = hi + 1 if boundary is None else boundary
    if before > hi + 1:
        return None
    start = before - size
    if start > lo:  # the window holds start - 1, so a further page exists
        return Page(list(reversed(window.between(start, before - 1))), start)
    if lo == 1:  # the window reaches the session's first message
        first = max(start, 1)
        messages = window.between(first, before - 1) if first <= before - 1 else []
        return Page(list(reversed(messages)), None)
    return None
