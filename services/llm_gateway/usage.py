"""Usage accounting: Redis counters per tenant, UTC day and model, plus a usage event stream.

Counters: hash `llm:usage:{tenant}:{YYYYMMDD}`, fields `{model}|{counter}` for counters
requests, cache_hits, prompt, completion, cached_prompt, reasoning, cost_nanos (integers,
HINCRBY: atomic across replicas). They serve GetUsage; the budget has its own key (see
limits.py). Each completion is also appended to a Redis Stream (capped with MAXLEN ~) that
a durable ledger can consume with a consumer group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from redis.asyncio import Redis

from libs.common.ratelimit import script_batcher
from services.llm_gateway.limits import Settlement
from services.llm_gateway.pricing import Usage

# One round trip for everything a finished completion changes. KEYS: usage hash, budget key,
# tpm bucket, stream. ARGV: retention s, budget delta, tpm refund, stream maxlen, number of
# counter pairs n, n pairs (field, value), then the event's field/value pairs.
_RECORD_LUA = """
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  redis.call('HINCRBY', KEYS[1], ARGV[6 + 2 * i], ARGV[7 + 2 * i])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
if KEYS[2] ~= '' and tonumber(ARGV[2]) ~= 0 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
if KEYS[3] ~= '' and tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'tokens', ARGV[3])
end
local event = {}
for i = 6 + 2 * n, #ARGV do
  event[#event + 1] = ARGV[i]
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
return 1
"""

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
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


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

    async def record(self, event: UsageEvent, settlement: Settlement | None = None) -> None:
        """Counters, budget settlement, TPM refund and the stream event: one atomic script."""
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
        }
        s = settlement
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
            len(pairs) // 2,
            *pairs,
        ]
        for name, value in fields.items():
            args += [name, value]
        await self._batcher.run(self._record, keys, args)

    async def report(
        self, tenant: str, start: date, end: date, model: str | None = None
    ) -> list[UsageRowData]:
        days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
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
