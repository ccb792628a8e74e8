"""Benchmark the analytics metric engine against empyrical and QuantStats.

Run from the repository root, either way:

    .venv/bin/python -m benchmarks.bench_metrics
    .venv/bin/python benchmarks/bench_metrics.py [--quick]

Datasets: the 20-stock sample (skfolio S&P 500, 8,313 days, S&P 500 index as
benchmark) and a generated panel of 500 symbols x 10 years (2,520 days,
seeded one-factor model with Student-t noise).  For each dataset the full
metric set is timed for:

* ours: ``compute_metrics`` (one vectorised call, dataclasses included; it
  also computes drawdown dates/recovery, best/worst dates, positive share and
  tracking error, which the others are not asked for);
* empyrical, per symbol (the usual way to call it: one 1-D series at a time);
* empyrical, vectorised (its 2-D code paths where it has them; VaR, CVaR and
  Calmar only accept 1-D input and are looped);
* QuantStats, for the metrics it shares (DataFrame calls where it accepts
  them, ``greeks`` and ``information_ratio`` per column); skipped if it does
  not import.

Before timing, the empyrical results are checked against ours (1e-9
relative) so both sides compute the same numbers.  Times are the best of
several runs for the fast engines and a single run for the slow ones.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import empyrical as ep
import numpy as np
import pyarrow.csv as pa_csv
import scipy.stats as st

from libs.barfiles import reader as importer
from services.analytics import metrics as m

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = ROOT / "services" / "analytics" / "sample_data"
P = 252
RF = 0.03
RF_P = (1 + RF) ** (1 / P) - 1
SEED = 20240611


@dataclass(frozen=True)
class Dataset:
    name: str
    symbols: list[str]
    dates: np.ndarray
    prices: np.ndarray  # (T, K)
    bench: np.ndarray  # (T,)


def load_sample() -> Dataset:
    table = pa_csv.read_csv(SAMPLE / "sp500_dataset.csv.gz")
    symbols = [c for c in table.column_names if c != "Date"]
    prices = np.column_stack([table[c].to_numpy() for c in symbols]).astype(np.float64)
    bench = pa_csv.read_csv(SAMPLE / "sp500_index.csv.gz")["SP500"].to_numpy()
    dates = table["Date"].to_numpy().astype("datetime64[D]")
    return Dataset("sample 20 x 8313", symbols, dates, prices, bench.astype(np.float64))


def generate(n_symbols: int = 500, years: int = 10) -> Dataset:
    rng = np.random.default_rng(SEED)
    t = years * P
    market = rng.normal(0.0003, 0.011, t)
    betas = rng.uniform(0.4, 1.6, n_symbols)
    noise = rng.standard_t(4, (t, n_symbols)) * 0.012
    returns = np.clip(market[:, None] * betas + noise, -0.9, None)
    prices = 100.0 * np.vstack([np.ones(n_symbols), np.cumprod(1 + returns, axis=0)])
    bench = 1000.0 * np.concatenate([[1.0], np.cumprod(1 + market)])
    start = np.datetime64("2014-01-02")
    dates = np.busday_offset(start, np.arange(t + 1), roll="forward").astype("datetime64[D]")
    symbols = [f"S{i:03d}" for i in range(n_symbols)]
    return Dataset(f"generated {n_symbols} x {t + 1}", symbols, dates, prices, bench)


# ---------------------------------------------------------------------------
# The three engines
# ---------------------------------------------------------------------------


def ours(ds: Dataset) -> dict[str, m.SymbolMetrics]:
    return m.compute_metrics(
        ds.prices, ds.dates, ds.symbols, benchmark=ds.bench, periods_per_year=P, risk_free=RF
    )


def _empyrical_one(r: np.ndarray, b: np.ndarray) -> dict[str, float]:
    mean, std = r.mean(), r.std(ddof=1)
    return {
        "total_return": ep.cum_returns_final(r),
        "cagr": ep.cagr(r, annualization=P),
        "volatility": ep.annual_volatility(r, annualization=P),
        "sharpe": ep.sharpe_ratio(r, risk_free=RF_P, annualization=P),
        "sortino": ep.sortino_ratio(r, required_return=RF_P, annualization=P),
        "calmar": ep.calmar_ratio(r, annualization=P),
        "max_drawdown": ep.max_drawdown(r),
        "var_95": ep.value_at_risk(r, 0.05),
        "var_99": ep.value_at_risk(r, 0.01),
        "cvar_95": ep.conditional_value_at_risk(r, 0.05),
        "cvar_99": ep.conditional_value_at_risk(r, 0.01),
        "parametric_var_95": st.norm.ppf(0.05, mean, std),
        "parametric_var_99": st.norm.ppf(0.01, mean, std),
        "skew": st.skew(r),
        "kurtosis": st.kurtosis(r),
        "beta": ep.beta(r, b, risk_free=RF_P),
        "alpha": ep.alpha(r, b, risk_free=RF_P, annualization=P),
        "information_ratio": ep.excess_sharpe(r, b) * math.sqrt(P),
    }


def empyrical_per_symbol(ds: Dataset) -> dict[str, dict[str, float]]:
    b = ds.bench[1:] / ds.bench[:-1] - 1
    out = {}
    for col, name in enumerate(ds.symbols):
        p = ds.prices[:, col]
        out[name] = _empyrical_one(p[1:] / p[:-1] - 1, b)
    return out


def empyrical_vectorised(ds: Dataset) -> dict[str, np.ndarray]:
    r = ds.prices[1:] / ds.prices[:-1] - 1
    b = (ds.bench[1:] / ds.bench[:-1] - 1)[:, None]
    mean, std = r.mean(axis=0), r.std(axis=0, ddof=1)
    looped = {
        "calmar": lambda x: ep.calmar_ratio(x, annualization=P),
        "var_95": lambda x: ep.value_at_risk(x, 0.05),
        "var_99": lambda x: ep.value_at_risk(x, 0.01),
        "cvar_95": lambda x: ep.conditional_value_at_risk(x, 0.05),
        "cvar_99": lambda x: ep.conditional_value_at_risk(x, 0.01),
    }
    out = {
        "total_return": ep.cum_returns_final(r),
        "cagr": ep.cagr(r, annualization=P),
        "volatility": ep.annual_volatility(r, annualization=P),
        "sharpe": ep.sharpe_ratio(r, risk_free=RF_P, annualization=P),
        "sortino": ep.sortino_ratio(r, required_return=RF_P, annualization=P),
        "max_drawdown": ep.max_drawdown(r),
        "parametric_var_95": st.norm.ppf(0.05, mean, std),
        "parametric_var_99": st.norm.ppf(0.01, mean, std),
        "skew": st.skew(r, axis=0),
        "kurtosis": st.kurtosis(r, axis=0),
        "beta": ep.beta(r, b, risk_free=RF_P),
        "alpha": ep.alpha(r, b, risk_free=RF_P, annualization=P),
        "information_ratio": ep.excess_sharpe(r, b) * math.sqrt(P),
    }
    for key, fn in looped.items():
        out[key] = np.array([fn(r[:, k]) for k in range(r.shape[1])])
    return out


def quantstats_shared(ds: Dataset, qs: Any) -> None:
    import pandas as pd

    index = pd.DatetimeIndex(ds.dates[1:].astype("datetime64[ns]"))
    df = pd.DataFrame(ds.prices[1:] / ds.prices[:-1] - 1, index=index, columns=ds.symbols)
    bench = pd.Series(ds.bench[1:] / ds.bench[:-1] - 1, index=index)
    s = qs.stats
    s.comp(df)
    s.cagr(df, periods=P)
    s.volatility(df, periods=P)
    s.sharpe(df, rf=RF, periods=P)
    s.sortino(df, rf=RF, periods=P)
    s.max_drawdown(df)
    s.calmar(df, periods=P)
    s.value_at_risk(df, confidence=0.95)
    s.value_at_risk(df, confidence=0.99)
    s.conditional_value_at_risk(df, confidence=0.95, method="historical")
    s.conditional_value_at_risk(df, confidence=0.99, method="historical")
    s.skew(df)
    s.kurtosis(df)
    s.win_rate(df)
    for name in ds.symbols:
        s.greeks(df[name], bench, periods=P)
        s.information_ratio(df[name], bench)


# ---------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------


def _ours_value(res: m.SymbolMetrics, key: str) -> float:
    if key in ("beta", "alpha", "information_ratio"):
        assert res.relative is not None
        return float(getattr(res.relative, key))
    if key == "max_drawdown":
        return res.drawdown.max_drawdown
    return float(getattr(res, key))


def check_agreement(ds: Dataset) -> float:
    """Largest relative difference between ours and empyrical (both variants)."""
    mine = ours(ds)
    per_symbol = empyrical_per_symbol(ds)
    vectorised = empyrical_vectorised(ds)
    worst = 0.0
    for k, name in enumerate(ds.symbols):
        for key, ref in per_symbol[name].items():
            got = _ours_value(mine[name], key)
            for other in (float(ref), float(np.asarray(vectorised[key]).ravel()[k])):
                worst = max(worst, abs(got - other) / max(abs(other), 1e-300))
    return worst


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def import_quantstats() -> Any | None:
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import quantstats
    except Exception as exc:  # any import problem just skips the comparison
        print(f"QuantStats not available ({type(exc).__name__}: {exc}); skipped.")
        return None
    return quantstats


def bench_dataset(ds: Dataset, qs: Any | None, repeats: int) -> list[tuple[str, str, float]]:
    rows = [(ds.name, "ours (compute_metrics)", best_time(lambda: ours(ds), repeats))]
    rows.append((ds.name, "empyrical per symbol", best_time(lambda: empyrical_per_symbol(ds), 1)))
    rows.append((ds.name, "empyrical vectorised", best_time(lambda: empyrical_vectorised(ds), 2)))
    if qs is not None:
        rows.append(
            (ds.name, "QuantStats (shared)", best_time(lambda: quantstats_shared(ds, qs), 1))
        )
    return rows


def bench_importer() -> list[tuple[str, float, int]]:
    """Import throughput: the wide sample and a generated long CSV."""
    wide = SAMPLE / "sp500_dataset.csv.gz"
    start = time.perf_counter()
    n_wide = len(importer.read_bars(wide).bars)
    wide_time = time.perf_counter() - start
    ds = generate(100, 4)
    lines = ["symbol,date,open,high,low,close,adj_close,volume"]
    for col, name in enumerate(ds.symbols):
        for day, price in zip(ds.dates.astype(str), ds.prices[:, col], strict=True):
            o, h, lo, c = price * 0.99, price * 1.01, price * 0.98, price
            lines.append(f"{name},{day},{o:.4f},{h:.4f},{lo:.4f},{c:.4f},{c:.4f},1000")
    data = ("\n".join(lines) + "\n").encode()
    start = time.perf_counter()
    n_long = sum(len(batch.bars) for batch in importer.iter_batches(data))
    long_time = time.perf_counter() - start
    return [
        ("wide sample csv.gz (bars)", wide_time, n_wide),
        ("generated long CSV (rows)", long_time, n_long),
    ]


def print_table(rows: list[tuple[str, str, float]]) -> None:
    print(f"\n{'dataset':<22} {'engine':<26} {'wall ms':>10} {'x slower than ours':>20}")
    print("-" * 81)
    base: dict[str, float] = {}
    for dataset, engine, seconds in rows:
        base.setdefault(dataset, seconds)
        ratio = seconds / base[dataset]
        print(f"{dataset:<22} {engine:<26} {seconds * 1e3:>10.1f} {ratio:>20.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no QuantStats")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    datasets = [load_sample(), generate()]
    for ds in datasets:
        diff = check_agreement(ds)
        print(f"{ds.name}: max relative difference ours vs empyrical = {diff:.2e}")
        if diff > 1e-9:
            raise SystemExit("results disagree; timings would not compare like with like")
    qs = None if args.quick else import_quantstats()
    rows = [row for ds in datasets for row in bench_dataset(ds, qs, repeats)]
    print_table(rows)
    print(f"\n{'importer':<30} {'seconds':>8} {'count':>9} {'per second':>12}")
    for label, seconds, count in bench_importer():
        print(f"{label:<30} {seconds:>8.2f} {count:>9,} {count / seconds:>12,.0f}")


if __name__ == "__main__":
    main()
