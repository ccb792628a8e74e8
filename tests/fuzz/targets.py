"""Every RPC of the three services as a fuzz target: caller identity, hints, write checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from google.type import date_pb2
from hypothesis import strategies as st
from redis import Redis as SyncRedis

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from tests.fuzz.conftest import FUZZ_SESSIONS, FUZZ_SYMBOLS, FUZZ_USERS, Seeded
from tests.fuzz.runner import Caller, Target, on_loop
from tests.security.requests import valid_requests
from tests.security.stack import ADMIN, ANALYTICS, GATEWAY, MEMORY, random_walk_series

MEMORY_TABLES = ("sessions", "messages", "facts", "fact_terms", "consent")


def _date(d: date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def _dates(start: date, days: int) -> st.SearchStrategy[date_pb2.Date]:
    return st.integers(0, days).map(lambda n: _date(start + timedelta(days=n)))


def _range(start: date, days: int) -> st.SearchStrategy[common_pb2.DateRange]:
    def build(a: date_pb2.Date | None, b: date_pb2.Date | None) -> common_pb2.DateRange:
        out = common_pb2.DateRange()
        if a is not None:
            out.start.CopyFrom(a)
        if b is not None:
            out.end.CopyFrom(b)
        return out

    d = _dates(start, days)
    return st.builds(build, st.none() | d, st.none() | d)


def _future_ts() -> st.SearchStrategy[Timestamp]:
    now = int(datetime.now(UTC).timestamp())
    return st.integers(now + 3600, now + 10**8).map(lambda s: Timestamp(seconds=s))


ROLES = st.sampled_from([common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM, common_pb2.ROLE_ASSISTANT])


def _chat() -> st.SearchStrategy[common_pb2.ChatMessage]:
    return st.builds(
        common_pb2.ChatMessage,
        role=ROLES,
        content=st.text(min_size=1, max_size=60).filter(lambda s: s.strip() != ""),
    )


WORDS = st.lists(
    st.sampled_from(["risk", "FZA", "volatility", "low", "holds", "2023"]), max_size=5
).map(" ".join)


def memory_hints(seeded: Seeded, users: tuple[str, ...] = FUZZ_USERS) -> dict[str, Any]:
    return {
        "user_id": st.sampled_from(users),
        "session_id": st.sampled_from(FUZZ_SESSIONS),
        "source_session_id": st.sampled_from(FUZZ_SESSIONS),
        "client_message_id": st.from_regex(r"c-[a-z0-9]{1,6}", fullmatch=True),
        "fact_ids": st.sampled_from(seeded.fact_ids),
        "kind": st.sampled_from(["general", "pref", "goal"]),
        "kinds": st.sampled_from(["general", "pref"]),
        "tags": st.sampled_from(["risk", "holdings", "a.b:c"]),
        "role": ROLES,
        "content": st.text(min_size=1, max_size=80),
        "text": st.text(min_size=1, max_size=80),
        "query": WORDS,
        "page_size": st.integers(0, 500),
        "page_token": st.just(""),
        "k": st.integers(0, 100),
        "token_budget": st.integers(256, 4096),
        "max_facts": st.integers(0, 50),
        "importance": st.floats(0, 1),
        "expire_time": _future_ts(),
        "order": st.sampled_from([0, 1, 2]),
    }


def analytics_hints() -> dict[str, Any]:
    symbols = st.sampled_from([*FUZZ_SYMBOLS, "NOPE"])
    start = date(2023, 1, 2)
    return {
        "symbol": symbols,
        "symbols": symbols,
        "benchmark": st.sampled_from(["", "^FZI", "FZB", "NOPE"]),
        "range": _range(start, 200),
        "start": _dates(start, 200),
        "end": _dates(start, 200),
        "dates": _dates(start, 200),
        "weight": st.sampled_from([0.5, 0.25, 1.0, 0.0, -0.5]),
        "window": st.integers(2, 100),
        "metric": st.integers(0, 4),
        "rebalance": st.integers(0, 6),
        "periods_per_year": st.sampled_from([0.0, 252.0, 12.0, 366.0]),
        "risk_free_rate": st.sampled_from([0.0, 0.02, -0.01]),
        "page_size": st.integers(0, 50_000),
        "series": st.integers(0, 3).map(lambda i: random_walk_series(f"FZN{i}", 12, seed=i)),
        "on_invalid": st.integers(0, 2),
        "question": st.text(min_size=1, max_size=80),
        "model": st.sampled_from(["", "default"]),
        "user_id": st.sampled_from(FUZZ_USERS),
        "session_id": st.sampled_from(FUZZ_SESSIONS),
        # OptimizePortfolio (bounds and groups share the weight names)
        "objective": st.integers(0, 5),
        "evaluation_range": _range(start, 200),
        "return_estimator": st.integers(0, 2),
        "covariance_estimator": st.integers(0, 3),
        "half_life": st.sampled_from([0.0, 5.0, 63.0]),
        "min_weight": st.sampled_from([0.0, 0.1, -0.2]),
        "max_weight": st.sampled_from([0.05, 0.3, 0.6, 1.0]),
        "target_return": st.sampled_from([0.0, 0.1, 5.0]),
        "target_volatility": st.sampled_from([0.001, 0.1, 0.5]),
        "max_turnover": st.sampled_from([0.1, 1.0]),
        "cvar_confidence": st.sampled_from([0.0, 0.95, 0.99]),
        "frontier_points": st.sampled_from([0, 3]),
        "name": st.sampled_from(["tech", "g1"]),
    }


def gateway_hints() -> dict[str, Any]:
    today = datetime.now(UTC).date()
    return {
        "model": st.sampled_from(["", "default", "deepseek-chat", "reasoning", "embed"]),
        "messages": _chat(),
        "role": ROLES,
        "content": st.text(min_size=1, max_size=80),
        "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.sampled_from(["\n", "END", "."]),
        "cache_ttl_seconds": st.integers(0, 3600),
        # Only schemas refused up front: a valid one can end in SCHEMA_MISMATCH after billed
        # provider calls (usage written), which the "rejected but wrote" check would flag.
        "json_schema": st.sampled_from(["", '{"type": "objekt"}', "{not json", "[1]"]),
        # Embed
        "inputs": st.text(min_size=1, max_size=80),
        "dimensions": st.sampled_from([0, 8, 64, 65]),
        "range": _range(today - timedelta(days=40), 45),
    }


# -- write checks ----------------------------------------------------------------------------
def _memory_counts(cur: Any) -> tuple[int, ...]:
    return tuple(cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in MEMORY_TABLES)


def _bar_counts(cur: Any) -> tuple[int, ...]:
    rows = cur.execute("SELECT count(*) FROM bars").fetchone()[0]
    return (rows,)


async def _pg_counts(conn: Any, tables: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for table in tables:
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
        out.append(int(row[0]))
    return tuple(out)


async def table_counts(db: Any, tables: tuple[str, ...]) -> tuple[int, ...]:
    """Rows per table, whichever store the service runs on (nothing half-written)."""
    from libs.common.pg import PgDatabase

    if isinstance(db, PgDatabase):
        return await db.read("fuzz_counts", _pg_counts, tables)
    counts = _memory_counts if tables == MEMORY_TABLES else _bar_counts
    return await db.read("fuzz_counts", counts)  # type: ignore[no-any-return]


def memory_snapshot(seeded: Seeded, loop: asyncio.AbstractEventLoop) -> Callable[[], Any]:
    redis = SyncRedis.from_url(seeded.stack.redis.url)

    def snap() -> Any:
        counts = on_loop(loop, table_counts(seeded.stack.memory_app.db, MEMORY_TABLES))
        return counts, redis.dbsize()

    return snap


def analytics_snapshot(seeded: Seeded, loop: asyncio.AbstractEventLoop) -> Callable[[], Any]:
    def snap() -> Any:
        return on_loop(loop, table_counts(seeded.stack.analytics_db, ("bars",)))

    return snap


def usage_snapshot(seeded: Seeded, who: str) -> Callable[[], Any]:
    caller = Caller(seeded.stack.target("llm_gateway"))
    method = GATEWAY.methods_by_name["GetUsage"]

    def snap() -> Any:
        code, err, items = caller.call(
            GATEWAY, method, [gpb.GetUsageRequest().SerializeToString()], seeded.stack.keys.md(who)
        )
        assert code.name == "OK", f"GetUsage failed: {code.name} {err}"
        reply = gpb.GetUsageResponse.FromString(items[0])
        return reply.total_requests, reply.total_usage.total_tokens

    return snap


MEMORY_WRITES = {
    "AppendMessages",
    "Remember",
    "Forget",
    "SetConsent",
    "DeleteUserData",
    "PurgeExpired",
}


def all_targets(seeded: Seeded, loop: asyncio.AbstractEventLoop) -> dict[str, Target]:
    out: dict[str, Target] = {}
    mem_snap = memory_snapshot(seeded, loop)
    for method in MEMORY.methods:
        admin = method.name == "PurgeExpired"
        users = (
            ("u-tmp1", "u-tmp2") if method.name in ("DeleteUserData", "SetConsent") else FUZZ_USERS
        )
        t = Target(
            "memory",
            MEMORY,
            method,
            "admin" if admin else "alice",
            memory_hints(seeded, users),
            mem_snap if method.name in MEMORY_WRITES else None,
        )
        out[t.name] = t
    bars = analytics_snapshot(seeded, loop)
    for method in ANALYTICS.methods:
        snap = {"IngestBars": bars, "Analyze": mem_snap}.get(method.name)
        who = "alice_writer" if method.name == "IngestBars" else "alice"
        t = Target("analytics", ANALYTICS, method, who, analytics_hints(), snap)
        out[t.name] = t
    usage = usage_snapshot(seeded, "alice")
    for method in GATEWAY.methods:
        snap = usage if method.name in ("Complete", "StreamComplete", "Embed") else None
        t = Target("llm_gateway", GATEWAY, method, "alice", gateway_hints(), snap)
        out[t.name] = t
    for process in ("memory", "analytics"):
        method = ADMIN.methods_by_name["Backup"]
        t = Target(process, ADMIN, method, "admin")
        out[f"{process}:{t.name}"] = t
    valid = valid_requests(FUZZ_USERS[0], FUZZ_SESSIONS[0], FUZZ_SYMBOLS, erase_user="u-tmp1")
    assert set(valid) == set(out), set(valid) ^ set(out)
    for name, t in out.items():
        t.templates = valid[name]
    return out


def target_names() -> list[str]:
    """Stable ids for parametrisation (the targets themselves need the running stack)."""
    names = [f"MemoryService.{m.name}" for m in MEMORY.methods]
    names += [f"AnalyticsService.{m.name}" for m in ANALYTICS.methods]
    names += [f"LlmGatewayService.{m.name}" for m in GATEWAY.methods]
    names += ["memory:AdminService.Backup", "analytics:AdminService.Backup"]
    return names
