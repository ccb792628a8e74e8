"""One bounded, health-checked redis.asyncio pool per service process."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from libs.common.config import CommonSettings
from libs.common.errors import FailedPrecondition


def create_redis(settings: CommonSettings) -> Redis:
    """A client over a bounded pool: callers wait (up to the timeout) rather than open more."""
    if not settings.redis_url:
        raise FailedPrecondition("REDIS_URL is not set (`make run` starts an embedded server)")
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.finsight_redis_max_connections,
        timeout=settings.finsight_redis_timeout_s,
        socket_timeout=settings.finsight_redis_timeout_s,
        socket_connect_timeout=settings.finsight_redis_timeout_s,
        health_check_interval=15,
        retry_on_timeout=False,
        password=(settings.redis_password.get_secret_value() if settings.redis_password else None),
    )
    return Redis(connection_pool=pool)


async def redis_ready(redis: Redis) -> bool:
    """Readiness check: Redis answers PING within the pool's timeout."""
    try:
        return bool(await redis.ping())
    except (RedisError, OSError):
        return False
