"""Print line and branch coverage per package from the Cobertura XML that
`make test` writes, and fail when total line coverage drops below the floor.

    python .ci/coverage_by_package.py .build/coverage.xml --fail-under 80
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("xml")
    parser.add_argument("--fail-under", type=float, default=0.0)
    args = parser.parse_args()
    root = ET.parse(args.xml).getroot()  # noqa: S314
    rows = []
    for pkg in root.iter("package"):
        lines = [ln for cls in pkg.iter("class") for ln in cls.iter("line")]
        hit = sum(1 for ln in lines if int(ln.get("hits", "0")) > 0)
        branches = covered = 0
        for ln in lines:
            cond = ln.get("condition-coverage")  # e.g. "50% (1/2)"
            if cond:
                done, total = cond.split("(")[1].rstrip(")").split("/")
                covered, branches = covered + int(done), branches + int(total)
        rows.append((pkg.get("name") or ".", hit, len(lines), covered, branches))
    print(f"{'package':<32} {'lines':>14} {'line %':>7} {'branches':>12} {'branch %':>8}")
    for name, hit, total, covered, branches in sorted(rows):
        lp = 100.0 * hit / total if total else 100.0
        bp = 100.0 * covered / branches if branches else 100.0
        print(f"{name:<32} {hit:>6}/{total:<7} {lp:>6.1f}% {covered:>5}/{branches:<6} {bp:>7.1f}%")
    total_line = 100.0 * float(root.get("line-rate", "0"))
    total_branch = 100.0 * float(root.get("branch-rate", "0"))
    print(f"{'TOTAL':<32} {'':>14} {total_line:>6.1f}% {'':>12} {total_branch:>7.1f}%")
    if total_line + 1e-9 < args.fail_under:
        print(
            f"coverage {total_line:.1f}% is below the floor of {args.fail_under}%", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
