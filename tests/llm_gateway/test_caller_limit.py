"""The caller's rate limit (the kit's FINSIGHT_RATE_LIMIT_* bucket) on Complete,
StreamComplete and Embed is spent in the tenant admission script (one Redis round trip
instead of two: libs.common.ratelimit.CallerLimit), with the same promises as everywhere
else: every call spends a token before any side effect — an invalid request and a cache
hit too — and a refusal is RATE_LIMITED with RetryInfo and QuotaFailure naming the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.devprovider import DevProvider, DevProviderControl
from tests.conftest import Keys, RedisProcess
from tests.llm_gateway.conftest import Gw, start_gateway, user

BURST = 7  # warm + accounted, one + accounted, bad, cached, cached hit


async def evalsha_calls(url: str) -> int:
    redis = Redis.from_url(url)
    try:
        stats: dict[str, Any] = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def refused(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return status_info(caught.value)


async def test_completions_spend_the_callers_bucket_in_the_admission_round_trip(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw: Gw = await start_gateway(
        tmp_path,
        private_redis.url,
        api_keys,
        provider,
        finsight_rate_limit_enabled=True,
        finsight_rate_limit_rps=0.01,  # no refill within the test
        finsight_rate_limit_burst=BURST,
    )
    try:
        # One completion: two scripts (admission with the caller's token, then the
        # accounting), where a separate caller bucket made three; + GetUsage's own token.
        await gw.complete("warm")  # loads the scripts (a first EVALSHA answers NOSCRIPT)
        await gw.accounted()
        before = await evalsha_calls(private_redis.url)
        await gw.complete("one")
        await gw.accounted()
        assert await evalsha_calls(private_redis.url) - before == 2 + 1

        # An invalid request spends a token too, before its error (no free flood).
        bad = await refused(gw.stub.Complete(pb.CompleteRequest(), metadata=gw.md()))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        cached = pb.CompleteRequest(messages=[user("cache me")], max_tokens=8, temperature=0)
        await gw.stub.Complete(cached, metadata=gw.md())
        # The last token: a cache hit spends it like any call.
        assert (await gw.stub.Complete(cached, metadata=gw.md())).cached
        calls = len(await control.requests())

        # Empty: refused by the caller's limit, before the cache or the provider.
        info = await refused(gw.stub.Complete(cached, metadata=gw.md()))
        assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "RATE_LIMITED"
        assert info.retry_after is not None and info.retry_after > 0
        assert info.quota and info.quota[0].subject == "caller:alice"
        # A throttled caller's invalid request hears of the limit first, as on any service.
        assert (
            await refused(gw.stub.Complete(pb.CompleteRequest(), metadata=gw.md()))
        ).reason == "RATE_LIMITED"
        stream = gw.stub.StreamComplete(
            pb.StreamCompleteRequest(messages=[user("s")]),
            metadata=gw.md(),
        )
        assert (await refused(stream.read())).reason == "RATE_LIMITED"
        assert len(await control.requests()) == calls  # nothing reached the provider

        # Another caller has a bucket of its own.
        assert (await gw.complete("bob's turn", who="bob")).content
    finally:
        await gw.close()
