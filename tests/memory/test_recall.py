"""Remember / Recall / Forget: BM25 on a hand-checked corpus, ranking, filters, expiry."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from finsight.memory.v1 import memory_pb2 as pb
from services.memory import recall
from services.memory.models import NewFact
from tests.memory.conftest import Memory, counts, rpc_error, sql

# The corpus, and its terms written out by hand (lower case, stop words "the", "in",
# "of" removed, Porter2 stems: "apple" -> "appl", "shares" -> "share", "rallied" ->
# "ralli") so the expected scores below do not reuse the service's tokenizer.
CORPUS = {
    "d1": ("Apple shares rallied", ["appl", "share", "ralli"]),
    "d2": ("apple APPLE pie recipe", ["appl", "appl", "pie", "recip"]),
    "d3": ("Bond yields rose", ["bond", "yield", "rose"]),
    "d4": ("The apple orchard in the valley", ["appl", "orchard", "valley"]),
    "d5": ("Shares of banks fell", ["share", "bank", "fell"]),
}


def bm25(
    query: list[str], docs: dict[str, list[str]], k1: float = 1.2, b: float = 0.75
) -> dict[str, float]:
    """Textbook BM25 (Lucene idf), written independently of the service's SQL."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs.values()) / n
    out = {}
    for name, terms in docs.items():
        score = 0.0
        for q in set(query):
            tf = terms.count(q)
            if not tf:
                continue
            df = sum(1 for d in docs.values() if q in d)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(terms) / avgdl))
        if score:
            out[name] = score
    return out


async def consent(memory: Memory, user: str, who: str = "alice") -> None:
    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=memory.md(who)
    )


async def remember(memory: Memory, user: str, *facts: pb.NewFact, who: str = "alice") -> list[str]:
    reply = await memory.stub.Remember(
        pb.RememberRequest(user_id=user, facts=list(facts)), metadata=memory.md(who)
    )
    return [f.fact_id for f in reply.facts]


def ts(seconds_from_now: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return out


async def test_bm25_ranking_matches_a_hand_checked_corpus(memory: Memory) -> None:
    for text, terms in CORPUS.values():
        assert recall.tokenize(text) == terms  # the hand tokens are right
    await consent(memory, "u1")
    await consent(memory, "u1", who="bob")
    # Another tenant's facts with the same user id must not move u1's statistics.
    await remember(
        memory, "u1", pb.NewFact(text="apple apple apple"), pb.NewFact(text="shares"), who="bob"
    )
    ids = dict(
        zip(
            CORPUS,
            await remember(memory, "u1", *(pb.NewFact(text=text) for text, _ in CORPUS.values())),
            strict=True,
        )
    )
    # An expired fact is neither returned nor counted in N, df or avgdl.
    await memory.app.store.insert_facts(
        "acme",
        "u1",
        [
            (
                "fct_" + "0" * 32,
                NewFact(
                    "apple shares apple shares",
                    "general",
                    1.0,
                    (),
                    None,
                    (time.time_ns() // 1000) - 1,
                ),
                "h",
            )
        ],
        time.time_ns() // 1000,
    )

    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query="Apple, shares!", mode=pb.RECALL_MODE_LEXICAL),
        metadata=memory.md(),
    )
    expected = bm25(["appl", "share"], {k: v[1] for k, v in CORPUS.items()})
    got = {f.fact.fact_id: f.score for f in reply.facts}
    assert set(got) == {ids[name] for name in expected}  # d3 matches no term
    best = max(expected.values())
    for name, score in expected.items():
        parts = got[ids[name]]
        assert parts.bm25 == pytest.approx(score, rel=1e-9)
        assert parts.bm25_normalized == pytest.approx(score / best, rel=1e-9)
        assert parts.importance == 0.5
        assert 0.999 < parts.recency <= 1.0
        assert parts.score == pytest.approx(
            0.6 * parts.bm25_normalized + 0.2 * parts.recency + 0.2 * parts.importance, rel=1e-9
        )
    # By hand: N=5, avgdl=3.2, idf(apple)=ln(1+2.5/3.5)=0.5390, idf(shares)=ln(2.4)=0.8755;
    # d1 = (0.5390+0.8755)*2.2/(1+1.2*0.9531) = 1.4517; d5 = 0.8755*1.0263 = 0.8985;
    # d2 (tf 2, |D| 4) = 0.5390*4.4/(2+1.2*1.1875) = 0.6925; d4 = 0.5390*1.0263 = 0.5532.
    hand = {"d1": 1.4517, "d5": 0.8985, "d2": 0.6925, "d4": 0.5532}
    for name, value in hand.items():
        assert expected[name] == pytest.approx(value, abs=5e-4)
    assert [f.fact.fact_id for f in reply.facts] == [ids[n] for n in ("d1", "d5", "d2", "d4")]


async def test_ties_are_broken_by_id_and_k_limits(memory: Memory) -> None:
    await consent(memory, "u1")
    ids = await remember(memory, "u1", *(pb.NewFact(text=f"rally number{i}") for i in range(6)))
    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query="rally", k=4, mode=pb.RECALL_MODE_LEXICAL),
        metadata=memory.md(),
    )
    assert [f.fact.fact_id for f in reply.facts] == sorted(ids)[:4]
    again = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query="rally", k=4, mode=pb.RECALL_MODE_LEXICAL),
        metadata=memory.md(),
    )
    assert [f.fact.fact_id for f in again.facts] == [f.fact.fact_id for f in reply.facts]


async def test_recency_and_importance_rank_without_a_query(memory: Memory) -> None:
    now = time.time_ns() // 1000
    month = 30 * 86_400 * 1_000_000
    rows = [
        ("fct_" + f"{i:032x}", NewFact(f"fact {i}", "general", imp, (), None, None), f"h{i}")
        for i, imp in enumerate((0.5, 0.5, 1.0))
    ]
    await memory.app.store.insert_facts("acme", "u9", rows, now, [now - month, now, now - month])
    reply = await memory.stub.Recall(pb.RecallRequest(user_id="u9"), metadata=memory.md())
    by_id = {f.fact.fact_id: f.score for f in reply.facts}
    old, new, important = (by_id[r[0]] for r in rows)
    assert old.recency == pytest.approx(0.5, abs=1e-3)  # one half-life old
    assert new.recency == pytest.approx(1.0, abs=1e-3)
    assert old.bm25 == 0 and old.bm25_normalized == 0
    assert important.importance == 1.0 and important.score < new.score + 1e-9 + 0.2 * 0.5
    # new: 0.2*1 + 0.2*0.5 = 0.3; important: 0.2*0.5 + 0.2*1 = 0.3 (tie broken by id); old 0.2
    assert [f.fact.fact_id for f in reply.facts][-1] == rows[0][0]


async def test_filters_dedup_and_forget(memory: Memory) -> None:
    await consent(memory, "u1")
    a, b, c = await remember(
        memory,
        "u1",
        pb.NewFact(text="Likes  tech stocks", kind="preference", tags=["equity", "tech"]),
        pb.NewFact(text="Owns tech fund", kind="holding", tags=["fund"]),
        pb.NewFact(text="Tech conference next week", kind="episodic", importance=0.9),
    )
    dup = await memory.stub.Remember(
        pb.RememberRequest(user_id="u1", facts=[pb.NewFact(text="likes tech STOCKS ")]),
        metadata=memory.md(),
    )
    assert (dup.facts[0].fact_id, dup.facts[0].deduplicated) == (a, True)

    async def ids(flt: pb.FactFilter) -> list[str]:
        reply = await memory.stub.Recall(
            pb.RecallRequest(user_id="u1", query="tech", filter=flt), metadata=memory.md()
        )
        return sorted(f.fact.fact_id for f in reply.facts)

    assert await ids(pb.FactFilter()) == sorted([a, b, c])
    assert await ids(pb.FactFilter(kinds=["preference", "holding"])) == sorted([a, b])
    assert await ids(pb.FactFilter(tags=["fund", "nope"])) == [b]
    assert await ids(pb.FactFilter(created_after=ts(60))) == []
    assert await ids(pb.FactFilter(created_before=ts(60))) == sorted([a, b, c])

    gone = await memory.stub.Forget(
        pb.ForgetRequest(user_id="u1", fact_ids=[b, "fct_" + "f" * 32]), metadata=memory.md()
    )
    assert list(gone.fact_ids) == [b]
    gone = await memory.stub.Forget(
        pb.ForgetRequest(user_id="u1", filter=pb.FactFilter(kinds=["episodic"])),
        metadata=memory.md(),
    )
    assert list(gone.fact_ids) == [c]
    assert await ids(pb.FactFilter()) == [a]
    gone = await memory.stub.Forget(pb.ForgetRequest(user_id="u1", all=True), metadata=memory.md())
    assert list(gone.fact_ids) == [a]
    assert await ids(pb.FactFilter()) == []
    assert (await counts(memory, "u1"))["fact_terms"] == 0
    assert await memory.app.store.orphan_postings("acme") == 0


async def test_expiry_hides_before_purge_and_purge_deletes(memory: Memory) -> None:
    await consent(memory, "u1")
    short, kept = await remember(
        memory,
        "u1",
        pb.NewFact(text="temporary margin call", expire_time=ts(1.0)),
        pb.NewFact(text="permanent margin account"),
    )

    async def recalled() -> list[str]:
        reply = await memory.stub.Recall(
            pb.RecallRequest(user_id="u1", query="margin"), metadata=memory.md()
        )
        return [f.fact.fact_id for f in reply.facts]

    assert set(await recalled()) == {short, kept}
    time.sleep(1.2)
    assert await recalled() == [kept]  # hidden at once...
    assert (await counts(memory, "u1"))["facts"] == 2  # ...while still stored
    denied = await rpc_error(
        memory.stub.PurgeExpired(pb.PurgeExpiredRequest(), metadata=memory.md())
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    purged = await memory.stub.PurgeExpired(pb.PurgeExpiredRequest(), metadata=memory.md("admin"))
    assert purged.facts_deleted == 1
    assert (await counts(memory, "u1"))["facts"] == 1
    assert await memory.app.store.orphan_postings("acme") == 0
    assert await recalled() == [kept]


async def test_the_last_representable_expiry_is_accepted(memory: Memory) -> None:
    await consent(memory, "u1")
    last = {"seconds": 253_402_300_799, "nanos": 999_999_999}  # 9999-12-31T23:59:59.999999999Z
    reply = await memory.stub.Remember(
        pb.RememberRequest(user_id="u1", facts=[pb.NewFact(text="far", expire_time=last)]),
        metadata=memory.md(),
    )
    recalled = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query="far"), metadata=memory.md()
    )
    assert [f.fact.fact_id for f in recalled.facts] == [reply.facts[0].fact_id]
    assert recalled.facts[0].fact.expire_time.seconds == 253_402_300_799


def test_tokens_are_stemmed_numbers_and_tickers_kept_question_words_dropped() -> None:
    assert recall.tokenize("How many Stocks does the user hold?") == ["stock", "user", "hold"]
    assert recall.tokenize("Holdings: 120 MSFT shares, a 401k since 2021") == [
        "hold",
        "120",
        "msft",
        "share",
        "401k",
        "2021",
    ]
    assert recall.query_terms("stock") == recall.query_terms("stocks")
    assert recall.TOKENIZER_VERSION == 2


async def test_facts_of_an_older_tokenizer_are_reindexed(memory: Memory) -> None:
    await consent(memory, "u1")
    (fid,) = await remember(memory, "u1", pb.NewFact(text="Holds many stocks of banks"))
    # As a fact indexed before stemming: version 1 and its unstemmed terms.
    store = memory.app.store
    (row,) = await store.facts_to_reindex("acme", 99, 10)  # any older version than 99
    await sql(memory, "UPDATE facts SET tokenizer = NULL", write=True)
    await sql(memory, "DELETE FROM fact_terms", write=True)
    memory.app.manager.index.clear()

    async def found(query: str) -> list[str]:
        reply = await memory.stub.Recall(
            pb.RecallRequest(user_id="u1", query=query, mode=pb.RECALL_MODE_LEXICAL),
            metadata=memory.md(),
        )
        return [f.fact.fact_id for f in reply.facts]

    assert await found("stock") == []  # its postings are gone (or old): not matched
    assert [r.fact_no for r in await store.facts_to_reindex("acme", 2, 10)] == [row.fact_no]
    assert await memory.app.manager.reindex_pass() == 1
    assert await found("stock") == [fid] and await found("bank") == [fid]
    assert await store.facts_to_reindex("acme", 2, 10) == []
    assert await memory.app.manager.reindex_pass() == 0
