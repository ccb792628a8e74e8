"""Tool calling end to end: the contract, what reaches the provider, streamed calls assembled,
context fitting that keeps a call with its results, personal data in arguments, the cache,
and validation (real gateway gRPC server, real dev provider over HTTP, real Redis)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tokens import count_text
from libs.devprovider import DevProviderControl
from services.llm_gateway.providers import StreamState
from tests.llm_gateway.conftest import GatewayFactory, Gw, assistant, system, user

QUOTE_PARAMS = {
    "type": "object",
    "properties": {"ticker": {"type": "string"}},
    "required": ["ticker"],
}
QUOTE = pb.Tool(
    name="get_quote", description="Last price of a ticker", parameters=json.dumps(QUOTE_PARAMS)
)
NEWS = pb.Tool(name="news", description="Headlines about a ticker")
EMAIL = "jane.doe@example.com"


def prompt(text: str) -> str:
    """A prompt no earlier test sent (the response cache lives in the session's Redis)."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def call(call_id: str, name: str, arguments: str) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(id=call_id, name=name, arguments=arguments)


def asked(text: str, *calls: common_pb2.ToolCall) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text, tool_calls=calls)


def result(call_id: str, text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content=text, tool_call_id=call_id)


async def violations(gw: Gw, **fields: Any) -> dict[str, str]:
    fields.setdefault("messages", [user(prompt("q"))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Complete(pb.CompleteRequest(**fields), metadata=gw.md(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = status_info(err.value)
    assert info is not None and info.reason == "INVALID_ARGUMENT"
    return {v.field: v.description for v in info.field_violations}


async def test_a_tool_call_comes_back_and_the_tools_reach_the_provider(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script(
        {"tool_calls": [{"id": "call_1", "name": "get_quote", "arguments": {"ticker": "AAPL"}}]}
    )
    reply = await gw.complete(
        prompt("price of apple?"),
        tools=[QUOTE, NEWS],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO),
    )
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("call_1", "get_quote", {"ticker": "AAPL"})
    ]
    assert reply.content == "" and reply.usage.completion_tokens > 0
    body = (await control.requests())[-1]["body"]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_quote",
                "description": "Last price of a ticker",
                "parameters": QUOTE_PARAMS,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "news",
                "description": "Headlines about a ticker",
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]
    assert body["tool_choice"] == "auto"


async def test_the_results_go_back_with_their_call_and_the_model_answers(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script({"content": "Apple last traded at 189.5."})
    question = prompt("price of apple?")
    reply = await gw.complete(
        messages=[
            user(question),
            asked("", call("call_1", "get_quote", '{"ticker":"AAPL"}')),
            result("call_1", '{"price": 189.5}'),
        ],
        tools=[QUOTE],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name="get_quote"),
    )
    assert reply.content == "Apple last traded at 189.5."
    assert reply.finish_reason == pb.FINISH_REASON_STOP and not reply.tool_calls
    body = (await control.requests())[-1]["body"]
    assert body["messages"] == [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_quote", "arguments": '{"ticker":"AAPL"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"price": 189.5}', "tool_call_id": "call_1"},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_quote"}}


async def test_streamed_tool_calls_arrive_in_pieces_and_whole_at_the_end(
    gw: Gw, control: DevProviderControl
) -> None:
    arguments = json.dumps({"ticker": "MSFT", "fields": ["price", "volume", "52w_high"]})
    await control.script(
        {
            "tool_calls": [
                {"id": "call_a", "name": "get_quote", "arguments": arguments},
                {"id": "call_b", "name": "news", "arguments": "{}"},
            ]
        }
    )
    stream = gw.stub.StreamComplete(
        pb.StreamCompleteRequest(messages=[user(prompt("msft?"))], tools=[QUOTE, NEWS]),
        metadata=gw.md(),
        timeout=10,
    )
    pieces: dict[int, list[pb.ToolCallDelta]] = {}
    end = None
    async for message in stream:
        if message.HasField("delta"):
            for piece in message.delta.tool_calls:
                pieces.setdefault(piece.index, []).append(piece)
        else:
            end = message.end
    assert end is not None and end.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert sorted(pieces) == [0, 1]
    assert len(pieces[0]) > 3  # the arguments came in several pieces
    first = pieces[0][0]
    assert (first.id, first.name) == ("call_a", "get_quote")
    assert all(not p.id and not p.name for p in pieces[0][1:])
    assert "".join(p.arguments for p in pieces[0]) == arguments
    assert [(c.id, c.name, c.arguments) for c in end.tool_calls] == [
        ("call_a", "get_quote", arguments),
        ("call_b", "news", "{}"),
    ]


async def test_context_fitting_drops_old_turns_but_never_the_answered_call(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_models={"deepseek-chat": {"context_window": 1024, "max_output_tokens": 256}}
    )
    old_call = call("call_old", "get_quote", '{"ticker":"IBM"}')
    new_call = call("call_new", "get_quote", '{"ticker":"AAPL"}')
    messages = [
        system("You are terse."),
        user("old question " * 150),
        asked("", old_call),
        result("call_old", "old result " * 150),
        assistant("old answer " * 150),
        user(prompt("price of apple?")),
        asked("", new_call),
        result("call_new", "189.5 " * 40),
    ]
    reply = await gw.complete(messages=messages, tools=[QUOTE])
    assert reply.truncated and list(reply.dropped_message_indices) == [1, 2, 3, 4]
    sent = (await control.requests())[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[2]["tool_calls"][0]["id"] == "call_new" and sent[3]["tool_call_id"] == "call_new"


async def test_tool_definitions_count_against_the_window(
    gw: Gw, control: DevProviderControl
) -> None:
    messages = [user("price of apple?")]
    plain = await gw.stub.CountTokens(
        pb.CountTokensRequest(messages=messages), metadata=gw.md(), timeout=10
    )
    called = await gw.stub.CountTokens(
        pb.CountTokensRequest(
            messages=[
                *messages,
                asked("", call("c1", "get_quote", '{"ticker":"AAPL"}')),
                result("c1", "189.5"),
            ]
        ),
        metadata=gw.md(),
        timeout=10,
    )
    # The call's name and arguments are what the model reads of that assistant message.
    assert called.message_tokens[1] >= count_text('get_quote({"ticker":"AAPL"})')
    assert called.prompt_tokens > plain.prompt_tokens


async def test_personal_data_in_arguments_and_results_is_redacted_and_restored(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script(
        {"tool_calls": [{"id": "call_m", "name": "send_mail", "arguments": {"to": "[EMAIL_1]"}}]}
    )
    mail = pb.Tool(name="send_mail", parameters=json.dumps({"type": "object"}))
    reply = await gw.complete(
        messages=[
            user(prompt("send the statement to the client")),
            asked("", call("call_l", "lookup", "{}")),
            result("call_l", f"client email: {EMAIL}"),
        ],
        tools=[mail, pb.Tool(name="lookup")],
    )
    assert json.loads(reply.tool_calls[0].arguments) == {"to": EMAIL}
    assert [(r.kind, r.count) for r in reply.redactions] == [("EMAIL", 1)]
    sent = json.dumps((await control.requests())[-1]["body"])
    assert EMAIL not in sent and "[EMAIL_1]" in sent


async def test_identical_tool_requests_hit_the_cache_and_other_tools_miss(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.set_default(
        {"tool_calls": [{"id": "call_c", "name": "get_quote", "arguments": {"ticker": "X"}}]}
    )
    text = prompt("cache me")
    first = await gw.complete(text, tools=[QUOTE], temperature=0)
    again = await gw.complete(text, tools=[QUOTE], temperature=0)
    other = await gw.complete(text, tools=[QUOTE, NEWS], temperature=0)
    assert not first.cached and again.cached and not other.cached
    assert [(c.id, c.name) for c in again.tool_calls] == [("call_c", "get_quote")]
    assert again.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_tools_are_routed_to_models_that_can_call_them(gw: Gw) -> None:
    found = await violations(gw, model="deepseek-reasoner", tools=[QUOTE])
    assert "supports tool calling" in found["tools"]
    models = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md(), timeout=10)
    calling = {m.name: m.tool_calling for m in models.models}
    assert calling["deepseek-chat"] and not calling["deepseek-reasoner"]


async def test_bad_tools_and_tool_messages_are_invalid_argument_with_every_field(
    gw: Gw, control: DevProviderControl
) -> None:
    found = await violations(
        gw,
        tools=[
            pb.Tool(name="bad name!"),
            pb.Tool(name="dup"),
            pb.Tool(name="dup", parameters='{"type": "array"}'),
            pb.Tool(name="broken", parameters="{not json"),
        ],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name="missing"),
        json_schema='{"type": "object"}',
    )
    assert set(found) >= {
        "tools[0].name",
        "tools[2].name",
        "tools[2].parameters",
        "tools[3].parameters",
        "tool_choice.function_name",
        "json_schema",
    }
    found = await violations(
        gw,
        messages=[
            user("q"),
            asked("", call("c1", "get_quote", "{}"), call("c1", "get_quote", "{}")),
            result("c9", "nobody asked"),
            common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="no id"),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="x", tool_call_id="c1"),
        ],
        tools=[QUOTE],
    )
    assert set(found) == {
        "messages[1].tool_calls",  # c1 is never answered
        "messages[1].tool_calls[1].id",  # used twice
        "messages[2].tool_call_id",  # answers no call
        "messages[3].tool_call_id",  # missing
        "messages[4].tool_call_id",  # not a tool message
    }
    found = await violations(gw, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))
    assert found == {"tool_choice": "needs `tools`"}
    assert await control.requests() == []  # nothing reached the provider


def test_stream_pieces_keep_the_position_their_call_was_first_seen_at() -> None:
    """A provider may number its calls in any order: the pieces are renumbered by first
    appearance, once, and the assembled calls come in that order too."""
    state = StreamState()

    def piece(index: int, **fields: Any) -> dict[str, Any]:
        return {"index": index, **fields}

    first = state.absorb_calls(
        [piece(3, id="c3", function={"name": "quote", "arguments": '{"s":'})]
    )
    second = state.absorb_calls([piece(1, id="c1", function={"name": "news", "arguments": "{}"})])
    third = state.absorb_calls([piece(3, function={"arguments": '"IBM"}'})])
    assert [(p.index, p.id, p.name) for p in (*first, *second)] == [
        (0, "c3", "quote"),
        (1, "c1", "news"),
    ]
    assert [(p.index, p.arguments) for p in third] == [(0, '"IBM"}')]  # not re-numbered
    assert [(c.id, c.name, c.arguments) for c in state.tool_calls] == [
        ("c3", "quote", '{"s":"IBM"}'),
        ("c1", "news", "{}"),
    ]
