"""Accounting after the answer: off the caller's critical path, seen by the tenant's next
admission on this replica, drained on a clean stop.

A provider's answer costs one more Redis round trip before it is complete on our side: the
usage counters, the budget settlement (the reservation replaced by the real cost), the TPM
refund, the usage stream event and the cache write (`Gateway._account`). None of it changes
the answer, so the gateway returns the answer first and runs those writes as a task
(benchmarks/bench_gateway: ~0.3 ms of the concurrency-1 overhead; docs/llm_gateway.md).

What keeps this as correct as writing before answering:

- Budget: admission already reserved the request's maximum cost in the same Redis script
  that checked it, so until the settlement lands the tenant's spend is over-counted, never
  under-counted; no replica can overspend in the gap, and a stop that loses the write
  (SIGKILL) leaves the over-count (conservative), as a crash between the provider's answer
  and an inline write always did.
- Read-your-writes on this replica: the tenant's next admission and response-cache lookup
  wait for that tenant's pending writes (`settled`), and GetUsage for every pending write,
  so a caller's next request, a repeated request (cache) or a usage report sees every
  answer given before it. Other replicas see a write one round trip later.
- Bounded: at most `max_pending` writes run in the background; beyond that the answering
  request waits for its own write (Redis slower than the answers: back-pressure, not
  memory growth).
- A clean stop (`drain`, a shutdown hook) waits for every pending write before Redis
  closes.

Each write runs in the answering request's context: its `llm.usage.record` span stays in
the request's trace, and a failure is logged by the write itself (`Gateway._account`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

DEFAULT_MAX_PENDING = 10_000


class AfterAnswer:
    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._by_tenant: dict[str, set[asyncio.Task[None]]] = {}
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def submit(self, tenant: str, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` after the caller returns (at once when too many are pending)."""
        if self._pending >= self.max_pending:
            await work
            return
        task = asyncio.get_running_loop().create_task(work)
        self._by_tenant.setdefault(tenant, set()).add(task)
        self._pending += 1
        task.add_done_callback(lambda done: self._done(tenant, done))

    def _done(self, tenant: str, task: asyncio.Task[None]) -> None:
        self._pending -= 1
        tasks = self._by_tenant.get(tenant)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._by_tenant[tenant]
        if not task.cancelled():
            task.exception()  # retrieved: the work logs its own failures

    async def settled(self, tenant: str | None = None) -> None:
        """Wait for the tenant's (None: every tenant's) writes pending now, not for ones
        submitted meanwhile."""
        if tenant is None:
            tasks = {task for pending in self._by_tenant.values() for task in pending}
        else:
            tasks = set(self._by_tenant.get(tenant, ()))
        if tasks:
            await asyncio.wait(tasks)

    async def drain(self) -> None:
        while self._by_tenant:
            await asyncio.wait({task for tasks in self._by_tenant.values() for task in tasks})
