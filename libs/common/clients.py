"""Channels for service-to-service calls.

`create_channel` gives a `grpc.aio` channel with: a retry policy for
UNAVAILABLE, `round_robin` over every address DNS returns (headless
Kubernetes Services: use `dns:///memory:50052`), keepalive, TLS/mTLS when
configured, tracing (W3C context injected into metadata), client metrics, auth
metadata, and deadline propagation: a downstream call gets
`min(caller's remaining deadline, explicit timeout, default cap)`, and one
whose caller has no time left fails with DEADLINE_EXCEEDED without being sent.

Auth: the caller's own key is forwarded when the call is made while handling
an RPC, so the downstream service sees the same identity and tenant; outside
an RPC (background jobs) the service's own key (`FINSIGHT_SERVICE_API_KEY`)
is used. A call that acts for a tenant (a delegated inbound call, or background work in
`context.acting_for(tenant)`) also carries `x-finsight-on-behalf-of-tenant`, so the
callee bills and scopes it to that tenant (libs/common/auth.py, "Delegation").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from libs.common import context, metrics
from libs.common.auth import ON_BEHALF_OF_HEADER
from libs.common.config import CommonSettings
from libs.common.errors import DeadlineExceeded

RETRY_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


class _ClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, service_key: str | None, default_deadline_s: float) -> None:
        self.service_key = service_key
        self.default_deadline_s = default_deadline_s
        self._pending: set[asyncio.Task[None]] = set()

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        remaining = context.remaining_time()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                "caller deadline already passed; downstream call not sent",
                reason="DEADLINE_PROPAGATED",
            )
        candidates = [t for t in (details.timeout, remaining) if t is not None]
        timeout = min(candidates) if candidates else self.default_deadline_s
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:
            key = context.inbound_bearer() or self.service_key
            if key:
                metadata["authorization"] = f"Bearer {key}"
            tenant = context.on_behalf_of_tenant()
            if tenant and ON_BEHALF_OF_HEADER not in metadata:
                metadata[ON_BEHALF_OF_HEADER] = tenant
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    def _observe(self, call: Any, method: str | bytes, kind: str) -> None:
        name = method.decode() if isinstance(method, bytes) else method
        service, _, rpc = name.lstrip("/").rpartition("/")
        labels = (service, rpc, kind)
        metrics.CLIENT_STARTED.labels(*labels).inc()
        started = time.perf_counter()

        async def record() -> None:
            code = await call.code()
            metrics.CLIENT_HANDLED.labels(*labels, code.name).inc()
            metrics.CLIENT_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - started)

        def done(_: Any) -> None:
            task = asyncio.ensure_future(record())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(self._details(client_call_details), request)
        self._observe(call, client_call_details.method, "unary")
        return call

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(self._details(client_call_details), request)
        self._observe(call, client_call_details.method, "server_stream")
        return call

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        call = await continuation(self._details(client_call_details), request_iterator)
        self._observe(call, client_call_details.method, "client_stream")
        return call

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        call = await continuation(self._details(client_call_details), request_iterator)
        self._observe(call, client_call_details.method, "bidi_stream")
        return call


def service_config(health_service: str | None = None) -> dict[str, Any]:
    """The channel's service config: round-robin, retries of UNAVAILABLE and, given the
    peer's readiness name, client-side health checking: each connection watches
    `grpc.health.v1.Health/Watch(health_service)` and round-robin picks only peers that
    report SERVING. A replica that starts draining (NOT_SERVING for
    FINSIGHT_DRAIN_DELAY_S before its listener closes) stops receiving new calls at once,
    so a rolling restart fails none; calls already sent finish within the shutdown grace."""
    config = dict(RETRY_SERVICE_CONFIG)
    if health_service:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return config


def channel_options(
    settings: CommonSettings, health_service: str | None = None
) -> list[tuple[str, Any]]:
    # Health checks carry no credentials: only watch peers whose health is exempt from auth.
    watched = health_service if settings.finsight_auth_exempt_health else None
    return [
        ("grpc.service_config", json.dumps(service_config(watched))),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", int(settings.finsight_keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_receive_message_length", settings.finsight_max_message_bytes),
        ("grpc.max_send_message_length", settings.finsight_max_message_bytes),
        # Reconnect quickly once a peer is back: gRPC's default backoff grows to 120 s, so
        # after a 30 s outage the channel could wait ~10 s more before trying again.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", int(settings.finsight_max_reconnect_backoff_s * 1000)),
    ]


def client_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA is configured; the service's cert is presented for mTLS."""
    if settings.finsight_tls_ca_file is None:
        return None
    cert = key = None
    if settings.finsight_tls_cert_file and settings.finsight_tls_key_file:
        cert = settings.finsight_tls_cert_file.read_bytes()
        key = settings.finsight_tls_key_file.read_bytes()
    return grpc.ssl_channel_credentials(
        root_certificates=settings.finsight_tls_ca_file.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )


def create_channel(
    target: str,
    settings: CommonSettings,
    *,
    health_service: str | None = None,
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to another Finsight service (`dns:///host:port` for round-robin);
    `health_service` (the peer's readiness name) turns on client-side health checking."""
    service_key = (
        settings.finsight_service_api_key.get_secret_value()
        if settings.finsight_service_api_key
        else None
    )
    interceptors: list[grpc.aio.ClientInterceptor] = [
        _ClientInterceptor(service_key, settings.finsight_default_deadline_s),
        *aio_client_interceptors(),
        *extra_interceptors,
    ]
    creds = client_credentials(settings)
    options = channel_options(settings, health_service)
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def known_unreachable(channel: grpc.aio.Channel) -> bool:
    """True while the channel's last connection attempts failed (TRANSIENT_FAILURE: every
    address refused or timed out). A caller with a fallback can degrade at once instead of
    paying the retry policy's backoff on a peer that is gone; the channel keeps reconnecting
    in the background (backoff capped by FINSIGHT_MAX_RECONNECT_BACKOFF_S), so this turns
    false within that cap of the peer's return."""
    state = channel.get_state(try_to_connect=True)
    return state == grpc.ChannelConnectivity.TRANSIENT_FAILURE
