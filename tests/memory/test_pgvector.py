"""PostgreSQL mode: users over the in-process index cap are recalled in hybrid/vector mode
from pgvector candidates (services/memory/pgvector.py), scored by the index's own code:
the same ids, order and ScoreParts as the transient full load when the candidates hold
everything; filters, history, expiry and erasure respected; the store starts without it."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from finsight.memory.v1 import memory_pb2 as pb
from services.memory import pgvector
from services.memory.models import FactFilter, RecallMode, ScoredFact
from tests.conftest import Keys
from tests.memory.conftest import Memory, sql, start_memory
from tests.memory.test_recall import consent, remember
from tests.tenant_sql import check_statement, to_native_params

HOLDING = "I own Microsoft stock since 2019"
QUESTION = "Should I add more MSFT shares?"  # no term in common with HOLDING
_SUBJECTS = ("My sister", "The user", "Our family", "My broker", "The advisor", "My partner")
_VERBS = ("likes", "avoids", "holds", "plans to buy", "sold", "asked about", "worries about")
_OBJECTS = (
    "index funds",
    "government bonds",
    "a flat in Lisbon",
    "gold coins",
    "tech startups",
    "a pension top-up",
    "crypto tokens",
    "the emergency fund",
    "a used car",
    "tuition for the kids",
    "dividend stocks",
    "a holiday in Japan",
)
KINDS = ("general", "goal", "preference")


def corpus(n: int, seed: int = 7) -> list[pb.NewFact]:
    rnd = random.Random(seed)
    texts: set[str] = set()
    while len(texts) < n:
        texts.add(f"{rnd.choice(_SUBJECTS)} {rnd.choice(_VERBS)} {rnd.choice(_OBJECTS)}")
    return [
        pb.NewFact(text=t, kind=KINDS[i % 3], importance=rnd.random())
        for i, t in enumerate(sorted(texts))
    ]


def served(path: str) -> float:
    return REGISTRY.get_sample_value("finsight_memory_recall_served_total", {"path": path}) or 0.0


async def _pg_has_vector(pg_url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        return await cur.fetchone() is not None


@pytest.fixture
async def big(tmp_path: Path, redis_url: str, api_keys: Keys, pg_url: str) -> AsyncIterator[Memory]:
    """A PostgreSQL service whose index cap is tiny: every user is "over the cap"."""
    if not await _pg_has_vector(pg_url):
        pytest.skip("this PostgreSQL server has no pgvector extension (pg_available_extensions)")
    server = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_reembed_interval_s=0,  # passes are run by the tests
        memory_database_url=pg_url,
        memory_recall_index_max_entries=10,
        memory_recall_center_min_facts=20,  # centring on, on a small corpus
    )
    assert server.app.manager.pgvector is not None
    yield server
    await server.close()


async def fill(memory: Memory, user: str, n: int) -> list[str]:
    await consent(memory, user)
    facts = [pb.NewFact(text=HOLDING, kind="general", importance=0.5), *corpus(n - 1)]
    ids: list[str] = []
    for at in range(0, len(facts), 50):
        ids += await remember(memory, user, *facts[at : at + 50])
    return ids


async def both(
    memory: Memory, user: str, query: str, flt: FactFilter, mode: RecallMode, k: int = 10
) -> tuple[list[ScoredFact], list[ScoredFact]]:
    """(pgvector path, transient path) for one query; asserts which path served each."""
    manager = memory.app.manager
    # The tiny cap: a user's first load (after any deletion too) answers its own request.
    await manager._recall("acme", user, query, flt, k, mode)
    before = served("pgvector"), served("transient")
    via_pgvector = await manager._recall("acme", user, query, flt, k, mode)
    assert served("pgvector") == before[0] + 1
    kept, manager.pgvector = manager.pgvector, None
    try:
        via_transient = await manager._recall("acme", user, query, flt, k, mode)
    finally:
        manager.pgvector = kept
    assert served("transient") == before[1] + 1
    return via_pgvector, via_transient


def assert_same(a: list[ScoredFact], b: list[ScoredFact]) -> None:
    assert [s.fact.fact_id for s in a] == [s.fact.fact_id for s in b]
    for x, y in zip(a, b, strict=True):
        for part in (
            "bm25",
            "bm25_normalized",
            "vector_similarity",
            "vector_normalized",
            "relevance",
            "recency",
            "importance",
        ):
            assert getattr(x, part) == pytest.approx(getattr(y, part), abs=1e-6), part
        assert x.score == pytest.approx(y.score, abs=1e-6)
        assert x.fact.embedding_model == y.fact.embedding_model


QUERIES = (
    QUESTION,
    "bonds and index funds",
    "where does my sister want to travel",
    "kids school money",
    "gold",
)


async def test_pgvector_path_equals_the_transient_path(big: Memory) -> None:
    ids = await fill(big, "u1", 120)
    manager = big.app.manager
    assert manager.pgvector is not None
    # Before the mirror pass every vector is scored from bytea (not mirrored yet); after
    # it, the candidates come from pgvector. Both equal the transient full load.
    for mirrored in (False, True):
        if mirrored:
            assert await manager.pgvector.mirror_pass(["acme"]) == 120
            assert await manager.pgvector.mirror_pass(["acme"]) == 0
        for mode in (RecallMode.HYBRID, RecallMode.VECTOR):
            for query in QUERIES:
                for flt in (FactFilter(), FactFilter(kinds=("goal", "general"))):
                    a, b = await both(big, "u1", query, flt, mode)
                    assert a, (query, mode)
                    assert_same(a, b)
                    if flt.kinds:
                        assert {s.fact.kind for s in a} <= {"goal", "general"}
    # By meaning: HOLDING shares no term with the question.
    first, _ = await both(big, "u1", QUESTION, FactFilter(), RecallMode.HYBRID)
    assert first[0].fact.fact_id == ids[0]
    assert first[0].bm25 == 0 and first[0].vector_similarity > 0
    # Through gRPC too (after a warm-up of the tiny index cap: the first load answers).
    before = served("pgvector")
    reply = await big.stub.Recall(
        pb.RecallRequest(user_id="u1", query=QUESTION, k=3), metadata=big.md()
    )
    assert reply.facts[0].fact.fact_id == ids[0]
    assert reply.facts[0].fact.embedding_model
    assert served("pgvector") == before + 1


async def test_history_expiry_and_erasure_are_respected(big: Memory) -> None:
    ids = await fill(big, "u2", 60)
    manager = big.app.manager
    assert manager.pgvector is not None
    await manager.pgvector.mirror_pass(["acme"])
    best = await manager._recall("acme", "u2", QUESTION, FactFilter(), 5, RecallMode.HYBRID)
    assert best[0].fact.fact_id == ids[0]
    # Superseded (history) and expired facts are not current: neither path returns them.
    await sql(
        big,
        f"UPDATE facts SET valid_to = now() WHERE tenant = 'acme' AND fact_id = '{ids[0]}'",
        write=True,
    )
    await sql(
        big,
        "UPDATE facts SET expires_at = now() - interval '1 second' "
        f"WHERE tenant = 'acme' AND fact_id IN ('{ids[1]}', '{ids[2]}')",
        write=True,
    )
    for mode in (RecallMode.HYBRID, RecallMode.VECTOR):
        for query in QUERIES:
            a, b = await both(big, "u2", query, FactFilter(), mode, k=100)
            assert_same(a, b)
            assert not {ids[0], ids[1], ids[2]} & {s.fact.fact_id for s in a}
    # Forget: gone from the candidates (its row and vector column are deleted together).
    await big.stub.Forget(pb.ForgetRequest(user_id="u2", fact_ids=[ids[3]]), metadata=big.md())
    a, b = await both(big, "u2", QUERIES[1], FactFilter(), RecallMode.VECTOR, k=100)
    assert_same(a, b)
    assert ids[3] not in {s.fact.fact_id for s in a}
    # Export still names the model; erasure leaves no row (and so no vector) behind.
    rows = await sql(
        big,
        "SELECT count(*) FROM facts WHERE tenant = 'acme' AND user_id = 'u2' "
        "AND embedding_v IS NOT NULL",
    )
    assert rows[0][0] == 60 - 1
    await big.stub.DeleteUserData(pb.DeleteUserDataRequest(user_id="u2"), metadata=big.md())
    rows = await sql(big, "SELECT count(*) FROM facts WHERE tenant = 'acme' AND user_id = 'u2'")
    assert rows[0][0] == 0
    assert await manager._recall("acme", "u2", QUESTION, FactFilter(), 5, RecallMode.HYBRID) == []


async def test_export_names_the_model(big: Memory) -> None:
    await fill(big, "u5", 3)
    assert big.app.manager.pgvector is not None
    await big.app.manager.pgvector.mirror_pass(["acme"])
    out = [
        part
        async for part in big.stub.ExportUserData(
            pb.ExportUserDataRequest(user_id="u5"), metadata=big.md()
        )
    ]
    facts = [part.fact for part in out if part.WhichOneof("item") == "fact"]
    assert len(facts) == 3 and all(f.embedding_model for f in facts)


async def test_a_large_user_gets_an_hnsw_index(
    tmp_path: Path, redis_url: str, api_keys: Keys, pg_url: str
) -> None:
    if not await _pg_has_vector(pg_url):
        pytest.skip("this PostgreSQL server has no pgvector extension (pg_available_extensions)")
    server = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_reembed_interval_s=0,
        memory_database_url=pg_url,
        memory_recall_index_max_entries=0,
        memory_recall_pgvector_min_facts=40,
    )
    try:
        ids = await fill(server, "u3", 60)
        pgv = server.app.manager.pgvector
        assert pgv is not None
        await pgv.mirror_pass(["acme"])
        found = await server.app.manager._recall(
            "acme", "u3", QUESTION, FactFilter(), 5, RecallMode.HYBRID
        )
        assert found[0].fact.fact_id == ids[0]
        name = pgvector.hnsw_index_name("acme", "u3", server.app.manager._index_model, 256)
        task = pgv._hnsw[name]
        assert await task is True
        (definition,) = await sql(
            server, f"SELECT indexdef FROM pg_indexes WHERE indexname = '{name}'"
        )
        assert "hnsw" in definition[0] and "'u3'" in definition[0]
        assert await pgv.build_hnsw("acme", "u3", server.app.manager._index_model, 256)
        # The ANN statement can use it (its WHERE implies the partial index's predicate);
        # on 60 rows the planner only prefers it when told sorting is costly.
        params = {
            "tenant": "acme",
            "user_id": "u3",
            "model": server.app.manager._index_model,
            "now": None,
            "kinds": None,
            "tags": None,
            "after": None,
            "before": None,
            "n": 10,
            "q": "[" + ",".join(["0.1"] * 256) + "]",
        }

        async def explain(conn: Any) -> str:
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                await conn.execute(f"SET LOCAL {setting} = off")
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            cur = await conn.execute("EXPLAIN " + pgvector.ANN.format(dims=256), params)
            return "\n".join(r[0] for r in await cur.fetchall())

        assert name in await server.app.db.snapshot("test_explain", explain)  # type: ignore[union-attr]
        found = await server.app.manager._recall(
            "acme", "u3", QUESTION, FactFilter(), 5, RecallMode.HYBRID
        )
        assert found[0].fact.fact_id == ids[0]
        # The index's definition names the user: an erasure drops it with their rows.
        await server.stub.DeleteUserData(
            pb.DeleteUserDataRequest(user_id="u3"), metadata=server.md()
        )
        assert await sql(server, f"SELECT 1 FROM pg_indexes WHERE indexname = '{name}'") == []
        assert not any("'u3'" in d for (d,) in await sql(server, "SELECT indexdef FROM pg_indexes"))
    finally:
        await server.close()


async def test_off_or_unavailable_falls_back_to_the_transient_path(
    tmp_path: Path,
    redis_url: str,
    api_keys: Keys,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    common: dict[str, Any] = {
        "memory_purge_interval_s": 0,
        "memory_reembed_interval_s": 0,
        "memory_database_url": pg_url,
        "memory_recall_index_max_entries": 0,
    }
    # An extension the server cannot create (as on a PostgreSQL without pgvector, or a
    # role without the privilege): one warning, the store starts, today's path serves.
    monkeypatch.setattr(
        pgvector, "SETUP", [*pgvector.SETUP[:1], "CREATE EXTENSION no_such_extension_here"]
    )
    with caplog.at_level(logging.WARNING, logger="services.memory.pgvector"):
        server = await start_memory(
            tmp_path / "a", redis_url, api_keys, memory_redis_prefix="t-pgv-a", **common
        )
    try:
        assert server.app.manager.pgvector is None
        assert REGISTRY.get_sample_value("finsight_memory_pgvector_available") == 0
        assert [r for r in caplog.records if "pgvector unavailable" in r.getMessage()]
        ids = await fill(server, "u4", 10)
        before = served("transient")
        reply = await server.stub.Recall(
            pb.RecallRequest(user_id="u4", query=QUESTION, k=3), metadata=server.md()
        )
        assert reply.facts[0].fact.fact_id == ids[0]
        assert served("transient") == before + 1
    finally:
        await server.close()
    monkeypatch.undo()
    server = await start_memory(
        tmp_path / "b",
        redis_url,
        api_keys,
        memory_redis_prefix="t-pgv-b",
        memory_recall_pgvector="off",
        **common,
    )
    try:
        assert server.app.manager.pgvector is None
        assert REGISTRY.get_sample_value("finsight_memory_pgvector_available") == 0
    finally:
        await server.close()


async def test_statements_pin_their_tenant_and_are_valid(big: Memory) -> None:
    tables = {"facts", "fact_terms", "fact_versions", "sessions", "messages", "consent"}
    for name, text in pgvector.STATEMENTS.items():
        assert not check_statement(text, tables), name

    async def prepare(conn: Any) -> None:
        for text in pgvector.STATEMENTS.values():
            await conn.execute(f"PREPARE check_statement AS {to_native_params(text)}".encode())
            await conn.execute("DEALLOCATE check_statement")

    await big.app.db.read("test_prepare", prepare)  # type: ignore[union-attr]
