"""Wiring of the memory service: storage, hot tier, servicer, retention, readiness.
No logic lives here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from finsight.memory.v1 import memory_pb2_grpc
from libs.common import tokens
from libs.common.admin import open_service_store
from libs.common.clients import create_channel
from libs.common.duck import Database
from libs.common.interceptors import MethodPolicy
from libs.common.pg import PgDatabase
from libs.common.server import ServiceHost, main_entry
from services.memory.config import MemorySettings
from services.memory.embedding import Embedder, GatewayEmbedder, LocalEmbedder
from services.memory.extraction import GatewayCompleter
from services.memory.hot_tier import HotTier
from services.memory.manager import MemoryManager
from services.memory.pgvector import PgVector
from services.memory.retention import Purger
from services.memory.servicer import MemoryServicer
from services.memory.store import MemoryStore, open_store

MIGRATIONS = Path(__file__).parent / "migrations"  # DuckDB; PostgreSQL's in postgresql/
POLICIES = {"PurgeExpired": MethodPolicy(scope="memory.admin", method_class="admin")}


@dataclass(frozen=True)
class MemoryApp:
    """The running parts (tests and benchmarks reach storage and cache through it)."""

    db: Database | PgDatabase
    hot: HotTier
    manager: MemoryManager
    purger: Purger
    store: MemoryStore

    @property
    def duck(self) -> Database:
        """The DuckDB file, for tests that read DuckDB's own SQL (PostgreSQL mode: error)."""
        if not isinstance(self.db, Database):
            raise TypeError("the memory service runs on PostgreSQL here, not DuckDB")
        return self.db


async def build(host: ServiceHost, redis: Redis) -> MemoryApp:
    settings = host.settings
    assert isinstance(settings, MemorySettings)
    # MEMORY_DATABASE_URL set: PostgreSQL (replicas share it), else the DuckDB file.
    db = await open_service_store(host, settings.db_path, MIGRATIONS, MIGRATIONS / "postgresql")
    store = open_store(db)
    hot = HotTier(
        redis,
        prefix=settings.memory_redis_prefix,
        window=settings.memory_hot_window,
        ttl_s=settings.memory_hot_ttl_s,
        shared=store.shared,
    )
    hot.start()
    host.on_shutdown(hot.close)
    embedder = build_embedder(settings)  # before serving: ~0.15 s for the local model
    completer = (
        GatewayCompleter(
            create_channel(settings.memory_llm_gateway_target, settings),
            settings.memory_extraction_route,
            settings.memory_extraction_timeout_s,
            settings.memory_extraction_max_tokens,
        )
        if settings.memory_extraction_tenants
        else None
    )
    manager = MemoryManager(settings, store, hot, embedder=embedder, completer=completer)
    if isinstance(db, PgDatabase):  # large users' vector recall (docs/memory.md, pgvector)
        manager.pgvector = await PgVector.open(
            db,
            settings.memory_recall_pgvector == "on",
            settings.memory_recall_pgvector_candidates,
            settings.memory_recall_pgvector_min_facts,
            settings.memory_reembed_batch,
        )
        if manager.pgvector is not None:
            host.on_shutdown(manager.pgvector.close)  # runs before db.close (reverse order)
    manager.start()
    host.on_shutdown(manager.close)  # runs before db.close (reverse order)
    purger = Purger(settings, store, hot, manager.index)
    purger.start()
    host.on_shutdown(purger.stop)  # runs before db.close (reverse order)
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(
        MemoryServicer(manager, purger), host.server
    )
    await asyncio.to_thread(tokens.get_tokenizer)  # ~0.4 s, not on the first BuildContext
    return MemoryApp(db, hot, manager, purger, store)


def build_embedder(settings: MemorySettings) -> Embedder | None:
    """MEMORY_EMBEDDING_PROVIDER's embedder (the local model loads in ~0.15 s)."""
    if settings.memory_embedding_provider == "none":
        return None
    if settings.memory_embedding_provider == "gateway":
        channel = create_channel(settings.memory_llm_gateway_target, settings)
        return GatewayEmbedder(
            channel, settings.memory_embedding_route or "", settings.memory_embedding_timeout_s
        )
    return LocalEmbedder()


async def setup(host: ServiceHost, redis: Redis) -> None:
    await build(host, redis)


def main() -> None:
    main_entry(MemorySettings, setup, policies=POLICIES)


if __name__ == "__main__":
    main()
