"""The API key tool: mint a key and its keys-file entry, optionally adding it to a file.

    python -m libs.common.auth new-key --caller NAME --tenant T --scopes a,b
        [--not-after 2027-06-01T00:00:00Z] [--add-to var/api-keys.json] [--json]

The key is printed once and stored nowhere; the entry holds only its SHA-256. `--add-to`
adds the entry to a keys file atomically (a temporary file in the same directory, then
`os.replace`, under an exclusive lock on the directory, so concurrent adds never lose one
another's entries); a missing file is created, a malformed one is refused untouched.
`--json` prints one JSON object and nothing else on stdout.

`put_entry` is the same update for the devstack: it adds or refreshes one entry by id and
keeps every other entry of the file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from libs.common.auth import key_entry, new_key, parse_keys

Entries = list[dict[str, Any]]


class KeysFileError(ValueError):
    """The keys file cannot be read or would not stay valid."""


@contextlib.contextmanager
def _directory_lock(folder: Path) -> Iterator[None]:
    # The directory, not the file: os.replace swaps the file's inode under a file lock.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_entries(path: Path) -> Entries:
    """The entries of a keys file ([] when it does not exist); KeysFileError if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeysFileError(f"keys file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError(f"keys file {path} must be an object with a 'keys' list")
    try:
        parse_keys(data)
    except ValueError as exc:
        raise KeysFileError(f"keys file {path} has an invalid entry: {exc}") from exc
    return list(data["keys"])


def update_keys_file(path: Path, change: Callable[[Entries], Entries]) -> bool:
    """Apply `change` to the file's entries and write the result atomically; False when
    nothing changed (the file is then not rewritten, so services do not reload it)."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent):
        before = read_entries(path)
        after = change([dict(e) for e in before])
        if after == before and path.exists():
            return False
        parse_keys({"keys": after})  # never write a file the services would refuse
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(json.dumps({"keys": after}, indent=2) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True


def add_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add a new entry; KeysFileError if its id or key hash is already in the file."""

    def change(entries: Entries) -> Entries:
        for other in entries:
            if other.get("id") == entry["id"]:
                raise KeysFileError(
                    f"keys file {path} already has an entry with id {entry['id']!r}"
                )
            if str(other.get("sha256", "")).lower() == entry["sha256"]:
                raise KeysFileError(f"keys file {path} already holds this key")
        return [*entries, entry]

    update_keys_file(path, change)


def put_entry(path: Path, entry: dict[str, Any]) -> bool:
    """Add `entry`, or replace the entry with its id in place; every other entry stays."""

    def change(entries: Entries) -> Entries:
        out = [e for e in entries if e.get("id") != entry["id"]]
        if len(out) == len(entries):
            return [*entries, entry]
        at = next(i for i, e in enumerate(entries) if e.get("id") == entry["id"])
        return [*out[:at], entry, *out[at:]]

    return update_keys_file(path, change)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libs.common.auth")
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("new-key", help="print a new key and its keys-file entry")
    gen.add_argument("--caller", required=True)
    gen.add_argument("--tenant", required=True)
    gen.add_argument("--scopes", default="*", help="comma-separated (default: *)")
    gen.add_argument("--not-after", default=None, help="ISO time the key stops working")
    gen.add_argument(
        "--add-to", type=Path, default=None, metavar="FILE", help="add the entry to this keys file"
    )
    gen.add_argument("--json", action="store_true", help="print only JSON: {key, entry, added_to}")
    args = parser.parse_args(argv)
    key = new_key()
    entry = key_entry(
        key,
        caller=args.caller,
        tenant=args.tenant,
        scopes=[s.strip() for s in args.scopes.split(",") if s.strip()],
        not_after=args.not_after,
    )
    try:
        parse_keys({"keys": [entry]})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.add_to is not None:
        try:
            add_entry(args.add_to, entry)
        except (KeysFileError, OSError) as exc:
            print(f"error: {exc}; nothing was changed", file=sys.stderr)
            return 1
    if args.json:
        added = str(args.add_to) if args.add_to is not None else None
        print(json.dumps({"key": key, "entry": entry, "added_to": added}))
        return 0
    print(f"key (give to the caller, store nowhere else): {key}")
    if args.add_to is not None:
        print(f"entry {entry['id']} added to {args.add_to}:")
    else:
        print("entry (add to the keys file):")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
