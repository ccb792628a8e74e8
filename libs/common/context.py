"""Per-RPC context that servicers and downstream clients read (set by the interceptor).

Held in contextvars, so it follows the handling task and any task it spawns.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from libs.common.auth import ANONYMOUS, Identity

_identity: ContextVar[Identity] = ContextVar("finsight_identity", default=ANONYMOUS)
_deadline: ContextVar[float | None] = ContextVar("finsight_deadline", default=None)
_bearer: ContextVar[str | None] = ContextVar("finsight_bearer", default=None)


def current_identity() -> Identity:
    """The authenticated caller of the RPC being handled."""
    return _identity.get()


def current_tenant() -> str:
    """The tenant every read and write of this RPC is scoped to."""
    return _identity.get().tenant


def remaining_time() -> float | None:
    """Seconds left before the caller's deadline, or None if the caller set none."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def inbound_bearer() -> str | None:
    """The caller's API key, forwarded downstream so the callee sees the same identity."""
    return _bearer.get()


def bind(identity: Identity, time_remaining: float | None, bearer: str | None) -> None:
    """Called by the server interceptor inside the RPC's task."""
    _identity.set(identity)
    _deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)
    _bearer.set(bearer)
