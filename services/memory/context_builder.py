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
whose question was dropped.

Turn costs are counted once, when a message is appended (`turn_costs`, stored with the
message), so fitting a long session adds stored integers: only the preamble, the facts and
the query are tokenized per call (and turns stored before migration 003, which carry no
count). Costs are additive (`libs.common.tokens.message_costs`), so `total_tokens` equals
what `count_messages` of the result gives (the tests check it). The tokenizer is
CPU-bound: call `build_context` off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def turn_costs(turns: Sequence[tuple[str, str]]) -> list[int]:
    """What each (role, content) costs as a turn of a built context, where the preamble is
    always the first system message: `message_costs` behind an empty system message, so a
    system turn pays the "\\n\\n" joiner (EXTRA_SYSTEM_OVERHEAD) exactly as it will there.
    The value stored with each message at append time."""
    if not turns:
        return []
    return tokens.message_costs([("system", ""), *turns])[1:]


def facts_message(facts: list[Fact]) -> str:
    return "\n".join([FACTS_HEADER, *(f"- {f.text}" for f in facts)])


def _fit_facts(facts: list[Fact], cap: int) -> tuple[list[Fact], int]:
    """The longest prefix of `facts` whose system message costs at most `cap` tokens, and
    that cost (0 when no fact fits)."""
    if not facts or cap <= 0:
        return [], 0
    header = tokens.count_text(FACTS_HEADER) + tokens.EXTRA_SYSTEM_OVERHEAD
    line_costs = tokens.count_many([f"\n- {f.text}" for f in facts])
    n, estimate = 0, header
    while n < len(facts) and estimate + line_costs[n] <= cap:
        estimate += line_costs[n]
        n += 1
    # The estimate adds lines tokenised apart; verify exactly and back off if BPE disagrees.
    while n > 0:
        cost = tokens.count_text(facts_message(facts[:n])) + tokens.EXTRA_SYSTEM_OVERHEAD
        if cost <= cap:
            return facts[:n], cost
        n -= 1
    return [], 0


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
    used = tokens.count_messages(head + tail)  # the only tokenization of preamble and query
    if used > budget:
        raise tokens.ContextOverflowError(used, budget)

    chosen, facts_cost = _fit_facts(facts, min(int(budget * facts_share), budget - used))
    if chosen:
        head.append(("system", facts_message(chosen)))
        used += facts_cost
    turns = [(m.role, m.content) for m in history]
    turn_cost = _stored_costs(history)

    start = len(turns)
    while start > 0 and used + turn_cost[start - 1] <= budget:
        start -= 1
        used += turn_cost[start]
    while start < len(turns) and turns[start][0] == "assistant":
        used -= turn_cost[start]  # an answer without its question misleads the model
        start += 1

    return BuiltContext(
        messages=head + turns[start:] + tail,
        total_tokens=used,
        included_fact_ids=[f.fact_id for f in chosen],
        omitted_fact_ids=[f.fact_id for f in facts[len(chosen) :]],
        included_sequences=[m.sequence for m in history[start:]],
        omitted_message_count=start,
    )


def _stored_costs(history: list[StoredMessage]) -> list[int]:
    """Stored turn costs; messages without one (written before migration 003) are counted
    now, in one batch."""
    missing = [i for i, m in enumerate(history) if m.tokens is None]
    counted = dict(
        zip(
            missing,
            turn_costs([(history[i].role, history[i].content) for i in missing]),
            strict=True,
        )
    )
    return [m.tokens if m.tokens is not None else counted[i] for i, m in enumerate(history)]
