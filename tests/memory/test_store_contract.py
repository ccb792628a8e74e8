"""The storage contract: the same cases against both `MemoryStore`s (DuckDB, PostgreSQL).

- appends: sequences continue per session, client message ids deduplicate (earlier in the
  batch, before it, and across concurrent batches), a session of another user is refused;
- history pages in both orders, recent messages, the session's tail;
- remember: consent checked, duplicates recognised, an expired twin replaced; consent
  withdrawal deletes the facts; forget by ids, filter or all;
- recall ranks the same on both backends (SQL) and through the in-process index;
- export pages, erasure (no row left but the audit log), retention purge.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.memory import recall
from services.memory.manager import load_user_index, search_indexed
from services.memory.models import (
    AppendRequest,
    AppendResult,
    AuditRecord,
    FactFilter,
    NewFact,
    NewMessage,
    Order,
)
from services.memory.store import MemoryStore, open_store
from tests.memory.conftest import open_database
from tests.memory.test_recall_index import NOW, WEIGHTS, WORDS, corpus, random_filter

DAY = 86_400 * 1_000_000
AUDIT = AuditRecord("acme", "alice", "k", "AppendMessages", "u1")


def request(
    session: str, user: str, *cids: str, at: int = NOW, tenant: str = "acme"
) -> AppendRequest:
    audit = replace(AUDIT, tenant=tenant, user_id=user, session_id=session)
    messages = [NewMessage("user", f"text {c}", c or None, {"k": c}, 3) for c in cids]
    return AppendRequest(tenant, session, user, messages, audit, at)


def seqs(results: list[AppendResult]) -> list[list[tuple[int, bool]]]:
    return [[(a.sequence, a.deduplicated) for a in r.appended] for r in results]


def fact(text: str, kind: str = "general", **kw: object) -> NewFact:
    values: dict[str, object] = {
        "importance": 0.5,
        "tags": (),
        "source_session_id": None,
        "expires_us": None,
    }
    values.update(kw)
    return NewFact(text, kind, **values)  # type: ignore[arg-type]


async def test_appends_are_numbered_deduplicated_and_owned(store: MemoryStore) -> None:
    first = await store.append_batch([request("old", "u1", "c1")])
    assert seqs(first) == [[(1, False)]]
    results = await store.append_batch(
        [
            request("old", "u1", "c1", "c2"),  # c1 stored before the batch
            request("new", "u1", "n1", ""),
            request("new", "u1", "n1", "n2"),  # a retry racing the first, in the same batch
            request("old", "intruder", "x"),
            request("old", "u1", ""),
        ]
    )
    assert seqs(results) == [
        [(1, True), (2, False)],
        [(1, False), (2, False)],
        [(1, True), (3, False)],
        [],
        [(3, False)],
    ]
    assert results[0].appended[0].message_id == first[0].appended[0].message_id
    assert results[2].appended[0].message_id == results[1].appended[0].message_id
    assert results[3].owner_mismatch and not results[3].new_messages
    assert [len(r.new_messages) for r in results] == [1, 2, 1, 0, 1]
    # Each session has an incarnation of its own, the same for all of its appends.
    assert results[0].incarnation == results[4].incarnation == first[0].incarnation
    assert results[1].incarnation == results[2].incarnation != results[0].incarnation

    new = await store.history_page("acme", "new", Order.ASC, None, 10)
    assert [(m.sequence, m.content, m.client_message_id) for m in new] == [
        (1, "text n1", "n1"),
        (2, "text ", None),
        (3, "text n2", "n2"),
    ]
    assert new[0].metadata == {"k": "n1"} and new[0].tokens == 3 and new[0].created_us == NOW
    assert [m.sequence for m in await store.history_page("acme", "new", Order.ASC, 1, 10)] == [
        2,
        3,
    ]
    assert [m.sequence for m in await store.history_page("acme", "new", Order.DESC, None, 2)] == [
        3,
        2,
    ]
    assert [m.sequence for m in await store.history_page("acme", "new", Order.DESC, 2, 5)] == [1]
    session, recent = await store.recent_of_session("acme", "old", 2)
    assert session is not None and (session.user_id, session.last_seq) == ("u1", 3)
    assert [m.sequence for m in recent] == [2, 3]
    assert [m.sequence for m in await store.recent_messages("acme", "old", 10)] == [1, 2, 3]
    tail = await store.session_tail("acme", "old")
    assert tail is not None
    assert (tail.user_id, tail.incarnation, tail.first_seq, tail.last_seq) == (
        "u1",
        first[0].incarnation,
        1,
        3,
    )
    assert await store.get_session("acme", "nope") is None
    assert await store.session_tail("acme", "nope") is None
    assert await store.recent_of_session("acme", "nope", 5) == (None, [])
    # Another tenant's session of the same id is another session.
    assert await store.get_session("globex", "old") is None

    counts = await store.user_row_counts("acme", "u1")
    assert (counts["messages"], counts["sessions"]) == (6, 2)
    assert counts["audit_log"] == 5  # one per request but the intruder's (its own user)
    assert (await store.user_row_counts("acme", "intruder"))["audit_log"] == 1
    outcomes = [e.outcome for e in await store.export_audit("acme", "intruder", (-1, ""), 10)]
    assert outcomes == ["SESSION_USER_MISMATCH"]


async def test_concurrent_batches_neither_skip_nor_duplicate(store: MemoryStore) -> None:
    """Batches in separate transactions at once (PostgreSQL: on several pool connections,
    really concurrent), all on one new session, with retries of the same client ids."""
    batches = [[request("race", "u1", f"c{i % 5}", "")] for i in range(24)]
    results = [r for rs in await asyncio.gather(*map(store.append_batch, batches)) for r in rs]
    stored = [(a.sequence, a.message_id) for r in results for a in r.appended if not a.deduplicated]
    assert sorted(s for s, _ in stored) == list(range(1, 5 + 24 + 1))  # 5 ids + 24 plain
    by_cid: dict[str, set[str]] = {}
    for r in results:
        for a in r.appended:
            if a.client_message_id:
                by_cid.setdefault(a.client_message_id, set()).add(a.message_id)
    assert all(len(ids) == 1 for ids in by_cid.values()) and len(by_cid) == 5
    history = await store.history_page("acme", "race", Order.ASC, None, 100)
    assert [m.sequence for m in history] == list(range(1, 30))
    assert len({m.client_message_id for m in history if m.client_message_id}) == 5
    assert len({r.incarnation for r in results}) == 1


async def test_remember_consent_dedup_expiry_and_withdrawal(store: MemoryStore) -> None:
    audit = replace(AUDIT, rpc="Remember")
    assert await store.remember_facts("acme", "u1", [fact("likes bonds")], NOW, audit) is None
    entries = await store.export_audit("acme", "u1", (-1, ""), 10)
    assert [(e.rpc, e.outcome) for e in entries] == [("Remember", "CONSENT_REQUIRED")]
    consent, deleted = await store.set_consent("acme", "u1", True, NOW, replace(AUDIT, rpc="X"))
    assert (consent.long_term_memory, consent.updated_us, deleted) == (True, NOW, 0)
    assert (await store.get_consent("acme", "u1")).updated_by == "alice"

    done = await store.remember_facts(
        "acme",
        "u1",
        [fact("Likes  BONDS", tags=("fixed", "income")), fact("owns gold"), fact("likes bonds")],
        NOW,
        audit,
    )
    assert done is not None
    out, inserted = done
    assert [r.deduplicated for r in out] == [False, False, True]
    assert out[2].fact_id == out[0].fact_id  # dedup inside the request
    assert inserted.facts.num_rows == 2
    assert sorted(inserted.facts["fact_id"].to_pylist()) == sorted(r.fact_id for r in out[:2])
    assert inserted.postings.num_rows == 4  # likes, bonds, owns, gold
    again = await store.remember_facts("acme", "u1", [fact("likes bonds ")], NOW, audit)
    assert again is not None and again[0][0].deduplicated and again[0][0].fact_id == out[0].fact_id

    # An expired twin is replaced by a new fact, not resurrected.
    expired = (
        "fct_" + "e" * 32,
        fact("old news", expires_us=NOW - 1),
        recall.fact_hash("old news"),
    )
    await store.insert_facts("acme", "u1", [expired], NOW - DAY)
    replaced = await store.remember_facts("acme", "u1", [fact("Old news")], NOW, audit)
    assert replaced is not None and not replaced[0][0].deduplicated
    ids = [f.fact_id for f in await store.export_facts("acme", "u1", "", 100)]
    assert expired[0] not in ids and replaced[0][0].fact_id in ids and len(ids) == 3
    stored = {f.fact_id: f for f in await store.export_facts("acme", "u1", "", 100)}
    assert stored[out[0].fact_id].tags == ("fixed", "income")
    assert stored[out[0].fact_id].text == "Likes  BONDS"

    consent, deleted = await store.set_consent(
        "acme", "u1", False, NOW + 1, replace(AUDIT, rpc="X")
    )
    assert (consent.long_term_memory, deleted) == (False, 3)
    counts = await store.user_row_counts("acme", "u1")
    assert (counts["facts"], counts["fact_terms"], counts["consent"]) == (0, 0, 1)
    assert await store.orphan_postings("acme") == 0
    assert await store.remember_facts("acme", "u1", [fact("x")], NOW, audit) is None


async def test_forget_by_ids_filter_and_all(store: MemoryStore) -> None:
    rows = [
        ("fct_" + f"{i:032x}", fact(text, kind, tags=tags), f"h{i}")
        for i, (text, kind, tags) in enumerate(
            [
                ("tech stocks", "preference", ("equity", "tech")),
                ("tech fund", "holding", ("fund",)),
                ("tech conference", "episodic", ()),
                ("old holding", "holding", ()),
            ]
        )
    ]
    created = [NOW - 10 * DAY, NOW - 5 * DAY, NOW, NOW - 20 * DAY]
    await store.insert_facts("acme", "u1", rows, NOW, created)
    await store.insert_facts("acme", "u2", rows[:1], NOW)  # same ids, another user
    audit = replace(AUDIT, rpc="Forget")
    ids = [r[0] for r in rows]

    async def forget(
        fact_ids: list[str], flt: FactFilter | None = None, everything: bool = False
    ) -> list[str]:
        return await store.forget_facts("acme", "u1", fact_ids, flt, everything, NOW, audit)

    assert await forget([ids[1], "fct_" + "f" * 32]) == [ids[1]]
    assert await forget([], FactFilter(tags=("tech", "nope"))) == [ids[0]]
    assert await forget([], FactFilter(created_before_us=NOW - 15 * DAY)) == [ids[3]]
    assert await forget([], FactFilter(kinds=("holding",))) == []
    assert await forget([], None, everything=True) == [ids[2]]
    assert (await store.user_row_counts("acme", "u1"))["fact_terms"] == 0
    assert (await store.user_row_counts("acme", "u2"))["facts"] == 1
    assert await store.orphan_postings("acme") == 0
    details = sorted(e.detail for e in await store.export_audit("acme", "u1", (-1, ""), 10))
    assert details == ['{"deleted":0}'] + ['{"deleted":1}'] * 4


@pytest.fixture
async def both(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[list[MemoryStore]]:
    dbs = [await open_database(b, tmp_path, request) for b in ("duckdb", "postgresql")]
    yield [open_store(db) for db in dbs]
    for db in dbs:
        await db.close()


async def test_recall_ranks_the_same_on_both_backends_and_through_the_index(
    both: list[MemoryStore],
) -> None:
    duck, pg = both
    for store in both:
        rng = random.Random(11)
        created = [NOW - rng.randint(0, 120 * DAY) for _ in range(300)]
        await store.insert_facts("acme", "u", corpus(rng, 300), NOW - 200 * DAY, created)
        await store.insert_facts("globex", "u", corpus(rng, 40, 10_000), NOW)  # same terms
    index = await load_user_index(pg, "acme", "u")
    rng = random.Random(5)
    compared = 0
    for _ in range(60):
        query = " ".join(rng.sample([*WORDS, "zzz"], rng.randint(0, 4)))
        flt, k = random_filter(rng), rng.randint(1, 25)
        args = ("acme", "u", query, flt, k, NOW + rng.choice([0, 3 * DAY]), WEIGHTS)
        want = await duck.recall_facts(*args)
        for got in (await pg.recall_facts(*args), await search_indexed(pg, index, *args)):
            assert [s.fact.fact_id for s in got] == [s.fact.fact_id for s in want], query
            for g, w in zip(got, want, strict=True):
                assert g.fact == w.fact
                for part in ("bm25", "bm25_normalized", "recency", "importance", "score"):
                    assert getattr(g, part) == pytest.approx(getattr(w, part), rel=1e-9, abs=1e-12)
        compared += len(want)
    assert compared > 200


async def test_export_pages_cover_everything_in_order(store: MemoryStore) -> None:
    await store.set_consent("acme", "u1", True, NOW, AUDIT)
    for i in range(7):
        done = await store.remember_facts("acme", "u1", [fact(f"fact {i}")], NOW + i, AUDIT)
        assert done is not None
    for session in ("b-session", "a-session"):
        await store.append_batch([request(session, "u1", "", "", "", at=NOW + 10)])
    facts, after = [], ""
    while page := await store.export_facts("acme", "u1", after, 3):
        facts += page
        after = page[-1].fact_id
    assert [f.fact_id for f in facts] == sorted(f.fact_id for f in facts) and len(facts) == 7
    messages: list[tuple[str, int]] = []
    cursor = ("", 0)
    while rows := await store.export_messages("acme", "u1", cursor, 4):
        messages += [(m.session_id, m.sequence) for m in rows]
        cursor = (rows[-1].session_id, rows[-1].sequence)
    assert messages == [(s, q) for s in ("a-session", "b-session") for q in (1, 2, 3)]
    entries, mark = [], (-1, "")
    while got := await store.export_audit("acme", "u1", mark, 2):
        entries += got
        mark = (got[-1].at_us, got[-1].audit_id)
    assert len(entries) == 1 + 7 + 2
    assert [(e.at_us, e.audit_id) for e in entries] == sorted(
        (e.at_us, e.audit_id) for e in entries
    )


async def test_erasure_leaves_no_rows_but_the_audit_log(store: MemoryStore) -> None:
    for user in ("u1", "u2"):
        await store.set_consent("acme", user, True, NOW, AUDIT)
        await store.remember_facts("acme", user, [fact("secret a"), fact("secret b")], NOW, AUDIT)
        await store.append_batch([request(f"{user}-s{i}", user, "", "") for i in range(2)])
    counts = await store.erase_user("acme", "u1", NOW, replace(AUDIT, rpc="DeleteUserData"))
    assert (counts.messages, counts.sessions, counts.facts, counts.consent) == (4, 2, 2, 1)
    assert counts.session_ids == ("u1-s0", "u1-s1")
    left = await store.user_row_counts("acme", "u1")
    assert left.pop("audit_log") > 0
    assert left == {
        "messages": 0,
        "sessions": 0,
        "facts": 0,
        "consent": 0,
        "fact_terms": 0,
        "extracted_messages": 0,
    }
    assert await store.orphan_postings("acme") == 0
    assert await store.session_tail("acme", "u1-s0") is None
    assert (await store.get_consent("acme", "u1")).long_term_memory is False
    erased = [
        e
        for e in await store.export_audit("acme", "u1", (-1, ""), 100)
        if e.rpc == "DeleteUserData"
    ]
    assert len(erased) == 1 and '"messages_deleted":4' in erased[0].detail
    kept = await store.user_row_counts("acme", "u2")
    assert (kept["messages"], kept["sessions"], kept["facts"], kept["consent"]) == (4, 2, 2, 1)
    # The id can be used again: a new session, numbered from 1.
    again = await store.append_batch([request("u1-s0", "u1", "")])
    assert seqs(again) == [[(1, False)]]


async def test_purge_applies_retention_per_tenant(store: MemoryStore) -> None:
    old, recent = NOW - 10 * DAY, NOW - DAY
    await store.append_batch([request("gone", "u1", "", at=old)])
    await store.append_batch([request("mixed", "u1", "", at=old)])
    await store.append_batch([request("mixed", "u1", "", at=recent)])
    await store.append_batch([request("gone", "u1", "", at=old, tenant="globex")])
    rows = [
        ("fct_" + "1" * 32, fact("expired", expires_us=NOW - 1), "h1"),
        ("fct_" + "2" * 32, fact("old episode", "episodic"), "h2"),
        ("fct_" + "3" * 32, fact("old profile", "profile"), "h3"),
        ("fct_" + "4" * 32, fact("new episode", "episodic"), "h4"),
    ]
    await store.insert_facts("acme", "u1", rows, NOW, [old, old, old, recent])
    await store.insert_facts("globex", "u1", rows, NOW, [old, old, old, recent])
    assert await store.retention_tenants() == ["acme", "globex"]

    counts = await store.purge(
        {"acme": (5.0, 5.0, {"episodic": 5.0}), "globex": (0.0, 0.0, {})},
        NOW,
        replace(AUDIT, tenant="*", rpc="purge", user_id=None),
    )
    assert (counts.messages, counts.sessions, counts.audit_entries) == (2, 1, 2)
    assert (counts.facts, counts.facts_by_age) == (3, 1)  # globex: the expired one only
    assert sorted(counts.touched_sessions) == [("acme", "gone"), ("acme", "mixed")]
    assert await store.get_session("acme", "gone") is None
    tail = await store.session_tail("acme", "mixed")
    assert tail is not None and (tail.first_seq, tail.last_seq) == (2, 2)
    assert [m.sequence for m in await store.history_page("acme", "mixed", Order.ASC, None, 9)] == [
        2
    ]
    assert (await store.get_session("globex", "gone")) is not None  # 0 = keep forever
    left = {f.fact_id for f in await store.export_facts("acme", "u1", "", 10)}
    assert left == {rows[2][0], rows[3][0]}
    assert len(await store.export_facts("globex", "u1", "", 10)) == 3
    assert await store.orphan_postings("acme") == 0
    # Numbering continues after the purge removed a session's prefix.
    more = await store.append_batch([request("mixed", "u1", "")])
    assert seqs(more) == [[(3, False)]]


def _consent_reads(store: MemoryStore) -> float:
    from prometheus_client import REGISTRY

    labels = {"db": store.db.name, "statement": "get_consent"}  # type: ignore[attr-defined]
    return REGISTRY.get_sample_value("finsight_db_query_seconds_count", labels) or 0.0


async def test_consent_reads_follow_every_write_of_consent(store: MemoryStore) -> None:
    """GetConsent's answer follows SetConsent and erasure at once, on both backends; the
    DuckDB store (the file's only writer) answers repeated reads without the database."""
    assert not (await store.get_consent("acme", "c1")).long_term_memory
    await store.set_consent("acme", "c1", True, NOW, AUDIT)
    reads = _consent_reads(store)
    for _ in range(3):
        assert (await store.get_consent("acme", "c1")).long_term_memory
    repeated = _consent_reads(store) - reads
    assert repeated == (3 if store.shared else 1)
    await store.set_consent("acme", "c1", False, NOW + 1, AUDIT)
    assert not (await store.get_consent("acme", "c1")).long_term_memory
    assert not (await store.get_consent("beta", "c1")).long_term_memory  # per tenant
    await store.set_consent("acme", "c1", True, NOW + 2, AUDIT)
    assert (await store.get_consent("acme", "c1")).updated_us == NOW + 2
    await store.erase_user("acme", "c1", NOW + 3, AUDIT)
    assert (await store.get_consent("acme", "c1")).updated_us is None


async def test_a_consent_read_overlapping_a_write_is_not_kept(store: MemoryStore) -> None:
    await store.set_consent("acme", "c2", True, NOW, AUDIT)
    # Reads and a withdrawal in flight together: whatever a read saw, the next one (after
    # the withdrawal is acknowledged) must see the withdrawal.
    for i in range(20):
        wanted = i % 2 == 0
        before = [asyncio.ensure_future(store.get_consent("acme", "c2")) for _ in range(5)]
        written, _ = await store.set_consent("acme", "c2", wanted, NOW + i + 1, AUDIT)
        after = [asyncio.ensure_future(store.get_consent("acme", "c2")) for _ in range(5)]
        await asyncio.gather(*before, *after)
        assert written.long_term_memory == wanted
        assert (await store.get_consent("acme", "c2")).long_term_memory == wanted
