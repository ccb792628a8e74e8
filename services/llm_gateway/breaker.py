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

With `shared` (shared_breaker.py, on by default) the circuit is also shared by every
gateway replica through Redis: the shared state, as the replica's last poll saw it, is
checked first (no Redis call on the request path), and every counted failure or success is
reported to it in the background. Without Redis the local breaker alone decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

import pybreaker

from services.llm_gateway import metrics
from services.llm_gateway.providers import DeadlineSpent, ProviderError
from services.llm_gateway.shared_breaker import ASK, TRIAL, SharedCircuit, SharedOpen

State = Literal["closed", "open", "half-open"]
Scope = Literal["local", "shared"]
_STATE_VALUE = {"closed": 0, "open": 1, "half-open": 2}
_SEVERITY = {"closed": 0, "half-open": 1, "open": 2}


class CircuitOpen(Exception):
    """The provider's breaker refused the call; `retry_after` = seconds until the trial call.
    `scope`: "local" (this replica's breaker) or "shared" (the state of every replica)."""

    def __init__(self, provider: str, retry_after: float, scope: Scope = "local") -> None:
        super().__init__(f"circuit open for provider {provider}")
        self.provider = provider
        self.retry_after = retry_after
        self.scope = scope


def _not_an_answer(exc: BaseException) -> bool:
    """The caller stopped waiting: says nothing about the provider either way."""
    return isinstance(exc, asyncio.CancelledError | GeneratorExit | DeadlineSpent)


def _not_a_provider_fault(exc: BaseException) -> bool:
    return _not_an_answer(exc) or (isinstance(exc, ProviderError) and exc.client_error)


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


class _Attempt:
    """`ProviderBreaker.attempt()`: a plain class, as it runs for every provider attempt
    (an `asynccontextmanager` costs ~2 µs more)."""

    __slots__ = ("breaker", "counted")

    def __init__(self, breaker: ProviderBreaker) -> None:
        self.breaker = breaker
        self.counted: AbstractContextManager[None] | None = None

    async def __aenter__(self) -> None:
        breaker = self.breaker
        shared = breaker.shared
        trial = False
        if shared is not None:
            try:
                admitted = shared.admit()
                if admitted == ASK:
                    admitted = await shared.take_trial()
            except SharedOpen as refused:
                raise CircuitOpen(breaker.provider, refused.retry_after, "shared") from None
            trial = admitted == TRIAL
        self.counted = breaker._counted(trial)
        self.counted.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self.counted is not None
        return self.counted.__exit__(exc_type, exc, tb)


class ProviderBreaker:
    def __init__(
        self,
        provider: str,
        *,
        fail_max: int,
        reset_s: float,
        shared: SharedCircuit | None = None,
    ) -> None:
        self.provider = provider
        self.reset_s = reset_s
        self.shared = shared
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
        if shared is not None:
            shared.local = self.cb

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Guard one attempt; raise CircuitOpen instead of calling while the circuit is open.

        Synchronous: with a shared circuit in its half-open state it refuses the call unless
        this replica already holds the trial lease (`attempt()` takes the lease).
        """
        trial = False
        if self.shared is not None:
            try:
                admitted = self.shared.admit()
            except SharedOpen as refused:
                raise CircuitOpen(self.provider, refused.retry_after, "shared") from None
            if admitted == ASK:
                raise CircuitOpen(self.provider, self.shared.hub.poll_s, "shared")
            trial = admitted == TRIAL
        with self._counted(trial):
            yield

    def attempt(self) -> _Attempt:
        """`async with breaker.attempt():` = `calling()` that, in the shared half-open state,
        asks Redis for the trial lease (one round trip, only then): the replica that gets it
        makes the trial."""
        return _Attempt(self)

    @contextmanager
    def _counted(self, trial: bool) -> Iterator[None]:
        """The local breaker around the attempt, and the outcome reported to the shared one.

        With `throw_new_error_on_trip=False` pybreaker raises CircuitBreakerError only when
        refusing a call, so any such error here comes from the open state, not from the body.
        """
        shared = self.shared
        try:
            with self.cb.calling():
                yield
        except pybreaker.CircuitBreakerError:
            if shared is not None:
                shared.abandoned(trial)
            raise CircuitOpen(self.provider, self.retry_after()) from None
        except BaseException as exc:
            if shared is not None:
                if _not_an_answer(exc):
                    shared.abandoned(trial)
                elif isinstance(exc, ProviderError) and exc.client_error:
                    shared.succeeded(trial)  # the provider did answer
                else:
                    shared.failed(trial)
            raise
        if shared is not None:
            shared.succeeded(trial)

    def retry_after(self) -> float:
        opened_at = self.cb._state_storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(0.0, self.reset_s - elapsed)

    @property
    def state(self) -> State:
        """closed / open / half-open as this replica acts on it: the more restrictive of
        the local and the shared state. An open circuit whose timeout elapsed reports
        half-open (the next call is the trial) although pybreaker moves it only on that call."""
        local: State = self.cb.current_state  # type: ignore[assignment]
        if local == "open" and self.retry_after() <= 0:
            local = "half-open"
        shared = self.shared_state
        if shared is not None and _SEVERITY[shared] > _SEVERITY[local]:
            return shared
        return local

    @property
    def shared_state(self) -> State | None:
        """The state shared by every replica as this one last saw it (None: no shared
        breaker, or Redis unreachable); open past its timeout reports half-open."""
        if self.shared is None or self.shared.state is None:
            return None
        if self.shared.state == "open" and self.shared.open_until <= time.monotonic():
            return "half-open"
        return self.shared.state

    @property
    def shared_failures(self) -> int:
        return self.shared.failures if self.shared is not None else 0

    @property
    def failures(self) -> int:
        return int(self.cb.fail_counter)
