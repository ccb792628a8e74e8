"""Faults survived: the running system (separate processes) under provider, Redis and
process faults. Each test asserts its outcome and records its figures (docs/reliability.md,
"Faults survived").

Quick versions run in `make test` on the session suite (tests/system/conftest.py); the
`test_chaos_*` versions (marked slow: longer, heavier, repeated) run from `make chaos`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any

import grpc
import pytest
from google.type import date_pb2

from finsight.analytics.v1 import analytics_pb2 as an
from finsight.common.v1 import common_pb2 as cm
from finsight.llm.v1 import llm_gateway_pb2 as gw
from finsight.memory.v1 import memory_pb2 as mem
from tests.system.calls import Call, Tally, run_workers
from tests.system.harness import (
    CLOSED,
    DEFAULT_ENV,
    FALLBACK_ROUTE,
    NOT_SERVING,
    OPEN,
    SERVING,
    Suite,
)

Figures = Callable[..., None]

# What a caller may see from the gateway when the provider misbehaves (docs/llm_gateway.md,
# "Error mapping"): a success, or one of these.
PROVIDER_TROUBLE = {
    "UNAVAILABLE/PROVIDER_UNAVAILABLE",
    "UNAVAILABLE/PROVIDER_RATE_LIMITED",
    "UNAVAILABLE/PROVIDER_CIRCUIT_OPEN",
}
# A call that runs out of its deadline at the gateway (never UNAVAILABLE: that would invite
# a retry of a call that only ran out of time), whether the gateway said so (reason
# DEADLINE_EXCEEDED) or the client's own deadline fired first. Compared with the code.
PAST_DEADLINE = {"DEADLINE_EXCEEDED"}
BREAKER_RESET_S = float(DEFAULT_ENV["LLM_GATEWAY_BREAKER_RESET_S"])
ATTEMPT_TIMEOUT_S = float(DEFAULT_ENV["LLM_GATEWAY_ATTEMPT_TIMEOUT_S"])


def uid() -> str:
    return uuid.uuid4().hex[:8]


def user(text: str) -> cm.ChatMessage:
    return cm.ChatMessage(role=cm.ROLE_USER, content=text)


def complete_req(text: str, model: str = "") -> gw.CompleteRequest:
    return gw.CompleteRequest(model=model, messages=[user(text)], max_tokens=16)


def stream_req(text: str) -> gw.StreamCompleteRequest:
    return gw.StreamCompleteRequest(messages=[user(text)], max_tokens=32)


def gdate(d: date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def analyze_req(session: str, question: str, user_id: str = "u-faults") -> an.AnalyzeRequest:
    return an.AnalyzeRequest(
        session_id=session,
        user_id=user_id,
        symbols=["AAPL"],
        question=question,
        range=cm.DateRange(start=gdate(date(2019, 1, 1)), end=gdate(date(2022, 12, 28))),
    )


def metrics_req() -> an.ComputeMetricsRequest:
    year = random.randint(2005, 2021)
    return an.ComputeMetricsRequest(
        symbols=["AAPL", "MSFT"],
        benchmark="SP500",
        range=cm.DateRange(start=gdate(date(year, 1, 1)), end=gdate(date(year, 12, 31))),
    )


def problems(calls: list[Call], limit: int = 8) -> str:
    return "\n".join(
        f"{c.rpc} [{c.tag}] {c.outcome} after {c.elapsed:.2f}s (deadline {c.deadline_s}s): "
        f"{c.message}"
        for c in calls[:limit]
    )


def assert_documented(tally: Tally, allowed: dict[str, set[str]]) -> None:
    """Every call ended within its deadline, with an allowed outcome."""
    assert not tally.late(), "hung or late RPCs:\n" + problems(tally.late())
    bad = tally.unexpected(allowed)
    assert not bad, "undocumented outcomes:\n" + problems(bad)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1
) -> float:
    """Poll `check` until it is true; the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout}s: {check}")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------------------------
# LLM provider faults
# ----------------------------------------------------------------------------------------------


async def test_provider_error_bursts_end_in_retry_success_or_documented_status(
    suite: Suite, figures: Figures
) -> None:
    stub, md, ctl = suite.gateway(), suite.md(), suite.control
    t = Tally()
    run = uid()

    async def complete(text: str, model: str = "", deadline: float = 5.0) -> Any:
        req = complete_req(f"{run} {text}", model)
        return await t.call(
            "Complete", lambda d: stub.Complete(req, metadata=md, timeout=d), deadline
        )

    # 429 with Retry-After, then 500: both retried, the Retry-After honoured.
    await ctl.script({"status": 429, "retry_after": 0.4}, {"status": 500})
    reply = await complete("429 then 500")
    assert reply is not None and reply.attempts == 3, t.calls[-1]
    assert t.calls[-1].elapsed >= 0.4
    # Three 503s: the link's retries are spent -> UNAVAILABLE with RetryInfo.
    await ctl.script({"status": 503, "times": 3})
    assert await complete("503 x3") is None
    last = t.calls[-1]
    assert last.outcome == "UNAVAILABLE/PROVIDER_UNAVAILABLE", last
    assert last.retry_after is not None and last.metadata.get("attempts") == "3"
    assert await complete("healthy") is not None  # a success resets the breaker's count
    # Three 429s with a short Retry-After: PROVIDER_RATE_LIMITED carrying the hint.
    await ctl.script({"status": 429, "retry_after": 0.2, "times": 3})
    assert await complete("429 x3") is None
    last = t.calls[-1]
    assert last.outcome == "UNAVAILABLE/PROVIDER_RATE_LIMITED", last
    assert last.retry_after == pytest.approx(0.2, abs=0.05) and last.elapsed >= 0.4
    assert await complete("healthy again") is not None
    # A Retry-After above LLM_GATEWAY_RETRY_AFTER_CAP_S (5 s) is not waited for.
    await ctl.script({"status": 429, "retry_after": 30})
    assert await complete("429 retry after 30 s") is None
    last = t.calls[-1]
    assert last.outcome == "UNAVAILABLE/PROVIDER_RATE_LIMITED" and last.retry_after == 30
    assert last.elapsed < 1.0
    # Fallback: the first link's three 503s, then the next provider of the route answers.
    await ctl.script({"status": 503, "times": 3})
    reply = await complete("fallback", model=FALLBACK_ROUTE)
    assert reply is not None and reply.provider == "backup" and reply.attempts == 4

    assert await complete("healthy after fallback") is not None

    # Concurrent bursts of 40 calls. Interleaved: 12 errors (429/500/503/502) among
    # successes -> retries absorb them (a call fails only if all 3 attempts meet errors).
    errors = [
        {"status": 429, "retry_after": 0.1} if s == 429 else {"status": s}
        for s in (429, 500, 503, 502) * 3
    ]
    t.tag = "interleaved"
    await ctl.script(*[a for e in errors for a in (e, {})], replace=True)
    await asyncio.gather(*(complete(f"interleaved {i}") for i in range(40)))
    interleaved = t.outcomes(tag="interleaved")
    assert interleaved["OK"] >= 28, interleaved
    # Solid: 12 errors in a row -> the breaker opens (5 consecutive failures) and the rest
    # are refused fast with PROVIDER_CIRCUIT_OPEN; after the reset time calls succeed again.
    opened_before = await suite.metric(
        "llm_gateway",
        "llm_gateway_breaker_transitions_total",
        {"provider": "deepseek", "state": "open"},
    )
    t.tag = "solid"
    await ctl.script(*errors, replace=True)
    await asyncio.gather(*(complete(f"solid {i}") for i in range(40)))
    solid = t.outcomes(tag="solid")
    assert solid["UNAVAILABLE/PROVIDER_CIRCUIT_OPEN"] >= 1, solid
    assert (
        await suite.metric(
            "llm_gateway",
            "llm_gateway_breaker_transitions_total",
            {"provider": "deepseek", "state": "open"},
        )
        > opened_before
    )
    assert_documented(t, {"Complete": {"OK", *PROVIDER_TROUBLE}})
    t.tag = "after"
    await ctl.script(replace=True)  # whatever errors are left are not served
    recovery_s = await wait_until(lambda: _ok(complete("after the burst")), timeout=10)
    assert (await suite.breaker_states())["deepseek"] == CLOSED
    figures(
        sequential={c.outcome: round(c.elapsed, 3) for c in t.of(tag="")},
        interleaved=dict(interleaved),
        solid=dict(solid),
        burst_max_ms=max(c.elapsed for c in t.calls if c.tag in ("interleaved", "solid")) * 1000,
        recovery_s=round(recovery_s, 2),
    )


async def _ok(call: Awaitable[Any]) -> bool:
    return (await call) is not None


async def test_slow_hung_dropped_and_cut_provider_connections(
    suite: Suite, figures: Figures
) -> None:
    stub, md, ctl = suite.gateway(), suite.md(), suite.control
    t = Tally()
    run = uid()
    results: dict[str, Any] = {}

    async def complete(label: str, action: dict[str, Any], deadline: float) -> Any:
        await ctl.script(action)
        req = complete_req(f"{run} {label}")
        t.tag = label
        reply = await t.call(
            "Complete", lambda d: stub.Complete(req, metadata=md, timeout=d), deadline
        )
        results[label] = (t.calls[-1].outcome, round(t.calls[-1].elapsed, 2))
        return reply

    async def stream(label: str, action: dict[str, Any], deadline: float) -> list[Any] | None:
        await ctl.script(action)
        req = stream_req(f"{run} {label} one two three four five six")
        t.tag = label
        got = await t.stream(
            "StreamComplete", lambda d: stub.StreamComplete(req, metadata=md, timeout=d), deadline
        )
        results[label] = (t.calls[-1].outcome, round(t.calls[-1].elapsed, 2))
        return got

    # Slower than the caller's deadline: the call ends at its deadline and the upstream
    # request is cancelled. The status is DEADLINE_EXCEEDED (the gateway's attempt timeout,
    # capped by the deadline, fires a moment before the caller's own and says so).
    since = max((r["id"] for r in await ctl.requests()), default=0)
    assert await complete("slow", {"delay_ms": 4000}, deadline=1.0) is None
    assert t.calls[-1].code in PAST_DEADLINE and t.calls[-1].elapsed < 1.5, t.calls[-1]
    # Hung connection: abandoned after the 2 s attempt timeout, retried, answered.
    reply = await complete("hang", {"hang": True}, deadline=6.0)
    assert reply is not None and reply.attempts == 2
    assert ATTEMPT_TIMEOUT_S - 0.1 <= t.calls[-1].elapsed < 6.0
    # DeepSeek-style keep-alive lines forever: the absolute attempt timeout still applies.
    reply = await complete("keepalive", {"keepalive_lines": 10_000}, deadline=6.0)
    assert reply is not None and reply.attempts == 2
    # Connection dropped without a response, and a body cut half-way: retried at once.
    for label, action in (("drop", {"drop": True}), ("cut", {"cut_after_chunks": 1})):
        reply = await complete(label, action, deadline=5.0)
        assert reply is not None and reply.attempts == 2, label
        assert t.calls[-1].elapsed < 1.5, label

    # Streams: cut before the first token -> retried, the whole answer arrives.
    got = await stream("stream cut before first token", {"cut_after_chunks": 0}, deadline=5.0)
    assert got is not None and got[-1].HasField("end") and got[-1].end.attempts == 2
    # Hung before the first token -> retried after the attempt timeout.
    got = await stream("stream hang", {"hang": True}, deadline=6.0)
    assert got is not None and got[-1].HasField("end")
    # Cut mid-way (after 2 deltas): UNAVAILABLE PROVIDER_STREAM_INTERRUPTED with RetryInfo.
    got = await stream("stream cut mid-way", {"cut_after_chunks": 2}, deadline=5.0)
    assert got is None and len(t.partial) >= 1
    last = t.calls[-1]
    assert last.outcome == "UNAVAILABLE/PROVIDER_STREAM_INTERRUPTED" and last.retry_after, last
    # Tokens slower than the deadline: the stream ends at the deadline with DEADLINE_EXCEEDED.
    got = await stream("stream slow", {"chunk_delay_ms": 600}, deadline=1.5)
    assert got is None and t.calls[-1].code in PAST_DEADLINE, t.calls[-1]

    assert not t.late(), problems(t.late())
    # The gateway closed every upstream request the caller gave up on (nothing left hanging).
    log = [r for r in await ctl.requests(since=since) if r["path"].endswith("/chat/completions")]
    by_action = {str(r["action"]): r for r in log}
    for action in ({"delay_ms": 4000}, {"hang": True}, {"keepalive_lines": 10_000}):
        entry = by_action[str(action)]
        assert entry["cancelled"], entry
    figures(outcomes=results, provider_requests=len(log))


async def test_provider_down_opens_breaker_rules_fallback_and_recovery(
    suite: Suite, figures: Figures
) -> None:
    stub, analytics, md = suite.gateway(), suite.analytics(), suite.md()
    t = Tally()
    run = uid()

    async def complete(text: str, deadline: float = 3.0) -> Any:
        req = complete_req(f"{run} {text}")
        return await t.call(
            "Complete", lambda d: stub.Complete(req, metadata=md, timeout=d), deadline
        )

    async def analyze(text: str, deadline: float = 5.0) -> Any:
        req = analyze_req(f"down-{run}", f"{run} {text}")
        return await t.call(
            "Analyze", lambda d: analytics.Analyze(req, metadata=md, timeout=d), deadline
        )

    await suite.provider_stop()
    down_at = time.monotonic()
    t.tag = "down"
    for i in range(4):
        await complete(f"down {i}")
    outcomes = [c.outcome for c in t.calls]
    assert outcomes[0] == "UNAVAILABLE/PROVIDER_UNAVAILABLE", outcomes
    assert outcomes[-1] == "UNAVAILABLE/PROVIDER_CIRCUIT_OPEN", outcomes
    assert all(c.retry_after for c in t.calls)
    assert t.calls[-1].elapsed < 0.5  # an open circuit answers without calling out
    assert (await suite.breaker_states())["deepseek"] == OPEN
    assert (
        await suite.metric("llm_gateway", "llm_gateway_breaker_state", {"provider": "deepseek"})
        == 1
    )
    # Analyze falls back to the rule-based commentary, within its deadline.
    reply = await analyze("how risky was it while the provider is down?")
    assert reply is not None, problems(t.calls[-1:])
    assert reply.commentary_source == an.COMMENTARY_SOURCE_RULES
    assert any(w.startswith("llm_unavailable: UNAVAILABLE") for w in reply.warnings)
    assert reply.narrative.strip()
    # Streams are refused the same way.
    await t.stream(
        "StreamComplete",
        lambda d: stub.StreamComplete(stream_req(f"{run} stream"), metadata=md, timeout=d),
        3.0,
    )
    assert t.calls[-1].outcome in PROVIDER_TROUBLE
    # Still down after the reset time: the trial call fails and the circuit opens again.
    await asyncio.sleep(BREAKER_RESET_S + 0.3)
    await complete("trial while down")
    assert t.calls[-1].outcome in PROVIDER_TROUBLE
    assert (await suite.breaker_states())["deepseek"] == OPEN
    down_s = time.monotonic() - down_at

    await suite.provider_start()
    t.tag = "back"
    recovery_s = await wait_until(lambda: _ok(complete("back?")), timeout=BREAKER_RESET_S + 8)
    assert (await suite.breaker_states())["deepseek"] == CLOSED
    reply = await analyze("and now that it is back?")
    assert reply is not None and reply.commentary_source == an.COMMENTARY_SOURCE_LLM
    assert not [w for w in reply.warnings if w.startswith("llm_unavailable")], reply.warnings
    assert_documented(
        t,
        {
            "Complete": {"OK", *PROVIDER_TROUBLE},
            "StreamComplete": PROVIDER_TROUBLE,
            "Analyze": {"OK"},
        },
    )
    figures(
        down_s=round(down_s, 1),
        outcomes_while_down=dict(t.outcomes(tag="down")),
        circuit_open_answer_ms=round(t.of("Complete", "down")[-1].elapsed * 1000, 1),
        analyze_rules_ms=round(t.of("Analyze", "down")[0].elapsed * 1000, 1),
        first_success_after_provider_back_s=round(recovery_s, 2),
    )


# ----------------------------------------------------------------------------------------------
# Redis outage
# ----------------------------------------------------------------------------------------------


async def redis_outage(suite: Suite, outage_s: float, workers_per_kind: int = 1) -> dict[str, Any]:
    """Mixed load; Redis stopped for `outage_s` mid-load, then started again. Asserts that
    memory, analytics and the gateway kept answering (fail-open rate limits) and that
    everything recovers without a restart; returns the figures."""
    run = uid()
    session, user_id = f"redis-{run}", f"u-{run}"
    m, a, g, md = suite.memory(), suite.analytics(), suite.gateway(), suite.md()
    pids = {name: suite.pid(name) for name in suite.names}
    tally = Tally(tag="before")
    acked: list[str] = []
    counter = iter(range(1_000_000))
    deadline = 3.0

    async def append() -> None:
        cid = f"{run}-{next(counter)}"
        req = mem.AppendMessagesRequest(
            session_id=session,
            user_id=user_id,
            messages=[mem.NewMessage(message=user(f"message {cid}"), client_message_id=cid)],
        )
        if await tally.call(
            "AppendMessages", lambda d: m.AppendMessages(req, metadata=md, timeout=d), deadline
        ):
            acked.append(cid)

    async def history() -> None:
        req = mem.GetHistoryRequest(
            session_id=session, user_id=user_id, page_size=20, order=mem.SORT_ORDER_DESCENDING
        )
        await tally.call(
            "GetHistory", lambda d: m.GetHistory(req, metadata=md, timeout=d), deadline
        )

    async def context() -> None:
        req = mem.BuildContextRequest(
            session_id=session, user_id=user_id, query="risk", token_budget=1024
        )
        await tally.call(
            "BuildContext", lambda d: m.BuildContext(req, metadata=md, timeout=d), deadline
        )

    async def metrics() -> None:
        req = metrics_req()
        await tally.call(
            "ComputeMetrics", lambda d: a.ComputeMetrics(req, metadata=md, timeout=d), deadline
        )

    async def complete() -> None:
        req = complete_req(f"{run} {next(counter)}")
        await tally.call("Complete", lambda d: g.Complete(req, metadata=md, timeout=d), deadline)
        await asyncio.sleep(0.05)

    async def analyze() -> None:
        req = analyze_req(f"{session}-an", f"{run} {next(counter)}", user_id)
        await tally.call("Analyze", lambda d: a.Analyze(req, metadata=md, timeout=d), 5.0)

    await append()  # the session exists before its history is read
    kinds = [append, append, history, context, metrics, complete, analyze]
    stop = asyncio.Event()
    load = asyncio.create_task(run_workers(kinds * workers_per_kind, stop, limit_s=outage_s + 120))
    await asyncio.sleep(1.5)
    errors_before = await suite.metric(
        "memory", "finsight_ratelimit_redis_errors_total", {"fail_mode": "open"}
    )
    await asyncio.to_thread(suite.redis_stop)
    tally.tag = "outage"
    health: dict[str, set[int]] = {name: set() for name in suite.names}
    outage_end = time.monotonic() + outage_s
    while time.monotonic() < outage_end:
        for name in suite.names:
            health[name].add(await suite.health(name))
        await asyncio.sleep(0.25)
    await asyncio.to_thread(suite.redis_start)
    tally.tag = "after"

    async def recovered() -> bool:
        return all([await suite.health(n) == SERVING for n in suite.names]) and (
            await suite.metric("memory", "finsight_memory_hot_tier_trusted") == 1
            and await suite.metric("memory", "finsight_dependency_up", {"dependency": "redis"}) == 1
        )

    recovery_s = await wait_until(recovered, timeout=30)
    hits_before = await suite.metric(
        "memory", "finsight_memory_hot_tier_reads_total", {"outcome": "hit"}
    )
    await asyncio.sleep(1.5)
    stop.set()
    await load

    assert {name: suite.pid(name) for name in suite.names} == pids  # nothing restarted
    # Memory serves from DuckDB, analytics computes without its cache, the gateway admits
    # (rate limits fail open): no error at all, in any phase.
    assert_documented(
        tally,
        {
            rpc: {"OK"}
            for rpc in (
                "AppendMessages",
                "GetHistory",
                "BuildContext",
                "ComputeMetrics",
                "Complete",
                "Analyze",
            )
        },
    )
    assert tally.of(tag="outage") and all(
        tally.of(rpc, "outage")
        for rpc in ("AppendMessages", "GetHistory", "ComputeMetrics", "Complete")
    )
    # Redis is a cache or fails open everywhere: no service leaves rotation for it.
    assert all(health[name] == {SERVING} for name in suite.names), health
    errors_after = await suite.metric(
        "memory", "finsight_ratelimit_redis_errors_total", {"fail_mode": "open"}
    )
    assert errors_after > errors_before  # the limiter did meet the outage, and admitted
    # The hot tier serves again after recovery (a new session's window is written through
    # and read back), and every acknowledged append is stored.
    fresh = f"{session}-fresh"
    await m.AppendMessages(
        mem.AppendMessagesRequest(
            session_id=fresh, user_id=user_id, messages=[mem.NewMessage(message=user("hello"))]
        ),
        metadata=md,
        timeout=5,
    )
    await m.GetHistory(
        mem.GetHistoryRequest(session_id=fresh, user_id=user_id), metadata=md, timeout=5
    )
    assert (
        await suite.metric("memory", "finsight_memory_hot_tier_reads_total", {"outcome": "hit"})
        > hits_before
    )
    stored = await read_history(suite, session, user_id)
    assert [s for s, _ in stored] == list(range(1, len(stored) + 1))
    assert set(acked) <= {cid for _, cid in stored}
    names = {SERVING: "SERVING", NOT_SERVING: "NOT_SERVING"}
    return {
        "outage_s": outage_s,
        "calls": {tag: dict(tally.outcomes(tag=tag)) for tag in ("before", "outage", "after")},
        "acked_appends": len(acked),
        "health_during_outage": {
            n: sorted(names.get(s, str(s)) for s in v) for n, v in health.items()
        },
        "recovery_s": round(recovery_s, 2),
        "latency_outage": tally.summary("outage"),
        "ratelimit_redis_errors_open": errors_after - errors_before,
    }


async def read_history(suite: Suite, session: str, user_id: str) -> list[tuple[int, str]]:
    """(sequence, client_message_id) of every stored message of a session, in order."""
    out: list[tuple[int, str]] = []
    token = ""
    while True:
        page = await suite.memory().GetHistory(
            mem.GetHistoryRequest(
                session_id=session, user_id=user_id, page_size=500, page_token=token
            ),
            metadata=suite.md(),
            timeout=10,
        )
        out += [(msg.sequence, msg.client_message_id) for msg in page.messages]
        token = page.next_page_token
        if not token:
            return out


async def test_redis_outage_mid_load_is_survived_without_restarts(
    suite: Suite, figures: Figures
) -> None:
    figures(**await redis_outage(suite, outage_s=3.0))


# ----------------------------------------------------------------------------------------------
# SIGKILL during writes
# ----------------------------------------------------------------------------------------------

MESSAGES_PER_APPEND = 3
SERIES_PER_MESSAGE, MESSAGES_PER_STREAM, ROWS = 2, 3, 40


def bar_series(symbol: str, rows: int = ROWS) -> an.BarSeries:
    first = date(2001, 1, 1)
    days = [first + timedelta(days=i) for i in range(rows)]
    close = [100_000_000 + 10_000 * i for i in range(rows)]
    return an.BarSeries(
        symbol=symbol,
        dates=[gdate(d) for d in days],
        open_micros=close,
        high_micros=[c + 1_000_000 for c in close],
        low_micros=[c - 1_000_000 for c in close],
        close_micros=close,
        adj_close_micros=close,
        volumes=[1000 + i for i in range(rows)],
    )


def stream_symbols(run: str, w: int, i: int) -> list[str]:
    return [f"K{run}.{w}.{i}.{j}" for j in range(SERIES_PER_MESSAGE * MESSAGES_PER_STREAM)]


def log_since_last_start(suite: Suite, name: str) -> str:
    text = suite.log_path(name).read_text(errors="replace")
    return text.rsplit("--- devstack: starting", 1)[-1]


async def sigkill_during_writes(
    suite: Suite, *, min_appends: int, min_streams: int, writers: int = 6
) -> dict[str, Any]:
    """Memory (AppendMessages) and analytics (IngestBars) under concurrent write load,
    SIGKILLed together, restarted; asserts every acknowledged write is there, no request or
    stream is partially applied, and both DuckDB files open cleanly. Returns the figures."""
    run = uid()
    m, a, md, admin = suite.memory(), suite.analytics(), suite.md(), suite.md("admin")
    tally = Tally()
    acked_appends: set[tuple[int, int]] = set()
    acked_streams: set[tuple[int, int]] = set()
    tried_streams: set[tuple[int, int]] = set()
    tried_appends: set[tuple[int, int]] = set()
    killed = asyncio.Event()

    async def appender(w: int) -> None:
        for i in range(1_000_000):
            if killed.is_set():
                return
            req = mem.AppendMessagesRequest(
                session_id=f"kill-{run}-{w}",
                user_id="u-kill",
                messages=[
                    mem.NewMessage(message=user(f"{w}-{i}-{j}"), client_message_id=f"{w}-{i}-{j}")
                    for j in range(MESSAGES_PER_APPEND)
                ],
            )
            tried_appends.add((w, i))
            if await tally.call(
                "AppendMessages",
                lambda d, req=req: m.AppendMessages(req, metadata=md, timeout=d),  # type: ignore[misc]
                10,
            ):
                acked_appends.add((w, i))
            else:
                return  # the service is gone

    async def ingester(w: int) -> None:
        for i in range(1_000_000):
            if killed.is_set():
                return
            symbols = stream_symbols(run, w, i)

            async def messages(symbols: list[str] = symbols) -> Any:
                for k in range(MESSAGES_PER_STREAM):
                    chunk = symbols[k * SERIES_PER_MESSAGE : (k + 1) * SERIES_PER_MESSAGE]
                    yield an.IngestBarsRequest(series=[bar_series(s) for s in chunk])
                    await asyncio.sleep(0.02)  # a stream stays open a while: some are cut

            tried_streams.add((w, i))
            reply = await tally.call(
                "IngestBars", lambda d: a.IngestBars(messages(), metadata=admin, timeout=d), 10
            )
            if reply is None:
                return
            assert reply.inserted == len(symbols) * ROWS and reply.rejected == 0, reply
            acked_streams.add((w, i))

    tasks = [asyncio.create_task(appender(w)) for w in range(writers)]
    tasks += [asyncio.create_task(ingester(w)) for w in range(writers // 2)]
    await wait_until(
        lambda: _true(len(acked_appends) >= min_appends and len(acked_streams) >= min_streams),
        timeout=60,
        interval=0.02,
    )
    killed_at = time.monotonic()
    codes = await asyncio.gather(suite.kill("memory"), suite.kill("analytics"))
    killed.set()
    await asyncio.gather(*tasks)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    errors = [c for c in tally.calls if not c.ok]
    assert all(c.connection_lost for c in errors), problems(errors)
    assert all(c.ended >= killed_at - 0.05 for c in errors), problems(errors)

    restart_at = time.monotonic()
    await asyncio.gather(suite.start("memory"), suite.start("analytics"))
    restart_s = time.monotonic() - restart_at
    for name in ("memory", "analytics"):
        log = log_since_last_start(suite, name)
        assert "service started" in log and '"level": "ERROR"' not in log, log[-2000:]

    # Memory: gap-free sequences, each request all-or-nothing, every acknowledged one stored.
    stored_appends: set[tuple[int, int]] = set()
    for w in range(writers):
        stored = await read_history(suite, f"kill-{run}-{w}", "u-kill")
        assert [s for s, _ in stored] == list(range(1, len(stored) + 1))
        cids = [cid for _, cid in stored]
        assert len(cids) == len(set(cids)), "a message stored twice"
        by_request: dict[int, list[int]] = {}
        for cid in cids:
            _, i, j = (int(x) for x in cid.split("-"))
            by_request.setdefault(i, []).append(j)
        for i, parts in by_request.items():
            assert parts == list(range(MESSAGES_PER_APPEND)), f"partial request {w}-{i}: {parts}"
            stored_appends.add((w, i))
    assert acked_appends <= stored_appends, sorted(acked_appends - stored_appends)[:5]
    # Analytics: each stream all-or-nothing (one transaction), every acknowledged one stored.
    listed = await suite.analytics().ListSymbols(
        an.ListSymbolsRequest(), metadata=admin, timeout=10
    )
    counts = {s.symbol: s.bar_count for s in listed.symbols if s.symbol.startswith(f"K{run}.")}
    stored_streams: set[tuple[int, int]] = set()
    for w, i in tried_streams:
        present = [counts.get(s) for s in stream_symbols(run, w, i)]
        assert present == [None] * len(present) or present == [ROWS] * len(present), (
            f"partial stream {w}-{i}: {present}"
        )
        if present[0] is not None:
            stored_streams.add((w, i))
    assert acked_streams <= stored_streams, sorted(acked_streams - stored_streams)[:5]
    return {
        "appends_acked": len(acked_appends),
        "appends_in_flight_at_kill": len(tried_appends - acked_appends),
        "appends_in_flight_committed": len((tried_appends - acked_appends) & stored_appends),
        "streams_acked": len(acked_streams),
        "streams_in_flight_at_kill": len(tried_streams - acked_streams),
        "streams_in_flight_committed": len((tried_streams - acked_streams) & stored_streams),
        "lost_acknowledged": 0,
        "partial": 0,
        "restart_to_serving_s": round(restart_s, 2),
    }


async def _true(value: bool) -> bool:
    return value


async def test_sigkill_during_writes_loses_no_acknowledged_write(
    suite: Suite, figures: Figures
) -> None:
    figures(**await sigkill_during_writes(suite, min_appends=60, min_streams=6))


# ----------------------------------------------------------------------------------------------
# SIGTERM during load
# ----------------------------------------------------------------------------------------------


async def sigterm_under_load(suite: Suite, name: str, concurrency: int) -> dict[str, Any]:
    """Load on `name` (callers stop sending once health says NOT_SERVING, as a load balancer
    would), SIGTERM, wait for the exit. Asserts zero failed RPCs (in flight at the signal
    or sent during the drain), NOT_SERVING before the listener closed, exit code 0."""
    run = uid()
    md = suite.md()
    tally = Tally()
    counter = iter(range(1_000_000))
    host, port = suite.target(name).split(":")

    # The provider's delay keeps gateway calls (and Analyze) in flight when the drain ends
    # and the server stops: they must complete within the shutdown grace.
    if name == "llm_gateway":
        await suite.control.set_default({"delay_ms": 1800})
        g = suite.gateway()

        async def work() -> None:
            req = complete_req(f"{run} {next(counter)}")
            await tally.call("Complete", lambda d: g.Complete(req, metadata=md, timeout=d), 10)

        kinds = [work]
    elif name == "memory":
        m = suite.memory()
        await m.AppendMessages(
            mem.AppendMessagesRequest(
                session_id=f"term-{run}",
                user_id="u-term",
                messages=[mem.NewMessage(message=user("first"))],
            ),
            metadata=md,
            timeout=10,
        )

        async def append() -> None:
            req = mem.AppendMessagesRequest(
                session_id=f"term-{run}",
                user_id="u-term",
                messages=[mem.NewMessage(message=user(f"m {next(counter)}"))],
            )
            await tally.call(
                "AppendMessages", lambda d: m.AppendMessages(req, metadata=md, timeout=d), 10
            )

        async def context() -> None:
            req = mem.BuildContextRequest(
                session_id=f"term-{run}", user_id="u-term", query="what happened", token_budget=2048
            )
            await tally.call(
                "BuildContext", lambda d: m.BuildContext(req, metadata=md, timeout=d), 10
            )

        kinds = [append, append, context]
    else:
        await suite.control.set_default({"delay_ms": 1800})  # < the 2 s attempt timeout
        a = suite.analytics()

        async def analyze() -> None:
            req = analyze_req(f"term-{run}", f"{run} {next(counter)}")
            await tally.call("Analyze", lambda d: a.Analyze(req, metadata=md, timeout=d), 10)

        async def metrics() -> None:
            req = metrics_req()
            await tally.call(
                "ComputeMetrics", lambda d: a.ComputeMetrics(req, metadata=md, timeout=d), 10
            )

        kinds = [analyze, metrics]

    lb_out = asyncio.Event()  # a load balancer saw NOT_SERVING: no new calls
    # Workers start staggered over 1.8 s, so slow calls are in flight at every moment.
    workers = [staggered(kinds[i % len(kinds)], 1.8 * i / concurrency) for i in range(concurrency)]
    load = asyncio.create_task(run_workers(workers, lb_out, limit_s=60))
    await asyncio.sleep(2.5)
    term_at = time.monotonic()
    suite.send_signal(name, signal.SIGTERM)
    seen: dict[str, float] = {}

    async def watch_health() -> None:
        while "not_serving" not in seen:
            try:
                if await suite.health(name, timeout=0.5) != SERVING:
                    seen["not_serving"] = time.monotonic()
                    lb_out.set()
            except grpc.aio.AioRpcError:
                seen.setdefault("not_serving", time.monotonic())  # gone before we saw it
                lb_out.set()
            await asyncio.sleep(0.02)

    async def watch_listener() -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                writer.close()
            except OSError:
                seen["closed"] = time.monotonic()
                return
            await asyncio.sleep(0.02)

    watchers = asyncio.gather(watch_health(), watch_listener())
    code = await suite.wait_exit(name, timeout=60)
    await asyncio.wait_for(watchers, timeout=10)
    await load
    await suite.control.set_default(None)

    assert code == 0, f"{name} exited with {code}"
    assert tally.calls and all(c.ok for c in tally.calls), problems(
        [c for c in tally.calls if not c.ok]
    )
    in_flight_at_term = [c for c in tally.calls if c.started < term_at < c.ended]
    in_flight_at_close = [c for c in tally.calls if c.started < seen["closed"] < c.ended]
    assert in_flight_at_term, "no RPC was in flight at SIGTERM"
    if name == "llm_gateway":  # every call lasts 1.8 s: some were in flight at stop(grace)
        assert in_flight_at_close, "no RPC was in flight when the listener closed"
    assert seen["not_serving"] < seen["closed"], seen
    return {
        "service": name,
        "calls": len(tally.calls),
        "failed": 0,
        "in_flight_at_sigterm": len(in_flight_at_term),
        "in_flight_at_listener_close": len(in_flight_at_close),
        "not_serving_after_ms": round((seen["not_serving"] - term_at) * 1000, 1),
        "listener_closed_after_ms": round((seen["closed"] - term_at) * 1000, 1),
        "exit_code": code,
        "latency": tally.summary(),
    }


def staggered(work: Callable[[], Awaitable[None]], delay: float) -> Callable[[], Awaitable[None]]:
    first = True

    async def run() -> None:
        nonlocal first
        if first:
            first = False
            await asyncio.sleep(delay)
        await work()

    return run


async def test_sigterm_during_load_fails_no_rpc_and_drains_first(
    suite: Suite, figures: Figures
) -> None:
    # analytics first (its dependencies still up), then memory, then the gateway.
    results = [
        await sigterm_under_load(suite, name, concurrency=6)
        for name in ("analytics", "memory", "llm_gateway")
    ]
    for result in results:
        assert result["not_serving_after_ms"] < result["listener_closed_after_ms"]
    started = time.monotonic()
    await asyncio.gather(*(suite.start(name) for name in suite.names))
    figures(results=results, restart_all_s=round(time.monotonic() - started, 2))


# ----------------------------------------------------------------------------------------------
# A downstream service gone
# ----------------------------------------------------------------------------------------------


async def downstream_gone(suite: Suite, down_s: float = 0.0) -> dict[str, Any]:
    """Memory, then the gateway, killed: Analyze keeps answering quickly (no context, not
    stored, then RULES), direct callers get UNAVAILABLE at once; both restarted: Analyze is
    whole again without restarting analytics. Returns the figures."""
    run = uid()
    md = suite.md()
    a = suite.analytics()
    tally = Tally(tag="up")
    analytics_pid = suite.pid("analytics")

    async def analyze(text: str, deadline: float = 5.0) -> Any:
        req = analyze_req(f"gone-{run}", f"{run} {text}")
        return await tally.call(
            "Analyze", lambda d: a.Analyze(req, metadata=md, timeout=d), deadline
        )

    reply = await analyze("all up")
    assert reply is not None and reply.commentary_source == an.COMMENTARY_SOURCE_LLM
    assert not reply.warnings, reply.warnings

    await suite.kill("memory")
    tally.tag = "memory down"
    await tally.call(
        "GetHistory",
        lambda d: suite.memory().GetHistory(
            mem.GetHistoryRequest(session_id=f"gone-{run}", user_id="u-faults"),
            metadata=md,
            timeout=d,
        ),
        5.0,
    )
    assert tally.calls[-1].code == "UNAVAILABLE" and tally.calls[-1].elapsed < 1.0, tally.calls[-1]
    for i in range(3):
        reply = await analyze(f"memory down {i}")
        assert reply is not None and reply.commentary_source == an.COMMENTARY_SOURCE_LLM
        kinds = {w.split(":")[0] for w in reply.warnings}
        assert kinds == {"memory_context_unavailable", "memory_store_failed"}, reply.warnings

    await suite.kill("llm_gateway")
    tally.tag = "both down"
    await tally.call(
        "Complete",
        lambda d: suite.gateway().Complete(complete_req("x"), metadata=md, timeout=d),
        5.0,
    )
    assert tally.calls[-1].code == "UNAVAILABLE" and tally.calls[-1].elapsed < 1.0, tally.calls[-1]
    until = time.monotonic() + down_s
    i = 0
    while True:
        reply = await analyze(f"both down {i}")
        i += 1
        assert reply is not None and reply.commentary_source == an.COMMENTARY_SOURCE_RULES
        kinds = {w.split(":")[0] for w in reply.warnings}
        assert kinds == {"memory_context_unavailable", "memory_store_failed", "llm_unavailable"}
        if time.monotonic() >= until and i >= 3:
            break
        await asyncio.sleep(0.2)
    assert not tally.late(), problems(tally.late())
    slowest_degraded = max(c.elapsed for c in tally.calls if c.tag != "up" and c.rpc == "Analyze")
    assert slowest_degraded < 3.0, problems(tally.calls)

    restart_at = time.monotonic()
    await asyncio.gather(suite.start("memory"), suite.start("llm_gateway"))
    serving_at = time.monotonic()
    tally.tag = "back"

    async def whole() -> bool:
        reply = await analyze("back?")
        return bool(
            reply is not None
            and reply.commentary_source == an.COMMENTARY_SOURCE_LLM
            and not reply.warnings
        )

    recovery_s = await wait_until(whole, timeout=30, interval=0.25)
    assert suite.pid("analytics") == analytics_pid  # analytics recovered by itself
    return {
        "analyze_memory_down_ms": tally.summary("memory down")["Analyze"],
        "analyze_both_down_ms": tally.summary("both down")["Analyze"],
        "direct_call_unavailable_ms": round(tally.of("GetHistory")[0].elapsed * 1000, 1),
        "restart_to_serving_s": round(serving_at - restart_at, 2),
        "analyze_whole_after_serving_s": round(recovery_s, 2),
        "degraded_answers": len([c for c in tally.calls if c.tag in ("memory down", "both down")]),
    }


async def test_downstream_gone_analyze_answers_fast_and_recovers(
    suite: Suite, figures: Figures
) -> None:
    figures(**await downstream_gone(suite))


# ----------------------------------------------------------------------------------------------
# Chaos: the full versions (`make chaos`; durations from CHAOS_* environment variables)
# ----------------------------------------------------------------------------------------------


def knob(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


FAULT_MODES: list[dict[str, Any] | None] = [
    None,
    {"status": 429, "retry_after": 0.2},
    {"status": 500},
    {"status": 502},
    {"status": 503},
    {"delay_ms": 3000},
    {"hang": True},
    {"drop": True},
    {"cut_after_chunks": 1},
    {"keepalive_lines": 10_000},
    {"chunk_delay_ms": 400},
]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_provider_fault_mix_under_load(suite: Suite, figures: Figures) -> None:
    """CHAOS_DURATION_S (60) of Complete, StreamComplete and Analyze load while the
    provider's behaviour changes every 2 s among errors, delays, hangs, drops, cuts and
    keep-alive floods: every call ends within its deadline with a documented outcome,
    Analyze always answers, and the system recovers when the provider does."""
    duration = knob("CHAOS_DURATION_S", 60)
    seed = int(knob("CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    run = uid()
    g, a, md = suite.gateway(), suite.analytics(), suite.md()
    tally = Tally()
    counter = iter(range(10_000_000))
    sources: dict[int, int] = {}

    async def complete() -> None:
        req = complete_req(f"{run} {next(counter)}")
        await tally.call("Complete", lambda d: g.Complete(req, metadata=md, timeout=d), 4.0)

    async def stream() -> None:
        req = stream_req(f"{run} {next(counter)}")
        await tally.stream(
            "StreamComplete", lambda d: g.StreamComplete(req, metadata=md, timeout=d), 4.0
        )

    async def analyze() -> None:
        req = analyze_req(f"chaos-{run}", f"{run} {next(counter)}")
        reply = await tally.call("Analyze", lambda d: a.Analyze(req, metadata=md, timeout=d), 6.0)
        if reply is not None:
            sources[reply.commentary_source] = sources.get(reply.commentary_source, 0) + 1

    opened_before = await suite.metric(
        "llm_gateway", "llm_gateway_breaker_transitions_total", {"state": "open"}
    )
    stop = asyncio.Event()
    load = asyncio.create_task(
        run_workers([complete] * 3 + [stream] * 2 + [analyze] * 2, stop, limit_s=duration + 60)
    )
    modes: dict[str, int] = {}
    until = time.monotonic() + duration
    while time.monotonic() < until:
        mode = rng.choice(FAULT_MODES)
        modes[str(mode)] = modes.get(str(mode), 0) + 1
        tally.tag = str(mode)
        await suite.control.set_default(mode)
        await asyncio.sleep(2.0)
    await suite.control.set_default(None)
    tally.tag = "recovered"
    stop.set()
    await load
    await suite.close_breakers()
    assert await tally.call(
        "Complete", lambda d: g.Complete(complete_req(f"{run} end"), metadata=md, timeout=d), 5.0
    )

    assert_documented(
        tally,
        {
            "Complete": {"OK", *PROVIDER_TROUBLE, *PAST_DEADLINE},
            "StreamComplete": {
                "OK",
                *PROVIDER_TROUBLE,
                *PAST_DEADLINE,
                "UNAVAILABLE/PROVIDER_STREAM_INTERRUPTED",
            },
            "Analyze": {"OK"},
        },
    )
    opened = await suite.metric(
        "llm_gateway", "llm_gateway_breaker_transitions_total", {"state": "open"}
    )
    figures(
        seed=seed,
        duration_s=duration,
        modes=modes,
        summary=tally.summary(),
        analyze_sources={an.CommentarySource.Name(k): v for k, v in sources.items()},
        breaker_opened=opened - opened_before,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_provider_down_for_minutes(suite: Suite, figures: Figures) -> None:
    """The provider process gone for CHAOS_PROVIDER_DOWN_S (120) under steady load:
    Complete answers UNAVAILABLE fast (open circuit, trial calls re-open it), Analyze
    answers with RULES throughout; the provider back: the circuit closes and Analyze
    uses the LLM again, without restarting anything."""
    down_s = knob("CHAOS_PROVIDER_DOWN_S", 120)
    run = uid()
    g, a, md = suite.gateway(), suite.analytics(), suite.md()
    tally = Tally(tag="down")
    counter = iter(range(10_000_000))
    pids = {name: suite.pid(name) for name in suite.names}
    rules = 0

    async def complete() -> None:
        req = complete_req(f"{run} {next(counter)}")
        await tally.call("Complete", lambda d: g.Complete(req, metadata=md, timeout=d), 3.0)
        await asyncio.sleep(0.2)

    async def analyze() -> None:
        nonlocal rules
        req = analyze_req(f"down-{run}", f"{run} {next(counter)}")
        reply = await tally.call("Analyze", lambda d: a.Analyze(req, metadata=md, timeout=d), 5.0)
        if reply is not None and reply.commentary_source == an.COMMENTARY_SOURCE_RULES:
            rules += 1
        await asyncio.sleep(0.5)

    opened_before = await suite.metric(
        "llm_gateway",
        "llm_gateway_breaker_transitions_total",
        {"provider": "deepseek", "state": "open"},
    )
    await suite.provider_stop()
    stop = asyncio.Event()
    load = asyncio.create_task(
        run_workers([complete, complete, analyze], stop, limit_s=down_s + 60)
    )
    await asyncio.sleep(down_s)
    stop.set()
    await load
    opened = await suite.metric(
        "llm_gateway",
        "llm_gateway_breaker_transitions_total",
        {"provider": "deepseek", "state": "open"},
    )
    await suite.provider_start()
    back_at = time.monotonic()
    tally.tag = "back"

    async def complete_ok() -> bool:
        req = complete_req(f"{run} back {next(counter)}")
        return (
            await tally.call("Complete", lambda d: g.Complete(req, metadata=md, timeout=d), 3.0)
            is not None
        )

    recovery_s = await wait_until(complete_ok, timeout=BREAKER_RESET_S + 10, interval=0.25)
    reply = await a.Analyze(analyze_req(f"down-{run}", f"{run} back"), metadata=md, timeout=5)
    assert reply.commentary_source == an.COMMENTARY_SOURCE_LLM

    assert_documented(tally, {"Complete": {"OK", *PROVIDER_TROUBLE}, "Analyze": {"OK"}})
    down_calls = tally.of("Complete", "down")
    assert down_calls and all(c.outcome in PROVIDER_TROUBLE for c in down_calls)
    assert rules == len(tally.of("Analyze", "down"))  # every Analyze fell back to RULES
    assert opened - opened_before >= 2  # trial calls failed and re-opened the circuit
    assert {name: suite.pid(name) for name in suite.names} == pids
    figures(
        down_s=down_s,
        during=tally.summary("down"),
        breaker_opened=opened - opened_before,
        recovery_after_provider_back_s=round(recovery_s, 2),
        recovered_in_s=round(time.monotonic() - back_at, 2),
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_redis_outage_and_fail_closed_mode(suite: Suite, figures: Figures) -> None:
    """Redis stopped for CHAOS_REDIS_DOWN_S (30) under twice the quick test's load (fail
    mode open: nothing fails); then analytics restarted with
    FINSIGHT_RATE_LIMIT_FAIL_MODE=closed: during an outage its calls are refused with
    UNAVAILABLE RATE_LIMITER_UNAVAILABLE (RetryInfo), and accepted again once Redis is back."""
    open_mode = await redis_outage(
        suite, outage_s=knob("CHAOS_REDIS_DOWN_S", 30), workers_per_kind=2
    )
    a, md = suite.analytics(), suite.md()
    tally = Tally(tag="closed, redis up")

    async def metrics() -> Any:
        req = metrics_req()
        return await tally.call(
            "ComputeMetrics", lambda d: a.ComputeMetrics(req, metadata=md, timeout=d), 3.0
        )

    await suite.restart("analytics", env={"FINSIGHT_RATE_LIMIT_FAIL_MODE": "closed"})
    try:
        assert await metrics() is not None
        pid = suite.pid("analytics")
        await asyncio.to_thread(suite.redis_stop)
        tally.tag = "closed, redis down"
        for _ in range(5):
            assert await metrics() is None
            last = tally.calls[-1]
            assert last.outcome == "UNAVAILABLE/RATE_LIMITER_UNAVAILABLE" and last.retry_after, last

        async def analytics_health_is(status: int) -> bool:
            return await suite.health("analytics") == status

        # Failing closed, no call can be answered: readiness follows Redis.
        await wait_until(lambda: analytics_health_is(NOT_SERVING), timeout=10)
        await asyncio.to_thread(suite.redis_start)
        tally.tag = "closed, redis back"
        recovery_s = await wait_until(lambda: _ok(metrics()), timeout=15)
        await wait_until(lambda: analytics_health_is(SERVING), timeout=10)
        assert suite.pid("analytics") == pid
        assert not tally.late()
    finally:
        if suite.redis.server is None:
            await asyncio.to_thread(suite.redis_start)
        await suite.restart("analytics")  # back to the suite's settings
    figures(
        fail_open=open_mode,
        fail_closed={
            tag: dict(tally.outcomes(tag=tag))
            for tag in ("closed, redis up", "closed, redis down", "closed, redis back")
        },
        fail_closed_refusal_ms=tally.summary("closed, redis down")["ComputeMetrics"],
        fail_closed_recovery_s=round(recovery_s, 2),
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_chaos_repeated_sigkill_during_writes(suite: Suite, figures: Figures) -> None:
    """CHAOS_KILL_CYCLES (5) rounds of SIGKILL of memory and analytics under heavier write
    load (8 writers), each verified: nothing acknowledged lost, nothing partial."""
    cycles = int(knob("CHAOS_KILL_CYCLES", 5))
    rounds = [
        await sigkill_during_writes(suite, min_appends=200, min_streams=20, writers=8)
        for _ in range(cycles)
    ]
    totals = {k: sum(r[k] for r in rounds) for k in rounds[0] if k != "restart_to_serving_s"}
    figures(
        cycles=cycles,
        totals=totals,
        restart_to_serving_s=[r["restart_to_serving_s"] for r in rounds],
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_sigterm_under_heavier_load(suite: Suite, figures: Figures) -> None:
    """Each service SIGTERMed under 16 concurrent callers, twice (restarted in between):
    zero failed RPCs, NOT_SERVING before the listener closes, exit code 0."""
    results = []
    for _ in range(2):
        for name in ("analytics", "memory", "llm_gateway"):
            results.append(await sigterm_under_load(suite, name, concurrency=16))
        await asyncio.gather(*(suite.start(name) for name in suite.names))
    figures(
        results=[
            {
                k: r[k]
                for k in (
                    "service",
                    "calls",
                    "failed",
                    "in_flight_at_sigterm",
                    "in_flight_at_listener_close",
                    "not_serving_after_ms",
                    "listener_closed_after_ms",
                )
            }
            for r in results
        ]
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_downstream_gone_for_a_while(suite: Suite, figures: Figures) -> None:
    """Memory and the gateway gone for CHAOS_DOWNSTREAM_DOWN_S (30) while Analyze is
    called every 0.2 s: every Analyze answers (RULES, not stored) within 3 s; both back:
    Analyze is whole again without restarting analytics."""
    figures(**await downstream_gone(suite, down_s=knob("CHAOS_DOWNSTREAM_DOWN_S", 30)))
