"""Exact-match response cache in Redis, scoped by tenant, with a TTL.

The key is a SHA-256 over everything that shapes the answer (resolved route, messages after
fitting, max_tokens, temperature, top_p, stop, response format; for embeddings: route,
inputs, dimensions), prefixed by the tenant so one tenant can never read another's answers.
Redis errors degrade to a miss.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sys
from array import array
from dataclasses import asdict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.dbspans import redis_spans
from libs.common.logging import ThrottledLog
from services.llm_gateway import metrics
from services.llm_gateway.domain import Completion, Embeddings, ToolCall
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
        self._spans = redis_spans(redis)

    async def get(self, key: str) -> Completion | None:
        try:
            with self._spans.span("llm.cache.get", "GET") as span:
                raw = await self.redis.get(key)
                span.set_attribute("finsight.llm.cache.hit", raw is not None)
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
            data["tool_calls"] = [ToolCall(**c) for c in data.get("tool_calls", ())]
            completion = Completion(**data)
        except (ValueError, TypeError, KeyError):
            metrics.CACHE.labels("error").inc()
            return None
        metrics.CACHE.labels("hit").inc()
        return completion

    async def put(self, key: str, completion: Completion | Embeddings, ttl_s: int) -> None:
        """Store an answer (skipped when the entry is too large)."""
        if isinstance(completion, Embeddings):
            raw = _pack_embeddings(completion)
        else:
            raw = json.dumps(asdict(completion), ensure_ascii=False).encode()
        if len(raw) > self.max_entry_bytes:
            return
        with self._spans.span("llm.cache.put", "SET"):
            await self.redis.set(key, raw, ex=ttl_s or self.default_ttl_s)

    async def get_embeddings(self, key: str) -> Embeddings | None:
        try:
            with self._spans.span("llm.cache.get_embeddings", "GET") as span:
                raw = await self.redis.get(key)
                span.set_attribute("finsight.llm.cache.hit", raw is not None)
        except (RedisError, OSError) as exc:
            metrics.CACHE.labels("error").inc()
            redis_down_log.warning("cache read failed", extra={"error": type(exc).__name__})
            return None
        if raw is None:
            metrics.CACHE.labels("miss").inc()
            return None
        try:
            found = _unpack_embeddings(raw)
        except (ValueError, TypeError, KeyError):
            metrics.CACHE.labels("error").inc()
            return None
        metrics.CACHE.labels("hit").inc()
        return found


# Vectors are stored as packed little-endian float32 (what providers return, exactly), base64
# in a JSON envelope: ~4x smaller than JSON numbers.
def _pack_embeddings(e: Embeddings) -> bytes:
    packed = array("f", (x for v in e.vectors for x in v))
    if sys.byteorder != "little":
        packed.byteswap()
    data = asdict(e)
    data["vectors"] = base64.b64encode(packed.tobytes()).decode()
    data["count"] = len(e.vectors)
    return json.dumps(data, ensure_ascii=False).encode()


def _unpack_embeddings(raw: bytes | str) -> Embeddings:
    data = json.loads(raw)
    packed = array("f")
    packed.frombytes(base64.b64decode(data.pop("vectors")))
    if sys.byteorder != "little":
        packed.byteswap()
    count = int(data.pop("count"))
    width = len(packed) // count if count else 0
    if count <= 0 or width * count != len(packed):
        raise ValueError("bad embedding cache entry")
    data["vectors"] = [packed[i * width : (i + 1) * width].tolist() for i in range(count)]
    data["usage"] = Usage(**data["usage"])
    return Embeddings(**data)
