"""Bad input is INVALID_ARGUMENT with field violations, before any provider is called."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.devprovider import DevProviderControl
from tests.llm_gateway.conftest import GatewayFactory, Gw, user

CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({"messages": []}, ["messages"]),
    ({"messages": [common_pb2.ChatMessage(content="no role")]}, ["messages[0].role", "messages"]),
    ({"messages": [user("hi"), common_pb2.ChatMessage(role=9, content="x")]}, ["messages[1].role"]),
    ({"messages": [user("  ")]}, ["messages[0].content"]),
    ({"model": "gpt-9"}, ["model"]),
    ({"max_tokens": 0}, ["max_tokens"]),
    ({"max_tokens": 8193}, ["max_tokens"]),
    ({"model": "reasoning", "max_tokens": 65537}, ["max_tokens"]),
    ({"temperature": 2.5}, ["temperature"]),
    ({"temperature": float("nan")}, ["temperature"]),
    ({"top_p": 0.0}, ["top_p"]),
    ({"stop": ["a"] * 17}, ["stop"]),
    ({"stop": ["ok", ""]}, ["stop[1]"]),
    ({"response_format": 7}, ["response_format"]),
    ({"cache_ttl_seconds": -1}, ["cache_ttl_seconds"]),
    ({"messages": [user("x" * 5000)]}, ["messages"]),
]


@pytest.fixture
async def small(gateway_with: GatewayFactory) -> Gw:
    return await gateway_with(llm_gateway_max_prompt_bytes=4096)


async def test_each_bad_field_is_named_and_no_provider_is_called(
    small: Gw, control: DevProviderControl
) -> None:
    for fields, expected in CASES:
        fields = {"messages": [user("hello")], **fields}
        for rpc in (small.stub.Complete, small.stub.StreamComplete):
            request_cls = (
                pb.CompleteRequest if rpc is small.stub.Complete else (pb.StreamCompleteRequest)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                call = rpc(request_cls(**fields), metadata=small.md(), timeout=5)
                if rpc is small.stub.StreamComplete:
                    async for _ in call:
                        pass
                else:
                    await call
            info = status_info(err.value)
            assert info.code == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert [v.field for v in info.field_violations] == expected, fields
    assert await control.requests() == []


async def test_all_violations_are_reported_at_once(gw: Gw) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(model="nope", messages=[], temperature=3, top_p=2)
    fields = {v.field for v in status_info(err.value).field_violations}
    assert fields == {"model", "messages", "temperature", "top_p"}


async def test_invalid_utf8_is_invalid_argument_naming_the_field(
    gw: Gw, control: DevProviderControl
) -> None:
    good = pb.CompleteRequest(messages=[user("fine"), user("hello")]).SerializeToString()
    bad = good.replace(b"hello", b"he\xffoo")
    call = gw.channel.unary_unary(
        "/finsight.llm.v1.LlmGatewayService/Complete",
        request_serializer=None,
        response_deserializer=pb.CompleteResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(bad, metadata=gw.md(), timeout=5)
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["messages[1].content"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\xff\xff\xff", metadata=gw.md(), timeout=5)
    assert status_info(err.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert await control.requests() == []


async def test_count_tokens_validates_too(gw: Gw) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.CountTokens(pb.CountTokensRequest(model="nope"), metadata=gw.md())
    assert {v.field for v in status_info(err.value).field_violations} == {"model", "messages"}
