"""Exact-match response cache in Redis, scoped by tenant, with a TTL.

The key is a SHA-256 over everything that shapes the answer (resolved route, messages after
fitting, max_tokens, temperature, top_p, stop, response format), prefixed by the tenant so
one tenant can never read another's answers. Redis errors degrade to a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.logging import ThrottledLog
from services.llm_gateway import metrics
from services.llm_gateway.domain import Completion
from services.llm_gateway.pricing import Usage

log = logging.getLogger(__name__)
redis_down_log = ThrottledLog(log)  # once per 10 s while Redis is away, not per request


def cache_key(tenant: str, fingerprint: dict[str, object]) -> str:
    digest = hashlib.sha256(
        json.dumps(fingerprint, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()
    return f"llm:{{{tenant}}}:cache:{digest}"


class ResponseCache:
    def __init__(self, redis: Redis, *, default_ttl_s: int, max_entry_bytes: int) -> None:
        self.redis = redis
        self.default_ttl_s = default_ttl_s
        self.max_entry_bytes = max_entry_bytes

    async def get(self, key: str) -> Completion | None:
        try:
            raw = await self.redis.get(key)
        except (RedisError, OSError) as exc:
            metrics.CACHE.labels("error").inc()
            redis_down_log.warning("cache read failed", extra={"error": type(exc).__name__})
            return None
        if raw is None:
            metrics.CACHE.labels("miss").inc()
            return None
        try:
            data = json.loads(raw)
            data["usage"] = Usage(**data["usage"])
            completion = Completion(**data)
        except (ValueError, TypeError, KeyError):
            metrics.CACHE.labels("error").inc()
            return None
        metrics.CACHE.labels("hit").inc()
        return completion

    async def put(self, key: str, completion: Completion, ttl_s: int) -> None:
        """Store an answer (skipped when the entry is too large)."""
        raw = json.dumps(asdict(completion), ensure_ascii=False).encode()
        if len(raw) > self.max_entry_bytes:
            return
        await self.redis.set(key, raw, ex=ttl_s or self.default_ttl_s)
