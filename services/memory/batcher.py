"""Domain-level group commit: many requests, one write job, a handful of SQL statements.

`libs.common.duck.Database.write` already puts concurrent jobs in one transaction, but each
job still runs its own statements, and a DuckDB statement costs ~0.4-1 ms from Python
whatever its size; on PostgreSQL every transaction pays its round trips and a commit. A
`Batcher` gathers the requests that arrive while the previous batch commits and hands
them to ONE set-based store call (`run(items) -> results`, e.g. `MemoryStore.append_batch`:
one transaction), so the cost per request falls with load instead of staying per
statement. Every caller's future resolves only after the batch COMMITs (and after
`after_commit`, e.g. the Redis write-through, which therefore cannot be skipped by a
client that gives up).

If a batch fails, its items are retried one by one so one bad request cannot fail its
neighbours (the same rule as the group committer below it).

Tracing: the batch runs (its store call and `after_commit`) in the trace context of its
first request, so that request's trace shows the DuckDB/PostgreSQL and Redis round trips
it waited for as children of the span it submitted from; the others' traces show the
wait (their own submitting span) without repeating them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from opentelemetry import context as otel_context

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        after_commit: Callable[[list[T], list[R]], Awaitable[None]] | None = None,
        max_batch: int = 512,
    ) -> None:
        self.name = name
        self.run = run
        self.after_commit = after_commit
        self.max_batch = max_batch
        # Each item with its caller's future and trace context (see the module docstring).
        self._pending: list[tuple[T, asyncio.Future[R], otel_context.Context]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Finish what was submitted, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def submit(self, item: T) -> R:
        if self._closing:
            raise RuntimeError(f"batcher {self.name} is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future, otel_context.get_current()))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                self._pending = self._pending[self.max_batch :]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(
        self, batch: Sequence[tuple[T, asyncio.Future[R], otel_context.Context]]
    ) -> None:
        token = otel_context.attach(batch[0][2])
        try:
            await self._commit_in_context(batch)
        finally:
            otel_context.detach(token)

    async def _commit_in_context(
        self, batch: Sequence[tuple[T, asyncio.Future[R], otel_context.Context]]
    ) -> None:
        items = [item for item, _, _ in batch]
        try:
            results = await self.run(items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            log.info(
                "batch failed; retrying its requests one by one",
                extra={"batcher": self.name, "items": len(batch)},
            )
            for one in batch:
                await self._commit([one])
            return
        if self.after_commit is not None:
            try:
                await self.after_commit(items, results)
            except Exception:  # after-commit work is best effort; the data is committed
                log.exception("after-commit hook failed", extra={"batcher": self.name})
        for (_, future, _), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(
    future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None
) -> None:
    if future.done():  # the caller went away; the work is done regardless
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
