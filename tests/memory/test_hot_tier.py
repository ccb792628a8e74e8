"""Redis is only a cache: an outage never fails an RPC, answers stay the same, and the
cache comes back (flushed, then refilled) when Redis does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from finsight.memory.v1 import memory_pb2 as pb
from tests.conftest import Keys, RedisProcess
from tests.memory.conftest import Memory, msg, start_memory


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def contents(memory: Memory, session: str, order: int = pb.SORT_ORDER_ASCENDING) -> list[str]:
    page = await memory.stub.GetHistory(
        pb.GetHistoryRequest(session_id=session, order=order, page_size=500), metadata=memory.md()
    )
    return [m.message.content for m in page.messages]


async def serving(memory: Memory) -> int:
    stub = health_pb2_grpc.HealthStub(memory.channel)
    reply = await stub.Check(
        health_pb2.HealthCheckRequest(service="finsight.memory.v1.MemoryService"), timeout=2
    )
    return int(reply.status)


async def test_redis_outage_falls_back_to_duckdb_and_recovers(
    tmp_path: Path, private_redis: RedisProcess, api_keys: Keys
) -> None:
    memory = await start_memory(
        tmp_path,
        private_redis.url,
        api_keys,
        memory_purge_interval_s=0,
        finsight_rate_limit_enabled=True,
    )
    try:
        for i in range(5):
            await memory.stub.AppendMessages(
                pb.AppendMessagesRequest(session_id="s", user_id="u1", messages=[msg(f"m{i}")]),
                metadata=memory.md(),
            )
        hits = sample("finsight_memory_hot_tier_reads_total", outcome="hit")
        assert await contents(memory, "s") == [f"m{i}" for i in range(5)]
        assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits + 1

        private_redis.stop()
        errors = sample("finsight_memory_redis_errors_total", op="read")
        assert await contents(memory, "s") == [f"m{i}" for i in range(5)]
        assert sample("finsight_memory_redis_errors_total", op="read") == errors + 1
        # Writes keep working (acknowledged after COMMIT); the failed write-through
        # makes the cache untrusted, so nothing stale can be served later.
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(session_id="s", user_id="u1", messages=[msg("during outage")]),
            metadata=memory.md(),
        )
        assert not memory.app.hot.trusted
        want = [*(f"m{i}" for i in range(5)), "during outage"]
        assert await contents(memory, "s") == want
        assert await contents(memory, "s", pb.SORT_ORDER_DESCENDING) == want[::-1]
        built = await memory.stub.BuildContext(
            pb.BuildContextRequest(session_id="s", user_id="u1", query="next?", token_budget=2048),
            metadata=memory.md(),
        )
        assert list(built.included_sequences) == [1, 2, 3, 4, 5, 6]
        # Readiness rounds without Redis: the gauge drops (a round can take the whole Redis
        # timeout on a loaded machine), while the service stays SERVING throughout.
        for _ in range(100):
            if memory.host.check_results.get("redis") is False:
                break
            assert await serving(memory) == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.1)
        assert memory.host.check_results.get("redis") is False
        assert await serving(memory) == health_pb2.HealthCheckResponse.SERVING

        private_redis.start()
        for _ in range(100):
            if memory.app.hot.trusted:
                break
            await asyncio.sleep(0.05)
        assert memory.app.hot.trusted
        assert await contents(memory, "s") == want  # a miss, served from DuckDB, refills
        hits = sample("finsight_memory_hot_tier_reads_total", outcome="hit")
        assert await contents(memory, "s") == want
        assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits + 1
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(session_id="s", user_id="u1", messages=[msg("after")]),
            metadata=memory.md(),
        )
        assert await contents(memory, "s") == [*want, "after"]
        assert await memory.app.hot.redis.zcard(memory.app.hot.key("acme", "s")) == 7
    finally:
        await memory.close()


async def test_startup_flushes_what_a_previous_process_left(
    tmp_path: Path, redis_url: str, api_keys: Keys
) -> None:
    """A process killed between COMMIT and write-through leaves a stale window behind."""
    prefix = f"t-{tmp_path.name}"
    memory = await start_memory(
        tmp_path, redis_url, api_keys, memory_redis_prefix=prefix, memory_purge_interval_s=0
    )
    await memory.stub.AppendMessages(
        pb.AppendMessagesRequest(session_id="s", user_id="u1", messages=[msg("one")]),
        metadata=memory.md(),
    )
    key = memory.app.hot.key("acme", "s")
    redis = memory.app.hot.redis
    stale = await redis.zrange(key, 0, -1)
    await memory.close()

    from redis.asyncio import Redis

    async with Redis.from_url(redis_url) as r:
        await r.zadd(key, {bytes(stale[0]): 1})  # type: ignore[arg-type]  # what the dead process left
    memory = await start_memory(
        tmp_path, redis_url, api_keys, memory_redis_prefix=prefix, memory_purge_interval_s=0
    )
    try:
        assert await memory.app.hot.redis.exists(key) == 0
        await memory.app.duck.write(
            "t",
            lambda cur: cur.execute(
                "INSERT INTO messages SELECT sess_no, 2, tenant, session_id, user_id, "
                "'msg_' || repeat('0', 32), 'user', 'two', NULL, '{}', created_at, NULL, NULL FROM messages"
            ),
        )
        await memory.app.duck.write(
            "t", lambda cur: cur.execute("UPDATE sessions SET last_seq = 2")
        )
        assert await contents(memory, "s") == ["one", "two"]
    finally:
        await memory.close()


async def test_a_short_window_left_by_a_flush_is_refilled_by_the_next_read(
    memory: Memory,
) -> None:
    async def append(text: str) -> None:
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(session_id="s", user_id="u1", messages=[msg(text)]),
            metadata=memory.md(),
        )

    for i in range(10):
        await append(f"m{i}")
    key = memory.app.hot.key("acme", "s")
    await memory.app.hot.redis.unlink(key)  # what a flush does
    await append("m10")  # the window restarts with this message alone
    assert await memory.app.hot.redis.zcard(key) == 1
    expected = [f"m{i}" for i in range(11)]
    hits = sample("finsight_memory_hot_tier_reads_total", outcome="hit")
    assert await contents(memory, "s") == expected  # not provable from {11}: DuckDB
    assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits
    assert await memory.app.hot.redis.zcard(key) == 11  # ... and refilled
    assert await contents(memory, "s") == expected
    assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits + 1
