"""Driving a provider from outside: ``DevProviderProcess`` runs one in a child process,
``DevProviderControl`` is an async client for its control API."""

from __future__ import annotations

import asyncio
import os
import selectors
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

from libs.devprovider.state import DEFAULT_API_KEY

if TYPE_CHECKING:
    import httpx

# The first stdout line of ``python -m libs.devprovider``: READY_PREFIX + root URL.
READY_PREFIX = "LISTENING "


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


class DevProviderProcess:
    """The provider in a child process, so it does not share the CPU of the code under test."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = DEFAULT_API_KEY,
        latency_ms: float = 0.0,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.latency_ms = latency_ms
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "libs.devprovider"]
        command += ["--host", self.host, "--port", str(self.port)]
        command += ["--latency-ms", str(self.latency_ms)]
        command += ["--no-auth"] if self.api_key is None else ["--api-key", self.api_key]
        return command + self.extra_args

    def start(self) -> None:
        env = dict(os.environ)
        root = str(_repo_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self._command(), stdout=subprocess.PIPE, cwd=root, env=env)
        try:
            url = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        self.port = urllib.parse.urlsplit(url).port or self.port

    def _read_ready_line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("devprovider child did not report its port in time")
                if selector.select(remaining):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        code = self._proc.poll()
                        raise RuntimeError(f"devprovider child exited early (code {code})")
                    buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"unexpected devprovider ready line {line!r}")
        return line[len(READY_PREFIX) :].strip()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class DevProviderControl:
    """Async client for the control API (works for in-process and child-process providers)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        import httpx  # deferred: the server itself must not need httpx

        root = url.rstrip("/")
        root = root.removesuffix("/v1")
        self._client: httpx.AsyncClient = httpx.AsyncClient(base_url=root, timeout=timeout)

    async def script(
        self,
        *actions: Mapping[str, Any],
        default: Mapping[str, Any] | EllipsisType | None = ...,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Queue one-shot ``actions``; ``default=`` sets (or with None clears) the sticky one."""
        payload: dict[str, Any] = {"actions": list(actions), "replace": replace}
        if default is not ...:
            payload["default"] = default
        return await self._call("POST", "/_control/script", payload)

    async def set_default(self, action: Mapping[str, Any] | None) -> dict[str, Any]:
        return await self.script(default=action)

    async def reset(self) -> None:
        await self._call("POST", "/_control/reset")

    async def state(self) -> dict[str, Any]:
        return await self._call("GET", "/_control/state")

    async def requests(self, since: int = 0) -> list[dict[str, Any]]:
        result = await self._call("GET", f"/_control/requests?since={since}")
        return list(result["requests"])

    async def _call(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        response = await self._client.request(method, path, json=payload)
        response.raise_for_status()
        return cast(dict[str, Any], response.json())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
