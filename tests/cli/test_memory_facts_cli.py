"""`finsight memory consent / facts` and chat's `/facts`, against the real services; the
history layout (superseded facts under the fact that replaced them) on hand-built facts,
since the stack's memory service extracts nothing (no tenant opted in) and Remember never
supersedes."""

from __future__ import annotations

import io
import re
import sys
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.cli.memory_cmds import fact_rows, facts_summary, facts_table, show_facts
from tests.cli.conftest import Stack


def words(text: str) -> str:
    """The text with table borders and runs of spaces as single spaces."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


async def memory_call(stack: Stack, method: str, request: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['memory']}") as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        return await getattr(stub, method)(
            request, metadata=(("authorization", f"Bearer {stack.keys.admin}"),), timeout=10
        )


async def exported(stack: Stack, user: str) -> list[pb.ExportUserDataResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['memory']}") as channel:
        call = memory_pb2_grpc.MemoryServiceStub(channel).ExportUserData(
            pb.ExportUserDataRequest(user_id=user),
            metadata=(("authorization", f"Bearer {stack.keys.admin}"),),
            timeout=10,
        )
        return [item async for item in call]


async def remember(stack: Stack, user: str, *facts: pb.NewFact) -> list[str]:
    reply = await memory_call(stack, "Remember", pb.RememberRequest(user_id=user, facts=facts))
    return [f.fact_id for f in reply.facts]


async def test_consent_show_set_and_usage_errors(cli: Any, stack: Stack) -> None:
    r = await cli("--json", "memory", "consent", "con-1")
    assert r.code == 0, r.err
    assert r.json() == {
        "user_id": "con-1",
        "long_term_memory": False,
        "update_time": None,
        "updated_by": "",
        "fact_extraction": False,
    }
    r = await cli("memory", "consent", "con-1")
    assert r.code == 0, r.err
    text = words(r.out)
    assert "Consent of con-1" in text and "never set (no consent)" in text
    assert "long-term memory off" in text and "fact extraction off" in text

    # Extraction without long-term memory: the service would ignore it, so it is refused.
    for flags in (("--fact-extraction", "on"), ("--long-term-memory", "off", "--fact-extraction", "on")):  # fmt: skip
        r = await cli("memory", "consent", "con-1", *flags)
        assert r.code == 2 and "needs long-term memory" in r.err, r.err
        assert "--long-term-memory on --fact-extraction on" in words(r.err)
    r = await cli("--json", "memory", "consent", "con-1", "--fact-extraction", "on")
    assert r.code == 2 and r.json()["error"]["code"] == "USAGE"
    assert (await cli("--json", "memory", "consent", "con-1")).json()["update_time"] is None
    r = await cli("memory", "consent", "con-1", "--long-term-memory", "maybe")
    assert r.code == 2 and "invalid choice" in r.err

    r = await cli("--json", "memory", "consent", "con-1", "--long-term-memory", "on")
    assert r.code == 0, r.err
    data = r.json()
    assert (data["long_term_memory"], data["fact_extraction"]) == (True, False)
    assert data["updated_by"] == "cli-admin" and data["update_time"] and data["facts_deleted"] == 0
    # A flag left out keeps its value: long-term memory stays on.
    r = await cli("--json", "memory", "consent", "con-1", "--fact-extraction", "on")
    assert r.code == 0, r.err
    assert (r.json()["long_term_memory"], r.json()["fact_extraction"]) == (True, True)
    r = await cli("memory", "consent", "con-1")
    text = words(r.out)
    assert "long-term memory on" in text and "fact extraction on" in text
    assert "changed by cli-admin" in text and "never set" not in text

    # Withdrawing long-term memory deletes the facts, and says how many.
    await remember(
        stack, "con-1", pb.NewFact(text="Prefers ETFs"), pb.NewFact(text="Lives in Oslo")
    )
    r = await cli("memory", "consent", "con-1", "--long-term-memory", "off")
    assert r.code == 0, r.err
    text = words(r.out)
    assert "long-term memory off" in text and "fact extraction off" in text
    assert "facts deleted 2" in text
    assert "long-term memory withdrawn: 2 fact(s) of con-1 deleted" in words(r.err)
    r = await cli("--json", "memory", "facts", "con-1")
    assert r.code == 0 and r.json() == []

    r = await cli("memory", "consent", "bad user!")
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err and "user_id" in r.err


async def test_facts_lists_remembered_facts(cli: Any, stack: Stack) -> None:
    r = await cli("memory", "facts", "fac-1")
    assert r.code == 0, r.err
    assert "fac-1: no facts yet" in r.out
    r = await cli("--json", "memory", "facts", "fac-1", "--history")
    assert r.code == 0 and r.json() == []

    await cli("memory", "consent", "fac-1", "--long-term-memory", "on")
    first = await remember(
        stack,
        "fac-1",
        pb.NewFact(text="Prefers dividend stocks", kind="preference", source_session_id="fac-s1"),
    )
    second = await remember(stack, "fac-1", pb.NewFact(text="Holds CLIX since 2023"))
    # Messages of the user are no facts: ListFacts never returns them.
    await memory_call(
        stack,
        "AppendMessages",
        pb.AppendMessagesRequest(
            session_id="fac-s1",
            user_id="fac-1",
            messages=[
                pb.NewMessage(
                    message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hello")
                )
            ],
        ),
    )

    r = await cli("memory", "facts", "fac-1")
    assert r.code == 0, r.err
    for cell in ("Facts about fac-1", "id", "text", "kind", "origin", "since", "session",
                 *first, *second, "Prefers dividend stocks", "Holds CLIX since 2023",
                 "preference", "general", "remembered", "fac-s1", "2 current"):  # fmt: skip
        assert cell in r.out, cell
    assert r.out.index("Prefers dividend stocks") < r.out.index("Holds CLIX")  # by valid_from
    assert "until" not in r.out and "replaced by" not in r.out

    r = await cli("--json", "memory", "facts", "fac-1")
    assert r.code == 0, r.err
    listed = r.json()
    assert [f["fact_id"] for f in listed] == first + second
    assert {f["origin"] for f in listed} == {"FACT_ORIGIN_REMEMBERED"}
    assert all(f["valid_from"] and f["valid_to"] is None for f in listed)

    r = await cli("--json", "memory", "facts", "fac-1", "--kind", "preference")
    assert [f["fact_id"] for f in r.json()] == first
    r = await cli("memory", "facts", "fac-1", "--kind", "nosuchkind")
    assert r.code == 0 and "fac-1: no facts of kind nosuchkind yet" in r.out

    r = await cli("memory", "facts", "fac-1", "--history")
    assert r.code == 0, r.err
    for cell in ("(with history)", "until", "replaced by", "current", "2 current, 0 superseded"):
        assert cell in r.out, cell

    r = await cli("memory", "facts", "bad user!")
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err

    # Listing facts is a read (ListFacts), never an export of the user's data.
    items = await exported(stack, "fac-1")
    rpcs = [item.audit_entry.rpc for item in items if item.HasField("audit_entry")]
    assert rpcs.count("ExportUserData") == 1 and "ListFacts" in rpcs  # this export only


async def test_chat_facts_command(cli: Any, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    await cli("memory", "consent", "chat-f1", "--long-term-memory", "on")
    [fact_id] = await remember(stack, "chat-f1", pb.NewFact(text="Retires in 2040", kind="goal"))
    script = "/facts\n/facts all\n/facts nonsense\n/symbols CLIX\nHow volatile?\nexit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    r = await cli("chat", "--user", "chat-f1", "--session", "chat-fs1")
    assert r.code == 0, r.err
    err = r.err
    assert err.count("Retires in 2040") == 2 and fact_id in err
    assert "1 current, 0 superseded" in err and "replaced by" in err  # /facts all
    assert "/facts all" in err  # /facts nonsense: the help, which names the command
    assert "Retires in 2040" not in r.out and "How volatile?" in r.out  # stdout: the answers

    monkeypatch.setattr(sys, "stdin", io.StringIO("/facts\n"))
    r = await cli("chat", "--user", "chat-f2")
    assert r.code == 0 and "chat-f2: no facts yet" in r.err


# -- history layout, on hand-built facts -----------------------------------------------------
def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=1_767_225_600 + seconds)  # from 2026-01-01 00:00:00 UTC


def fact(fact_id: str, text: str, since: int, until: int | None = None, by: str = "") -> pb.Fact:
    f = pb.Fact(
        fact_id=fact_id,
        user_id="u",
        text=text,
        kind="general",
        origin=pb.FACT_ORIGIN_EXTRACTED if by or until else pb.FACT_ORIGIN_REMEMBERED,
        create_time=ts(since),
        valid_from=ts(since),
        superseded_by=by,
        source_session_id="s1",
    )
    if until is not None:
        f.valid_to.CopyFrom(ts(until))
    return f


HISTORY = [
    fact("fct_d", "Risk: high", 50),
    fact("fct_b", "Lives in Bergen", 20, until=40, by="fct_c"),
    fact("fct_a", "Lives in Oslo", 0, until=20, by="fct_b"),
    fact("fct_c", "Lives in Tromsø", 40),
    fact("fct_x", "Owns a boat", 5, until=30, by="fct_gone"),  # its successor was forgotten
    fact("fct_a2", "Lives in Oslo (flat)", 10, until=35, by="fct_c"),
]


def rendered(*renderables: Any) -> str:
    console = Console(record=True, width=200, color_system=None)
    for r in renderables:
        console.print(r)
    return console.export_text()


def test_fact_rows_group_history_under_the_fact_that_replaced_it() -> None:
    assert [(f.fact_id, d) for f, d in fact_rows(HISTORY, history=False)] == [
        ("fct_c", 0),
        ("fct_d", 0),
    ]
    assert [(f.fact_id, d) for f, d in fact_rows(HISTORY, history=True)] == [
        ("fct_c", 0),
        ("fct_b", 1),  # replaced last (valid_to 40) first
        ("fct_a", 2),  # which fct_b had replaced
        ("fct_a2", 1),
        ("fct_d", 0),
        ("fct_x", 0),  # successor gone: after the current facts
    ]
    assert facts_summary(HISTORY) == "2 current, 4 superseded"


def test_history_table_shows_until_and_replaced_by() -> None:
    text = rendered(facts_table("u", fact_rows(HISTORY, history=True), history=True))
    lines = text.splitlines()
    assert "Facts about u (with history)" in text and "2 current, 4 superseded" in text
    assert "until" in text and "replaced by" in text
    row = {name: next(line for line in lines if name in line) for name in ("Tromsø", "Bergen", "Oslo ", "boat")}  # fmt: skip
    assert "current" in row["Tromsø"] and "remembered" in row["Tromsø"]
    assert "↳ Lives in Bergen" in row["Bergen"] and "fct_c" in row["Bergen"]
    assert "2026-01-01 00:00:20" in row["Bergen"] and "2026-01-01 00:00:40" in row["Bergen"]
    assert "  ↳ Lives in Oslo" in row["Oslo "] and "extracted" in row["Oslo "]
    assert "fct_gone" in row["boat"] and "↳" not in row["boat"]
    assert text.index("Tromsø") < text.index("Bergen") < text.index("Oslo ") < text.index("Risk")

    plain_table = rendered(facts_table("u", fact_rows(HISTORY, history=False), history=False))
    assert "Bergen" not in plain_table and "until" not in plain_table
    assert "2 current" in plain_table


def test_show_facts_when_only_superseded_facts_are_left() -> None:
    old = [fact("fct_x", "Owns a boat", 5, until=30, by="fct_gone")]
    console = Console(record=True, width=200, color_system=None)
    show_facts(console, "u", old, history=False)
    assert "u: no facts yet (1 superseded: --history lists them)" in console.export_text()
    show_facts(console, "u", old, history=True)
    assert "Owns a boat" in console.export_text()


async def test_extraction_status(cli: Any, stack: Stack) -> None:
    await cli("memory", "consent", "ext-1", "--long-term-memory", "on", "--fact-extraction", "on")
    await memory_call(
        stack,
        "AppendMessages",
        pb.AppendMessagesRequest(
            session_id="ext-s1",
            user_id="ext-1",
            messages=[
                pb.NewMessage(
                    message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="I hold gold")
                ),
                pb.NewMessage(
                    message=common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="Ok")
                ),
            ],
        ),
    )
    r = await cli("--json", "memory", "extraction", "ext-1")
    assert r.code == 0, r.err
    data = r.json()
    assert data["user_id"] == "ext-1" and data["user_consented"] is True
    assert data["tenant_enabled"] is False  # the stack's memory opts no tenant in
    assert (data["messages_pending"], data["messages_extracted"]) == (1, 0)  # user turns only
    assert data["last_extraction_time"] is None and data["replica_queue_depth"] == 0
    r = await cli("memory", "extraction", "ext-1")
    text = words(r.out)
    assert "Fact extraction for ext-1" in text and "tenant opted in no" in text
    assert "user consented yes" in text and "turns pending 1" in text
    assert "last extraction never" in text and "needs the tenant's opt-in" in text
    r = await cli("memory", "extraction", "bad user!")
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err
