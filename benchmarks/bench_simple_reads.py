"""Each service's simplest read as a share of its own RPC ceiling (issue 17, item 14).

    .venv/bin/python -m benchmarks.bench_simple_reads [--seconds S] [--concurrency N]
        [--json PATH]

The whole suite runs as processes (tests/system/harness.Suite: Valkey, the dev provider,
the three services on the embedded DuckDB default, the sample market data loaded) and this
process is the one client: `--concurrency` callers (default 50) on one channel per service,
each in a loop for `--seconds` (default 8) per phase. Per service, two phases through the
same server, interceptors, authentication and rate-limit path:

- the ceiling: `grpc.health.v1.Health/Check` (answers from memory, no domain work);
- the simplest domain read: gateway `ListModels`, memory `GetConsent`, analytics
  `ListSymbols`.

Reported: requests/s of both, the read's share of the ceiling (aim >= 50 %), the server's
own handling time per request (`grpc_server_handling_seconds`, sum/count over the phase)
and, for memory, where GetConsent's time goes: the consent read and the read's audit row
(`finsight_db_query_seconds` by statement, the audit group commit's batch size), then the
same phase again with `MEMORY_AUDIT_READS=false` (memory restarted) to price the audit write
of a read. The per-caller rate limit is off (the service is measured, not the limiter,
which has its own tests). Figures are ratios within one run on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.memory.v1 import memory_pb2 as mpb
from tests.system.harness import Suite

Call = Callable[[], Awaitable[Any]]
READS: dict[str, str] = {
    "llm_gateway": "ListModels",
    "memory": "GetConsent",
    "analytics": "ListSymbols",
}
AIM = 0.5


async def drive(call: Call, concurrency: int, seconds: float) -> tuple[float, int]:
    """Requests/s of `concurrency` callers looping on `call`, and the errors seen."""
    await call()  # connected and warm
    stop = time.perf_counter() + seconds
    done = errors = 0

    async def caller() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            try:
                await call()
                done += 1
            except grpc.aio.AioRpcError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started), errors


async def samples(suite: Suite, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await suite.metrics_text(name)
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta_mean_ms(
    before: dict[Any, float], after: dict[Any, float], metric: str, **labels: str
) -> tuple[float, float]:
    """(mean milliseconds, count) of a histogram's observations between two scrapes."""
    total = count = 0.0
    for (name, lbls), value in after.items():
        have = dict(lbls)
        if not labels.items() <= have.items():
            continue
        if name == f"{metric}_sum":
            total += value - before.get((name, lbls), 0.0)
        elif name == f"{metric}_count":
            count += value - before.get((name, lbls), 0.0)
    return (total / count * 1000 if count else float("nan")), count


def statements(before: dict[Any, float], after: dict[Any, float]) -> dict[str, dict[str, float]]:
    """Per DuckDB statement name: how many ran in the phase and their mean time."""
    names = {
        dict(lbls)["statement"]
        for (name, lbls) in after
        if name == "finsight_db_query_seconds_count" and "statement" in dict(lbls)
    }
    out = {}
    for statement in sorted(names):
        mean, count = delta_mean_ms(before, after, "finsight_db_query_seconds", statement=statement)
        if count:
            out[statement] = {"count": count, "mean_ms": round(mean, 3)}
    return out


def calls(suite: Suite) -> dict[str, tuple[Call, Call]]:
    md = suite.md("alice")

    def health(name: str) -> Call:
        stub = health_pb2_grpc.HealthStub(suite.channel(name))
        return lambda: stub.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)

    gateway, memory, analytics = suite.gateway(), suite.memory(), suite.analytics()
    return {
        "llm_gateway": (
            health("llm_gateway"),
            lambda: gateway.ListModels(gpb.ListModelsRequest(), metadata=md, timeout=10),
        ),
        "memory": (
            health("memory"),
            lambda: memory.GetConsent(
                mpb.GetConsentRequest(user_id="bench-u0"), metadata=md, timeout=10
            ),
        ),
        "analytics": (
            health("analytics"),
            lambda: analytics.ListSymbols(apb.ListSymbolsRequest(), metadata=md, timeout=10),
        ),
    }


async def phase(
    suite: Suite, name: str, method: str, call: Call, args: argparse.Namespace
) -> dict[str, Any]:
    before = await samples(suite, name)
    rate, errors = await drive(call, args.concurrency, args.seconds)
    after = await samples(suite, name)
    server_ms, _ = delta_mean_ms(before, after, "grpc_server_handling_seconds", grpc_method=method)
    out: dict[str, Any] = {"rps": round(rate, 1), "errors": errors, "server_ms": server_ms}
    if name == "memory":
        out["statements"] = statements(before, after)
        batch = delta_mean_ms(before, after, "finsight_db_commit_batch_size")
        out["mean_commit_batch"] = round(batch[0] / 1000, 1) if batch[1] else None
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="finsight-bench-reads-"))
    env = {"FINSIGHT_RATE_LIMIT_ENABLED": "false", "LLM_GATEWAY_RPM": "0", "LLM_GATEWAY_TPM": "0"}
    suite = Suite(root, env=env)
    await suite.up()
    result: dict[str, Any] = {"concurrency": args.concurrency, "seconds": args.seconds}
    try:
        await suite.memory().SetConsent(
            mpb.SetConsentRequest(user_id="bench-u0", long_term_memory=True),
            metadata=suite.md("alice"),
        )
        for name, (health, read) in calls(suite).items():
            ceiling = await phase(suite, name, "Check", health, args)
            simple = await phase(suite, name, READS[name], read, args)
            result[name] = {
                "ceiling": ceiling,
                READS[name]: simple,
                "share": round(simple["rps"] / ceiling["rps"], 3),
            }
        await suite.restart("memory", env={"MEMORY_AUDIT_READS": "false"})
        await suite.warm_up()
        _, read = calls(suite)["memory"]
        result["memory"]["GetConsent, MEMORY_AUDIT_READS=false"] = await phase(
            suite, "memory", "GetConsent", read, args
        )
    finally:
        await suite.down()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    return result


def report(r: dict[str, Any]) -> None:
    print(
        f"simplest read vs the health ceiling, one client, c={r['concurrency']}, "
        f"{r['seconds']:g} s per phase (aim: >= {AIM:.0%})"
    )
    print(f"  {'service':<12} {'read':<12} {'Check rps':>10} {'read rps':>9} {'share':>6}"
          f" {'server ms (Check / read)':>25}")  # fmt: skip
    for name, method in READS.items():
        s = r[name]
        print(
            f"  {name:<12} {method:<12} {s['ceiling']['rps']:>10,.0f} {s[method]['rps']:>9,.0f}"
            f" {s['share']:>6.0%} {s['ceiling']['server_ms']:>12.2f} / {s[method]['server_ms']:.2f}"
            + ("" if s["share"] >= AIM else "  (below the aim)")
        )
    mem = r["memory"]
    off = mem["GetConsent, MEMORY_AUDIT_READS=false"]
    print("  memory GetConsent, where the time goes (DuckDB statements in the phase):")
    for label, phase_result in (
        ("audited reads", mem["GetConsent"]),
        ("MEMORY_AUDIT_READS=false", off),
    ):
        parts = ", ".join(
            f"{k} {v['count']:,.0f} x {v['mean_ms']:.3f} ms"
            for k, v in phase_result["statements"].items()
        )
        print(
            f"    {label}: {phase_result['rps']:,.0f} rps, server {phase_result['server_ms']:.2f} ms;"
            f" {parts or 'no statements'}; mean commit batch {phase_result['mean_commit_batch']}"
        )  # fmt: skip
    print(
        f"  audit write of a read: {mem['GetConsent']['rps'] / off['rps']:.0%} of the unaudited rate"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
