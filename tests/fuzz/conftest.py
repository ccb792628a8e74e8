"""One in-process stack (gateway, memory, analytics, dev provider, private Redis) for the
fuzz suites, seeded with data the generated requests can reach (a consenting user with
facts and a session, ingested symbols of tenant acme)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from tests.postgres import PostgresServer
from tests.security.stack import Stack, consent_and_remember, ingest, start_stack

FUZZ_USERS = ("u-fuzz", "u-fuzz2")
FUZZ_SESSIONS = ("s-fuzz", "s-fuzz2")
FUZZ_SYMBOLS = ("FZA", "FZB", "^FZI")


# Embed reaches a provider: an embedding model on the stack's dev provider (the `deepseek`
# provider's base URL; the dev provider serves `/embeddings` there too), the default route.
FUZZ_EMBEDDING_ROUTE: dict[str, object] = {
    "llm_gateway_models": {
        "dev-embed": {
            "kind": "embedding",
            "provider": "deepseek",
            "input_per_mtok": "0.02",
            "dimensions": 64,
        }
    },
    "llm_gateway_routes": {"embed": {"models": ["dev-embed"]}},
    "llm_gateway_default_embedding_route": "embed",
}


@dataclass
class Seeded:
    stack: Stack
    fact_ids: list[str]
    store: str = "duckdb"  # the services' store: duckdb or postgresql


# Every fuzz suite runs against both stores (FUZZ_STORE=duckdb or =postgresql: one).
FUZZ_STORES = tuple(os.environ.get("FUZZ_STORE", "duckdb,postgresql").split(","))


@pytest.fixture(scope="package", params=FUZZ_STORES)  # torn down after the last fuzz module
async def seeded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: PostgresServer,
) -> AsyncIterator[Seeded]:
    memory: dict[str, str] = {}
    # A stream is buffered whole before it is validated; keep the fuzz's bounded.
    analytics: dict[str, object] = {"analytics_ingest_max_rows": 200_000}
    if request.param == "postgresql":
        memory["memory_database_url"] = pg_server.create_database("fz_mem")
        analytics["analytics_database_url"] = pg_server.create_database("fz_an")
    elif request.param != "duckdb":
        raise ValueError(f"FUZZ_STORE holds duckdb or postgresql, got {request.param!r}")
    stack = await start_stack(
        tmp_path_factory.mktemp("fuzzstack"),
        memory=memory,
        analytics=analytics,
        gateway=FUZZ_EMBEDDING_ROUTE,
    )
    try:
        seeded = await seed(stack)
        seeded.store = request.param
        yield seeded
    finally:
        await stack.close()


async def remember_fuzz_facts(stack: Stack) -> list[str]:
    """Consent and two facts for every fuzz user (again after a target erased them)."""
    ids: list[str] = []
    for user in FUZZ_USERS:
        ids += await consent_and_remember(
            stack,
            "alice",
            user,
            [
                mpb.NewFact(text="prefers low volatility", kind="pref", tags=["risk"]),
                mpb.NewFact(text="holds FZA since 2023", tags=["holdings"]),
            ],
        )
    return ids


async def seed(stack: Stack) -> Seeded:
    """Data the generated requests can reach: symbols of acme, users with facts and sessions."""
    await ingest(stack, "alice_writer", FUZZ_SYMBOLS, days=120)
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    md = stack.keys.md("alice")
    fact_ids = await remember_fuzz_facts(stack)
    for session, user in zip(FUZZ_SESSIONS, FUZZ_USERS, strict=True):
        await mem.AppendMessages(
            mpb.AppendMessagesRequest(
                session_id=session,
                user_id=user,
                messages=[
                    mpb.NewMessage(
                        message=common_pb2.ChatMessage(
                            role=common_pb2.ROLE_USER, content="how risky is FZA?"
                        )
                    )
                ],
            ),
            metadata=md,
        )
    return Seeded(stack, fact_ids)
