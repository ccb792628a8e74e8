"""Logs after a run that handles every kind of credential: no API key, bearer token or
provider key appears in them.

The in-process run formats every record (DEBUG and up, the services' own loggers and the
libraries') with the production JSON formatter and redactor, loaded with each service's
secret settings exactly as `bootstrap_observability` does. The workload: every RPC with
every identity (valid, rotated, unknown, expired, unscoped, `Basic` and lower-case
`bearer` schemes), provider failures (401 for a bad provider key, 429, 500, a cut stream)
so the gateway logs its upstream errors, an unhandled-error path (INTERNAL), and keys
pasted into fields the services echo in their errors (ids, model names).

The process-harness variant (slow) scans the log files of the three service processes and
the dev provider after the same workload.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.logging import JsonFormatter, redact
from libs.devprovider import DEFAULT_API_KEY
from tests.security.conftest import VICTIM_SESSION, VICTIM_SYMBOLS, VICTIM_USER
from tests.security.requests import rpc_key, user_message, valid_requests
from tests.security.stack import Stack, call_raw, every_method

SCHEMES = ("Bearer {}", "bearer {}", "BEARER  {}", "Basic {}", "Token {}")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured(stack: Stack) -> Iterator[Capture]:
    for host in stack.hosts.values():
        redact.add_values(host.settings.secret_values())  # as bootstrap_observability does
    handler = Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def secrets_of(stack: Stack) -> list[str]:
    return [*stack.keys.all_plaintext(), DEFAULT_API_KEY]


def find_secrets(lines: list[str], secrets: list[str]) -> list[str]:
    bearer = re.compile(r"(?i)bearer\s+(?!\[REDACTED\])\S{6,}")
    found = []
    for line in lines:
        hits = [s for s in secrets if s in line]
        if hits or bearer.search(line):
            found.append(f"{hits or 'bearer token'}: {line[:300]}")
    return found


@dataclass
class Target:
    """Where the workload goes: an in-process stack or the process harness."""

    channel: Callable[[str], grpc.aio.Channel]
    alice: tuple[tuple[str, str], ...]
    keys: list[str]  # every plaintext key of the keys file
    script: Callable[[dict[str, Any] | None], Awaitable[None]]  # the provider's sticky action


def stack_target(stack: Stack) -> Target:
    async def script(action: dict[str, Any] | None) -> None:
        stack.provider.state.script([], default=action, replace=True)

    return Target(stack.channel, stack.keys.md("alice"), stack.keys.all_plaintext(), script)


async def workload(t: Target) -> int:
    """Every RPC with every credential and scheme; returns the number of calls made."""
    requests = valid_requests(VICTIM_USER, VICTIM_SESSION, VICTIM_SYMBOLS, new_symbol="LOGS")
    calls = 0
    schemes_tried: set[str] = set()
    for process, service, method in every_method():
        name = rpc_key(process, service.name, method.name)
        payload = [m.SerializeToString() for m in requests[name][0]]
        # Every scheme on the first RPC of each process, "Bearer" on the others.
        schemes = SCHEMES if process not in schemes_tried else SCHEMES[:1]
        schemes_tried.add(process)
        for key in [*t.keys, "k-nobody-999999"]:
            for scheme in schemes:
                header: tuple[tuple[str, str], ...] = (("authorization", scheme.format(key)),)
                await call_raw(t.channel(process), service, method, payload, header, timeout=20)
                calls += 1
    # Keys pasted into request fields the services validate and quote back.
    mem = memory_pb2_grpc.MemoryServiceStub(t.channel("memory"))
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(t.channel("llm_gateway"))
    for key in t.keys:
        for call in (
            mem.GetConsent(mpb.GetConsentRequest(user_id=f"Bearer {key}"), metadata=t.alice),
            gw.Complete(
                gpb.CompleteRequest(model=f"Bearer {key}", messages=[user_message("x")]),
                metadata=t.alice,
            ),
        ):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            calls += 1
    return calls + await provider_failures(t)


async def provider_failures(t: Target) -> int:
    """The gateway meets a provider that refuses its key, throttles, fails and cuts streams."""
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(t.channel("llm_gateway"))
    actions: list[dict[str, Any]] = [
        {"status": 401, "message": f"Incorrect API key provided: {DEFAULT_API_KEY}"},
        {"status": 429, "retry_after": 0.01},
        {"status": 500},
        {"status": 503},
        {"drop": True},
        {"cut_after_chunks": 1},
    ]
    calls = 0
    for action in actions:
        await t.script(action)
        for stream in (False, True):
            with contextlib.suppress(grpc.aio.AioRpcError):
                if stream:
                    request = gpb.StreamCompleteRequest(
                        messages=[user_message("one two three")], max_tokens=8
                    )
                    async for _ in gw.StreamComplete(request, metadata=t.alice, timeout=10):
                        pass
                else:
                    await gw.Complete(
                        gpb.CompleteRequest(messages=[user_message("hi")], max_tokens=8),
                        metadata=t.alice,
                        timeout=10,
                    )
            calls += 1
    await t.script(None)
    return calls


async def test_no_key_or_token_in_the_logs_of_a_full_run(stack: Stack, captured: Capture) -> None:
    calls = await workload(stack_target(stack))
    assert len(captured.lines) > calls  # access lines at least: the capture saw the run
    assert any('"grpc_code": "UNAUTHENTICATED"' in line for line in captured.lines)
    leaks = find_secrets(captured.lines, secrets_of(stack))
    assert not leaks, "\n".join(leaks[:10])
    print(f"\nlog scan (in-process): {calls} calls, {len(captured.lines)} log lines, 0 secrets")


def test_the_scanner_finds_what_it_looks_for() -> None:
    """The scan itself can fail: unredacted lines are reported."""
    lines = ['{"msg": "authorization: Bearer k-alice-111111"}', '{"msg": "key sk-devprovider"}']
    assert len(find_secrets(lines, ["k-alice-111111", "sk-devprovider"])) == 2
    assert find_secrets(['{"msg": "Bearer [REDACTED]"}'], ["k-alice-111111"]) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_no_key_or_token_in_the_log_files_of_the_processes(tmp_path: Path) -> None:
    """The same workload against the three services as processes (tests/system/harness.py);
    then every log file of the run is scanned: services, dev provider, Valkey."""
    from tests.system.harness import Suite

    suite = Suite(tmp_path, load_sample_data=False)
    await suite.up()
    try:
        k = suite.keys
        keys = [k.admin, k.alice, k.alice_rotated, k.bob, k.expired, k.narrow]

        async def script(action: dict[str, Any] | None) -> None:
            await suite.control.script(default=action, replace=True)

        calls = await workload(Target(suite.channel, suite.md("alice"), keys, script))
    finally:
        await suite.down()
    paths = [*suite.log_paths(), tmp_path / "valkey" / "valkey.log"]
    lines: list[str] = []
    for path in paths:
        if path.exists():
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
    assert sum('"grpc_code": "UNAUTHENTICATED"' in line for line in lines) > 100
    leaks = find_secrets(lines, [*keys, DEFAULT_API_KEY])
    assert not leaks, "\n".join(leaks[:10])
    print(
        f"\nlog scan (processes): {calls} calls, {len(lines)} lines in {len(paths)} files, 0 secrets"
    )
