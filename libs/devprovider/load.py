"""Load generator (``--bench`` and the benchmarks): a raw-socket keep-alive client."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from libs.devprovider.state import DEFAULT_API_KEY
from libs.devprovider.wire import json_bytes, parse_headers


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bench_request(base_url: str, api_key: str | None, stream: bool) -> tuple[str, int, bytes]:
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = json_bytes(
        {
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "benchmark ping with a few words"}],
            "max_tokens": 16,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {url.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"{auth}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked) and return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = parse_headers(head[:-4].decode("latin-1").split("\r\n")[1:])
    if "chunked" in headers.get("transfer-encoding", ""):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status


async def run_load(
    base_url: str,
    *,
    requests: int = 5_000,
    concurrency: int = 100,
    api_key: str | None = DEFAULT_API_KEY,
    stream: bool = False,
    time_limit_s: float = 120.0,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections share ``requests`` requests.

    Bounded by both the request count and ``time_limit_s`` so it always stops by itself.
    """
    host, port, request = _bench_request(base_url, api_key, stream)
    tickets = iter(range(requests))
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + time_limit_s

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in tickets:
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            writer.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
    seconds = time.perf_counter() - started
    errors += sum(isinstance(r, BaseException) for r in results)
    return _summarise(latencies, errors, seconds)


def _summarise(latencies: list[float], errors: int, seconds: float) -> LoadResult:
    ordered = sorted(latencies) or [0.0]

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return LoadResult(
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=round(ordered[-1] * 1000, 2),
    )
