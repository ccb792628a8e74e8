"""Every RPC of every service against every kind of credential: the right status, a table.

Credentials: none, a non-Bearer scheme, an unknown key, an expired key, a key whose only
scope is "nothing", a key scoped to memory only, alice (every service scope, no admin or
write scope) and admin (`*`). The requests are real, effective ones aimed at tenant acme's
data (erase the victim, withdraw her consent, ingest bars, take a backup, bill a
completion): every refused call must also have changed nothing, which is checked on the
data itself after the refused calls and before the authorised ones run.

The table is printed and kept in .build/reliability/auth-matrix.{json,md}
(docs/reliability.md shows it).
"""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.errors import status_info
from tests.security.conftest import VICTIM_SESSION, VICTIM_SYMBOLS, VICTIM_USER, acme_picture
from tests.security.requests import rpc_key, valid_requests
from tests.security.stack import READINESS, RESULTS_DIR, Stack, call_raw, every_method

RESULTS = RESULTS_DIR

# identity -> call metadata builder; the key identities come from the stack's keys file.
IDENTITIES = ["none", "basic", "unknown", "expired", "narrow", "memory_only", "alice", "admin"]
UNAUTH = {
    "none": "API_KEY_MISSING",
    "basic": "API_KEY_MISSING",
    "unknown": "API_KEY_UNKNOWN",
    "expired": "API_KEY_EXPIRED",
}
ADMIN_SCOPED = {
    ("memory", "PurgeExpired"): "memory.admin",
    ("memory", "Backup"): "memory.admin",
    ("analytics", "Backup"): "analytics.admin",
    ("analytics", "IngestBars"): "analytics.write",
}


def metadata(stack: Stack, who: str) -> tuple[tuple[str, str], ...]:
    if who == "none":
        return ()
    if who == "basic":
        return (("authorization", f"Basic {stack.keys.base.alice}"),)
    if who == "unknown":
        return (("authorization", "Bearer k-nobody-999999"),)
    return stack.keys.md(who)


def required_scope(process: str, method: str) -> str:
    return ADMIN_SCOPED.get((process, method), process)


def expected(process: str, method: str, who: str) -> str:
    """'UNAUTHENTICATED/<reason>', 'PERMISSION_DENIED' or 'allowed'."""
    if who in UNAUTH:
        return f"UNAUTHENTICATED/{UNAUTH[who]}"
    scope = required_scope(process, method)
    granted = {
        "narrow": set(),
        "memory_only": {"memory"},
        "alice": {"memory", "analytics", "llm_gateway"},
        "admin": {scope},
    }[who]
    return "allowed" if scope in granted else "PERMISSION_DENIED"


def observed(code: grpc.StatusCode, err: grpc.aio.AioRpcError | None) -> str:
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        assert err is not None
        info = status_info(err)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            assert info.reason == "SCOPE_MISSING", info
            return "PERMISSION_DENIED"
        return f"UNAUTHENTICATED/{info.reason}"
    return "allowed"


async def test_every_rpc_refuses_missing_bad_expired_and_unscoped_keys(stack: Stack) -> None:
    requests = valid_requests(VICTIM_USER, VICTIM_SESSION, VICTIM_SYMBOLS, new_symbol="INTRUDER")
    before = await acme_picture(stack)
    table: dict[str, dict[str, str]] = {}
    mismatches = []

    async def cell(process: str, service: object, method: object, who: str) -> None:
        name = rpc_key(process, service.name, method.name)  # type: ignore[attr-defined]
        payload = [m.SerializeToString() for m in requests[name][0]]
        code, _, err = await call_raw(
            stack.channel(process),
            service,  # type: ignore[arg-type]
            method,  # type: ignore[arg-type]
            payload,
            metadata(stack, who),
            timeout=20,
        )
        got = observed(code, err)
        want = expected(process, method.name, who)  # type: ignore[attr-defined]
        shown = got if got != "allowed" else f"allowed ({code.name})"
        table.setdefault(f"{process}:{name.split(':')[-1]}", {})[who] = shown
        if got != want:
            mismatches.append((name, who, want, got, code.name))

    # 1. Every refused cell first: none of them may change anything.
    for process, service, method in every_method():
        for who in IDENTITIES:
            if expected(process, method.name, who) != "allowed":
                await cell(process, service, method, who)
    assert not mismatches, mismatches
    assert await acme_picture(stack) == before, "a refused call changed tenant acme's data"

    # 2. Allowed cells: past authentication and scope checks (any other status).
    for process, service, method in every_method():
        for who in IDENTITIES:
            if expected(process, method.name, who) == "allowed":
                await cell(process, service, method, who)
    assert not mismatches, mismatches
    assert await stack.healthy()

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auth-matrix.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    md = render(table)
    (RESULTS / "auth-matrix.md").write_text(md)
    print("\n" + md)


def render(table: dict[str, dict[str, str]]) -> str:
    cols = ["none", "basic", "unknown", "expired", "narrow", "memory_only", "alice", "admin"]
    short = {
        "UNAUTHENTICATED/API_KEY_MISSING": "UNAUTH missing",
        "UNAUTHENTICATED/API_KEY_UNKNOWN": "UNAUTH unknown",
        "UNAUTHENTICATED/API_KEY_EXPIRED": "UNAUTH expired",
        "PERMISSION_DENIED": "DENIED",
    }
    head = "| RPC | scope | no key | `Basic` scheme | unknown key | expired key | scope `nothing` | memory-only key | alice (service scopes) | admin (`*`) |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for rpc in sorted(table):
        process, _, name = rpc.partition(":")
        method = name.rsplit(".", 1)[-1]
        cells = [short.get(table[rpc].get(c, "-"), table[rpc].get(c, "-")) for c in cols]
        cells = [
            c.replace("allowed (", "").rstrip(")") if c.startswith("allowed") else c for c in cells
        ]
        lines.append(
            f"| {process} {name} | `{required_scope(process, method)}` | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


async def test_health_needs_no_key(stack: Stack) -> None:
    """Probes are exempt by design (FINSIGHT_AUTH_EXEMPT_HEALTH); the matrix above shows the
    exemption covers no service RPC."""
    for process, name in READINESS.items():
        stub = health_pb2_grpc.HealthStub(stack.channel(process))
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_credentials_are_checked_before_the_request_is_parsed(stack: Stack) -> None:
    """An unauthenticated caller learns nothing about validation: undecodable bodies and
    invalid UTF-8 still answer UNAUTHENTICATED, for every RPC."""
    for process, service, method in every_method():
        for body in (b"\xff\xff\xff\xff\x0f", b"\x0a\x03\xff\xfe\xfd"):
            code, _, _err = await call_raw(
                stack.channel(process), service, method, body, (), timeout=10
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED, (service.name, method.name, code)
