"""`make bench`: run every `benchmarks/bench_*.py` in its own process, in turn.

Each benchmark measures its baseline in the same run and reports ratios
(these machines are noisy); output is printed and also kept in
`.build/bench/<name>.txt`. `python -m benchmarks NAME...` runs only those.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / ".build" / "bench"


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("bench_*.py"))
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}"],
            capture_output=True,
            text=True,
            check=False,
        )
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
        (OUT / f"{name}.txt").write_text(proc.stdout)
        print(f"=== {name}: exit {proc.returncode} in {time.monotonic() - started:.0f}s ===")
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
