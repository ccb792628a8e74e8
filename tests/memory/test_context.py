"""BuildContext: preamble + recalled facts + recent turns + query, within the token budget,
counted as the gateway counts them (libs.common.tokens); everything but the preamble fenced
as data (libs.common.untrusted)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from finsight.memory.v1 import memory_pb2 as pb
from libs.common import tokens
from libs.common.untrusted import fence, fence_open
from services.memory.context_builder import (
    FACTS_HEADER,
    FACTS_LABEL,
    TURN_LABELS,
    render_query,
    system_prompt,
)
from tests.memory.conftest import Memory, msg, rpc_error, sql

ROLE = {1: "system", 2: "user", 3: "assistant"}


def as_pairs(reply: pb.BuildContextResponse) -> list[tuple[str, str]]:
    return [(ROLE[m.role], m.content) for m in reply.messages]


async def test_context_fits_the_budget_and_reports_what_was_left_out(memory: Memory) -> None:
    md = memory.md()
    await memory.stub.SetConsent(
        pb.SetConsentRequest(user_id="u1", long_term_memory=True), metadata=md
    )
    facts = await memory.stub.Remember(
        pb.RememberRequest(
            user_id="u1",
            facts=[
                pb.NewFact(text="Holds 120 shares of MSFT bought in 2021", importance=0.9),
                pb.NewFact(text="Prefers low-volatility dividend portfolios"),
                pb.NewFact(text="Dislikes crypto"),
            ],
        ),
        metadata=md,
    )
    for turn in range(40):
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id="c",
                user_id="u1",
                messages=[
                    msg(f"Question {turn}: how did the portfolio do on day {turn}? " * 3),
                    msg(
                        f"Answer {turn}: it moved by {turn / 10:.1f}% with low volatility. " * 3,
                        role=3,
                    ),
                ],
            ),
            metadata=md,
        )

    query = "Should I add more MSFT shares?"
    big = await memory.stub.BuildContext(
        pb.BuildContextRequest(session_id="c", user_id="u1", query=query, token_budget=100_000),
        metadata=md,
    )
    assert big.omitted_message_count == 0 and list(big.included_sequences) == list(range(1, 81))
    # Only facts sharing a term with the query are recalled: the MSFT one.
    assert list(big.included_fact_ids) == [facts.facts[0].fact_id]

    for budget in (400, 1000, 2500):
        reply = await memory.stub.BuildContext(
            pb.BuildContextRequest(session_id="c", user_id="u1", query=query, token_budget=budget),
            metadata=md,
        )
        pairs = as_pairs(reply)
        assert reply.total_tokens == tokens.count_messages(pairs) <= budget
        preamble = memory.app.manager.settings.memory_system_preamble
        assert pairs[0] == ("system", system_prompt(preamble))
        assert pairs[-1] == render_query(query)
        assert pairs[1][0] == "user" and pairs[1][1].startswith(fence_open(FACTS_LABEL))
        assert FACTS_HEADER in pairs[1][1]
        assert [role for role, _ in pairs].count("system") == 1
        seqs = list(reply.included_sequences)
        # The newest turns are kept, contiguous up to the last one, starting with a question.
        assert seqs == list(range(81 - len(seqs), 81))
        assert seqs[0] % 2 == 1
        assert reply.omitted_message_count == 80 - len(seqs)
        assert len(reply.included_fact_ids) + len(reply.omitted_fact_ids) == 1
        # One more turn would not have fitted.
        assert budget - reply.total_tokens < 2 * 60 or reply.omitted_message_count == 0

    tiny = await rpc_error(
        memory.stub.BuildContext(
            pb.BuildContextRequest(
                session_id="c", user_id="u1", query="word " * 400, token_budget=256
            ),
            metadata=md,
        )
    )
    assert tiny.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in tiny.field_violations] == ["token_budget"]

    other = await rpc_error(
        memory.stub.BuildContext(
            pb.BuildContextRequest(session_id="c", user_id="someone-else", token_budget=1000),
            metadata=md,
        )
    )
    assert other.code == grpc.StatusCode.NOT_FOUND

    fresh = await memory.stub.BuildContext(
        pb.BuildContextRequest(
            session_id="new-session",
            user_id="u1",
            query=query,
            token_budget=1000,
            system_preamble="Be brief.",
            max_facts=1,
        ),
        metadata=md,
    )
    assert as_pairs(fresh)[0] == ("system", system_prompt("Be brief."))
    assert len(fresh.included_fact_ids) == 1 and list(fresh.included_sequences) == []
    # An empty query recalls by recency and importance: the most important fact first.
    no_query = await memory.stub.BuildContext(
        pb.BuildContextRequest(session_id="c", user_id="u1", token_budget=4000), metadata=md
    )
    assert no_query.included_fact_ids[0] == facts.facts[0].fact_id
    assert len(no_query.included_fact_ids) == 3
    assert as_pairs(no_query)[-1][0] == "assistant"  # no query message appended


def gateway_cost(role: str, content: str) -> int:
    """A turn's cost written out from the DeepSeek template rules (libs/common/tokens.py
    docstring), not through the memory service's helper: content tokens (an assistant's
    reasoning before </think> is not sent) + role markers + the "\\n\\n" joiner a system
    message pays when it is not the prompt's first (BuildContext's preamble always is)."""
    if role == "assistant" and "</think>" in content:
        content = content.rsplit("</think>", 1)[1]
    overhead = {"system": tokens.EXTRA_SYSTEM_OVERHEAD, "user": 1, "assistant": 2}[role]
    return tokens.count_text(content) + overhead


def rendered(role: str, content: str) -> tuple[str, str]:
    """A stored turn as docs/memory.md says BuildContext sends it: user and system turns as
    fenced user data, assistant turns as they are."""
    if role == "assistant":
        return role, content
    return "user", fence(TURN_LABELS[role], content)


TURNS = [
    (2, "user", "Wie hat sich mein Portfolio entwickelt? 📈 Zeig mir die Zahlen."),
    (3, "assistant", "<think>Check the ledger first.</think>It rose 2.4% this week."),
    (1, "system", "The user switched to the EUR account."),
    (2, "user", "And in EUR?"),
    (3, "assistant", "About 2.1% — the dollar weakened. " * 20),
]


async def test_token_costs_are_counted_once_and_stored(memory: Memory) -> None:
    md = memory.md()
    await memory.stub.AppendMessages(
        pb.AppendMessagesRequest(
            session_id="tok",
            user_id="u1",
            messages=[msg(content, role=role) for role, _, content in TURNS],
        ),
        metadata=md,
    )
    stored = await sql(
        memory,
        "SELECT role, content, context_tokens FROM messages WHERE session_id = 'tok' ORDER BY seq",
    )
    assert [(r, c) for r, c, _ in stored] == [(r, c) for _, r, c in TURNS]
    assert [n for _, _, n in stored] == [gateway_cost(*rendered(r, c)) for _, r, c in TURNS]
    window = await memory.app.hot.window_of("acme", "tok")  # the Redis copy carries them too
    assert window is not None
    assert [m.tokens for m in window.messages] == [n for _, _, n in stored]


async def test_fitting_with_stored_and_legacy_counts_is_exact(memory: Memory) -> None:
    """`total_tokens` equals what the gateway counts for the returned messages, whether the
    turns carry stored counts or were written before migration 004 (NULL: counted when
    read), and both give the same context."""
    md = memory.md()
    for _ in range(6):
        await memory.stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id="fit",
                user_id="u1",
                messages=[msg(content, role=role) for role, _, content in TURNS],
            ),
            metadata=md,
        )
    query = "Summarise my EUR performance"

    async def build(budget: int) -> pb.BuildContextResponse:
        return await memory.stub.BuildContext(
            pb.BuildContextRequest(
                session_id="fit", user_id="u1", query=query, token_budget=budget
            ),
            metadata=md,
        )

    budgets = (300, 700, 1500, 5000)
    stored = {b: await build(b) for b in budgets}
    for budget, reply in stored.items():
        pairs = as_pairs(reply)
        assert reply.total_tokens == tokens.count_messages(pairs) <= budget
        assert reply.omitted_message_count + len(reply.included_sequences) == 30
    assert stored[5000].omitted_message_count == 0 and stored[300].omitted_message_count > 0

    await sql(memory, "UPDATE messages SET context_tokens = NULL WHERE seq % 2 = 0", write=True)
    await memory.app.hot.invalidate([("acme", "fit")])  # read the legacy rows from the database
    for budget in budgets:
        legacy = await build(budget)
        assert legacy.total_tokens == stored[budget].total_tokens
        assert as_pairs(legacy) == as_pairs(stored[budget])


async def test_concurrent_appends_share_tokenizer_calls_and_get_their_own_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.memory import token_counter
    from services.memory.context_builder import turn_costs
    from services.memory.token_counter import INLINE_CHARS, TokenCounter

    calls: list[int] = []

    def counting(turns: list[tuple[str, str]]) -> list[int]:
        calls.append(len(turns))
        return turn_costs(turns)

    monkeypatch.setattr(token_counter, "turn_costs", counting)
    counter = TokenCounter()
    counter.start()
    try:
        groups = [
            [(role, f"{content} #{i}" * (1 + i % 3)) for _, role, content in TURNS[: 1 + i % 5]]
            for i in range(24)
        ]
        groups.append([("user", "x" * (INLINE_CHARS + 1))])  # a big one: counted on a thread
        got = await asyncio.gather(*(counter.costs(g) for g in groups))
        assert got == [turn_costs(g) for g in groups]
        assert len(calls) < len(groups) and sum(calls) == sum(len(g) for g in groups)
    finally:
        await counter.close()
    assert await counter.costs([("user", "after close")]) == turn_costs([("user", "after close")])
