"""`finsight complete` (with --schema) and `finsight embed` against the in-process suite (the
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
