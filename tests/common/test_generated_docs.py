"""Generated reference files stay in step with their sources."""

from __future__ import annotations

from pathlib import Path

from libs.common.apidoc import descriptor_set, proto_files, render, undocumented

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_current_and_complete() -> None:
    fds = descriptor_set(proto_files())
    assert (ROOT / "docs" / "api.md").read_text() == render(fds), "run `make docs` and commit"
    assert undocumented(fds) == [], "every RPC and field a caller sees needs a comment"
