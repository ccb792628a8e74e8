"""The API key tool (`python -m libs.common.auth new-key`): unique ids, `--json` for
scripts, and `--add-to FILE`, which adds an entry atomically without ever losing one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from libs.common.auth import KeyStore, hash_key, key_entry

ROOT = Path(__file__).resolve().parents[2]


def new_key(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.common.auth", "new-key", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_minted_for_one_caller_in_the_same_second_get_different_ids() -> None:
    ids = {
        str(key_entry("k", caller="alice", tenant="acme", scopes=["*"])["id"]) for _ in range(50)
    }
    assert len(ids) == 50
    assert all(i.startswith("alice-") for i in ids)


def test_json_output_is_one_machine_readable_object_and_nothing_else() -> None:
    result = new_key(
        "--caller", "alice", "--tenant", "acme", "--scopes", "memory,analytics", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # the whole of stdout, no prose around it
    assert set(out) == {"key", "entry", "added_to"} and out["added_to"] is None
    assert out["key"].startswith("fsk_")
    assert out["entry"]["sha256"] == hash_key(out["key"])
    assert out["entry"]["scopes"] == ["memory", "analytics"]
    assert out["entry"]["caller"] == "alice" and out["entry"]["tenant"] == "acme"


def test_add_to_creates_the_file_then_adds_without_losing_entries(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys" / "api-keys.json"
    first = new_key("--caller", "alice", "--tenant", "acme", "--add-to", str(keys_file), "--json")
    second = new_key("--caller", "alice", "--tenant", "acme", "--add-to", str(keys_file))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    key1 = json.loads(first.stdout)["key"]
    assert json.loads(first.stdout)["added_to"] == str(keys_file)
    key2 = second.stdout.split("store nowhere else): ", 1)[1].split()[0]
    assert "added to" in second.stdout
    store = KeyStore(keys_file)  # what the services read
    one, two = store.authenticate(key1), store.authenticate(key2)
    assert one.caller == two.caller == "alice" and one.key_id != two.key_id
    assert os.listdir(keys_file.parent) == ["api-keys.json"]  # no temporary file left
    assert (keys_file.stat().st_mode & 0o777) == 0o600


def test_add_to_keeps_the_entries_of_concurrent_adds(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    keys_file.write_text(
        json.dumps({"keys": [key_entry("old", caller="x", tenant="t", scopes=[])]})
    )
    args = ("--caller", "bob", "--tenant", "globex", "--add-to", str(keys_file), "--json")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: new_key(*args), range(8)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    store = KeyStore(keys_file)
    for result in results:
        assert store.authenticate(json.loads(result.stdout)["key"]).caller == "bob"
    assert len(json.loads(keys_file.read_text())["keys"]) == 9  # the old one too


def test_add_to_refuses_a_malformed_file_and_leaves_it_alone(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    for content, problem in (
        ('{"keys": [', "is not valid JSON"),
        ('{"key": []}', "must be an object with a 'keys' list"),
        ('{"keys": [{"caller": "a"}]}', "has an invalid entry"),
    ):
        keys_file.write_text(content)
        result = new_key("--caller", "a", "--tenant", "t", "--add-to", str(keys_file), "--json")
        assert result.returncode == 1
        assert result.stdout == ""  # no key printed that no file holds
        assert problem in result.stderr and str(keys_file) in result.stderr
        assert "nothing was changed" in result.stderr and "Traceback" not in result.stderr
        assert keys_file.read_text() == content
