"""A local PostgreSQL 16 server for development and tests (the `pgserver` wheel).

    python -m libs.common.pglocal start DIR     # prints the server's URI (Unix socket)
    python -m libs.common.pglocal stop DIR

Used by `make run STORE=postgres` (libs/common/devstack.py) and the test suite
(tests/postgres.py). Both commands run in a fresh interpreter on purpose: pgserver drives
`initdb` / `pg_ctl` through subprocesses (as another user when run as root), and forking
a process that has gRPC threads running can crash the child before it executes
`pg_ctl` ("Other threads are currently calling into gRPC, skipping fork() handlers"),
which leaves a server that never started, or one that never stops. A fresh interpreter
has no such threads. The server outlives the command that started it; `stop` ends it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def start(data_dir: Path, timeout_s: float = 120) -> str:
    """Start (or find running) the server of `data_dir`; its URI."""
    out = subprocess.run(
        [sys.executable, "-m", "libs.common.pglocal", "start", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return out.stdout.strip().splitlines()[-1]


def stop(data_dir: Path, timeout_s: float = 120) -> None:
    """Stop the server of `data_dir` (fast shutdown); nothing if none runs."""
    subprocess.run(
        [sys.executable, "-m", "libs.common.pglocal", "stop", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m libs.common.pglocal start|stop DIR", file=sys.stderr)
        return 2
    command, folder = argv
    import pgserver

    data_dir = Path(folder)
    if command == "start":
        server = pgserver.get_server(str(data_dir), cleanup_mode=None)
        print(server.get_uri())
        return 0
    if (data_dir / "postmaster.pid").exists():
        pgserver.get_server(str(data_dir), cleanup_mode="stop").cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
