"""Wiring of the analytics service: storage, servicers, readiness. No logic lives here."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from libs.common.duck import Database
from libs.common.server import ServiceHost, main_entry
from services.analytics.config import AnalyticsSettings

MIGRATIONS = Path(__file__).parent / "migrations"


async def setup(host: ServiceHost, redis: Redis) -> None:
    settings = host.settings
    assert isinstance(settings, AnalyticsSettings)
    db = Database(
        settings.db_path,
        name="analytics",
        migrations_dir=MIGRATIONS,
        workers=settings.finsight_db_workers,
        slow_query_ms=settings.finsight_db_slow_query_ms,
    )
    await db.open()
    host.on_shutdown(db.close)

    async def db_ready() -> bool:
        return db.is_open

    host.add_readiness_check("duckdb", db_ready)


def main() -> None:
    main_entry(AnalyticsSettings, setup)


if __name__ == "__main__":
    main()
