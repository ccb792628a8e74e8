"""Redis hot tier: the recent window of each session, for GetHistory and BuildContext.

Key: `<prefix>:<tenant>:<session_id>` (both percent-encoded, so no two pairs collide), a
sorted set scored by sequence number holding up to `window` JSON-encoded messages, with a
TTL refreshed on every append.

The cache is only ever a copy. Its invariant: a key that exists holds a *contiguous* run of
sequence numbers ending at the session's latest committed message. Appends keep it by
writing through after COMMIT; readers verify contiguity and fall back to DuckDB when a read
is not fully covered. Anything that could break the invariant makes the whole cache
*untrusted*:

- start-up (a previous process may have died between COMMIT and write-through),
- any failed Redis write (an append or an invalidation that did not land).

While untrusted, reads and writes bypass Redis (served from DuckDB, same answers), and a
background task deletes every key under the prefix (SCAN + UNLINK) until it succeeds; then
the cache is trusted again and fills from new appends and read misses (a read that a
window too short to prove goes to DuckDB and refills it, so an active session re-warms
on its next read, not only after a window's worth of new appends). Redis errors are
counted (`finsight_memory_redis_errors_total`) and never fail an RPC.

Read-through fills race with erasure: a fill that read DuckDB before an erasure committed
could write erased messages back. `invalidate` bumps a generation counter; a fill that
sees the counter moved while it worked deletes what it wrote.
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

from services.memory import metrics
from services.memory.models import StoredMessage

log = logging.getLogger(__name__)
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Window:
    """A contiguous run of a session's latest messages: sequences lo..hi, oldest first."""

    messages: list[StoredMessage]

    @property
    def lo(self) -> int:
        return self.messages[0].sequence

    @property
    def hi(self) -> int:
        return self.messages[-1].sequence

    def between(self, first: int, last: int) -> list[StoredMessage]:
        """Messages with first <= sequence <= last (must lie inside the window)."""
        return self.messages[first - self.lo : last - self.lo + 1]


def encode(m: StoredMessage) -> str:
    return json.dumps(
        {
            "id": m.message_id,
            "s": m.session_id,
            "u": m.user_id,
            "q": m.sequence,
            "r": m.role,
            "c": m.content,
            "k": m.client_message_id,
            "m": m.metadata,
            "t": m.created_us,
            "n": m.tokens,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode(raw: bytes | str) -> StoredMessage:
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
        tokens=d.get("n"),
    )


class HotTier:
    def __init__(
        self, redis: Redis, *, prefix: str, window: int, ttl_s: int, retry_interval_s: float = 1.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window = window
        self.ttl_ms = ttl_s * 1000
        self.retry_interval_s = retry_interval_s
        self.trusted = False
        self.generation = 0
        self._flush_task: asyncio.Task[None] | None = None
        metrics.HOT_TIER_TRUSTED.set(0)

    def key(self, tenant: str, session_id: str) -> str:
        return f"{self.prefix}:{quote(tenant, safe='')}:{quote(session_id, safe='')}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Distrust whatever a previous process left, and flush it in the background."""
        self._distrust("startup")

    async def close(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)

    def _distrust(self, op: str) -> None:
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
        self, groups: Sequence[tuple[str, str, Sequence[StoredMessage]]]
    ) -> None:
        """Add committed messages to their session windows, all in one round trip
        (never raises). `groups` holds (tenant, session_id, messages in sequence order)."""
        groups = [g for g in groups if g[2]]
        if not groups or not self.trusted:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for tenant, session_id, messages in groups:
                    self._queue_add(pipe, self.key(tenant, session_id), messages)
                await pipe.execute()
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("write_through").inc()
            self._distrust("write_through")
        except asyncio.CancelledError:
            self._distrust("write_through_cancelled")  # may or may not have landed
            raise

    def _queue_add(self, pipe: Any, key: str, messages: Sequence[StoredMessage]) -> None:
        for m in messages:
            # One member per sequence: drop any other encoding of it first.
            pipe.zremrangebyscore(key, m.sequence, m.sequence)
            pipe.zadd(key, {encode(m): m.sequence})
        pipe.zremrangebyrank(key, 0, -(self.window + 1))
        pipe.pexpire(key, self.ttl_ms)

    async def _add(self, key: str, messages: Sequence[StoredMessage]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_add(pipe, key, messages)
            await pipe.execute()

    async def fill(
        self, tenant: str, session_id: str, messages: Sequence[StoredMessage], generation: int
    ) -> None:
        """Read-through: store the latest messages read from DuckDB after a miss."""
        if not messages or not self.trusted:
            return
        key = self.key(tenant, session_id)
        try:
            await self._add(key, messages[-self.window :])
            if self.generation != generation:  # an invalidation ran meanwhile: undo
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
            deleted = 0
            for i in range(0, len(names), 500):
                deleted += int(await self.redis.unlink(*names[i : i + 500]))
            return deleted
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("invalidate").inc()
            self._distrust("invalidate")  # the flush will remove them once Redis is back
            return 0

    # -- reads ---------------------------------------------------------------------------------
    async def window_of(self, tenant: str, session_id: str) -> Window | None:
        """The cached window, or None (absent, not contiguous, untrusted, or Redis down)."""
        if not self.trusted:
            metrics.HOT_TIER_READS.labels("bypass").inc()
            return None
        try:
            raw = await self.redis.zrange(self.key(tenant, session_id), 0, -1)
        except _FAILURES:
            metrics.REDIS_ERRORS.labels("read").inc()
            metrics.HOT_TIER_READS.labels("error").inc()
            return None
        if not raw:
            metrics.HOT_TIER_READS.labels("miss").inc()
            return None
        messages = [decode(r) for r in raw]  # type: ignore[arg-type]
        if messages[-1].sequence - messages[0].sequence + 1 != len(messages):
            metrics.HOT_TIER_READS.labels("miss").inc()  # a gap: a write-through is missing
            return None
        return Window(messages)
