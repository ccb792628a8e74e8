"""Schema-checked JSON on Complete: json_schema validated, repaired once, or SCHEMA_MISMATCH."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import grpc
import pytest

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.pricing import Pricing, Usage
from tests.llm_gateway.conftest import GatewayFactory, Gw

DEEPSEEK = Pricing(Decimal("0.028"), Decimal("0.28"), Decimal("0.42"))

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ticker": {"type": "string"},
        "price": {"type": "number", "minimum": 0},
    },
    "required": ["ticker", "price"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)


def prompt(text: str) -> str:
    """A prompt no earlier test sent (the response cache lives in the session's Redis)."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def nanos(m: Any) -> int:
    return int(m.units) * 1_000_000_000 + int(m.nanos)


async def test_valid_first_answer_is_returned_compact(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"content": '{ "ticker" : "ACME",\n "price": 12.5 }'})
    reply = await gw.complete(prompt("quote acme"), json_schema=SCHEMA_TEXT)
    assert reply.content == '{"ticker":"ACME","price":12.5}'
    assert not reply.schema_repaired and reply.attempts == 1
    sent = await control.requests()
    assert len(sent) == 1
    body = sent[0]["body"]
    assert body["response_format"] == {"type": "json_object"}
    instruction = body["messages"][-1]
    assert instruction["role"] == "system" and "JSON Schema" in instruction["content"]
    assert json.loads(instruction["content"].split("\n", 1)[1]) == SCHEMA


async def test_bad_first_answer_is_repaired_with_the_errors(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script(
        {
            "content": '{"ticker": "ACME", "price": -3}',
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        },
        {
            "content": '{"ticker": "ACME", "price": 3}',
            "usage": {"prompt_tokens": 20, "completion_tokens": 4},
        },
    )
    text = prompt("quote acme again")
    reply = await gw.complete(text, json_schema=SCHEMA_TEXT)
    assert reply.content == '{"ticker":"ACME","price":3}' and reply.schema_repaired
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (30, 7)
    assert reply.usage.total_tokens == 37 and reply.attempts == 2
    expected = DEEPSEEK.cost_nanos(Usage(prompt=10, completion=3)) + DEEPSEEK.cost_nanos(
        Usage(prompt=20, completion=4)
    )
    assert nanos(reply.cost) == expected
    sent = await control.requests()
    assert len(sent) == 2
    first, second = sent[0]["body"]["messages"], sent[1]["body"]["messages"]
    assert second[: len(first)] == first
    assert second[len(first)] == {"role": "assistant", "content": '{"ticker": "ACME", "price": -3}'}
    fix = second[len(first) + 1]
    assert fix["role"] == "user"
    assert "$.price" in fix["content"] and "minimum of 0" in fix["content"]


async def test_bad_twice_is_schema_mismatch(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"content": '{"ticker": 7}'}, {"content": '{"ticker": "ACME"}'})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(prompt("quote badly"), json_schema=SCHEMA_TEXT)
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == "SCHEMA_MISMATCH"
    assert "'price' is a required property" in info.message
    assert "'price' is a required property" in info.metadata["errors"]
    assert len(await control.requests()) == 2


async def test_many_long_errors_are_bounded(gw: Gw, control: DevProviderControl) -> None:
    names = [f"field_{i:02d}_" + "x" * 300 for i in range(15)]
    schema = json.dumps({"type": "object", "required": names})
    await control.script({"content": "{}"}, {"content": "{}"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(prompt("many errors"), json_schema=schema)
    info = status_info(err.value)
    assert info.reason == "SCHEMA_MISMATCH"
    listed = info.metadata["errors"].split("\n")
    assert len(listed) == 11 and listed[-1] == "… and 5 more"
    assert all(len(line) <= 200 for line in listed)
    fix = (await control.requests())[1]["body"]["messages"][-1]["content"]
    assert "… and 5 more" in fix and len(fix) < 3000


async def test_non_json_text_answer_is_repaired(gw: Gw, control: DevProviderControl) -> None:
    await control.script(
        {"content": "Sure! ACME trades at 12."},
        {"content": '```json\n{"ticker": "ACME", "price": 12}\n```'},
    )
    reply = await gw.complete(prompt("quote in prose"), json_schema=SCHEMA_TEXT)
    assert reply.content == '{"ticker":"ACME","price":12}' and reply.schema_repaired
    fix = (await control.requests())[1]["body"]["messages"][-1]["content"]
    assert "not valid JSON" in fix


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "objekt"}', "not a valid JSON Schema"),
        ('{"properties": {"a": {"minimum": "zero"}}}', "not a valid JSON Schema"),
    ],
)
async def test_invalid_schema_is_invalid_argument(
    gw: Gw, control: DevProviderControl, schema: str, problem: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(prompt("whatever"), json_schema=schema)
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["json_schema"]
    assert problem in info.field_violations[0].description
    assert await control.requests() == []


async def test_schema_needs_a_json_response_format(gw: Gw, control: DevProviderControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.complete(
            prompt("text please"),
            json_schema=SCHEMA_TEXT,
            response_format=pb.RESPONSE_FORMAT_TEXT,
        )
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["response_format"]
    await control.script({"content": '{"ticker": "A", "price": 1}'})
    reply = await gw.complete(
        prompt("json please"),
        json_schema=SCHEMA_TEXT,
        response_format=pb.RESPONSE_FORMAT_JSON_OBJECT,
    )
    assert reply.content == '{"ticker":"A","price":1}'


async def test_structured_output_model_gets_the_schema_natively(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        llm_gateway_providers={
            "native": {"base_url": provider.base_url, "api_key": DEFAULT_API_KEY}
        },
        llm_gateway_models={
            "native-chat": {
                "provider": "native",
                "context_window": 32_768,
                "max_output_tokens": 4096,
                "input_cache_hit_per_mtok": "0",
                "input_cache_miss_per_mtok": "0",
                "output_per_mtok": "0",
                "structured_output": True,
            }
        },
    )
    await control.script({"content": '{"price": 2, "ticker": "B"}'})
    text = prompt("native quote")
    reply = await gw.complete(text, model="native-chat", json_schema=SCHEMA_TEXT)
    assert reply.content == '{"price":2,"ticker":"B"}' and not reply.schema_repaired
    body = (await control.requests())[-1]["body"]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    assert body["messages"] == [{"role": "user", "content": text}]


async def test_cache_hit_on_the_same_request_and_schema(
    gw: Gw, control: DevProviderControl
) -> None:
    await control.script(
        {"content": "no json here"},
        {"content": '{"ticker": "C", "price": 5}'},
    )
    text = prompt("cache me")
    first = await gw.complete(text, json_schema=SCHEMA_TEXT, temperature=0)
    assert first.schema_repaired and not first.cached
    again = await gw.complete(text, json_schema=SCHEMA_TEXT, temperature=0)
    assert again.cached and again.content == first.content and nanos(again.cost) == 0
    assert len(await control.requests()) == 2
    # Another schema is another entry (the dev provider answers it following the schema).
    other = json.dumps({"type": "object", "required": ["echo"]})
    fresh = await gw.complete(text, json_schema=other, temperature=0)
    assert not fresh.cached and json.loads(fresh.content) == {"echo": f"echo: {text}"}
    assert len(await control.requests()) == 3


async def test_invalid_answers_are_not_cached(gw: Gw, control: DevProviderControl) -> None:
    await control.script({"content": "{}"}, {"content": "{}"})
    text = prompt("never cached")
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.complete(text, json_schema=SCHEMA_TEXT, temperature=0)
    await control.script({"content": '{"ticker": "D", "price": 1}'})
    reply = await gw.complete(text, json_schema=SCHEMA_TEXT, temperature=0)
    assert not reply.cached and reply.content == '{"ticker":"D","price":1}'


async def test_no_schema_field_on_streams() -> None:
    assert "json_schema" not in pb.StreamCompleteRequest.DESCRIPTOR.fields_by_name


async def test_personal_data_stays_out_of_the_repair_round(
    gw: Gw, control: DevProviderControl
) -> None:
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"contact": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["contact", "n"],
        }
    )
    await control.script(
        {"content": '{"contact": "[EMAIL_1]", "n": "[EMAIL_1]"}'},
        {"content": '{"contact": "[EMAIL_1]", "n": 1}'},
    )
    text = prompt("who is jane.doe@example.com")
    reply = await gw.complete(text, json_schema=schema)
    assert json.loads(reply.content) == {"contact": "jane.doe@example.com", "n": 1}
    assert reply.schema_repaired
    sent = json.dumps([r["body"] for r in await control.requests()])
    assert "jane.doe@example.com" not in sent and "[EMAIL_1]" in sent
