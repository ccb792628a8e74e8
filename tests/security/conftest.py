"""The in-process stack of the security suite, with data of tenant acme to attack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from tests.security.requests import user_message
from tests.security.stack import Stack, consent_and_remember, ingest, start_stack

VICTIM_USER = "victim"
VICTIM_SESSION = "victim-s"
VICTIM_SYMBOLS = ("VICTA", "VICTB", "^VICTI")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    running = await start_stack(tmp_path_factory.mktemp("security"))
    try:
        await seed_victim(running)
        yield running
    finally:
        await running.close()


async def seed_victim(stack: Stack, who: str = "alice") -> None:
    """Tenant acme (alice): a consenting user with facts and a session, three symbols."""
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    md = stack.keys.md(who)
    await consent_and_remember(
        stack,
        who,
        VICTIM_USER,
        [
            mpb.NewFact(text="victim holds VICTA", kind="pref", tags=["risk"]),
            mpb.NewFact(text="victim is saving for a house", tags=["goal"]),
        ],
    )
    await mem.AppendMessages(
        mpb.AppendMessagesRequest(
            session_id=VICTIM_SESSION,
            user_id=VICTIM_USER,
            messages=[
                mpb.NewMessage(message=user_message("my secret plan")),
                mpb.NewMessage(message=user_message("second turn")),
            ],
        ),
        metadata=md,
    )
    await ingest(stack, "alice_writer", VICTIM_SYMBOLS, days=80)
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    await gw.Complete(
        gpb.CompleteRequest(messages=[user_message("hello")], max_tokens=4), metadata=md
    )


async def acme_picture(stack: Stack) -> dict[str, Any]:
    """Everything of tenant acme an unauthorised or foreign call must leave as it was."""
    counts = await stack.memory_app.store.user_row_counts("acme", VICTIM_USER)
    counts.pop("audit_log")  # reads by acme itself are audited; they are not at stake
    an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
    listed = await an.ListSymbols(apb.ListSymbolsRequest(), metadata=stack.keys.md("alice"))
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    usage = await gw.GetUsage(gpb.GetUsageRequest(), metadata=stack.keys.md("alice"))
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    consent = await mem.GetConsent(
        mpb.GetConsentRequest(user_id=VICTIM_USER), metadata=stack.keys.md("alice")
    )
    return {
        "memory": counts,
        "consent": consent.consent.long_term_memory,
        "symbols": [(s.symbol, s.bar_count) for s in listed.symbols],
        "usage_requests": usage.total_requests,
        "backups": sorted(
            p.name
            for p in Path(stack.redis.data_dir).parent.rglob("*.duckdb")
            if "backups" in p.parts
        ),
    }
