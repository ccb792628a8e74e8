"""The whole system as separate processes, for fault, load, soak and security suites.

`Suite` starts, on free 127.0.0.1 ports under one directory:

* a Valkey server (`tests.conftest.RedisProcess`: stop/start on the same port),
* the dev LLM provider in its own process (`libs.devprovider`), scripted
  through `suite.control` (`DevProviderControl`),
* `python -m services.llm_gateway|memory|analytics`, each its own process, spawned by
  `libs.common.devstack.DevStack` exactly as `make run` spawns them, with the keys file of
  `tests.conftest.write_keys` (admin, alice, alice_rotated, bob, expired, narrow),

and waits until each reports SERVING on its readiness health name. The processes run with
their working directory in the suite directory (no `.env` is read) and an environment
cleared of every `FINSIGHT_*`, `REDIS_*`, service and provider variable of the caller.

Logs: `<root>/logs/<service>.log` (stdout + stderr of every start, appended, a
`--- devstack: starting` line before each start) and `<root>/logs/devprovider.log`;
`suite.log_paths()` lists them (Valkey's own log is `<root>/valkey/valkey.log`).

    async with Suite(tmp_path) as suite:
        stub = suite.memory()
        await stub.AppendMessages(req, metadata=suite.md("alice"), timeout=5)
        await suite.kill("memory")
        await suite.start("memory")              # waits for SERVING
        await suite.control.script({"status": 503, "times": 3})
        suite.redis_stop(); suite.redis_start()

`Suite(root, store="postgres")` runs the production topology instead, as
`make run STORE=postgres` does: a PostgreSQL server of the suite's own (`tests.postgres`,
data in `<root>/pg`; `pg_stop()` / `pg_start()` restart it on the same socket) with one
database per service, and two replicas each of memory and analytics, named `memory-1`,
`memory-2`, `analytics-1`, `analytics-2` (`suite.names`). `suite.memory()` and
`suite.analytics()` then round-robin over the replicas (an `ipv4:` target, as clients of a
headless Service do); `suite.channel("memory-2")` reaches one replica.

API (stable; other suites depend on it): `Suite(root, env=..., provider_latency_ms=...,
load_sample_data=..., store=...)`, `up()`, `down()`, `heal()`, `target(name)`, `metrics_url(name)`,
`pid(name)`, `returncode(name)`, `running(name)`, `log_path(name)`, `log_paths()`,
`stop(name, sig)`, `kill(name)`, `send_signal(name, sig)`, `wait_exit(name)`,
`start(name, env=..., wait=...)`, `restart(name)`,
`wait_serving(name)`, `health(name, service)`, `close_breakers()`, `redis_stop()`,
`redis_start()`, `pg_stop()`, `pg_start()`, `names`,
`provider_stop()`, `provider_start()`, `control`, `channel(name)`, `gateway()`,
`memory()`, `analytics()`, `admin(name)`, `md(identity)`, `metrics_text(name)`,
`metric(name, sample, labels)`, `breaker_states()`, `keys`, `redis`, `provider`, `env`.
Service names: "llm_gateway", "memory", "analytics".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from finsight.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from finsight.common.v1 import admin_pb2_grpc, common_pb2
from finsight.llm.v1 import llm_gateway_pb2, llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2, memory_pb2_grpc
from libs.common.devstack import (
    REPLICATED,
    SERVICES,
    DevStack,
    ServiceSpec,
    topology,
    without_settings,
)
from libs.devprovider import (
    DEFAULT_API_KEY,
    DevProviderControl,
    DevProviderProcess,
)
from tests.conftest import Keys, RedisProcess, free_port, write_keys
from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAMES = tuple(spec.name for spec in SERVICES)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNSPECIFIED = llm_gateway_pb2.CIRCUIT_STATE_UNSPECIFIED
CLOSED = llm_gateway_pb2.CIRCUIT_STATE_CLOSED
OPEN = llm_gateway_pb2.CIRCUIT_STATE_OPEN
HALF_OPEN = llm_gateway_pb2.CIRCUIT_STATE_HALF_OPEN


# Settings of the suite (over the services' defaults), chosen so faults show up within
# seconds: short drain and readiness intervals, quick retries, a 2 s absolute attempt
# timeout (a hung provider connection is abandoned and retried), a breaker that resets in
# 2 s, limits high enough that only a test that wants them hits them. `Suite(env=...)`
# overrides any of them.
DEFAULT_ENV: dict[str, str] = {
    "FINSIGHT_ENV": "dev",
    "FINSIGHT_LOG_LEVEL": "INFO",
    "FINSIGHT_DRAIN_DELAY_S": "1.0",
    "FINSIGHT_SHUTDOWN_GRACE_S": "10",
    "FINSIGHT_READINESS_INTERVAL_S": "0.25",
    "FINSIGHT_RATE_LIMIT_RPS": "1000",
    "FINSIGHT_RATE_LIMIT_BURST": "2000",
    "FINSIGHT_RATE_LIMIT_FAIL_MODE": "open",
    "FINSIGHT_DB_WORKERS": "2",
    "LLM_GATEWAY_RPM": "60000",
    "LLM_GATEWAY_TPM": "100000000",
    "LLM_GATEWAY_RETRY_BASE_S": "0.05",
    "LLM_GATEWAY_RETRY_MAX_BACKOFF_S": "0.5",
    "LLM_GATEWAY_RETRY_AFTER_CAP_S": "5",
    "LLM_GATEWAY_BREAKER_FAIL_MAX": "5",
    "LLM_GATEWAY_BREAKER_RESET_S": "2",
    "LLM_GATEWAY_ATTEMPT_TIMEOUT_S": "2",
    "LLM_GATEWAY_READ_TIMEOUT_S": "2",
    "LLM_GATEWAY_CONNECT_TIMEOUT_S": "2",
    "LLM_GATEWAY_CLIENT_SHARDS": "2",
    "ANALYTICS_LLM_TIMEOUT_S": "10",
    "ANALYTICS_MEMORY_TIMEOUT_S": "2",
}

# A second provider entry on the same dev provider, and a route falling back to it:
# "resilient" = deepseek-chat, then backup-chat (own provider name, own breaker).
FALLBACK_ROUTE = "resilient"
BACKUP_PROVIDER = "backup"


def _fallback_settings(provider_root: str) -> dict[str, str]:
    return {
        "LLM_GATEWAY_PROVIDERS": json.dumps(
            {BACKUP_PROVIDER: {"base_url": provider_root, "api_key_env": "DEEPSEEK_API_KEY"}}
        ),
        "LLM_GATEWAY_MODELS": json.dumps(
            {
                "backup-chat": {
                    "provider": BACKUP_PROVIDER,
                    "provider_model": "deepseek-chat",
                    "context_window": 131072,
                    "max_output_tokens": 8192,
                    "default_max_tokens": 4096,
                    "input_cache_hit_per_mtok": "0.028",
                    "input_cache_miss_per_mtok": "0.28",
                    "output_per_mtok": "0.42",
                    "prices_as_of": "2025-09-29",
                }
            }
        ),
        "LLM_GATEWAY_ROUTES": json.dumps(
            {FALLBACK_ROUTE: {"models": ["deepseek-chat", "backup-chat"]}}
        ),
    }


# Client channels of the test process reconnect quickly after a restart.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class LoggedProviderProcess(DevProviderProcess):
    """The dev provider with its stderr (its log) appended to a file."""

    def __init__(self, log_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_path = log_path

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env
            )
        try:
            url = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        self.port = int(url.rsplit(":", 1)[1])


class Suite:
    """Valkey + dev provider + the three services as processes; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        provider_latency_ms: float = 0.0,
        load_sample_data: bool = True,
        store: str = "duckdb",
    ) -> None:
        self.store = store
        self.specs = topology(store)
        self.names = tuple(spec.name for spec in self.specs)
        self.pg: PostgresServer | None = None
        self._pg_urls: dict[str, str] = {}
        self.root = root.resolve()
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.keys: Keys = write_keys(self.root / "api-keys.json")
        self.redis = RedisProcess(self.root / "valkey")
        self.provider = LoggedProviderProcess(
            self.log_dir / "devprovider.log",
            latency_ms=provider_latency_ms,
            api_key=DEFAULT_API_KEY,
        )
        self.overrides = dict(env or {})
        self.load_sample_data = load_sample_data
        self.stack: DevStack | None = None
        self._control: DevProviderControl | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._cold = False  # a service (re)started since the last warm-up
        self._http: httpx.AsyncClient | None = None
        self.started_s: float | None = None  # time from up() to every service SERVING

    # -- lifecycle of the whole suite ---------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = without_settings(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(DEFAULT_ENV)
        env.update(
            {
                "FINSIGHT_DATA_DIR": str(self.data_dir),
                "FINSIGHT_BIND_HOST": "127.0.0.1",
                "REDIS_URL": self.redis.url,
                "FINSIGHT_AUTH_ENABLED": "true",
                "FINSIGHT_API_KEYS_FILE": str(self.keys.path),
                "DEEPSEEK_API_KEY": DEFAULT_API_KEY,
                "DEEPSEEK_BASE_URL": self.provider.root_url,
                "ANALYTICS_LOAD_SAMPLE_DATA": "true" if self.load_sample_data else "false",
                **_fallback_settings(self.provider.root_url),
            }
        )
        for spec in SERVICES:
            env[spec.port_var] = str(free_port())
            env[spec.metrics_var] = str(free_port())
        for service, url in self._pg_urls.items():
            env[f"{service.upper()}_DATABASE_URL"] = url
        env.update(self.overrides)
        return env

    async def up(self, timeout: float = 180, *, warm: bool = True) -> Self:
        """Start everything and wait for SERVING (then `warm_up()` unless `warm=False`)."""
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.redis.start)
        await asyncio.to_thread(self.provider.start)
        if self.store == "postgres":
            await asyncio.to_thread(self.pg_start)
            for service in REPLICATED:
                self._pg_urls[service] = await asyncio.to_thread(
                    self._pg().create_database, service
                )
        self._control = DevProviderControl(self.provider.root_url)
        self.stack = DevStack(self._env(), cwd=self.root, log_dir=self.log_dir, store=self.store)
        self.stack.default_downstream_targets()
        try:
            for spec in self.specs:
                await self.stack.start_service(spec)
            await self._await_serving(list(self.names), timeout)
            self.started_s = time.monotonic() - started
            if warm:
                await self.warm_up()
        except BaseException:
            await self.down()
            raise
        return self

    async def warm_up(self) -> None:
        """First calls are slow (lazy imports, first queries, connection set-up): make one of
        each kind so tests measure the steady state. Writes a session `harness-warmup` of
        user `harness` (tenant of alice)."""
        self._cold = False
        md, deadline = self.md("alice"), 60
        await self.memory().BuildContext(
            memory_pb2.BuildContextRequest(
                session_id="harness-warmup", user_id="harness", query="warm up", token_budget=512
            ),
            metadata=md,
            timeout=deadline,
        )
        await self.gateway().Complete(
            llm_gateway_pb2.CompleteRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="warm up")],
                max_tokens=4,
            ),
            metadata=md,
            timeout=deadline,
        )
        if self.load_sample_data:
            await self.analytics().Analyze(
                analytics_pb2.AnalyzeRequest(
                    session_id="harness-warmup",
                    user_id="harness",
                    symbols=["AAPL"],
                    question="warm up",
                ),
                metadata=md,
                timeout=deadline,
            )

    async def down(self) -> None:
        """Stop everything this suite started (SIGTERM, SIGKILL after 30 s)."""
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._control is not None:
            await self._control.aclose()
            self._control = None
        if self.stack is not None:
            for proc in self.stack.procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for name in list(self.stack.procs):
                await self.stack.stop_service(name, None, timeout=30)
        await asyncio.to_thread(self.provider.stop)
        await asyncio.to_thread(self.redis.stop)
        if self.pg is not None:
            await asyncio.to_thread(self.pg_stop)

    async def __aenter__(self) -> Self:
        return await self.up()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.down()

    async def heal(self, timeout: float = 120) -> None:
        """Back to the initial state after a test: Redis and provider up with no script,
        every service running and SERVING (restarted if a test left it stopped), every
        provider circuit closed, and a warm-up if any service was (re)started."""
        if self.redis.server is None:
            await asyncio.to_thread(self.redis.start)
        if self.provider.pid is None:
            await asyncio.to_thread(self.provider.start)
        if self.store == "postgres" and self.pg is None:
            await asyncio.to_thread(self.pg_start)
        await self.control.reset()
        for name in self.names:
            if not self.running(name):
                await self.start(name, wait=False)
        await self._await_serving(list(self.names), timeout)
        await self.close_breakers()
        if self._cold:
            await self.warm_up()

    async def close_breakers(self, timeout: float = 30) -> None:
        """Make one successful call through each provider whose circuit is not closed (once
        its reset time has passed), so the next test starts with closed circuits."""
        reply = await self.gateway().ListModels(
            llm_gateway_pb2.ListModelsRequest(), metadata=self.md("admin"), timeout=5
        )
        model_of = {m.provider: m.name for m in reversed(reply.models)}
        deadline = time.monotonic() + timeout
        for provider in reply.providers:
            if provider.circuit_state in (CLOSED, UNSPECIFIED) or provider.name not in model_of:
                continue
            request = llm_gateway_pb2.CompleteRequest(
                model=model_of[provider.name],
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="heal")],
                max_tokens=4,
            )
            while True:
                try:
                    await self.gateway().Complete(request, metadata=self.md("admin"), timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)

    # -- addressing ---------------------------------------------------------------------------
    @property
    def _stack(self) -> DevStack:
        if self.stack is None:
            raise RuntimeError("the suite is not up")
        return self.stack

    @property
    def env(self) -> dict[str, str]:
        """The environment every service process starts with."""
        return self._stack.env

    @property
    def control(self) -> DevProviderControl:
        if self._control is None:
            raise RuntimeError("the suite is not up")
        return self._control

    def spec(self, name: str) -> ServiceSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown service {name!r}; one of {self.names}")

    def target(self, name: str) -> str:
        """`127.0.0.1:<grpc port>` of a service process; for a replicated service's name
        (`memory` in the PostgreSQL topology) an `ipv4:` target naming every replica."""
        if name not in self.names:
            return self._stack.service_target(name)
        return self._stack.target(self.spec(name))

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._stack.metrics_port(self.spec(name))}/metrics"

    def pid(self, name: str) -> int | None:
        proc = self._stack.procs.get(name)
        return proc.pid if proc is not None and proc.returncode is None else None

    def returncode(self, name: str) -> int | None:
        """Exit code of the last process of `name` (None while it runs)."""
        proc = self._stack.procs.get(name)
        return None if proc is None else proc.returncode

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    def log_path(self, name: str) -> Path:
        """`llm_gateway`, `memory`, `analytics` or `devprovider`."""
        return self.log_dir / f"{name}.log"

    def log_paths(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"))

    # -- lifecycle of one service -------------------------------------------------------------
    async def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send `sig` and wait for the exit (SIGKILL after `timeout` s); the exit code."""
        code = await self._stack.stop_service(name, sig, timeout=timeout)
        self._retire_channel(name)
        return code

    def send_signal(self, name: str, sig: int) -> None:
        """Signal a running service without waiting (its channel stays open, so calls in
        flight continue); see `wait_exit`."""
        proc = self._stack.procs[name]
        if proc.returncode is None:
            proc.send_signal(sig)

    async def wait_exit(self, name: str, timeout: float = 30) -> int:
        """Wait for a service process to exit; its exit code."""
        return await asyncio.wait_for(self._stack.procs[name].wait(), timeout=timeout)

    async def kill(self, name: str) -> int | None:
        """SIGKILL: no drain, no cleanup (returns -9)."""
        return await self.stop(name, signal.SIGKILL, timeout=10)

    async def start(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 120,
    ) -> None:
        """Start `name` (stopped before) on the same ports; `env` over the suite's for this
        start only; wait until SERVING unless `wait=False`."""
        if self.running(name):
            raise RuntimeError(f"{name} is running (pid {self.pid(name)})")
        await self._stack.start_service(self.spec(name), env)
        self._cold = True  # `heal()` warms it up
        if wait:
            await self.wait_serving(name, timeout=timeout)

    async def restart(
        self, name: str, *, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> None:
        await self.stop(name)
        await self.start(name, env=env, timeout=timeout)

    async def wait_serving(self, name: str, timeout: float = 120) -> None:
        await self._await_serving([name], timeout)

    async def _await_serving(self, names: list[str], timeout: float) -> None:
        try:
            await self._stack.await_serving(
                [self.spec(n) for n in names], timeout=timeout, announce=False
            )
        except (RuntimeError, TimeoutError) as exc:
            tails = "\n".join(
                f"--- {n} (last lines of {self.log_path(n)}):\n{self._tail(n)}" for n in names
            )
            raise RuntimeError(f"{exc}\n{tails}") from exc

    def _tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def health(self, name: str, service: str | None = None, timeout: float = 2.0) -> int:
        """Health status of `service` (default: the readiness name) on `name`'s port.
        Raises grpc.aio.AioRpcError when nothing answers."""
        stub = health_pb2_grpc.HealthStub(self.channel(name))
        service = self.spec(name).health_name if service is None else service
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return int(reply.status)

    # -- PostgreSQL (store="postgres") ----------------------------------------------------------
    def _pg(self) -> PostgresServer:
        if self.pg is None:
            raise RuntimeError("PostgreSQL is not running")
        return self.pg

    def pg_start(self) -> None:
        """Start (again) the suite's PostgreSQL server, on the same data and socket."""
        self.pg = PostgresServer.start(self.root / "pg")

    def pg_stop(self) -> None:
        """Stop the PostgreSQL server (a fast shutdown: sessions are disconnected)."""
        self._pg().stop()
        self.pg = None

    # -- Redis and the provider ---------------------------------------------------------------
    def redis_stop(self) -> None:
        self.redis.stop()

    def redis_start(self) -> None:
        self.redis.start()
        url = getattr(self.redis.server, "connection_url", self.redis.url)
        if f":{self.redis.port}" not in url:
            raise RuntimeError(
                f"Valkey restarted on another port: {url} (wanted {self.redis.port})"
            )

    async def provider_stop(self) -> None:
        """The provider process goes away (connections refused until provider_start)."""
        await asyncio.to_thread(self.provider.stop)

    async def provider_start(self) -> None:
        """The provider again, on the same port, with a fresh (empty) script."""
        await asyncio.to_thread(self.provider.start)

    # -- clients ------------------------------------------------------------------------------
    def md(self, identity: str = "alice") -> tuple[tuple[str, str], ...]:
        """Call metadata for an identity of the keys file (admin, alice, bob, ...)."""
        return self.keys.metadata(getattr(self.keys, identity))

    def channel(self, name: str) -> grpc.aio.Channel:
        """A plaintext channel to `name`, shared by calls (closed by `down()`)."""
        channel = self._channels.get(name)
        if channel is None:
            options = CHANNEL_OPTIONS
            if name not in self.names:  # every replica of a service: spread the calls
                options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
            channel = grpc.aio.insecure_channel(self.target(name), options=options)
            self._channels[name] = channel
        return channel

    def _retire_channel(self, name: str) -> None:
        # A stopped server leaves its channel in reconnect backoff; the next `channel(name)`
        # is a fresh one that connects at once. The old one is closed by `down()`, not here:
        # closing it would cancel the calls in flight, which must see the fault itself.
        channel = self._channels.pop(name, None)
        if channel is not None:
            self._retired.append(channel)

    def gateway(self) -> llm_gateway_pb2_grpc.LlmGatewayServiceStub:
        return llm_gateway_pb2_grpc.LlmGatewayServiceStub(self.channel("llm_gateway"))

    def memory(self) -> memory_pb2_grpc.MemoryServiceStub:
        return memory_pb2_grpc.MemoryServiceStub(self.channel("memory"))

    def analytics(self) -> analytics_pb2_grpc.AnalyticsServiceStub:
        return analytics_pb2_grpc.AnalyticsServiceStub(self.channel("analytics"))

    def admin(self, name: str) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel(name))

    # -- observation --------------------------------------------------------------------------
    async def metrics_text(self, name: str) -> str:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5)
        response = await self._http.get(self.metrics_url(name))
        response.raise_for_status()
        return response.text

    async def metric(
        self, name: str, sample: str, labels: Mapping[str, str] | None = None
    ) -> float:
        """Sum of the samples called `sample` whose labels include `labels` (0 if none)."""
        total = 0.0
        wanted = dict(labels or {})
        for family in text_string_to_metric_families(await self.metrics_text(name)):
            for s in family.samples:
                if s.name == sample and wanted.items() <= s.labels.items():
                    total += s.value
        return total

    async def breaker_states(self, identity: str = "admin") -> dict[str, int]:
        """Provider name -> CircuitState, as ListModels reports it."""
        reply = await self.gateway().ListModels(
            llm_gateway_pb2.ListModelsRequest(), metadata=self.md(identity), timeout=5
        )
        return {p.name: int(p.circuit_state) for p in reply.providers}
