"""Redis cache of serialized metric results, keyed by (tenant, data version, request).

The data version grows with every change to the stored bars (storage bumps it in the
same transaction), so a cached result can never be served for data it was not computed
from; stale entries are simply never asked for again and expire by TTL. Redis is an
optimisation only: any Redis error is a miss.
"""

from __future__ import annotations

import hashlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.dbspans import redis_spans
from libs.common.logging import ThrottledLog
from services.analytics.telemetry import RESULT_CACHE

log = logging.getLogger(__name__)
redis_down_log = ThrottledLog(log)  # once per 10 s while Redis is away, not per request


class ResultCache:
    def __init__(self, redis: Redis | None, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._spans = redis_spans(redis) if redis is not None else None

    @property
    def enabled(self) -> bool:
        return self.redis is not None and self.ttl_s > 0

    @staticmethod
    def key(tenant: str, version: int, method: str, request: bytes) -> str:
        digest = hashlib.sha256(request).hexdigest()
        return f"analytics:result:v1:{tenant}:{version}:{method}:{digest}"

    async def get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        assert self.redis is not None and self._spans is not None
        try:
            with self._spans.span("analytics.result_cache.get", "GET"):
                value = await self.redis.get(key)
        except (RedisError, OSError) as exc:
            RESULT_CACHE.labels("error").inc()
            redis_down_log.warning("result cache read failed", extra={"error": type(exc).__name__})
            return None
        RESULT_CACHE.labels("hit" if value is not None else "miss").inc()
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        if not self.enabled:
            return
        assert self.redis is not None and self._spans is not None
        try:
            with self._spans.span("analytics.result_cache.put", "SET"):
                await self.redis.set(key, value, ex=self.ttl_s)
        except (RedisError, OSError) as exc:
            RESULT_CACHE.labels("error").inc()
            redis_down_log.warning("result cache write failed", extra={"error": type(exc).__name__})
