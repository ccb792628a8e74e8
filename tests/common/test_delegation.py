"""Delegation: a service key with scope `tenant.delegate` acting for a tenant
(`x-finsight-on-behalf-of-tenant`), against a real gateway on the dev provider: usage,
limits and budget are the named tenant's; the header without the scope, from a `*` key or
with a malformed tenant is refused; the kit's channels send it for background work."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc as pb_grpc
from libs.common import context
from libs.common.auth import (
    ANONYMOUS,
    DELEGATE_SCOPE,
    ON_BEHALF_OF_HEADER,
    Identity,
    on_behalf_of,
)
from libs.common.clients import create_channel
from libs.common.errors import InvalidArgument, PermissionDenied, status_info
from libs.devprovider import DevProvider, DevProviderControl
from services.llm_gateway.config import GatewaySettings
from tests.conftest import Keys, RedisProcess, make_settings
from tests.llm_gateway.conftest import Gw, control, provider, start_gateway, user

__all__ = ["control", "provider"]  # the gateway tests' fixtures

SERVICE = Identity("memory", "t-memory", frozenset({"llm_gateway", DELEGATE_SCOPE}), "svc-1")


def md(key: str, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    out = (("authorization", f"Bearer {key}"),)
    return (*out, (ON_BEHALF_OF_HEADER, tenant)) if tenant is not None else out


def test_the_rule() -> None:
    assert on_behalf_of(SERVICE, [("authorization", "Bearer x")]) is SERVICE
    acting = on_behalf_of(SERVICE, [(ON_BEHALF_OF_HEADER, "acme")])
    assert (acting.caller, acting.tenant, acting.key_id) == ("memory", "acme", "svc-1")
    assert acting.key_tenant == "t-memory" and acting.delegated and not SERVICE.delegated
    assert acting.scopes == SERVICE.scopes
    assert on_behalf_of(SERVICE, [(ON_BEHALF_OF_HEADER, "t-memory")]) is SERVICE  # its own
    # Only the explicit scope: neither `*` nor `tenant.*` grants it.
    for scopes in ({"*"}, {"tenant.*"}, {"llm_gateway"}):
        who = Identity("x", "t", frozenset(scopes), "k")
        with pytest.raises(PermissionDenied) as denied:
            on_behalf_of(who, [(ON_BEHALF_OF_HEADER, "acme")])
        assert denied.value.reason == "DELEGATION_NOT_ALLOWED"
        assert DELEGATE_SCOPE in str(denied.value)
        assert on_behalf_of(who, [(ON_BEHALF_OF_HEADER, "t")]) is who  # its own: a no-op
    for bad in ("", "a:b", "-x", "x" * 129, "acme\n", "ü"):
        with pytest.raises(InvalidArgument):
            on_behalf_of(SERVICE, [(ON_BEHALF_OF_HEADER, bad)])
    with pytest.raises(InvalidArgument):
        on_behalf_of(SERVICE, [(ON_BEHALF_OF_HEADER, "a"), (ON_BEHALF_OF_HEADER, "b")])
    # Auth off: every claim is trusted.
    assert on_behalf_of(ANONYMOUS, [(ON_BEHALF_OF_HEADER, "acme")], trusted=True).tenant == "acme"


async def requests_of(gw: Gw, key: str, tenant: str | None = None) -> int:
    usage = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=md(key, tenant))
    return int(usage.total_requests)


async def test_a_delegated_call_is_billed_and_limited_as_the_named_tenant(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="finsight.access")
    gw = await start_gateway(
        tmp_path,
        private_redis.url,
        api_keys,
        provider,
        # 100 nano-USD: no request fits. The service's own tenant is unlimited.
        llm_gateway_tenant_limits={"broke": {"daily_budget_usd": "0.0000001"}},
    )
    try:
        request = pb.CompleteRequest(messages=[user("hello")], max_tokens=8)
        await gw.stub.Complete(request, metadata=md(api_keys.service, "acme"), timeout=10)
        await gw.stub.Complete(request, metadata=md(api_keys.service, "acme"), timeout=10)
        assert await requests_of(gw, api_keys.alice) == 2  # acme's own key sees them
        assert await requests_of(gw, api_keys.service, "acme") == 2
        assert await requests_of(gw, api_keys.service) == 0  # memory's tenant: nothing
        assert await requests_of(gw, api_keys.bob) == 0
        # The access log shows both: the tenant acted for, and the key's own tenant and id.
        (line, *_) = [r for r in caplog.records if getattr(r, "grpc_method", "") == "Complete"]
        assert (line.tenant, line.caller) == ("acme", "memory")  # type: ignore[attr-defined]
        assert (line.key_tenant, line.key_id) == ("t-memory", "memory-service")  # type: ignore[attr-defined]

        # The named tenant's budget applies, not the (unlimited) service tenant's.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.Complete(request, metadata=md(api_keys.service, "broke"), timeout=10)
        info = status_info(refused.value)
        assert (info.code, info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DAILY_BUDGET_EXHAUSTED",
        )
        await gw.stub.Complete(request, metadata=md(api_keys.service), timeout=10)
        assert await requests_of(gw, api_keys.service) == 1
    finally:
        await gw.close()


async def test_the_header_without_the_scope_is_refused(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw = await start_gateway(tmp_path, private_redis.url, api_keys, provider)
    try:
        request = pb.CompleteRequest(messages=[user("hello")], max_tokens=8)
        # alice (service scopes, no tenant.delegate) and admin (`*`): never silently ignored.
        for key in (api_keys.alice, api_keys.admin):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await gw.stub.Complete(request, metadata=md(key, "globex"), timeout=10)
            info = status_info(denied.value)
            assert (info.code, info.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "DELEGATION_NOT_ALLOWED",
            )
            assert DELEGATE_SCOPE in (denied.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await gw.stub.Complete(request, metadata=md(api_keys.service, "no:pe"), timeout=10)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await requests_of(gw, api_keys.bob) == 0  # globex: nothing was spent
        assert not [r for r in provider.state.log if r["path"].endswith("/chat/completions")]
    finally:
        await gw.close()


async def test_kit_channels_send_the_header_for_background_work_only(
    tmp_path: Path,
    private_redis: RedisProcess,
    api_keys: Keys,
    provider: DevProvider,
    control: DevProviderControl,
) -> None:
    gw = await start_gateway(tmp_path, private_redis.url, api_keys, provider)
    settings = make_settings(
        GatewaySettings,
        tmp_path,
        private_redis.url,
        api_keys,
        finsight_service_api_key=api_keys.service,
    )
    channel = create_channel(gw.target, settings)
    try:
        stub = pb_grpc.LlmGatewayServiceStub(channel)
        request = pb.CompleteRequest(messages=[user("hello")], max_tokens=8)
        with context.acting_for("acme"):
            await stub.Complete(request)
        assert context.on_behalf_of_tenant() is None  # reset on exit
        await stub.Complete(request)  # outside: the service's own tenant
        assert await requests_of(gw, api_keys.alice) == 1
        assert await requests_of(gw, api_keys.service) == 1
    finally:
        await channel.close()
        await gw.close()
