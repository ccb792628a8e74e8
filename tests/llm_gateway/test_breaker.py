"""The per-provider breaker counts failures raised during the await, and ignores 4xx."""

from __future__ import annotations

import asyncio

import pybreaker
import pytest

from libs.devprovider import DevProvider
from services.llm_gateway.breaker import CircuitOpen, ProviderBreaker
from services.llm_gateway.providers import ProviderClient, ProviderError
from tests.llm_gateway.conftest import BODY


async def call(breaker: ProviderBreaker, client: ProviderClient) -> None:
    with breaker.calling():
        await client.complete(BODY, timeout_s=5)


async def test_failures_during_the_await_are_counted(
    client: ProviderClient, provider: DevProvider
) -> None:
    provider.state.script(default={"status": 500})
    # The naive use, decorating the coroutine function, sees no failure at all:
    naive = pybreaker.CircuitBreaker(fail_max=2)
    for _ in range(3):
        with pytest.raises(ProviderError):
            await naive(client.complete)(BODY, timeout_s=5)
    assert naive.fail_counter == 0 and naive.current_state == "closed"
    # calling() around the await counts each one and opens.
    breaker = ProviderBreaker("dev", fail_max=2, reset_s=30)
    for _ in range(2):
        with pytest.raises(ProviderError):
            await call(breaker, client)
    assert breaker.state == "open"
    sent = len(provider.state.log)
    with pytest.raises(CircuitOpen) as err:
        await call(breaker, client)
    assert 29 < err.value.retry_after <= 30
    assert len(provider.state.log) == sent


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
async def test_client_errors_do_not_trip_it_but_429_does(
    client: ProviderClient, provider: DevProvider, status: int
) -> None:
    breaker = ProviderBreaker("dev", fail_max=2, reset_s=30)
    provider.state.script(default={"status": status})
    for _ in range(4):
        with pytest.raises(ProviderError):
            await call(breaker, client)
    assert breaker.state == "closed" and breaker.failures == 0
    provider.state.script(default={"status": 429})
    for _ in range(2):
        with pytest.raises(ProviderError):
            await call(breaker, client)
    assert breaker.state == "open"


async def test_timeouts_and_dropped_connections_count(
    client: ProviderClient, provider: DevProvider
) -> None:
    breaker = ProviderBreaker("dev", fail_max=2, reset_s=30)
    provider.state.script([{"drop": True}, {"hang": True}])
    with pytest.raises(ProviderError):
        await call(breaker, client)
    with pytest.raises(ProviderError) as err, breaker.calling():
        await client.complete(BODY, timeout_s=0.2)
    assert err.value.kind == "timeout"
    assert breaker.state == "open"


async def test_a_cancelled_call_is_not_a_provider_failure(
    client: ProviderClient, provider: DevProvider
) -> None:
    breaker = ProviderBreaker("dev", fail_max=1, reset_s=30)
    provider.state.script([{"hang": True}])
    task = asyncio.ensure_future(call(breaker, client))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "closed"


async def test_half_open_after_the_reset_timeout_then_closes_on_success(
    client: ProviderClient, provider: DevProvider
) -> None:
    breaker = ProviderBreaker("dev", fail_max=1, reset_s=0.3)
    provider.state.script([{"status": 503}])
    with pytest.raises(ProviderError):
        await call(breaker, client)
    assert breaker.state == "open"
    await asyncio.sleep(0.35)
    assert breaker.state == "half-open"
    await call(breaker, client)
    assert breaker.state == "closed"
