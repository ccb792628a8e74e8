"""Recording RPC outcomes under faults: status, reason, latency against the deadline.

tally = Tally()
reply = await tally.call("Complete", lambda t: stub.Complete(req, metadata=md, timeout=t), 5)
assert not tally.unexpected({"Complete": {"OK", "UNAVAILABLE/PROVIDER_UNAVAILABLE"}})
assert not tally.late()
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from libs.common.errors import status_info

T = TypeVar("T")

# How far past its deadline a call may return and still count as "within its deadline":
# the client cancels at the deadline; this is scheduling noise on a loaded 2-core machine.
DEADLINE_SLACK_S = 0.5
# The details grpc's asyncio client gives the status it sets when a request-stream write
# fails in grpc core (the peer is gone); a server never sends it.
CLIENT_WRITE_FAILED = "Internal error from Core"


@dataclass
class Call:
    rpc: str
    started: float  # time.monotonic()
    ended: float
    deadline_s: float
    code: str  # "OK" or the grpc.StatusCode name
    reason: str = ""  # google.rpc.ErrorInfo reason, when any
    message: str = ""
    retry_after: float | None = None
    tag: str = ""  # free label (a phase of the test, a worker)
    metadata: dict[str, str] = field(default_factory=dict)  # ErrorInfo metadata

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def outcome(self) -> str:
        """ "OK", "CODE" or "CODE/REASON"."""
        return f"{self.code}/{self.reason}" if self.reason else self.code

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def connection_lost(self) -> bool:
        """The call failed because the server went away: UNAVAILABLE, or the INTERNAL status
        grpc's asyncio client sets itself when writing a request stream onto a connection the
        server dropped ("Internal error from Core", grpc/grpc#34148: no server sent it)."""
        return self.code == "UNAVAILABLE" or (
            self.code == "INTERNAL" and self.message == CLIENT_WRITE_FAILED
        )


@dataclass
class Tally:
    calls: list[Call] = field(default_factory=list)
    tag: str = ""  # applied to calls recorded from now on

    async def call(
        self,
        rpc: str,
        make: Callable[[float], Awaitable[T]],
        deadline_s: float,
    ) -> T | None:
        """Run `make(deadline_s)` and record it (tagged with the tag current when it
        started); the reply, or None when it failed."""
        started, tag = time.monotonic(), self.tag
        try:
            reply = await make(deadline_s)
        except grpc.aio.AioRpcError as err:
            info = status_info(err)
            self.calls.append(
                Call(
                    rpc,
                    started,
                    time.monotonic(),
                    deadline_s,
                    info.code.name,
                    info.reason or "",
                    info.message[:300],
                    info.retry_after,
                    tag,
                    dict(info.metadata),
                )
            )
            return None
        self.calls.append(Call(rpc, started, time.monotonic(), deadline_s, "OK", tag=tag))
        return reply

    async def stream(
        self, rpc: str, make: Callable[[float], Any], deadline_s: float
    ) -> list[Any] | None:
        """A server-streaming call read to its end; the messages, or None when it failed
        (the messages received before the failure are in `self.partial`)."""
        received: list[Any] = []
        self.partial = received

        async def read(timeout: float) -> list[Any]:
            async for message in make(timeout):
                received.append(message)
            return received

        return await self.call(rpc, read, deadline_s)

    # -- queries -----------------------------------------------------------------------------
    def of(self, rpc: str | None = None, tag: str | None = None) -> list[Call]:
        return [
            c for c in self.calls if (rpc is None or c.rpc == rpc) and (tag is None or c.tag == tag)
        ]

    def outcomes(self, rpc: str | None = None, tag: str | None = None) -> Counter[str]:
        return Counter(c.outcome for c in self.of(rpc, tag))

    def unexpected(self, allowed: Mapping[str, Iterable[str]]) -> list[Call]:
        """Calls whose outcome ("OK", "CODE" or "CODE/REASON") is not allowed for its RPC."""
        out = []
        for c in self.calls:
            ok = set(allowed.get(c.rpc, ()))
            if c.outcome not in ok and c.code not in ok:
                out.append(c)
        return out

    def late(self, slack_s: float = DEADLINE_SLACK_S) -> list[Call]:
        """Calls that returned later than their deadline (+ slack): a hung RPC."""
        return [c for c in self.calls if c.elapsed > c.deadline_s + slack_s]

    def summary(self, tag: str | None = None) -> dict[str, dict[str, Any]]:
        """Per RPC: count, outcomes, p50/p99/max latency in ms."""
        out: dict[str, dict[str, Any]] = {}
        for rpc in sorted({c.rpc for c in self.of(tag=tag)}):
            calls = self.of(rpc, tag)
            lat = sorted(c.elapsed * 1000 for c in calls)
            out[rpc] = {
                "n": len(calls),
                "outcomes": dict(self.outcomes(rpc, tag)),
                "p50_ms": round(statistics.median(lat), 1),
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                "max_ms": round(lat[-1], 1),
            }
        return out


async def run_workers(
    workers: Iterable[Callable[[], Awaitable[None]]], stop: asyncio.Event, *, limit_s: float
) -> None:
    """Run each worker in a loop until `stop` is set (or `limit_s` passes), then wait for
    the calls in progress to finish."""

    async def loop(work: Callable[[], Awaitable[None]]) -> None:
        while not stop.is_set():
            await work()

    tasks = [asyncio.create_task(loop(w)) for w in workers]
    try:
        await asyncio.wait_for(stop.wait(), timeout=limit_s)
    except TimeoutError:
        stop.set()
    await asyncio.gather(*tasks)
