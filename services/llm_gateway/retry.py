"""Retry policy for provider attempts, on tenacity.

* retried: 429, 500, 502, 503, 504, connection errors, timeouts, dropped/truncated
  responses; never 400/401/402/403/422 (retrying cannot fix them);
* wait: exponential backoff with full jitter, `uniform(0, min(max, base * 2**n))`, but never
  less than the provider's `Retry-After` on *every* attempt (not only the first);
* a `Retry-After` above the cap stops retrying this link (waiting less would ignore it; the
  caller gets it back in RetryInfo, or the next link of the route is tried);
* never past the caller's deadline: a retry whose sleep plus a minimal attempt would end
  after the deadline is not made.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from services.llm_gateway.providers import ProviderError

T = TypeVar("T")

# An attempt with less time than this left is not worth starting.
MIN_ATTEMPT_S = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base_s: float
    max_backoff_s: float
    retry_after_cap_s: float

    def backoff(self, retry_number: int) -> float:
        """Full-jitter backoff before retry `retry_number` (1 = first retry)."""
        ceiling = min(self.max_backoff_s, self.base_s * 2 ** (retry_number - 1))
        return random.uniform(0, ceiling)

    def wait_s(self, retry_number: int, error: BaseException | None) -> float:
        if getattr(error, "retry_elsewhere", False):
            return 0.0  # another key of the provider takes it now (deployments.py)
        wait = self.backoff(retry_number)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            wait = max(wait, min(float(retry_after), self.retry_after_cap_s))
        return wait

    def retrying(
        self,
        *,
        deadline: float | None,
        max_retries: int | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
    ) -> AsyncRetrying:
        """A tenacity controller for one chain link (`deadline` on the monotonic clock)."""
        limit = self.max_retries if max_retries is None else max_retries
        cap = self.retry_after_cap_s

        def stop(state: RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if state.attempt_number > limit:
                return True
            retry_after = getattr(error, "retry_after", None)
            if retry_after is not None and retry_after > cap:
                return True
            return deadline is not None and (
                time.monotonic() + state.upcoming_sleep + MIN_ATTEMPT_S > deadline
            )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_s(state.attempt_number, error)

        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                error = state.outcome.exception()
                if error is not None:
                    on_retry(error, state.upcoming_sleep)

        return AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable),
            stop=stop,
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        deadline: float | None,
        max_retries: int | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
    ) -> T:
        # Fast path: the first attempt runs without tenacity, whose set-up (controller,
        # call state, action chain, coroutine-function inspection) cost ~0.1 ms of CPU per
        # request. A retryable failure then enters tenacity as its first attempt's outcome,
        # replayed, so stop/wait/before_sleep see exactly what they would have seen.
        try:
            return await attempt()
        except ProviderError as exc:
            if not exc.retryable:
                raise
            failed: list[BaseException] = [exc]

        async def replay_then_attempt() -> T:
            if failed:
                raise failed.pop()
            return await attempt()

        retrying = self.retrying(deadline=deadline, max_retries=max_retries, on_retry=on_retry)
        return await retrying(replay_then_attempt)
