"""ScriptBatcher: concurrent Lua script calls share round trips, each caller keeps its own
result or error; NOSCRIPT, outages and cancellation behave as for plain script calls."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis._parsers.encoders import Encoder
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from libs.common.ratelimit import ScriptBatcher, _pack, script_batcher
from libs.common.redis_pool import create_redis
from tests.common.conftest import EchoSettings
from tests.conftest import RedisProcess, make_settings

# Counts calls per key and echoes its argument; fails on demand (per call, not per batch).
_LUA = """
if ARGV[1] == 'fail' then
  return redis.error_reply('ERR asked to fail')
end
local n = redis.call('INCR', KEYS[1])
return {n, ARGV[1]}
"""


def _redis(url: str) -> Redis:
    """A client built like the services' (bounded blocking pool, timeouts, retries)."""
    settings = make_settings(EchoSettings, Path(tempfile.gettempdir()), url, None)
    return create_redis(settings)


def _batches() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("finsight_redis_script_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("finsight_redis_script_batch_size_sum") or 0.0
    return count, total


async def test_concurrent_calls_share_round_trips_and_keep_their_own_results(
    redis_url: str,
) -> None:
    redis = _redis(redis_url)
    try:
        script = redis.register_script(_LUA)
        batcher = ScriptBatcher(redis)
        key = f"batch:{uuid.uuid4().hex}"
        count0, total0 = _batches()
        results = await asyncio.gather(*(batcher.run(script, [key], [f"a{i}"]) for i in range(60)))
        assert [r[1] for r in results] == [f"a{i}".encode() for i in range(60)]
        assert sorted(r[0] for r in results) == list(range(1, 61))  # each ran exactly once
        count, total = _batches()
        assert total - total0 == 60
        assert count - count0 < 60 / 2, "concurrent calls should travel together"
    finally:
        await redis.aclose()


async def test_an_error_reply_fails_only_its_own_call(redis_url: str) -> None:
    redis = _redis(redis_url)
    try:
        script = redis.register_script(_LUA)
        batcher = script_batcher(redis)
        assert script_batcher(redis) is batcher  # one per client
        key = f"batch:{uuid.uuid4().hex}"
        args = ["ok", "fail", "ok", "fail", "ok"]
        results = await asyncio.gather(
            *(batcher.run(script, [key], [a]) for a in args), return_exceptions=True
        )
        assert [isinstance(r, ResponseError) for r in results] == [a == "fail" for a in args]
        assert sorted(r[0] for r in results if not isinstance(r, BaseException)) == [1, 2, 3]
    finally:
        await redis.aclose()


async def test_a_flushed_script_cache_is_reloaded(redis_url: str) -> None:
    redis = _redis(redis_url)
    try:
        script = redis.register_script(_LUA)
        batcher = ScriptBatcher(redis)
        key = f"batch:{uuid.uuid4().hex}"
        await redis.script_flush()
        results = await asyncio.gather(*(batcher.run(script, [key], ["x"]) for _ in range(5)))
        assert sorted(r[0] for r in results) == [1, 2, 3, 4, 5]
        await redis.script_flush()
        assert (await batcher.run(script, [key], ["y"]))[0] == 6
    finally:
        await redis.aclose()


async def test_outage_fails_every_caller_and_recovers(private_redis: RedisProcess) -> None:
    redis = _redis(private_redis.url)
    try:
        script = redis.register_script(_LUA)
        batcher = ScriptBatcher(redis)
        assert (await batcher.run(script, ["k"], ["x"]))[0] == 1
        private_redis.stop()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(batcher.run(script, ["k"], ["x"]) for _ in range(4)), return_exceptions=True
            ),
            timeout=30,
        )
        assert all(isinstance(r, RedisConnectionError | OSError) for r in results), results
        private_redis.start()
        await asyncio.sleep(0.3)
        assert (await batcher.run(script, ["k2"], ["x"]))[0] == 1
    finally:
        await redis.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(redis_url: str) -> None:
    redis = _redis(redis_url)
    try:
        script = redis.register_script(_LUA)
        batcher = ScriptBatcher(redis)
        key = f"batch:{uuid.uuid4().hex}"
        calls = [asyncio.ensure_future(batcher.run(script, [key], [str(i)])) for i in range(10)]
        calls[3].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert all(not isinstance(r, BaseException) for i, r in enumerate(done) if i != 3)
        # The cancelled call was dropped before it was sent: 9 increments, not 10.
        assert int(await redis.get(key) or 0) == 9
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    "value", ["text", "ünïcode", 0, -7, 12345678901234567890, 0.1, 2.5e-9, b"\x00raw"]
)
def test_packing_encodes_arguments_as_redis_py_does(value: object) -> None:
    encoded = Encoder("utf-8", "strict", False).encode(value)  # type: ignore[arg-type]
    assert _pack(b"ECHO", value) == b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(encoded), encoded)


@pytest.mark.parametrize("value", [True, None, object()])
def test_packing_rejects_what_redis_py_rejects(value: object) -> None:
    with pytest.raises(DataError):
        _pack(b"ECHO", value)
