"""Wiring of the analytics service: storage, servicers, readiness. No logic lives here.

The store is chosen by configuration only: ANALYTICS_DATABASE_URL set -> PostgreSQL
(migrations under migrations/postgresql/, several replicas may share it), unset -> the
DuckDB file (migrations/*.sql). Everything above the store is the same code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

from redis.asyncio import Redis

from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.llm.v1 import llm_gateway_pb2
from finsight.memory.v1 import memory_pb2
from libs.common.admin import open_service_store
from libs.common.clients import create_channel
from libs.common.duck import Database
from libs.common.interceptors import MethodPolicy
from libs.common.pg import PgDatabase
from libs.common.server import ServiceHost, main_entry
from services.analytics.analyze import Analyzer, AnalyzeSettings
from services.analytics.cache import ResultCache
from services.analytics.config import AnalyticsSettings
from services.analytics.downstream import GrpcCompleter, GrpcMemory
from services.analytics.market import MarketAnalytics
from services.analytics.sample_loader import SampleLoader
from services.analytics.servicer import AnalyticsServicer
from services.analytics.storage import MarketBackend, MarketStore
from services.analytics.storage_duckdb import DuckMarketBackend
from services.analytics.storage_pg import PgMarketBackend

MIGRATIONS = Path(__file__).parent / "migrations"
PG_MIGRATIONS = MIGRATIONS / "postgresql"
# Readiness names of the peers (their full service names): the channels watch them.
MEMORY_HEALTH: Final = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
GATEWAY_HEALTH: Final = llm_gateway_pb2.DESCRIPTOR.services_by_name["LlmGatewayService"].full_name
POLICIES: Final = {"IngestBars": MethodPolicy(scope="analytics.write", method_class="write")}


def market_backend(db: Database | PgDatabase) -> MarketBackend:
    """The storage backend of an opened database."""
    return DuckMarketBackend(db) if isinstance(db, Database) else PgMarketBackend(db)


async def setup(host: ServiceHost, redis: Redis) -> None:
    settings = host.settings
    assert isinstance(settings, AnalyticsSettings)
    db = await open_service_store(host, settings.db_path, MIGRATIONS, PG_MIGRATIONS)

    store = MarketStore(market_backend(db), cache_max_rows=settings.analytics_series_cache_max_rows)
    market = MarketAnalytics(store, max_ingest_rows=settings.analytics_ingest_max_rows)
    memory_channel = create_channel(
        settings.analytics_memory_target, settings, health_service=MEMORY_HEALTH
    )
    gateway_channel = create_channel(
        settings.analytics_llm_gateway_target, settings, health_service=GATEWAY_HEALTH
    )

    async def close_channels() -> None:
        await memory_channel.close()
        await gateway_channel.close()

    host.on_shutdown(close_channels)
    analyzer = Analyzer(
        market,
        GrpcMemory(memory_channel),
        GrpcCompleter(gateway_channel),
        AnalyzeSettings(
            context_token_budget=settings.analytics_context_token_budget,
            max_answer_tokens=settings.analytics_answer_max_tokens,
            llm_timeout_s=settings.analytics_llm_timeout_s,
            llm_deadline_share=settings.analytics_llm_deadline_share,
            memory_timeout_s=settings.analytics_memory_timeout_s,
            grounding_policy=settings.analytics_grounding_policy,
            structured_answers=settings.analytics_structured_answers,
        ),
    )
    servicer = AnalyticsServicer(
        market, ResultCache(redis, settings.analytics_cache_ttl_s), analyzer
    )
    analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server(servicer, host.server)

    if settings.analytics_load_sample_data:
        # Parsing the sample takes a few seconds: serve health meanwhile, ready once loaded.
        loader = SampleLoader(store)
        host.add_readiness_check("sample_data", loader.ready)
        task = asyncio.create_task(loader.run(), name="analytics-sample-load")

        async def stop_loader() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        host.on_shutdown(stop_loader)


def main() -> None:
    main_entry(AnalyticsSettings, setup, policies=POLICIES)


if __name__ == "__main__":
    main()
