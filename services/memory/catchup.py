"""The extraction catch-up: user turns the extractor never handled get offered again.

A turn stays unhandled when its job was dropped (queue full), lost (the replica stopped
with jobs queued) or failed (gateway down, throttled). Every
MEMORY_EXTRACTION_CATCHUP_INTERVAL_S, one pass reads, per opted-in tenant, the user turns
of consenting users that are older than MEMORY_EXTRACTION_CATCHUP_AGE_S (the live job had
its chance), younger than MEMORY_EXTRACTION_CATCHUP_MAX_AGE_S and not in
`extracted_messages`, oldest first, and offers them to the extractor as jobs of one session
each. docs/memory.md, "Facts from conversations".

- Bounded: at most MEMORY_EXTRACTION_CATCHUP_BATCH turns a pass, and never more than half
  of the queue (the rest stays for live appends); turns already queued on this replica are
  skipped.
- Harmless while the gateway is down: after a failed gateway call the pass offers one job
  (a probe) instead of a batch, so an outage costs one failed call and one log line per
  interval, and the full pass resumes after the first success.
- Idempotent: the write records the handled turns in the same transaction and skips turns
  already handled, so a turn offered twice (two replicas, or a pass racing its live job)
  writes its facts once; a duplicate costs a model call only. With a shared store
  (replicas on PostgreSQL) a Redis key (SET NX with a TTL just under the interval) lets one
  replica run each interval's pass; if Redis fails, every replica runs it (still
  idempotent).
- Identity: no caller appended these turns, so the jobs run as `memory-extraction-catchup`
  in the turn's tenant (audit rows say so) and the gateway call carries the service's own
  key (FINSIGHT_SERVICE_API_KEY): its usage is billed to that key, not to the tenant.
  Without that key (and with auth on) the catch-up does not start, and says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common import context
from libs.common.auth import Identity
from libs.common.tracing import tracer
from services.memory import metrics
from services.memory.config import MemorySettings
from services.memory.extraction import Extractor, Job
from services.memory.models import StoredMessage, now_us
from services.memory.store import MemoryStore

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

CATCHUP_CALLER = "memory-extraction-catchup"
TURNS_PER_JOB = 20
_US = 1_000_000


def catchup_context(tenant: str) -> contextvars.Context:
    """A context of its own for a catch-up job: the tenant's, no caller key to forward."""
    ctx = contextvars.Context()
    identity = Identity(caller=CATCHUP_CALLER, tenant=tenant, scopes=frozenset(), key_id="")
    ctx.run(context.bind, identity, None, None)
    return ctx


def jobs_of(tenant: str, turns: list[StoredMessage]) -> list[Job]:
    """The turns as jobs of one (user, session) each, at most TURNS_PER_JOB turns, in the
    order their oldest turn was stored."""
    groups: dict[tuple[str, str], list[StoredMessage]] = {}
    for turn in turns:
        groups.setdefault((turn.user_id, turn.session_id), []).append(turn)
    out: list[Job] = []
    for (user_id, session_id), group in groups.items():
        group.sort(key=lambda m: m.sequence)
        for i in range(0, len(group), TURNS_PER_JOB):
            chunk = tuple(group[i : i + TURNS_PER_JOB])
            out.append(Job(tenant, user_id, session_id, chunk, catchup_context(tenant)))
    return out


class ExtractionCatchUp:
    def __init__(
        self,
        settings: MemorySettings,
        store: MemoryStore,
        extractor: Extractor,
        redis: Redis | None = None,
        *,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.settings = settings
        self.store = store
        self.extractor = extractor
        self.redis = redis
        self.clock = clock
        self.lock_key = f"{settings.memory_redis_prefix}:lock:extraction-catchup"
        self._task: asyncio.Task[None] | None = None

    @property
    def can_call_gateway(self) -> bool:
        """Whether the jobs have a key to present: no caller key is there to forward."""
        settings = self.settings
        return settings.finsight_service_api_key is not None or not settings.finsight_auth_enabled

    def start(self) -> None:
        if self.settings.memory_extraction_catchup_interval_s <= 0:
            return
        if not self.can_call_gateway:
            log.warning(
                "extraction catch-up off: its gateway calls need the service's own key "
                "(FINSIGHT_SERVICE_API_KEY is unset)"
            )
            return
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.memory_extraction_catchup_interval_s)
            try:
                if await self._claim():
                    await self.run_pass()
                else:
                    metrics.EXTRACTION_CATCHUP_PASSES.labels("skipped_lock").inc()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store outage: try again next interval
                metrics.EXTRACTION_CATCHUP_PASSES.labels("error").inc()
                log.exception("extraction catch-up pass failed")

    async def _claim(self) -> bool:
        """This interval's pass is ours: always with a store of our own; with a shared one,
        when no other replica set the key first (or Redis cannot say)."""
        if not self.store.shared or self.redis is None:
            return True
        ttl_ms = max(1, int(self.settings.memory_extraction_catchup_interval_s * 900))
        try:
            return bool(await self.redis.set(self.lock_key, "1", nx=True, px=ttl_ms))
        except (RedisError, OSError):
            return True  # idempotent without it: at worst a duplicated model call

    async def _tenants(self) -> list[str]:
        listed = list(self.extractor.tenants)
        if "*" in listed:
            return await self.store.retention_tenants()
        return sorted(listed)

    async def run_pass(self) -> int:
        """One pass; the turns offered."""
        settings = self.settings
        queue_max = self.extractor.queue.maxsize
        room = queue_max - queue_max // 2 - self.extractor.queue_depth  # half stays for live
        probe = not self.extractor.gateway_ok
        jobs_left = min(1, room) if probe else room
        if jobs_left <= 0:  # the queue is half full already: live appends come first
            metrics.EXTRACTION_CATCHUP_PASSES.labels("queue_full").inc()
            return 0
        budget = settings.memory_extraction_catchup_batch
        now = self.clock()
        before = now - int(settings.memory_extraction_catchup_age_s * _US)
        max_age = settings.memory_extraction_catchup_max_age_s
        after = now - int(max_age * _US) if max_age > 0 else None
        offered = due = 0
        with _tracer.start_as_current_span("memory.extract.catchup") as span:
            for tenant in await self._tenants():
                if budget <= 0 or jobs_left <= 0:
                    break
                busy = len(self.extractor.in_flight)
                rows = await self.store.unextracted_messages(
                    tenant, before, after, budget + min(busy, budget)
                )
                turns = [m for m in rows if m.message_id not in self.extractor.in_flight]
                turns = turns[:budget]
                due += len(turns)
                for job in jobs_of(tenant, turns):
                    if jobs_left <= 0 or not self.extractor.submit(job):
                        break
                    jobs_left -= 1
                    offered += len(job.turns)
                budget -= len(turns)
            span.set_attribute("memory.extract.catchup.due", due)
            span.set_attribute("memory.extract.catchup.offered", offered)
            span.set_attribute("memory.extract.catchup.probe", probe)
        metrics.EXTRACTION_CATCHUP_PASSES.labels("probe" if probe else "ran").inc()
        metrics.EXTRACTION_CATCHUP_PENDING.set(due)
        metrics.EXTRACTION_CATCHUP_TURNS.inc(offered)
        if offered and not probe:
            log.info("extraction catch-up offered turns", extra={"turns": offered, "due": due})
        return offered
