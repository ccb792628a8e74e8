"""Per-tenant limits: requests per minute, tokens per minute, daily cost budget (Redis).

One Lua script admits a request atomically, all or nothing, in one round trip (shared, under
load, with the other requests' scripts: `libs.common.ratelimit.ScriptBatcher`):

* RPM and TPM are token buckets with exactly the algorithm and hash layout of
  `libs.common.ratelimit.TokenBucket` (refill by elapsed Redis server time, burst = the
  per-minute allowance). They are evaluated in the same script as the budget rather than
  through `TokenBucket.take` because each separate round trip cost ~0.25 ms of gateway CPU
  (redis-py), the largest item of the gateway's per-request cost (benchmarks/bench_gateway).
  TPM is charged up front with prompt tokens + max_tokens (capped at the bucket size so one
  large request can pass on a full bucket); the unused part is refunded with the usage.
* The daily budget (UTC day, nano-USD) is a reservation: `spent + max_cost <= budget` is
  checked and `max_cost` added in the same script, so concurrent requests on every replica
  can never push a tenant over its budget; after the answer the reservation is replaced by
  the real cost (INCRBY of the difference, in the accounting round trip). A request whose
  maximum cost does not fit what is left is refused (lower max_tokens to fit).

Keys carry the tenant as a hash tag (`llm:{acme}:rpm`) so one tenant's keys share a Redis
Cluster slot. Redis unreachable: admission follows `FINSIGHT_RATE_LIMIT_FAIL_MODE`
(open: admit without limits; closed: UNAVAILABLE). Each round trip is a Redis client span
(`llm.limits.admit`, `llm.limits.release`, `llm.limits.spent_today`; `libs.common.dbspans`),
one per script, not per command inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common import metrics as kit_metrics
from libs.common.dbspans import redis_spans
from libs.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from libs.common.logging import ThrottledLog
from libs.common.ratelimit import CallerLimit, script_batcher
from services.llm_gateway import metrics
from services.llm_gateway.pricing import nanos_to_units, usd_to_nanos
from services.llm_gateway.specs import TenantLimitsSpec

log = logging.getLogger(__name__)
redis_down_log = ThrottledLog(log)  # once per 10 s while Redis is away, not per request

# KEYS: rpm bucket, tpm bucket, budget key, caller bucket ('' = none: spent elsewhere).
# ARGV: rpm rate/s, rpm burst, tpm rate/s, tpm burst, tpm cost, budget nanos (-1 = none),
#       reserve nanos, budget ttl s, caller rate/s, caller burst.
# Returns {code, retry_ms, spent}: code 0 admitted, 1 rpm, 2 tpm, 3 budget, 4 caller refused.
# The caller bucket is the kit's (libs.common.ratelimit: same layout, same algorithm, cost
# 1): spent first, and kept spent when a tenant limit then refuses, as when the interceptor
# spends it before the handler runs.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function refill(key, rate, burst)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1])
  local ts = tonumber(b[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  return math.min(burst, tokens + math.max(0, now - ts) / 1000.0 * rate)
end
local function save(key, tokens, rate, burst)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
if KEYS[4] ~= '' then
  local rate, burst = tonumber(ARGV[9]), tonumber(ARGV[10])
  local tokens = refill(KEYS[4], rate, burst)
  if tokens >= 1 then
    save(KEYS[4], tokens - 1, rate, burst)
  else
    save(KEYS[4], tokens, rate, burst)
    return {4, math.ceil((1 - tokens) / rate * 1000), '0'}
  end
end
local rpm_rate, rpm_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm_rate, tpm_burst, tpm_cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local budget, reserve = tonumber(ARGV[6]), tonumber(ARGV[7])
local rpm_tokens, tpm_tokens = 0, 0
if rpm_rate > 0 then
  rpm_tokens = refill(KEYS[1], rpm_rate, rpm_burst)
  if rpm_tokens < 1 then
    return {1, math.ceil((1 - rpm_tokens) / rpm_rate * 1000), '0'}
  end
end
if tpm_rate > 0 and tpm_cost > 0 then
  tpm_tokens = refill(KEYS[2], tpm_rate, tpm_burst)
  if tpm_tokens < tpm_cost then
    return {2, math.ceil((tpm_cost - tpm_tokens) / tpm_rate * 1000), '0'}
  end
end
local spent = 0
if budget >= 0 and reserve > 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + reserve > budget then
    return {3, 0, tostring(spent)}
  end
  redis.call('INCRBY', KEYS[3], reserve)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[8]))
end
if rpm_rate > 0 then
  save(KEYS[1], rpm_tokens - 1, rpm_rate, rpm_burst)
end
if tpm_rate > 0 and tpm_cost > 0 then
  save(KEYS[2], tpm_tokens - tpm_cost, tpm_rate, tpm_burst)
end
return {0, 0, tostring(spent)}
"""
_BUDGET_TTL_S = 3 * 24 * 3600


@dataclass(frozen=True)
class TenantLimits:
    rpm: int  # 0 = unlimited
    tpm: int  # 0 = unlimited
    daily_budget_nanos: int | None


@dataclass
class Reservation:
    """What was taken before the call, to settle against the real usage afterwards."""

    tenant: str
    tokens: int  # TPM tokens taken
    budget_key: str | None  # set when a budget reservation was made
    cost_nanos: int  # reserved nano-USD


@dataclass(frozen=True)
class Settlement:
    """Redis updates that replace a reservation by the real usage (see usage.py)."""

    budget_key: str | None
    budget_delta: int
    tpm_key: str | None
    tpm_refund: int


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%d")


def budget_key(tenant: str, day: str) -> str:
    return f"llm:{{{tenant}}}:budget:{day}"


def rpm_key(tenant: str) -> str:
    return f"llm:{{{tenant}}}:rpm"


def tpm_key(tenant: str) -> str:
    return f"llm:{{{tenant}}}:tpm"


def seconds_to_utc_midnight(now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (tomorrow - now).total_seconds())


def usd(nanos: int) -> str:
    units, rest = nanos_to_units(max(nanos, 0))
    return f"${units}.{rest:09d}".rstrip("0").rstrip(".")


class LimitPolicy:
    """Resolves each tenant's limits from the defaults and the per-tenant overrides."""

    def __init__(
        self,
        *,
        rpm: int,
        tpm: int,
        daily_budget_usd: Decimal | None,
        overrides: dict[str, TenantLimitsSpec],
    ) -> None:
        self.default = TenantLimits(
            rpm, tpm, None if daily_budget_usd is None else usd_to_nanos(daily_budget_usd)
        )
        self.overrides = {
            tenant: TenantLimits(
                spec.rpm if spec.rpm is not None else rpm,
                spec.tpm if spec.tpm is not None else tpm,
                usd_to_nanos(spec.daily_budget_usd)
                if spec.daily_budget_usd is not None
                else self.default.daily_budget_nanos,
            )
            for tenant, spec in overrides.items()
        }

    def for_tenant(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)


class TenantLimiter:
    def __init__(
        self, redis: Redis, policy: LimitPolicy, *, fail_mode: Literal["open", "closed"] = "open"
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.fail_mode = fail_mode
        self._admit = redis.register_script(_ADMIT_LUA)
        self._batcher = script_batcher(redis)  # shared with the kit's rate limiter
        self._spans = redis_spans(redis)

    async def admit(
        self, tenant: str, *, tokens: int, max_cost_nanos: int, caller: CallerLimit | None = None
    ) -> Reservation:
        """Spend one request of the RPM, `tokens` of the TPM and reserve `max_cost_nanos` of
        today's budget, atomically; RESOURCE_EXHAUSTED (QuotaFailure, RetryInfo) when over.
        `tokens=0, max_cost_nanos=0` spends only the request (response-cache hits).
        `caller`: the caller's rate limit, spent first in the same round trip (its refusal
        is the kit's RATE_LIMITED)."""
        limits = self.policy.for_tenant(tenant)
        tpm_cost = min(tokens, limits.tpm) if limits.tpm > 0 else 0
        budget = limits.daily_budget_nanos
        reserve = max_cost_nanos if budget is not None else 0
        reservation = Reservation(tenant, 0, None, 0)
        if caller is not None:
            caller.spent = True
        if limits.rpm <= 0 and tpm_cost <= 0 and reserve <= 0 and caller is None:
            return reservation
        day_key = budget_key(tenant, utc_day())
        try:
            with self._spans.span("llm.limits.admit", "EVALSHA") as span:
                if caller is not None:
                    span.set_attribute("finsight.ratelimit.caller", True)
                code, retry_ms, spent = await self._batcher.run(
                    self._admit,
                    [rpm_key(tenant), tpm_key(tenant), day_key, caller.key if caller else ""],
                    [
                        limits.rpm / 60.0,
                        limits.rpm,
                        limits.tpm / 60.0,
                        limits.tpm,
                        tpm_cost,
                        -1 if budget is None else budget,
                        reserve,
                        _BUDGET_TTL_S,
                        caller.rate if caller else 0,
                        caller.burst if caller else 0,
                    ],
                )
        except (RedisError, OSError) as exc:
            if caller is not None:  # the kit's alert on its limiter counts this one too
                kit_metrics.RATELIMIT_REDIS_ERRORS.labels(fail_mode=self.fail_mode).inc()
            redis_down_log.warning(
                "tenant limits: redis unavailable",
                extra={"fail_mode": self.fail_mode, "error": type(exc).__name__},
            )
            if self.fail_mode == "closed":
                raise Unavailable(
                    "tenant limits unavailable; retry shortly",
                    reason="RATE_LIMITER_UNAVAILABLE",
                    retry_after=1.0,
                ) from None
            return reservation
        code, retry_s = int(code), int(retry_ms) / 1000.0
        if code == 4:
            assert caller is not None
            raise caller.refused(retry_s)
        if code == 1:
            metrics.LIMIT_REJECTIONS.labels("rpm").inc()
            raise ResourceExhausted(
                f"tenant request rate limit ({limits.rpm}/min) exceeded; retry in {retry_s:.2f}s",
                reason="TENANT_RPM_EXCEEDED",
                retry_after=retry_s,
                quota=[
                    QuotaViolation(f"tenant:{tenant}", f"llm requests per minute ({limits.rpm})")
                ],
            )
        if code == 2:
            metrics.LIMIT_REJECTIONS.labels("tpm").inc()
            raise ResourceExhausted(
                f"tenant token rate limit ({limits.tpm} tokens/min) exceeded; retry in "
                f"{retry_s:.2f}s",
                reason="TENANT_TPM_EXCEEDED",
                retry_after=retry_s,
                quota=[QuotaViolation(f"tenant:{tenant}", f"llm tokens per minute ({limits.tpm})")],
            )
        if code == 3:
            assert budget is not None
            metrics.LIMIT_REJECTIONS.labels("budget").inc()
            left = max(0, budget - int(float(spent)))
            raise ResourceExhausted(
                f"daily cost budget exhausted: {usd(left)} left of {usd(budget)} today (UTC), "
                f"this request may cost up to {usd(reserve)}; lower max_tokens or retry tomorrow",
                reason="DAILY_BUDGET_EXHAUSTED",
                retry_after=seconds_to_utc_midnight(),
                quota=[
                    QuotaViolation(f"tenant:{tenant}", f"daily llm cost budget ({usd(budget)})")
                ],
            )
        reservation.tokens = tpm_cost
        if reserve > 0:
            reservation.budget_key, reservation.cost_nanos = day_key, reserve
        return reservation

    @staticmethod
    def settlement(reservation: Reservation, cost_nanos: int, used_tokens: int) -> Settlement:
        """What replaces the reservation once the real cost and tokens are known."""
        refund = max(0, reservation.tokens - used_tokens)
        return Settlement(
            reservation.budget_key,
            cost_nanos - reservation.cost_nanos,
            tpm_key(reservation.tenant) if refund else None,
            refund,
        )

    async def release(self, reservation: Reservation) -> None:
        """Undo a reservation whose request never got an answer."""
        commands = [
            *(["INCRBY"] if reservation.budget_key is not None else []),
            *(["HINCRBYFLOAT"] if reservation.tokens else []),
        ]
        if not commands:
            return
        try:
            with self._spans.pipeline(
                "llm.limits.release", len(commands), transaction=False, command=commands[0]
            ):
                async with self.redis.pipeline(transaction=False) as pipe:
                    if reservation.budget_key is not None:
                        pipe.incrby(reservation.budget_key, -reservation.cost_nanos)
                    if reservation.tokens:
                        pipe.hincrbyfloat(tpm_key(reservation.tenant), "tokens", reservation.tokens)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            redis_down_log.warning("limit release failed", extra={"error": type(exc).__name__})

    async def spent_today(self, tenant: str) -> int:
        with self._spans.span("llm.limits.spent_today", "GET"):
            value = await self.redis.get(budget_key(tenant, utc_day()))
        return int(value or 0)
