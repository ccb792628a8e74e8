"""Cross-tenant isolation: tenant B (bob, globex) replays a seeded random run of reads,
recalls, context builds, exports, erasures, consent changes, history pages, bar reads,
metric computations and Analyze calls against tenant A's (alice, acme) user ids, session
ids, fact ids and symbols, and also writes under those same ids in its own tenant.

Zero leaks means:
- no response to B carries anything of A (A's contents hold a marker; A's fact and message
  ids and A-only symbols are searched for in every response's bytes);
- A's data is exactly as it was afterwards (row counts per user, consent, facts, symbols
  with their bar counts, usage), and what B wrote under A's ids is visible to B only.

Quick: CROSS_TENANT_OPS operations (default 150); full (slow): CROSS_TENANT_FULL_OPS
(default 3000). The seed is CROSS_TENANT_SEED (default 20240607); the counts per operation
are printed and kept in .build/reliability/cross-tenant-{quick,full}.json.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from tests.postgres import PostgresServer
from tests.security.requests import user_message
from tests.security.stack import RESULTS_DIR, Stack, consent_and_remember, ingest, start_stack

MARKER = "ACME-SECRET"
A_USERS = ("acme-u1", "acme-u2", "acme-u3")
A_SESSIONS = {"acme-s1": "acme-u1", "acme-s2": "acme-u2", "acme-s3": "acme-u3"}
A_SYMBOLS = ("ACMEA", "ACMEB", "^ACMEI")
B_BARS = 30  # bars of each symbol B ingests (A ingests 60)
SEED = int(os.environ.get("CROSS_TENANT_SEED", "20240607"))
RESULTS = RESULTS_DIR


@dataclass
class TenantA:
    fact_ids: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)

    def secrets(self) -> list[bytes]:
        return [
            MARKER.encode(),
            *(i.encode() for i in self.fact_ids),
            *(i.encode() for i in self.message_ids),
        ]


async def seed_tenant_a(stack: Stack) -> TenantA:
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    md = stack.keys.md("alice")
    a = TenantA()
    for n, user in enumerate(A_USERS):
        a.fact_ids += await consent_and_remember(
            stack,
            "alice",
            user,
            [
                mpb.NewFact(text=f"{MARKER} {user} holds ACMEA and risk", tags=["risk"]),
                mpb.NewFact(text=f"{MARKER} {user} goal number {n}", kind="goal"),
            ],
        )
    for session, user in A_SESSIONS.items():
        reply = await mem.AppendMessages(
            mpb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[
                    mpb.NewMessage(message=user_message(f"{MARKER} question of {user}")),
                    mpb.NewMessage(message=user_message(f"{MARKER} follow-up risk ACMEA")),
                ],
            ),
            metadata=md,
        )
        a.message_ids += [m.message_id for m in reply.messages]
    await ingest(stack, "alice_writer", A_SYMBOLS, days=60)
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    await gw.Complete(
        gpb.CompleteRequest(messages=[user_message(f"{MARKER} prompt")], max_tokens=4), metadata=md
    )
    return a


async def picture_of_a(stack: Stack) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for user in A_USERS:
        counts = await stack.memory_app.store.user_row_counts("acme", user)
        counts.pop("audit_log")
        out[user] = counts
    md = stack.keys.md("alice")
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    for user in A_USERS:
        consent = await mem.GetConsent(mpb.GetConsentRequest(user_id=user), metadata=md)
        out[f"consent:{user}"] = consent.consent.long_term_memory
    an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
    listed = await an.ListSymbols(apb.ListSymbolsRequest(), metadata=md)
    out["symbols"] = sorted((s.symbol, s.bar_count, s.first_date.year) for s in listed.symbols)
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    usage = await gw.GetUsage(gpb.GetUsageRequest(), metadata=md)
    out["usage"] = (usage.total_requests, usage.total_usage.total_tokens)
    return out


Op = Callable[[random.Random], Awaitable[list[Message]]]


class Attacker:
    """Tenant B's operations against A's identifiers."""

    def __init__(self, stack: Stack, a: TenantA) -> None:
        self.a = a
        self.md = stack.keys.md("bob")
        self.md_writer = stack.keys.md("bob_writer")
        self.mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
        self.an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
        self.gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
        self.ingested: set[str] = set()  # symbols B ingested itself (its own series)
        self.ops: dict[str, Op] = {
            name.removeprefix("op_"): getattr(self, name)
            for name in dir(self)
            if name.startswith("op_")
        }

    def user(self, r: random.Random) -> str:
        return r.choice(A_USERS)

    def session(self, r: random.Random) -> tuple[str, str]:
        return r.choice(list(A_SESSIONS.items()))

    # -- memory --------------------------------------------------------------------------
    async def op_history(self, r: random.Random) -> list[Message]:
        session, user = self.session(r)
        req = mpb.GetHistoryRequest(session_id=session, user_id=r.choice([user, ""]))
        return [await self.mem.GetHistory(req, metadata=self.md, timeout=10)]

    async def op_recall(self, r: random.Random) -> list[Message]:
        query = r.choice(["risk", "ACMEA holds", MARKER, "goal number", ""])
        req = mpb.RecallRequest(user_id=self.user(r), query=query, k=100)
        return [await self.mem.Recall(req, metadata=self.md, timeout=10)]

    async def op_context(self, r: random.Random) -> list[Message]:
        session, user = self.session(r)
        req = mpb.BuildContextRequest(
            session_id=session, user_id=user, query="what do I hold?", token_budget=4096
        )
        return [await self.mem.BuildContext(req, metadata=self.md, timeout=10)]

    async def op_export(self, r: random.Random) -> list[Message]:
        call = self.mem.ExportUserData(
            mpb.ExportUserDataRequest(user_id=self.user(r)), metadata=self.md, timeout=10
        )
        return [item async for item in call]

    async def op_list_facts(self, r: random.Random) -> list[Message]:
        req = mpb.ListFactsRequest(
            user_id=self.user(r), include_history=r.random() < 0.5, kinds=r.choice([[], ["goal"]])
        )
        return [await self.mem.ListFacts(req, metadata=self.md, timeout=10)]

    async def op_extraction_status(self, r: random.Random) -> list[Message]:
        req = mpb.GetExtractionStatusRequest(user_id=self.user(r))
        reply = await self.mem.GetExtractionStatus(req, metadata=self.md, timeout=10)
        # A's users have messages and facts; B's view of the same ids counts B's rows only.
        assert reply.extracted_facts == 0 and reply.messages_extracted == 0, reply
        return [reply]

    async def op_consent_read(self, r: random.Random) -> list[Message]:
        req = mpb.GetConsentRequest(user_id=self.user(r))
        return [await self.mem.GetConsent(req, metadata=self.md, timeout=10)]

    async def op_consent_withdraw(self, r: random.Random) -> list[Message]:
        req = mpb.SetConsentRequest(user_id=self.user(r), long_term_memory=r.random() < 0.5)
        return [await self.mem.SetConsent(req, metadata=self.md, timeout=10)]

    async def op_forget_ids(self, r: random.Random) -> list[Message]:
        ids = r.sample(self.a.fact_ids, k=r.randint(1, len(self.a.fact_ids)))
        reply = await self.mem.Forget(
            mpb.ForgetRequest(user_id=self.user(r), fact_ids=ids), metadata=self.md, timeout=10
        )
        assert not reply.fact_ids, f"B deleted facts of A: {list(reply.fact_ids)}"
        return [reply]

    async def op_forget_all(self, r: random.Random) -> list[Message]:
        req = mpb.ForgetRequest(user_id=self.user(r), all=True)
        return [await self.mem.Forget(req, metadata=self.md, timeout=10)]

    async def op_erase(self, r: random.Random) -> list[Message]:
        req = mpb.DeleteUserDataRequest(user_id=self.user(r))
        return [await self.mem.DeleteUserData(req, metadata=self.md, timeout=10)]

    async def op_append_same_ids(self, r: random.Random) -> list[Message]:
        session, user = self.session(r)
        req = mpb.AppendMessagesRequest(
            session_id=session,
            user_id=user,
            messages=[mpb.NewMessage(message=user_message("globex's own words"))],
        )
        return [await self.mem.AppendMessages(req, metadata=self.md, timeout=10)]

    async def op_remember_same_ids(self, r: random.Random) -> list[Message]:
        user = self.user(r)
        await self.mem.SetConsent(
            mpb.SetConsentRequest(user_id=user, long_term_memory=True), metadata=self.md
        )
        req = mpb.RememberRequest(user_id=user, facts=[mpb.NewFact(text="globex fact risk")])
        return [await self.mem.Remember(req, metadata=self.md, timeout=10)]

    # -- analytics -----------------------------------------------------------------------
    async def op_symbols(self, r: random.Random) -> list[Message]:
        reply = await self.an.ListSymbols(apb.ListSymbolsRequest(), metadata=self.md, timeout=10)
        listed = {s.symbol for s in reply.symbols}
        assert listed <= self.ingested, f"B sees A's symbols: {listed - self.ingested}"
        return [reply]

    async def op_bars(self, r: random.Random) -> list[Message]:
        call = self.an.GetBars(
            apb.GetBarsRequest(symbol=r.choice(A_SYMBOLS)), metadata=self.md, timeout=10
        )
        return [item async for item in call]

    async def op_metrics(self, r: random.Random) -> list[Message]:
        req = apb.ComputeMetricsRequest(
            symbols=r.sample(A_SYMBOLS[:2], k=r.randint(1, 2)),
            benchmark=r.choice(["", A_SYMBOLS[2]]),
        )
        reply = await self.an.ComputeMetrics(req, metadata=self.md, timeout=10)
        # Only B's own series (30 bars, 29 returns) can have answered; A's has 60 bars.
        assert all(m.return_count == B_BARS - 1 for m in reply.metrics), reply.metrics
        return [reply]

    async def op_rolling(self, r: random.Random) -> list[Message]:
        req = apb.RollingMetricsRequest(
            symbol=r.choice(A_SYMBOLS), metric=apb.ROLLING_METRIC_VOLATILITY, window=10
        )
        return [await self.an.RollingMetrics(req, metadata=self.md, timeout=10)]

    async def op_portfolio(self, r: random.Random) -> list[Message]:
        req = apb.ComputePortfolioRequest(
            holdings=[
                apb.Holding(symbol=A_SYMBOLS[0], weight=0.5),
                apb.Holding(symbol=A_SYMBOLS[1], weight=0.5),
            ]
        )
        return [await self.an.ComputePortfolio(req, metadata=self.md, timeout=10)]

    async def op_factors(self, r: random.Random) -> list[Message]:
        subject, factor = r.sample(A_SYMBOLS, k=2)
        req = apb.ComputeFactorExposureRequest(
            symbol=subject, factors=[apb.Factor(symbol=factor)], rolling_window=r.choice([0, 10])
        )
        reply = await self.an.ComputeFactorExposure(req, metadata=self.md, timeout=10)
        # Only B's own series (30 bars, 29 returns) can have answered; A's has 60 bars.
        assert reply.observations == B_BARS - 1, reply.observations
        return [reply]

    async def op_optimize(self, r: random.Random) -> list[Message]:
        req = apb.OptimizePortfolioRequest(
            symbols=list(A_SYMBOLS[:2]),
            objective=r.choice(
                [apb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE, apb.OPTIMIZATION_OBJECTIVE_HRP]
            ),
        )
        reply = await self.an.OptimizePortfolio(req, metadata=self.md, timeout=20)
        # Only B's own series (30 bars, 29 returns) can have answered; A's has 60 bars.
        assert reply.estimation_periods == B_BARS - 1, reply.estimation_periods
        return [reply]

    async def op_analyze(self, r: random.Random) -> list[Message]:
        session, user = self.session(r)
        req = apb.AnalyzeRequest(
            session_id=session, user_id=user, symbols=[r.choice(A_SYMBOLS)], question="risk?"
        )
        return [await self.an.Analyze(req, metadata=self.md, timeout=20)]

    async def op_ingest_same_symbol(self, r: random.Random) -> list[Message]:
        symbol = r.choice(A_SYMBOLS)
        reply = await ingest_as(self, symbol)
        self.ingested.add(symbol)
        return [reply]

    # -- gateway -------------------------------------------------------------------------
    async def op_usage(self, r: random.Random) -> list[Message]:
        return [await self.gw.GetUsage(gpb.GetUsageRequest(), metadata=self.md, timeout=10)]


ATTACKER_OPS = [name for name in dir(Attacker) if name.startswith("op_")]


async def ingest_as(attacker: Attacker, symbol: str) -> apb.IngestBarsResponse:
    from tests.security.stack import random_walk_series

    async def gen() -> Any:
        yield apb.IngestBarsRequest(series=[random_walk_series(symbol, B_BARS, seed=999)])

    return await attacker.an.IngestBars(gen(), metadata=attacker.md_writer, timeout=20)


async def run_attack(stack: Stack, a: TenantA, ops: int, seed: int) -> dict[str, Any]:
    attacker = Attacker(stack, a)
    rnd = random.Random(seed)
    names = sorted(attacker.ops)
    done: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    secrets = a.secrets()
    for _ in range(ops):
        name = rnd.choice(names)
        try:
            replies = await attacker.ops[name](rnd)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            replies, code = [], err.code().name
            assert err.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ), (name, err.code(), err.details())
        done[name] += 1
        codes[f"{name}:{code}"] += 1
        for reply in replies:
            data = reply.SerializeToString()
            leaked = [s.decode() for s in secrets if s in data]
            assert not leaked, f"{name} returned tenant A's {leaked}"
    return {"ops": ops, "seed": seed, "by_operation": dict(done), "outcomes": dict(codes)}


async def check_b_writes_are_b_only(stack: Stack) -> None:
    """What B appended under A's session ids is in B's history, never in A's."""
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    for session in A_SESSIONS:
        page = await mem.GetHistory(
            mpb.GetHistoryRequest(session_id=session, page_size=500),
            metadata=stack.keys.md("alice"),
        )
        assert all(MARKER in m.message.content for m in page.messages), session


async def _cross_tenant(
    tmp: Path, ops: int, mode: str, database_urls: tuple[str, str] | None = None
) -> dict[str, Any]:
    """`database_urls` (memory, analytics): run on PostgreSQL instead of DuckDB files."""
    stores: dict[str, dict[str, Any]] = {}
    if database_urls is not None:
        stores = {
            "memory": {"memory_database_url": database_urls[0]},
            "analytics": {"analytics_database_url": database_urls[1]},
        }
    stack = await start_stack(tmp, **stores)
    try:
        a = await seed_tenant_a(stack)
        before = await picture_of_a(stack)
        result = await run_attack(stack, a, ops, SEED)
        assert await picture_of_a(stack) == before, "tenant A's data changed"
        await check_b_writes_are_b_only(stack)
        assert await stack.healthy()
    finally:
        await stack.close()
    result["leaks"] = 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cross-tenant-{mode}.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"\ncross-tenant ({mode}): {ops} operations by tenant B, seed {SEED}, 0 leaks")
    for name, n in sorted(result["by_operation"].items()):
        outcomes = {
            k.split(":")[1]: v for k, v in result["outcomes"].items() if k.startswith(f"{name}:")
        }
        print(f"  {name:<22} {n:>5}  {outcomes}")
    return result


async def test_cross_tenant_quick(tmp_path: Path) -> None:
    result = await _cross_tenant(tmp_path, int(os.environ.get("CROSS_TENANT_OPS", "150")), "quick")
    assert len(result["by_operation"]) >= 15  # the run covered (nearly) every operation


async def test_cross_tenant_quick_on_postgresql(tmp_path: Path, pg_server: PostgresServer) -> None:
    urls = (pg_server.create_database("xt_mem"), pg_server.create_database("xt_an"))
    ops = int(os.environ.get("CROSS_TENANT_OPS", "150"))
    result = await _cross_tenant(tmp_path, ops, "quick-postgresql", urls)
    assert len(result["by_operation"]) >= 15


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_cross_tenant_full(tmp_path: Path) -> None:
    ops = int(os.environ.get("CROSS_TENANT_FULL_OPS", "3000"))
    result = await _cross_tenant(tmp_path, ops, "full")
    assert len(result["by_operation"]) == len(ATTACKER_OPS)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_cross_tenant_full_on_postgresql(tmp_path: Path, pg_server: PostgresServer) -> None:
    urls = (pg_server.create_database("xt_mem"), pg_server.create_database("xt_an"))
    ops = int(os.environ.get("CROSS_TENANT_FULL_OPS", "3000"))
    result = await _cross_tenant(tmp_path, ops, "full-postgresql", urls)
    assert len(result["by_operation"]) == len(ATTACKER_OPS)
