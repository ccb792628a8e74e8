"""Consent, export, erasure, audit and tenant isolation."""

from __future__ import annotations

import grpc

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.context_builder import render_query
from tests.memory.conftest import Memory, counts, msg, rpc_error


async def export(memory: Memory, user: str, who: str = "alice") -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {"consent": [], "fact": [], "message": [], "audit_entry": []}  # type: ignore[type-arg]
    async for item in memory.stub.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=memory.md(who)
    ):
        kind = item.WhichOneof("item")
        out[kind].append(getattr(item, kind))
    return out


async def seed(memory: Memory, user: str = "u1", who: str = "alice") -> None:
    md = memory.md(who)
    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=md
    )
    for session in ("sa", "sb") if user == "u1" else (f"{user}-a", f"{user}-b"):
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[msg(f"secret question in {session}"), msg("secret answer", role=3)],
            ),
            metadata=md,
        )
    await memory.stub.Remember(
        pb.RememberRequest(
            user_id=user,
            facts=[
                pb.NewFact(text="secret: holds 500 NVDA"),
                pb.NewFact(text="secret: risk averse"),
            ],
        ),
        metadata=md,
    )


async def test_remember_needs_consent_and_withdrawal_deletes_facts(memory: Memory) -> None:
    denied = await rpc_error(
        memory.stub.Remember(
            pb.RememberRequest(user_id="u1", facts=[pb.NewFact(text="likes bonds")]),
            metadata=memory.md(),
        )
    )
    assert denied.code == grpc.StatusCode.FAILED_PRECONDITION
    assert denied.reason == "CONSENT_REQUIRED"
    assert (await counts(memory, "u1"))["facts"] == 0
    got = await memory.stub.GetConsent(pb.GetConsentRequest(user_id="u1"), metadata=memory.md())
    assert not got.consent.long_term_memory and not got.consent.HasField("update_time")

    set_ = await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=True), metadata=memory.md()
    )
    assert set_.consent.long_term_memory and set_.consent.updated_by == "alice"
    await memory.stub.Remember(
        pb.RememberRequest(
            user_id="u1", facts=[pb.NewFact(text="likes bonds"), pb.NewFact(text="owns gold")]
        ),
        metadata=memory.md(),
    )
    withdrawn = await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=False), metadata=memory.md()
    )
    assert withdrawn.facts_deleted == 2
    assert (await counts(memory, "u1"))["facts"] == 0
    again = await rpc_error(
        memory.stub.Remember(
            pb.RememberRequest(user_id="u1", facts=[pb.NewFact(text="likes bonds")]),
            metadata=memory.md(),
        )
    )
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_export_then_erasure_removes_duckdb_rows_and_redis_keys(memory: Memory) -> None:
    await seed(memory)
    await seed(memory, user="u2")  # a neighbour who must keep everything
    data = await export(memory, "u1")
    assert data["consent"][0].long_term_memory
    assert sorted(f.text for f in data["fact"]) == ["secret: holds 500 NVDA", "secret: risk averse"]
    assert [(m.session_id, m.sequence) for m in data["message"]] == [
        ("sa", 1),
        ("sa", 2),
        ("sb", 1),
        ("sb", 2),
    ]
    rpcs = [a.rpc for a in data["audit_entry"]]
    assert rpcs[:4] == ["SetConsent", "AppendMessages", "AppendMessages", "Remember"]
    assert "ExportUserData" in rpcs
    for entry in data["audit_entry"]:  # ids and counts, never content
        assert "secret" not in entry.SerializeToString().decode("utf-8", "replace")
        assert entry.caller == "alice" and entry.outcome == "ok"

    redis = memory.app.hot.redis
    keys = [memory.app.hot.key("acme", s) for s in ("sa", "sb")]
    assert await redis.exists(*keys) == 2

    erased = await memory.stub.DeleteUserData(
        pb.DeleteUserDataRequest(user_id="u1"), metadata=memory.md()
    )
    assert (
        erased.messages_deleted,
        erased.sessions_deleted,
        erased.facts_deleted,
        erased.consent_deleted,
        erased.cache_entries_deleted,
    ) == (4, 2, 2, 1, 2)
    assert await redis.exists(*keys) == 0
    left = await counts(memory, "u1")
    assert {k: v for k, v in left.items() if k != "audit_log"} == {
        "messages": 0,
        "sessions": 0,
        "facts": 0,
        "consent": 0,
        "fact_terms": 0,
        "extracted_messages": 0,
    }
    after = await export(memory, "u1")
    assert after["fact"] == [] and after["message"] == []
    assert not after["consent"][0].long_term_memory  # back to the default: no consent
    erasure = [a for a in after["audit_entry"] if a.rpc == "DeleteUserData"]
    assert len(erasure) == 1 and '"messages_deleted":4' in erasure[0].detail
    missing = await rpc_error(
        memory.stub.GetHistory(pb.GetHistoryRequest(session_id="sa"), metadata=memory.md())
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    # The neighbour is untouched.
    assert (await counts(memory, "u2"))["messages"] == 4
    assert (await counts(memory, "u2"))["facts"] == 2


async def test_a_second_tenant_with_the_same_user_id_sees_nothing(memory: Memory) -> None:
    await seed(memory)  # alice: tenant acme
    md = memory.md("bob")  # tenant globex
    for session in ("sa", "sb"):
        missing = await rpc_error(
            memory.stub.GetHistory(pb.GetHistoryRequest(session_id=session), metadata=md)
        )
        assert missing.code == grpc.StatusCode.NOT_FOUND
    recalled = await memory.stub.Recall(
        pb.RecallRequest(user_id="u1", query="secret NVDA"), metadata=md
    )
    assert list(recalled.facts) == []
    consent = await memory.stub.GetConsent(pb.GetConsentRequest(user_id="u1"), metadata=md)
    assert not consent.consent.long_term_memory
    data = await export(memory, "u1", who="bob")
    assert data["fact"] == [] and data["message"] == []
    assert all(a.caller == "bob" for a in data["audit_entry"])
    context = await memory.stub.BuildContext(
        pb.BuildContextRequest(
            session_id="sa", user_id="u1", query="what do I hold?", token_budget=1024
        ),
        metadata=md,
    )
    assert [m.content for m in context.messages][-1] == render_query("what do I hold?")[1]
    assert len(context.messages) == 2 and list(context.included_sequences) == []
    # bob may even use the same session id: it is a different session.
    await memory.stub.AppendMessages(
        pb.AppendMessagesRequest(session_id="sa", user_id="u1", messages=[msg("bob's own")]),
        metadata=md,
    )
    erased = await memory.stub.DeleteUserData(pb.DeleteUserDataRequest(user_id="u1"), metadata=md)
    assert (erased.messages_deleted, erased.facts_deleted) == (1, 0)
    page = await memory.stub.GetHistory(pb.GetHistoryRequest(session_id="sa"), metadata=memory.md())
    assert [m.message.content for m in page.messages] == ["secret question in sa", "secret answer"]
    assert (await counts(memory, "u1"))["facts"] == 2


async def test_reads_are_audited(memory: Memory) -> None:
    await seed(memory)
    await memory.stub.GetHistory(pb.GetHistoryRequest(session_id="sa"), metadata=memory.md())
    await memory.stub.Recall(pb.RecallRequest(user_id="u1", query="NVDA"), metadata=memory.md())
    data = await export(memory, "u1")
    history = [a for a in data["audit_entry"] if a.rpc == "GetHistory"]
    assert len(history) == 1 and len(history[0].target_ids) == 2
    assert history[0].session_id == "sa"
    recalls = [a for a in data["audit_entry"] if a.rpc == "Recall"]
    assert len(recalls) == 1
    assert list(recalls[0].target_ids) == [data["fact"][0].fact_id] or list(
        recalls[0].target_ids
    ) == [data["fact"][1].fact_id]
