"""Command line: ``python -m libs.devprovider`` (serve, or ``--bench``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from libs.devprovider.clients import READY_PREFIX, DevProviderProcess
from libs.devprovider.load import run_load
from libs.devprovider.server import DevProvider
from libs.devprovider.state import DEFAULT_API_KEY


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m libs.devprovider",
        description="Local OpenAI/DeepSeek-compatible provider for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument(
        "--latency-ms", type=float, default=None, help="fixed latency (serve: 0, --bench: 50)"
    )
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="expected Bearer key")
    parser.add_argument("--no-auth", action="store_true", help="accept any or no key")
    parser.add_argument("--default-action", type=json.loads, help="sticky action as JSON")
    parser.add_argument("--log-limit", type=int, default=10_000, help="request-log entries kept")
    parser.add_argument("--bench", action="store_true", help="measure throughput and exit")
    parser.add_argument("--bench-requests", type=int, default=20_000)
    parser.add_argument("--bench-concurrency", type=int, default=100)
    parser.add_argument("--bench-stream", action="store_true")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    provider = DevProvider(
        host=args.host,
        port=args.port,
        api_key=None if args.no_auth else args.api_key,
        latency_ms=args.latency_ms or 0.0,
        log_limit=args.log_limit,
    )
    if args.default_action is not None:
        provider.state.script(default=args.default_action)
    await provider.start()
    print(f"{READY_PREFIX}{provider.root_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await provider.stop()
    return 0


async def _bench(args: argparse.Namespace) -> int:
    latency = 50.0 if args.latency_ms is None else args.latency_ms
    async with DevProviderProcess(latency_ms=latency) as provider:
        common: dict[str, Any] = {
            "concurrency": args.bench_concurrency,
            "stream": args.bench_stream,
        }
        await run_load(provider.base_url, requests=min(2_000, args.bench_requests), **common)
        result = await run_load(provider.base_url, requests=args.bench_requests, **common)
    report = {"latency_ms": latency, **common, **result.as_dict()}
    print(json.dumps(report))
    return 0 if result.errors == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    runner: Callable[[argparse.Namespace], Any] = _bench if args.bench else _serve
    with contextlib.suppress(KeyboardInterrupt):
        return int(asyncio.run(runner(args)))
    return 130
