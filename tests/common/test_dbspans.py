"""Database client spans (libs/common/dbspans.py) against a real Redis-protocol server:
what an operator sees for a round trip that worked, failed, or had Redis away."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from libs.common.dbspans import redis_spans
from libs.common.pg import Conn, PgDatabase
from libs.common.tracing import configure_tracing
from services.llm_gateway.limits import LimitPolicy, TenantLimiter
from tests.conftest import free_port

_EXPORTER = InMemorySpanExporter()
_tracer = trace.get_tracer(__name__)


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    configure_tracing(
        "test", otlp_endpoint=None, extra_processors=(SimpleSpanProcessor(_EXPORTER),)
    )


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_round_trip_is_a_client_span_named_for_its_purpose(
    redis: Redis, redis_url: str, exported: InMemorySpanExporter
) -> None:
    spans = redis_spans(redis)
    assert redis_spans(redis) is spans  # one per client
    with _tracer.start_as_current_span("rpc") as rpc:
        with spans.span("test.thing.read", "GET"):
            await redis.get(f"t:{secrets.token_hex(4)}")
        with spans.pipeline("test.thing.write", 2, transaction=True, command="SET"):
            pass
        with spans.pipeline("test.thing.one", 1, transaction=False, command="HGETALL"):
            pass
    (read,) = named(exported, "test.thing.read")
    assert read.kind == SpanKind.CLIENT
    assert read.parent is not None and read.parent.span_id == rpc.get_span_context().span_id
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert attrs(read) == {
        "db.system": "redis",
        "db.system.name": "redis",
        "db.operation.name": "GET",
        "server.address": "127.0.0.1",
        "server.port": port,
    }
    assert read.status.status_code == StatusCode.UNSET
    (write,) = named(exported, "test.thing.write")
    assert attrs(write)["db.operation.name"] == "MULTI"
    assert attrs(write)["db.operation.batch.size"] == 2
    (one,) = named(exported, "test.thing.one")  # a pipeline of one command is that command
    assert attrs(one)["db.operation.name"] == "HGETALL"
    assert "db.operation.batch.size" not in attrs(one)


async def test_an_error_reply_sets_the_error_type_and_the_redis_error_prefix(
    redis: Redis, exported: InMemorySpanExporter
) -> None:
    key = f"t:{secrets.token_hex(4)}"
    await redis.set(key, "not a number")
    with (
        _tracer.start_as_current_span("rpc"),
        pytest.raises(ResponseError),
        redis_spans(redis).span("test.counter.bump", "INCR"),
    ):
        await redis.incr(key)
    (span,) = named(exported, "test.counter.bump")
    assert span.status.status_code == StatusCode.ERROR
    assert attrs(span)["error.type"] == "ResponseError"
    assert attrs(span)["db.response.status_code"] == "ERR"
    assert not span.events  # no stack trace per failed call

    with (
        _tracer.start_as_current_span("rpc"),
        pytest.raises(ResponseError),
        redis_spans(redis).span("test.hash.read", "HGET"),
    ):
        await redis.hget(key, "field")  # type: ignore[misc]
    (wrong,) = named(exported, "test.hash.read")
    assert attrs(wrong)["db.response.status_code"] == "WRONGTYPE"


async def test_no_span_outside_a_trace(redis: Redis, exported: InMemorySpanExporter) -> None:
    with redis_spans(redis).span("test.background.read", "GET") as span:
        await redis.get("t:background")
    assert not span.is_recording()
    assert not named(exported, "test.background.read")


async def test_with_redis_away_admission_fails_open_and_its_span_says_why(
    exported: InMemorySpanExporter,
) -> None:
    # Nothing listens on the port: connection refused, as while Redis restarts.
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    limiter = TenantLimiter(
        client,
        LimitPolicy(rpm=60, tpm=0, daily_budget_usd=Decimal("1"), overrides={}),
        fail_mode="open",
    )
    with _tracer.start_as_current_span("rpc"):
        reservation = await limiter.admit("acme", tokens=10, max_cost_nanos=1000)
    assert reservation.budget_key is None  # admitted without a reservation
    (span,) = named(exported, "llm.limits.admit")
    assert span.status.status_code == StatusCode.ERROR
    assert attrs(span)["error.type"] == RedisConnectionError.__qualname__
    assert attrs(span)["db.operation.name"] == "EVALSHA"
    await client.aclose()


async def test_a_postgresql_statement_is_a_leaf_span_with_its_server_only_inside_a_trace(
    tmp_path: Path, pg_url: str, exported: InMemorySpanExporter
) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "001_items.sql").write_text("CREATE TABLE items (tenant TEXT, n INT);")
    db = PgDatabase(pg_url, name="spans", migrations_dir=folder)
    await db.open()
    try:

        async def count(conn: Conn) -> int:
            row = await (await conn.execute("SELECT count(*) FROM items")).fetchone()
            return int(row[0]) if row else 0

        await db.read("count_items", count)  # no trace: no span
        assert named(exported, "count_items") == []
        with _tracer.start_as_current_span("request"):
            assert await db.read("count_items", count) == 0
        [span] = named(exported, "count_items")
        a = attrs(span)
        assert span.kind is SpanKind.CLIENT and span.parent is not None
        assert a["db.system.name"] == a["db.system"] == "postgresql"
        assert a["db.query.summary"] == a["db.operation.name"] == "count_items"
        assert a["db.namespace"] and a["server.address"]
    finally:
        await db.close()
