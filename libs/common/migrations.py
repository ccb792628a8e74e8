"""Versioned, checksummed SQL migrations: the rules both storage backends apply.

A migration is a file `NNN_name.sql` in a service's migrations folder (one folder per
backend). Each is applied once, in a transaction, and recorded with the SHA-256 of its
text. Start-up stops with a clear message when

- an applied migration's file changed (add a new migration instead), or
- the database holds a migration this image does not know: it was migrated by a newer
  release, and running older code against a newer schema is how data gets damaged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_MIGRATION_FILE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path) -> list[Migration]:
    found = []
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match and path.is_file():
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return found


def pending(applied: Mapping[int, str], migrations: list[Migration], db: str) -> list[Migration]:
    """The migrations still to apply, given {version: checksum} already recorded in the
    database; raise MigrationError when the database and this image disagree."""
    known = {m.version: m for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        latest = max(known, default=0)
        raise MigrationError(
            f"the {db} database has migration(s) {newer} that this release does not know "
            f"(it knows up to {latest:03d}): the schema was migrated by a newer release. "
            "Run that release (or newer), or restore a backup taken before the upgrade"
        )
    for version, checksum in applied.items():
        m = known[version]
        if checksum != m.checksum:
            raise MigrationError(
                f"migration {m.version:03d}_{m.name} of {db} changed after it was applied; "
                "add a new migration instead of editing an applied one"
            )
    return [m for m in migrations if m.version not in applied]
