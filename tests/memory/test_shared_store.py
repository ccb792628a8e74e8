"""Several memory replicas on one PostgreSQL database and one Redis prefix, in-process on
ephemeral ports (real gRPC, real PostgreSQL, real Valkey):

- concurrent appends to one session through both replicas get gap-free sequences, and
  retries racing on the two replicas with the same client message id store once;
- a fact remembered through A is recalled through B at once (B's cached index applies
  the delta), a fact forgotten or withdrawn through A is not (B reloads);
- a replica starting while another serves flushes nothing of the shared prefix;
- a commit whose write-through never happened (a replica killed in between), an erasure
  whose cache deletes were lost, a Redis outage: no read serves a window that misses a
  committed message or holds an erased one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from finsight.memory.v1 import memory_pb2 as pb
from services.memory.models import AppendRequest, AuditRecord, NewMessage, now_us
from tests.conftest import Keys, RedisProcess
from tests.memory.conftest import Memory, msg, rpc_error, start_memory
from tests.memory.test_recall import consent, remember


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def replica(tmp: Path, redis_url: str, keys: Keys, pg_url: str, prefix: str) -> Memory:
    return await start_memory(
        tmp,
        redis_url,
        keys,
        memory_database_url=pg_url,
        memory_redis_prefix=prefix,
        memory_purge_interval_s=0,
    )


@pytest.fixture
async def pair(
    tmp_path: Path, redis_url: str, api_keys: Keys, pg_url: str
) -> AsyncIterator[tuple[Memory, Memory]]:
    prefix = f"shared-{tmp_path.name}"
    a = await replica(tmp_path / "a", redis_url, api_keys, pg_url, prefix)
    b = await replica(tmp_path / "b", redis_url, api_keys, pg_url, prefix)
    yield a, b
    await asyncio.gather(a.close(), b.close())


def append(session: str, *messages: pb.NewMessage, user: str = "u1") -> pb.AppendMessagesRequest:
    return pb.AppendMessagesRequest(session_id=session, user_id=user, messages=list(messages))


async def history(memory: Memory, session: str) -> list[tuple[int, str]]:
    page = await memory.stub.GetHistory(
        pb.GetHistoryRequest(session_id=session, page_size=500), metadata=memory.md()
    )
    return [(m.sequence, m.message.content) for m in page.messages]


async def recalled(memory: Memory, user: str, query: str) -> list[str]:
    reply = await memory.stub.Recall(
        pb.RecallRequest(user_id=user, query=query, k=50, mode=pb.RECALL_MODE_LEXICAL),
        metadata=memory.md(),
    )
    return [f.fact.fact_id for f in reply.facts]


async def test_appends_through_two_replicas_are_gap_free_and_never_duplicated(
    pair: tuple[Memory, Memory],
) -> None:
    a, b = pair
    plain = [
        (a if i % 2 else b).stub.AppendMessages(
            append("s", msg(f"m{i}"), msg(f"n{i}")), metadata=a.md()
        )
        for i in range(40)
    ]
    # The same request (same client ids) sent to both replicas at once, many times.
    retried = append("s", msg("once", cid="q-1"), msg("twice", cid="q-2"))
    retries = [r.stub.AppendMessages(retried, metadata=a.md()) for r in (a, b) * 6]
    replies = await asyncio.gather(*plain, *retries)
    stored = [m for r in replies for m in r.messages if not m.deduplicated]
    assert sorted(m.sequence for m in stored) == list(range(1, 40 * 2 + 2 + 1))
    for reply in replies[:40]:  # one request's messages are consecutive
        assert reply.messages[1].sequence == reply.messages[0].sequence + 1
    assert len({tuple((m.message_id, m.sequence) for m in r.messages) for r in replies[40:]}) == 1
    assert sum(not m.deduplicated for r in replies[40:] for m in r.messages) == 2
    for memory in (a, b):  # both read the same history, from Redis or from PostgreSQL
        got = await history(memory, "s")
        assert [s for s, _ in got] == list(range(1, 83))
        assert [c for _, c in got].count("once") == 1


async def test_facts_written_through_one_replica_are_recalled_through_the_other(
    pair: tuple[Memory, Memory],
) -> None:
    a, b = pair
    await consent(a, "u1")
    (first,) = await remember(a, "u1", pb.NewFact(text="tesla shares"))
    assert await recalled(b, "u1", "tesla") == [first]  # B loads and caches its index
    assert b.app.manager.index.peek(("acme", "u1")) is not None
    loads = b.app.manager.index.loads
    deltas = sample("finsight_memory_recall_index_refreshes_total", kind="delta")

    (second,) = await remember(a, "u1", pb.NewFact(text="tesla bonds", importance=0.9))
    assert await recalled(b, "u1", "tesla") == [second, first]  # at once, scored as SQL
    assert sample("finsight_memory_recall_index_refreshes_total", kind="delta") == deltas + 1
    assert b.app.manager.index.loads == loads  # applied, not reloaded
    got = await b.app.store.recall_facts(
        "acme", "u1", "tesla", pb_filter(), 50, now_us(), b.app.manager.weights
    )
    assert [s.fact.fact_id for s in got] == [second, first]

    reloads = sample("finsight_memory_recall_index_refreshes_total", kind="reload")
    await a.stub.Forget(pb.ForgetRequest(user_id="u1", fact_ids=[second]), metadata=a.md())
    assert await recalled(b, "u1", "tesla") == [first]
    assert sample("finsight_memory_recall_index_refreshes_total", kind="reload") == reloads + 1

    await a.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=False), metadata=a.md()
    )
    assert await recalled(b, "u1", "tesla") == []
    # BuildContext recalls through the same check.
    await consent(b, "u1")
    (third,) = await remember(b, "u1", pb.NewFact(text="tesla calls"))
    built = await a.stub.BuildContext(
        pb.BuildContextRequest(session_id="c", user_id="u1", query="tesla", token_budget=2048),
        metadata=a.md(),
    )
    assert list(built.included_fact_ids) == [third]


def pb_filter():  # type: ignore[no-untyped-def]
    from services.memory.models import FactFilter

    return FactFilter()


async def test_a_replica_starting_flushes_nothing_the_others_use(
    tmp_path: Path, redis_url: str, api_keys: Keys, pg_url: str, pair: tuple[Memory, Memory]
) -> None:
    a, _ = pair
    for i in range(3):
        await a.stub.AppendMessages(append("warm", msg(f"m{i}")), metadata=a.md())
    key = a.app.hot.key("acme", "warm")
    assert await a.app.hot.redis.zcard(key) == 3
    c = await replica(tmp_path / "c", redis_url, api_keys, pg_url, a.app.hot.prefix)
    try:
        assert c.app.hot.trusted  # at once: nothing to flush first
        await asyncio.sleep(0.3)
        assert await a.app.hot.redis.zcard(key) == 3
        hits = sample("finsight_memory_hot_tier_reads_total", outcome="hit")
        assert await history(c, "warm") == [(1, "m0"), (2, "m1"), (3, "m2")]
        assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits + 1
    finally:
        await c.close()


def _request(session: str, content: str, user: str = "u1") -> AppendRequest:
    audit = AuditRecord("acme", "alice", "alice-1", "AppendMessages", user, session)
    return AppendRequest("acme", session, user, [NewMessage("user", content)], audit, now_us())


async def test_a_commit_without_write_through_is_never_missed(
    pair: tuple[Memory, Memory],
) -> None:
    """What a replica killed between COMMIT and its Redis write leaves: the rows, and a
    window without them (here: a commit through the store, which writes no cache)."""
    a, b = pair
    for i in range(3):
        await a.stub.AppendMessages(append("s", msg(f"m{i}")), metadata=a.md())
    assert await a.app.hot.redis.zcard(a.app.hot.key("acme", "s")) == 3
    await b.app.store.append_batch([_request("s", "committed, never cached")])
    stale = sample("finsight_memory_hot_tier_reads_total", outcome="stale")
    want = [(1, "m0"), (2, "m1"), (3, "m2"), (4, "committed, never cached")]
    assert await history(a, "s") == want
    assert sample("finsight_memory_hot_tier_reads_total", outcome="stale") == stale + 1
    built = await b.stub.BuildContext(
        pb.BuildContextRequest(session_id="s", user_id="u1", query="next?", token_budget=2048),
        metadata=b.md(),
    )
    assert list(built.included_sequences) == [1, 2, 3, 4]
    # The read replaced the window: the next one is a hit again.
    hits = sample("finsight_memory_hot_tier_reads_total", outcome="hit")
    assert await history(b, "s") == want
    assert sample("finsight_memory_hot_tier_reads_total", outcome="hit") == hits + 1


async def test_an_erased_session_is_never_served_from_a_window_left_behind(
    pair: tuple[Memory, Memory],
) -> None:
    a, b = pair
    for i in range(3):
        await a.stub.AppendMessages(append("s", msg(f"secret {i}")), metadata=a.md())
    key = a.app.hot.key("acme", "s")
    old = await a.app.hot.window_of("acme", "s")
    assert old is not None and old.incarnation is not None
    old_window, old_incarnation = old.messages, old.incarnation
    # An erasure whose Redis deletes were lost (erased through the store: no invalidation).
    audit = AuditRecord("acme", "alice", "alice-1", "DeleteUserData", "u1")
    await b.app.store.erase_user("acme", "u1", now_us(), audit)
    assert await a.app.hot.redis.zcard(key) == 3
    missing = await rpc_error(
        b.stub.GetHistory(pb.GetHistoryRequest(session_id="s"), metadata=b.md())
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert await a.app.hot.redis.exists(key) == 0  # the read dropped what was left
    # ... and had it not (say, left by a failed delete again): mixed with a new session.
    await a.app.hot.write_through([("acme", "s", old_window, old_incarnation)])
    # The session id is used again: a new incarnation. Its first two write-throughs are
    # lost (committed through the store), the third lands over the old window: by
    # sequence it looks complete (1-3), but two of its messages are the erased ones.
    await b.app.store.append_batch([_request("s", "new 1")])
    await b.app.store.append_batch([_request("s", "new 2")])
    await b.stub.AppendMessages(append("s", msg("new 3")), metadata=b.md())
    assert await a.app.hot.redis.zcard(key) == 3
    assert await history(a, "s") == [(1, "new 1"), (2, "new 2"), (3, "new 3")]
    built = await a.stub.BuildContext(
        pb.BuildContextRequest(session_id="s", user_id="u1", query="q", token_budget=2048),
        metadata=a.md(),
    )
    assert all("secret" not in m.content for m in built.messages)
    assert list(built.included_sequences) == [1, 2, 3]


async def test_redis_outage_with_a_shared_store_fails_no_rpc_and_flushes_nothing(
    tmp_path: Path, private_redis: RedisProcess, api_keys: Keys, pg_url: str
) -> None:
    memory = await replica(tmp_path, private_redis.url, api_keys, pg_url, "outage")
    try:
        for i in range(3):
            await memory.stub.AppendMessages(append("s", msg(f"m{i}")), metadata=memory.md())
        private_redis.stop()
        await memory.stub.AppendMessages(append("s", msg("during outage")), metadata=memory.md())
        assert memory.app.hot.trusted  # nothing to flush: windows are checked per read
        want = [(1, "m0"), (2, "m1"), (3, "m2"), (4, "during outage")]
        assert await history(memory, "s") == want
        private_redis.start()
        assert await history(memory, "s") == want
        await memory.stub.AppendMessages(append("s", msg("after")), metadata=memory.md())
        assert await history(memory, "s") == [*want, (5, "after")]
    finally:
        await memory.close()
