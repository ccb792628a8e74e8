"""Token costs of appended messages, counted in shared tokenizer calls.

Every appended message gets its cost as a context turn (`context_builder.turn_costs`,
stored with the message so BuildContext adds integers instead of re-tokenizing). Counting
per RPC on the event loop cost ~0.1-0.3 ms of loop time per request (the tokenizer's batch
entry point has a fixed overhead), and counting a whole append batch just before its write
put the tokenizer in series with DuckDB. Here the appends waiting at the same moment share
one call, which runs while the previous write commits: small groups inline (cheaper than a
thread hop), big ones on a thread (the tokenizer releases the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from services.memory.context_builder import turn_costs

INLINE_CHARS = 4096  # ~0.1-0.5 ms of tokenizer time

Turn = tuple[str, str]  # (role, content)


class TokenCounter:
    def __init__(self) -> None:
        self._pending: list[tuple[Sequence[Turn], asyncio.Future[list[int]]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="memory-token-counter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, future in self._pending:
            future.cancel()

    async def costs(self, turns: Sequence[Turn]) -> list[int]:
        """The turn cost of each (role, content)."""
        if self._task is None or self._task.done():  # not started (tests) or closed
            return await _count(list(turns))
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append((turns, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    counted = await _count([t for turns, _ in group for t in turns])
                except Exception as exc:  # e.g. the tokenizer failed: each caller fails
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                at = 0
                for turns, future in group:
                    if not future.done():  # the caller may have gone away
                        future.set_result(counted[at : at + len(turns)])
                    at += len(turns)


async def _count(turns: list[Turn]) -> list[int]:
    if sum(len(content) for _, content in turns) <= INLINE_CHARS:
        return turn_costs(turns)
    return await asyncio.to_thread(turn_costs, turns)
