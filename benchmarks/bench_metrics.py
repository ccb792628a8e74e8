"""Benchmark the analytics metric engine against empyrical and QuantStats.

Run from the repository root, either way:

    .venv/bin/python -m benchmarks.bench_metrics
    .venv/bin/python benchmarks/bench_metrics.py [--quick]

Datasets: the 20-stock sample (skfolio S&P 500, 8,313 days, S&P 500 index as
benchmark) and a generated panel of 500 symbols x 10 years (2,520 days,
seeded one-factor model with Student-t noise).  For each dataset the full
*extended* metric set (issue 16: Omega, tail ratio, stability, win rate,
parametric and Cornish-Fisher VaR/CVaR, best/worst month and year, up/down/
total capture and capture ratio, Treynor, on top of the original set) is
timed for:

* ours: ``compute_metrics`` (one vectorised call, dataclasses included; it
  also computes drawdown dates/recovery, best/worst dates, positive share,
  calendar-period dates and tracking error, which the others are not asked
  for);
* empyrical, per symbol (the usual way to call it: one 1-D series at a time);
  SciPy / numpy for what empyrical lacks (parametric and Cornish-Fisher
  tails, skew/kurtosis, win rate);
* empyrical, vectorised (its 2-D code paths where it has them: returns,
  volatility, Sharpe, Sortino, drawdown, beta, alpha, excess Sharpe,
  ``capture`` and ``aggregate_returns`` on a DataFrame; VaR, CVaR, Calmar,
  Omega, tail ratio, stability and up/down capture only accept 1-D input and
  are looped), SciPy / numpy 2-D for the rest;
* QuantStats, for the metrics it shares (DataFrame calls where it accepts
  them, ``greeks``, ``information_ratio`` and ``treynor_ratio`` per column);
  skipped if it does not import.

Before timing, the empyrical results are checked against ours (1e-9
relative) so both sides compute the same numbers.  Times are the best of
several runs for the fast engines and a single run for the slow ones, as
wall-clock time and as CPU time of the process (``time.process_time``, all
its threads): on a shared machine a run of ~0.1 s loses whole time slices
to other processes, so the CPU ratio is the steadier of the two.
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
import pandas as pd
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


def _gaussian_cvar(mean: Any, std: Any, q: float) -> Any:
    return mean - std * st.norm.pdf(st.norm.ppf(q)) / q


def _cornish_fisher(mean: Any, std: Any, s: Any, k: Any, q: float) -> tuple[Any, Any]:
    z = st.norm.ppf(q)
    z_cf = z + (z**2 - 1) * s / 6 + (z**3 - 3 * z) * k / 24 - (2 * z**3 - 5 * z) * s**2 / 36
    factor = 1 + z * s / 6 + (z**2 - 1) * k / 24 - (2 * z**2 - 1) * s**2 / 36
    return mean + z_cf * std, mean - std * st.norm.pdf(z) / q * factor


def _index(ds: Dataset) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(ds.dates[1:].astype("datetime64[ns]"))


def _extended_one(r: np.ndarray, b: np.ndarray, index: pd.DatetimeIndex) -> dict[str, float]:
    """The extended set of one series: empyrical where it has the metric, else SciPy."""
    mean, std = r.mean(), r.std(ddof=1)
    s, k = st.skew(r), st.kurtosis(r)
    months = ep.aggregate_returns(pd.Series(r, index=index), "monthly")
    years = ep.aggregate_returns(pd.Series(r, index=index), "yearly")
    up, down = ep.up_capture(r, b), ep.down_capture(r, b)
    out = {
        "omega": ep.omega_ratio(r, risk_free=RF_P, annualization=P),
        "tail_ratio": ep.tail_ratio(r),
        "stability": ep.stability_of_timeseries(r),
        "win_rate": np.count_nonzero(r > 0) / np.count_nonzero(r),
        "parametric_cvar_95": _gaussian_cvar(mean, std, 0.05),
        "parametric_cvar_99": _gaussian_cvar(mean, std, 0.01),
        "best_month": months.max(),
        "worst_month": months.min(),
        "best_year": years.max(),
        "worst_year": years.min(),
        "up_capture": up,
        "down_capture": down,
        "capture_ratio": up / down,
        "total_capture": ep.capture(r, b),
        "treynor": (mean - RF_P) * P / ep.beta(r, b, risk_free=RF_P),
    }
    for q, label in ((0.05, "95"), (0.01, "99")):
        out[f"cornish_fisher_var_{label}"], out[f"cornish_fisher_cvar_{label}"] = _cornish_fisher(
            mean, std, s, k, q
        )
    return out


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
    index = _index(ds)
    out = {}
    for col, name in enumerate(ds.symbols):
        p = ds.prices[:, col]
        r = p[1:] / p[:-1] - 1
        out[name] = _empyrical_one(r, b) | _extended_one(r, b, index)
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
    return out | _extended_vectorised(ds, r, b, mean, std, out["beta"])


def _extended_vectorised(
    ds: Dataset, r: np.ndarray, b: np.ndarray, mean: Any, std: Any, beta: Any
) -> dict[str, np.ndarray]:
    """The extended set on the (T, K) returns: 2-D calls where empyrical has them."""
    b1 = b[:, 0]
    looped = {
        "omega": lambda x: ep.omega_ratio(x, risk_free=RF_P, annualization=P),
        "tail_ratio": ep.tail_ratio,
        "stability": ep.stability_of_timeseries,
        "up_capture": lambda x: ep.up_capture(x, b1),
        "down_capture": lambda x: ep.down_capture(x, b1),
    }
    out = {key: np.array([fn(r[:, k]) for k in range(r.shape[1])]) for key, fn in looped.items()}
    frame = pd.DataFrame(r, index=_index(ds))
    months = ep.aggregate_returns(frame, "monthly")
    years = ep.aggregate_returns(frame, "yearly")
    s, k = st.skew(r, axis=0), st.kurtosis(r, axis=0)
    out |= {
        "win_rate": np.count_nonzero(r > 0, axis=0) / np.count_nonzero(r, axis=0),
        "parametric_cvar_95": _gaussian_cvar(mean, std, 0.05),
        "parametric_cvar_99": _gaussian_cvar(mean, std, 0.01),
        "best_month": months.max(axis=0).to_numpy(),
        "worst_month": months.min(axis=0).to_numpy(),
        "best_year": years.max(axis=0).to_numpy(),
        "worst_year": years.min(axis=0).to_numpy(),
        "capture_ratio": out["up_capture"] / out["down_capture"],
        "total_capture": ep.capture(r, b),
        "treynor": (mean - RF_P) * P / beta,
    }
    for q, label in ((0.05, "95"), (0.01, "99")):
        out[f"cornish_fisher_var_{label}"], out[f"cornish_fisher_cvar_{label}"] = _cornish_fisher(
            mean, std, s, k, q
        )
    return out


def quantstats_shared(ds: Dataset, qs: Any) -> None:
    index = _index(ds)
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
    s.omega(df, rf=RF, periods=P)
    s.tail_ratio(df)
    s.conditional_value_at_risk(df, confidence=0.95)
    s.conditional_value_at_risk(df, confidence=0.99)
    for aggregate in ("ME", "YE"):
        s.best(df, aggregate=aggregate)
        s.worst(df, aggregate=aggregate)
    for name in ds.symbols:
        s.greeks(df[name], bench, periods=P)
        s.information_ratio(df[name], bench)
        s.treynor_ratio(df[name], bench, periods=P, rf=RF)


# ---------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------


_RELATIVE_KEYS = (
    "beta",
    "alpha",
    "information_ratio",
    "up_capture",
    "down_capture",
    "capture_ratio",
    "total_capture",
    "treynor",
)


def _ours_value(res: m.SymbolMetrics, key: str) -> float:
    if key in _RELATIVE_KEYS:
        assert res.relative is not None
        return float(getattr(res.relative, key))
    if key == "max_drawdown":
        return res.drawdown.max_drawdown
    if key in ("best_month", "worst_month", "best_year", "worst_year"):
        period = getattr(res, key)
        assert period is not None
        return float(period.value)
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


Timing = tuple[float, float]  # best wall-clock seconds, best CPU seconds


def best_time(fn: Callable[[], object], repeats: int) -> Timing:
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), min(cpus)


def import_quantstats() -> Any | None:
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import quantstats
    except Exception as exc:  # any import problem just skips the comparison
        print(f"QuantStats not available ({type(exc).__name__}: {exc}); skipped.")
        return None
    return quantstats


def bench_dataset(ds: Dataset, qs: Any | None, repeats: int) -> list[tuple[str, str, Timing]]:
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


def print_table(rows: list[tuple[str, str, Timing]]) -> None:
    head = f"{'wall ms':>10} {'x ours':>8} {'cpu ms':>10} {'x ours':>8}"
    print(f"\n{'dataset':<22} {'engine':<26} {head}")
    print("-" * 89)
    base: dict[str, Timing] = {}
    for dataset, engine, (wall, cpu) in rows:
        base.setdefault(dataset, (wall, cpu))
        wall_ratio, cpu_ratio = wall / base[dataset][0], cpu / base[dataset][1]
        print(
            f"{dataset:<22} {engine:<26} {wall * 1e3:>10.1f} {wall_ratio:>8.1f} "
            f"{cpu * 1e3:>10.1f} {cpu_ratio:>8.1f}"
        )


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
