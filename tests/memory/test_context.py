"""BuildContext: preamble + recalled facts + recent turns + query, within the token budget,
counted as the gateway counts them (libs.common.tokens)."""

from __future__ import annotations

import grpc

from finsight.memory.v1 import memory_pb2 as pb
from libs.common import tokens
from services.memory.context_builder import FACTS_HEADER
from tests.memory.conftest import Memory, msg, rpc_error

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
        assert pairs[0] == ("system", memory.app.manager.settings.memory_system_preamble)
        assert pairs[-1] == ("user", query)
        assert pairs[1][0] == "system" and pairs[1][1].startswith(FACTS_HEADER)
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
    assert as_pairs(fresh)[0] == ("system", "Be brief.")
    assert len(fresh.included_fact_ids) == 1 and list(fresh.included_sequences) == []
    # An empty query recalls by recency and importance: the most important fact first.
    no_query = await memory.stub.BuildContext(
        pb.BuildContextRequest(session_id="c", user_id="u1", token_budget=4000), metadata=md
    )
    assert no_query.included_fact_ids[0] == facts.facts[0].fact_id
    assert len(no_query.included_fact_ids) == 3
    assert as_pairs(no_query)[-1][0] == "assistant"  # no query message appended
