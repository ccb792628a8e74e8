"""Token buckets in Redis, atomic via one Lua script.

One bucket per key (e.g. `rl:{tenant}:{caller}:{method_class}`); the script
refills by elapsed Redis server time, so pods with skewed clocks share one
fair bucket. `cost` lets the gateway spend tokens-per-minute budgets from the
same mechanism.

Scripts run through a `ScriptBatcher` (one per Redis client, `script_batcher(redis)`):
calls that concurrent RPCs make while a batch is in flight are sent together, as one
pipeline (one round trip), when it returns. Each caller still awaits its own result (or
error), so the semantics of a call are unchanged; what changes is the CPU per call under
load (redis-py's per-command work and the socket write and wake-up are paid once per batch:
~190 µs → ~50 µs per call at 10 per batch, docs/llm_gateway.md "Performance"). An idle
batcher sends a call at once (on the next event-loop iteration).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError

from libs.common import metrics
from libs.common.dbspans import redis_spans
from libs.common.errors import ResourceExhausted, Unavailable
from libs.common.logging import ThrottledLog

log = logging.getLogger(__name__)
redis_down_log = ThrottledLog(log)  # once per 10 s while Redis is away, not per request

# KEYS[1]=bucket; ARGV: rate per second, burst, cost. Returns {allowed, retry_ms, tokens}.
_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000.0 * rate)
local allowed = 0
local retry_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_ms = math.ceil((cost - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, retry_ms, tostring(tokens)}
"""


_Call = tuple[AsyncScript, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Coalesces concurrent Lua script calls into one round trip ("group commit").

    `await batcher.run(script, keys, args)` behaves like `await script(keys, args)`: it
    returns the script's result or raises its error (a connection error fails every call
    of its batch). At most `max_in_flight` batches are in flight; calls made meanwhile wait
    for one to return and then go together. A caller cancelled while its batch is in flight
    does not cancel the batch (the others still need it); its result is dropped, as the
    reply of a cancelled plain call would be. If Redis stalls, new calls queue behind the
    in-flight batches, each bounded by the pool's socket timeout, so a caller may wait up
    to about twice that before failing.

    A batch is the EVALSHA commands packed by hand and written at once on one pooled
    connection, then one reply read per call: what redis-py's pipeline does, without its
    per-command and per-pipeline work (argument encoding, response callbacks, observability
    hooks, reset task) that cost more than the scripts' work here. Connection errors are
    retried as redis-py retries a command (the connection's `retry` policy).
    """

    def __init__(self, redis: Redis, *, max_batch: int = 256, max_in_flight: int = 2) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # in flight (the loop holds weak refs)

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, future))
        if not self._flush_scheduled and len(self._tasks) < self.max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        # A caller cancelled before its call was sent: drop the call, as a plain call
        # cancelled before it was written would never have reached Redis.
        self._pending = [item for item in self._pending if not item[3].done()]
        while self._pending and len(self._tasks) < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            metrics.REDIS_SCRIPT_BATCH_SIZE.observe(len(batch))
            task = asyncio.ensure_future(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._pending and not self._flush_scheduled:
            self._flush()

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            results = await self._round_trip(batch)
            # A server that lost its script cache (restart, failover, SCRIPT FLUSH) answers
            # NOSCRIPT: those calls go again through redis-py, which loads the script.
            for i, result in enumerate(results):
                if isinstance(result, NoScriptError):
                    script, keys, args, _ = batch[i]
                    try:
                        results[i] = await script(keys=keys, args=args)
                    except RedisError as exc:
                        results[i] = exc
        except Exception as exc:  # the whole batch failed (connection, timeout, ...)
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (loop shutting down): so are its callers
            for *_, future in batch:
                future.cancel()
            raise
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _round_trip(self, batch: list[_Call]) -> list[Any]:
        """One reply per call, in order; error replies are returned, not raised."""
        redis = self.redis
        pool = getattr(redis, "connection_pool", None)
        if pool is None or redis.connection is not None:  # cluster / single-connection client
            async with redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return list(await pipe.execute(raise_on_error=False))
        packed = b"".join(
            _pack(b"EVALSHA", script.sha, len(keys), *keys, *args)
            for script, keys, args, _ in batch
        )
        conn = await pool.get_connection()

        async def send_and_read() -> list[Any]:
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # the reply was read whole: stream in sync
                    replies.append(exc)
            return replies

        async def on_failure(error: Exception) -> None:
            await conn.disconnect()

        try:
            return await conn.retry.call_with_retry(send_and_read, on_failure)  # type: ignore[no-any-return]
        except BaseException:
            # Cancelled or failed mid-reply: the connection's state is unknown.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


def _pack(*parts: Any) -> bytes:
    """One command in RESP, arguments encoded as redis-py encodes them (str as UTF-8,
    int as decimal, float as repr)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bool):
            raise DataError("bool is not a valid Redis argument")
        elif isinstance(part, int):
            data = b"%d" % part
        elif isinstance(part, float):
            data = repr(part).encode()
        else:
            raise DataError(f"invalid Redis argument type {type(part).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_batchers: weakref.WeakKeyDictionary[Redis, ScriptBatcher] = weakref.WeakKeyDictionary()


def script_batcher(redis: Redis) -> ScriptBatcher:
    """The batcher of this Redis client (one per client, so every caller shares batches)."""
    batcher = _batchers.get(redis)
    if batcher is None:
        batcher = _batchers[redis] = ScriptBatcher(redis)
    return batcher


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    remaining: float


def rate_limited(retry_after_s: float, *, subject: str, what: str) -> ResourceExhausted:
    """The error of a refused caller (RESOURCE_EXHAUSTED, RetryInfo, QuotaFailure)."""
    from libs.common.errors import QuotaViolation

    return ResourceExhausted(
        f"rate limit exceeded for {what}; retry in {retry_after_s:.2f}s",
        reason="RATE_LIMITED",
        retry_after=retry_after_s,
        quota=[QuotaViolation(subject=subject, description=what)],
    )


@dataclass
class CallerLimit:
    """One RPC's spend from its caller's bucket (`FINSIGHT_RATE_LIMIT_*`), when the method's
    handler spends it itself (`MethodPolicy.limit_in_handler`): in a Redis script it runs
    anyway (the gateway's tenant admission, one round trip instead of two), before any side
    effect. The bucket is this module's (`key`, hash layout, algorithm); the interceptor
    spends it when the handler did not (an error before admission, an answer without one),
    so every call spends one token, as with `TokenBucket.enforce` in the interceptor."""

    key: str
    rate: float
    burst: float
    subject: str
    what: str
    service: str
    method_class: str
    spent: bool = False

    def refused(self, retry_after_s: float) -> ResourceExhausted:
        metrics.RATELIMIT_REJECTED.labels(self.service, self.method_class).inc()
        return rate_limited(retry_after_s, subject=self.subject, what=self.what)


class TokenBucket:
    def __init__(self, redis: Redis, *, fail_mode: Literal["open", "closed"] = "open") -> None:
        self.redis = redis
        self.fail_mode = fail_mode
        self._script = redis.register_script(_BUCKET_LUA)
        self._batcher = script_batcher(redis)
        self._spans = redis_spans(redis)

    async def take(self, key: str, *, rate: float, burst: float, cost: float = 1.0) -> Decision:
        """Spend `cost` tokens from bucket `key`; on a Redis failure follow the fail mode."""
        try:
            with self._spans.span("ratelimit.take", "EVALSHA"):
                allowed, retry_ms, tokens = await self._batcher.run(
                    self._script, [key], [rate, burst, cost]
                )
        except (RedisError, OSError) as exc:
            metrics.RATELIMIT_REDIS_ERRORS.labels(fail_mode=self.fail_mode).inc()
            redis_down_log.warning(
                "rate limiter: redis unavailable",
                extra={"fail_mode": self.fail_mode, "error": type(exc).__name__},
            )
            if self.fail_mode == "closed":
                raise Unavailable(
                    "rate limiter unavailable; retry shortly",
                    reason="RATE_LIMITER_UNAVAILABLE",
                    retry_after=1.0,
                ) from None
            return Decision(True, 0.0, float("nan"))
        return Decision(bool(allowed), int(retry_ms) / 1000.0, float(tokens))

    async def enforce(
        self, key: str, *, rate: float, burst: float, cost: float = 1.0, subject: str, what: str
    ) -> Decision:
        decision = await self.take(key, rate=rate, burst=burst, cost=cost)
        if not decision.allowed:
            raise rate_limited(decision.retry_after_s, subject=subject, what=what)
        return decision

    async def spend(self, limit: CallerLimit) -> None:
        """`limit`'s token, refused with its error (and counted) when the bucket is empty."""
        limit.spent = True
        decision = await self.take(limit.key, rate=limit.rate, burst=limit.burst)
        if not decision.allowed:
            raise limit.refused(decision.retry_after_s)
