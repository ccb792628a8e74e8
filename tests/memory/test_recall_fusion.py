"""Vector similarity of hybrid and vector recall: the cosine of vectors centred on the mean
of the user's fact vectors (recall_index.UserIndex._cosine), once the user has
`center_min_facts` embedded facts; the plain cosine below that, when it is 0, and for
extraction's dedup by meaning (its threshold was measured on the plain cosine).

What a user would notice: with a static embedding model every fact of a user shares a
large common part, so the plain cosine ranks the facts that are mostly that common part
(small talk, generic questions) above the one fact that is about what the query asks.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.config import MemorySettings
from services.memory.embedding import LOCAL_MODEL, LocalEmbedder
from services.memory.models import (
    INDEX_FACTS_SCHEMA,
    INDEX_POSTINGS_SCHEMA,
    FactFilter,
    QueryVector,
    RecallMode,
    RecallWeights,
)
from services.memory.recall_index import UserIndex
from tests.memory.conftest import Memory
from tests.memory.test_recall import consent, remember

NOW = 1_750_000_000 * 1_000_000
MODEL = "test/model-8"
DIM = 8


def weights(center_min_facts: int, mode: RecallMode = RecallMode.VECTOR) -> RecallWeights:
    return RecallWeights(
        bm25=0.6,
        recency=0.2,
        importance=0.2,
        half_life_days=30,
        mode=mode,
        min_similarity=-1.0,  # every fact with a vector is a candidate: compare them all
        center_min_facts=center_min_facts,
        center_min_similarity=-1.0,
    )


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def tables(vectors: list[np.ndarray | None], first_no: int = 1) -> tuple[pa.Table, pa.Table]:
    n = len(vectors)
    nos = list(range(first_no, first_no + n))
    facts = pa.table(
        {
            "fact_no": nos,
            "fact_id": [f"fct_{i:032x}" for i in nos],
            "doc_len": [1] * n,
            "importance": [0.5] * n,
            "created_us": [NOW] * n,
            "expires_us": [None] * n,
            "kind": ["general"] * n,
            "tags": [[] for _ in range(n)],
            "embedding_model": [MODEL if v is not None else None for v in vectors],
            "embedding": [v.tolist() if v is not None else None for v in vectors],
        },
        schema=INDEX_FACTS_SCHEMA,
    )
    postings = pa.table(
        {"term_key": [7] * n, "fact_no": nos, "tf": [1] * n}, schema=INDEX_POSTINGS_SCHEMA
    )
    return facts, postings


def similarities(index: UserIndex, query: np.ndarray, w: RecallWeights) -> dict[int, float]:
    hits = index.search([], FactFilter(), 10_000, NOW, w, QueryVector(query, MODEL))
    return {h.fact_no: h.vector_similarity for h in hits}


def user_of(n_generic: int) -> tuple[list[np.ndarray | None], np.ndarray]:
    """`n_generic` facts that are mostly what all of the user's facts share (direction 0)
    plus a little noise, one fact (the last) about direction 1, and a query that is mostly
    the shared part too but asks about direction 1."""
    rng = np.random.default_rng(3)
    common = np.eye(DIM)[0]
    generic: list[np.ndarray | None] = [
        unit(common + 0.35 * rng.standard_normal(DIM) * (np.arange(DIM) >= 2))
        for _ in range(n_generic)
    ]
    about = unit(0.5 * common + np.eye(DIM)[1])
    query = unit(common + 0.3 * np.eye(DIM)[1])
    return [*generic, about], query


def test_centring_ranks_the_fact_about_the_query_above_what_all_facts_share() -> None:
    vectors, query = user_of(150)
    index = UserIndex.build(*tables(vectors), model=MODEL)
    about = len(vectors)  # fact_no of the last fact
    plain = similarities(index, query, weights(0))
    centred = similarities(index, query, weights(100))
    # The plain cosine: the shared part dominates, the generic facts come first.
    assert sorted(plain, key=lambda no: -plain[no]).index(about) > 10
    # Centred: the fact about what the query asks is first, by a wide margin.
    ranked = sorted(centred, key=lambda no: -centred[no])
    assert ranked[0] == about
    assert centred[about] > 0.5 > max(s for no, s in centred.items() if no != about)


def test_centred_similarity_is_the_cosine_of_vectors_minus_their_mean() -> None:
    vectors, query = user_of(120)
    vectors.insert(5, None)  # a fact not embedded by this model: not in the mean, never scored
    index = UserIndex.build(*tables(vectors), model=MODEL)
    held = np.array([v for v in vectors if v is not None], np.float64)
    mean = held.mean(axis=0)
    got = similarities(index, query, weights(100))
    assert got[6] == 0.0  # the fact without a vector has no similarity
    for no, v in enumerate(vectors, start=1):
        if v is None:
            continue
        a, b = v.astype(np.float64) - mean, query.astype(np.float64) - mean
        want = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert got[no] == pytest.approx(want, abs=1e-6)


def test_below_the_minimum_and_when_off_the_similarity_is_the_plain_cosine() -> None:
    vectors, query = user_of(98)  # 99 embedded facts
    index = UserIndex.build(*tables(vectors), model=MODEL)
    plain = {
        no: float(np.float32(v @ query)) for no, v in enumerate(vectors, start=1) if v is not None
    }
    for w in (weights(100), weights(0)):
        got = similarities(index, query, w)
        assert got == pytest.approx(plain, abs=1e-6)
    assert similarities(index, query, weights(99)) != pytest.approx(plain, abs=1e-3)


def test_facts_added_to_a_cached_index_centre_like_a_fresh_load() -> None:
    vectors, query = user_of(140)
    first, rest = vectors[:90], vectors[90:]
    cached = UserIndex.build(*tables(first), model=MODEL)
    assert similarities(cached, query, weights(100)) == pytest.approx(
        similarities(cached, query, weights(0)), abs=1e-6
    )  # 90 facts: not centred yet
    grown = cached.with_added(*tables(rest, first_no=91))
    fresh = UserIndex.build(*tables(vectors), model=MODEL)
    assert similarities(grown, query, weights(100)) == pytest.approx(
        similarities(fresh, query, weights(100)), abs=1e-9
    )


def test_hybrid_fuses_the_centred_similarity() -> None:
    vectors, query = user_of(150)
    index = UserIndex.build(*tables(vectors), model=MODEL)
    hybrid = index.search(
        [7], FactFilter(), 3, NOW, weights(100, RecallMode.HYBRID), QueryVector(query, MODEL)
    )
    # Every fact matches the one query term equally: the centred vector part decides.
    assert hybrid[0].fact_no == len(vectors)
    assert hybrid[0].vector_normalized == 1.0
    assert hybrid[0].relevance == pytest.approx(0.3 * 1.0 + 0.7 * 1.0)


def test_the_defaults_are_the_measured_ones() -> None:
    fields = MemorySettings.model_fields
    # docs/memory.md "Recall quality": tuned on seed 7, held out on seeds 8 and 9.
    assert fields["memory_recall_center_min_facts"].default == 100
    assert fields["memory_recall_min_similarity"].default == 0.15
    assert fields["memory_recall_center_min_similarity"].default == 0.1
    assert fields["memory_recall_vector_weight"].default == 0.7


def test_a_centred_similarity_is_held_to_its_own_floor() -> None:
    vectors, query = user_of(150)
    index = UserIndex.build(*tables(vectors), model=MODEL)
    vector = QueryVector(query, MODEL)
    strict = replace(weights(100), min_similarity=-1.0, center_min_similarity=0.5)
    # Centred, only the fact about the query reaches 0.5: the only vector candidate.
    (hit,) = index.search([], FactFilter(), 10, NOW, strict, vector)
    assert hit.fact_no == len(vectors) and hit.vector_normalized == 1.0
    # Plain (below the minimum count), the plain floor applies: -1 lets every fact in.
    plain = replace(strict, center_min_facts=1000)
    assert len(index.search([], FactFilter(), 1000, NOW, plain, vector)) == len(vectors)


def test_a_few_added_facts_are_centred_on_the_cached_mean_until_it_is_outgrown() -> None:
    vectors, query = user_of(199)  # 200 facts
    cached = UserIndex.build(*tables(vectors[:160]), model=MODEL)
    similarities(cached, query, weights(100))  # the first search takes the mean of 160

    def cosine_to(no: int, mean: np.ndarray) -> float:
        v = vectors[no - 1]
        assert v is not None
        a, b = v.astype(np.float64) - mean, query.astype(np.float64) - mean
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    old_mean = np.array(vectors[:160], np.float64).mean(axis=0)
    # 20 more (180 <= 160 * 1.125): no pass over all the vectors, the old mean serves.
    grown = cached.with_added(*tables(vectors[160:180], first_no=161))
    got = similarities(grown, query, weights(100))
    for no in (1, 170, 180):
        assert got[no] == pytest.approx(cosine_to(no, old_mean), abs=1e-6)
    # 20 more (200 > 180): the mean is taken again, over all 200, as a fresh load does.
    regrown = grown.with_added(*tables(vectors[180:], first_no=181))
    fresh = UserIndex.build(*tables(vectors), model=MODEL)
    assert similarities(regrown, query, weights(100)) == pytest.approx(
        similarities(fresh, query, weights(100)), abs=1e-9
    )


async def test_recall_centres_a_large_users_vectors_but_dedup_keeps_the_plain_cosine(
    memory: Memory,
) -> None:
    local = LocalEmbedder()
    rng = random.Random(11)
    words = ["stock", "bond", "fund", "cash", "tax", "rent", "salary", "loan", "gold", "oil"]
    texts = [f"note {i}: {' '.join(rng.sample(words, 3))}" for i in range(119)]
    texts.append("I own Microsoft stock since 2019")
    await consent(memory, "u1")
    for first in range(0, len(texts), 100):
        await remember(memory, "u1", *(pb.NewFact(text=t) for t in texts[first : first + 100]))
    question = "Should I add more MSFT shares?"
    vectors = local.embed_now([*texts, question]).astype(np.float64)
    mean, q = vectors[:-1].mean(axis=0), vectors[-1]

    def centred(i: int) -> float:
        a, b = vectors[i] - mean, q - mean
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query=question, k=5, mode=pb.RECALL_MODE_VECTOR),
        metadata=memory.md(),
    )
    by_text = {f.fact.text: f.score.vector_similarity for f in reply.facts}
    assert reply.facts[0].fact.text == texts[-1]
    for text, similarity in by_text.items():
        assert similarity == pytest.approx(centred(texts.index(text)), abs=1e-5)
    # Extraction's dedup by meaning: the plain cosine its 0.94 threshold was measured on.
    vector = QueryVector(vectors[-1].astype(np.float32), LOCAL_MODEL)
    raw = await memory.app.manager._recall(
        "acme", "u1", question, FactFilter(), 5, RecallMode.VECTOR, vector, raw_similarity=True
    )
    assert raw
    for s in raw:
        plain = float(vectors[texts.index(s.fact.text)] @ q)
        assert s.vector_similarity == pytest.approx(plain, abs=1e-5)
