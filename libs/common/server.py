"""Server bootstrap: one way to build, run and drain a Finsight gRPC service.

    host = ServiceHost(settings, policies=POLICIES)
    add_MemoryServiceServicer_to_server(servicer, host.server)
    host.add_readiness_check("duckdb", db_ready)
    host.on_shutdown(db.close)
    await host.run()          # until SIGTERM/SIGINT

Health (`grpc.health.v1`, the standard servicer): `""` is the whole server,
`liveness` answers while the process and its event loop do (it never depends
on another system), and the service's full name is readiness: SERVING only
while every gating readiness check passes (a watched one, such as Redis with the
rate limiter failing open, is only exported as `finsight_dependency_up`). On
SIGTERM/SIGINT every name goes NOT_SERVING, the server keeps serving for
`FINSIGHT_DRAIN_DELAY_S` so load balancers notice, then `stop(grace)` lets
in-flight RPCs finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from redis.asyncio import Redis

from libs.common import metrics
from libs.common.auth import KeyStore
from libs.common.config import CommonSettings, S, load_settings_or_exit
from libs.common.error_reporting import configure_error_reporting, flush
from libs.common.interceptors import FinsightServerInterceptor, MethodPolicy, RateLimit
from libs.common.logging import configure_logging
from libs.common.ratelimit import TokenBucket
from libs.common.redis_pool import create_redis, redis_ready
from libs.common.tracing import configure_tracing, shutdown_tracing

log = logging.getLogger(__name__)

LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ReadinessCheck = Callable[[], Awaitable[bool]]


def server_options(settings: CommonSettings) -> list[tuple[str, Any]]:
    keepalive_ms = int(settings.finsight_keepalive_time_s * 1000)
    return [
        ("grpc.max_receive_message_length", settings.finsight_max_message_bytes),
        ("grpc.max_send_message_length", settings.finsight_max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
        ("grpc.http2.max_pings_without_data", 0),
        # Recycle connections so clients re-resolve DNS and spread over new pods; what is in
        # flight then gets the grace to finish (an LLM stream or a big ingest may last
        # minutes: a short grace cut them with UNAVAILABLE "max connection age").
        ("grpc.max_connection_age_ms", int(settings.finsight_max_connection_age_s * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            int(settings.finsight_max_connection_age_grace_s * 1000),
        ),
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    assert settings.finsight_tls_cert_file and settings.finsight_tls_key_file
    client_ca = settings.finsight_tls_client_ca_file
    return grpc.ssl_server_credentials(
        [
            (
                settings.finsight_tls_key_file.read_bytes(),
                settings.finsight_tls_cert_file.read_bytes(),
            )
        ],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def _not_health_check(details: grpc.HandlerCallDetails) -> bool:
    """`filters.negate(filters.health_check())` in one string test: the library's composed
    filters re-split the method name several times on every RPC."""
    return not details.method.lstrip("/").startswith(_HEALTH_SERVICE)


_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ServiceHost:
    """A configured `grpc.aio` server with health, reflection, metrics and drain."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        policies: Mapping[str, MethodPolicy] | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        limiter: TokenBucket | None = None,
        extra_service_names: Sequence[str] = (),
        port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.service_names = [settings.full_service_name, *extra_service_names]
        self.port = settings.grpc_port if port is None else port
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self.health = health_aio.HealthServicer()
        self.keystore = self._keystore(settings)
        limits = {
            "default": RateLimit(
                settings.finsight_rate_limit_rps, settings.finsight_rate_limit_burst
            )
        }
        limits.update(rate_limits or {})
        self.interceptor = FinsightServerInterceptor(
            keystore=self.keystore,
            limiter=limiter if settings.finsight_rate_limit_enabled else None,
            policies=policies or {},
            default_scope=settings.service_name or None,
            rate_limits=limits,
            exempt_health=settings.finsight_auth_exempt_health,
        )
        self.server = grpc.aio.server(
            interceptors=[
                # Probes every few seconds would drown the real traces.
                aio_server_interceptor(filter_=_not_health_check),
                self.interceptor,
            ],
            options=server_options(settings),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._checks: dict[str, tuple[ReadinessCheck, bool]] = {}
        # The last answer of each check, this host's (the gauge is per process).
        self.check_results: dict[str, bool] = {}
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        self._stop = asyncio.Event()
        self._ready_task: asyncio.Task[None] | None = None
        self._draining = False
        self.bound_port: int | None = None
        self.bound_metrics_port: int | None = None

    @staticmethod
    def _keystore(settings: CommonSettings) -> KeyStore | None:
        if not settings.finsight_auth_enabled:
            return None
        assert settings.finsight_api_keys_file is not None
        return KeyStore(Path(settings.finsight_api_keys_file))

    def add_service_name(self, full_name: str) -> None:
        """Another gRPC service served here (listed by reflection, reported by health)."""
        self.service_names.append(full_name)

    def add_policy(self, method: str, policy: MethodPolicy) -> None:
        """Scope and rate-limit class of a method added after construction."""
        self.interceptor.policies[method] = policy

    def add_readiness_check(self, name: str, check: ReadinessCheck, *, gates: bool = True) -> None:
        """Run `check` every readiness round and export it as `finsight_dependency_up{name}`.
        With `gates=False` the dependency is only watched: the service keeps serving without
        it (a cache), so its loss must not take the pod out of rotation."""
        self._checks[name] = (check, gates)

    def on_shutdown(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run after the server stopped, in reverse order of registration."""
        self._cleanups.append(cleanup)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        address = f"{self.settings.finsight_bind_host}:{self.port}"
        creds = server_credentials(self.settings)
        self.bound_port = (
            self.server.add_secure_port(address, creds)
            if creds
            else self.server.add_insecure_port(address)
        )
        if self.metrics_port is not None:
            self.bound_metrics_port = metrics.serve_metrics(
                self.metrics_port, self.settings.finsight_bind_host
            )
        await self.server.start()
        await self.health.set("", SERVING)
        await self.health.set(LIVENESS, SERVING)
        for name in self.service_names:
            await self.health.set(name, NOT_SERVING)
        await self._check_readiness()
        self._ready_task = asyncio.create_task(self._readiness_loop(), name="readiness")
        log.info(
            "service started",
            extra={
                "service": self.settings.service_name,
                "port": self.bound_port,
                "metrics_port": self.bound_metrics_port,
                "tls": self.settings.tls_enabled,
                "auth": self.keystore is not None,
            },
        )
        return self.bound_port

    async def _check_readiness(self) -> bool:
        ready = True
        for name, (check, gates) in self._checks.items():
            try:
                ok = await asyncio.wait_for(check(), timeout=2.0)
            except Exception:
                ok = False
            metrics.DEPENDENCY_UP.labels(name).set(1 if ok else 0)
            self.check_results[name] = ok
            ready = ready and (ok or not gates)
        if not self._draining:
            status = SERVING if ready else NOT_SERVING
            for name in self.service_names:
                await self.health.set(name, status)
            metrics.SERVICE_READY.set(1 if ready else 0)
        return ready

    async def _readiness_loop(self) -> None:
        previous: bool | None = None
        while not self._draining:
            ready = await self._check_readiness()
            if ready != previous:
                log.info("readiness changed", extra={"ready": ready})
                previous = ready
            await asyncio.sleep(self.settings.finsight_readiness_interval_s)

    def request_stop(self) -> None:
        self._stop.set()

    async def drain_and_stop(self) -> None:
        """Health → NOT_SERVING, wait for load balancers, then stop with grace."""
        if self._draining:
            return
        self._draining = True
        started = time.monotonic()
        log.info("draining", extra={"drain_delay_s": self.settings.finsight_drain_delay_s})
        metrics.SERVICE_READY.set(0)
        await self.health.enter_graceful_shutdown()
        if self._ready_task is not None:
            self._ready_task.cancel()
        await asyncio.sleep(self.settings.finsight_drain_delay_s)
        await self.server.stop(self.settings.finsight_shutdown_grace_s)
        for cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("cleanup failed")
        shutdown_tracing()
        flush()
        log.info("stopped", extra={"shutdown_s": round(time.monotonic() - started, 3)})

    async def run_until_signal(self) -> None:
        """Serve (already started) until SIGTERM/SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        await self.drain_and_stop()


Setup = Callable[[ServiceHost, Redis], Awaitable[None]]


async def start_service(
    settings: CommonSettings,
    setup: Setup,
    *,
    policies: Mapping[str, MethodPolicy] | None = None,
    rate_limits: Mapping[str, RateLimit] | None = None,
) -> ServiceHost:
    """Build the host with the shared Redis pool and rate limiter, let `setup` add the
    service's servicers, checks and cleanups, and start serving."""
    redis = create_redis(settings)
    limiter = TokenBucket(redis, fail_mode=settings.finsight_rate_limit_fail_mode)
    host = ServiceHost(settings, policies=policies, rate_limits=rate_limits, limiter=limiter)
    # Every service answers without Redis (caches miss, memory reads DuckDB, limits fail
    # open), and every replica shares the one Redis: gating readiness on it would take all
    # of them out of rotation at once. It gates only when the limiter fails closed, since
    # then no call can be answered anyway.
    host.add_readiness_check(
        "redis",
        lambda: redis_ready(redis),
        gates=settings.finsight_rate_limit_fail_mode == "closed",
    )
    host.on_shutdown(redis.aclose)
    await setup(host, redis)
    await host.start()
    return host


def main_entry(settings_cls: type[S], setup: Setup, *, uvloop: bool = False, **kwargs: Any) -> None:
    """`python -m services.X`: load config (exit 2 if invalid), serve until a signal.

    `uvloop=True` runs the service on uvloop when it is installed (plain asyncio otherwise):
    grpc.aio works on it, and it takes ~10% off the CPU per request of an I/O-heavy service
    such as the LLM gateway (docs/llm_gateway.md, "Performance").
    """
    settings = load_settings_or_exit(settings_cls)
    bootstrap_observability(settings)

    async def serve() -> None:
        host = await start_service(settings, setup, **kwargs)
        await host.run_until_signal()

    with asyncio.Runner(loop_factory=_loop_factory(uvloop)) as runner:
        runner.run(serve())


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on the asyncio event loop")
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def bootstrap_observability(settings: CommonSettings) -> None:
    """Logging and tracing for a service process; call first thing in main()."""
    configure_logging(
        settings.service_name, settings.finsight_log_level, secrets=settings.secret_values()
    )
    configure_error_reporting(
        settings.sentry_dsn.get_secret_value() if settings.sentry_dsn else None,
        service=settings.service_name,
        release=settings.finsight_release,
        environment=settings.finsight_env,
    )
    configure_tracing(
        settings.service_name,
        otlp_endpoint=settings.otel_exporter_otlp_endpoint,
        sample_ratio=settings.finsight_trace_sample_ratio,
        release=settings.finsight_release,
        environment=settings.finsight_env,
    )


async def wait_for_serving(
    target: str,
    service: str = "",
    timeout: float = 30.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll a health endpoint until `service` is SERVING (used by make run and tests)."""
    deadline = time.monotonic() + timeout
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                if reply.status == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} ({service or 'server'}) not SERVING after {timeout}s")
            await asyncio.sleep(0.1)
