"""Retention: messages by age per tenant, facts by kind and expiry, the background purge."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.config import MemorySettings, TenantRetention
from tests.conftest import Keys
from tests.memory.conftest import counts, msg, rpc_error, start_memory

SECOND_IN_DAYS = 1 / 86_400


def test_tenant_overrides_merge_over_defaults() -> None:
    settings = MemorySettings(
        _env_file=None,
        finsight_auth_enabled=False,  # type: ignore[call-arg]
        memory_fact_retention_days={"*": 400, "episodic": 90},
        memory_tenant_retention={
            "acme": TenantRetention(message_retention_days=30, fact_retention_days={"episodic": 7})
        },
    )
    acme, other = settings.retention_for("acme"), settings.retention_for("globex")
    assert (acme.message_days, acme.audit_days) == (30, 730)
    assert (acme.fact_days_for("episodic"), acme.fact_days_for("profile")) == (7, 400)
    assert (other.message_days, other.fact_days_for("episodic")) == (365, 90)


async def test_messages_are_purged_by_tenant_age_and_cache_follows(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_tenant_retention={"acme": {"message_retention_days": SECOND_IN_DAYS}},
        memory_database_url=database_url,
    )
    try:
        md, bob = memory.md(), memory.md("bob")
        for session in ("old", "mixed"):
            await memory.stub.AppendMessages(
                pb.AppendMessagesRequest(
                    session_id=session, user_id="u1", messages=[msg("a"), msg("b")]
                ),
                metadata=md,
            )
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id="old", user_id="u1", messages=[msg("globex keeps this")]
            ),
            metadata=bob,
        )
        time.sleep(1.1)
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(session_id="mixed", user_id="u1", messages=[msg("c")]),
            metadata=md,
        )

        purged = await memory.stub.PurgeExpired(
            pb.PurgeExpiredRequest(), metadata=memory.md("admin")
        )
        assert (purged.messages_deleted, purged.sessions_deleted) == (4, 1)
        gone = await rpc_error(
            memory.stub.GetHistory(pb.GetHistoryRequest(session_id="old"), metadata=md)
        )
        assert gone.code == grpc.StatusCode.NOT_FOUND
        for order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING):
            for _ in range(2):  # from the database, then again after the refill
                page = await memory.stub.GetHistory(
                    pb.GetHistoryRequest(session_id="mixed", order=order), metadata=md
                )
                assert [(m.sequence, m.message.content) for m in page.messages] == [(3, "c")]
        kept = await memory.stub.GetHistory(pb.GetHistoryRequest(session_id="old"), metadata=bob)
        assert [m.message.content for m in kept.messages] == ["globex keeps this"]
        # The next append continues the numbering.
        more = await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(session_id="mixed", user_id="u1", messages=[msg("d")]),
            metadata=md,
        )
        assert more.messages[0].sequence == 4
    finally:
        await memory.close()


async def test_background_purge_and_kind_retention(
    tmp_path: Path, redis_url: str, api_keys: Keys, database_url: str | None
) -> None:
    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0.3,
        memory_fact_retention_days={"episodic": SECOND_IN_DAYS},
        memory_database_url=database_url,
    )
    try:
        md = memory.md()
        await memory.stub.SetConsent(
            pb.SetConsentRequest(user_id="u1", long_term_memory=True), metadata=md
        )
        reply = await memory.stub.Remember(
            pb.RememberRequest(
                user_id="u1",
                facts=[
                    pb.NewFact(text="met the advisor today", kind="episodic"),
                    pb.NewFact(text="advisor is called Sam", kind="profile"),
                ],
            ),
            metadata=md,
        )
        episodic = reply.facts[0].fact_id
        recalled = await memory.stub.Recall(
            pb.RecallRequest(user_id="u1", query="advisor"), metadata=md
        )
        assert len(recalled.facts) == 2
        assert recalled.facts[0].fact.HasField("expire_time") != recalled.facts[1].fact.HasField(
            "expire_time"
        )
        for _ in range(60):  # the background task deletes it without anyone asking
            await asyncio.sleep(0.1)
            if (await counts(memory, "u1"))["facts"] == 1:
                break
        assert (await counts(memory, "u1"))["facts"] == 1
        recalled = await memory.stub.Recall(
            pb.RecallRequest(user_id="u1", query="advisor"), metadata=md
        )
        assert [f.fact.fact_id for f in recalled.facts] != [episodic]
        assert len(recalled.facts) == 1
    finally:
        await memory.close()
    assert memory.app.purger._task is not None and memory.app.purger._task.done()
