"""ListFacts and the extraction status on both stores (DuckDB, PostgreSQL), then through
the RPC: stable order and pages, kinds, history, expiry, tenant and user isolation,
validation, bound page tokens, the audit of a listing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.models import AuditRecord, FactsPageKey
from services.memory.store import MemoryStore
from tests.memory.conftest import Memory, rpc_error
from tests.memory.test_recall_index import NOW
from tests.memory.test_store_contract import DAY, fact, request

AUDIT = AuditRecord("acme", "alice", "k", "Remember", "u1")


def _fields(info: Any) -> list[str]:
    return [v.field for v in info.field_violations]


async def _consent(
    store: MemoryStore, tenant: str, user: str, extraction: bool = True, at: int = NOW - 5 * DAY
) -> None:
    await store.set_consent(
        tenant, user, True, at, replace(AUDIT, tenant=tenant, user_id=user), extraction
    )


async def _seed(store: MemoryStore, tenant: str = "acme", user: str = "u1") -> dict[str, str]:
    """Five current facts (two stored in the same microsecond), one expired, one superseded
    by an extracted fact: text -> id."""
    audit = replace(AUDIT, tenant=tenant, user_id=user)
    await _consent(store, tenant, user)
    ids: dict[str, str] = {}
    for at, facts in (
        (NOW - 5, [fact("lives in Oslo", "general")]),
        (NOW - 4, [fact("likes bonds", "preference"), fact("likes gold", "preference")]),
        (NOW - 3, [fact("retires 2040", "goal")]),
        (NOW - 2, [fact("old news", "general", expires_us=NOW - 1)]),
    ):
        done = await store.remember_facts(tenant, user, facts, at, audit)
        assert done is not None
        ids.update({f.text: r.fact_id for f, r in zip(facts, done[0], strict=True)})
    moved = fact("lives in Bergen", "general", origin="extracted", source_message_ids=("m1",))
    done_x = await store.write_extraction(
        tenant, user, [moved], [(0, ids["lives in Oslo"])], ["m1"], NOW - 1, audit
    )
    assert done_x is not None and done_x.superseded
    ids["lives in Bergen"] = done_x.remembered[0].fact_id
    return ids


async def _all_pages(
    store: MemoryStore, size: int, kinds: tuple[str, ...] = (), history: bool = False
) -> list[list[str]]:
    pages: list[list[str]] = []
    after: FactsPageKey | None = None
    while True:
        rows = await store.list_facts("acme", "u1", kinds, history, after, size, NOW)
        pages.append([f.text for f in rows])
        if len(rows) < size:
            return pages
        after = FactsPageKey(rows[-1].created_us, rows[-1].fact_id)


async def test_list_facts_orders_pages_filters_and_keeps_history(store: MemoryStore) -> None:
    ids = await _seed(store)
    await _seed(store, tenant="globex")  # the same user id in another tenant
    await store.remember_facts(
        "acme", "u2", [fact("u2's own fact")], NOW, replace(AUDIT, user_id="u2")
    )  # no consent: nothing stored; and u2's facts never show for u1 anyway
    current = await store.list_facts("acme", "u1", (), False, None, 100, NOW)
    same_time = sorted(["likes bonds", "likes gold"], key=lambda t: ids[t])
    assert [f.text for f in current] == [*same_time, "retires 2040", "lives in Bergen"]
    assert all(f.valid_to_us is None for f in current)
    bergen = current[-1]
    assert bergen.origin == "extracted" and bergen.source_message_ids == ("m1",)

    history = await store.list_facts("acme", "u1", (), True, None, 100, NOW)
    assert [f.text for f in history] == ["lives in Oslo", *same_time, "retires 2040",
                                         "lives in Bergen"]  # fmt: skip
    oslo = history[0]
    assert oslo.valid_to_us == NOW - 1 and oslo.superseded_by == ids["lives in Bergen"]
    # Expired facts are never listed, with or without history.
    assert "old news" not in {f.text for f in history}

    # Pages of every size cover the same facts, each once, in the same order.
    for size in (1, 2, 3):
        pages = await _all_pages(store, size, history=True)
        assert [t for p in pages for t in p] == [f.text for f in history]
        assert all(len(p) == size for p in pages[:-1])
    assert await _all_pages(store, 2, kinds=("preference", "goal")) == [
        same_time,
        ["retires 2040"],
    ]
    assert await _all_pages(store, 5, kinds=("general",), history=True) == [
        ["lives in Oslo", "lives in Bergen"]
    ]
    assert await store.list_facts("acme", "u1", ("nosuch",), True, None, 10, NOW) == []
    assert await store.list_facts("acme", "nobody", (), True, None, 10, NOW) == []
    # The other tenant's twin facts have ids of their own.
    theirs = await store.list_facts("globex", "u1", (), True, None, 100, NOW)
    assert {f.fact_id for f in theirs}.isdisjoint(f.fact_id for f in history)


async def test_extraction_counts_and_unextracted_turns(store: MemoryStore) -> None:
    await _consent(store, "acme", "u1")
    await _consent(store, "acme", "u2", extraction=False)
    await _consent(store, "globex", "u1")
    empty = await store.extraction_counts("acme", "u1", NOW)
    assert (empty.messages_pending, empty.messages_extracted, empty.last_extracted_us) == (
        0,
        0,
        None,
    )
    old = request("s1", "u1", "a", "b", at=NOW - 3 * DAY)
    assistant = replace(
        request("s1", "u1", "c", at=NOW - 2 * DAY),
        messages=[replace(request("s1", "u1", "c").messages[0], role="assistant")],
    )
    results = await store.append_batch(
        [
            old,
            assistant,
            request("s2", "u1", "d", at=NOW - DAY),
            request("s3", "u2", "e", at=NOW - DAY),  # no extraction consent
            request("s1", "u1", "f", at=NOW - DAY, tenant="globex"),
        ]
    )
    a, b = (m.message_id for m in results[0].new_messages)
    d = results[2].new_messages[0].message_id
    counts = await store.extraction_counts("acme", "u1", NOW)
    assert (counts.messages_pending, counts.messages_extracted) == (3, 0)  # user turns only

    # Due turns: consenting users only, in the window, oldest first, this tenant only.
    due = await store.unextracted_messages("acme", NOW, None, 10)
    assert [m.message_id for m in due] == [a, b, d]
    assert [m.message_id for m in await store.unextracted_messages("acme", NOW, None, 2)] == [
        a,
        b,
    ]
    assert [m.message_id for m in await store.unextracted_messages("acme", NOW - DAY, None, 10)] == [a, b]  # fmt: skip
    assert [m.message_id for m in await store.unextracted_messages("acme", NOW, NOW - DAY, 10)] == [d]  # fmt: skip
    assert len(await store.unextracted_messages("globex", NOW, None, 10)) == 1

    audit = replace(AUDIT, rpc="ExtractFacts")
    done = await store.write_extraction(
        "acme", "u1", [fact("holds gold", origin="extracted")], [], [a, b], NOW - 10, audit
    )
    assert done is not None and not done.skipped
    counts = await store.extraction_counts("acme", "u1", NOW)
    assert (counts.messages_pending, counts.messages_extracted) == (1, 2)
    assert counts.last_extracted_us == NOW - 10 and counts.extracted_facts == 1
    assert [m.message_id for m in await store.unextracted_messages("acme", NOW, None, 10)] == [d]
    # An expired or superseded extracted fact is not a current one.
    later = await store.extraction_counts("acme", "u1", NOW + 400 * DAY)
    assert later.extracted_facts == 1  # no expiry was set
    assert (await store.extraction_counts("globex", "u1", NOW)).messages_extracted == 0


async def test_turns_from_before_an_opt_in_are_never_mined(store: MemoryStore) -> None:
    """The catch-up mines (and GetExtractionStatus counts as pending) only turns stored
    since the user's current opt-in; changing another consent keeps the opt-in's start,
    opting out and in again starts it anew."""
    results = await store.append_batch(
        [
            request("s1", "u1", "before", at=NOW - 4 * DAY),
            request("s1", "u1", "after", at=NOW - 2 * DAY),
            request("s1", "u1", "later", at=NOW - DAY // 2),
        ]
    )
    before, after, later = (r.new_messages[0].message_id for r in results)

    async def due() -> list[str]:
        return [m.message_id for m in await store.unextracted_messages("acme", NOW, None, 10)]

    assert await due() == []  # no consent yet: nothing is mined
    assert (await store.extraction_counts("acme", "u1", NOW)).messages_pending == 0
    await _consent(store, "acme", "u1", at=NOW - 3 * DAY)
    assert before not in await due()
    assert await due() == [after, later]
    assert (await store.extraction_counts("acme", "u1", NOW)).messages_pending == 2
    await _consent(store, "acme", "u1", at=NOW - DAY)  # re-stated while on: same start
    assert await due() == [after, later]
    await _consent(store, "acme", "u1", extraction=False, at=NOW - DAY)
    assert await due() == []
    await _consent(store, "acme", "u1", at=NOW - DAY)  # a new opt-in starts now
    assert await due() == [later]
    assert (await store.extraction_counts("acme", "u1", NOW)).messages_pending == 1


# -- through the RPC -------------------------------------------------------------------------
async def _remember(memory: Memory, user: str, *texts: str, kind: str = "") -> list[str]:
    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=memory.md()
    )
    reply = await memory.stub.Remember(
        pb.RememberRequest(user_id=user, facts=[pb.NewFact(text=t, kind=kind) for t in texts]),
        metadata=memory.md(),
    )
    return [f.fact_id for f in reply.facts]


async def test_list_facts_rpc_pages_with_bound_tokens(memory: Memory) -> None:
    ids = await _remember(memory, "u1", *(f"fact number {i}" for i in range(7)))
    ids += await _remember(memory, "u1", "a goal", kind="goal")
    await _remember(memory, "u1", "bob's fact", "bob's other")  # alice's tenant, same user
    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=True), metadata=memory.md("bob")
    )
    await memory.stub.Remember(
        pb.RememberRequest(user_id="u1", facts=[pb.NewFact(text="globex fact")]),
        metadata=memory.md("bob"),
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await memory.stub.ListFacts(
            pb.ListFactsRequest(user_id="u1", page_size=3, page_token=token), metadata=memory.md()
        )
        seen += [f.fact_id for f in page.facts]
        token = page.next_page_token
        if not token:
            break
        assert len(page.facts) == 3
    assert len(seen) == len(set(seen)) == 10 and set(ids) <= set(seen)
    first = await memory.stub.ListFacts(pb.ListFactsRequest(user_id="u1"), metadata=memory.md())
    assert [f.fact_id for f in first.facts] == seen and not first.next_page_token  # default 50
    assert first.facts[0].origin == pb.FACT_ORIGIN_REMEMBERED
    goals = await memory.stub.ListFacts(
        pb.ListFactsRequest(user_id="u1", kinds=["goal", "goal"]), metadata=memory.md()
    )
    assert [f.text for f in goals.facts] == ["a goal"]
    # Bob's tenant: its own fact only, none of alice's.
    theirs = await memory.stub.ListFacts(
        pb.ListFactsRequest(user_id="u1", include_history=True), metadata=memory.md("bob")
    )
    assert [f.text for f in theirs.facts] == ["globex fact"]

    # A token continues only the request it came from.
    page = await memory.stub.ListFacts(
        pb.ListFactsRequest(user_id="u1", page_size=2), metadata=memory.md()
    )
    for other in (
        pb.ListFactsRequest(user_id="u2", page_token=page.next_page_token),
        pb.ListFactsRequest(user_id="u1", include_history=True, page_token=page.next_page_token),
        pb.ListFactsRequest(user_id="u1", kinds=["goal"], page_token=page.next_page_token),
        pb.ListFactsRequest(user_id="u1", page_token="garbage!"),
    ):
        info = await rpc_error(memory.stub.ListFacts(other, metadata=memory.md()))
        assert info.code.name == "INVALID_ARGUMENT" and _fields(info) == ["page_token"]
    info = await rpc_error(
        memory.stub.ListFacts(
            pb.ListFactsRequest(user_id="u1", page_token=page.next_page_token),
            metadata=memory.md("bob"),
        )
    )
    assert info.code.name == "INVALID_ARGUMENT"  # another tenant's token
    same = await memory.stub.ListFacts(
        pb.ListFactsRequest(user_id="u1", page_size=5, page_token=page.next_page_token),
        metadata=memory.md(),
    )
    assert [f.fact_id for f in same.facts] == seen[2:7]  # the size may change between pages

    audits = [
        item.audit_entry
        async for item in memory.stub.ExportUserData(
            pb.ExportUserDataRequest(user_id="u1"), metadata=memory.md()
        )
        if item.HasField("audit_entry") and item.audit_entry.rpc == "ListFacts"
    ]
    assert audits and list(audits[0].target_ids) == seen[:3]


@pytest.mark.parametrize("backend", ["duckdb"])
async def test_list_facts_and_status_validation(memory: Memory) -> None:
    bad = [
        (pb.ListFactsRequest(), ["user_id"]),
        (pb.ListFactsRequest(user_id="bad user!"), ["user_id"]),
        (pb.ListFactsRequest(user_id="u1", kinds=["Bad-Kind", "ok", ""]), ["kinds[0]", "kinds[2]"]),
        (pb.ListFactsRequest(user_id="u1", kinds=["k"] * 17), ["kinds"]),
        (pb.ListFactsRequest(user_id="u1", page_size=501), ["page_size"]),
        (pb.ListFactsRequest(user_id="u1", page_size=-1), ["page_size"]),
        (pb.ListFactsRequest(user_id="u1", page_token="x" * 1025), ["page_token"]),
    ]
    for req, fields in bad:
        info = await rpc_error(memory.stub.ListFacts(req, metadata=memory.md()))
        assert info.code.name == "INVALID_ARGUMENT" and sorted(_fields(info)) == fields, req
    info = await rpc_error(
        memory.stub.GetExtractionStatus(
            pb.GetExtractionStatusRequest(user_id=""), metadata=memory.md()
        )
    )
    assert info.code.name == "INVALID_ARGUMENT" and _fields(info) == ["user_id"]
    # Extraction off (no tenant opted in here): reported, with the store's counts.
    status = await memory.stub.GetExtractionStatus(
        pb.GetExtractionStatusRequest(user_id="u1"), metadata=memory.md()
    )
    assert not status.tenant_enabled and not status.user_consented
    assert status.replica_queue_depth == 0 and not status.HasField("last_extraction_time")
