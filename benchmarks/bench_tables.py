"""Benchmark the drawdown and period tables (services/analytics/tables.py).

    .venv/bin/python -m benchmarks.bench_tables [--quick]

On the generated panel of bench_metrics (500 symbols x 10 years of daily prices) it times

* ours: ``compute_tables`` with the 10 deepest drawdowns and the monthly and yearly
  returns of every symbol (one vectorised call, result rows included), also split into
  the two tables;
* pyfolio's ``gen_drawdown_table(top=10)`` per symbol plus empyrical's
  ``aggregate_returns`` (monthly, yearly) per symbol: the usual way to get the same tables.

pyfolio and empyrical are timed on a subset of the symbols (20; 10 with ``--quick``) and
scaled to 500; their results are checked against ours first.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import empyrical as ep
import numpy as np
import pandas as pd

from benchmarks.bench_metrics import generate
from services.analytics import metrics as m
from services.analytics import tables as t

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pyfolio.timeseries as pft


def best_of(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    ds = generate()
    k = len(ds.symbols)
    subset = 10 if args.quick else 20
    returns = m.simple_returns(ds.prices)
    series = [
        pd.Series(np.r_[0.0, returns[1:, j]], index=pd.DatetimeIndex(ds.dates))
        for j in range(subset)
    ]
    ours = t.compute_tables(ds.prices, ds.dates, ds.symbols, drawdowns=10, periods=True)
    for j, s in enumerate(series[:5]):  # same numbers before timing
        table = pft.gen_drawdown_table(s, top=10)
        mine = ours[ds.symbols[j]]
        assert np.allclose(
            [-100 * d.depth for d in mine.drawdowns], table["Net drawdown in %"].astype(float)
        )
        monthly = ep.aggregate_returns(s.iloc[1:], "monthly").to_numpy()
        assert np.allclose([p.value for p in mine.monthly], monthly, rtol=1e-9, atol=0)

    def run(dd: int, periods: bool) -> Callable[[], Any]:
        return lambda: t.compute_tables(
            ds.prices, ds.dates, ds.symbols, drawdowns=dd, periods=periods
        )

    runs = 3 if args.quick else 7
    both = best_of(run(10, True), runs)
    dd_only = best_of(run(10, False), runs)
    periods_only = best_of(run(0, True), runs)
    metrics = best_of(lambda: m.compute_metrics(ds.prices, ds.dates, ds.symbols), runs)

    def reference() -> None:
        for s in series:
            pft.gen_drawdown_table(s, top=10)
            ep.aggregate_returns(s.iloc[1:], "monthly")
            ep.aggregate_returns(s.iloc[1:], "yearly")

    ref = best_of(reference, 1) * k / subset
    print(f"dataset: {ds.name}")
    print(f"ours, 10 drawdowns + monthly + yearly: {both * 1000:8.1f} ms")
    print(f"ours, drawdown table only:            {dd_only * 1000:8.1f} ms")
    print(f"ours, period tables only:             {periods_only * 1000:8.1f} ms")
    print(f"compute_metrics (same run, context):  {metrics * 1000:8.1f} ms")
    print(f"pyfolio + empyrical per symbol (x{k}, from {subset}): {ref:8.2f} s")
    print(f"speed-up: {ref / both:,.0f}x")


if __name__ == "__main__":
    main()
