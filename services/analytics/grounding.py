"""Numeric grounding: every figure an answer states, checked against what Analyze computed.

A financial answer that quotes a wrong number is worse than no answer, so after the model
answers, Analyze extracts each figure from the text and matches it against its sources:
the metrics it computed and sent (`Sources.from_metrics`), the numbers of the question and
the window dates.

What counts as a figure: percentages (``34.1%``, ``-34 percent``), percentage points and
basis points, decimals and ratios (``0.34``, ``1.25``), counts (``8,000 returns``),
currency amounts (``$10,000``), dates (``2009-03-09``, ``March 9, 2009``, ``Mar 2009``) and
years (``2020``).

How a figure matches (`check`):

- Roundings a writer would use are accepted: a figure written with ``d`` decimals matches a
  value within half a unit of its last digit (0.34082 as 34.1%, 34%, 34.08% or 0.34).
- Words carry signs: an explicit sign wins; otherwise words before or right after the figure
  ("down", "fell", "lost", "a loss of", "rose", "gained", ...) give it one. "fell 30%" and
  "-30%" state the same figure; "rose 30%" for a -30% return is wrong. A figure with no sign
  at all is compared by magnitude when it names a loss measure (drawdown, VaR, CVaR, worst
  day) or names no metric; a signed measure it names (a return, alpha) reads it as positive.
- A figure written about a named metric ("volatility 20.6%", "a Sharpe ratio of 1.2",
  "34% drawdown") must match THAT metric, for any of the symbols; a figure tied to no metric
  may match any computed value of its kind, a number of the question, or a convention
  (confidence levels, periods per year, the risk-free rate).
- Percentage points match the gap between two values of the same metric (or a value).
- Dates must be dates of the metrics (window ends, peaks, troughs, recoveries, best and
  worst days) or of the question; a month or a year must be one of those dates' months or
  lie inside the window. Currency amounts must come from the question: Analyze sends none.

An answer may also cite the metric behind each figure (the structured contract of
`parse_structured`): a cited figure is checked against exactly that symbol's metric.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Final, Literal

from services.analytics.metrics import SymbolMetrics

GroundingPolicy = Literal["annotate", "reject", "off"]
POLICIES: Final[tuple[GroundingPolicy, ...]] = ("annotate", "reject", "off")
UNVERIFIED_MARK: Final = " [unverified]"

Kind = Literal["percent", "points", "number", "money", "date", "month", "year"]

# -- the metrics, by name ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricSpec:
    key: str
    unit: Literal["pct", "ratio"]
    get: Callable[[SymbolMetrics], float | None]
    loss: bool = False  # a loss measure: written with or without its minus sign
    nonnegative: bool = False


def _rel(attr: str) -> Callable[[SymbolMetrics], float | None]:
    def get(m: SymbolMetrics) -> float | None:
        return None if m.relative is None else float(getattr(m.relative, attr))

    return get


def _attr(attr: str) -> Callable[[SymbolMetrics], float | None]:
    return lambda m: float(getattr(m, attr))


def _period(attr: str) -> Callable[[SymbolMetrics], float | None]:
    def get(m: SymbolMetrics) -> float | None:
        period = getattr(m, attr)
        return None if period is None else float(period.value)

    return get


SPECS: Final[dict[str, MetricSpec]] = {
    s.key: s
    for s in (
        MetricSpec("total_return", "pct", _attr("total_return")),
        MetricSpec("cagr", "pct", _attr("cagr")),
        MetricSpec("volatility", "pct", _attr("volatility"), nonnegative=True),
        MetricSpec("sharpe", "ratio", _attr("sharpe")),
        MetricSpec("sortino", "ratio", _attr("sortino")),
        MetricSpec("calmar", "ratio", _attr("calmar")),
        MetricSpec("max_drawdown", "pct", lambda m: m.drawdown.max_drawdown, loss=True),
        MetricSpec("var_95", "pct", _attr("var_95"), loss=True),
        MetricSpec("var_99", "pct", _attr("var_99"), loss=True),
        MetricSpec("cvar_95", "pct", _attr("cvar_95"), loss=True),
        MetricSpec("cvar_99", "pct", _attr("cvar_99"), loss=True),
        MetricSpec("parametric_var_95", "pct", _attr("parametric_var_95"), loss=True),
        MetricSpec("parametric_var_99", "pct", _attr("parametric_var_99"), loss=True),
        MetricSpec("skew", "ratio", _attr("skew")),
        MetricSpec("kurtosis", "ratio", _attr("kurtosis")),
        MetricSpec("best_day", "pct", lambda m: m.best.value),
        MetricSpec("worst_day", "pct", lambda m: m.worst.value, loss=True),
        MetricSpec("positive_share", "pct", _attr("positive_share"), nonnegative=True),
        MetricSpec("beta", "ratio", _rel("beta")),
        MetricSpec("alpha", "pct", _rel("alpha")),
        MetricSpec("tracking_error", "pct", _rel("tracking_error"), nonnegative=True),
        MetricSpec("information_ratio", "ratio", _rel("information_ratio")),
        # -- the extended set --
        MetricSpec("omega", "ratio", _attr("omega"), nonnegative=True),
        MetricSpec("tail_ratio", "ratio", _attr("tail_ratio"), nonnegative=True),
        MetricSpec("stability", "ratio", _attr("stability"), nonnegative=True),
        MetricSpec("win_rate", "pct", _attr("win_rate"), nonnegative=True),
        MetricSpec("parametric_cvar_95", "pct", _attr("parametric_cvar_95"), loss=True),
        MetricSpec("parametric_cvar_99", "pct", _attr("parametric_cvar_99"), loss=True),
        MetricSpec("cornish_fisher_var_95", "pct", _attr("cornish_fisher_var_95"), loss=True),
        MetricSpec("cornish_fisher_var_99", "pct", _attr("cornish_fisher_var_99"), loss=True),
        MetricSpec("cornish_fisher_cvar_95", "pct", _attr("cornish_fisher_cvar_95"), loss=True),
        MetricSpec("cornish_fisher_cvar_99", "pct", _attr("cornish_fisher_cvar_99"), loss=True),
        MetricSpec("best_month", "pct", _period("best_month")),
        MetricSpec("worst_month", "pct", _period("worst_month"), loss=True),
        MetricSpec("best_year", "pct", _period("best_year")),
        MetricSpec("worst_year", "pct", _period("worst_year"), loss=True),
        # Captures are ratios people write either way: 1.05 or 105%.
        MetricSpec("up_capture", "pct", _rel("up_capture"), nonnegative=True),
        MetricSpec("down_capture", "pct", _rel("down_capture"), nonnegative=True),
        MetricSpec("capture_ratio", "ratio", _rel("capture_ratio"), nonnegative=True),
        MetricSpec("treynor", "pct", _rel("treynor")),
    )
}
CORRELATION: Final = MetricSpec("correlation", "ratio", lambda m: None)
# The extended set is matched only by figures that name it, or by figures tied to no metric
# in an answer that names it: otherwise (and for gaps in points) a coincidence is too likely.
NAMED_ONLY: Final = frozenset(
    {
        "omega", "tail_ratio", "stability", "win_rate", "parametric_cvar_95",
        "parametric_cvar_99", "cornish_fisher_var_95", "cornish_fisher_var_99",
        "cornish_fisher_cvar_95", "cornish_fisher_cvar_99", "best_month", "worst_month",
        "best_year", "worst_year", "up_capture", "down_capture", "capture_ratio", "treynor",
    }
)  # fmt: skip
# The figures of an optimised mix (Analyze's optimisation intent): `weight` per symbol, the
# others under the symbol PORTFOLIO. Not per-symbol metrics: `Sources.with_optimization`.
PORTFOLIO: Final = "PORTFOLIO"
OPTIMIZATION_SPECS: Final[dict[str, MetricSpec]] = {
    s.key: s
    for s in (
        MetricSpec("weight", "pct", lambda m: None),
        MetricSpec("expected_return", "pct", lambda m: None),
        MetricSpec("expected_volatility", "pct", lambda m: None, nonnegative=True),
        MetricSpec("expected_sharpe", "ratio", lambda m: None),
    )
}


def _spec(key: str) -> MetricSpec:
    return SPECS.get(key) or OPTIMIZATION_SPECS.get(key) or CORRELATION


# Words naming a metric -> the metric keys they may mean. Longest alternatives first.
_NAMES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    # An optimised mix: its weights and expected figures.
    (r"\bweights?\b|\bweighting\b|\ballocations?\b", ("weight",)),
    (
        r"(?:expected|portfolio|ex[- ]ante|the mix's|mix's) (?:annuali[sz]ed )?"
        r"(?:volatility|\bvol\b|standard deviation|risk)",
        ("expected_volatility",),
    ),
    (
        r"(?:expected|portfolio|the mix's|mix's) (?:annuali[sz]ed |annual )?returns?",
        ("expected_return",),
    ),
    (r"(?:expected|portfolio|the mix's|mix's) sharpe(?: ratios?)?", ("expected_sharpe",)),
    # The extended set.
    (r"omega(?: ratios?)?", ("omega",)),
    (r"tail ratios?", ("tail_ratio",)),
    (r"stability(?: of returns)?", ("stability",)),
    (r"win(?:ning)? rates?|hit rates?|win ratios?", ("win_rate",)),
    (r"up(?:side)?[- ](?:market )?capture(?: ratios?)?", ("up_capture",)),
    (r"down(?:side)?[- ](?:market )?capture(?: ratios?)?", ("down_capture",)),
    (r"(?:up[-/ ]down |up/down )?capture ratios?", ("capture_ratio",)),
    (r"treynor(?: ratios?)?", ("treynor",)),
    (
        r"(?:gaussian|parametric|normal) (?:daily )?(?:c-?va?r(?:95|99)?|expected shortfall"
        r"|conditional value[- ]at[- ]risk)",
        ("parametric_cvar_95", "parametric_cvar_99"),
    ),
    (
        r"(?:cornish[- ]fisher|modified) (?:daily )?(?:c-?va?r(?:95|99)?|expected shortfall"
        r"|conditional value[- ]at[- ]risk)",
        ("cornish_fisher_cvar_95", "cornish_fisher_cvar_99"),
    ),
    (
        r"(?:cornish[- ]fisher|modified) (?:daily )?(?:va?r(?:95|99)?\b|value[- ]at[- ]risk)",
        ("cornish_fisher_var_95", "cornish_fisher_var_99"),
    ),
    (
        r"best (?:calendar |single )?month(?:ly (?:return|gain))?|(?:one|single)[- ]month gain",
        ("best_month",),
    ),
    (
        r"worst (?:calendar |single )?month(?:ly (?:return|loss))?"
        r"|(?:one|single)[- ]month (?:loss|drop|fall)",
        ("worst_month",),
    ),
    (
        r"best (?:calendar |single )?year(?:ly (?:return|gain))?|calendar[- ]year gain",
        ("best_year",),
    ),
    (
        r"worst (?:calendar |single )?year(?:ly (?:return|loss))?|calendar[- ]year loss",
        ("worst_year",),
    ),
    (r"information ratios?|info(?:rmation)? ratio|\bIR\b", ("information_ratio",)),
    (r"tracking errors?", ("tracking_error",)),
    (
        r"expected shortfall|conditional value[- ]at[- ]risk|c-?va?r(?:95|99)?",
        ("cvar_95", "cvar_99"),
    ),
    (
        r"value[- ]at[- ]risk|\bva?r(?:95|99)?\b",
        ("var_95", "var_99", "parametric_var_95", "parametric_var_99"),
    ),
    (r"sharpe(?: ratios?)?", ("sharpe", "expected_sharpe")),
    (r"sortino(?: ratios?)?", ("sortino",)),
    (r"calmar(?: ratios?)?", ("calmar",)),
    (
        r"(?:max(?:imum)?|deepest|biggest|largest|worst) (?:draw-?downs?|declines?|drops?|falls?)"
        r"|draw-?downs?|peak[- ]to[- ]trough(?: (?:loss|decline|drop|fall))?",
        ("max_drawdown",),
    ),
    (
        r"cagr|compound(?:ed)? annual(?: growth)?(?: rate)?|annuali[sz]ed returns?"
        r"|annual returns?|a year compounded|per year|a year\b|per annum|annually",
        ("cagr", "alpha", "expected_return"),
    ),
    (r"total returns?|cumulative returns?|overall returns?", ("total_return",)),
    (
        r"(?:annuali[sz]ed )?volatility|\bvol\b|standard deviation|\bstd\b",
        ("volatility", "tracking_error", "expected_volatility"),
    ),
    (r"excess kurtosis|kurtosis", ("kurtosis",)),
    (r"skew(?:ness)?", ("skew",)),
    (
        r"best (?:single |trading )?(?:days?|sessions?)|best daily (?:return|gain)"
        r"|biggest (?:one-day |daily |single-day )gain",
        ("best_day",),
    ),
    (
        r"worst (?:single |trading )?(?:days?|sessions?)|worst daily (?:return|loss)"
        r"|biggest (?:one-day |daily |single-day )(?:loss|drop|fall)",
        ("worst_day",),
    ),
    (
        r"positive days|up days|days (?:were )?positive|(?:share|fraction) of (?:up|positive)",
        ("positive_share",),
    ),
    (r"\bbetas?\b", ("beta",)),
    (r"\balphas?\b", ("alpha",)),
    (r"correlat\w*", ("correlation",)),
    (
        r"\breturns?\b|returned",
        ("total_return", "cagr", "best_day", "worst_day", "alpha", "expected_return"),
    ),
)
# One group per name (the patterns have none of their own): the group that matched says
# which metric keys the words name.
_NAME_RE: Final = re.compile("|".join(f"({p})" for p, _ in _NAMES), re.IGNORECASE)

_NEG_WORDS: Final = (
    r"down|fell|falls?|falling|lost|lose|loses|losing|loss(?:es)? of|declined?|declines|"
    r"declining|decline of|dropped|drops?|drop of|plunged?|plunging|slumped|sank|shed|tumbled|"
    r"crashed|negative|minus|slid|lower by|a fall of|shrank"
)
_POS_WORDS: Final = (
    r"up|rose|rises?|rising|gained|gains?|gain of|grew|increased?|increase of|climbed|rallied|"
    r"advanced|positive|plus|higher by|added|returned"
)
_NEG_BEFORE: Final = re.compile(
    rf"\b(?:{_NEG_WORDS})\b(?:\s+(?:by|of|about|around|roughly|nearly|almost|some|over))*\s*$", re.I
)
_POS_BEFORE: Final = re.compile(
    rf"\b(?:{_POS_WORDS})\b(?:\s+(?:by|of|about|around|roughly|nearly|almost|some|over))*\s*$", re.I
)
_NEG_AFTER: Final = re.compile(r"^\s*(?:lower|down|loss|decline|drop|fall|below)\b", re.I)
_UP_TO: Final = re.compile(r"\bup\s+to\s*$", re.I)

# -- extraction ----------------------------------------------------------------------------

_MONTHS: Final = {
    name: i + 1
    for i, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        )
    )
    for name in names
}
_MONTH: Final = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DATE_RES: Final = (
    ("iso", re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")),
    ("mdy", re.compile(rf"\b({_MONTH})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b", re.I)),
    (
        "dmy",
        re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH}),?\s+(\d{{4}})\b", re.I),
    ),
    ("my", re.compile(rf"\b({_MONTH})\s+(?:of\s+)?(\d{{4}})\b", re.I)),
)
_NUMBER: Final = re.compile(
    r"(?P<sign>(?<![\w.,])[+\-\u2212\u2013](?=\s?[$€£]?\d))?\s?"
    r"(?P<cur>[$€£])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<unit>\s?%|\s?(?:per\s?cent|percent)\b|\s?(?:percentage\s+points?|pp|pts?|points)\b"
    r"|\s?(?:bps|basis\s+points?)\b|\s?(?:USD|EUR|GBP|dollars?)\b|x\b)?",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Figure:
    """One figure of a text. `value` is a fraction for percent/points kinds, the number for
    number/money kinds, the date's ordinal for dates, year*12+month for months, the year."""

    text: str
    start: int
    end: int
    kind: Kind
    value: float
    decimals: int
    sign: int  # +1 / -1 when written (sign or words), 0 when not
    explicit_sign: bool
    metrics: tuple[str, ...] = ()  # the metric(s) the words around it name
    symbol: str = ""  # the ticker the words attribute it to ("MSFT's volatility"), if any


def _month(word: str) -> int:
    return _MONTHS[word.lower().rstrip(".")]


def _dates(text: str) -> list[Figure]:
    found: list[Figure] = []
    taken: list[tuple[int, int]] = []
    for form, rx in _DATE_RES:
        for m in rx.finditer(text):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            try:
                if form == "iso":
                    d = date(int(m[1]), int(m[2]), int(m[3]))
                elif form == "mdy":
                    d = date(int(m[3]), _month(m[1]), int(m[2]))
                elif form == "dmy":
                    d = date(int(m[3]), _month(m[2]), int(m[1]))
                else:
                    y, mo = int(m[2]), _month(m[1])
                    found.append(
                        Figure(m[0], m.start(), m.end(), "month", y * 12 + mo, 0, 0, False)
                    )
                    taken.append((m.start(), m.end()))
                    continue
            except ValueError:
                continue
            found.append(Figure(m[0], m.start(), m.end(), "date", d.toordinal(), 0, 0, False))
            taken.append((m.start(), m.end()))
    return found


_CLAUSE_END: Final = re.compile(
    r"[.!?;,:|](?:\s|$)|\n|\|"
    r"|\b(?:and|but|while|whereas|compared with)\s"
    # "against"/"versus" before a ticker is "relative to" ("alpha versus SPX was"); before
    # anything else it starts the other side of a comparison.
    r"|\b(?:against|versus|vs\.?)\s(?![A-Z][A-Z0-9.^-]{0,9}\b(?!'s|\u2019s))",
    re.IGNORECASE,
)
# Confidence levels ("95% VaR", "at 99%"): conventions, and no bound between a metric's name
# and its figure ("CVaR at 95% was -4.9%" ties -4.9% to CVaR).
LEVELS: Final = (0.95, 0.99)


def _clause_before(text: str, start: int, floor: int) -> str:
    """The words before `start` back to `floor` (the previous figure) or the clause start."""
    head = text[floor:start]
    cut = max((m.end() for m in _CLAUSE_END.finditer(head)), default=0)
    return head[cut:][-80:]


def _names(words: str) -> list[tuple[int, int, tuple[str, ...]]]:
    return [
        (m.start(), m.end(), _NAMES[(m.lastindex or 1) - 1][1]) for m in _NAME_RE.finditer(words)
    ]


# Words that may stand between a metric's name and its figure ("volatility of 27%",
# "Sharpe was about 0.8", "worst session (-6.8%").
_LINK: Final = re.compile(
    r"(?:\s|[(:]|\b(?:of|was|were|is|at|stood|came|in|around|about|roughly|nearly|"
    r"approximately|almost|just|some|reached|hit|a|an|the|to|by)\b)*",
    re.IGNORECASE,
)
# A ticker owning the metric named right after it: "MSFT's annualised volatility", "XOM's
# 95% VaR", "AAPL volatility".
_OWNER: Final = re.compile(r"\b([A-Z][A-Z0-9.^-]{0,9})(?:(?:'s|\u2019s)\s+(?:\S+\s+){0,2}?|\s+)$")
# What may stand between a figure and the name right after it ("27% annualised volatility",
# "34% max drawdown", "-3.1% daily VaR").
_BETWEEN: Final = re.compile(r"\s*(?:(?:in|of|on|its|the|a|an|historical|daily)\s+)*", re.I)
_AFTER_SPLIT: Final = re.compile(
    r"[,;:.!?)\n]|\band\b|\bwhile\b|\bbut\b|\bvs\.?\b|\bversus\b|\bagainst\b"
)


def _owner(before: str, name_start: int) -> str:
    m = _OWNER.search(before[:name_start])
    return m[1] if m else ""


def _tie(before: str, after: str) -> tuple[tuple[str, ...], str]:
    """The metric the words right around a figure name, and the ticker owning it: a name
    just before it ("volatility of 27%"), else one right after it ("27% annualised
    volatility", "+8.1% a year compounded"), else the last name before it in its clause."""
    names = _names(before)
    if names and _LINK.fullmatch(before[names[-1][1] :]):
        start, _, keys = names[-1]
        return keys, _owner(before, start)
    near = _AFTER_SPLIT.split(after, maxsplit=1)[0]
    following = _names(near[:40])
    if following and _BETWEEN.fullmatch(near[: following[0][0]]):
        return following[0][2], ""
    if names:
        start, _, keys = names[-1]
        return keys, _owner(before, start)
    return (following[0][2], "") if following else ((), "")


# Names of the dates of the metrics ("peaked on", "trough", "worst day came on").
_DATE_NAMES: Final = (
    (re.compile(r"\bpeak(?:ed|s)?\b|\btopped\b", re.I), "peak_date"),
    (re.compile(r"\btrough\b|\bbottom(?:ed|s)?\b|\blow point\b", re.I), "trough_date"),
    (
        re.compile(
            r"(?<!not )(?<!not been )(?<!never )(?<!no )(?<!without )(?<!without a )"
            r"\b(?:recover(?:ed|y)|regained)\b",
            re.I,
        ),
        "recovery_date",
    ),
    (re.compile(r"\bworst (?:single |trading )?(?:day|session)s?\b", re.I), "worst_date"),
    (re.compile(r"\bbest (?:single |trading )?(?:day|session)s?\b", re.I), "best_date"),
)
_DATE_CLAUSE_END: Final = re.compile(
    r"[.!?;,:](?:\s|$)|\n|\b(?:and|but|while|whereas|against|versus|vs\.?|than)\s", re.I
)


def _date_tie(text: str, start: int, floor: int) -> tuple[tuple[str, ...], str]:
    """The metric date the words before a date name ("bottomed on 2009-03-09"), back to the
    previous date or the clause start, and the ticker owning it."""
    head = text[floor:start]
    cut = max((m.end() for m in _DATE_CLAUSE_END.finditer(head)), default=0)
    words = head[cut:][-80:]
    found = [(m.start(), key) for rx, key in _DATE_NAMES for m in rx.finditer(words)]
    if not found:
        return (), ""
    at, key = max(found)
    return (key,), _owner(words, at)


def extract(text: str) -> list[Figure]:
    """Every figure of `text`, in order."""
    dates = _dates(text)
    spans = [(f.start, f.end) for f in dates]
    figures: list[Figure] = []
    for f in dates:
        floor = max((e for s, e in spans if e <= f.start), default=0)
        metrics, owner = _date_tie(text, f.start, floor) if f.kind == "date" else ((), "")
        figures.append(replace(f, metrics=metrics, symbol=owner))
    numbers = [
        m
        for m in _NUMBER.finditer(text)
        if not any(s < m.end() and m.start() < e for s, e in spans)
    ]
    bounds = sorted([*spans, *((m.start(), m.end()) for m in numbers if not _is_level(m))])
    for m in numbers:
        figure = _number_figure(text, m, bounds)
        if figure is not None:
            figures.append(figure)
    return sorted(figures, key=lambda f: f.start)


def _is_level(m: re.Match[str]) -> bool:
    unit = (m["unit"] or "").strip()
    return unit == "%" and not m["sign"] and m["num"] in ("95", "99")


def _number_figure(text: str, m: re.Match[str], bounds: list[tuple[int, int]]) -> Figure | None:
    raw, unit = m["num"], (m["unit"] or "").strip().lower()
    start = m.start("sign") if m["sign"] else (m.start("cur") if m["cur"] else m.start("num"))
    end = m.end()
    if start > 0 and (text[start - 1].isalpha() or text[start - 1] == "_"):
        return None  # part of a word or an identifier (e.g. "VaR95", "H2", "Q1")
    if unit == "" and end < len(text) and (text[end].isalpha() or text[end] == "_"):
        return None  # "1st", "3rd", "10th", "20d": an ordinal or an identifier
    digits = raw.replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    number = float(digits)
    previous_end = max((e for s, e in bounds if e <= start), default=0)
    next_start = min((s for s, e in bounds if s >= end), default=len(text))
    before = _clause_before(text, start, previous_end)
    after = text[end:next_start]
    explicit = bool(m["sign"])
    sign = -1 if explicit and m["sign"] != "+" else (1 if explicit else 0)
    if not explicit:
        if _NEG_BEFORE.search(before) or _NEG_AFTER.match(after):
            sign = -1
        elif _POS_BEFORE.search(before) and not _UP_TO.search(before):
            sign = 1
    kind: Kind
    if m["cur"] or unit in ("usd", "eur", "gbp", "dollar", "dollars"):
        kind, value = "money", number
    elif unit.startswith(("percentage", "pp", "pt", "point")):
        kind, value = "points", number / 100
    elif unit.startswith(("%", "per")):
        kind, value = "percent", number / 100
    elif unit.startswith(("bps", "basis")):
        kind, value, decimals = "points", number / 10_000, decimals + 2
    elif decimals == 0 and "," not in raw and 1900 <= number <= 2100 and unit == "":
        kind, value = "year", number
    else:
        kind, value = "number", number
    metrics, owner = _tie(before, after) if kind in ("percent", "points", "number") else ((), "")
    return Figure(
        text[start:end], start, end, kind, value, decimals, sign, explicit, metrics, owner
    )


# -- sources -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sources:
    """What an answer may quote: values by (symbol, metric key), other numbers, dates."""

    values: Mapping[tuple[str, str], float]
    numbers: frozenset[float] = frozenset()  # counts, conventions, numbers of the question
    percents: frozenset[float] = frozenset()  # fractions: confidence levels, risk-free rate
    dates: frozenset[int] = frozenset()  # ordinals
    first_year: int = 0
    last_year: int = 0
    question: tuple[Figure, ...] = ()
    dated: Mapping[tuple[str, str], int] = field(default_factory=dict)  # peak_date, ... ordinals
    symbols: frozenset[str] = frozenset()

    @classmethod
    def from_metrics(
        cls,
        metrics: Sequence[SymbolMetrics],
        *,
        question: str = "",
        window: tuple[date | None, date | None] = (None, None),
        periods_per_year: float = 252.0,
        risk_free: float = 0.0,
        correlations: Mapping[frozenset[str], float] | None = None,
    ) -> Sources:
        values: dict[tuple[str, str], float] = {}
        dated: dict[tuple[str, str], int] = {}
        numbers: set[float] = {float(len(metrics)), periods_per_year}
        dates: set[date] = {d for d in window if d is not None}
        for m in metrics:
            for spec in SPECS.values():
                v = spec.get(m)
                if v is not None and math.isfinite(v):
                    values[(m.symbol, spec.key)] = v
            dd = m.drawdown
            numbers.update((m.n_returns, dd.duration_periods, dd.duration_days))
            if m.relative is not None:
                numbers.add(m.relative.n_common)
                dates.update((m.relative.first_date, m.relative.last_date))
            dates.update(
                d
                for d in (m.start_date, m.end_date, dd.peak_date, dd.trough_date, dd.recovery_date)
                if d is not None
            )
            dates.update((m.best.date, m.worst.date))
            for key, d in (
                ("peak_date", dd.peak_date),
                ("trough_date", dd.trough_date),
                ("recovery_date", dd.recovery_date),
                ("best_date", m.best.date),
                ("worst_date", m.worst.date),
            ):
                if d is not None:
                    dated[(m.symbol, key)] = d.toordinal()
        for pair, v in (correlations or {}).items():
            if math.isfinite(v):
                values[("|".join(sorted(pair)), "correlation")] = v
        asked = tuple(extract(question)) if question else ()
        numbers.update(f.value for f in asked if f.kind in ("number", "money", "year"))
        years = [d.year for d in dates] or [0]
        return cls(
            values=values,
            numbers=frozenset(numbers),
            percents=frozenset({0.95, 0.99, 0.05, 0.01, risk_free}),
            dates=frozenset(d.toordinal() for d in dates),
            first_year=min(years),
            last_year=max(years),
            question=asked,
            dated=dated,
            symbols=frozenset(m.symbol for m in metrics),
        )

    def with_optimization(
        self,
        weights: Mapping[str, float],
        *,
        expected_return: float,
        volatility: float,
        sharpe: float,
        window: tuple[date, date],
        periods: int,
    ) -> Sources:
        """These sources and an optimised mix: each weight under its symbol (key `weight`),
        the mix's expected figures under PORTFOLIO, its estimation window and length."""
        values = dict(self.values)
        for symbol, w in weights.items():
            values[(symbol, "weight")] = w
        for key, v in (
            ("expected_return", expected_return),
            ("expected_volatility", volatility),
            ("expected_sharpe", sharpe),
        ):
            if math.isfinite(v):
                values[(PORTFOLIO, key)] = v
        dates = self.dates | {d.toordinal() for d in window}
        years = [self.first_year, self.last_year] if self.dates else []
        years += [d.year for d in window]
        return replace(
            self,
            values=values,
            numbers=self.numbers | {float(periods), float(len(weights))},
            dates=frozenset(dates),
            first_year=min(years),
            last_year=max(years),
        )

    def of(self, keys: Iterable[str], symbol: str | None = None) -> list[tuple[str, float]]:
        wanted = set(keys)
        return [
            (k, v)
            for (s, k), v in self.values.items()
            if k in wanted and (symbol is None or s == symbol)
        ]

    def unit_of(self, key: str) -> str:
        return _spec(key).unit


# -- checking ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unverified:
    text: str
    start: int
    end: int
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    figures_checked: int
    unverified: tuple[Unverified, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.unverified


@dataclass(frozen=True, slots=True)
class Citation:
    """A figure the answer says it took from `symbol`'s `metric`."""

    text: str
    symbol: str
    metric: str


def _close(written: float, value: float, decimals: int) -> bool:
    return abs(written - value) <= 0.5 * 10.0**-decimals + 1e-9 * max(1.0, abs(value))


def _matches(f: Figure, key: str, value: float) -> bool:
    """Does figure `f` state `value` of metric `key` (rounding and sign rules)?"""
    spec = _spec(key)
    if f.kind == "percent":
        if spec.unit != "pct":
            return False
        written, scale = f.value * 100, value * 100
    elif f.kind == "number":
        written, scale = f.value, value
        if spec.unit == "pct" and abs(f.value) >= 2 and f.decimals == 0:
            return False  # "34" is not how anyone writes 0.34 (but 2.24 may be 224%)
    else:
        return False
    if f.sign != 0 and not f.explicit_sign and (spec.nonnegative or spec.unit == "ratio"):
        return False  # "gained 52%" states a change: not a volatility, a share or a ratio
    if f.sign != 0:
        return _close(f.sign * abs(written), scale, f.decimals)
    if spec.loss or not f.metrics:
        return _close(abs(written), abs(scale), f.decimals)
    return _close(written, scale, f.decimals)


class Checker:
    """Checks the figures of answers against one set of `Sources`."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        # The symbols of an optimised mix: a percentage written right next to one of them
        # ("KO 61.2%", "61.2% in KO") states its weight.
        self.mix = {s: v for (s, k), v in sources.values.items() if k == "weight"}
        self._named: set[str] = set()

    def check(self, text: str, citations: Sequence[Citation] = ()) -> Report:
        figures = extract(text)
        # The extended metrics the answer names somewhere: its untied figures may be those.
        self._named = {k for _, _, keys in _names(text) for k in keys if k in NAMED_ONLY}
        cited = self._cited(text, figures, citations)
        problems: list[Unverified] = []
        for f in figures:
            held = self._weight_reason(text, f) if self.mix and f.start not in cited else None
            reason = held if held is not None else self._reason(f, cited.get(f.start))
            if reason:
                problems.append(Unverified(f.text, f.start, f.end, reason))
        return Report(len(figures), tuple(problems))

    def _cited(
        self, text: str, figures: list[Figure], citations: Sequence[Citation]
    ) -> dict[int, Citation]:
        """Citations by the start of the figure they name (first unused figure whose text
        contains the cited text)."""
        out: dict[int, Citation] = {}
        for c in citations:
            wanted = c.text.strip()
            for f in figures:
                if f.start not in out and wanted and (wanted in f.text or f.text.strip() in wanted):
                    out[f.start] = c
                    break
        return out

    def _reason(self, f: Figure, citation: Citation | None) -> str:
        src = self.sources
        if f.kind == "date":
            return self._date_reason(f)
        if f.kind == "month":
            months = {date.fromordinal(d).year * 12 + date.fromordinal(d).month for d in src.dates}
            return (
                ""
                if int(f.value) in months or self._in_window_year(f.value // 12)
                else ("month not among the computed dates")
            )
        if f.kind == "year":
            return (
                ""
                if self._in_window_year(f.value) or f.value in src.numbers
                else ("year outside the analysed window")
            )
        if f.kind == "money":
            return "" if f.value in src.numbers else "amount not among the computed figures"
        if self._asked(f) or self._convention(f):
            return ""
        if citation is not None:
            return self._check_citation(f, citation)
        if f.kind == "points":
            return "" if self._points(f) else "gap not between two computed values"
        if f.metrics:
            owner = f.symbol if f.symbol in src.symbols else None
            candidates = src.of(f.metrics, owner)
            if any(_matches(f, k, v) for k, v in candidates):
                return ""
            if not candidates:
                return f"{_label(f.metrics)} was not computed" + (f" for {owner}" if owner else "")
            return f"does not match the {_label(f.metrics)} computed" + (
                f" for {owner}" if owner else ""
            )
        if any(
            _matches(f, k, v)
            for (_, k), v in src.values.items()
            if k not in NAMED_ONLY or k in self._named
        ):
            return ""
        if f.kind == "percent" and any(
            _close(abs(f.value) * 100, p * 100, f.decimals) for p in src.percents
        ):
            return ""
        if f.kind == "number" and (
            any(_close(abs(f.value), n, f.decimals) for n in src.numbers)
            or (f.decimals == 0 and f.value <= 10)
        ):
            return ""
        return "not among the computed figures"

    def _held(self, text: str, f: Figure) -> str:
        """The mix symbol written right next to percentage `f` ("KO 61.2%", "KO: 61.2%",
        "61.2% in KO"), unless a metric name follows it ("KO 15.3% volatility")."""
        if f.kind != "percent":
            return ""
        after = text[f.end : f.end + 60]
        near = _AFTER_SPLIT.split(after, maxsplit=1)[0]
        following = _names(near[:40])
        if (
            following
            and _BETWEEN.fullmatch(near[: following[0][0]])
            and following[0][2] != ("weight",)
        ):
            return ""
        before = _MIX_BEFORE.search(text[max(0, f.start - 40) : f.start])
        if before and before[1] in self.mix:
            return before[1]
        behind = _MIX_AFTER.match(after)
        return behind[1] if behind and behind[1] in self.mix else ""

    def _weight_reason(self, text: str, f: Figure) -> str | None:
        """A percentage held by a mix symbol must be its weight (or that symbol's own value
        of the metric the words name); None when no mix symbol holds it."""
        held = self._held(text, f)
        if not held:
            return None
        weight = replace(f, metrics=("weight",))
        if _matches(weight, "weight", self.mix[held]):
            return ""
        if f.metrics and any(_matches(f, k, v) for k, v in self.sources.of(f.metrics, held)):
            return ""
        return f"does not match the weight of {held} in the optimised mix"

    def _date_reason(self, f: Figure) -> str:
        src = self.sources
        if not f.metrics:
            return "" if int(f.value) in src.dates else "date not among the computed dates"
        key = f.metrics[0]
        owner = f.symbol if f.symbol in src.symbols else None
        found = [d for (s, k), d in src.dated.items() if k == key and owner in (None, s)]
        label = key.removesuffix("_date").replace("_", " ") + " date"
        whose = f" of {owner}" if owner else ""
        if int(f.value) in found:
            return ""
        return f"not the {label}{whose} computed" if found else f"no {label}{whose} was computed"

    def _check_citation(self, f: Figure, c: Citation) -> str:
        key = c.metric.strip().lower()
        if key not in SPECS and key not in OPTIMIZATION_SPECS and key != "correlation":
            return f"cites an unknown metric {c.metric!r}"
        symbol = "|".join(sorted(c.symbol.strip().upper().split("|")))
        found = [v for (s, k), v in self.sources.values.items() if k == key and s == symbol]
        if not found:
            return f"cites {key} of {c.symbol!r}, which was not computed"
        tied = Figure(
            f.text, f.start, f.end, f.kind, f.value, f.decimals, f.sign, f.explicit_sign, (key,)
        )
        return (
            "" if any(_matches(tied, key, v) for v in found) else f"does not match {c.symbol} {key}"
        )

    def _convention(self, f: Figure) -> bool:
        """A confidence level, or a count (returns, periods, days, periods per year)."""
        if f.kind == "percent" and f.decimals == 0 and f.sign == 0:
            return round(f.value, 2) in LEVELS
        return f.kind == "number" and f.decimals == 0 and f.value in self.sources.numbers

    def _asked(self, f: Figure) -> bool:
        return any(
            q.kind == f.kind and _close(abs(f.value), abs(q.value), max(f.decimals, q.decimals))
            for q in self.sources.question
        )

    def _in_window_year(self, year: float) -> bool:
        return self.sources.first_year <= year <= self.sources.last_year

    def _points(self, f: Figure) -> bool:
        by_key: dict[str, list[float]] = {}
        for (_, k), v in self.sources.values.items():
            if self.sources.unit_of(k) == "pct" and (k not in NAMED_ONLY or k in f.metrics):
                by_key.setdefault(k, []).append(v)
        for k, vs in by_key.items():
            if f.metrics and k not in f.metrics and not set(f.metrics) & {"cagr", "total_return"}:
                continue
            candidates = [abs(a - b) for i, a in enumerate(vs) for b in vs[i + 1 :]] + [
                abs(v) for v in vs
            ]
            if any(_close(abs(f.value) * 100, c * 100, f.decimals) for c in candidates):
                return True
        return False


_MIX_TICKER: Final = r"([A-Z][A-Z0-9.^-]{0,9})"
_MIX_BEFORE: Final = re.compile(
    rf"\b{_MIX_TICKER}(?:'s|\u2019s)?(?:\s*[:=(]|\s+(?:at|with|of|on|gets|got|takes|weighted"
    r"(?: at)?))?\s*\(?\s*$"
)
_MIX_AFTER: Final = re.compile(
    rf"^\s*(?:(?:in|of|to|for|into|on)\s+)?{_MIX_TICKER}\b(?!'s|\u2019s)"
)

_FAMILY_LABELS: Final[dict[tuple[str, ...], str]] = {
    ("cvar_95", "cvar_99"): "CVaR",
    ("var_95", "var_99", "parametric_var_95", "parametric_var_99"): "VaR",
    ("cagr", "alpha", "expected_return"): "annual return",
    ("volatility", "tracking_error", "expected_volatility"): "volatility",
    ("total_return", "cagr", "best_day", "worst_day", "alpha", "expected_return"): "return",
    ("sharpe", "expected_sharpe"): "sharpe",
    ("parametric_cvar_95", "parametric_cvar_99"): "Gaussian CVaR",
    ("cornish_fisher_cvar_95", "cornish_fisher_cvar_99"): "Cornish-Fisher CVaR",
    ("cornish_fisher_var_95", "cornish_fisher_var_99"): "Cornish-Fisher VaR",
}


def _label(keys: Sequence[str]) -> str:
    """How people call the metric(s) a figure was written about."""
    return _FAMILY_LABELS.get(tuple(keys)) or keys[0].replace("_", " ")


def annotate(text: str, report: Report) -> tuple[str, Report]:
    """`text` with each unverified figure followed by UNVERIFIED_MARK, and the report with
    offsets into the marked text."""
    out, moved, pos, shift = [], [], 0, 0
    for u in report.unverified:
        out.append(text[pos : u.end])
        moved.append(Unverified(u.text, u.start + shift, u.end + shift, u.reason))
        out.append(UNVERIFIED_MARK)
        shift += len(UNVERIFIED_MARK)
        pos = u.end
    out.append(text[pos:])
    return "".join(out), Report(report.figures_checked, tuple(moved))


# -- the structured answer contract --------------------------------------------------------

STRUCTURED_INSTRUCTIONS: Final = (
    "Reply with one JSON object and nothing else: "
    '{"answer": "<your answer as plain prose>", "figures": [{"text": "<a figure exactly as '
    'written in the answer>", "symbol": "<ticker>", "metric": "<metric key>"}]}. List every '
    "figure of the answer that comes from the metrics, with the key of the metric it is, "
    "one of: " + ", ".join([*SPECS, "correlation", *OPTIMIZATION_SPECS]) + ". For a "
    'correlation use the symbol pair joined by "|", e.g. "AAPL|MSFT"; for a weight of an '
    'optimised mix the symbol it is of, metric "weight"; for the mix\'s expected figures '
    f'the symbol "{PORTFOLIO}".'
)


# The structured contract as a JSON Schema, for the gateway to enforce (validate, repair once):
# what `parse_structured` accepts.
ANSWER_SCHEMA: Final = json.dumps(
    {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "pattern": "\\S"},
            "figures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "symbol": {"type": "string"},
                        "metric": {"type": "string"},
                    },
                    "required": ["text", "symbol", "metric"],
                },
            },
        },
        "required": ["answer"],
    },
    separators=(",", ":"),
)


@dataclass(frozen=True, slots=True)
class StructuredAnswer:
    answer: str
    citations: tuple[Citation, ...] = field(default_factory=tuple)


class SchemaError(ValueError):
    """The model's reply is not the structured answer; the message says why (for a repair)."""


def _json(content: str) -> object:
    """`content` as JSON (optionally in a code fence); json.JSONDecodeError otherwise."""
    body = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    return json.loads(fenced[1] if fenced else body)


def answer_text(content: str) -> str:
    """A reply that broke the contract, as text to check: its "answer" when it is a JSON
    object with one (its "figures" malformed), else the reply itself."""
    try:
        data = _json(content)
    except json.JSONDecodeError:
        return content.strip()
    answer = data.get("answer") if isinstance(data, dict) else None
    return answer.strip() if isinstance(answer, str) and answer.strip() else content.strip()


def parse_structured(content: str) -> StructuredAnswer:
    """The structured answer in `content` (a JSON object, optionally in a code fence)."""
    try:
        data = _json(content)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"not JSON: {exc.msg} at character {exc.pos}") from exc
    if not isinstance(data, dict):
        raise SchemaError("the reply must be a JSON object")
    answer = data.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise SchemaError('"answer" must be a non-empty string')
    raw = data.get("figures", [])
    if not isinstance(raw, list):
        raise SchemaError('"figures" must be a list')
    citations = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("text", "symbol", "metric")
        ):
            raise SchemaError(f'"figures"[{i}] must have string "text", "symbol" and "metric"')
        citations.append(Citation(item["text"], item["symbol"], item["metric"]))
    return StructuredAnswer(answer.strip(), tuple(citations))
