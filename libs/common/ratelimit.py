"""Token buckets in Redis, atomic via one Lua script.

One bucket per key (e.g. `rl:{tenant}:{caller}:{method_class}`); the script
refills by elapsed Redis server time, so pods with skewed clocks share one
fair bucket. `cost` lets the gateway spend tokens-per-minute budgets from the
same mechanism.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common import metrics
from libs.common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    remaining: float


class TokenBucket:
    def __init__(self, redis: Redis, *, fail_mode: Literal["open", "closed"] = "open") -> None:
        self.redis = redis
        self.fail_mode = fail_mode
        self._script = redis.register_script(_BUCKET_LUA)

    async def take(self, key: str, *, rate: float, burst: float, cost: float = 1.0) -> Decision:
        """Spend `cost` tokens from bucket `key`; on a Redis failure follow the fail mode."""
        try:
            allowed, retry_ms, tokens = await self._script(keys=[key], args=[rate, burst, cost])
        except (RedisError, OSError) as exc:
            metrics.RATELIMIT_REDIS_ERRORS.labels(fail_mode=self.fail_mode).inc()
            log.warning(
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
            from libs.common.errors import QuotaViolation

            raise ResourceExhausted(
                f"rate limit exceeded for {what}; retry in {decision.retry_after_s:.2f}s",
                reason="RATE_LIMITED",
                retry_after=decision.retry_after_s,
                quota=[QuotaViolation(subject=subject, description=what)],
            )
        return decision
