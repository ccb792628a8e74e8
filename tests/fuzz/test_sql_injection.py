"""SQL injection payloads in every string field that reaches SQL: stored verbatim and read
back verbatim, or refused with INVALID_ARGUMENT where the field has a closed alphabet;
never executed (the schema, other users' rows and the file system are untouched).

Fields: memory — message contents and metadata (keys and values), fact texts, recall
queries (their terms are SQL parameters of the BM25 query), context queries and preambles,
session/user/client-message ids, tags, kinds, fact ids; analytics — symbols (every RPC
taking one), Analyze questions (stored in memory); the gateway keeps no SQL (usage and
caches are in Redis): its free-text fields pass through verbatim and its model names are
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.errors import status_info
from services.memory.context_builder import render_query, system_prompt
from tests.fuzz.conftest import FUZZ_USERS, Seeded
from tests.fuzz.protofuzz import SQL_PAYLOADS
from tests.fuzz.targets import table_counts
from tests.security.requests import user_message
from tests.security.stack import random_walk_series

PAYLOADS = [
    *SQL_PAYLOADS,
    "Robert'); DROP TABLE sessions;--",
    "1' AND (SELECT count(*) FROM messages) > 0 --",
    "'; PRAGMA database_list; --",
    "'; INSTALL httpfs; LOAD httpfs; --",
    "' || (SELECT string_agg(content, ',') FROM messages) || '",
    "%'; --",
    "\\x27; DROP TABLE facts; --",
    "\uff24\uff32\uff2f\uff30\u3000\uff34\uff21\uff22\uff2c\uff25 facts",  # full-width DROP TABLE
]
# Ids that fit the closed alphabet [A-Za-z0-9._:@-] yet look like SQL or DuckDB syntax.
ALPHABET_IDS = ["--", "a--b", ":memory:", "@@version", "1-1", "..", "x:y@z.w-v", "md:"]
ALPHABET_SYMBOLS = ["A--", "^--", "X=1", "A.B-C^D", "SELECT", "DROP_TABLE"]
EVIL_FILES = [Path("/tmp/evil.duckdb"), Path("/tmp/leak.csv")]


# Durable tables only: a PostgreSQL temporary table (analytics' per-connection staged_bars,
# ON COMMIT DELETE ROWS) is listed under pg_temp_N by whichever pooled connection made it.
_COLUMNS = (
    "SELECT table_name, column_name FROM information_schema.columns "
    "WHERE left(table_schema, 7) <> 'pg_temp'"
)


def _schema(cur: Any) -> list[tuple[str, str]]:
    return sorted(cur.execute(_COLUMNS).fetchall())


async def _pg_schema(conn: Any) -> list[tuple[str, str]]:
    return sorted(await (await conn.execute(_COLUMNS)).fetchall())


async def schema_of(db: Any) -> list[tuple[str, str]]:
    """Every (table, column) of the service's store, DuckDB or PostgreSQL."""
    from libs.common.pg import PgDatabase

    if isinstance(db, PgDatabase):
        return await db.read("sqli", _pg_schema)
    return await db.read("sqli", _schema)  # type: ignore[no-any-return]


async def _guarded(seeded: Seeded) -> dict[str, Any]:
    """What an executed payload would change: schemas, other users' rows, files."""
    stack = seeded.stack
    others = {}
    for user in FUZZ_USERS:
        counts = await stack.memory_app.store.user_row_counts("acme", user)
        counts.pop("audit_log")
        others[user] = counts
    return {
        "memory_schema": await schema_of(stack.memory_app.db),
        "analytics_schema": await schema_of(stack.analytics_db),
        "bars": await table_counts(stack.analytics_db, ("bars",)),
        "others": others,
        "files": [p.exists() for p in EVIL_FILES],
    }


async def _expect_invalid(call: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    info = status_info(err.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT, info
    assert any(v.field.startswith(field) for v in info.field_violations), info


async def test_memory_stores_payloads_verbatim_and_refuses_them_as_ids(seeded: Seeded) -> None:
    stack = seeded.stack
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    md = stack.keys.md("alice")
    before = await _guarded(seeded)
    user, session = "sqli-user", "sqli-session"
    await mem.SetConsent(mpb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=md)

    # Free text: stored and read back byte for byte.
    messages = [
        mpb.NewMessage(message=user_message(p), metadata={f"k{i}": p, p[:64]: "v"})
        for i, p in enumerate(PAYLOADS)
    ]
    await mem.AppendMessages(
        mpb.AppendMessagesRequest(session_id=session, user_id=user, messages=messages),
        metadata=md,
    )
    page = await mem.GetHistory(
        mpb.GetHistoryRequest(session_id=session, user_id=user, page_size=500), metadata=md
    )
    assert [m.message.content for m in page.messages] == PAYLOADS
    for i, (m, p) in enumerate(zip(page.messages, PAYLOADS, strict=True)):
        assert dict(m.metadata) == {f"k{i}": p, p[:64]: "v"}

    remembered = await mem.Remember(
        mpb.RememberRequest(user_id=user, facts=[mpb.NewFact(text=p) for p in PAYLOADS]),
        metadata=md,
    )
    ids = [f.fact_id for f in remembered.facts]
    for p in PAYLOADS:
        found = await mem.Recall(mpb.RecallRequest(user_id=user, query=p, k=100), metadata=md)
        texts = {f.fact.text for f in found.facts}
        assert texts <= set(PAYLOADS), "recall returned something not stored for this user"
        assert {f.fact.user_id for f in found.facts} <= {user}
    everything = await mem.Recall(mpb.RecallRequest(user_id=user, k=100), metadata=md)
    assert sorted(f.fact.text for f in everything.facts) == sorted(PAYLOADS)

    ctx = await mem.BuildContext(
        mpb.BuildContextRequest(
            session_id=session,
            user_id=user,
            query=PAYLOADS[0],
            system_preamble=PAYLOADS[1],
            token_budget=8192,
        ),
        metadata=md,
    )
    # Verbatim, inside the shapes BuildContext gives them (preamble + data notice; the query
    # fenced as data).
    assert ctx.messages[0].content == system_prompt(PAYLOADS[1])
    assert ctx.messages[-1].content == render_query(PAYLOADS[0])[1]

    exported = [
        item
        async for item in mem.ExportUserData(mpb.ExportUserDataRequest(user_id=user), metadata=md)
    ]
    texts = {i.fact.text for i in exported if i.HasField("fact")}
    contents = [i.message.message.content for i in exported if i.HasField("message")]
    assert texts == set(PAYLOADS) and contents == PAYLOADS

    # Closed alphabets: every payload refused, naming the field; nothing written.
    for p in PAYLOADS:
        await _expect_invalid(
            mem.AppendMessages(
                mpb.AppendMessagesRequest(
                    session_id=p,
                    user_id=p,
                    messages=[mpb.NewMessage(message=user_message("x"), client_message_id=p)],
                ),
                metadata=md,
            ),
            "session_id",
        )
        await _expect_invalid(
            mem.GetHistory(mpb.GetHistoryRequest(session_id=p), metadata=md), "session_id"
        )
        await _expect_invalid(
            mem.DeleteUserData(mpb.DeleteUserDataRequest(user_id=p), metadata=md), "user_id"
        )
        await _expect_invalid(
            mem.Remember(
                mpb.RememberRequest(user_id=user, facts=[mpb.NewFact(text="t", kind=p, tags=[p])]),
                metadata=md,
            ),
            "facts[0].kind",
        )
        await _expect_invalid(
            mem.Recall(
                mpb.RecallRequest(user_id=user, filter=mpb.FactFilter(kinds=[p], tags=[p])),
                metadata=md,
            ),
            "filter.kinds",
        )
        await _expect_invalid(
            mem.Forget(mpb.ForgetRequest(user_id=user, fact_ids=[p]), metadata=md), "fact_ids"
        )

    # Ids inside the alphabet that look like SQL: ordinary, separate ids.
    for i, weird in enumerate(ALPHABET_IDS):
        await mem.AppendMessages(
            mpb.AppendMessagesRequest(
                session_id=weird,
                user_id=weird,
                messages=[mpb.NewMessage(message=user_message(f"m{i}"), client_message_id=weird)],
            ),
            metadata=md,
        )
    for i, weird in enumerate(ALPHABET_IDS):
        page = await mem.GetHistory(
            mpb.GetHistoryRequest(session_id=weird, user_id=weird), metadata=md
        )
        assert [(m.message.content, m.client_message_id, m.user_id) for m in page.messages] == [
            (f"m{i}", weird, weird)
        ]

    # Forgetting by the real ids still works and erases exactly the user's data.
    forgotten = await mem.Forget(mpb.ForgetRequest(user_id=user, fact_ids=ids), metadata=md)
    assert sorted(forgotten.fact_ids) == sorted(set(ids))
    erased = await mem.DeleteUserData(mpb.DeleteUserDataRequest(user_id=user), metadata=md)
    assert erased.messages_deleted == len(PAYLOADS)
    for weird in ALPHABET_IDS:
        await mem.DeleteUserData(mpb.DeleteUserDataRequest(user_id=weird), metadata=md)
    assert await _guarded(seeded) == before


async def test_analytics_symbols_are_refused_or_echoed_verbatim(seeded: Seeded) -> None:
    stack = seeded.stack
    an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
    md, writer = stack.keys.md("alice"), stack.keys.md("alice_writer")
    before = await _guarded(seeded)
    for p in PAYLOADS:
        await _expect_invalid(
            an.ComputeMetrics(apb.ComputeMetricsRequest(symbols=[p]), metadata=md), "symbols"
        )
        await _expect_invalid(
            an.ComputeMetrics(apb.ComputeMetricsRequest(symbols=["FZA"], benchmark=p), metadata=md),
            "benchmark",
        )
        await _expect_invalid(
            an.RollingMetrics(
                apb.RollingMetricsRequest(symbol=p, metric=apb.ROLLING_METRIC_VOLATILITY, window=5),
                metadata=md,
            ),
            "symbol",
        )
        await _expect_invalid(
            an.ComputePortfolio(
                apb.ComputePortfolioRequest(holdings=[apb.Holding(symbol=p, weight=1.0)]),
                metadata=md,
            ),
            "holdings",
        )
        await _expect_invalid(
            an.ComputeFactorExposure(
                apb.ComputeFactorExposureRequest(symbol="FZA", factors=[apb.Factor(symbol=p)]),
                metadata=md,
            ),
            "factors[0].symbol",
        )
        await _expect_invalid(
            an.OptimizePortfolio(
                apb.OptimizePortfolioRequest(
                    symbols=[p, "FZA"],
                    objective=apb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE,
                    groups=[apb.WeightGroup(name=p[:64] or "g", symbols=[p], max_weight=0.5)],
                ),
                metadata=md,
            ),
            "symbols[0]",
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in an.GetBars(apb.GetBarsRequest(symbol=p), metadata=md):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # IngestBars lists a bad series with its symbol exactly as sent, and writes nothing of it.
    async def stream() -> Any:
        for p in PAYLOADS:
            series = random_walk_series("X", 3, seed=1)
            series.symbol = p
            yield apb.IngestBarsRequest(series=[series])

    reply = await an.IngestBars(stream(), metadata=writer)
    assert (reply.received, reply.inserted, reply.updated) == (3 * len(PAYLOADS), 0, 0)
    assert [(r.symbol, r.row_index) for r in reply.rejections] == [(p, -1) for p in PAYLOADS]
    assert await _guarded(seeded) == before

    # Symbols inside the alphabet that look like SQL: ordinary symbols of the tenant.
    async def weird() -> Any:
        for i, s in enumerate(ALPHABET_SYMBOLS):
            yield apb.IngestBarsRequest(series=[random_walk_series(s, 20, seed=i)])

    reply = await an.IngestBars(weird(), metadata=writer)
    assert reply.inserted == 20 * len(ALPHABET_SYMBOLS)
    metrics = await an.ComputeMetrics(
        apb.ComputeMetricsRequest(symbols=ALPHABET_SYMBOLS), metadata=md
    )
    assert [m.symbol for m in metrics.metrics] == ALPHABET_SYMBOLS
    assert all(m.return_count == 19 for m in metrics.metrics)

    # Analyze stores the question in memory verbatim.
    question = PAYLOADS[0]
    answer = await an.Analyze(
        apb.AnalyzeRequest(
            session_id="sqli-an", user_id="sqli-an", symbols=["FZA"], question=question
        ),
        metadata=md,
        timeout=30,
    )
    assert not answer.warnings, list(answer.warnings)
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    page = await mem.GetHistory(mpb.GetHistoryRequest(session_id="sqli-an"), metadata=md)
    assert page.messages[0].message.content == question


async def test_gateway_passes_payloads_through_and_refuses_them_as_model_names(
    seeded: Seeded,
) -> None:
    stack = seeded.stack
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    md = stack.keys.md("alice")
    for p in PAYLOADS:
        reply = await gw.Complete(
            gpb.CompleteRequest(messages=[user_message(p)], max_tokens=200, temperature=0),
            metadata=md,
        )
        assert reply.content == f"echo: {p}"  # the dev provider echoes the last user message
        await _expect_invalid(
            gw.Complete(gpb.CompleteRequest(model=p, messages=[user_message("x")]), metadata=md),
            "model",
        )
        await _expect_invalid(gw.GetUsage(gpb.GetUsageRequest(model=p), metadata=md), "model")
