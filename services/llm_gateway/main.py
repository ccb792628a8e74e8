"""Wiring of the LLM gateway: providers, servicer, readiness. No logic lives here."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

from redis.asyncio import Redis

from finsight.llm.v1 import llm_gateway_pb2_grpc
from libs.common.interceptors import MethodPolicy
from libs.common.server import ServiceHost, main_entry
from libs.common.tokens import get_tokenizer
from services.llm_gateway.breaker import ProviderBreaker
from services.llm_gateway.cache import ResponseCache
from services.llm_gateway.catalog import build_catalog
from services.llm_gateway.config import GatewaySettings
from services.llm_gateway.gateway import Gateway
from services.llm_gateway.limits import LimitPolicy, TenantLimiter
from services.llm_gateway.pii import PiiDetector
from services.llm_gateway.providers import ProviderClient
from services.llm_gateway.retry import RetryPolicy
from services.llm_gateway.router import Router
from services.llm_gateway.servicer import LlmGatewayServicer
from services.llm_gateway.shared_breaker import SharedBreakers
from services.llm_gateway.usage import UsageLedger


def build_gateway(
    settings: GatewaySettings, redis: Redis, shared: SharedBreakers | None = None
) -> tuple[Gateway, list[ProviderClient]]:
    s = settings
    catalog = build_catalog(s)
    clients = {
        name: ProviderClient(
            provider,
            shards=s.llm_gateway_client_shards,
            connect_s=s.llm_gateway_connect_timeout_s,
            read_s=s.llm_gateway_read_timeout_s,
            write_s=s.llm_gateway_write_timeout_s,
            pool_s=s.llm_gateway_pool_timeout_s,
            keepalive_expiry_s=s.llm_gateway_keepalive_expiry_s,
            transport=s.llm_gateway_http_transport,
            rate_limit_cooldown_s=s.llm_gateway_key_rate_limit_cooldown_s,
            auth_cooldown_s=s.llm_gateway_key_auth_cooldown_s,
        )
        for name, provider in catalog.providers.items()
        if provider.available
    }
    fail_max, reset_s = s.llm_gateway_breaker_fail_max, s.llm_gateway_breaker_reset_s
    breakers = {
        name: ProviderBreaker(
            name,
            fail_max=fail_max,
            reset_s=reset_s,
            shared=(
                shared.circuit(name, fail_max=fail_max, reset_s=reset_s)
                if shared is not None and provider.available
                else None
            ),
        )
        for name, provider in catalog.providers.items()
    }
    policy = RetryPolicy(
        max_retries=s.llm_gateway_max_retries,
        base_s=s.llm_gateway_retry_base_s,
        max_backoff_s=s.llm_gateway_retry_max_backoff_s,
        retry_after_cap_s=s.llm_gateway_retry_after_cap_s,
    )
    limiter = TenantLimiter(
        redis,
        LimitPolicy(
            rpm=s.llm_gateway_rpm,
            tpm=s.llm_gateway_tpm,
            daily_budget_usd=s.llm_gateway_daily_budget_usd,
            overrides=s.llm_gateway_tenant_limits,
        ),
        fail_mode=s.finsight_rate_limit_fail_mode,
    )
    gateway = Gateway(
        catalog=catalog,
        router=Router(clients, breakers, policy),
        breakers=breakers,
        limiter=limiter,
        cache=ResponseCache(
            redis,
            default_ttl_s=s.llm_gateway_cache_ttl_s,
            max_entry_bytes=s.llm_gateway_cache_max_entry_bytes,
        ),
        ledger=UsageLedger(
            redis,
            stream=s.llm_gateway_usage_stream,
            stream_maxlen=s.llm_gateway_usage_stream_maxlen,
            retention_days=s.llm_gateway_usage_retention_days,
        ),
        redis=redis,
        max_messages=s.llm_gateway_max_messages,
        max_prompt_bytes=s.llm_gateway_max_prompt_bytes,
        cache_enabled=s.llm_gateway_cache_enabled,
        stream_max_s=s.llm_gateway_stream_max_s,
        pii_policy=s.llm_gateway_pii_policy,
        pii_detector=PiiDetector(phone_region=s.llm_gateway_pii_phone_region),
    )
    return gateway, list(clients.values())


async def setup(host: ServiceHost, redis: Redis) -> None:
    settings = host.settings
    assert isinstance(settings, GatewaySettings)
    shared = (
        SharedBreakers(
            redis,
            poll_s=settings.llm_gateway_shared_breaker_poll_s,
            window_s=settings.llm_gateway_shared_breaker_window_s,
        )
        if settings.llm_gateway_shared_breaker
        else None
    )
    gateway, clients = build_gateway(settings, redis, shared)
    # ~0.4 s, off the event loop and before SERVING, so no request pays for it.
    await asyncio.to_thread(get_tokenizer)
    release_freed_heap()
    llm_gateway_pb2_grpc.add_LlmGatewayServiceServicer_to_server(
        LlmGatewayServicer(gateway), host.server
    )

    async def config_loaded() -> bool:
        return True  # setup only gets here with a valid catalog and a loaded tokenizer

    host.add_readiness_check("config", config_loaded)
    # Each call's token from its caller's rate limit is spent in the tenant admission
    # script, the round trip those calls make anyway (libs.common.ratelimit.CallerLimit).
    for method in ("Complete", "StreamComplete", "Embed"):
        host.add_policy(method, MethodPolicy(host.interceptor.default_scope, limit_in_handler=True))
    for client in clients:
        host.on_shutdown(client.aclose)
    if shared is not None:
        shared.start()  # polls from before the server starts: it learns what is open first
        host.on_shutdown(shared.aclose)
    # Registered last, so it runs first: answers' accounting lands before Redis closes.
    host.on_shutdown(gateway.after.drain)


def release_freed_heap() -> None:
    """Give the memory freed while loading the tokenizer back to the OS.

    Parsing tokenizer.json allocates ~20 MiB more than the tokenizer keeps; glibc holds the
    freed pages in its arenas, where they count in RSS for the life of the process (the
    gateway's RSS at SERVING drops from ~150 to ~131 MiB). A no-op without glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    main_entry(GatewaySettings, setup, uvloop=True)


if __name__ == "__main__":
    main()
