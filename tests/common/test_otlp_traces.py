"""Traces as an operator reads them: the services as processes, exporting OTLP/gRPC to a
receiver in this process (`tests.otlp`), exactly as they export to a collector.

Each test starts its trace itself (a W3C `traceparent` in the call's metadata, as an
instrumented caller sends it) and then reads that trace from what the receiver got: the
resource of each service, the server span of the RPC, and the named children that explain
where its time went — the GenAI provider attempt, and a CLIENT span per Redis or DuckDB
round trip the request waited for (libs/common/dbspans.py). The services flush their span
batches every 50 ms (`OTEL_BSP_SCHEDULE_DELAY`); the tests wait for the spans they expect
(`OtlpReceiver.wait_for`, woken by each export), never for a fixed time.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from finsight.analytics.v1 import analytics_pb2 as an
from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as llm
from finsight.memory.v1 import memory_pb2 as mem
from tests.otlp import OtlpReceiver, ReceivedSpan, descendants_of, render
from tests.system.harness import Suite

COMPLETE = "/finsight.llm.v1.LlmGatewayService/Complete"
APPEND = "/finsight.memory.v1.MemoryService/AppendMessages"
HISTORY = "/finsight.memory.v1.MemoryService/GetHistory"
RECALL = "/finsight.memory.v1.MemoryService/Recall"
ANALYZE = "/finsight.analytics.v1.AnalyticsService/Analyze"
BUILD_CONTEXT = "/finsight.memory.v1.MemoryService/BuildContext"
RELEASE = "otlp-test-1"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
async def stack(
    receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    suite = Suite(
        Path(tmp_path_factory.mktemp("otlp")),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "FINSIGHT_ENV": "staging",
            "FINSIGHT_RELEASE": RELEASE,
            "FINSIGHT_TRACE_SAMPLE_RATIO": "1.0",
        },
        load_sample_data=True,  # Analyze needs bars
    )
    await suite.up()
    try:
        yield suite
    finally:
        await suite.down()


class Trace:
    """A trace this test starts: the `traceparent` to send, then its spans as received."""

    def __init__(self) -> None:
        self.trace_id = secrets.token_hex(16)
        self.caller_span_id = secrets.token_hex(8)

    def metadata(self, base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return (*base, ("traceparent", f"00-{self.trace_id}-{self.caller_span_id}-01"))

    def server_span(self, spans: list[ReceivedSpan], rpc: str) -> ReceivedSpan | None:
        found = [
            s for s in spans if s.trace_id == self.trace_id and s.kind == "SERVER" and s.name == rpc
        ]
        return found[0] if len(found) == 1 else None

    def has(self, rpc: str, *names: str) -> Callable[[list[ReceivedSpan]], bool]:
        """Predicate: the RPC's server span has arrived, and spans of every name under it."""

        def ready(spans: list[ReceivedSpan]) -> bool:
            root = self.server_span(spans, rpc)
            if root is None:
                return False
            below = {s.name for s in descendants_of(spans, root)}
            return all(n in below for n in names)

        return ready


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def check_resource(span: ReceivedSpan, service_name: str) -> None:
    resource = span.resource
    assert resource["service.name"] == service_name
    assert resource["service.namespace"] == "finsight"
    assert resource["deployment.environment.name"] == "staging"
    assert resource["service.version"] == RELEASE
    assert resource["service.instance.id"]  # a UUID per process without the k8s variables


def check_redis_span(span: ReceivedSpan, operation: str, redis_port: int) -> None:
    attrs = span.attributes
    assert span.kind == "CLIENT", span
    assert attrs["db.system.name"] == "redis"
    assert attrs["db.system"] == "redis"
    assert attrs["db.operation.name"] == operation
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == redis_port
    assert span.status_code != 2, span  # not an error
    # Leaves named by what the round trip is for: never a key or a command line.
    assert "db.query.text" not in attrs and "db.statement" not in attrs


def within(child: ReceivedSpan, parent: ReceivedSpan) -> bool:
    return parent.start_ns <= child.start_ns and child.end_ns <= parent.end_ns


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


# -- the gateway ---------------------------------------------------------------------------
async def test_a_complete_is_one_trace_of_its_provider_attempt_and_redis_round_trips(
    stack: Suite, receiver: OtlpReceiver
) -> None:
    t = Trace()
    reply = await stack.gateway().Complete(
        llm.CompleteRequest(messages=[user("trace this completion")], max_tokens=16),
        metadata=t.metadata(stack.md("alice")),
        timeout=30,
    )
    assert reply.content
    expected = ("chat deepseek-chat", "llm.limits.admit", "llm.usage.record")
    spans = await receiver.wait_for(t.has(COMPLETE, *expected))
    root = t.server_span(spans, COMPLETE)
    assert root is not None
    tree = render(spans, root)

    # The RPC continues the caller's trace, and is served by the gateway process.
    assert root.parent_span_id == t.caller_span_id
    check_resource(root, "llm-gateway")
    below = descendants_of(spans, root)
    assert {s.service for s in below} == {"llm-gateway"}, tree
    # The accounting runs after the answer is returned (services/llm_gateway/accounting.py):
    # in the request's trace, it may end after the server span.
    assert all(within(s, root) for s in below if s.name != "llm.usage.record"), tree

    # The provider attempt, with what an operator filters and bills by.
    (attempt,) = by_name(below, "chat deepseek-chat")
    a = attempt.attributes
    assert attempt.kind == "CLIENT"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "deepseek"
    assert a["gen_ai.request.model"] == "deepseek-chat"
    assert a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.response.id"]
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == stack.provider.port
    assert a["finsight.llm.cost_usd"] > 0

    # One CLIENT span per Redis round trip of the request, in request order: the admission
    # (the caller's rate limit with the tenant's RPM/TPM/budget: one script), then (after
    # the answer) the accounting.
    port = stack.redis.port
    assert not by_name(below, "ratelimit.take"), tree  # spent by the admission script
    (admit,) = by_name(below, "llm.limits.admit")
    (record,) = by_name(below, "llm.usage.record")
    for span in (admit, record):
        check_redis_span(span, "EVALSHA", port)
    assert admit.attributes["finsight.ratelimit.caller"] is True
    assert root.start_ns <= admit.start_ns <= admit.end_ns <= attempt.start_ns, tree
    assert attempt.end_ns <= record.start_ns, tree
    # Not cacheable (no temperature 0): the response cache is never asked.
    assert not by_name(below, "llm.cache.get"), tree


async def test_a_cached_answer_shows_the_cache_round_trips_and_no_provider_call(
    stack: Suite, receiver: OtlpReceiver
) -> None:
    request = llm.CompleteRequest(
        messages=[user(f"cache me {secrets.token_hex(4)}")], max_tokens=8, temperature=0
    )
    first, second = Trace(), Trace()
    await stack.gateway().Complete(request, metadata=first.metadata(stack.md("alice")), timeout=30)
    miss_spans = await receiver.wait_for(
        first.has(COMPLETE, "llm.cache.get", "chat deepseek-chat", "llm.cache.put")
    )
    again = await stack.gateway().Complete(
        request, metadata=second.metadata(stack.md("alice")), timeout=30
    )
    assert again.cached
    hit_spans = await receiver.wait_for(second.has(COMPLETE, "llm.cache.get", "llm.usage.record"))

    miss_root, hit_root = (
        first.server_span(miss_spans, COMPLETE),
        second.server_span(hit_spans, COMPLETE),
    )
    assert miss_root is not None and hit_root is not None
    miss, hit = descendants_of(miss_spans, miss_root), descendants_of(hit_spans, hit_root)
    port = stack.redis.port
    (get,) = by_name(miss, "llm.cache.get")
    (put,) = by_name(miss, "llm.cache.put")
    check_redis_span(get, "GET", port)
    check_redis_span(put, "SET", port)
    assert get.attributes["finsight.llm.cache.hit"] is False
    (hit_get,) = by_name(hit, "llm.cache.get")
    check_redis_span(hit_get, "GET", port)
    assert hit_get.attributes["finsight.llm.cache.hit"] is True
    tree = render(hit_spans, hit_root)
    assert not by_name(hit, "chat deepseek-chat"), tree  # answered without the provider
    assert not by_name(hit, "llm.cache.put"), tree


# -- memory --------------------------------------------------------------------------------
async def test_memory_traces_show_their_duckdb_and_redis_round_trips(
    stack: Suite, receiver: OtlpReceiver
) -> None:
    session, user_id = f"s-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}"
    md = stack.md("alice")
    stub = stack.memory()
    port = stack.redis.port

    append = Trace()
    await stub.AppendMessages(
        mem.AppendMessagesRequest(
            session_id=session,
            user_id=user_id,
            messages=[
                mem.NewMessage(message=user("hello there")),
                mem.NewMessage(message=user("again")),
            ],
        ),
        metadata=append.metadata(md),
        timeout=30,
    )
    spans = await receiver.wait_for(
        append.has(APPEND, "ratelimit.take", "append_batch", "memory.hot_tier.write_through")
    )
    root = append.server_span(spans, APPEND)
    assert root is not None
    check_resource(root, "memory")
    below = descendants_of(spans, root)
    tree = render(spans, root)
    assert all(within(s, root) for s in below), tree
    (commit,) = by_name(below, "append_batch")
    assert commit.kind == "CLIENT"
    assert commit.attributes["db.system.name"] == "duckdb"
    assert commit.attributes["db.system"] == "duckdb"
    assert commit.attributes["db.namespace"] == "memory"
    assert commit.attributes["db.query.summary"] == "append_batch"
    (through,) = by_name(below, "memory.hot_tier.write_through")
    # Written through after COMMIT, as one MULTI of the session's window updates.
    check_redis_span(through, "MULTI", port)
    assert through.attributes["db.operation.batch.size"] >= 2
    assert commit.end_ns <= through.start_ns, tree

    history = Trace()
    reply = await stub.GetHistory(
        mem.GetHistoryRequest(session_id=session, user_id=user_id),
        metadata=history.metadata(md),
        timeout=30,
    )
    assert sorted(m.message.content for m in reply.messages) == ["again", "hello there"]
    spans = await receiver.wait_for(history.has(HISTORY, "memory.hot_tier.lookup"))
    root = history.server_span(spans, HISTORY)
    assert root is not None
    (lookup,) = by_name(descendants_of(spans, root), "memory.hot_tier.lookup")
    check_redis_span(lookup, "ZRANGE", port)

    await stub.SetConsent(
        mem.SetConsentRequest(user_id=user_id, long_term_memory=True), metadata=md, timeout=30
    )
    await stub.Remember(
        mem.RememberRequest(user_id=user_id, facts=[mem.NewFact(text="owns apple shares")]),
        metadata=md,
        timeout=30,
    )
    recall = Trace()
    found = await stub.Recall(
        mem.RecallRequest(user_id=user_id, query="apple", mode=mem.RECALL_MODE_LEXICAL),
        metadata=recall.metadata(md),
        timeout=30,
    )
    assert [f.fact.text for f in found.facts] == ["owns apple shares"]
    spans = await receiver.wait_for(recall.has(RECALL, "memory.recall.bm25"))
    root = recall.server_span(spans, RECALL)
    assert root is not None
    below = descendants_of(spans, root)
    tree = render(spans, root)
    duck = [s for s in below if s.attributes.get("db.system.name") == "duckdb"]
    assert duck, tree  # the recall read its facts (or their version) from DuckDB
    for span in duck:
        assert span.kind == "CLIENT"
        assert span.attributes["db.query.summary"] == span.name
        assert within(span, root)


async def test_round_trips_outside_a_request_make_no_traces_of_their_own(
    stack: Suite, receiver: OtlpReceiver
) -> None:
    # Every readiness round of memory reads DuckDB's memory use (`memory_usage`), 4 a second
    # here: with no request around it, that read must not arrive as a trace of one span.
    probes = {"db": "memory", "statement": "memory_usage"}
    sample = "finsight_db_query_seconds_count"
    assert await stack.metric("memory", sample, probes) > 0
    # Spans are exported in the order they end: once a later request's trace has arrived,
    # whatever those reads would have made has arrived too.
    later = Trace()
    await stack.memory().AppendMessages(
        mem.AppendMessagesRequest(
            session_id=f"s-{secrets.token_hex(4)}",
            user_id="u-later",
            messages=[mem.NewMessage(message=user("later"))],
        ),
        metadata=later.metadata(stack.md("alice")),
        timeout=30,
    )
    await receiver.wait_for(later.has(APPEND, "append_batch"))
    orphans = [
        f"{s.service}:{s.name}"
        for s in receiver.spans()
        if s.attributes.get("db.system.name") and not s.parent_span_id
    ]
    assert not orphans
    assert not [s for s in receiver.spans() if s.name == "memory_usage"]


# -- one question across the three services --------------------------------------------------
async def test_an_analyze_is_one_trace_across_the_three_services(
    stack: Suite, receiver: OtlpReceiver
) -> None:
    t = Trace()
    reply = await stack.analytics().Analyze(
        an.AnalyzeRequest(
            session_id=f"s-{secrets.token_hex(4)}",
            user_id="u-analyze",
            symbols=["AAPL"],
            question="How volatile was Apple?",
        ),
        metadata=t.metadata(stack.md("alice")),
        timeout=60,
    )
    assert reply.trace_id == t.trace_id  # what the caller can quote to an operator
    spans = await receiver.wait_for(
        t.has(ANALYZE, BUILD_CONTEXT, COMPLETE, APPEND, "chat deepseek-chat", "append_batch")
    )
    root = t.server_span(spans, ANALYZE)
    assert root is not None
    tree = render(spans, root)
    check_resource(root, "analytics")
    below = descendants_of(spans, root)
    servers = {s.name: s for s in below if s.kind == "SERVER"}
    check_resource(servers[BUILD_CONTEXT], "memory")
    check_resource(servers[COMPLETE], "llm-gateway")
    check_resource(servers[APPEND], "memory")
    # Each downstream RPC hangs off analytics' CLIENT span of the same call.
    for server in servers.values():
        (client,) = [s for s in below if s.span_id == server.parent_span_id]
        assert (client.kind, client.service, client.name) == ("CLIENT", "analytics", server.name)
    # In the order the question is answered: context, completion, then the exchange stored.
    order = [servers[BUILD_CONTEXT], servers[COMPLETE], servers[APPEND]]
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(order)), tree
    # Every service's own Redis round trips are in the same trace (the kit's rate limit:
    # the gateway spends it in its admission script).
    takes = {s.service for s in below if s.name == "ratelimit.take"}
    assert takes == {"analytics", "memory"}, tree
    (admit,) = [s for s in below if s.name == "llm.limits.admit"]
    assert admit.service == "llm-gateway" and admit.attributes["finsight.ratelimit.caller"]
