"""Wiring of the LLM gateway: providers, servicer, readiness. No logic lives here."""

from __future__ import annotations

from redis.asyncio import Redis

from libs.common.server import ServiceHost, main_entry
from services.llm_gateway.config import GatewaySettings


async def setup(host: ServiceHost, redis: Redis) -> None:
    assert isinstance(host.settings, GatewaySettings)


def main() -> None:
    main_entry(GatewaySettings, setup)


if __name__ == "__main__":
    main()
