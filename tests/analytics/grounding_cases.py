"""The metrics and the answer corpus of the grounding tests.

`METRICS` are real engine results (services.analytics.metrics.compute_metrics) over seeded
synthetic prices, so every answer is checked against values of the same shape as
production. `tests/analytics/data/grounding_answers.tsv` holds answers as templates, one per
line: `label<TAB>template`, label `ok` (every figure is right) or `bad` (the marked figures
are wrong and must be flagged, the others must not). In a template:

    {SYM.metric|fmt}    the metric, written in format fmt (see FORMATS)
    {!SYM.metric|fmt}   the same, but a wrong figure: flagged when it is a sign flip (fmt
                        "flip"), a value from the wrong metric or symbol, or shifted
                        (fmt "pct1+3": 3 points more)
    [[text]]            a literal wrong figure (invented): must be flagged
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import numpy as np

from services.analytics.grounding import SPECS
from services.analytics.metrics import SymbolMetrics, compute_metrics
from tests.conftest import weekdays

CORPUS: Final = Path(__file__).parent / "data" / "grounding_answers.tsv"
SYMBOLS: Final = ("AAPL", "MSFT", "XOM")
BENCHMARK: Final = "SPX"
QUESTION: Final = "Compare AAPL, MSFT and XOM against SPX: returns, risk and drawdowns."


def _prices(seed: int, drift: float, vol: float, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    returns = rng.normal(drift, vol, n)
    return 100.0 * np.cumprod(1.0 + returns)


def build_metrics() -> dict[str, SymbolMetrics]:
    n = 1260
    days = weekdays(date(2018, 1, 2), n)
    columns = [
        _prices(11, 0.0009, 0.021, n),
        _prices(12, 0.0006, 0.017, n),
        _prices(13, -0.0002, 0.024, n),
    ]
    bench = _prices(14, 0.0004, 0.012, n)
    values = np.column_stack(columns)
    with_bench = compute_metrics(
        values,
        np.array(days, dtype="datetime64[D]"),
        SYMBOLS,
        benchmark=bench,
        benchmark_symbol=BENCHMARK,
        risk_free=0.02,
    )
    own = compute_metrics(
        bench.reshape(-1, 1), np.array(days, dtype="datetime64[D]"), [BENCHMARK], risk_free=0.02
    )
    return {**with_bench, **own}


METRICS: Final = build_metrics()


def value(symbol: str, metric: str, metrics: Mapping[str, SymbolMetrics] = METRICS) -> float:
    m = metrics[symbol]
    if metric in SPECS:
        v = SPECS[metric].get(m)
        assert v is not None, (symbol, metric)
        return v
    if metric in ("peak_date", "trough_date", "recovery_date"):
        d = getattr(m.drawdown, metric)
        assert d is not None
        return float(d.toordinal())
    if metric in ("start_date", "end_date"):
        return float(getattr(m, metric).toordinal())
    if metric in ("best_date", "worst_date"):
        return float((m.best if metric == "best_date" else m.worst).date.toordinal())
    if metric in ("n_returns",):
        return float(m.n_returns)
    if metric in ("duration_days", "duration_periods"):
        return float(getattr(m.drawdown, metric))
    raise KeyError(metric)


def _iso(v: float) -> str:
    return date.fromordinal(int(v)).isoformat()


def _mdy(v: float) -> str:
    d = date.fromordinal(int(v))
    return f"{d:%B} {d.day}, {d.year}"


def _dmy(v: float) -> str:
    d = date.fromordinal(int(v))
    return f"{d.day} {d:%B} {d.year}"


def _my(v: float) -> str:
    return f"{date.fromordinal(int(v)):%B %Y}"


FORMATS: Final[dict[str, Callable[[float], str]]] = {
    "pct0": lambda v: f"{v * 100:+.0f}%",
    "pct1": lambda v: f"{v * 100:+.1f}%",
    "pct2": lambda v: f"{v * 100:+.2f}%",
    "spct1": lambda v: f"{v * 100:.1f}%",  # sign only when negative
    "upct0": lambda v: f"{abs(v) * 100:.0f}%",  # magnitude, no sign
    "upct1": lambda v: f"{abs(v) * 100:.1f}%",
    "upct2": lambda v: f"{abs(v) * 100:.2f}%",
    "minus1": lambda v: f"\u2212{abs(v) * 100:.1f}%",  # typographic minus
    "percent1": lambda v: f"{v * 100:.1f} percent",
    "frac2": lambda v: f"{v:.2f}",
    "ufrac2": lambda v: f"{abs(v):.2f}",
    "r1": lambda v: f"{v:.1f}",
    "r2": lambda v: f"{v:.2f}",
    "r3": lambda v: f"{v:.3f}",
    "int": lambda v: f"{int(v):,}",
    "iso": _iso,
    "mdy": _mdy,
    "dmy": _dmy,
    "my": _my,
    "flip": lambda v: f"{-v * 100:+.1f}%",
    "pct1+3": lambda v: f"{(v + 0.03) * 100:+.1f}%",
    "upct1+2": lambda v: f"{(abs(v) + 0.02) * 100:.1f}%",
    "r2+0.4": lambda v: f"{v + 0.4:.2f}",
    "iso+9": lambda v: _iso(v + 9),
}

_TOKEN: Final = re.compile(r"\{(!?)([A-Z]+)\.(\w+)\|([\w+.\-]+)\}|\[\[(.+?)\]\]")


@dataclass(frozen=True)
class Case:
    line: int
    label: str
    text: str
    wrong: tuple[tuple[int, int], ...]  # spans of the figures that must be flagged


def render(
    template: str, metrics: Mapping[str, SymbolMetrics] = METRICS
) -> tuple[str, tuple[tuple[int, int], ...]]:
    out: list[str] = []
    wrong: list[tuple[int, int]] = []
    pos = length = 0
    for m in _TOKEN.finditer(template):
        out.append(template[pos : m.start()])
        length += m.start() - pos
        if m[5] is not None:
            text, bad = m[5], True
        else:
            text, bad = FORMATS[m[4]](value(m[2], m[3], metrics)), bool(m[1])
        if bad:
            wrong.append((length, length + len(text)))
        out.append(text)
        length += len(text)
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), tuple(wrong)


def cases(metrics: Mapping[str, SymbolMetrics] = METRICS, corpus: Path = CORPUS) -> list[Case]:
    found = []
    for i, raw in enumerate(corpus.read_text().splitlines(), start=1):
        if not raw.strip() or raw.startswith("#"):
            continue
        label, template = raw.split("\t", 1)
        text, wrong = render(template, metrics)
        assert (label == "bad") == bool(wrong), f"line {i}: label {label} but wrong={wrong}"
        found.append(Case(i, label, text, wrong))
    return found
