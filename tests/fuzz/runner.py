"""Drive hypothesis-generated requests at one RPC of a running service and check invariants.

Hypothesis runs in a worker thread with a synchronous gRPC channel while the services keep
running on the test's event loop (reads of their databases are scheduled onto that loop),
so the services are exercised exactly as they run in production, background tasks included.

Per generated case:
- the status is never INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED or DEADLINE_EXCEEDED
  (every call has a deadline: no input may hang a handler);
- a request carrying invalid UTF-8 is INVALID_ARGUMENT naming the poisoned field;
- a rejected write left no trace: the owner's row counts (read from its database, or its
  usage ledger through GetUsage) are what they were before the call;
- every few cases, and at the end, every process still answers health SERVING.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from libs.common.errors import status_info
from tests.fuzz import protofuzz as pf
from tests.security.stack import READINESS, RESULTS_DIR, Stack

FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CALL_TIMEOUT_S = float(os.environ.get("FUZZ_CALL_TIMEOUT_S", "60"))
RESULTS = RESULTS_DIR


@dataclass(frozen=True)
class Case:
    kind: str  # "message" | "poison" | "garbage"
    payloads: tuple[bytes, ...]
    poisoned_path: str | None = None

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass
class Target:
    """One RPC to fuzz and how to check it."""

    process: str
    service: ServiceDescriptor
    method: MethodDescriptor
    who: str
    hints: pf.Hints = field(default_factory=dict)
    # Returns a comparable picture of what a write may change; None: the RPC writes nothing.
    snapshot: Callable[[], Any] | None = None
    # Valid requests (a tuple of stream messages for client streaming) that mutants start from.
    templates: list[tuple[Message, ...]] = field(default_factory=list)
    options: pf.Options = field(default_factory=pf.Options)

    @property
    def name(self) -> str:
        return f"{self.service.name}.{self.method.name}"


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # first detail seen per code/reason
    bytes_sent: int = 0
    largest: int = 0
    slowest: float = 0.0  # seconds of the slowest call
    slowest_case: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": sum(self.cases.values()),
            "by_kind": dict(self.cases),
            "codes": dict(self.codes),
            "samples": dict(self.samples),
            "bytes_sent": self.bytes_sent,
            "largest_request_bytes": self.largest,
            "slowest_call_s": round(self.slowest, 3),
            "slowest_case": self.slowest_case,
            "seconds": round(self.seconds, 1),
        }


def case_strategy(target: Target) -> st.SearchStrategy[Case]:
    desc = target.method.input_type
    streaming = target.method.client_streaming
    scratch = pf.messages(desc, target.hints, target.options)
    light = pf.messages(desc, target.hints, pf.Options(3, 2, False, False))

    def serialize(ms: Sequence[Message]) -> tuple[bytes, ...]:
        return tuple(m.SerializeToString() for m in ms)

    def stream_of(msgs: st.SearchStrategy[Message]) -> st.SearchStrategy[tuple[Message, ...]]:
        if streaming:
            return st.lists(msgs, min_size=0, max_size=3).map(tuple)
        return msgs.map(lambda m: (m,))

    # (label, weight, strategy): weights are repetitions inside one_of.
    whole: list[tuple[str, int, st.SearchStrategy[tuple[Message, ...]]]] = [
        ("message", 2, stream_of(scratch))
    ]
    base: st.SearchStrategy[Message] = light
    if target.templates and desc.fields:
        templates = st.sampled_from(target.templates)
        elements = [m for t in target.templates for m in t]
        mutant = pf.mutants(elements, desc, target.options)
        if streaming:  # one element of a valid stream mutated

            @st.composite
            def mutated_stream(draw: st.DrawFn) -> tuple[Message, ...]:
                msgs = list(draw(templates))
                i = draw(st.integers(0, len(msgs) - 1))
                msgs[i] = draw(mutant)
                return tuple(msgs)

            whole.append(("mutant", 4, mutated_stream()))
        else:
            whole.append(("mutant", 4, mutant.map(lambda m: (m,))))
        whole.append(("valid", 1, templates))
        base = st.one_of(st.sampled_from(elements), light)

    def labelled(label: str) -> Callable[[tuple[Message, ...]], Case]:
        return lambda ms: Case(label, serialize(ms))

    kinds: list[st.SearchStrategy[Case]] = []
    for label, weight, strategy in whole:
        kinds += [strategy.map(labelled(label))] * weight
    kinds.append(st.binary(max_size=256).map(lambda b: Case("garbage", (b,))))
    if target.templates and not streaming:  # fields this contract does not know
        kinds.append(
            st.builds(
                lambda t, extra: Case("unknown", (t[0].SerializeToString() + extra,)),
                st.sampled_from(target.templates),
                pf.unknown_fields(desc),
            )
        )
    poisoned = pf.poisoned(desc, base)
    if poisoned is not None:
        if streaming:
            poison = st.tuples(st.lists(base, max_size=2), poisoned).map(
                lambda t: Case("poison", (*serialize(t[0]), t[1].data), t[1].path)
            )
        else:
            poison = poisoned.map(lambda p: Case("poison", (p.data,), p.path))
        kinds += [poison, poison]
    return st.one_of(*kinds)


class Caller:
    """A synchronous channel to one process, calling any method with raw bytes."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(
        self,
        service: ServiceDescriptor,
        method: MethodDescriptor,
        payloads: Sequence[bytes],
        metadata: Sequence[tuple[str, str]],
        timeout: float = CALL_TIMEOUT_S,
    ) -> tuple[grpc.StatusCode, grpc.RpcError | None, list[bytes]]:
        path = f"/{service.full_name}/{method.name}"
        md = tuple(metadata)
        try:
            if method.client_streaming:
                reply = self.channel.stream_unary(path)(
                    iter(payloads), metadata=md, timeout=timeout
                )
                return grpc.StatusCode.OK, None, [reply]
            if method.server_streaming:
                items = list(
                    self.channel.unary_stream(path)(payloads[0], metadata=md, timeout=timeout)
                )
                return grpc.StatusCode.OK, None, items
            reply = self.channel.unary_unary(path)(payloads[0], metadata=md, timeout=timeout)
            return grpc.StatusCode.OK, None, [reply]
        except grpc.RpcError as err:
            return err.code(), err, []  # type: ignore[attr-defined]

    def serving(self, health_name: str, within_s: float = 10.0) -> bool:
        """Whether the service answers SERVING (overall and for `health_name`) within
        `within_s`: a readiness blip while a heavy case runs (a DB ping timing out behind
        it) is tolerated, as Kubernetes' failureThreshold tolerates it; a service that died
        or stays unready is not."""
        deadline = time.monotonic() + within_s
        while True:
            statuses = [
                self.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                for name in ("", health_name)
            ]
            if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()


def fuzz_rpc(
    stack: Stack,
    loop: asyncio.AbstractEventLoop,
    target: Target,
    *,
    examples: int,
    derandomize: bool,
    health_every: int = 10,
    tally: Tally | None = None,
) -> Tally:
    """Run `examples` generated cases against `target` (call from a worker thread); the
    figures go to `tally` (also when a case fails)."""
    caller = Caller(stack.target(target.process))
    tally = tally if tally is not None else Tally()
    metadata = stack.keys.md(target.who)
    health_name = READINESS[target.process]
    started = time.perf_counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        print_blob=True,
    )
    @given(case=case_strategy(target))
    def one(case: Case) -> None:
        before = target.snapshot() if target.snapshot else None
        t0 = time.perf_counter()
        code, err, _ = caller.call(target.service, target.method, case.payloads, metadata)
        took = time.perf_counter() - t0
        tally.cases[case.kind] += 1
        reason = status_info(err).reason if err is not None else None
        label = f"{code.name}/{reason}" if reason and reason != code.name else code.name
        tally.codes[label] += 1
        if err is not None and label not in tally.samples:
            tally.samples[label] = (err.details() or "")[:160]  # type: ignore[attr-defined]
        tally.bytes_sent += case.size
        tally.largest = max(tally.largest, case.size)
        if took > tally.slowest:
            tally.slowest, tally.slowest_case = took, f"{case.kind}, {case.size} bytes, {label}"
        detail = f"{target.name} [{case.kind}, {case.size} bytes]"
        assert code not in FORBIDDEN, f"{detail}: {code.name}: {err.details() if err else ''}"  # type: ignore[attr-defined]
        if case.kind == "poison":
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{detail}: {code.name}"
            assert err is not None
            info = status_info(err)
            fields = [pf.strip_indices(v.field) for v in info.field_violations]
            assert case.poisoned_path in fields, f"{detail}: {fields} != {case.poisoned_path}"
        if target.snapshot is not None and code != grpc.StatusCode.OK:
            after = target.snapshot()
            assert after == before, (
                f"{detail}: rejected ({code.name}) but wrote: {before} -> {after}"
            )
        if sum(tally.cases.values()) % health_every == 0:
            assert caller.serving(health_name), f"{target.process} not SERVING"

    try:
        one()
        assert caller.serving(health_name), f"{target.process} not SERVING after the run"
    finally:
        tally.seconds = time.perf_counter() - started
        caller.close()
    return tally


def on_loop(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 30.0) -> Any:
    """Run a coroutine on the services' loop from the hypothesis thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def record(name: str, results: dict[str, dict[str, Any]]) -> Path:
    """Keep the figures in .build/reliability/<name>.json (docs/reliability.md quotes them),
    merged over the previous ones so a run of some RPCs (`-k`) keeps the others' figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    merged: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    merged.update({rpc: {**figures, "run_at": stamp} for rpc, figures in results.items()})
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path


def print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    total = sum(r["cases"] for r in results.values())
    print(f"\n{title}: {total} cases over {len(results)} RPCs")
    print(
        f"{'RPC':<34} {'cases':>6} {'new':>4} {'mut':>4} {'ok':>4} {'utf8':>4} {'junk':>4} "
        f"{'unkn':>4} {'MiB':>6} {'max s':>6}  codes"
    )
    for name, r in sorted(results.items()):
        k = r["by_kind"]
        codes = ", ".join(f"{c}:{n}" for c, n in sorted(r["codes"].items()))
        name = name + (" FAILED" if r.get("failed") else "")
        print(
            f"{name:<34} {r['cases']:>6} {k.get('message', 0):>4} {k.get('mutant', 0):>4} "
            f"{k.get('valid', 0):>4} {k.get('poison', 0):>4} {k.get('garbage', 0):>4} "
            f"{k.get('unknown', 0):>4} {r['bytes_sent'] / 2**20:>6.1f} "
            f"{r['slowest_call_s']:>6.2f}  {codes}"
        )
