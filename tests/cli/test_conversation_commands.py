"""`finsight analyze / chat / usage / memory / health` against the real services."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Stack


async def total_cost(cli: Any) -> float:
    r = await cli("--json", "usage")
    assert r.code == 0, r.err
    return float(r.json()["total_cost"]["amount"])


async def export_lines(cli: Any, user: str) -> list[dict[str, Any]]:
    r = await cli("memory", "export", user)
    assert r.code == 0, r.err
    return [json.loads(line) for line in r.out.splitlines()]


async def test_health_json(cli: Any) -> None:
    r = await cli("--json", "health")
    assert r.code == 0, r.err
    rows = r.json()
    assert {row["service"] for row in rows} == {"llm_gateway", "memory", "analytics"}
    assert all(row["status"] == "SERVING" for row in rows)


async def test_analyze_shows_answer_source_tokens_and_cost(cli: Any) -> None:
    before = await total_cost(cli)
    r = await cli(
        "--json", "analyze", "CLIX", "CLIY", "Which one is riskier?",
        "--user", "ana-1", "--session", "ana-s1",
    )  # fmt: skip
    assert r.code == 0, r.err
    data = r.json()
    assert data["commentary_source"] == "COMMENTARY_SOURCE_LLM"
    # The dev provider echoes the last user message: the question, fenced as data.
    assert data["narrative"].startswith("echo: ") and "Which one is riskier?" in data["narrative"]
    assert data["model"] == "deepseek-chat"
    assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] > 0
    assert [m["symbol"] for m in data["metrics"]] == ["CLIX", "CLIY"]
    assert (data["session_id"], data["user_id"]) == ("ana-s1", "ana-1")
    # The cost shown is what the gateway billed: it is what its usage ledger recorded.
    after = await total_cost(cli)
    assert data["cost_usd"] > 0
    assert data["cost_usd"] == pytest.approx(after - before, abs=2e-9)

    r = await cli("analyze", "CLIZ", "And this one?", "--user", "ana-1", "--session", "ana-s1")
    assert r.code == 0, r.err
    for cell in ("Answer", "And this one?", "LLM", "deepseek-chat", "cost",
                 "prompt +", "ana-s1 / ana-1", "Metrics used", "CLIZ", "window",
                 "all data", "figures", "no figures to check"):  # fmt: skip
        assert cell in r.out
    lines = await export_lines(cli, "ana-1")
    messages = [x["message"] for x in lines if x["type"] == "message"]
    assert [m["sequence"] for m in messages] == [1, 2, 3, 4]
    assert {m["session_id"] for m in messages} == {"ana-s1"}


async def test_analyze_rule_based_answer_when_the_llm_fails(cli: Any, stack: Stack) -> None:
    # One provider answer that is a client error (400): not retried, no breaker trip.
    stack.provider.state.script([{"status": 400}])
    try:
        r = await cli("analyze", "CLIX", "How did it do?", "--user", "ana-2")
    finally:
        stack.provider.state.reset()
    assert r.code == 0, r.err
    assert "RULES" in r.out and "rule-based answer" in r.out
    assert "checked against the computed metrics" in r.out  # the rules' figures verify
    assert "warning" in r.out and "llm" in r.out.lower()
    assert "$0.000000" in r.out  # no model was paid for


async def test_analyze_says_in_plain_words_what_grounding_and_redaction_found(
    cli: Any, stack: Stack
) -> None:
    stack.provider.state.script(
        [{"content": "CLIX returned +987.6% in total; I mailed [EMAIL_1] about it."}]
    )
    try:
        r = await cli(
            "analyze", "CLIX", "How did it do? Reply to ana@example.com", "--user", "ana-4"
        )
    finally:
        stack.provider.state.reset()
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "+987.6% [unverified]" in text
    assert "1 of 1 did not match the computed metrics" in text
    assert "“+987.6%”: does not match the return computed" in text
    assert "kept from the model: 1 email" in text
    assert "ana@example.com" in text  # restored in the answer for the caller


async def test_analyze_errors(cli: Any) -> None:
    r = await cli("analyze", "What about nothing?")
    assert r.code == 2 and "symbols" in r.err
    r = await cli("analyze", "NOSUCH", "Why?", "--user", "ana-3")
    assert r.code == 1 and "NOT_FOUND" in r.err and "NOSUCH" in r.err
    assert "Traceback" not in r.err
    r = await cli("--json", "analyze", "CLIX", "Bad user?", "--user", "bad user!")
    error = r.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == ["user_id"]


async def test_chat_keeps_one_session(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    script = "\n".join(
        [
            "What is this?",  # no symbols yet: told how to set them, nothing asked
            "/symbols CLIX CLIY",
            "Which is riskier?",
            "",
            "/symbols NOSUCH",
            "And now?",  # fails in plain words; the chat goes on
            "/symbols CLIZ",
            "/benchmark CLIBM",
            "Beta?",
            "exit",
            "never read",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    r = await cli("--json", "chat", "--user", "chat-1")
    assert r.code == 1  # one turn failed
    turns = [json.loads(line) for line in r.out.splitlines()]
    assert len(turns) == 3
    first, failed, last = turns
    assert "Which is riskier?" in first["narrative"]
    assert failed["error"]["code"] == "NOT_FOUND"
    assert "Beta?" in last["narrative"]
    assert last["metrics"][0]["relative"]["benchmark"] == "CLIBM"
    assert first["session_id"] == last["session_id"] and first["session_id"].startswith("cli-")
    assert "no symbols yet" in r.err and "Traceback" not in r.err

    lines = await export_lines(cli, "chat-1")
    messages = [x["message"] for x in lines if x["type"] == "message"]
    contents = [m["message"]["content"] for m in messages]
    assert contents[0::2] == ["Which is riskier?", "Beta?"]
    assert ["Which is riskier?" in contents[1], "Beta?" in contents[3]] == [True, True]
    assert {m["session_id"] for m in messages} == {first["session_id"]}


async def test_chat_symbols_option_and_end_of_input(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("How volatile?\n"))  # EOF ends the chat
    r = await cli("chat", "--symbols", "CLIX", "--user", "chat-2", "--session", "chat-s2")
    assert r.code == 0, r.err
    assert "How volatile?" in r.out and "chat-s2 / chat-2" in r.out
    assert "bye (session chat-s2)" in r.err


async def test_usage_table_and_range_errors(cli: Any) -> None:
    await cli("analyze", "CLIX", "Count me", "--user", "use-1")
    r = await cli("--json", "usage")
    data = r.json()
    assert data["total_requests"] >= 1
    assert {row["model"] for row in data["rows"]} == {"deepseek-chat"}
    assert data["daily_budget"]["amount"] == pytest.approx(5.0)
    assert 0 < data["remaining_budget_today"]["amount"] < 5.0

    r = await cli("usage")
    assert r.code == 0, r.err
    for cell in ("LLM usage", "deepseek-chat", "total", "daily budget $5.00", "remaining today"):
        assert cell in r.out
    # A range without calls says so, with the total row (zero) still there.
    r = await cli("usage", "--from", "2021-01-01", "--to", "2021-01-31")
    assert r.code == 0, r.err
    assert "no usage yet in this range" in r.out and "total" in r.out and "$0.000000" in r.out

    r = await cli("usage", "--from", "2020-01-01", "--to", "2022-01-01")  # > 366 days
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err and "- range" in r.err


async def test_memory_export_and_erase(cli: Any, tmp_path: Path) -> None:
    await cli("analyze", "CLIX", "Remember this", "--user", "mem-1", "--session", "mem-s1")
    out = tmp_path / "export.jsonl"
    r = await cli("--json", "memory", "export", "mem-1", "--out", str(out))
    assert r.code == 0, r.err
    assert r.json()["message"] == 2 and r.json()["consent"] == 1
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert items[0]["type"] == "consent"
    question, answer = [x["message"]["message"]["content"] for x in items if x["type"] == "message"]
    assert question == "Remember this" and answer.startswith("echo: ") and question in answer
    assert list(tmp_path.iterdir()) == [out]  # no partial file left

    r = await cli("memory", "erase", "mem-1")
    assert r.code == 2 and "--yes" in r.err
    assert len([x for x in await export_lines(cli, "mem-1") if x["type"] == "message"]) == 2

    r = await cli("--json", "memory", "erase", "mem-1", "--yes")
    assert r.code == 0, r.err
    assert (r.json()["messages_deleted"], r.json()["sessions_deleted"]) == (2, 1)
    assert not [x for x in await export_lines(cli, "mem-1") if x["type"] == "message"]

    r = await cli("memory", "erase", "bad user!", "--yes")
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err and "user_id" in r.err
