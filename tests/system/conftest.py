"""Fixtures of the system suites: the whole system as processes (tests/system/harness.py).

`system_suite` (session): started once for every system test of the run (under
`$SYSTEM_SUITE_DIR` when set, else pytest's tmp directory). `suite` (per test):
the same suite, healed before and after the test (Redis and provider up with no script,
every service running and SERVING), so a test may kill, stop or break anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.system.harness import Suite


@pytest.fixture(scope="session")
async def system_suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    # SYSTEM_SUITE_DIR keeps the data and logs where pytest's tmp rotation will not remove
    # them (to read the services' logs after a failure).
    base = os.environ.get("SYSTEM_SUITE_DIR")
    root = (
        Path(tempfile.mkdtemp(prefix="system-", dir=base))
        if base
        else tmp_path_factory.mktemp("system")
    )
    suite = Suite(root)
    await suite.up()
    try:
        yield suite
    finally:
        await suite.down()


@pytest.fixture
async def suite(system_suite: Suite) -> AsyncIterator[Suite]:
    await system_suite.heal()
    yield system_suite
    await system_suite.heal()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`figures(name=value, ...)`: a test's measured figures, printed as one JSON line
    (`FIGURES {...}`, shown with `-s`) and appended to `$SYSTEM_FIGURES_FILE` when set."""

    def record(**values: Any) -> None:
        line = json.dumps({"test": request.node.name, **values}, default=str)
        print(f"FIGURES {line}")
        path = os.environ.get("SYSTEM_FIGURES_FILE")
        if path:
            with Path(path).open("a", encoding="utf-8") as out:
                out.write(line + "\n")

    return record
