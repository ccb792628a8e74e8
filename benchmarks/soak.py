"""Soak and capacity of the whole system, run as separate processes (`make soak`).

    .venv/bin/python -m benchmarks.soak [--duration 600] [--rate 20] [--warmup 30]
        [--retention-s 300] [--capacity | --no-capacity] [--step-s 8]
        [--provider-latency-ms 50] [--out FILE]

The system is started with the process harness of the system suites
(`tests/system/harness.py`: Valkey, the dev LLM provider in its own process, the three
services as `python -m services.X`, the sample data loaded, auth on, INFO logs to files).

Soak: an open-loop mixed workload at a steady total rate (requests are sent on schedule,
whatever the answers do): Analyze, Recall, AppendMessages, ComputeMetrics and Complete
(against the dev provider, with a fixed delay of --provider-latency-ms), over 64 users of
two tenants. For each RPC: throughput, p50/p95/p99 latency, errors by status. For each
service process: RSS, open file descriptors and sockets, sampled every 5 s; the figures
compared are those at the end of the warm-up and 5 s after the load stopped. Targets: zero
errors, RSS growth under 10% after the warm-up, no growth of the descriptors other than
sockets, sockets within 16 of their number after the warm-up (connection pools follow the
load; a leak would add thousands). At the end the log files of every process are scanned
for API keys, bearer tokens and the provider key (target: none).

Capacity (--capacity, on by default): per service, steady rates of its own requests
(gateway: Complete; memory: Recall and AppendMessages; analytics: ComputeMetrics over
varying ranges), doubled from --capacity-start while p99 stays under 100 ms (for the
gateway: p99 minus the provider's fixed delay, i.e. its own share), no error occurs and the
achieved rate is within 5% of the target (halved instead while the first rate does not
hold); then one bisection step. A step lasts --step-s seconds, longer at low rates so that
it has 400 answers (at most 40 s), after one second of ramp-up. Each step also reports the
service's own CPU time per request (from /proc): latency on a shared machine moves with
everything else running there, CPU per request barely does; 1000 / that is the rate one
fully used core would serve. The load generator runs in this process on the same 2 cores,
so the figures are a lower bound for the services.

Duration: --duration or SOAK_DURATION_S (default 600 s; 0: the capacity probe only).

Data size: the workload appends messages and audit rows all the time, and DuckDB's memory
grows with the data it holds, which is no leak. So that the RSS figures show per-request
growth alone, memory's retention is shortened to --retention-s (SOAK_RETENTION_S, default
300 s; a purge every fifth of it, at least 10 s): after that long, rows purged balance rows
written and the data size stays level. 0 keeps every row (the production behaviour: the
data grows for the whole run). The RSS series (after the warm-up, at each quarter of the
run, at the end) and the growth over the second half are reported: a retained or cached
amount levels off, a leak does not.
Results: printed, and written to --out (default .build/reliability/soak.json). Exit status
1 when a soak target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.type import date_pb2

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.memory.v1 import memory_pb2 as mpb
from libs.devprovider import DEFAULT_API_KEY
from tests.system.harness import SERVICE_NAMES, Suite

ROOT = Path(__file__).resolve().parents[1]

DEADLINE_S = 5.0
P99_TARGET_S = 0.100
RSS_GROWTH_LIMIT = 0.10
FD_GROWTH_LIMIT = 0  # descriptors other than sockets
# Connection pools (provider, Redis, downstream channels) may open a few more sockets under
# load; a per-request leak would add thousands over a soak.
SOCKET_GROWTH_LIMIT = 16
IDLE_BEFORE_END_SAMPLE_S = 5.0
SAMPLE_EVERY_S = 5.0
MAX_IN_FLIGHT = 2000
CAPACITY_MIN_SAMPLES = 400  # answers per capacity step (p99 = the 4th worst)
CAPACITY_MIN_RATE = 3.0
CAPACITY_MAX_STEP_S = 40.0
USERS = 64
MIX = {  # share of the soak's requests
    "Complete": 0.25,
    "AppendMessages": 0.25,
    "Recall": 0.20,
    "ComputeMetrics": 0.20,
    "Analyze": 0.10,
}
WORDS = [
    "risk",
    "return",
    "volatility",
    "drawdown",
    "bonds",
    "equities",
    "cash",
    "tech",
    "energy",
    "dividend",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- process figures -------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> tuple[int, int]:
    """(open descriptors, of which sockets). Sockets follow the load (connection pools grow
    with concurrency and shrink with keep-alive expiry); files, pipes and the rest must not
    grow at all."""
    total = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        total += 1
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            total -= 1
    return total, sockets


@dataclass
class ProcessSamples:
    # per service: (t, rss bytes, open fds, of which sockets)
    samples: dict[str, list[tuple[float, int, int, int]]] = field(default_factory=dict)

    def take(self, suite: Suite, t: float) -> None:
        for name in SERVICE_NAMES:
            pid = suite.pid(name)
            if pid is not None:
                fds, sockets = open_fds(pid)
                self.samples.setdefault(name, []).append((t, rss_bytes(pid), fds, sockets))

    def at(self, name: str, t: float) -> tuple[float, int, int, int]:
        """The first sample at or after t (the last one if none)."""
        rows = self.samples[name]
        return next((r for r in rows if r[0] >= t), rows[-1])


# -- recorded calls --------------------------------------------------------------------------
@dataclass
class Recorder:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    late_starts: int = 0  # requests sent more than 50 ms after their slot (generator lag)

    async def run(self, rpc: str, call: Callable[[], Awaitable[Any]]) -> None:
        self.sent[rpc] += 1
        started = time.perf_counter()
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            self.errors[f"{rpc}:{err.code().name}"] += 1
            return
        self.latencies.setdefault(rpc, []).append(time.perf_counter() - started)

    def summary(self, seconds: float, subtract_s: dict[str, float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rpc in sorted(self.sent):
            lat = self.latencies.get(rpc, [])
            row = {
                "sent": self.sent[rpc],
                "ok": len(lat),
                "errors": sum(n for k, n in self.errors.items() if k.startswith(f"{rpc}:")),
                "throughput_rps": round(len(lat) / seconds, 2),
                "p50_ms": round(pct(lat, 0.50) * 1000, 1),
                "p95_ms": round(pct(lat, 0.95) * 1000, 1),
                "p99_ms": round(pct(lat, 0.99) * 1000, 1),
            }
            if subtract_s and rpc in subtract_s:
                row["p99_overhead_ms"] = round((pct(lat, 0.99) - subtract_s[rpc]) * 1000, 1)
            out[rpc] = row
        return out


# -- the workload ----------------------------------------------------------------------------
class Workload:
    def __init__(self, suite: Suite, symbols: list[str], seed: int = 1) -> None:
        self.suite = suite
        self.symbols = symbols
        self.rnd = random.Random(seed)
        self.md = {"alice": suite.md("alice"), "bob": suite.md("bob")}
        self.turn = 0

    def who(self) -> tuple[tuple[tuple[str, str], ...], str, str]:
        n = self.rnd.randrange(USERS)
        tenant = "alice" if n % 2 == 0 else "bob"
        return self.md[tenant], f"soak-u{n}", f"soak-s{n}"

    def text(self, words: int) -> str:
        return " ".join(self.rnd.choice(WORDS) for _ in range(words))

    def date_range(self) -> common_pb2.DateRange:
        # A handful of ranges: repeated requests hit the analytics result cache, as they do
        # in production; new ones compute.
        year = self.rnd.choice([2015, 2016, 2017, 2018, 2019])
        return common_pb2.DateRange(
            start=date_pb2.Date(year=year, month=1, day=1),
            end=date_pb2.Date(year=year + 1, month=self.rnd.randint(1, 12), day=28),
        )

    async def seed(self) -> None:
        """Consent and a few facts for every user, so Recall has something to rank."""
        mem = self.suite.memory()
        for n in range(USERS):
            md = self.md["alice" if n % 2 == 0 else "bob"]
            user = f"soak-u{n}"
            await mem.SetConsent(
                mpb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=md, timeout=10
            )
            await mem.Remember(
                mpb.RememberRequest(
                    user_id=user,
                    facts=[mpb.NewFact(text=self.text(8), tags=["soak"]) for _ in range(20)],
                ),
                metadata=md,
                timeout=10,
            )

    def call(self, rpc: str) -> Callable[[], Awaitable[Any]]:
        md, user, session = self.who()
        s = self.suite
        if rpc == "Complete":
            req = gpb.CompleteRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=self.text(12))],
                max_tokens=32,
            )
            return lambda: s.gateway().Complete(req, metadata=md, timeout=DEADLINE_S)
        if rpc == "AppendMessages":
            self.turn += 1
            req_a = mpb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[
                    mpb.NewMessage(
                        message=common_pb2.ChatMessage(
                            role=common_pb2.ROLE_USER, content=self.text(20)
                        ),
                        client_message_id=f"c{self.turn}",
                    )
                ],
            )
            return lambda: s.memory().AppendMessages(req_a, metadata=md, timeout=DEADLINE_S)
        if rpc == "Recall":
            req_r = mpb.RecallRequest(user_id=user, query=self.text(3), k=8)
            return lambda: s.memory().Recall(req_r, metadata=md, timeout=DEADLINE_S)
        if rpc == "ComputeMetrics":
            req_c = apb.ComputeMetricsRequest(
                symbols=self.rnd.sample(self.symbols, k=min(3, len(self.symbols))),
                range=self.date_range(),
                benchmark=self.symbols[0],
            )
            return lambda: s.analytics().ComputeMetrics(req_c, metadata=md, timeout=DEADLINE_S)
        if rpc == "Analyze":
            req_z = apb.AnalyzeRequest(
                session_id=f"{session}-an",
                user_id=user,
                symbols=self.rnd.sample(self.symbols, k=min(2, len(self.symbols))),
                question=f"how risky is this? {self.text(5)}",
                range=self.date_range(),
            )
            return lambda: s.analytics().Analyze(req_z, metadata=md, timeout=DEADLINE_S)
        raise KeyError(rpc)


async def drive(
    rate: float,
    seconds: float,
    pick: Callable[[], tuple[str, Callable[[], Awaitable[Any]]]],
    recorder: Recorder,
    on_tick: Callable[[float], None] | None = None,
    record_after: float = 0.0,
) -> float:
    """Send `rate` requests per second for `seconds` (open loop); returns the time taken
    until the last answer. Requests sent in the first `record_after` seconds are not
    recorded (ramp-up)."""
    ramp = Recorder()
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate
    i = 0
    next_tick = 0.0
    while True:
        slot = started + i * interval
        now = time.perf_counter()
        if slot - started >= seconds:
            break
        if slot > now:
            await asyncio.sleep(slot - now)
        elif now - slot > 0.05:
            recorder.late_starts += 1
        if on_tick is not None and now - started >= next_tick:
            on_tick(now - started)
            next_tick += SAMPLE_EVERY_S
        if len(tasks) < MAX_IN_FLIGHT:
            rpc, call = pick()
            target = recorder if now - started >= record_after else ramp
            task = asyncio.create_task(target.run(rpc, call))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            recorder.errors["generator:in_flight_cap"] += 1
        i += 1
    if tasks:
        await asyncio.wait(tasks)
    return time.perf_counter() - started


# -- soak ------------------------------------------------------------------------------------
async def soak(suite: Suite, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    names = list(MIX)
    weights = [MIX[n] for n in names]
    samples = ProcessSamples()
    t0 = time.perf_counter()

    def pick() -> tuple[str, Callable[[], Awaitable[Any]]]:
        rpc = workload.rnd.choices(names, weights)[0]
        return rpc, workload.call(rpc)

    def tick(_: float) -> None:
        samples.take(suite, time.perf_counter() - t0)

    warm = Recorder()
    await drive(args.rate, args.warmup, pick, warm, tick)
    warm_end = time.perf_counter() - t0
    samples.take(suite, warm_end)
    duck_start = await duckdb_memory(suite)
    heap_start = await native_heap(suite)
    rec = Recorder()
    elapsed = await drive(args.rate, args.duration, pick, rec, tick)
    await asyncio.sleep(IDLE_BEFORE_END_SAMPLE_S)  # let in-flight work and pools settle
    end = time.perf_counter() - t0
    samples.take(suite, end)
    duck_end = await duckdb_memory(suite)
    heap_end = await native_heap(suite)

    processes: dict[str, Any] = {}
    for name in SERVICE_NAMES:
        _, rss0, fd0, sock0 = samples.at(name, warm_end)
        _, rss1, fd1, sock1 = samples.samples[name][-1]
        peak = max(r[1] for r in samples.samples[name])
        processes[name] = {
            "rss_start_mib": round(rss0 / 2**20, 1),
            "rss_end_mib": round(rss1 / 2**20, 1),
            "rss_peak_mib": round(peak / 2**20, 1),
            "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1),
            "fds_start": fd0,
            "fds_end": fd1,
            "sockets_start": sock0,
            "sockets_end": sock1,
            "sockets_peak": max(r[3] for r in samples.samples[name]),
            # A bounded rise (caches, DuckDB's eviction queues) is over by then; a leak is not.
            "rss_growth_second_half_pct": round(
                100 * (rss1 - samples.at(name, (warm_end + end) / 2)[1]) / rss0, 1
            ),
        }
        if name in duck_start and name in duck_end:  # how much of the RSS is DuckDB's
            processes[name]["duckdb_start_mib"] = round(duck_start[name] / 2**20, 1)
            processes[name]["duckdb_end_mib"] = round(duck_end[name] / 2**20, 1)
        if name in heap_start and name in heap_end:  # allocated native memory (not freed)
            processes[name]["heap_in_use_start_mib"] = round(heap_start[name] / 2**20, 1)
            processes[name]["heap_in_use_end_mib"] = round(heap_end[name] / 2**20, 1)
    per_rpc = rec.summary(elapsed)
    errors = sum(rec.errors.values())
    leaks = scan_logs(suite)
    targets = {
        "zero_errors": errors == 0,
        "rss_growth_under_10pct": all(
            p["rss_growth_pct"] < 100 * RSS_GROWTH_LIMIT for p in processes.values()
        ),
        "no_fd_growth": all(
            (p["fds_end"] - p["sockets_end"]) - (p["fds_start"] - p["sockets_start"])
            <= FD_GROWTH_LIMIT
            and p["sockets_end"] - p["sockets_start"] <= SOCKET_GROWTH_LIMIT
            for p in processes.values()
        ),
        "no_secrets_in_logs": not leaks["found"],
    }
    return {
        "rate_rps": args.rate,
        "warmup_s": args.warmup,
        "duration_s": round(elapsed, 1),
        "requests": sum(rec.sent.values()),
        "throughput_rps": round(sum(len(v) for v in rec.latencies.values()) / elapsed, 2),
        "errors": errors,
        "errors_by_status": dict(rec.errors),
        "warmup_errors": dict(warm.errors),
        "late_starts": rec.late_starts,
        "rpcs": per_rpc,
        "processes": processes,
        "rss_series_mib": rss_series(samples, warm_end, end),
        "timeline": {  # (s, RSS MiB, fds, sockets)
            name: [(round(t, 1), round(r / 2**20, 1), f, k) for t, r, f, k in rows]
            for name, rows in samples.samples.items()
        },
        "log_scan": leaks,
        "targets": targets,
    }


def rss_series(samples: ProcessSamples, start: float, end: float) -> dict[str, dict[str, float]]:
    """RSS (MiB) of each process after the warm-up, at each quarter of the run, at the end."""
    marks = {"warm-up": start}
    marks |= {f"{q * 25}%": start + q * (end - start) / 4 for q in (1, 2, 3)}
    out: dict[str, dict[str, float]] = {}
    for name in samples.samples:
        row = {label: round(samples.at(name, t)[1] / 2**20, 1) for label, t in marks.items()}
        row["end"] = round(samples.samples[name][-1][1] / 2**20, 1)
        out[name] = row
    return out


async def duckdb_memory(suite: Suite) -> dict[str, float]:
    """DuckDB's buffer memory of the stateful services (`finsight_db_memory_bytes`, set by
    their readiness rounds), to tell its growth from the rest of the RSS."""
    out: dict[str, float] = {}
    for name in ("memory", "analytics"):
        with contextlib.suppress(Exception):
            out[name] = await suite.metric(name, "finsight_db_memory_bytes")
    return out


async def native_heap(suite: Suite) -> dict[str, float]:
    """malloc's bytes in use in each service (`finsight_native_heap_bytes`): a rise of the
    RSS that is not in use is fragmentation, one that is, is held by someone."""
    out: dict[str, float] = {}
    for name in SERVICE_NAMES:
        with contextlib.suppress(Exception):
            out[name] = await suite.metric(name, "finsight_native_heap_bytes", {"state": "in_use"})
    return out


def scan_logs(suite: Suite) -> dict[str, Any]:
    """Every log file of the run, searched for the keys file's plaintext keys, the provider
    key and unredacted bearer tokens."""
    import re

    k = suite.keys
    secrets = [k.admin, k.alice, k.alice_rotated, k.bob, k.expired, k.narrow, DEFAULT_API_KEY]
    bearer = re.compile(r"(?i)bearer\s+(?!\[REDACTED\])\S{6,}")
    lines = 0
    found: list[str] = []
    for path in suite.log_paths():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            lines += 1
            if any(s in line for s in secrets) or bearer.search(line):
                found.append(f"{path.name}: {line[:200]}")
    return {"files": [p.name for p in suite.log_paths()], "lines": lines, "found": found[:20]}


async def exercise_credentials(suite: Suite) -> None:
    """Calls with every identity and bad keys, so the log scan has something to find."""
    for who in ("admin", "alice", "alice_rotated", "bob", "expired", "narrow"):
        for stub_call in (
            lambda md: suite.gateway().ListModels(gpb.ListModelsRequest(), metadata=md, timeout=5),
            lambda md: suite.memory().GetConsent(
                mpb.GetConsentRequest(user_id="soak-u0"), metadata=md, timeout=5
            ),
            lambda md: suite.analytics().ListSymbols(
                apb.ListSymbolsRequest(), metadata=md, timeout=5
            ),
        ):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub_call(suite.md(who))


# -- capacity --------------------------------------------------------------------------------
async def capacity(suite: Suite, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    provider_s = args.provider_latency_ms / 1000

    def picker(service: str) -> Callable[[], tuple[str, Callable[[], Awaitable[Any]]]]:
        def pick() -> tuple[str, Callable[[], Awaitable[Any]]]:
            if service == "llm_gateway":
                rpc = "Complete"
            elif service == "memory":
                rpc = workload.rnd.choice(["Recall", "AppendMessages"])
            else:
                rpc = "ComputeMetrics"
            return rpc, workload.call(rpc)

        return pick

    async def step(service: str, rate: float) -> dict[str, Any]:
        # Enough answers for a p99 that is not one outlier, after a second of ramp-up.
        seconds = min(max(args.step_s, CAPACITY_MIN_SAMPLES / rate), CAPACITY_MAX_STEP_S) + 1.0
        rec = Recorder()
        pid = suite.pid(service)
        assert pid is not None
        cpu0 = cpu_seconds(pid)
        await drive(rate, seconds, picker(service), rec, record_after=1.0)
        cpu = cpu_seconds(pid) - cpu0
        lat = [x for v in rec.latencies.values() for x in v]
        sent = sum(rec.sent.values()) + round(rate)  # + the ramp-up second's requests
        p99 = pct(lat, 0.99)
        own = p99 - (provider_s if service == "llm_gateway" else 0.0)
        achieved = len(lat) / (seconds - 1.0)
        ok = not rec.errors and own < P99_TARGET_S and achieved >= 0.95 * rate
        return {
            "rate": round(rate, 1),
            "seconds": round(seconds, 1),
            "answers": len(lat),
            "achieved_rps": round(achieved, 1),
            "p50_ms": round(pct(lat, 0.5) * 1000, 1),
            "p99_ms": round(p99 * 1000, 1),
            "p99_own_ms": round(own * 1000, 1),
            "errors": sum(rec.errors.values()),
            # The service's own CPU per request: unlike latency, other processes on the
            # machine barely change it. 1000 / cpu_ms is the rate one fully used core serves.
            "cpu_ms_per_request": round(1000 * cpu / max(1, sent), 2),
            "held": ok,
        }

    async def search(service: str) -> dict[str, Any]:
        """Double while the rate holds; halve while it does not; then one bisection step."""
        steps: list[dict[str, Any]] = []

        async def tried(rate: float) -> bool:
            result = await step(service, rate)
            steps.append(result)
            print(f"  capacity {service}: {result}", flush=True)
            return bool(result["held"])

        rate, good, bad = args.capacity_start, 0.0, None
        if await tried(rate):
            good = rate
            while rate * 2 <= args.capacity_max:
                rate *= 2
                if not await tried(rate):
                    bad = rate
                    break
                good = rate
        else:
            bad = rate
            while rate / 2 >= CAPACITY_MIN_RATE:
                rate /= 2
                if await tried(rate):
                    good = rate
                    break
                bad = rate
        if bad is not None and good > 0 and await tried((good + bad) / 2):
            good = (good + bad) / 2
        cpu_ms = min(x["cpu_ms_per_request"] for x in steps)
        return {
            "held_rps": good,
            "cpu_ms_per_request": cpu_ms,
            "one_core_rps": round(1000 / cpu_ms) if cpu_ms else None,
            "steps": steps,
        }

    out: dict[str, Any] = {}
    for service in ("llm_gateway", "memory", "analytics"):
        out[service] = await search(service)
        await asyncio.sleep(2)  # let queues drain before the next service
    return out


# -- main ------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="finsight-soak-"))
    env = {
        # The service itself is measured, not the per-caller limits (they have their tests).
        "FINSIGHT_RATE_LIMIT_ENABLED": "false",
        "LLM_GATEWAY_RPM": "0",
        "LLM_GATEWAY_TPM": "0",
        "FINSIGHT_DB_WORKERS": "4",
    }
    if args.retention_s > 0:  # a fixed data size (see the module's docstring)
        days = f"{args.retention_s / 86_400:.9f}"
        env["MEMORY_MESSAGE_RETENTION_DAYS"] = days
        env["MEMORY_AUDIT_RETENTION_DAYS"] = days
        env["MEMORY_PURGE_INTERVAL_S"] = f"{max(10.0, args.retention_s / 5):g}"
    suite = Suite(root, env=env, provider_latency_ms=args.provider_latency_ms)
    started = time.perf_counter()
    await suite.up()
    result: dict[str, Any] = {"started_s": round(time.perf_counter() - started, 1)}
    try:
        listed = await suite.analytics().ListSymbols(
            apb.ListSymbolsRequest(), metadata=suite.md("alice"), timeout=10
        )
        symbols = [s.symbol for s in listed.symbols if s.bar_count > 1000][:6]
        workload = Workload(suite, symbols)
        await workload.seed()
        await exercise_credentials(suite)
        print(
            f"soak: {args.rate} rps for {args.duration:.0f}s after {args.warmup:.0f}s warm-up, "
            f"symbols {symbols}, provider delay {args.provider_latency_ms} ms, "
            + (
                f"memory retention {args.retention_s:g}s (fixed data size)"
                if args.retention_s > 0
                else "no retention (the data grows)"
            ),
            flush=True,
        )
        if args.duration > 0:
            result["soak"] = await soak(suite, workload, args)
            print_soak(result["soak"])
        if args.capacity:
            print("capacity probe:", flush=True)
            result["capacity"] = await capacity(suite, workload, args)
            held = ", ".join(
                f"{k} {v['held_rps']:g} rps ({v['cpu_ms_per_request']} ms CPU/request, "
                f"~{v['one_core_rps']} rps per core)"
                for k, v in result["capacity"].items()
            )
            print(f"capacity (p99 < 100 ms; gateway: its own share of the p99): {held}")
    finally:
        await suite.down()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}")
    missed = [k for k, ok in result.get("soak", {}).get("targets", {}).items() if not ok]
    if missed:
        print(f"SOAK TARGETS MISSED: {', '.join(missed)}")
        return 1
    print("soak targets met" if "soak" in result else "no soak run (--duration 0)")
    return 0


def print_soak(r: dict[str, Any]) -> None:
    print(
        f"\nsoak: {r['requests']} requests in {r['duration_s']} s, "
        f"{r['throughput_rps']} rps answered, {r['errors']} errors {r['errors_by_status']}, "
        f"late starts {r['late_starts']}"
    )
    print(
        f"{'RPC':<16} {'sent':>6} {'ok':>6} {'err':>4} {'rps':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    for rpc, x in r["rpcs"].items():
        print(
            f"{rpc:<16} {x['sent']:>6} {x['ok']:>6} {x['errors']:>4} {x['throughput_rps']:>7} "
            f"{x['p50_ms']:>8} {x['p95_ms']:>8} {x['p99_ms']:>8}"
        )
    print(
        f"{'process':<12} {'RSS start':>10} {'RSS end':>9} {'peak':>7} {'growth':>7} "
        f"{'fds':>9} {'sockets':>9} {'peak':>5} {'2nd half':>8}"
    )
    for name, p in r["processes"].items():
        print(
            f"{name:<12} {p['rss_start_mib']:>9}M {p['rss_end_mib']:>8}M {p['rss_peak_mib']:>6}M "
            f"{p['rss_growth_pct']:>6}% {p['fds_start']:>4}->{p['fds_end']:<4} "
            f"{p['sockets_start']:>4}->{p['sockets_end']:<4} {p['sockets_peak']:>5} "
            f"{p['rss_growth_second_half_pct']:>7}%"
            + (
                f"  duckdb {p['duckdb_start_mib']}M->{p['duckdb_end_mib']}M"
                if "duckdb_start_mib" in p
                else ""
            )
            + (
                f"  heap in use {p['heap_in_use_start_mib']}M->{p['heap_in_use_end_mib']}M"
                if "heap_in_use_start_mib" in p
                else ""
            )
        )
    for name, series in r["rss_series_mib"].items():
        print(f"RSS {name}: " + ", ".join(f"{k} {v}M" for k, v in series.items()))
    scan = r["log_scan"]
    print(
        f"log scan: {scan['lines']} lines in {len(scan['files'])} files, {len(scan['found'])} secrets"
    )
    print(f"targets: {r['targets']}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--duration", type=float, default=float(os.environ.get("SOAK_DURATION_S", "600"))
    )
    p.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE", "20")))
    p.add_argument("--warmup", type=float, default=float(os.environ.get("SOAK_WARMUP_S", "30")))
    p.add_argument(
        "--retention-s",
        type=float,
        default=float(os.environ.get("SOAK_RETENTION_S", "300")),
        help="memory's message and audit retention during the run (0: keep every row)",
    )
    p.add_argument("--provider-latency-ms", type=float, default=50.0)
    p.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--step-s", type=float, default=8.0, help="seconds per capacity step")
    p.add_argument("--capacity-start", type=float, default=25.0)
    p.add_argument("--capacity-max", type=float, default=3200.0)
    p.add_argument("--out", default=str(ROOT / ".build" / "reliability" / "soak.json"))
    return p.parse_args(argv)


def main() -> None:
    sys.exit(asyncio.run(main_async(parse(sys.argv[1:]))))


if __name__ == "__main__":
    main()
