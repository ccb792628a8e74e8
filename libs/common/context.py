"""Per-RPC context that servicers and downstream clients read (set by the interceptor).

Held in contextvars, so it follows the handling task and any task it spawns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from libs.common.auth import ANONYMOUS, Identity
from libs.common.ratelimit import CallerLimit

_identity: ContextVar[Identity] = ContextVar("finsight_identity", default=ANONYMOUS)
_deadline: ContextVar[float | None] = ContextVar("finsight_deadline", default=None)
_bearer: ContextVar[str | None] = ContextVar("finsight_bearer", default=None)
_on_behalf_of: ContextVar[str | None] = ContextVar("finsight_on_behalf_of", default=None)
_caller_limit: ContextVar[CallerLimit | None] = ContextVar("finsight_caller_limit", default=None)


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


def on_behalf_of_tenant() -> str | None:
    """The tenant downstream calls act for (`x-finsight-on-behalf-of-tenant`): the tenant
    of a delegated inbound call, or of a background job bound with `on_behalf_of`."""
    return _on_behalf_of.get()


def bind(
    identity: Identity,
    time_remaining: float | None,
    bearer: str | None,
    *,
    on_behalf_of: str | None = None,
) -> None:
    """Called by the server interceptor inside the RPC's task (and by background jobs:
    `on_behalf_of` makes their calls with the service key act for that tenant)."""
    _identity.set(identity)
    _deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)
    _bearer.set(bearer)
    _on_behalf_of.set(on_behalf_of or (identity.tenant if identity.delegated else None))


def defer_caller_limit(limit: CallerLimit | None) -> None:
    """Called by the server interceptor for a method whose handler spends the caller's
    rate limit itself (`MethodPolicy.limit_in_handler`)."""
    _caller_limit.set(limit)


def deferred_caller_limit() -> CallerLimit | None:
    """The caller's rate limit this RPC's handler is to spend, if not spent yet."""
    limit = _caller_limit.get()
    return None if limit is None or limit.spent else limit


@contextmanager
def acting_for(tenant: str) -> Iterator[None]:
    """Background work on a tenant's data: downstream calls inside carry the service's own
    key (no caller key is forwarded) and act for `tenant` (the key needs scope
    `tenant.delegate`), so usage, limits and budgets are the tenant's."""
    bearer, behalf = _bearer.set(None), _on_behalf_of.set(tenant)
    try:
        yield
    finally:
        _on_behalf_of.reset(behalf)
        _bearer.reset(bearer)
