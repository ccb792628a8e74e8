"""`make run` in the first hour of a new user (issue 17): a second run, a busy port or a
locked DuckDB file is refused in one line with a non-zero exit; a service that dies takes
the suite down with a non-zero exit and the end of its log; the banner says how Analyze
answers without an LLM; keys a user added to the keys file survive a start.

Every stack here is the real devstack process with its real services, on ephemeral ports
and its own data dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from finsight.llm.v1 import llm_gateway_pb2, llm_gateway_pb2_grpc
from libs.common import devstack
from libs.common.auth import hash_key, key_entry, new_key
from libs.common.devstack import SERVICES, describe_pid, listening_pids, llm_providers
from libs.common.keytool import add_entry
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
UP = "Ctrl-C (or SIGTERM) stops everything"
# Settings of the machine or of a developer's shell that would change what the stack does.
_FOREIGN = (
    "REDIS_",
    "FINSIGHT_",
    "MEMORY_",
    "ANALYTICS_",
    "LLM_GATEWAY_",
    "DEEPSEEK_",
    "DEVSTACK_",
)


def stack_env(data_dir: Path, ports: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
    for spec in SERVICES:
        env[spec.port_var] = str(free_port())
        env[spec.metrics_var] = str(free_port())
    env["DEVSTACK_REDIS_PORT"] = str(free_port())  # never the default 16379
    env.update(ports or {})
    env["FINSIGHT_DATA_DIR"] = str(data_dir)
    env["FINSIGHT_DRAIN_DELAY_S"] = "0.2"
    return env


def port_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: env[k] for s in SERVICES for k in (s.port_var, s.metrics_var)}


def run_devstack(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the devstack to its end; on a timeout, kill its whole process group (so a stack
    that hangs leaves no service behind) and fail."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "libs.common.devstack"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def devstack_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while UP not in self.output():
            assert self.proc.poll() is None, "devstack exited early:\n" + self.output()[-3000:]
            assert time.monotonic() < deadline, "devstack not up:\n" + self.output()[-3000:]
            time.sleep(0.1)

    def child(self, module: str) -> psutil.Process:
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            if module in " ".join(proc.cmdline()):
                return proc
        raise AssertionError(f"no {module} process")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_stack(env: dict[str, str], log: Path) -> Stack:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "libs.common.devstack"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Stack(proc, log, env)


@dataclass
class Running:
    stack: Stack
    data_dir: Path
    user_key: str


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One stack, started with no LLM provider and a keys file holding a user's key and a
    stale dev entry (as after `rm var/dev-api-key`)."""
    root = tmp_path_factory.mktemp("running")
    data_dir = root / "var"
    data_dir.mkdir()
    user_key = new_key()
    keys_file = data_dir / "api-keys.json"
    add_entry(
        keys_file,
        key_entry(new_key(), caller="developer", tenant="dev", scopes=["*"], key_id="dev"),
    )
    add_entry(keys_file, key_entry(user_key, caller="alice", tenant="acme", scopes=["*"]))
    stack = start_stack(stack_env(data_dir), root / "stack.log")
    try:
        stack.wait_up()
        yield Running(stack, data_dir, user_key)
    finally:
        stack.stop()


def test_a_second_run_on_the_same_data_dir_is_refused_in_one_line(running: Running) -> None:
    second = run_devstack(running.stack.env)
    lines = devstack_lines(second.stdout + second.stderr)
    assert second.returncode != 0
    assert len(lines) == 1, lines
    assert "cannot start: another devstack" in lines[0]
    assert f"pid {running.stack.proc.pid}" in lines[0]
    assert str(running.data_dir / "devstack.lock") in lines[0]
    assert running.stack.proc.poll() is None  # the first one is untouched
    assert "stopping the suite" not in running.stack.output()


def test_a_second_run_on_the_ports_of_the_first_names_the_port_and_its_process(
    running: Running, tmp_path: Path
) -> None:
    env = stack_env(tmp_path / "other-var", port_settings(running.stack.env))
    second = run_devstack(env)
    lines = devstack_lines(second.stdout + second.stderr)
    assert second.returncode != 0
    assert len(lines) == 1, lines
    gateway = running.stack.child("services.llm_gateway")
    port = running.stack.env["LLM_GATEWAY_GRPC_PORT"]
    assert f"cannot start: port {port} (llm_gateway gRPC) is already in use" in lines[0]
    assert f"by pid {gateway.pid} (python -m services.llm_gateway)" in lines[0]
    assert running.stack.env["MEMORY_METRICS_PORT"] in lines[0]  # the others are listed too
    assert not (tmp_path / "other-var" / "api-keys.json").exists()  # nothing was started


def test_the_banner_says_analyze_answers_from_rules_without_an_llm(running: Running) -> None:
    out = running.stack.output()
    banner = out[out.index("Finsight is up") : out.index(UP)]
    assert "none configured: Analyze will answer from rules (rule-based answers" in banner
    assert "to enable DeepSeek: DEEPSEEK_API_KEY=sk-… make run" in banner
    assert "docs/llm_gateway.md" in banner


def test_make_run_keeps_the_keys_a_user_added_and_refreshes_its_own(running: Running) -> None:
    entries = json.loads((running.data_dir / "api-keys.json").read_text())["keys"]
    by_caller = {e["caller"]: e for e in entries}
    assert by_caller["alice"]["sha256"] == hash_key(running.user_key)
    dev_key = (running.data_dir / "dev-api-key").read_text().strip()
    assert [e["sha256"] for e in entries if e["id"] == "dev"] == [hash_key(dev_key)]
    target = f"127.0.0.1:{running.stack.env['LLM_GATEWAY_GRPC_PORT']}"
    with grpc.insecure_channel(target) as channel:
        stub = llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel)
        for key in (running.user_key, dev_key):
            reply = stub.ListModels(
                llm_gateway_pb2.ListModelsRequest(),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=10,
            )
            assert reply.models


def test_a_malformed_keys_file_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    keys_file = data_dir / "api-keys.json"
    keys_file.write_text('{"keys": [{"caller": "alice"')
    result = run_devstack(stack_env(data_dir))
    lines = devstack_lines(result.stdout + result.stderr)
    assert result.returncode != 0
    assert len(lines) == 1 and "cannot start: keys file" in lines[0], lines
    assert "not valid JSON" in lines[0]
    assert keys_file.read_text() == '{"keys": [{"caller": "alice"'


@pytest.mark.parametrize(
    ("setting", "what"),
    [("MEMORY_GRPC_PORT", "memory gRPC"), ("DEVSTACK_REDIS_PORT", "embedded Redis")],
)
def test_a_port_held_by_another_process_is_named_with_that_process(
    tmp_path: Path, setting: str, what: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = stack_env(tmp_path / "var", {setting: str(port)})
        result = run_devstack(env)
    lines = devstack_lines(result.stdout + result.stderr)
    assert result.returncode != 0
    assert len(lines) == 1, lines
    assert f"port {port} ({what}) is already in use by pid {os.getpid()} (" in lines[0]
    assert f"set {setting} to a free port" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_the_holder_of_a_port_is_found_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert listening_pids(holder.getsockname()[1]) == [os.getpid()]
    described = describe_pid(os.getpid())
    assert described.startswith(f"pid {os.getpid()} (") and "python" in described


def test_a_duckdb_file_locked_by_another_process_is_named_with_its_holder(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    db = data_dir / "analytics.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({str(db)!r}); print('open', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        result = run_devstack(stack_env(data_dir))
    finally:
        holder.kill()
        holder.wait()
    lines = devstack_lines(result.stdout + result.stderr)
    assert result.returncode != 0
    assert len(lines) == 1, lines
    assert f"cannot start: {db} (analytics's DuckDB file) is locked by pid {holder.pid}" in lines[0]
    assert not (data_dir / "memory.duckdb").exists()  # no service was started


def test_a_service_dying_while_running_stops_the_suite_with_a_non_zero_exit(
    tmp_path: Path,
) -> None:
    stack = start_stack(stack_env(tmp_path / "var"), tmp_path / "stack.log")
    try:
        stack.wait_up()
        memory = stack.child("services.memory")
        children = psutil.Process(stack.proc.pid).children(recursive=True)
        memory.kill()
        assert stack.proc.wait(timeout=60) == 1
    finally:
        stack.stop()
    out = stack.output()
    assert "memory was killed by SIGKILL; stopping the suite" in out
    assert "last " in out and "lines of memory's log:" in out
    last = devstack_lines(out)[-1]
    assert last.endswith(
        "devstack | the suite stopped: memory was killed by SIGKILL; everything else was stopped"
    )
    assert "Traceback" not in out
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)


def test_a_service_failing_at_start_up_ends_with_its_log_tail_and_a_non_zero_exit(
    tmp_path: Path,
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = stack_env(tmp_path / "var", {"MEMORY_DB_PATH": str(not_a_dir / "memory.duckdb")})
    result = run_devstack(env, timeout=90)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    tail = out[out.index("lines of memory's log:") :]
    assert str(not_a_dir) in tail  # the service's own reason is in the tail shown
    assert devstack_lines(out)[-1].endswith(
        "devstack | start-up failed: memory exited with code 1; everything else was stopped"
    )
    assert "Finsight is up" not in out


def test_llm_providers_are_read_as_the_gateway_reads_them() -> None:
    assert llm_providers({}) == []
    assert llm_providers({"DEEPSEEK_API_KEY": "sk-x"}) == ["deepseek"]
    assert llm_providers({"DEEPSEEK_API_KEY_FILE": "/run/secrets/k"}) == ["deepseek"]
    other = {"openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}}
    assert llm_providers({"LLM_GATEWAY_PROVIDERS": json.dumps(other)}) == ["openai"]
    bare = {"deepseek": {"base_url": "http://127.0.0.1:8089"}}  # still no key
    assert llm_providers({"LLM_GATEWAY_PROVIDERS": json.dumps(bare)}) == []
    assert devstack.describe_exit(-9) == "was killed by SIGKILL"
