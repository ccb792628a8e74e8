"""Property-based fuzzing of every RPC of the three services (see runner.py for invariants).

Quick (in `make test`): FUZZ_QUICK_EXAMPLES cases per RPC (default 20), derandomized so a
CI run is reproducible. Full (`make fuzz`, marked slow): FUZZ_EXAMPLES per RPC (default
1000) with fresh randomness each run; a failure prints the hypothesis blob to reproduce it.
The cases tried per RPC are printed and kept in .build/reliability/fuzz-{quick,full}.json.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.fuzz.conftest import Seeded, remember_fuzz_facts
from tests.fuzz.runner import Tally, fuzz_rpc, print_table, record
from tests.fuzz.targets import all_targets, target_names

QUICK = int(os.environ.get("FUZZ_QUICK_EXAMPLES", "20"))
FULL = int(os.environ.get("FUZZ_EXAMPLES", "1000"))


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict[str, dict[str, Any]]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {"quick": {}, "full": {}}
    yield out
    for mode, figures in out.items():
        if figures:
            print_table(f"fuzz ({mode})", figures)
            record(f"fuzz-{mode}", figures)


@pytest.fixture
async def reseeded(seeded: Seeded) -> AsyncIterator[Seeded]:
    """Give consent back and re-add facts a previous target may have erased."""
    seeded.fact_ids[:] = await remember_fuzz_facts(seeded.stack)
    yield seeded


async def _run(
    seeded: Seeded, name: str, examples: int, derandomize: bool, into: dict[str, Any]
) -> None:
    loop = asyncio.get_running_loop()
    target = all_targets(seeded, loop)[name]
    tally = Tally()
    try:
        await asyncio.to_thread(
            fuzz_rpc,
            seeded.stack,
            loop,
            target,
            examples=examples,
            derandomize=derandomize,
            tally=tally,
        )
        assert await seeded.stack.healthy()
    except BaseException:
        into[f"{seeded.store}:{name}"] = {**tally.as_dict(), "failed": True}
        raise
    figures = tally.as_dict()
    into[f"{seeded.store}:{name}"] = figures
    print(f"{name}: {figures['cases']} cases tried {figures['by_kind']} -> {figures['codes']}")


@pytest.mark.parametrize("name", target_names())
async def test_fuzz_quick(
    reseeded: Seeded, results: dict[str, dict[str, dict[str, Any]]], name: str
) -> None:
    await _run(reseeded, name, QUICK, derandomize=True, into=results["quick"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", target_names())
async def test_fuzz_full(
    reseeded: Seeded, results: dict[str, dict[str, dict[str, Any]]], name: str
) -> None:
    await _run(reseeded, name, FULL, derandomize=False, into=results["full"])
