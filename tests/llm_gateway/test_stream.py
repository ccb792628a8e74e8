"""StreamComplete: retries only before the first token, cuts, cancellation, keep-alives."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.devprovider import DevProvider, DevProviderControl
from tests.llm_gateway.conftest import GatewayFactory, Gw, user

LONG = " ".join(f"w{i}" for i in range(40))


def stream(gw: Gw, text: str, who: str = "alice", timeout: float = 10, **fields: Any) -> Any:
    return gw.stub.StreamComplete(
        pb.StreamCompleteRequest(messages=[user(text)], **fields),
        metadata=gw.md(who),
        timeout=timeout,
    )


async def collect(call: Any) -> tuple[str, pb.CompletionEnd | None]:
    text, end = "", None
    async for msg in call:
        if msg.HasField("delta"):
            assert end is None, "no delta after the end message"
            text += msg.delta.content
        else:
            end = msg.end
    return text, end


async def test_stream_delivers_deltas_then_one_end_with_usage(
    gw: Gw, control: DevProviderControl
) -> None:
    text, end = await collect(stream(gw, "stream me please"))
    assert text == "echo: stream me please"
    assert end is not None and end.finish_reason == pb.FINISH_REASON_STOP
    assert end.usage.completion_tokens == 4 and end.usage.prompt_tokens == 4
    assert end.cost.units == 0 and end.cost.nanos == 4 * 280 + 4 * 420
    assert (end.provider, end.model, end.attempts) == ("deepseek", "deepseek-chat", 1)
    body = (await control.requests())[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_stream_retries_before_the_first_token(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"status": 503}, {"drop": True})
    text, end = await collect(stream(gw, "second time lucky"))
    assert text == "echo: second time lucky"
    assert end is not None and end.attempts == 3


async def test_keepalive_comments_before_the_first_token_are_skipped(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"keepalive_lines": 4, "keepalive_interval_ms": 20})
    text, _ = await collect(stream(gw, "queued then served"))
    assert text == "echo: queued then served"


async def test_endless_keepalive_comments_hit_the_first_token_deadline(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(llm_gateway_attempt_timeout_s=0.4, llm_gateway_max_retries=0)
    await control.script({"keepalive_lines": 10_000, "keepalive_interval_ms": 50})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stream(gw, "never"))
    assert time.monotonic() - started < 2
    assert status_info(err.value).reason == "PROVIDER_UNAVAILABLE"


async def test_cut_mid_stream_ends_unavailable_and_records_partial_usage(
    gw: Gw, control: DevProviderControl
) -> None:
    before = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
    await control.script({"content": LONG, "cut_after_chunks": 5})
    received = ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for msg in stream(gw, "cut me"):
            received += msg.delta.content
    info = status_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_STREAM_INTERRUPTED")
    assert received == "w0 w1 w2 w3 w4"
    assert len(await control.requests()) == 1  # no retry after the first token
    after = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=gw.md())
    assert after.total_requests == before.total_requests + 1
    billed = after.total_usage.completion_tokens - before.total_usage.completion_tokens
    assert billed >= 5  # the tokens received were counted by the gateway's tokenizer
    assert after.total_usage.prompt_tokens > before.total_usage.prompt_tokens


async def test_a_stream_slower_than_the_callers_deadline_is_deadline_exceeded(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"content": LONG, "chunk_delay_ms": 300}, {"delay_ms": 3000})
    received = ""
    with pytest.raises(grpc.aio.AioRpcError) as err:  # after the first tokens
        async for msg in stream(gw, "slow tokens", timeout=1.2):
            received += msg.delta.content
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert received
    with pytest.raises(grpc.aio.AioRpcError) as err:  # before the first token
        await collect(stream(gw, "slow start", timeout=0.6))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert len(await control.requests()) == 2


async def test_client_cancel_cancels_the_provider_request(
    gw: Gw, control: DevProviderControl, provider: DevProvider
) -> None:
    await control.script({"content": LONG, "chunk_delay_ms": 100})
    call = stream(gw, "slow")
    async for msg in call:
        assert msg.HasField("delta")
        break
    call.cancel()
    deadline = time.monotonic() + 3
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        entry = provider.state.log[-1]
        if entry["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert entry["cancelled"], entry
    assert entry["chunks_sent"] < 40


async def test_stream_cache_hit_is_one_delta_and_costs_nothing(
    gw: Gw, control: DevProviderControl
) -> None:
    text1, end1 = await collect(stream(gw, "cache the stream", temperature=0))
    text2, end2 = await collect(stream(gw, "cache the stream", temperature=0))
    assert text1 == text2 == "echo: cache the stream"
    assert end1 is not None and end2 is not None
    assert not end1.cached and end2.cached and end2.cost.nanos == 0 and end2.attempts == 0
    assert len(await control.requests()) == 1
