"""Hybrid recall: BM25 fused with vector similarity (the local wordllama model, or the
gateway's Embed RPC against the dev provider's /embeddings), explained part by part; vectors
stored with the model that made them and caught up by the re-embed; degrading to lexical
when the embedder fails."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from finsight.memory.v1 import memory_pb2 as pb
from libs.devprovider import DevProvider
from services.memory import recall
from services.memory.embedding import LOCAL_MODEL, LocalEmbedder
from services.memory.models import Fusion, RecallMode, RecallWeights
from tests.conftest import Keys
from tests.llm_gateway.conftest import start_gateway
from tests.llm_gateway.test_embed import embedding_settings
from tests.memory.conftest import Memory, sql, start_memory
from tests.memory.test_recall import consent, remember

HOLDING = "I own Microsoft stock since 2019"
QUESTION = "Should I add more MSFT shares?"  # no term in common with HOLDING
OTHERS = ("Prefers low-volatility dividend portfolios", "Lives in Berlin with two cats")
FLOOR, A = 0.15, 0.7  # MEMORY_RECALL_MIN_SIMILARITY, MEMORY_RECALL_VECTOR_WEIGHT defaults


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    return LocalEmbedder()


def cosine(local: LocalEmbedder, a: str, b: str) -> float:
    """The similarity recomputed here from the model's raw (unnormalised) vectors."""
    va, vb = (np.asarray(v, np.float64) for v in local._model.embed([a, b], norm=False))
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


async def recall_ids(
    memory: Memory, user: str, query: str, mode: int, k: int = 10
) -> list[pb.RecalledFact]:
    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id=user, query=query, k=k, mode=mode), metadata=memory.md()
    )
    return list(reply.facts)


async def test_hybrid_recalls_by_meaning_what_lexical_misses(
    memory: Memory, local: LocalEmbedder
) -> None:
    await consent(memory, "u1")
    holding, *_ = await remember(memory, "u1", *(pb.NewFact(text=t) for t in (HOLDING, *OTHERS)))
    assert await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_LEXICAL) == []

    hybrid = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_HYBRID)
    unspecified = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_UNSPECIFIED)
    assert [f.fact.fact_id for f in hybrid] == [holding]  # the others are below the floor
    assert [f.fact.fact_id for f in unspecified] == [holding]  # hybrid is the default
    (best,) = hybrid
    parts = best.score
    assert best.fact.embedding_model == LOCAL_MODEL
    assert parts.vector_similarity == pytest.approx(cosine(local, HOLDING, QUESTION), abs=1e-5)
    assert parts.vector_similarity >= FLOOR
    assert parts.bm25 == 0 and parts.bm25_normalized == 0
    assert parts.vector_normalized == 1.0  # the best (only) candidate
    assert parts.relevance == pytest.approx((1 - A) * 0 + A * 1.0)  # relative fusion
    assert parts.score == pytest.approx(
        0.6 * parts.relevance + 0.2 * parts.recency + 0.2 * parts.importance, rel=1e-9
    )
    for other in OTHERS:
        assert cosine(local, other, QUESTION) < FLOOR


async def test_hybrid_ranks_lexical_and_semantic_matches_and_explains_both(
    memory: Memory,
) -> None:
    await consent(memory, "u1")
    texts = ("Holds 120 MSFT shares bought in 2021", HOLDING, "MSFT earnings call notes", *OTHERS)
    stored = await remember(memory, "u1", *(pb.NewFact(text=t) for t in texts))
    ids = dict(zip(texts, stored, strict=True))
    hybrid = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_HYBRID)
    got = {f.fact.fact_id: f for f in hybrid}
    assert ids[texts[0]] == hybrid[0].fact.fact_id  # both parts agree: first
    assert ids[HOLDING] in got  # by meaning alone
    best_bm25 = max(f.score.bm25 for f in hybrid)
    best_sim = max(f.score.vector_similarity for f in hybrid)
    for f in hybrid:
        s = f.score
        assert s.bm25_normalized == pytest.approx(s.bm25 / best_bm25, rel=1e-12)
        above = s.vector_similarity - FLOOR
        expected_vn = above / (best_sim - FLOOR) if above >= 0 else 0.0  # min-max from the floor
        assert s.vector_normalized == pytest.approx(expected_vn, rel=1e-9, abs=1e-12)
        assert s.relevance == pytest.approx((1 - A) * s.bm25_normalized + A * s.vector_normalized)
        assert s.bm25 > 0 or s.vector_similarity >= FLOOR  # nothing unmatched is a candidate
    vector = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_VECTOR)
    assert all(f.score.vector_similarity >= FLOOR for f in vector)
    assert all(f.score.relevance == f.score.vector_normalized for f in vector)
    assert ids[HOLDING] in {f.fact.fact_id for f in vector}


def test_reciprocal_rank_fusion_by_hand() -> None:
    weights = RecallWeights(0.6, 0.2, 0.2, 30, RecallMode.HYBRID, Fusion.RRF, rrf_k=60)
    lexical = np.array([1.0, 0.5, 0.0, 0.5])  # ranks 1, 2, -, 2 (a tie shares the rank)
    vector = np.array([0.0, 1.0, 0.8, 0.2])  # ranks -, 1, 2, 3
    got = recall.fuse(lexical, vector, RecallMode.HYBRID, weights)
    scale = 61 / 2
    want = [1 / 61 * scale, (1 / 62 + 1 / 61) * scale, 1 / 62 * scale, (1 / 62 + 1 / 63) * scale]
    assert got == pytest.approx(want, rel=1e-12)
    both_first = recall.fuse(np.array([1.0]), np.array([1.0]), RecallMode.HYBRID, weights)
    assert both_first == pytest.approx([1.0])
    relative = RecallWeights(0.6, 0.2, 0.2, 30, RecallMode.HYBRID, vector_weight=0.25)
    assert recall.fuse(lexical, vector, RecallMode.HYBRID, relative) == pytest.approx(
        0.75 * lexical + 0.25 * vector
    )
    assert list(recall.fuse(lexical, vector, RecallMode.LEXICAL, weights)) == list(lexical)
    assert list(recall.fuse(lexical, vector, RecallMode.VECTOR, weights)) == list(vector)


async def test_a_user_beyond_the_index_is_ranked_the_same_by_a_transient_load(
    memory: Memory,
) -> None:
    rng = random.Random(5)
    words = [
        "stock",
        "bond",
        "equity",
        "dividend",
        "risk",
        "swing",
        "volatile",
        "calm",
        "growth",
        "income",
        "cash",
        "gold",
    ]
    await consent(memory, "u1")
    texts = [" ".join(rng.choices(words, k=rng.randint(2, 6))) + f" n{i}" for i in range(120)]
    for lo in range(0, len(texts), 60):
        await remember(
            memory,
            "u1",
            *(pb.NewFact(text=t, importance=rng.random()) for t in texts[lo : lo + 60]),
        )
    queries = ["steady income", "volatile growth stocks", "gold", "how risky is my cash"]
    cached = [await recall_ids(memory, "u1", q, pb.RECALL_MODE_HYBRID, k=20) for q in queries]
    before = REGISTRY.get_sample_value("finsight_memory_recall_served_total", {"path": "transient"})
    memory.app.manager.index.max_entries = 0  # as if the user were over the cap
    memory.app.manager.index.clear()
    memory.app.manager.pgvector = None  # PostgreSQL's pgvector path: tests/memory/test_pgvector.py
    transient = [await recall_ids(memory, "u1", q, pb.RECALL_MODE_HYBRID, k=20) for q in queries]
    after = REGISTRY.get_sample_value("finsight_memory_recall_served_total", {"path": "transient"})
    assert (after or 0) - (before or 0) == len(queries)
    for a, b in zip(cached, transient, strict=True):
        assert [f.fact.fact_id for f in a] == [f.fact.fact_id for f in b]
        assert [f.score.relevance for f in a] == [f.score.relevance for f in b]
        assert a and a[0].score.vector_similarity != 0


async def test_the_reembed_gives_old_facts_vectors_of_the_current_model(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    common = {
        "memory_redis_prefix": f"t-{tmp_path.name}",
        "memory_purge_interval_s": 0,
        "memory_reembed_interval_s": 0,  # passes run by the test
        "memory_database_url": database_url,
    }
    plain = await start_memory(
        tmp_path, redis_url, api_keys, memory_embedding_provider="none", **common
    )
    try:
        await consent(plain, "u1")
        holding, *_ = await remember(plain, "u1", *(pb.NewFact(text=t) for t in (HOLDING, *OTHERS)))
        # No embedder: hybrid is served lexically, and says so.
        assert await recall_ids(plain, "u1", QUESTION, pb.RECALL_MODE_HYBRID) == []
    finally:
        await plain.close()

    memory = await start_memory(tmp_path, redis_url, api_keys, **common)
    try:
        assert await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_VECTOR) == []  # no vectors
        manager = memory.app.manager
        assert await manager.reembed_pass() == 3
        assert REGISTRY.get_sample_value("finsight_memory_reembed_pending_facts") == 0
        (found,) = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_HYBRID)
        assert found.fact.fact_id == holding and found.fact.embedding_model == LOCAL_MODEL
        assert await manager.reembed_pass() == 0  # idempotent: nothing left

        # A model change: vectors of another model are never mixed in, then caught up.
        await sql(memory, "UPDATE facts SET embedding_model = 'old/model'", write=True)
        manager.index.clear()
        assert await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_VECTOR) == []
        assert await manager.reembed_pass() == 3
        (found,) = await recall_ids(memory, "u1", QUESTION, pb.RECALL_MODE_VECTOR)
        assert found.fact.fact_id == holding

        # Export says which model made each vector; erasure leaves none behind.
        exported = [
            item.fact
            async for item in memory.stub.ExportUserData(
                pb.ExportUserDataRequest(user_id="u1"), metadata=memory.md()
            )
            if item.HasField("fact")
        ]
        assert {f.embedding_model for f in exported} == {LOCAL_MODEL}
        await memory.stub.DeleteUserData(
            pb.DeleteUserDataRequest(user_id="u1"), metadata=memory.md()
        )
        left = await sql(
            memory, "SELECT count(*) FROM facts WHERE embedding IS NOT NULL AND user_id = 'u1'"
        )
        assert left == [(0,)]
    finally:
        await memory.close()


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_a_failing_embedder_stores_facts_and_recalls_lexically(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_reembed_interval_s=0,
        memory_embedding_provider="gateway",
        memory_llm_gateway_target="127.0.0.1:9",  # nothing listens
        memory_embedding_timeout_s=0.5,
        memory_database_url=database_url,
    )
    try:
        await consent(memory, "u1")
        (fid,) = await remember(memory, "u1", pb.NewFact(text="Holds gold coins"))
        before = REGISTRY.get_sample_value(
            "finsight_memory_recall_mode_total", {"asked": "hybrid", "served": "lexical"}
        )
        (found,) = await recall_ids(memory, "u1", "gold", pb.RECALL_MODE_HYBRID)
        assert found.fact.fact_id == fid and found.fact.embedding_model == ""
        assert found.score.relevance == found.score.bm25_normalized == 1.0
        after = REGISTRY.get_sample_value(
            "finsight_memory_recall_mode_total", {"asked": "hybrid", "served": "lexical"}
        )
        assert (after or 0) - (before or 0) == 1
        assert await memory.app.manager.reembed_pass() == 0  # still down: retried next pass
    finally:
        await memory.close()


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_gateway_embeddings_from_an_openai_compatible_endpoint(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    async with DevProvider() as provider:
        gateway = await start_gateway(
            tmp_path / "gw", redis_url, api_keys, provider, **embedding_settings(provider.base_url)
        )
        memory = await start_memory(
            tmp_path,
            redis_url,
            api_keys,
            memory_redis_prefix=f"t-{tmp_path.name}",
            memory_purge_interval_s=0,
            memory_reembed_interval_s=0,
            memory_embedding_provider="gateway",
            memory_embedding_route="embed",
            memory_llm_gateway_target=f"127.0.0.1:{gateway.host.bound_port}",
            memory_database_url=database_url,
        )
        try:
            await consent(memory, "u1")
            gold, _ = await remember(
                memory,
                "u1",
                pb.NewFact(text="Keeps physical gold coins in a safe"),
                pb.NewFact(text="Lives in Berlin"),
            )
            embedded = [r for r in provider.state.log if r["path"] == "/v1/embeddings"]
            assert embedded and embedded[0]["body"]["model"] == "dev-embed"
            hits = await recall_ids(memory, "u1", "coins safe", pb.RECALL_MODE_VECTOR)
            assert hits[0].fact.fact_id == gold
            assert hits[0].fact.embedding_model == "gateway/embed"
            assert hits[0].score.vector_similarity > FLOOR
        finally:
            await memory.close()
            await gateway.close()
