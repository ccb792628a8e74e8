"""`finsight complete` (with --schema, with --tools) and `finsight embed` against the in-process suite (the
gateway on the dev provider)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {"ticker": {"type": "string"}, "weight": {"type": "number"}},
    "required": ["ticker", "weight"],
    "additionalProperties": False,
}


async def test_complete_returns_schema_checked_json_repaired_once(
    cli: Any, stack: Any, tmp_path: Path
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    stack.provider.state.script(
        [{"content": '{"ticker": "MSFT"}'}, {"content": '{"ticker": "MSFT", "weight": 0.4}'}]
    )
    prompt = f"Pick one holding {uuid.uuid4().hex[:8]}"
    r = await cli("--json", "complete", prompt, "--schema", str(schema))
    assert r.code == 0, r.err
    data = r.json()
    assert data["value"] == {"ticker": "MSFT", "weight": 0.4}
    assert data["schema_repaired"] is True
    sent = [e for e in stack.provider.state.log if e["path"].endswith("/chat/completions")][-2:]
    assert sent[0]["body"]["response_format"] == {"type": "json_object"}
    assert "weight" in sent[1]["body"]["messages"][-1]["content"]  # the validation error

    stack.provider.state.script([{"content": "plain words"}])
    r = await cli("complete", f"Say hi {uuid.uuid4().hex[:8]}")
    assert r.code == 0, r.err
    assert r.out.strip() == "plain words" and "deepseek-chat" in r.err


async def test_complete_usage_errors(cli: Any, tmp_path: Path) -> None:
    r = await cli("complete", "x", "--schema", str(tmp_path / "missing.json"))
    assert r.code == 2 and "missing.json" in r.err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = await cli("complete", "x", "--schema", str(bad))
    assert r.code == 2 and "not JSON" in r.err
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": "objekt"}')
    r = await cli("complete", f"x {uuid.uuid4().hex[:8]}", "--schema", str(wrong))
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err and "json_schema" in r.err


async def test_complete_with_tools_prints_the_calls_the_model_made(
    cli: Any, stack: Any, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.dumps(
            [
                {
                    "type": "function",
                    "function": {
                        "name": "get_quote",
                        "description": "Last price of a ticker",
                        "parameters": {"type": "object", "properties": {"t": {"type": "string"}}},
                    },
                },
                {"name": "news"},
            ]
        )
    )
    stack.provider.state.script(
        [{"tool_calls": [{"id": "call_q", "name": "get_quote", "arguments": {"t": "MSFT"}}]}]
    )
    r = await cli(
        "complete",
        f"MSFT price {uuid.uuid4().hex[:8]}",
        "--tools",
        str(tools),
        "--tool-choice",
        "get_quote",
    )
    assert r.code == 0, r.err
    assert r.out.strip() == 'tool call call_q: get_quote({"t": "MSFT"})'
    body = [e for e in stack.provider.state.log if e["path"].endswith("/chat/completions")][-1][
        "body"
    ]
    assert [t["function"]["name"] for t in body["tools"]] == ["get_quote", "news"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_quote"}}
    tools.write_text('{"name": "x"}')
    r = await cli("complete", "x", "--tools", str(tools))
    assert r.code == 2 and "JSON list" in r.err


async def test_embed_prints_vectors_from_the_embedding_route(cli: Any) -> None:
    texts = [f"gold coins {uuid.uuid4().hex[:6]}", "bond ladder"]
    r = await cli("--json", "embed", *texts)
    assert r.code == 0, r.err
    data = r.json()
    assert data["model"] == "dev-embed" and data["dimensions"] == 64
    assert len(data["vectors"]) == 2 and all(len(v) == 64 for v in data["vectors"])
    r = await cli("embed", *texts)
    assert r.code == 0, r.err
    assert "2 vector(s) of 64 from dev-embed" in r.out and "from the cache" in r.out
