"""Redis hot tier: the recent window of each session, for GetHistory and BuildContext.

Key: `<prefix>:<tenant>:<session_id>` (both percent-encoded, so no two pairs collide), a
sorted set scored by sequence number holding up to `window` JSON-encoded messages (each
tagged with its session's incarnation), with a TTL refreshed on every append.

The cache is only ever a copy. Its invariant: a key that exists holds a *contiguous* run of
sequence numbers ending at the session's latest committed message. Appends keep it by
writing through after COMMIT; readers verify contiguity and fall back to the database when
a read is not fully covered. What guards the invariant depends on who writes the store:

- One process on a DuckDB file (`shared=False`): anything that could break it makes the
  whole cache *untrusted*: start-up (a previous process may have died between COMMIT and
  write-through) and any failed Redis write (an append or an invalidation that did not
  land). While untrusted, reads and writes bypass Redis (served from DuckDB, same
  answers), and a background task deletes every key under the prefix (SCAN + UNLINK)
  until it succeeds; then the cache is trusted again and refills.
- Replicas sharing PostgreSQL and this prefix (`shared=True`): no process may flush what
  the others use, and no process can know what the others failed to write (a replica
  killed between COMMIT and write-through, a write-through lost to a network blip). So a
  window is never trusted on its own: every read also fetches the session's tail from the
  database (one primary-key read: owner, incarnation, first and last sequence) and the
  window is used only if all of its messages carry that incarnation and it reaches the
  last sequence; it is served trimmed to the sequences the database still holds. A window
  that does not match is a miss ("stale"), served from the database and replaced. Nothing
  is ever flushed, at start-up or after an error.

Read-through fills race with erasure: a fill that read the database before an erasure
committed could write erased messages back. `invalidate` bumps a generation counter (a
local one, plus with `shared=True` one in Redis that every replica's fills check
atomically); a fill that sees its generation moved writes nothing (shared) or deletes what
it wrote (local). Redis errors are counted (`finsight_memory_redis_errors_total`) and
never fail an RPC. Each round trip is a Redis client span `memory.hot_tier.<action>`
(`libs.common.dbspans`; docs/architecture.md lists them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.dbspans import redis_spans
from services.memory import metrics
from services.memory.models import StoredMessage

log = logging.getLogger(__name__)
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Window:
    """A contiguous run of a session's latest messages: sequences lo..hi, oldest first.
    `incarnation` is the session number every message was tagged with (None: mixed, or
    written before tags)."""

    messages: list[StoredMessage]
    incarnation: int | None = None

    @property
    def lo(self) -> int:
        return self.messages[0].sequence

    @property
    def hi(self) -> int:
        return self.messages[-1].sequence

    def between(self, first: int, last: int) -> list[StoredMessage]:
        """Messages with first <= sequence <= last (must lie inside the window)."""
        return self.messages[first - self.lo : last - self.lo + 1]

    def trimmed(self, first: int, last: int) -> Window | None:
        """The part with first <= sequence <= last, or None when nothing is left."""
        lo, hi = max(first, self.lo), min(last, self.hi)
        if lo > hi:
            return None
        return Window(self.between(lo, hi), self.incarnation)


@dataclass(frozen=True)
class Lookup:
    """A window read, and the generation a later `fill` must still find."""

    window: Window | None
    generation: int
    shared_generation: bytes | None = None


def encode(m: StoredMessage, incarnation: int = 0) -> str:
    return json.dumps(
        {
            "i": incarnation,
            "id": m.message_id,
            "s": m.session_id,
            "u": m.user_id,
            "q": m.sequence,
            "r": m.role,
            "c": m.content,
            "k": m.client_message_id,
            "m": m.metadata,
            "t": m.created_us,
            "ct": m.tokens,  # fenced-shape cost; "n" (pre-fence cost) is no longer read
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode(raw: bytes | str) -> tuple[StoredMessage, int | None]:
    d = json.loads(raw)
    return StoredMessage(
        message_id=d["id"],
        session_id=d["s"],
        user_id=d["u"],
        sequence=d["q"],
        role=d["r"],
        content=d["c"],
        client_message_id=d["k"],
        metadata=d["m"],
        created_us=d["t"],
        tokens=d.get("ct"),
    ), d.get("i")


# Shared fill: replace the window only if no invalidation moved the shared generation
# since the reader looked (both in one atomic step). KEYS: window, generation; ARGV: the
# generation seen ("" = none), TTL ms, then score/member pairs.
_FILL = """
local seen = redis.call('GET', KEYS[2]) or ''
if seen ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class HotTier:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        window: int,
        ttl_s: int,
        retry_interval_s: float = 1.0,
        shared: bool = False,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window = window
        self.ttl_ms = ttl_s * 1000
        self.retry_interval_s = retry_interval_s
        self.shared = shared
        self.trusted = False
        self.generation = 0
        # Not a window key: those have two ":"-separated parts after the prefix.
        self.generation_key = f"{prefix}:generation"
        self._fill_script = redis.register_script(_FILL)
        self._spans = redis_spans(redis)
        self._flush_task: asyncio.Task[None] | None = None
        metrics.HOT_TIER_TRUSTED.set(0)

    def key(self, tenant: str, session_id: str) -> str:
        return f"{self.prefix}:{quote(tenant, safe='')}:{quote(session_id, safe='')}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """One process: distrust whatever a previous process left, and flush it in the
        background. Shared: other replicas rely on the windows; every read checks them."""
        if self.shared:
            self.trusted = True
            metrics.HOT_TIER_TRUSTED.set(1)
            return
        self._distrust("startup")

    async def close(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)

    def _distrust(self, op: str) -> None:
        if self.shared:  # nothing to flush: a window that missed a write fails its check
            log.info("hot tier write failed; windows are checked per read", extra={"op": op})
            return
        if self.trusted:
            log.warning(
                "hot tier distrusted; bypassing Redis until it is flushed", extra={"op": op}
            )
        self.trusted = False
        metrics.HOT_TIER_TRUSTED.set(0)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(
                self._flush_until_done(), name="memory-hot-tier-flush"
            )

    async def _flush_until_done(self) -> None:
        while True:
            try:
                deleted = await self._flush()
            except _FAILURES:
                metrics.REDIS_ERRORS.labels("flush").inc()
                await asyncio.sleep(self.retry_interval_s)
                continue
            self.trusted = True
            metrics.HOT_TIER_TRUSTED.set(1)
            log.info("hot tier flushed and trusted", extra={"keys_deleted": deleted})
            return

    async def _flush(self) -> int:
        deleted = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(await self.redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(await self.redis.unlink(*batch))
        return deleted

    # -- writes --------------------------------------------------------------------------------
    async def write_through(
        self, groups: Sequence[tuple[str, str, Sequence[StoredMessage], int]]
    ) -> None:
        """Add committed messages to their session windows, all in one round trip
        (never raises). `groups` holds (tenant, session_id, messages in sequence order,
        the session's incarnation)."""
        groups = [g for g in groups if g[2]]
        if not groups or not self.trusted:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for tenant, session_id, messages, incarnation in groups:
                    self._queue_add(pipe, self.key(tenant, session_id), messages, incarnation)
                with self._spans.span("memory.hot_tier.write_through", "MULTI", len(pipe)):
                    await pipe.execute()
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("write_through").inc()
            self._distrust("write_through")
        except asyncio.CancelledError:
            self._distrust("write_through_cancelled")  # may or may not have landed
            raise

    def _queue_add(
        self, pipe: Any, key: str, messages: Sequence[StoredMessage], incarnation: int
    ) -> None:
        for m in messages:
            # One member per sequence: drop any other encoding of it first.
            pipe.zremrangebyscore(key, m.sequence, m.sequence)
            pipe.zadd(key, {encode(m, incarnation): m.sequence})
        pipe.zremrangebyrank(key, 0, -(self.window + 1))
        pipe.pexpire(key, self.ttl_ms)

    async def _add(self, key: str, messages: Sequence[StoredMessage], incarnation: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_add(pipe, key, messages, incarnation)
            with self._spans.span("memory.hot_tier.fill", "MULTI", len(pipe)):
                await pipe.execute()

    async def fill(
        self,
        tenant: str,
        session_id: str,
        messages: Sequence[StoredMessage],
        seen: Lookup,
        incarnation: int = 0,
    ) -> None:
        """Read-through: store the latest messages read from the database after a miss.
        One process merges them into the window; shared, they replace it (a window that
        was read and found stale must not survive), unless an invalidation ran since
        `seen` was read."""
        if not messages or not self.trusted:
            return
        key = self.key(tenant, session_id)
        latest = messages[-self.window :]
        try:
            if self.shared:
                members: list[Any] = []
                for m in latest:
                    members += [m.sequence, encode(m, incarnation)]
                with self._spans.span("memory.hot_tier.fill", "EVALSHA"):
                    await self._fill_script(
                        keys=[key, self.generation_key],
                        args=[seen.shared_generation or b"", self.ttl_ms, *members],
                    )
                return
            await self._add(key, latest, incarnation)
            if self.generation != seen.generation:  # an invalidation ran meanwhile: undo
                with self._spans.span("memory.hot_tier.fill_undo", "UNLINK"):
                    await self.redis.unlink(key)
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("fill").inc()
            self._distrust("fill")

    async def invalidate(self, keys: Iterable[tuple[str, str]]) -> int:
        """Drop the windows of (tenant, session_id) pairs; returns keys deleted now."""
        self.generation += 1
        names = [self.key(t, s) for t, s in keys]
        if not names:
            return 0
        try:
            if self.shared:  # before the deletes: a fill racing them must not land
                with self._spans.span("memory.hot_tier.generation", "INCR"):
                    await self.redis.incr(self.generation_key)
            deleted = 0
            for i in range(0, len(names), 500):
                with self._spans.span("memory.hot_tier.invalidate", "UNLINK"):
                    deleted += int(await self.redis.unlink(*names[i : i + 500]))
            return deleted
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("invalidate").inc()
            self._distrust("invalidate")  # the flush will remove them once Redis is back
            return 0

    async def forget_window(self, tenant: str, session_id: str) -> None:
        """Drop a window the database says belongs to no session (never raises)."""
        try:
            with self._spans.span("memory.hot_tier.forget", "UNLINK"):
                await self.redis.unlink(self.key(tenant, session_id))
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("invalidate").inc()

    # -- reads ---------------------------------------------------------------------------------
    async def window_of(self, tenant: str, session_id: str) -> Window | None:
        """The cached window, or None (absent, not contiguous, untrusted, or Redis down)."""
        return (await self.lookup(tenant, session_id)).window

    async def lookup(self, tenant: str, session_id: str) -> Lookup:
        """The cached window (None: absent, not contiguous, untrusted, or Redis down), with
        the generation(s) a fill after a database read must still find."""
        generation = self.generation
        if not self.trusted:
            metrics.HOT_TIER_READS.labels("bypass").inc()
            return Lookup(None, generation)
        shared_generation: bytes | None = None
        try:
            if self.shared:
                with self._spans.span("memory.hot_tier.lookup", "BATCH", 2):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zrange(self.key(tenant, session_id), 0, -1)
                        pipe.get(self.generation_key)
                        raw, shared_generation = await pipe.execute()
            else:
                with self._spans.span("memory.hot_tier.lookup", "ZRANGE"):
                    raw = await self.redis.zrange(self.key(tenant, session_id), 0, -1)
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("read").inc()
            metrics.HOT_TIER_READS.labels("error").inc()
            return Lookup(None, generation)
        seen = Lookup(None, generation, shared_generation)
        if not raw:
            metrics.HOT_TIER_READS.labels("miss").inc()
            return seen
        decoded = [decode(r) for r in raw]
        messages = [m for m, _ in decoded]
        if messages[-1].sequence - messages[0].sequence + 1 != len(messages):
            metrics.HOT_TIER_READS.labels("miss").inc()  # a gap: a write-through is missing
            return seen
        tags = {i for _, i in decoded}
        incarnation = tags.pop() if len(tags) == 1 else None
        return Lookup(Window(messages, incarnation), generation, shared_generation)
