"""A circuit breaker per provider, on pybreaker.

pybreaker has no asyncio support: decorating a coroutine function only times the creation
of the coroutine, so nothing raised during the `await` is counted. The gateway therefore
wraps the await itself in `calling()`, pybreaker's context manager:

    with breaker.calling():
        answer = await client.complete(...)

Exceptions raised inside the block are counted unless excluded: client errors (4xx other
than 429: the request or the account is at fault, not the provider), cancellations and
attempts ended by the caller's own deadline (the caller went away or could not wait; that
says nothing about the provider). pybreaker treats an excluded
exception like a success (the consecutive-failure counter resets), which is right for a
4xx: the provider did answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

import pybreaker

from services.llm_gateway import metrics
from services.llm_gateway.providers import DeadlineSpent, ProviderError

State = Literal["closed", "open", "half-open"]
_STATE_VALUE = {"closed": 0, "open": 1, "half-open": 2}


class CircuitOpen(Exception):
    """The provider's breaker refused the call; `retry_after` = seconds until the trial call."""

    def __init__(self, provider: str, retry_after: float) -> None:
        super().__init__(f"circuit open for provider {provider}")
        self.provider = provider
        self.retry_after = retry_after


def _not_a_provider_fault(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit | DeadlineSpent):
        return True
    return isinstance(exc, ProviderError) and exc.client_error


class _StateGauge(pybreaker.CircuitBreakerListener):
    def __init__(self, provider: str) -> None:
        self.provider = provider

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: object,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        metrics.BREAKER_STATE.labels(self.provider).set(_STATE_VALUE.get(new_state.name, 0))
        metrics.BREAKER_TRANSITIONS.labels(self.provider, new_state.name).inc()


class ProviderBreaker:
    def __init__(self, provider: str, *, fail_max: int, reset_s: float) -> None:
        self.provider = provider
        self.reset_s = reset_s
        self.cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_s,
            exclude=[_not_a_provider_fault],
            listeners=[_StateGauge(provider)],
            name=provider,
            # Keep the provider's own error (status, Retry-After) for the caller's mapping.
            throw_new_error_on_trip=False,
        )
        metrics.BREAKER_STATE.labels(provider).set(0)

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Guard one attempt; raise CircuitOpen instead of calling while the circuit is open.

        With `throw_new_error_on_trip=False` pybreaker raises CircuitBreakerError only when
        refusing a call, so any such error here comes from the open state, not from the body.
        """
        try:
            with self.cb.calling():
                yield
        except pybreaker.CircuitBreakerError:
            raise CircuitOpen(self.provider, self.retry_after()) from None

    def retry_after(self) -> float:
        opened_at = self.cb._state_storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(0.0, self.reset_s - elapsed)

    @property
    def state(self) -> State:
        """closed / open / half-open; an open circuit whose timeout elapsed reports half-open
        (the next call is the trial) although pybreaker moves it only on that call."""
        current = self.cb.current_state
        if current == "open" and self.retry_after() <= 0:
            return "half-open"
        return current  # type: ignore[return-value]

    @property
    def failures(self) -> int:
        return int(self.cb.fail_counter)
