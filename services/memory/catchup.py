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
- Capped: a turn whose extraction failed MEMORY_EXTRACTION_CATCHUP_MAX_ATTEMPTS times for
  a reason of its own (the model's answer does not parse, the gateway refuses the job:
  INVALID_ARGUMENT, FAILED_PRECONDITION…; live and catch-up jobs alike) is no longer
  offered (`finsight_memory_extraction_given_up_total`, one log line with its id). Outages
  (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED…) and throttling never count. The
  counts live in Redis, one key per turn with a TTL of the look-back, so replicas share
  them and a restart keeps them; when Redis fails, in a bounded map of this replica's
  (then each replica, or a restarted one, may spend up to the cap again: a few model calls
  more, never a loop). The turns stay unhandled in the store (no schema of its own): the
  look-back ends their offers for good.
- Identity: no caller appended these turns, so the jobs run as `memory-extraction-catchup`
  in the turn's tenant (audit rows say so) and the gateway call carries the service's own
  key (FINSIGHT_SERVICE_API_KEY) with `x-finsight-on-behalf-of-tenant: <the turn's
  tenant>` (the key needs scope `tenant.delegate`): the gateway bills the usage to the
  tenant, and applies its limits and daily budget, as for the tenant's own calls.
  Without that key (and with auth on) the catch-up does not start, and says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

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
LOCAL_ATTEMPTS_MAX = 100_000  # turns whose attempts this replica remembers without Redis
_QUERY_ROWS_MAX = 20_000  # rows one tenant's query may read to look past given-up turns


def catchup_context(tenant: str) -> contextvars.Context:
    """A context of its own for a catch-up job: the tenant's, no caller key to forward;
    the gateway calls carry the service key acting for the tenant."""
    ctx = contextvars.Context()
    identity = Identity(caller=CATCHUP_CALLER, tenant=tenant, scopes=frozenset(), key_id="")
    ctx.run(context.bind, identity, None, None, on_behalf_of=tenant)
    return ctx


def jobs_of(
    tenant: str, turns: list[StoredMessage], retried: frozenset[str] = frozenset()
) -> list[Job]:
    """The turns as jobs of one (user, session) each, at most TURNS_PER_JOB turns, in the
    order their oldest turn was stored; a job with a `retried` turn (one that failed
    before) asks for a fresh answer."""
    groups: dict[tuple[str, str], list[StoredMessage]] = {}
    for turn in turns:
        groups.setdefault((turn.user_id, turn.session_id), []).append(turn)
    out: list[Job] = []
    for (user_id, session_id), group in groups.items():
        group.sort(key=lambda m: m.sequence)
        for i in range(0, len(group), TURNS_PER_JOB):
            chunk = tuple(group[i : i + TURNS_PER_JOB])
            fresh = any(m.message_id in retried for m in chunk)
            out.append(Job(tenant, user_id, session_id, chunk, catchup_context(tenant), fresh))
    return out


class AttemptCounts:
    """Failed extraction attempts per turn: Redis keys `<prefix>:extraction-attempts:
    <tenant>:<message id>` with a TTL (shared by replicas, kept across restarts), and a
    bounded map of this replica's that answers while Redis fails."""

    def __init__(
        self,
        redis: Redis | None,
        prefix: str,
        ttl_s: float,
        *,
        local_max: int = LOCAL_ATTEMPTS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:extraction-attempts"
        self.ttl_s = max(1.0, ttl_s)
        self.local_max = local_max
        self.clock = clock
        self._local: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()

    def _key(self, tenant: str, message_id: str) -> str:
        return f"{self.prefix}:{tenant}:{message_id}"

    def _local_count(self, key: tuple[str, str]) -> int:
        entry = self._local.get(key)
        if entry is None:
            return 0
        if entry[1] <= self.clock():
            del self._local[key]
            return 0
        return entry[0]

    def _remember(self, key: tuple[str, str], count: int) -> None:
        self._local[key] = (count, self.clock() + self.ttl_s)
        self._local.move_to_end(key)
        while len(self._local) > self.local_max:
            self._local.popitem(last=False)

    async def add(self, tenant: str, message_ids: Sequence[str]) -> list[int]:
        """One more failed attempt for each turn; their counts now."""
        counts: list[int] | None = None
        if self.redis is not None and message_ids:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for message_id in message_ids:
                        key = self._key(tenant, message_id)
                        pipe.incr(key)
                        pipe.expire(key, int(self.ttl_s) + 1)
                    replies = await pipe.execute()
                counts = [int(n) for n in replies[::2]]
            except (RedisError, OSError):
                log.warning("extraction attempts counted on this replica only: Redis failed")
        if counts is None:
            counts = [self._local_count((tenant, m)) + 1 for m in message_ids]
        for message_id, count in zip(message_ids, counts, strict=True):
            self._remember((tenant, message_id), count)
        return counts

    async def of(self, tenant: str, message_ids: Sequence[str]) -> dict[str, int]:
        """The failed attempts of each turn that has any."""
        out = {m: n for m in message_ids if (n := self._local_count((tenant, m)))}
        if self.redis is not None and message_ids:
            try:
                values = await self.redis.mget([self._key(tenant, m) for m in message_ids])
            except (RedisError, OSError):
                return out  # this replica's counts only
            for message_id, value in zip(message_ids, values, strict=True):
                if value is not None:
                    out[message_id] = max(out.get(message_id, 0), int(value))
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
        self.max_attempts = settings.memory_extraction_catchup_max_attempts
        # A count outlives the look-back (after it the turn is never offered anyway).
        look_back = settings.memory_extraction_catchup_max_age_s or 30 * 86400.0
        self.attempts = AttemptCounts(
            redis,
            settings.memory_redis_prefix,
            look_back + settings.memory_extraction_catchup_age_s,
        )
        if self.max_attempts > 0:
            extractor.on_failure = self.failed

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

    async def failed(self, job: Job, reason: str) -> None:
        """A job failed for a reason of its own: count an attempt for each of its turns;
        those that reach the cap are given up (once, whichever replica counts last)."""
        ids = [m.message_id for m in job.turns]
        counts = await self.attempts.add(job.tenant, ids)
        for message_id, count in zip(ids, counts, strict=True):
            if count == self.max_attempts:
                metrics.EXTRACTION_GIVEN_UP.inc()
                # Ids only: the turn's text is personal data.
                log.warning(
                    "fact extraction given up for a turn",
                    extra={
                        "tenant": job.tenant,
                        "message_id": message_id,
                        "attempts": count,
                        "reason": reason,
                    },
                )

    async def _due(
        self, tenant: str, before: int, after: int | None, budget: int
    ) -> tuple[list[StoredMessage], frozenset[str]]:
        """Up to `budget` of the tenant's unhandled turns, oldest first, without those
        queued here or given up (the query reads further while given-up turns fill it),
        and the ids of those among them that failed before."""
        in_flight = self.extractor.in_flight
        limit = budget + min(len(in_flight), budget)
        while True:
            rows = await self.store.unextracted_messages(tenant, before, after, limit)
            turns = [m for m in rows if m.message_id not in in_flight]
            cap, counts = self.max_attempts, {}
            if cap > 0 and turns:
                counts = await self.attempts.of(tenant, [m.message_id for m in turns])
            kept = [m for m in turns if not cap or counts.get(m.message_id, 0) < cap]
            more = len(rows) == limit and len(kept) < len(turns) and limit < _QUERY_ROWS_MAX
            if len(kept) >= budget or not more:
                kept = kept[:budget]
                return kept, frozenset(m.message_id for m in kept if m.message_id in counts)
            limit = min(_QUERY_ROWS_MAX, limit * 4)

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
                turns, retried = await self._due(tenant, before, after, budget)
                due += len(turns)
                for job in jobs_of(tenant, turns, retried):
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
