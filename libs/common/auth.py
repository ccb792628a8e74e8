"""API-key authentication: `authorization: Bearer <key>` against a file of hashed keys.

The keys file (JSON) holds only SHA-256 hashes:

    {"keys": [{"id": "analytics-2026-11", "caller": "analytics", "tenant": "acme",
               "scopes": ["memory.read", "memory.write"], "sha256": "<hex>",
               "not_after": "2027-06-01T00:00:00Z"}]}

A caller may have several entries at once, which is how keys rotate without
downtime. The file is re-read when its modification time changes (checked at
most once a second), so adding or revoking a key needs no restart; a file that
fails to parse keeps the previous keys and is logged.

Scopes: `*` grants everything, `memory.*` grants every `memory.` scope, else exact.

Delegation: a service key that holds the scope `tenant.delegate` itself (listed by that
exact name: neither `*` nor `tenant.*` grants it) may send the metadata
`x-finsight-on-behalf-of-tenant: <tenant>`; the call then runs in that tenant (usage,
limits, budgets, data) as the same caller and key (`Identity.key_tenant` keeps the key's
own tenant, for the access log). A header without the scope is PERMISSION_DENIED (naming
the key's own tenant is a no-op), a malformed tenant INVALID_ARGUMENT. With auth off every
claim is trusted: honoured.
Generate a key with `python -m libs.common.auth new-key --caller NAME --tenant T --scopes a,b`
(`--add-to FILE` adds its entry to a keys file, `--json` for scripts: libs/common/keytool.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from libs.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """Who is calling: established by authentication, never by a request field."""

    caller: str
    tenant: str
    scopes: frozenset[str]
    key_id: str
    # Set when the key acts for another tenant (delegation): the key's own tenant.
    key_tenant: str = ""

    def has_scope(self, scope: str) -> bool:
        return scope_granted(self.scopes, scope)

    @property
    def delegated(self) -> bool:
        return bool(self.key_tenant)


ANONYMOUS = Identity(caller="anonymous", tenant="default", scopes=frozenset({"*"}), key_id="")


def scope_granted(granted: Iterable[str], wanted: str) -> bool:
    for scope in granted:
        if scope in ("*", wanted):
            return True
        if scope.endswith(".*") and wanted.startswith(scope[:-1]):
            return True
    return False


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    caller: str
    tenant: str
    scopes: frozenset[str]
    sha256: str
    not_after: datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(data: dict[str, object]) -> dict[str, KeyEntry]:
    entries: dict[str, KeyEntry] = {}
    raw = data.get("keys")
    if not isinstance(raw, list):
        raise ValueError("keys file must be an object with a 'keys' list")
    for i, item in enumerate(raw):
        try:
            not_after = item.get("not_after")
            entry = KeyEntry(
                key_id=str(item.get("id") or f"key-{i}"),
                caller=str(item["caller"]),
                tenant=str(item["tenant"]),
                scopes=frozenset(str(s) for s in item.get("scopes", [])),
                sha256=str(item["sha256"]).lower(),
                not_after=_parse_time(not_after) if not_after else None,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"keys[{i}]: {exc}") from exc
        entries[entry.sha256] = entry
    return entries


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class KeyStore:
    """Hashed keys from a file, re-read when the file changes."""

    def __init__(self, path: Path, *, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._entries: dict[str, KeyEntry] = {}
        self._mtime: float | None = None
        self._checked_at = 0.0
        self._reload(force=True)

    def _reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as exc:
            if force:
                raise ValueError(f"cannot read API keys file {self.path}: {exc.strerror}") from exc
            log.error(
                "api keys file unreadable; keeping previous keys", extra={"path": str(self.path)}
            )
            return
        if mtime == self._mtime:
            return
        try:
            entries = parse_keys(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(f"invalid API keys file {self.path}: {exc}") from exc
            log.error("api keys file invalid; keeping previous keys", extra={"error": str(exc)})
            return
        self._entries, self._mtime = entries, mtime
        if not force:
            log.info("api keys reloaded", extra={"keys": len(entries)})

    def authenticate(self, key: str | None, *, now: datetime | None = None) -> Identity:
        self._reload()
        if not key:
            raise Unauthenticated(
                "missing API key: send 'authorization: Bearer <key>'", reason="API_KEY_MISSING"
            )
        digest = hash_key(key)
        entry = self._entries.get(digest)
        # compare_digest keeps the final comparison constant-time.
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            raise Unauthenticated("unknown API key", reason="API_KEY_UNKNOWN")
        if entry.not_after and (now or datetime.now(UTC)) >= entry.not_after:
            raise Unauthenticated("API key expired", reason="API_KEY_EXPIRED")
        return Identity(entry.caller, entry.tenant, entry.scopes, entry.key_id)


def require_scope(identity: Identity, scope: str | None) -> None:
    if scope and not identity.has_scope(scope):
        raise PermissionDenied(
            f"caller {identity.caller!r} lacks scope {scope!r}",
            reason="SCOPE_MISSING",
            metadata={"scope": scope},
        )


DELEGATE_SCOPE = "tenant.delegate"
ON_BEHALF_OF_HEADER = "x-finsight-on-behalf-of-tenant"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def on_behalf_of(
    identity: Identity,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    trusted: bool = False,
) -> Identity:
    """The identity the call runs as: `identity`, or, when the metadata names a tenant in
    `x-finsight-on-behalf-of-tenant`, that tenant's (same caller, key and scopes). Only a
    key listing `tenant.delegate` itself may: `*` does not grant it (an operator's or a
    tenant admin's wildcard key must not act in other tenants). `trusted` (auth off)
    honours the header without a scope."""
    values = [v for k, v in metadata or () if k == ON_BEHALF_OF_HEADER]
    if not values:
        return identity
    if len(values) > 1:
        raise InvalidArgument(
            f"send {ON_BEHALF_OF_HEADER!r} at most once", reason="ON_BEHALF_OF_INVALID"
        )
    raw = values[0]
    tenant = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(
            f"{ON_BEHALF_OF_HEADER!r} must be a tenant id (1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit)",
            reason="ON_BEHALF_OF_INVALID",
        )
    if tenant == identity.tenant:  # its own tenant: nothing to grant
        return identity
    if not trusted and DELEGATE_SCOPE not in identity.scopes:
        raise PermissionDenied(
            f"caller {identity.caller!r} may not act for another tenant: "
            f"{ON_BEHALF_OF_HEADER!r} needs the key's explicit scope {DELEGATE_SCOPE!r}",
            reason="DELEGATION_NOT_ALLOWED",
            metadata={"scope": DELEGATE_SCOPE},
        )
    return replace(identity, tenant=tenant, key_tenant=identity.key_tenant or identity.tenant)


def bearer_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def new_key() -> str:
    return "fsk_" + secrets.token_urlsafe(32)


def key_entry(
    key: str,
    *,
    caller: str,
    tenant: str,
    scopes: list[str],
    not_after: str | None = None,
    key_id: str | None = None,
) -> dict[str, object]:
    entry: dict[str, object] = {
        # The random suffix keeps ids unique for keys minted in the same second.
        "id": key_id or f"{caller}-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}",
        "caller": caller,
        "tenant": tenant,
        "scopes": scopes,
        "sha256": hash_key(key),
    }
    if not_after:
        entry["not_after"] = not_after
    return entry


def _main() -> None:
    # The tool lives in its own module; `python -m libs.common.auth new-key` stays its name.
    from libs.common.keytool import main

    raise SystemExit(main())


if __name__ == "__main__":
    _main()
