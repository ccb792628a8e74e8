"""Fit a system preamble, recalled facts and recent turns into a token budget.

Tokens are counted with `libs.common.tokens` (DeepSeek's tokenizer and chat template), the
same code the LLM gateway uses, so a context built for budget B is at most B prompt tokens
at the gateway. Layout of the result:

    system     preamble                                   always kept
    system     "Known facts about the user…" + "- fact"   best facts first, at most
                                                          `facts_share` of the budget
    user/assistant/system  recent session turns           newest kept first, oldest dropped
    user       the query                                  always kept (when non-empty)

Only whole messages are dropped. A kept history never starts with an assistant reply
whose question was dropped. CPU-bound (tokenizer): call it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.common import tokens
from services.memory.models import Fact, StoredMessage

FACTS_HEADER = "Known facts about the user (most relevant first):"


@dataclass(frozen=True)
class BuiltContext:
    messages: list[tuple[str, str]]  # (role, content)
    total_tokens: int
    included_fact_ids: list[str]
    omitted_fact_ids: list[str]
    included_sequences: list[int]
    omitted_message_count: int


def facts_message(facts: list[Fact]) -> str:
    return "\n".join([FACTS_HEADER, *(f"- {f.text}" for f in facts)])


def _fit_facts(facts: list[Fact], cap: int) -> list[Fact]:
    """The longest prefix of `facts` whose system message costs at most `cap` tokens."""
    if not facts or cap <= 0:
        return []
    header = tokens.count_text(FACTS_HEADER) + tokens.EXTRA_SYSTEM_OVERHEAD
    line_costs = tokens.count_many([f"\n- {f.text}" for f in facts])
    n, estimate = 0, header
    while n < len(facts) and estimate + line_costs[n] <= cap:
        estimate += line_costs[n]
        n += 1
    # The estimate adds lines tokenised apart; verify exactly and back off if BPE disagrees.
    while (
        n > 0 and tokens.count_text(facts_message(facts[:n])) + tokens.EXTRA_SYSTEM_OVERHEAD > cap
    ):
        n -= 1
    return facts[:n]


def build_context(
    *,
    preamble: str,
    facts: list[Fact],
    history: list[StoredMessage],
    query: str,
    budget: int,
    facts_share: float,
) -> BuiltContext:
    """Raises `tokens.ContextOverflowError` when the preamble and query alone exceed budget."""
    head: list[tuple[str, str]] = [("system", preamble)]
    tail: list[tuple[str, str]] = [("user", query)] if query else []
    fixed = tokens.count_messages(head + tail)
    if fixed > budget:
        raise tokens.ContextOverflowError(fixed, budget)

    chosen = _fit_facts(facts, min(int(budget * facts_share), budget - fixed))
    if chosen:
        head.append(("system", facts_message(chosen)))
    turns = [(m.role, m.content) for m in history]
    costs = tokens.message_costs(head + turns + tail)
    used = (
        tokens.CONVERSATION_OVERHEAD
        + sum(costs[: len(head)])
        + sum(costs[len(head) + len(turns) :])
    )
    turn_costs = costs[len(head) : len(head) + len(turns)]

    start = len(turns)
    while start > 0 and used + turn_costs[start - 1] <= budget:
        start -= 1
        used += turn_costs[start]
    while start < len(turns) and turns[start][0] == "assistant":
        used -= turn_costs[start]  # an answer without its question misleads the model
        start += 1

    messages = head + turns[start:] + tail
    total = tokens.count_messages(messages)
    assert total == used and total <= budget, (total, used, budget)
    return BuiltContext(
        messages=messages,
        total_tokens=total,
        included_fact_ids=[f.fact_id for f in chosen],
        omitted_fact_ids=[f.fact_id for f in facts[len(chosen) :]],
        included_sequences=[m.sequence for m in history[start:]],
        omitted_message_count=start,
    )
