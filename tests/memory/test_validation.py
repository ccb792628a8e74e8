"""Bad input: INVALID_ARGUMENT with one field violation per bad field, and nothing written."""

from __future__ import annotations

import grpc

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from libs.common.wire import find_invalid_utf8
from services.memory import limits
from tests.memory.conftest import Memory, counts, msg, rpc_error, sql


async def test_a_bad_batch_is_rejected_whole_and_writes_nothing(memory: Memory) -> None:
    request = pb.AppendMessagesRequest(
        session_id="s 1",
        user_id="",
        messages=[
            msg("fine"),
            msg(""),
            msg("x" * (limits.MAX_CONTENT_BYTES + 1)),
            pb.NewMessage(message=common_pb2.ChatMessage(content="no role")),
            msg("dup", cid="c1"),
            msg("dup", cid="c1"),
            msg("nul\x00byte"),
        ],
    )
    info = await rpc_error(memory.stub.AppendMessages(request, metadata=memory.md()))
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in info.field_violations]
    assert fields == [
        "session_id",
        "user_id",
        "messages[1].message.content",
        "messages[2].message.content",
        "messages[3].message.role",
        "messages[5].client_message_id",
        "messages[6].message.content",
    ]
    assert (await counts(memory, "u1"))["messages"] == 0
    # A rejected request leaves no trace but the access log.
    assert await sql(memory, "SELECT count(*) FROM audit_log") == [(0,)]


async def test_limits_on_batches_ranges_and_ids(memory: Memory) -> None:
    md = memory.md()
    too_many = pb.AppendMessagesRequest(
        session_id="s", user_id="u1", messages=[msg("m")] * (limits.MAX_BATCH_MESSAGES + 1)
    )
    cases = [
        (memory.stub.AppendMessages(too_many, metadata=md), ["messages"]),
        (
            memory.stub.AppendMessages(
                pb.AppendMessagesRequest(session_id="s", user_id="u1"), metadata=md
            ),
            ["messages"],
        ),
        (
            memory.stub.GetHistory(
                pb.GetHistoryRequest(session_id="s", page_size=501, order=7), metadata=md
            ),
            ["page_size", "order"],
        ),
        (
            memory.stub.Recall(
                pb.RecallRequest(user_id="u1", k=101, query="q" * 3000), metadata=md
            ),
            ["query", "k"],
        ),
        (
            memory.stub.Recall(
                pb.RecallRequest(
                    user_id="u1", k=-1, filter=pb.FactFilter(kinds=["Bad Kind"], tags=[""])
                ),
                metadata=md,
            ),
            ["k", "filter.kinds[0]", "filter.tags[0]"],
        ),
        (
            memory.stub.BuildContext(
                pb.BuildContextRequest(session_id="s", user_id="u1", token_budget=100), metadata=md
            ),
            ["token_budget"],
        ),
        (
            memory.stub.BuildContext(
                pb.BuildContextRequest(
                    session_id="s", user_id="u1", token_budget=200_000, max_facts=51
                ),
                metadata=md,
            ),
            ["token_budget", "max_facts"],
        ),
        (
            memory.stub.Forget(
                pb.ForgetRequest(user_id="u1", fact_ids=["fct_nothex", "msg_1"]), metadata=md
            ),
            ["fact_ids[0]", "fact_ids[1]"],
        ),
        (memory.stub.Forget(pb.ForgetRequest(user_id="u1"), metadata=md), ["fact_ids"]),
        (
            memory.stub.Forget(pb.ForgetRequest(user_id="u1", filter=pb.FactFilter()), metadata=md),
            ["filter"],
        ),
        (
            memory.stub.Remember(
                pb.RememberRequest(
                    user_id="u1",
                    facts=[
                        pb.NewFact(text="ok", importance=1.5, kind="X", tags=["a b"]),
                        pb.NewFact(text="y" * 3000, expire_time={"seconds": 1}),
                    ],
                ),
                metadata=md,
            ),
            [
                "facts[0].kind",
                "facts[0].importance",
                "facts[0].tags[0]",
                "facts[1].text",
                "facts[1].expire_time",
            ],
        ),
        (memory.stub.GetConsent(pb.GetConsentRequest(user_id="x" * 129), metadata=md), ["user_id"]),
        (
            memory.stub.Remember(
                pb.RememberRequest(
                    user_id="u1",
                    facts=[
                        pb.NewFact(text="a", expire_time={"seconds": 253_402_300_800}),
                        pb.NewFact(text="b", expire_time={"seconds": 4_000_000_000, "nanos": -1}),
                    ],
                ),
                metadata=md,
            ),
            ["facts[0].expire_time", "facts[1].expire_time"],
        ),
        (
            memory.stub.Forget(
                pb.ForgetRequest(
                    user_id="u1",
                    filter=pb.FactFilter(
                        created_after={"seconds": -62_135_596_801},
                        created_before={"seconds": 2**55},
                    ),
                ),
                metadata=md,
            ),
            ["filter.created_after", "filter.created_before"],
        ),
        (
            memory.stub.Recall(
                pb.RecallRequest(
                    user_id="u1", query="q", filter=pb.FactFilter(created_after={"seconds": 2**55})
                ),
                metadata=md,
            ),
            ["filter.created_after"],
        ),
    ]
    for call, fields in cases:
        info = await rpc_error(call)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert [v.field for v in info.field_violations] == fields


async def test_invalid_utf8_names_the_field(memory: Memory) -> None:
    good = pb.AppendMessagesRequest(
        session_id="s", user_id="u1", messages=[msg("fine"), msg("BROKEN")]
    ).SerializeToString()
    broken = good.replace(b"BROKEN", b"BR\xff\xfeEN")
    call = memory.channel.unary_unary(
        "/finsight.memory.v1.MemoryService/AppendMessages",
        request_serializer=lambda b: b,
        response_deserializer=pb.AppendMessagesResponse.FromString,
    )
    info = await rpc_error(call(broken, metadata=memory.md()))
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in info.field_violations] == [
        ("messages[1].message.content", "is not valid UTF-8")
    ]
    assert (await counts(memory, "u1"))["messages"] == 0
    garbage = await rpc_error(call(b"\xff\xff\xff", metadata=memory.md()))
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT


def test_utf8_walker_handles_maps_and_nested_messages() -> None:
    data = (
        pb.AppendMessagesRequest(session_id="s", messages=[msg("a", k="VALUE")])
        .SerializeToString()
        .replace(b"VALUE", b"VA\xc3LU")
    )
    assert find_invalid_utf8(pb.AppendMessagesRequest.DESCRIPTOR, data) == (
        "messages[0].metadata.value"
    )
    assert (
        find_invalid_utf8(
            pb.AppendMessagesRequest.DESCRIPTOR,
            pb.AppendMessagesRequest(session_id="é").SerializeToString(),
        )
        is None
    )
