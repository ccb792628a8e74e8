"""Usage accounting: Redis counters per tenant, UTC day and model, plus a usage event stream.

Counters: hash `llm:usage:{tenant}:{YYYYMMDD}`, fields `{model}|{counter}` for counters
requests, cache_hits, prompt, completion, cached_prompt, reasoning, cost_nanos (integers,
HINCRBY: atomic across replicas). They serve GetUsage; the budget has its own key (see
limits.py). Each completion is also appended to a Redis Stream (capped with MAXLEN ~) that
a durable ledger can consume with a consumer group: entries of `type=usage` (one per
completion) and `type=budget_threshold` (a tenant's recorded cost reached 80% / 100% of its
daily budget, once per tenant, UTC day and threshold; see _RECORD_LUA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from redis.asyncio import Redis

from libs.common.dbspans import redis_spans
from libs.common.ratelimit import script_batcher
from services.llm_gateway import metrics
from services.llm_gateway.limits import Settlement
from services.llm_gateway.pricing import Usage

log = logging.getLogger(__name__)

# One round trip for everything a finished completion changes. KEYS: usage hash, budget key,
# tpm bucket, stream. ARGV: retention s, budget delta, tpm refund, stream maxlen, daily budget
# nanos (-1 = none), this event's cost nanos, tenant, day (YYYYMMDD), ts, number of counter
# pairs n, n pairs (field, value), then the event's field/value pairs.
#
# Budget thresholds: when the event has a cost and the tenant a budget, the day's recorded
# cost (sum of the hash's `{model}|cost_nanos` fields, after this event's HINCRBY) is compared
# with each threshold of BUDGET_THRESHOLDS; a threshold reached for the first time that day
# (HSETNX of the field `budget_threshold:{t}` in the same hash, which expires with it) adds a
# `type=budget_threshold` event to the stream and is returned. The script is atomic, so each
# threshold fires exactly once per tenant and UTC day, whatever the replicas and concurrency.
# Returns {spent nanos, thresholds crossed...}.
_RECORD_LUA = """
local n = tonumber(ARGV[10])
for i = 0, n - 1 do
  redis.call('HINCRBY', KEYS[1], ARGV[11 + 2 * i], ARGV[12 + 2 * i])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
if KEYS[2] ~= '' and tonumber(ARGV[2]) ~= 0 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
if KEYS[3] ~= '' and tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'tokens', ARGV[3])
end
local event = {}
for i = 11 + 2 * n, #ARGV do
  event[#event + 1] = ARGV[i]
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
local budget = tonumber(ARGV[5])
if budget <= 0 or tonumber(ARGV[6]) <= 0 then
  return {'-1'}
end
local spent = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if string.sub(h[i], -11) == '|cost_nanos' then
    spent = spent + tonumber(h[i + 1])
  end
end
local out = {string.format('%.0f', spent)}
for _, t in ipairs({{'0.8', 8}, {'1.0', 10}}) do
  if spent * 10 >= budget * t[2]
      and redis.call('HSETNX', KEYS[1], 'budget_threshold:' .. t[1], ARGV[9]) == 1 then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'type', 'budget_threshold',
      'ts', ARGV[9], 'tenant', ARGV[7], 'day', ARGV[8], 'threshold', t[1],
      'spent_nanos', out[1], 'budget_nanos', ARGV[5])
    out[#out + 1] = t[1]
  end
end
return out
"""
# Fractions of the daily budget that emit a metric, a warning and a stream event once per
# tenant and day (hard-coded in _RECORD_LUA too).
BUDGET_THRESHOLDS = ("0.8", "1.0")

COUNTERS = (
    "requests",
    "cache_hits",
    "prompt",
    "completion",
    "cached_prompt",
    "reasoning",
    "cost_nanos",
)


@dataclass(frozen=True)
class UsageEvent:
    tenant: str
    caller: str
    route: str
    model: str  # configured model name
    provider: str
    usage: Usage
    cost_nanos: int
    cached: bool
    outcome: str  # ok | interrupted
    provider_request_id: str = ""
    redactions: dict[str, int] = field(default_factory=dict)  # kind → count, never values
    operation: str = "chat"  # chat | embeddings
    provider_key_id: str = ""  # the provider's deployment that answered ("" on a cache hit)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class UsageRowData:
    day: date
    model: str
    usage: Usage
    cost_nanos: int
    requests: int
    cache_hits: int


def usage_key(tenant: str, day: date) -> str:
    return f"llm:usage:{tenant}:{day.strftime('%Y%m%d')}"


class UsageLedger:
    def __init__(
        self, redis: Redis, *, stream: str, stream_maxlen: int, retention_days: int
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.stream_maxlen = stream_maxlen
        self.retention_s = retention_days * 24 * 3600
        self._record = redis.register_script(_RECORD_LUA)
        self._batcher = script_batcher(redis)
        self._spans = redis_spans(redis)

    async def record(
        self,
        event: UsageEvent,
        settlement: Settlement | None = None,
        *,
        budget_nanos: int | None = None,
    ) -> list[str]:
        """Counters, budget settlement, TPM refund, the stream event and the budget threshold
        check: one atomic script. Returns the thresholds (BUDGET_THRESHOLDS) this event made the
        tenant reach first today; each is counted, logged and on the stream."""
        u = event.usage
        values = {
            "requests": 1,
            "cache_hits": int(event.cached),
            "prompt": u.prompt,
            "completion": u.completion,
            "cached_prompt": u.cached_prompt,
            "reasoning": u.reasoning,
            "cost_nanos": event.cost_nanos,
        }
        pairs: list[str | int] = []
        for counter, amount in values.items():
            if amount:
                pairs += [f"{event.model}|{counter}", amount]
        fields: dict[str, str | int] = {
            "type": "usage",
            "ts": f"{event.at.timestamp():.3f}",
            "tenant": event.tenant,
            "caller": event.caller,
            "route": event.route,
            "model": event.model,
            "provider": event.provider,
            "prompt_tokens": u.prompt,
            "completion_tokens": u.completion,
            "cached_prompt_tokens": u.cached_prompt,
            "reasoning_tokens": u.reasoning,
            "cost_nanos": event.cost_nanos,
            "cached": int(event.cached),
            "outcome": event.outcome,
            "provider_request_id": event.provider_request_id,
            "redactions": ",".join(f"{k}:{n}" for k, n in sorted(event.redactions.items())),
            "operation": event.operation,
            "provider_key_id": event.provider_key_id,
        }
        s = settlement
        day, ts = event.at.strftime("%Y%m%d"), f"{event.at.timestamp():.3f}"
        keys = [
            usage_key(event.tenant, event.at.date()),
            (s.budget_key or "") if s else "",
            (s.tpm_key or "") if s else "",
            self.stream,
        ]
        args: list[str | int] = [
            self.retention_s,
            s.budget_delta if s and s.budget_key else 0,
            s.tpm_refund if s and s.tpm_key else 0,
            self.stream_maxlen,
            -1 if budget_nanos is None else budget_nanos,
            event.cost_nanos,
            event.tenant,
            day,
            ts,
            len(pairs) // 2,
            *pairs,
        ]
        for name, value in fields.items():
            args += [name, value]
        with self._spans.span("llm.usage.record", "EVALSHA"):
            result = await self._batcher.run(self._record, keys, args)
        crossed = [_str(t) for t in result[1:]]
        for threshold in crossed:
            metrics.child(metrics.BUDGET_THRESHOLD_CROSSED, threshold).inc()
            log.warning(
                "tenant reached a daily budget threshold",
                extra={
                    "tenant": event.tenant,
                    "threshold": threshold,
                    "spent_nanos": int(_str(result[0])),
                    "budget_nanos": budget_nanos,
                    "day": day,
                },
            )
        return crossed

    async def cost_today(self, tenant: str, now: datetime) -> int:
        """The tenant's recorded cost today (UTC), nano-USD: what the thresholds compare."""
        with self._spans.span("llm.usage.cost_today", "HGETALL"):
            raw = await self.redis.hgetall(usage_key(tenant, now.date()))  # type: ignore[misc]
        return sum(int(v) for f, v in raw.items() if _str(f).endswith("|cost_nanos"))

    async def report(
        self, tenant: str, start: date, end: date, model: str | None = None
    ) -> list[UsageRowData]:
        days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
        with self._spans.pipeline(
            "llm.usage.report", len(days), transaction=False, command="HGETALL"
        ):
            async with self.redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(usage_key(tenant, day))
                results = await pipe.execute()
        rows: list[UsageRowData] = []
        for day, raw in zip(days, results, strict=True):
            per_model: dict[str, dict[str, int]] = {}
            for f, v in raw.items():
                name, _, counter = (f.decode() if isinstance(f, bytes) else f).rpartition("|")
                if counter in COUNTERS and (model is None or name == model):
                    per_model.setdefault(name, {})[counter] = int(v)
            for name in sorted(per_model):
                c = per_model[name]
                rows.append(
                    UsageRowData(
                        day=day,
                        model=name,
                        usage=Usage(
                            c.get("prompt", 0),
                            c.get("completion", 0),
                            c.get("cached_prompt", 0),
                            c.get("reasoning", 0),
                        ),
                        cost_nanos=c.get("cost_nanos", 0),
                        requests=c.get("requests", 0),
                        cache_hits=c.get("cache_hits", 0),
                    )
                )
        return rows


def project_exhaustion(now: datetime, spent_nanos: int, remaining_nanos: int) -> datetime | None:
    """When the budget runs out if the tenant keeps spending at today's average rate.

    rate = recorded cost today / time elapsed since UTC midnight; exhaustion = now + what is
    left / rate. `now` when nothing is left; None when nothing was spent yet (no rate) or when
    the projection falls after the day's end (the budget resets at UTC midnight)."""
    if remaining_nanos <= 0:
        return now
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # Integer arithmetic in microseconds, so the result does not depend on float rounding.
    elapsed_us = (now - midnight) // timedelta(microseconds=1)
    if spent_nanos <= 0 or elapsed_us <= 0:
        return None
    left_us = 24 * 3600 * 1_000_000 - elapsed_us  # until midnight
    ahead_us = remaining_nanos * elapsed_us // spent_nanos
    return now + timedelta(microseconds=ahead_us) if ahead_us < left_us else None
