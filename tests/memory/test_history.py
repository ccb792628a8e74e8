"""AppendMessages and GetHistory: idempotency, gap-free sequences, pagination, ownership."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from finsight.memory.v1 import memory_pb2 as pb
from tests.memory.conftest import Memory, counts, msg, rpc_error


def append(session: str, *messages: pb.NewMessage, user: str = "u1") -> pb.AppendMessagesRequest:
    return pb.AppendMessagesRequest(session_id=session, user_id=user, messages=list(messages))


async def test_retried_append_returns_the_same_ids_and_stores_once(memory: Memory) -> None:
    request = append("s1", msg("question", cid="q-1"), msg("answer", role=3, cid="a-1"))
    first = await memory.stub.AppendMessages(request, metadata=memory.md())
    again = await memory.stub.AppendMessages(request, metadata=memory.md())
    assert [(m.message_id, m.sequence) for m in again.messages] == [
        (m.message_id, m.sequence) for m in first.messages
    ]
    assert [m.sequence for m in first.messages] == [1, 2]
    assert [m.deduplicated for m in first.messages] == [False, False]
    assert [m.deduplicated for m in again.messages] == [True, True]

    # A retry that carries one new message stores only that one, with the next number.
    mixed = await memory.stub.AppendMessages(
        append("s1", msg("answer", role=3, cid="a-1"), msg("follow-up", cid="q-2")),
        metadata=memory.md(),
    )
    assert [(m.sequence, m.deduplicated) for m in mixed.messages] == [(2, True), (3, False)]
    assert (await counts(memory, "u1"))["messages"] == 3


async def test_concurrent_duplicate_appends_store_once(memory: Memory) -> None:
    """Retries racing the first attempt (same batch transaction or not) never duplicate."""
    request = append("s2", msg("only once", cid="dup-1"), msg("me too", cid="dup-2"))
    replies = await asyncio.gather(
        *(memory.stub.AppendMessages(request, metadata=memory.md()) for _ in range(12))
    )
    ids = {tuple((m.message_id, m.sequence) for m in r.messages) for r in replies}
    assert len(ids) == 1
    assert sum(not m.deduplicated for r in replies for m in r.messages) == 2
    history = await memory.stub.GetHistory(
        pb.GetHistoryRequest(session_id="s2"), metadata=memory.md()
    )
    assert [m.message.content for m in history.messages] == ["only once", "me too"]


async def test_concurrent_appends_get_gap_free_sequences(memory: Memory) -> None:
    replies = await asyncio.gather(
        *(
            memory.stub.AppendMessages(
                append("s3", msg(f"m{i}"), msg(f"n{i}")), metadata=memory.md()
            )
            for i in range(30)
        )
    )
    seqs = sorted(m.sequence for r in replies for m in r.messages)
    assert seqs == list(range(1, 61))
    for r in replies:  # one request's messages are consecutive and in order
        assert r.messages[1].sequence == r.messages[0].sequence + 1


async def read_all(memory: Memory, session: str, order: int, size: int) -> list[pb.StoredMessage]:
    out: list[pb.StoredMessage] = []
    token = ""
    for _ in range(100):
        page = await memory.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session, page_size=size, page_token=token, order=order),
            metadata=memory.md(),
        )
        assert len(page.messages) <= size
        out.extend(page.messages)
        token = page.next_page_token
        if not token:
            return out
    raise AssertionError("pagination did not end")


async def test_pagination_in_both_orders_from_cache_and_from_the_database(memory: Memory) -> None:
    for i in range(23):
        await memory.stub.AppendMessages(
            append("p1", msg(f"m{i + 1}", metadata_key="v")), metadata=memory.md()
        )
    expected = [f"m{i}" for i in range(1, 24)]
    answers = {}
    for trusted in (True, False):  # the Redis window, then the database only: same answers
        memory.app.hot.trusted = trusted
        for order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING):
            for size in (1, 5, 23, 50):
                got = await read_all(memory, "p1", order, size)
                contents = [m.message.content for m in got]
                want = expected if order == pb.SORT_ORDER_ASCENDING else expected[::-1]
                assert contents == want, (trusted, order, size)
                answers[(trusted, order, size)] = [m.SerializeToString() for m in got]
    for (trusted, order, size), value in answers.items():
        if trusted:
            assert value == answers[(False, order, size)]
    memory.app.hot.trusted = True

    page = await memory.stub.GetHistory(
        pb.GetHistoryRequest(session_id="p1", page_size=2), metadata=memory.md()
    )
    assert page.messages[0].metadata == {"metadata_key": "v"}
    assert page.messages[0].sequence == 1 and page.messages[0].user_id == "u1"
    # A token is bound to its session and order.
    bad = await rpc_error(
        memory.stub.GetHistory(
            pb.GetHistoryRequest(
                session_id="p1", page_token=page.next_page_token, order=pb.SORT_ORDER_DESCENDING
            ),
            metadata=memory.md(),
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad.field_violations] == ["page_token"]
    garbage = await rpc_error(
        memory.stub.GetHistory(
            pb.GetHistoryRequest(session_id="p1", page_token="not-a-token!"), metadata=memory.md()
        )
    )
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_window_smaller_than_history_falls_back_for_old_pages(
    tmp_path, redis_url, api_keys, database_url
) -> None:  # type: ignore[no-untyped-def]
    from tests.memory.conftest import start_memory

    memory = await start_memory(
        tmp_path,
        redis_url,
        api_keys,
        memory_hot_window=4,
        memory_redis_prefix=f"t-{tmp_path.name}",
        memory_purge_interval_s=0,
        memory_database_url=database_url,
    )
    try:
        for i in range(10):
            await memory.stub.AppendMessages(append("w", msg(f"m{i + 1}")), metadata=memory.md())
        raw = await memory.app.hot.redis.zcard(memory.app.hot.key("acme", "w"))
        assert raw == 4
        for order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING):
            got = [m.sequence for m in await read_all(memory, "w", order, 3)]
            assert got == (
                list(range(1, 11)) if order == pb.SORT_ORDER_ASCENDING else list(range(10, 0, -1))
            )
    finally:
        await memory.close()


async def test_unknown_session_and_other_users_session(memory: Memory) -> None:
    missing = await rpc_error(
        memory.stub.GetHistory(pb.GetHistoryRequest(session_id="nope"), metadata=memory.md())
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    await memory.stub.AppendMessages(append("own", msg("hi")), metadata=memory.md())
    for trusted in (True, False):
        memory.app.hot.trusted = trusted
        other = await rpc_error(
            memory.stub.GetHistory(
                pb.GetHistoryRequest(session_id="own", user_id="u2"), metadata=memory.md()
            )
        )
        assert other.code == grpc.StatusCode.NOT_FOUND
    memory.app.hot.trusted = True
    taken = await rpc_error(
        memory.stub.AppendMessages(append("own", msg("x"), user="u2"), metadata=memory.md())
    )
    assert taken.code == grpc.StatusCode.FAILED_PRECONDITION
    assert taken.reason == "SESSION_USER_MISMATCH"
    assert (await counts(memory, "u2"))["messages"] == 0


@pytest.mark.parametrize("backend", ["duckdb"])  # counts DuckDB calls (store contract: both)
async def test_a_batch_is_applied_as_if_each_request_ran_alone(
    memory: Memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One group-committed job with many requests (what the Batcher builds under load):
    new and existing sessions, retries inside the batch and across batches, an owner
    mismatch; and a constant number of calls into DuckDB, whatever the batch size."""
    from services.memory import storage
    from services.memory.models import AppendRequest, AuditRecord, NewMessage

    calls = []
    run_script = storage._run_script

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(1)
        run_script(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "_run_script", counting)
    await memory.stub.AppendMessages(append("old", msg("first", cid="c1")), metadata=memory.md())

    def request(session: str, user: str, *cids: str) -> AppendRequest:
        audit = AuditRecord("acme", "alice", "k", "AppendMessages", user, session)
        messages = [NewMessage("user", f"text {c}", c or None, {}, 3) for c in cids]
        return AppendRequest("acme", session, user, messages, audit, 1_750_000_000_000_000)

    batch = [
        request("old", "u1", "c1", "c2"),  # c1 stored before the batch
        request("new", "u1", "n1", ""),
        request("new", "u1", "n1", "n2"),  # a retry racing the first, in the same batch
        request("old", "intruder", "x"),
        request("old", "u1", ""),
    ]
    calls.clear()
    results = await memory.app.duck.write("t", storage.append_batch, batch)
    assert len(calls) == 2  # the lookup and one write script (+1 nextval: a new session)
    seqs = [[(a.sequence, a.deduplicated) for a in r.appended] for r in results]
    assert seqs == [
        [(1, True), (2, False)],
        [(1, False), (2, False)],
        [(1, True), (3, False)],
        [],
        [(3, False)],
    ]
    assert results[2].appended[0].message_id == results[1].appended[0].message_id
    assert results[3].owner_mismatch
    history = await memory.stub.GetHistory(
        pb.GetHistoryRequest(session_id="new"), metadata=memory.md()
    )
    assert [m.message.content for m in history.messages] == ["text n1", "text ", "text n2"]
    stored = await memory.app.duck.read(
        "t",
        lambda cur: cur.execute(
            "SELECT session_id, seq, context_tokens FROM messages ORDER BY session_id, seq"
        ).fetchall(),
    )
    assert [(s, q) for s, q, _ in stored] == [
        ("new", 1),
        ("new", 2),
        ("new", 3),
        ("old", 1),
        ("old", 2),
        ("old", 3),
    ]
    assert all(n == 3 for s, _, n in stored if s == "new")  # the counts given are stored
    sessions = await memory.app.duck.read(
        "t",
        lambda cur: cur.execute(
            "SELECT session_id, user_id, last_seq FROM sessions ORDER BY 1"
        ).fetchall(),
    )
    assert sessions == [("new", "u1", 3), ("old", "u1", 3)]
    audit = await memory.app.duck.read(
        "t",
        lambda cur: cur.execute(
            "SELECT outcome, count(*) FROM audit_log WHERE rpc = 'AppendMessages' "
            "AND caller = 'alice' AND key_id = 'k' GROUP BY 1 ORDER BY 1"
        ).fetchall(),
    )
    assert audit == [("SESSION_USER_MISMATCH", 1), ("ok", 4)]

    # A bigger batch, existing sessions only: still two calls.
    calls.clear()
    await memory.app.duck.write(
        "t", storage.append_batch, [request(s, "u1", "") for s in ("old", "new") * 40]
    )
    assert len(calls) == 2
