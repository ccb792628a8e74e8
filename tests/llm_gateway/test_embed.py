"""Embed: vectors from an OpenAI-compatible `/embeddings` endpoint (the dev provider's), with
the limits, retries, fallback, cache, personal-data policy and accounting of Complete."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.type import money_pb2
from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2 as pb
from libs.common.errors import status_info
from libs.common.tokens import count_many
from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from libs.devprovider.embeddings import embed_text
from services.llm_gateway.pricing import Pricing, Usage
from tests.llm_gateway.conftest import GatewayFactory, Gw, user

PRICE = "0.02"  # USD per million input tokens


def embedding_settings(
    base_url: str, *, backup_url: str | None = None, **extra: Any
) -> dict[str, Any]:
    """What a test (or the memory service's) needs for `Embed(model="embed")` against the
    dev provider: a provider, an embedding model on it, and the route `embed`."""
    providers: dict[str, Any] = {"devembed": {"base_url": base_url, "api_key": DEFAULT_API_KEY}}
    models: dict[str, Any] = {
        "dev-embed": {
            "kind": "embedding",
            "provider": "devembed",
            "input_per_mtok": PRICE,
            "dimensions": 64,
            "prices_as_of": "2026-12-01",
        }
    }
    chain = ["dev-embed"]
    if backup_url is not None:
        providers["backup"] = {"base_url": backup_url, "api_key": DEFAULT_API_KEY}
        models["backup-embed"] = {
            "kind": "embedding",
            "provider": "backup",
            "provider_model": "dev-embed",
            "input_per_mtok": "0.1",
        }
        chain.append("backup-embed")
    return {
        "llm_gateway_providers": providers,
        "llm_gateway_models": models,
        "llm_gateway_routes": {"embed": {"models": chain}},
        "llm_gateway_default_embedding_route": "embed",
        **extra,
    }


@pytest.fixture
async def egw(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> Gw:
    return await gateway_with(**embedding_settings(provider.base_url))


def unique(*texts: str) -> list[str]:
    """Texts no earlier test embedded (the cache lives in the session's Redis)."""
    tag = uuid.uuid4().hex[:8]
    return [f"{t} {tag}" for t in texts]


async def embed(gw: Gw, inputs: list[str], who: str = "alice", **fields: Any) -> pb.EmbedResponse:
    fields.setdefault("model", "embed")
    return await gw.stub.Embed(
        pb.EmbedRequest(inputs=inputs, **fields), metadata=gw.md(who), timeout=10
    )


def nanos(m: money_pb2.Money) -> int:
    return int(m.units) * 1_000_000_000 + int(m.nanos)


async def embedding_calls(control: DevProviderControl) -> list[dict[str, Any]]:
    return [e for e in await control.requests() if e["path"] == "/v1/embeddings"]


async def test_embed_answers_vectors_in_order_with_usage_and_cost(
    egw: Gw, control: DevProviderControl
) -> None:
    before = await egw.stub.GetUsage(pb.GetUsageRequest(model="dev-embed"), metadata=egw.md())
    inputs = unique("alpha beta", "beta gamma", "delta")
    reply = await embed(egw, inputs)
    assert len(reply.embeddings) == 3 and reply.dimensions == 64
    for text, got in zip(inputs, reply.embeddings, strict=True):
        assert list(got.values) == pytest.approx(embed_text(text, 64), abs=1e-6)
    assert reply.provider == "devembed" and reply.model == "dev-embed"
    assert reply.route == "embed" and reply.attempts == 1 and not reply.cached
    tokens = 3 + 3 + 2  # the dev provider's words, each input tagged with one more
    assert reply.usage.prompt_tokens == tokens and reply.usage.completion_tokens == 0
    assert reply.usage.total_tokens == tokens
    expected = Pricing(Decimal(PRICE), Decimal(PRICE), Decimal(0)).cost_nanos(Usage(tokens))
    assert nanos(reply.cost) == expected > 0
    (call,) = await embedding_calls(control)
    assert call["body"] == {"model": "dev-embed", "input": inputs, "encoding_format": "float"}
    after = await egw.stub.GetUsage(pb.GetUsageRequest(model="dev-embed"), metadata=egw.md())
    assert after.total_requests == before.total_requests + 1
    assert after.total_usage.prompt_tokens == before.total_usage.prompt_tokens + tokens
    assert after.total_usage.completion_tokens == before.total_usage.completion_tokens
    assert nanos(after.total_cost) == nanos(before.total_cost) + expected


async def test_dimensions_are_sent_and_vectors_have_them(
    egw: Gw, control: DevProviderControl
) -> None:
    inputs = unique("short vectors")
    reply = await embed(egw, inputs, dimensions=16)
    assert reply.dimensions == 16 and len(reply.embeddings[0].values) == 16
    (call,) = await embedding_calls(control)
    assert call["body"]["dimensions"] == 16


async def test_default_route_applies_to_an_empty_model(
    egw: Gw, control: DevProviderControl
) -> None:
    reply = await embed(egw, unique("no model named"), model="")
    assert reply.route == "embed" and reply.model == "dev-embed"


async def test_second_identical_request_is_a_free_cache_hit(
    egw: Gw, control: DevProviderControl
) -> None:
    inputs = unique("cache me", "and me")
    first = await embed(egw, inputs)
    before = await egw.stub.GetUsage(pb.GetUsageRequest(model="dev-embed"), metadata=egw.md())
    second = await embed(egw, inputs)
    assert second.cached and second.attempts == 0 and nanos(second.cost) == 0
    assert [list(e.values) for e in second.embeddings] == [list(e.values) for e in first.embeddings]
    assert second.model == "dev-embed" and second.dimensions == first.dimensions
    assert len(await embedding_calls(control)) == 1
    after = await egw.stub.GetUsage(pb.GetUsageRequest(model="dev-embed"), metadata=egw.md())
    assert after.total_requests == before.total_requests + 1
    assert sum(r.cache_hits for r in after.rows) == sum(r.cache_hits for r in before.rows) + 1
    assert after.total_usage.total_tokens == before.total_usage.total_tokens
    # Other dimensions, another tenant, or a disabled cache: the provider again.
    await embed(egw, inputs, dimensions=8)
    other = await embed(egw, inputs, who="bob")
    assert not other.cached
    disabled = await embed(egw, inputs, cache_policy=pb.CACHE_POLICY_DISABLED)
    assert not disabled.cached and disabled.attempts == 1
    assert len(await embedding_calls(control)) == 4


async def test_bad_fields_are_invalid_argument_and_no_provider_is_called(
    egw: Gw, control: DevProviderControl
) -> None:
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"inputs": []}, ["inputs"]),
        ({"inputs": ["x"] * 257}, ["inputs"]),
        ({"inputs": ["ok", "   ", "é" * 20_000]}, ["inputs[1]", "inputs[2]"]),
        ({"inputs": ["ok"], "dimensions": -1}, ["dimensions"]),
        ({"inputs": ["ok"], "cache_ttl_seconds": 604_801}, ["cache_ttl_seconds"]),
        ({"inputs": ["ok"], "model": "nope"}, ["model"]),
        ({"inputs": ["ok"], "dimensions": 65}, ["dimensions"]),  # the model has 64
    ]
    for fields, expected in cases:
        fields.setdefault("model", "embed")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await egw.stub.Embed(pb.EmbedRequest(**fields), metadata=egw.md(), timeout=10)
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert [v.field for v in info.field_violations] == expected, fields
    assert await embedding_calls(control) == []


async def test_no_embedding_route_configured_is_failed_precondition(gw: Gw) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Embed(pb.EmbedRequest(inputs=["hello"]), metadata=gw.md(), timeout=10)
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == "NO_EMBEDDING_ROUTE"
    assert "LLM_GATEWAY_DEFAULT_EMBEDDING_ROUTE" in info.message
    assert "kind" in info.message


async def test_models_of_the_wrong_kind_are_invalid_argument(egw: Gw) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await embed(egw, ["hello"], model="deepseek-chat")
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.field_violations] == ["model"]
    assert "chat" in info.field_violations[0].description
    for call in (
        egw.complete("hello", model="embed"),
        egw.stub.CountTokens(
            pb.CountTokensRequest(model="dev-embed", messages=[user("hi")]), metadata=egw.md()
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in info.field_violations] == ["model"]
        assert "Embed" in info.field_violations[0].description


async def test_list_models_shows_embedding_models_and_routes(egw: Gw) -> None:
    listed = await egw.stub.ListModels(pb.ListModelsRequest(), metadata=egw.md())
    models = {m.name: m for m in listed.models}
    assert models["dev-embed"].kind == "embedding" and models["deepseek-chat"].kind == "chat"
    assert models["dev-embed"].available
    assert nanos(models["dev-embed"].pricing.input_cache_miss_per_million) == 20_000_000
    routes = {r.alias: r for r in listed.routes}
    assert routes["embed"].kind == "embedding" and list(routes["embed"].models) == ["dev-embed"]
    assert routes["default"].kind == "chat"


@pytest.mark.parametrize(
    "failure", [{"status": 500}, {"status": 429, "retry_after": 0.01}, {"drop": True}]
)
async def test_a_failed_attempt_is_retried(
    egw: Gw, control: DevProviderControl, failure: dict[str, Any]
) -> None:
    await control.script(failure)
    reply = await embed(egw, unique("retry me"))
    assert reply.attempts == 2 and len(reply.embeddings) == 1
    assert len(await embedding_calls(control)) == 2


async def test_falls_back_to_the_next_embedding_model(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    async with DevProvider() as backup:
        gw = await gateway_with(
            **embedding_settings(provider.base_url, backup_url=backup.base_url),
            llm_gateway_max_retries=1,
        )
        await control.script(default={"status": 503})
        reply = await embed(gw, unique("anyone there"))
        assert reply.provider == "backup" and reply.model == "backup-embed"
        assert reply.attempts == 3  # 2 on devembed, 1 on backup
        assert len(reply.embeddings) == 1 and reply.dimensions == 64
        tokens = reply.usage.prompt_tokens
        backup_price = Pricing(Decimal("0.1"), Decimal("0.1"), Decimal(0))
        assert nanos(reply.cost) == backup_price.cost_nanos(Usage(tokens))
        assert len([e for e in backup.state.log if e["path"] == "/v1/embeddings"]) == 1


async def test_spent_retries_are_unavailable(egw: Gw, control: DevProviderControl) -> None:
    await control.script(default={"status": 502})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await embed(egw, unique("down"))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.UNAVAILABLE and info.reason == "PROVIDER_UNAVAILABLE"
    assert info.metadata["attempts"] == "3"


async def test_personal_data_is_redacted_before_it_leaves(
    egw: Gw, control: DevProviderControl
) -> None:
    inputs = unique("write to jane.doe@example.com today", "nothing here")
    reply = await embed(egw, inputs)
    assert [(r.kind, r.count) for r in reply.redactions] == [("EMAIL", 1)]
    (call,) = await embedding_calls(control)
    sent = call["body"]["input"]
    assert "jane.doe@example.com" not in str(call["body"])
    assert sent[0].startswith("write to [EMAIL_1] today") and sent[1] == inputs[1]
    # The vectors are of what the provider saw (placeholders), and cached as such.
    again = await embed(egw, [inputs[0].replace("jane.doe", "john.roe"), inputs[1]])
    assert again.cached and [(r.kind, r.count) for r in again.redactions] == [("EMAIL", 1)]


async def test_pii_block_route_refuses_before_any_call(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    settings = embedding_settings(provider.base_url)
    settings["llm_gateway_routes"]["embed"]["pii_policy"] = "block"
    gw = await gateway_with(**settings)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await embed(gw, unique("IBAN DE89 3704 0044 0532 0130 00"))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION and info.reason == "PII_BLOCKED"
    assert await embedding_calls(control) == []


@pytest.mark.parametrize(
    "body",
    [
        {"data": [{"index": 0, "embedding": [0.1, 0.2]}]},  # one vector for two inputs
        {
            "data": [
                {"index": 0, "embedding": [0.1, 0.2]},
                {"index": 1, "embedding": [0.1]},  # another length
            ]
        },
        {"data": [{"index": 0, "embedding": [0.1]}, {"index": 0, "embedding": [0.2]}]},
        {"data": [{"index": 0, "embedding": ["x"]}, {"index": 1, "embedding": [0.2]}]},
        {"object": "list"},
        "not an answer",
    ],
)
async def test_a_malformed_answer_is_a_provider_error_and_retried(
    egw: Gw, control: DevProviderControl, body: object
) -> None:
    await control.script({"body": body})
    reply = await embed(egw, unique("one", "two"))
    assert reply.attempts == 2 and len(reply.embeddings) == 2


async def test_vectors_come_back_in_input_order_whatever_the_data_order(
    egw: Gw, control: DevProviderControl
) -> None:
    body = {
        "data": [
            {"index": 1, "embedding": [0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0]},
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    await control.script({"body": body})
    reply = await embed(egw, unique("first", "second"))
    assert [list(e.values) for e in reply.embeddings] == [[1.0, 0.0], [0.0, 1.0]]
    assert reply.dimensions == 2 and reply.usage.prompt_tokens == 7


async def test_without_provider_usage_the_gateway_counts_the_tokens(
    egw: Gw, control: DevProviderControl
) -> None:
    await control.script({"usage": {"prompt_tokens": None, "total_tokens": None}})
    inputs = unique("count these words yourself", "and these")
    reply = await embed(egw, inputs)
    assert reply.usage.prompt_tokens == sum(count_many(inputs)) > 0
    assert nanos(reply.cost) > 0


async def test_the_daily_budget_refuses_but_a_cache_hit_still_answers(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    inputs = unique("budgeted text")
    free = await gateway_with(**embedding_settings(provider.base_url))
    await embed(free, inputs)
    gw = await gateway_with(
        **embedding_settings(provider.base_url), llm_gateway_daily_budget_usd="0"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await embed(gw, unique("not in the cache"))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.reason == "DAILY_BUDGET_EXHAUSTED"
    hit = await embed(gw, inputs)  # spends no budget
    assert hit.cached
    assert len(await embedding_calls(control)) == 1


async def test_the_callers_deadline_bounds_the_call(egw: Gw, control: DevProviderControl) -> None:
    await control.script({"delay_ms": 3000})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await egw.stub.Embed(
            pb.EmbedRequest(model="embed", inputs=unique("slow")), metadata=egw.md(), timeout=0.5
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_breaker_opens_after_consecutive_failures(
    gateway_with: GatewayFactory, provider: DevProvider, control: DevProviderControl
) -> None:
    gw = await gateway_with(
        **embedding_settings(provider.base_url),
        llm_gateway_max_retries=0,
        llm_gateway_breaker_fail_max=2,
    )
    await control.script(default={"status": 500})
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await embed(gw, unique("fail"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await embed(gw, unique("refused here"))
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.UNAVAILABLE and info.reason == "PROVIDER_CIRCUIT_OPEN"
    assert len(await embedding_calls(control)) == 2
    listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=gw.md())
    (state,) = [p.circuit_state for p in listed.providers if p.name == "devembed"]
    assert state == pb.CIRCUIT_STATE_OPEN


async def test_a_full_batch_of_long_texts_is_counted_off_the_event_loop(
    egw: Gw, control: DevProviderControl
) -> None:
    inputs = unique(*[f"text number {i} " + "word " * 40 for i in range(256)])
    assert sum(len(t) for t in inputs) > 32 * 1024
    await control.script({"usage": {"prompt_tokens": None}})
    reply = await embed(egw, inputs)
    assert len(reply.embeddings) == 256
    assert reply.usage.prompt_tokens == sum(count_many(inputs))


async def test_the_usage_event_says_embeddings(
    egw: Gw, control: DevProviderControl, redis_url: str
) -> None:
    inputs = unique("ledger entry")
    reply = await embed(egw, inputs)
    await egw.accounted()  # answers are accounted just after they are returned
    redis = Redis.from_url(redis_url)
    try:
        events: list[Any] = await redis.xrevrange("llm:usage-events", count=50)  # type: ignore[assignment]
    finally:
        await redis.aclose()
    mine = [f for _, f in events if f.get(b"model") == b"dev-embed"]
    fields = mine[0]
    assert fields[b"operation"] == b"embeddings" and fields[b"route"] == b"embed"
    assert int(fields[b"prompt_tokens"]) == reply.usage.prompt_tokens
    assert fields[b"completion_tokens"] == b"0"
    assert int(fields[b"cost_nanos"]) == nanos(reply.cost)
