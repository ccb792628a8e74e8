"""The in-process recall index: same ranking as the SQL path, and never stale.

- Random corpora (expired facts, kinds, tags, creation times, other users and tenants with
  the same terms): every query and filter ranks identically through the numpy index and
  through the store's SQL (`recall_facts`), on DuckDB and on PostgreSQL, also after facts
  are added to a cached index.
- Through gRPC: a forgotten, withdrawn, erased or purged fact is never recalled from a
  cached index; a remembered fact is recalled at once without reloading the index.
- The cache itself: loads racing a deletion are not kept, a cancelled caller does not
  cancel a shared load, and the LRU never holds more than its cap.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pyarrow as pa
import pytest

from finsight.memory.v1 import memory_pb2 as pb
from services.memory import recall_index
from services.memory.manager import load_user_index, search_indexed
from services.memory.models import (
    INDEX_FACTS_SCHEMA,
    INDEX_POSTINGS_SCHEMA,
    FactFilter,
    NewFact,
    RecallWeights,
    ScoredFact,
)
from services.memory.recall_index import RecallIndex, UserIndex
from services.memory.store import MemoryStore
from tests.conftest import Keys
from tests.memory.conftest import Memory, start_memory
from tests.memory.test_recall import consent, remember

DAY = 86_400 * 1_000_000
NOW = 1_750_000_000 * 1_000_000
WEIGHTS = RecallWeights(bm25=0.6, recency=0.2, importance=0.2, half_life_days=30)
WORDS = [f"w{i}" for i in range(40)] + ["the", "and"]  # stop words index nothing
KINDS = ("general", "preference", "holding")
TAGS = ("equity", "bond", "fx", "crypto")


def corpus(rng: random.Random, n: int, start: int = 0) -> list[tuple[str, NewFact, str]]:
    rows = []
    for i in range(start, start + n):
        # Zipf-ish: low word numbers are common, so df varies a lot between terms.
        words = [WORDS[min(int(rng.paretovariate(1.0)) - 1, len(WORDS) - 1)] for _ in range(8)]
        text = " ".join(rng.sample(words, rng.randint(1, 8)))
        roll = rng.random()
        expires = (
            NOW - rng.randint(1, 10 * DAY)
            if roll < 0.15
            else NOW + rng.randint(1, 10 * DAY)
            if roll < 0.3
            else None
        )
        tags = tuple(sorted(set(rng.sample(TAGS, rng.randint(0, 2)))))
        fact = NewFact(text, rng.choice(KINDS), round(rng.random(), 3), tags, None, expires)
        rows.append((f"fct_{i:032x}", fact, f"h{i}"))
    return rows


async def insert(
    store: MemoryStore, rows: list[tuple[str, NewFact, str]], rng: random.Random, user: str = "u"
) -> tuple[pa.Table, pa.Table]:
    created = [NOW - rng.randint(0, 120 * DAY) for _ in rows]
    inserted = await store.insert_facts("acme", user, rows, NOW - 200 * DAY, created)
    return inserted.facts, inserted.postings


def random_filter(rng: random.Random) -> FactFilter:
    choice = rng.randint(0, 4)
    if choice == 1:
        return FactFilter(kinds=tuple(rng.sample(KINDS, rng.randint(1, 2))))
    if choice == 2:
        return FactFilter(tags=tuple(rng.sample([*TAGS, "nope"], rng.randint(1, 2))))
    if choice == 3:
        return FactFilter(
            created_after_us=NOW - rng.randint(30, 90) * DAY,
            created_before_us=NOW - rng.randint(0, 29) * DAY,
        )
    if choice == 4:
        return FactFilter(kinds=("general", "holding"), tags=("equity", "bond"))
    return FactFilter()


def same_ranking(got: list[ScoredFact], want: list[ScoredFact]) -> None:
    assert [s.fact.fact_id for s in got] == [s.fact.fact_id for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.fact == w.fact
        for part in ("bm25", "bm25_normalized", "recency", "importance", "score"):
            assert getattr(g, part) == pytest.approx(getattr(w, part), rel=1e-9, abs=1e-12)


async def compare(store: MemoryStore, index: UserIndex, rng: random.Random, rounds: int) -> int:
    """Random queries through both paths; returns how many results were compared."""
    seen = 0
    for _ in range(rounds):
        query = " ".join(rng.sample([*WORDS, "zzz", "W3,", "w1!"], rng.randint(0, 4)))
        flt, k = random_filter(rng), rng.randint(1, 25)
        now = NOW + rng.choice([0, 2 * DAY])  # later: more facts have expired
        args = ("acme", "u", query, flt, k, now, WEIGHTS)
        got = await search_indexed(store, index, *args)
        want = await store.recall_facts(*args)
        same_ranking(got, want)
        seen += len(want)
    return seen


@pytest.mark.parametrize("prune_min", [recall_index.PRUNE_MIN, 0])
async def test_index_ranks_exactly_like_sql_on_random_corpora(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, prune_min: int
) -> None:
    """prune_min=0: the score bound prunes candidates whenever there are more than 8k."""
    monkeypatch.setattr(recall_index, "PRUNE_MIN", prune_min)
    rng = random.Random(4)
    await insert(store, corpus(rng, 400), rng)
    # Same user id in another tenant, another user of the same tenant: same words, and
    # they must not move u's statistics.
    await store.insert_facts("globex", "u", corpus(rng, 50, 10_000), NOW)
    await store.insert_facts("acme", "v", corpus(rng, 50, 20_000), NOW)

    index = await load_user_index(store, "acme", "u")
    assert len(index.fact_no) == 400  # the user's, expired ones included (hidden per query)
    assert await compare(store, index, rng, 80) > 300


async def test_added_facts_rank_like_a_fresh_load(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remember extends a cached index; the unsorted tail is merged once it grows."""
    monkeypatch.setattr(recall_index, "TAIL_MIN", 64)
    rng = random.Random(9)
    await insert(store, corpus(rng, 100), rng)
    index = await load_user_index(store, "acme", "u")
    merged_once = False
    for chunk in range(8):
        facts, postings = await insert(store, corpus(rng, 100, 1000 + chunk * 100), rng)
        index = index.with_added(facts, postings)
        merged_once |= len(index.tail_keys) == 0
        assert await compare(store, index, rng, 6) > 0
    assert merged_once  # the merge path ran
    fresh = await load_user_index(store, "acme", "u")
    assert sorted(fresh.fact_no.tolist()) == sorted(index.fact_no.tolist())
    assert fresh.size == index.size


async def test_an_empty_user_builds_an_empty_index(store: MemoryStore) -> None:
    index = await load_user_index(store, "acme", "nobody")
    assert index.size == 0
    assert index.search([1, 2], FactFilter(), 10, NOW, WEIGHTS) == []


# -- through gRPC: never stale ----------------------------------------------------------------
async def recalled(memory: Memory, user: str, query: str) -> list[str]:
    """Recall over gRPC, checked part by part against the SQL path on the same data (a
    stale index could still hide deleted facts, whose rows are gone, but not its N, df and
    avgdl, which would move every score)."""
    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id=user, query=query, k=50, mode=pb.RECALL_MODE_LEXICAL),
        metadata=memory.md(),
    )
    want = await memory.app.store.recall_facts(
        "acme",
        user,
        query,
        FactFilter(),
        50,
        time.time_ns() // 1000,
        memory.app.manager.weights,
    )
    assert [f.fact.fact_id for f in reply.facts] == [w.fact.fact_id for w in want]
    for got, exp in zip(reply.facts, want, strict=True):
        assert got.score.bm25 == pytest.approx(exp.bm25, rel=1e-9)
        assert got.score.score == pytest.approx(exp.score, rel=1e-6)  # recency: clock moved
    return [f.fact.fact_id for f in reply.facts]


async def test_cached_index_never_returns_forgotten_withdrawn_or_erased_facts(
    memory: Memory,
) -> None:
    index = memory.app.manager.index
    await consent(memory, "u1")
    a, b, c = await remember(
        memory,
        "u1",
        pb.NewFact(text="tesla shares"),
        pb.NewFact(text="tesla bonds", kind="holding"),
        pb.NewFact(text="tesla options"),
    )
    assert sorted(await recalled(memory, "u1", "tesla")) == sorted([a, b, c])
    assert index.peek(("acme", "u1")) is not None  # served from the index from now on
    loads = index.loads

    # Remember extends the cached index: recalled at once, no reload.
    (d,) = await remember(memory, "u1", pb.NewFact(text="tesla calls"))
    assert d in await recalled(memory, "u1", "tesla")
    assert index.loads == loads

    await memory.stub.Forget(pb.ForgetRequest(user_id="u1", fact_ids=[a]), metadata=memory.md())
    assert a not in await recalled(memory, "u1", "tesla")
    await memory.stub.Forget(
        pb.ForgetRequest(user_id="u1", filter=pb.FactFilter(kinds=["holding"])),
        metadata=memory.md(),
    )
    assert sorted(await recalled(memory, "u1", "tesla")) == sorted([c, d])

    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=False), metadata=memory.md()
    )
    assert await recalled(memory, "u1", "tesla") == []

    await consent(memory, "u1")
    (e,) = await remember(memory, "u1", pb.NewFact(text="tesla again"))
    assert await recalled(memory, "u1", "tesla") == [e]
    await memory.stub.DeleteUserData(pb.DeleteUserDataRequest(user_id="u1"), metadata=memory.md())
    assert await recalled(memory, "u1", "tesla") == []
    assert index.loads > loads


async def test_purge_by_age_clears_cached_indexes(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_fact_retention_days={"episodic": 1},
        memory_database_url=database_url,
    )
    try:
        old = ("fct_" + "1" * 32, NewFact("margin call", "episodic", 0.5, (), None, None), "h1")
        new = ("fct_" + "2" * 32, NewFact("margin account", "general", 0.5, (), None, None), "h2")
        now = time.time_ns() // 1000
        await memory.app.store.insert_facts("acme", "u1", [old, new], now, [now - 3 * DAY, now])
        assert sorted(await recalled(memory, "u1", "margin")) == [old[0], new[0]]
        assert memory.app.manager.index.peek(("acme", "u1")) is not None
        purged = await memory.stub.PurgeExpired(
            pb.PurgeExpiredRequest(), metadata=memory.md("admin")
        )
        assert purged.facts_deleted == 1  # by age (no expiry was set): the index did not know
        assert await recalled(memory, "u1", "margin") == [new[0]]
    finally:
        await memory.close()


async def test_users_over_the_cap_are_served_by_sql(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_recall_index_max_entries=12,  # postings + facts
        memory_embedding_provider="none",  # vectors would count too: see test_hybrid_recall
        memory_database_url=database_url,
    )
    try:
        index = memory.app.manager.index
        for user in ("small", "big"):
            await consent(memory, user)
        await remember(memory, "small", pb.NewFact(text="gold"), pb.NewFact(text="silver gold"))
        await remember(memory, "big", *(pb.NewFact(text=f"gold coin number{i}") for i in range(5)))
        assert len(await recalled(memory, "small", "gold")) == 2
        assert index.peek(("acme", "small")) is not None and index.size == 5
        sql_before = _served("sql")
        assert len(await recalled(memory, "big", "gold")) == 5  # 20 entries > 12
        assert index.peek(("acme", "big")) is None and index.size <= 12
        assert len(await recalled(memory, "big", "gold")) == 5
        assert _served("sql") == sql_before + 1  # the first answer came from its load
    finally:
        await memory.close()


def _served(path: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("finsight_memory_recall_served_total", {"path": path})
    return value or 0.0


# -- the cache ----------------------------------------------------------------------------------
def tiny_index(n: int) -> UserIndex:
    facts = pa.table(
        {
            "fact_no": list(range(1, n + 1)),
            "fact_id": [f"fct_{i:032x}" for i in range(1, n + 1)],
            "doc_len": [1] * n,
            "importance": [0.5] * n,
            "created_us": [NOW] * n,
            "expires_us": [None] * n,
            "kind": ["general"] * n,
            "tags": [[] for _ in range(n)],
            "embedding_model": [None] * n,
            "embedding": [None] * n,
        },
        schema=INDEX_FACTS_SCHEMA,
    )
    postings = pa.table(
        {"term_key": [7] * n, "fact_no": list(range(1, n + 1)), "tf": [1] * n},
        schema=INDEX_POSTINGS_SCHEMA,
    )
    return UserIndex.build(facts, postings)


async def test_a_load_racing_a_deletion_answers_but_is_not_kept() -> None:
    cache = RecallIndex(max_entries=1000)
    release = asyncio.Event()

    async def slow_load() -> UserIndex:
        await release.wait()
        return tiny_index(3)

    first = asyncio.create_task(cache.get(("t", "u"), slow_load))
    await asyncio.sleep(0)
    joined = asyncio.create_task(cache.get(("t", "u"), slow_load))
    await asyncio.sleep(0)
    cache.invalidate(("t", "u"))  # a Forget committed while the load ran
    after = asyncio.create_task(cache.get(("t", "u"), slow_load))  # must not join the stale one
    await asyncio.sleep(0)
    release.set()
    got = await asyncio.gather(first, joined, after)
    assert all(g is not None and g.size == 6 for g in got)
    assert cache.loads == 2
    assert cache.peek(("t", "u")) is got[2]  # only the load that began after is kept


async def test_a_cancelled_caller_does_not_cancel_a_shared_load() -> None:
    cache = RecallIndex(max_entries=1000)
    release = asyncio.Event()

    async def slow_load() -> UserIndex:
        await release.wait()
        return tiny_index(2)

    first = asyncio.create_task(cache.get(("t", "u"), slow_load))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get(("t", "u"), slow_load))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second) is not None
    assert first.cancelled()
    assert cache.peek(("t", "u")) is not None


async def test_the_lru_stays_within_its_cap() -> None:
    cache = RecallIndex(max_entries=25)  # a tiny_index(n) counts 2n
    for i in range(10):
        await cache.get(("t", f"u{i}"), lambda: asyncio.sleep(0, result=tiny_index(4)))
        assert cache.size <= 25
    assert len(cache) == 3  # 3 x 8 = 24
    assert [cache.peek(("t", f"u{i}")) is not None for i in (7, 8, 9)] == [True] * 3
    assert await cache.get(("t", "big"), lambda: asyncio.sleep(0, result=tiny_index(20)))
    assert cache.peek(("t", "big")) is None and cache.size <= 25  # too big: SQL from now on
    assert await cache.get(("t", "big"), lambda: asyncio.sleep(0, result=tiny_index(20))) is None
    cache.invalidate(("t", "big"))  # e.g. Forget: it may fit now
    assert await cache.get(("t", "big"), lambda: asyncio.sleep(0, result=tiny_index(5)))
    assert cache.peek(("t", "big")) is not None
