"""Rule-based answers to the question asked, for when no LLM answers.

Pure domain code: the standard library and the metric dataclasses, no clock, no I/O.

:func:`parse_question` reads what is asked -- the metric, the direction, the kind of
answer and the symbols named -- tolerating typos (``difflib`` on keyword tokens) and
varied wording.  :func:`answer_question` answers it from the computed metrics: the first
sentence answers directly with the figures, the second states the window, then the
per-symbol summary of :func:`~services.analytics.commentary.rules_commentary` follows as
supporting detail.

Every figure written is a metric value, rounded as the summary rounds it (percentages with
one decimal and a sign, VaR/CVaR with two, ratios with two decimals, dates ISO): answers go
through the numeric grounding check like the LLM's.  Nothing is derived (no differences).

Directions are about a metric's *magnitude* as people speak of it: "more" is a deeper
drawdown, a bigger one-day loss or a larger VaR loss, and a higher value for everything
else.  "Best"/"worst" are turned into more/less by whether more of the metric is good
(best return = more, best drawdown = less).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from itertools import combinations
from typing import Final, Literal

from services.analytics.commentary import format_percent, format_ratio, rules_commentary
from services.analytics.metrics import PeriodReturn, SymbolMetrics
from services.analytics.periods import period_spans

MetricName = Literal[
    "max_drawdown",
    "total_return",
    "cagr",
    "volatility",
    "sharpe",
    "sortino",
    "calmar",
    "beta",
    "alpha",
    "var",
    "cvar",
    "best_day",
    "worst_day",
    "skew",
    "kurtosis",
    "positive_share",
    "correlation",
    "tracking_error",
    "information_ratio",
    "omega",
    "tail_ratio",
    "stability",
    "win_rate",
    "up_capture",
    "down_capture",
    "capture_ratio",
    "treynor",
    "best_month",
    "worst_month",
    "best_year",
    "worst_year",
]
# which: one of several; compare: two or more, no "which"; value: one symbol;
# yes_no: "is X riskier than Y?"; correlation: between symbols; summary: nothing mapped.
IntentKind = Literal["which", "compare", "value", "yes_no", "correlation", "summary"]
Direction = Literal["more", "less"]
# The comparative the user asked with, echoed in a yes/no answer.
Verb = Literal["riskier", "safer", "outperformed", "underperformed"]

UNMAPPED: Final = "I could not map the question to a metric, so here is the summary."


@dataclass(frozen=True, slots=True)
class Intent:
    """What a question asks."""

    kind: IntentKind
    metric: MetricName | None
    direction: Direction | None  # of the metric's magnitude (module docstring); None for value
    symbols: tuple[str, ...]  # the symbols it is about, in the order named
    named: bool  # the symbols were named in the question (not defaulted to all)
    verb: Verb | None = None


# -- the optimisation intent -------------------------------------------------------------

OptimizationObjective = Literal["min_variance", "max_sharpe", "min_cvar"]
_MIX_WORDS: Final = re.compile(
    r"\b(?:mix(?:es|ture)?|blend|weights?|weighting|allocat\w*|split|divide|combination|"
    r"proportions?|how much (?:of|in|into) each|optim(?:al|um|i[sz]\w*)|tangency|"
    r"minimum[- ]variance portfolio|min[- ]variance portfolio|max(?:imum)?[- ]sharpe portfolio)\b",
    re.IGNORECASE,
)
_OBJECTIVE_WORDS: Final[tuple[tuple[OptimizationObjective, re.Pattern[str]], ...]] = (
    (
        "min_cvar",
        re.compile(
            r"\bc-?var\b|expected shortfall|conditional value|tail (?:loss|risk)", re.IGNORECASE
        ),
    ),
    (
        "max_sharpe",
        re.compile(
            r"\bsharpe?\b|risk[- ]adjusted|return per unit of risk|reward to risk|tangency",
            re.IGNORECASE,
        ),
    ),
    (
        "min_variance",
        re.compile(
            r"volatil\w*|variance|\bvol\b|\brisk\w*|standard deviation|\bstd\b|\bsafe\w*|"
            r"\bstabl\w*|steadi\w*|steady|smooth\w*|swings",
            re.IGNORECASE,
        ),
    ),
)
OBJECTIVE_PHRASES: Final[dict[OptimizationObjective, str]] = {
    "min_variance": "the lowest volatility",
    "max_sharpe": "the highest Sharpe ratio",
    "min_cvar": "the smallest 95% CVaR (daily)",
}


def optimization_objective(question: str) -> OptimizationObjective | None:
    """The optimisation a question asks for ("what mix of these would have had the lowest
    volatility?", "which weights maximise the Sharpe ratio?", "how should I split between
    these to minimise CVaR?"), or None when it asks for no mix of weights."""
    if not _MIX_WORDS.search(question):
        return None
    for objective, words in _OBJECTIVE_WORDS:
        if words.search(question):
            return objective
    return None


@dataclass(frozen=True, slots=True)
class OptimizedMix:
    """The long-only mix the optimiser found for the question, as Analyze states it."""

    objective: OptimizationObjective
    weights: tuple[tuple[str, float], ...]  # in the optimiser's symbol order
    expected_return: float  # annualised
    volatility: float  # annualised
    sharpe: float
    first: date  # the estimation window: first and last day with every symbol's return
    last: date


def mix_sentence(mix: OptimizedMix) -> str:
    """ "Over 2015-01-02 to 2020-12-31 the long-only mix with the lowest volatility would
    have been KO 61.2%, MSFT 27.9% and AAPL 10.9%: ..." (weights largest first)."""
    ranked = sorted(mix.weights, key=lambda sw: (-sw[1], sw[0]))
    weights = _and([f"{s} {max(w, 0.0) * 100:.1f}%" for s, w in ranked])
    return (
        f"Over {mix.first.isoformat()} to {mix.last.isoformat()} the long-only mix with "
        f"{OBJECTIVE_PHRASES[mix.objective]} would have been {weights}: expected annualised "
        f"volatility {format_percent(mix.volatility, signed=False)}, expected return "
        f"{format_percent(mix.expected_return)}, expected Sharpe ratio "
        f"{format_ratio(mix.sharpe)}."
    )


def needs_correlation(intent: Intent) -> bool:
    """Whether Analyze must compute return correlations to answer."""
    return intent.metric == "correlation"


# -- vocabulary --------------------------------------------------------------------------


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


@dataclass(frozen=True, slots=True)
class _Phrase:
    words: tuple[str, ...]
    metric: MetricName
    invert: bool = False  # "steadier" asks for less volatility when it says "more"
    verb: Verb | None = None


def _phrases(
    metric: MetricName, texts: str, *, invert: bool = False, verb: Verb | None = None
) -> list[_Phrase]:
    """Phrases separated by '|', each a sequence of lower-case words."""
    return [_Phrase(tuple(t.split()), metric, invert, verb) for t in texts.split("|")]


_PHRASES: Final[tuple[_Phrase, ...]] = (
    *_phrases("omega", "omega | omega ratio"),
    *_phrases("tail_ratio", "tail ratio"),
    *_phrases("stability", "stability | stability of returns"),
    *_phrases("win_rate", "win rate | hit rate | winning rate | win ratio"),
    *_phrases(
        "up_capture",
        "upside capture | up capture | up market capture | upside market capture",
    ),
    *_phrases(
        "down_capture",
        "downside capture | down capture | down market capture | downside market capture",
    ),
    *_phrases("capture_ratio", "capture ratio | up down capture | capture"),
    *_phrases("treynor", "treynor | treynor ratio"),
    *_phrases("best_month", "best month | best monthly | best calendar month"),
    *_phrases("worst_month", "worst month | worst monthly | worst calendar month"),
    *_phrases("best_year", "best year | best calendar year | best annual"),
    *_phrases("worst_year", "worst year | worst calendar year | worst annual"),
    *_phrases(
        "correlation",
        "correlation | correlated | correlate | corr | move together | moved together | moves "
        "together | co move | comove | comovement",
    ),
    *_phrases(
        "sharpe",
        "sharpe | sharp ratio | risk adjusted | return per unit of risk | reward to risk | "
        "risk reward",
    ),
    *_phrases(
        "sortino",
        "sortino | downside deviation | downside adjusted | downside risk adjusted",
    ),
    *_phrases(
        "calmar",
        "calmar | return to drawdown | return over drawdown",
    ),
    *_phrases(
        "information_ratio",
        "information ratio | info ratio",
    ),
    *_phrases(
        "tracking_error",
        "tracking error | tracking",
    ),
    *_phrases(
        "beta",
        "beta | market sensitivity | sensitive to the market",
    ),
    *_phrases(
        "alpha",
        "alpha | jensen | excess return",
    ),
    *_phrases(
        "cvar",
        "cvar | conditional value at risk | conditional var | expected shortfall | tail loss",
    ),
    *_phrases(
        "var",
        "var | value at risk",
    ),
    *_phrases(
        "skew",
        "skew | skewness | skewed",
    ),
    *_phrases(
        "kurtosis",
        "kurtosis | fat tails | fatter tails | fattest tails | fat tailed",
    ),
    *_phrases(
        "positive_share",
        "positive days | up days | winning days | green days | days up "
        "| share of positive | percentage of positive | proportion of positive | days with "
        "gains | positive day | days were positive | days positive | up day",
    ),
    *_phrases(
        "best_day",
        "best day | best daily | best single day | best trading day | best session | best one day",
    ),
    *_phrases(
        "worst_day",
        "worst day | worst daily | worst single day | worst trading day | worst session | "
        "worst one day",
    ),
    *_phrases(
        "volatility",
        "volatility | volatile | vol | standard deviation | std | stdev | swings | swung | "
        "fluctuated | fluctuate | fluctuation | choppy | choppier",
    ),
    *_phrases(
        "volatility",
        "stable | stabler | steadier | steady | steadiest | calmer | smoother",
        invert=True,
    ),
    *_phrases("volatility", "riskier | riskiest | risky | risk | more risk", verb="riskier"),
    *_phrases("volatility", "safer | safest | safe", invert=True, verb="safer"),
    *_phrases(
        "cagr",
        "cagr | annual return | annualised return | annualized return | annualised growth | "
        "annualized growth | compound annual | compounded | compounding | compounded annual | "
        "yearly return | return per year | return a year | per annum | average annual | "
        "annual growth",
    ),
    *_phrases(
        "max_drawdown",
        "drawdown | draw down | drawdowns | peak to trough | fell | fall | drop | dropped | "
        "decline | declined | crash | crashed | lost | loss | underwater | slump | plunge | "
        "plunged | tumbled | sank",
    ),
    *_phrases(
        "total_return",
        "total return | cumulative return | return | returned | performance | perform | "
        "performed | performer | gain | gained | grew | growth | profit | profitable | made "
        "more money | did better | did best | did the best | earned",
    ),
    *_phrases("total_return", "did worse | did worst | did the worst", invert=True),
    *_phrases(
        "total_return", "outperform | outperformed | beat | beaten | outpaced", verb="outperformed"
    ),
    *_phrases(
        "total_return",
        "underperform | underperformed | lagged | trailed",
        invert=True,
        verb="underperformed",
    ),
)

_MORE: Final = _wordset(
    "more higher highest bigger biggest larger largest greater greatest deeper deepest most "
    "steeper steepest heavier heaviest faster fastest quicker quickest"
)
_LESS: Final = _wordset(
    "less lower lowest smaller smallest shallower shallowest least fewer fewest milder "
    "mildest lighter lightest"
)
_GOOD: Final = _wordset("best better strongest stronger top outperformer winner")
_BAD: Final = _wordset("worst worse weakest weaker poorest poorer bottom laggard")
_COMPARATIVES: Final = _wordset(
    "more less higher lower bigger smaller larger greater deeper shallower steeper fewer "
    "better worse stronger weaker riskier safer steadier stabler calmer smoother choppier "
    "faster quicker"
)
_DAY_WORDS: Final = frozenset({"day", "days", "daily", "session", "sessions", "intraday"})
_GAIN_WORDS: Final = frozenset(
    {
        "gain",
        "gained",
        "jump",
        "jumped",
        "rise",
        "rose",
        "rally",
        "rallied",
        "surge",
        "surged",
        "up",
        "advance",
    }
)
_LOSS_WORDS: Final = frozenset(
    {
        "loss",
        "lost",
        "drop",
        "dropped",
        "fall",
        "fell",
        "decline",
        "declined",
        "plunge",
        "plunged",
        "crash",
        "crashed",
        "down",
        "tumbled",
        "sank",
    }
)
_WHICH_WORDS: Final = frozenset({"which", "who", "whichever", "whose", "rank", "ranking"})
_YES_NO_START: Final = frozenset(
    {"is", "was", "are", "were", "does", "did", "do", "has", "had", "have", "can", "would"}
)

_VOCABULARY: Final = sorted(
    {w for p in _PHRASES for w in p.words}
    | _MORE
    | _LESS
    | _GOOD
    | _BAD
    | _DAY_WORDS
    | _GAIN_WORDS
    | _LOSS_WORDS
    | _WHICH_WORDS
)
# Real words one letter away from a keyword: never "corrected" into it.
_NOT_TYPOS: Final = _wordset(
    "sharp sharply though thought through after worth mostly later other there these those "
    "where based stock stocks still value values ratio ratios lowers power tower shares "
    "wider water rally daily years months weeks since shall small smaller smallest dollar "
    "dollars market markets index benchmark period periods trade traded trades"
)
_FUZZY_MIN_LENGTH: Final = 5
_FUZZY_CUTOFF: Final = 0.82
# Lower-case words that are also tickers; they count as a ticker only when written upper-case.
_COMMON_WORDS: Final = _wordset(
    "a i an and are as at be by can do for go has have he if in is it its me my no not of on "
    "or so the to up us we all any big car key low now one out see two was way who why you "
    "new old well good best real fast next open gold cash main hope love life play"
)
_BENCHMARK_ALIAS: Final = re.compile(
    r"\b(?:the\s+)?(?:benchmark|index|market|s&p(?:\s*500)?|s\s*and\s*p(?:\s*500)?)\b",
    re.IGNORECASE,
)
_TICKER: Final = re.compile(r"[A-Za-z0-9^][A-Za-z0-9.\-^=_]*")
_WORD: Final = re.compile(r"[a-z]+")


def _correct(word: str) -> str:
    if word in _NOT_TYPOS or len(word) < _FUZZY_MIN_LENGTH:
        return word
    if word in _VOCABULARY:
        return word
    close = difflib.get_close_matches(word, _VOCABULARY, n=1, cutoff=_FUZZY_CUTOFF)
    return close[0] if close else word


def _same_word(token: str, keyword: str) -> bool:
    return token == keyword or (len(keyword) > 3 and token in (keyword + "s", keyword + "es"))


def _keyword_tokens(text: str) -> list[str]:
    """The words of ``text``, lower-case, typos of keywords corrected."""
    return [_correct(word) for word in _WORD.findall(text.lower())]


# -- symbols -----------------------------------------------------------------------------


def _named_symbols(
    text: str, symbols: Sequence[str], benchmark: str | None
) -> list[tuple[int, str]]:
    """(position, symbol) of each symbol named, tickers in any case, benchmark aliases too."""
    known = {s.upper(): s for s in [*symbols, *([benchmark] if benchmark else [])]}
    found: list[tuple[int, str]] = []
    for m in _TICKER.finditer(text):
        raw = m[0]
        for candidate in (raw, raw.rstrip(".-")):
            symbol = known.get(candidate.upper())
            if symbol is None:
                continue
            if candidate != candidate.upper() and candidate.lower() in _COMMON_WORDS:
                continue
            found.append((m.start(), symbol))
            break
    if benchmark:
        found.extend((m.start(), benchmark) for m in _BENCHMARK_ALIAS.finditer(text))
    found.sort()
    return found


def _mask(text: str, spans: Sequence[tuple[int, int]]) -> str:
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


# -- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Hit:
    phrase: _Phrase
    first: int  # token index
    last: int  # token index, exclusive


def _phrase_hits(words: Sequence[str]) -> list[_Hit]:
    hits = []
    for i in range(len(words)):
        for phrase in _PHRASES:
            n = len(phrase.words)
            window = words[i : i + n]
            if len(window) == n and all(
                _same_word(t, k) for t, k in zip(window, phrase.words, strict=True)
            ):
                hits.append(_Hit(phrase, i, i + n))
    return hits


def _metric_hit(words: Sequence[str]) -> _Hit | None:
    hits = _phrase_hits(words)
    if not hits:
        return None
    # The first metric mentioned; at one position the longest phrase ("risk adjusted").
    return min(hits, key=lambda h: (h.first, h.first - h.last))


def _explicit_direction(
    words: Sequence[str], hit: _Hit, more_is_better: bool | None
) -> Direction | None:
    """The direction word closest to the metric phrase, outside it."""
    best: tuple[int, Direction] | None = None
    for i, word in enumerate(words):
        if hit.first <= i < hit.last:
            continue
        direction: Direction | None = None
        if word in _MORE:
            direction = "more"
        elif word in _LESS:
            direction = "less"
        elif word in _GOOD or word in _BAD:
            good: Direction = "less" if more_is_better is False else "more"
            direction = good if word in _GOOD else ("more" if good == "less" else "less")
        if direction is None:
            continue
        distance = hit.first - i if i < hit.first else i - hit.last + 1
        if best is None or distance < best[0]:
            best = (distance, direction)
    return None if best is None else best[1]


def _flip(direction: Direction) -> Direction:
    return "less" if direction == "more" else "more"


def _day_metric(
    words: Sequence[str], metric: MetricName, direction: Direction | None
) -> tuple[MetricName, Direction | None]:
    """'Biggest one-day loss', 'highest daily return': the best or worst single day."""
    if not _DAY_WORDS & set(words) or metric not in ("max_drawdown", "total_return"):
        return metric, direction
    if _GAIN_WORDS & set(words):
        return "best_day", direction
    if metric == "max_drawdown" or _LOSS_WORDS & set(words):
        return "worst_day", direction
    if direction == "less":
        return "worst_day", "more"
    return "best_day", direction


def parse_question(question: str, symbols: Sequence[str], benchmark: str | None) -> Intent:
    """What ``question`` asks about ``symbols`` (the requested ones) and the benchmark."""
    # Period words ("the last 90 days", "best of 2020") are not about the metric.
    text = _mask(question, period_spans(question))
    named_at = _named_symbols(text, symbols, benchmark)
    text = _mask(text, [(pos, pos + len(_symbol_text(text, pos))) for pos, _ in named_at])
    words = _keyword_tokens(text)
    named = tuple(dict.fromkeys(symbol for _, symbol in named_at))
    requested = tuple(s for s in symbols if s != benchmark) or tuple(symbols)
    hit = _metric_hit(words)
    if hit is None:
        return Intent("summary", None, None, named or requested, bool(named))
    metric = hit.phrase.metric
    explicit = _explicit_direction(
        words, hit, _SPECS[metric].more_is_better if metric in _SPECS else None
    )
    metric, explicit = _day_metric(words, metric, explicit)
    direction: Direction | None = explicit
    if hit.phrase.invert:
        direction = _flip(direction or "more")
    verb = hit.phrase.verb
    if verb in ("riskier", "safer"):
        verb = "riskier" if (direction or "more") == "more" else "safer"
    elif verb in ("outperformed", "underperformed"):
        verb = "outperformed" if (direction or "more") == "more" else "underperformed"
    scope = _scope(metric, named, requested, benchmark)
    if metric == "correlation":
        return Intent("correlation", metric, direction, scope, bool(named))
    kind = _kind(words, text, scope, verb, explicit)
    if kind == "yes_no" and benchmark is not None and len(scope) == 1:
        # "Did it beat the market?", "Is AAPL riskier?": against the benchmark.
        subject = requested[0] if scope == (benchmark,) and len(requested) == 1 else scope[0]
        if subject != benchmark:
            scope = (subject, benchmark)
    if kind == "yes_no" and (len(scope) != 2 or not named):
        # Without a named subject "is it riskier?" has no "it": rank them instead.
        kind = "value" if len(scope) < 2 else "which"
    if kind == "value":
        return Intent(kind, metric, None, scope, bool(named), None)
    return Intent(kind, metric, direction or "more", scope, bool(named), verb)


def _symbol_text(text: str, pos: int) -> str:
    m = _BENCHMARK_ALIAS.match(text, pos) or _TICKER.match(text, pos)
    return m[0] if m else ""


def _scope(
    metric: MetricName, named: tuple[str, ...], requested: tuple[str, ...], benchmark: str | None
) -> tuple[str, ...]:
    scope = named or requested
    if metric in _RELATIVE and benchmark is not None:
        without = tuple(s for s in scope if s != benchmark)
        scope = without or (requested if named == (benchmark,) else scope)
    return scope


def _kind(
    words: Sequence[str],
    text: str,
    scope: tuple[str, ...],
    verb: Verb | None,
    explicit: Direction | None,
) -> IntentKind:
    asks_which = bool(_WHICH_WORDS & set(words)) or bool(
        re.search(r"\bwhat\s+(?:stock|symbol|ticker|one|company|share)", text, re.IGNORECASE)
    )
    comparative = (
        verb in ("outperformed", "underperformed")
        or "than" in words
        or bool(_COMPARATIVES & set(words))
    )
    starts_yes_no = bool(words) and words[0] in _YES_NO_START
    if starts_yes_no and comparative and not asks_which and "or" not in words:
        return "yes_no"
    if len(scope) < 2:
        return "value"
    return "which" if asks_which or explicit is not None else "compare"


# -- metrics as figures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str  # as the subject of a value sentence: "maximum drawdown"
    noun: str  # after a comparative: "drawdown" ("the deeper drawdown")
    more: tuple[str, str]  # comparative, superlative of "more"
    less: tuple[str, str]
    value: Callable[[SymbolMetrics], float]  # the metric value (NaN when undefined)
    magnitude_sign: float  # +1: more = a higher value; -1: more = a more negative value
    figure: Callable[[float], str]
    more_is_better: bool | None
    detail: Callable[[SymbolMetrics], str] | None = None  # dates that go with the figure


def _signed(v: float) -> str:
    return format_percent(v)


def _unsigned(v: float) -> str:
    return format_percent(v, signed=False)


def _tail(v: float) -> str:
    return format_percent(v, digits=2)


def _ratio(v: float) -> str:
    return format_ratio(v)


def _relative_value(attr: str) -> Callable[[SymbolMetrics], float]:
    return lambda m: math.nan if m.relative is None else float(getattr(m.relative, attr))


def _common_window(m: SymbolMetrics) -> str:
    """The days a relative figure covers, when fewer than the symbol's own."""
    rel = m.relative
    if rel is None or rel.n_common >= m.n_returns:
        return ""
    return (
        f" (over the {rel.n_common:,} returns in common with {rel.benchmark}, "
        f"{rel.first_date.isoformat()} to {rel.last_date.isoformat()})"
    )


def _drawdown_detail(m: SymbolMetrics) -> str:
    dd = m.drawdown
    if dd.peak_date is None or dd.trough_date is None:
        return " (no drawdown)"
    return f" (peak {dd.peak_date.isoformat()}, trough {dd.trough_date.isoformat()})"


_HIGH: Final = ("higher", "highest")
_LOW: Final = ("lower", "lowest")
_SPECS: Final[dict[MetricName, _Spec]] = {
    "max_drawdown": _Spec(
        "maximum drawdown",
        "drawdown",
        ("deeper", "deepest"),
        ("shallower", "shallowest"),
        lambda m: m.drawdown.max_drawdown,
        -1.0,
        _signed,
        False,
        _drawdown_detail,
    ),
    "total_return": _Spec(
        "total return", "total return", _HIGH, _LOW, lambda m: m.total_return, 1.0, _signed, True
    ),
    "cagr": _Spec(
        "annual return (CAGR)",
        "annual return (CAGR)",
        _HIGH,
        _LOW,
        lambda m: m.cagr,
        1.0,
        _signed,
        True,
    ),
    "volatility": _Spec(
        "annualised volatility",
        "annualised volatility",
        _HIGH,
        _LOW,
        lambda m: m.volatility,
        1.0,
        _unsigned,
        False,
    ),
    "sharpe": _Spec(
        "Sharpe ratio", "Sharpe ratio", _HIGH, _LOW, lambda m: m.sharpe, 1.0, _ratio, True
    ),
    "sortino": _Spec(
        "Sortino ratio", "Sortino ratio", _HIGH, _LOW, lambda m: m.sortino, 1.0, _ratio, True
    ),
    "calmar": _Spec(
        "Calmar ratio", "Calmar ratio", _HIGH, _LOW, lambda m: m.calmar, 1.0, _ratio, True
    ),
    "beta": _Spec(
        "beta", "beta", _HIGH, _LOW, _relative_value("beta"), 1.0, _ratio, None, _common_window
    ),
    "alpha": _Spec(
        "annualised alpha",
        "annualised alpha",
        _HIGH,
        _LOW,
        _relative_value("alpha"),
        1.0,
        _signed,
        True,
        _common_window,
    ),
    "tracking_error": _Spec(
        "tracking error",
        "tracking error",
        _HIGH,
        _LOW,
        _relative_value("tracking_error"),
        1.0,
        _unsigned,
        False,
        _common_window,
    ),
    "information_ratio": _Spec(
        "information ratio",
        "information ratio",
        _HIGH,
        _LOW,
        _relative_value("information_ratio"),
        1.0,
        _ratio,
        True,
        _common_window,
    ),
    "var": _Spec(
        "95% historical VaR (daily)",
        "95% historical VaR loss (daily)",
        ("larger", "largest"),
        ("smaller", "smallest"),
        lambda m: m.var_95,
        -1.0,
        _tail,
        False,
    ),
    "cvar": _Spec(
        "95% historical CVaR (daily)",
        "95% historical CVaR loss (daily)",
        ("larger", "largest"),
        ("smaller", "smallest"),
        lambda m: m.cvar_95,
        -1.0,
        _tail,
        False,
    ),
    "best_day": _Spec(
        "best day",
        "one-day gain",
        ("bigger", "biggest"),
        ("smaller", "smallest"),
        lambda m: m.best.value,
        1.0,
        _signed,
        True,
        lambda m: f" on {m.best.date.isoformat()}",
    ),
    "worst_day": _Spec(
        "worst day",
        "one-day loss",
        ("bigger", "biggest"),
        ("smaller", "smallest"),
        lambda m: m.worst.value,
        -1.0,
        _signed,
        False,
        lambda m: f" on {m.worst.date.isoformat()}",
    ),
    "skew": _Spec("skew", "skew", _HIGH, _LOW, lambda m: m.skew, 1.0, _ratio, True),
    "kurtosis": _Spec(
        "excess kurtosis", "excess kurtosis", _HIGH, _LOW, lambda m: m.kurtosis, 1.0, _ratio, False
    ),
    "positive_share": _Spec(
        "share of positive days",
        "share of positive days",
        _HIGH,
        _LOW,
        lambda m: m.positive_share,
        1.0,
        _unsigned,
        True,
    ),
}
_EXTENDED_RATIOS: Final[
    tuple[tuple[MetricName, str, Callable[[SymbolMetrics], float], bool], ...]
] = (
    ("omega", "Omega ratio", lambda m: m.omega, True),
    ("tail_ratio", "tail ratio", lambda m: m.tail_ratio, True),
    ("stability", "stability of returns", lambda m: m.stability, True),
    ("up_capture", "upside capture", _relative_value("up_capture"), True),
    ("down_capture", "downside capture", _relative_value("down_capture"), False),
    ("capture_ratio", "capture ratio", _relative_value("capture_ratio"), True),
    ("treynor", "Treynor ratio", _relative_value("treynor"), True),
)
for _metric, _name, _value, _better in _EXTENDED_RATIOS:
    _SPECS[_metric] = _Spec(
        _name,
        _name,
        _HIGH,
        _LOW,
        _value,
        1.0,
        _ratio,
        _better,
        _common_window
        if _metric in ("up_capture", "down_capture", "capture_ratio", "treynor")
        else None,
    )
_SPECS["win_rate"] = _Spec(
    "win rate (positive among non-zero days)",
    "win rate",
    _HIGH,
    _LOW,
    lambda m: m.win_rate,
    1.0,
    _unsigned,
    True,
)


def _period_value(attr: str) -> Callable[[SymbolMetrics], float]:
    def value(m: SymbolMetrics) -> float:
        period: PeriodReturn | None = getattr(m, attr)
        return math.nan if period is None else period.value

    return value


def _period_detail(attr: str, monthly: bool) -> Callable[[SymbolMetrics], str]:
    def detail(m: SymbolMetrics) -> str:
        period: PeriodReturn | None = getattr(m, attr)
        if period is None:
            return ""
        start = period.period_start
        return f" ({start.strftime('%B %Y')})" if monthly else f" (in {start.year})"

    return detail


_PERIOD_METRICS: Final[
    tuple[tuple[MetricName, str, str, tuple[str, str], tuple[str, str], float, bool], ...]
] = (
    ("best_month", "best month", "one-month gain", ("bigger", "biggest"),
     ("smaller", "smallest"), 1.0, True),
    ("worst_month", "worst month", "one-month loss", ("bigger", "biggest"),
     ("smaller", "smallest"), -1.0, False),
    ("best_year", "best calendar year", "calendar-year gain", ("bigger", "biggest"),
     ("smaller", "smallest"), 1.0, True),
    ("worst_year", "worst calendar year", "calendar-year loss", ("bigger", "biggest"),
     ("smaller", "smallest"), -1.0, False),
)  # fmt: skip
for _metric, _name, _noun, _more, _less, _sign, _better in _PERIOD_METRICS:
    _SPECS[_metric] = _Spec(
        _name,
        _noun,
        _more,
        _less,
        _period_value(_metric),
        _sign,
        _signed,
        _better,
        _period_detail(_metric, "month" in _metric),
    )
_RELATIVE: Final[frozenset[MetricName]] = frozenset(
    {
        "beta",
        "alpha",
        "tracking_error",
        "information_ratio",
        "up_capture",
        "down_capture",
        "capture_ratio",
        "treynor",
    }
)


# -- answers -----------------------------------------------------------------------------


def _and(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


@dataclass(frozen=True, slots=True)
class _Figure:
    symbol: str
    value: float
    text: str  # the rounded figure: ties are equal texts
    detail: str

    @property
    def full(self) -> str:
        return self.text + self.detail


def _figure(spec: _Spec, m: SymbolMetrics) -> _Figure:
    value = spec.value(m)
    detail = spec.detail(m) if spec.detail is not None and math.isfinite(value) else ""
    return _Figure(m.symbol, value, spec.figure(value), detail)


def _ranked(spec: _Spec, figures: Sequence[_Figure], direction: Direction) -> list[_Figure]:
    sign = spec.magnitude_sign * (1.0 if direction == "more" else -1.0)
    # Equal figures in name order, so the input order never shows.
    return sorted(figures, key=lambda f: (-sign * f.value, f.symbol))


def _na_sentence(spec: _Spec, missing: Sequence[str]) -> str:
    return f" The {spec.name} is n/a for {_and(list(missing))}." if missing else ""


def _not_defined(metric: MetricName, missing: Sequence[str], benchmark: str | None) -> str:
    spec = _SPECS[metric]
    if metric in _RELATIVE and benchmark is None:
        return f"The {spec.name} is not available: no benchmark was given."
    return f"The {spec.name} cannot be compared: it is n/a for {_and(list(missing))}."


def _which_answer(intent: Intent, ms: Sequence[SymbolMetrics], benchmark: str | None) -> str:
    assert intent.metric is not None
    spec = _SPECS[intent.metric]
    direction = intent.direction or "more"
    figures = [_figure(spec, m) for m in ms]
    finite = [f for f in figures if math.isfinite(f.value)]
    missing = [f.symbol for f in figures if not math.isfinite(f.value)]
    if not finite:
        return _not_defined(intent.metric, missing, benchmark)
    if len(finite) == 1:
        only = finite[0]
        return (
            f"Only {only.symbol} has a defined {spec.name} ({only.full}); "
            f"it is n/a for {_and(missing)}, so they cannot be compared."
        )
    ranked = _ranked(spec, finite, direction)
    comparative, superlative = spec.more if direction == "more" else spec.less
    top = sorted((f for f in ranked if f.text == ranked[0].text), key=lambda f: f.symbol)
    rest = ranked[len(top) :]
    against = _and([f"{f.text} for {f.symbol}" for f in rest])
    if len(top) > 1:
        tied = _and([f.symbol for f in top])
        if not rest:
            return f"{tied} are tied on {spec.name} at {top[0].text}.{_na_sentence(spec, missing)}"
        return (
            f"{tied} tie for the {superlative} {spec.noun} at {top[0].text}, "
            f"against {against}.{_na_sentence(spec, missing)}"
        )
    adjective = comparative if len(finite) == 2 else superlative
    winner = top[0]
    return (
        f"{winner.symbol} had the {adjective} {spec.noun}: {winner.full} "
        f"against {against}.{_na_sentence(spec, missing)}"
    )


_VERB_PHRASES: Final[dict[Verb, tuple[str, str]]] = {
    "riskier": ("was riskier than", "was not riskier than"),
    "safer": ("was safer than", "was not safer than"),
    "outperformed": ("outperformed", "did not outperform"),
    "underperformed": ("underperformed", "did not underperform"),
}


def _yes_no_answer(intent: Intent, ms: Sequence[SymbolMetrics], benchmark: str | None) -> str:
    assert intent.metric is not None
    spec = _SPECS[intent.metric]
    direction = intent.direction or "more"
    subject, other = (_figure(spec, m) for m in ms)
    missing = [f.symbol for f in (subject, other) if not math.isfinite(f.value)]
    if missing:
        return _not_defined(intent.metric, missing, benchmark)
    figures = f"{subject.full} vs {other.full}"
    if subject.text == other.text:
        return (
            f"Neither — {subject.symbol} and {other.symbol} had the same {spec.name}: "
            f"{subject.full}."
        )
    holds = _ranked(spec, [subject, other], direction)[0] is subject
    answer = "Yes" if holds else "No"
    if intent.verb is not None:
        phrase = _VERB_PHRASES[intent.verb][0 if holds else 1]
        measure = "by" if intent.verb in ("riskier", "safer") else "on"
        return (
            f"{answer} — {subject.symbol} {phrase} {other.symbol} {measure} {spec.name}: {figures}."
        )
    comparative = (spec.more if direction == "more" else spec.less)[0]
    if not holds:
        comparative = (spec.less if direction == "more" else spec.more)[0]
    return (
        f"{answer} — {subject.symbol} had a {comparative} {spec.noun} than {other.symbol}: "
        f"{figures}."
    )


def _value_answer(intent: Intent, ms: Sequence[SymbolMetrics], benchmark: str | None) -> str:
    assert intent.metric is not None
    spec = _SPECS[intent.metric]
    parts = []
    for m in ms:
        figure = _figure(spec, m)
        if math.isfinite(figure.value):
            parts.append(f"{m.symbol}'s {spec.name} was {figure.full}.")
        elif intent.metric in _RELATIVE and (benchmark is None or m.symbol == benchmark):
            against = "no benchmark was given" if benchmark is None else "it is the benchmark"
            parts.append(f"{m.symbol}'s {spec.name} is not available: {against}.")
        elif intent.metric in _RELATIVE and m.relative_unavailable:
            parts.append(
                f"{m.symbol}'s {spec.name} is not available: the benchmark {benchmark} has too "
                "little data in this window."
            )
        else:
            parts.append(f"{m.symbol}'s {spec.name} is n/a (undefined for this window).")
    return " ".join(parts)


def _strength(r: float) -> str:
    size = abs(r)
    word = "strongly" if size >= 0.7 else "moderately" if size >= 0.4 else "weakly"
    return f"{word} {'positive' if r >= 0 else 'negative'}"


def _correlation_pairs(intent: Intent, benchmark: str | None) -> list[tuple[str, str]]:
    symbols = list(intent.symbols)
    if len(symbols) == 1 and benchmark and symbols[0] != benchmark:
        symbols.append(benchmark)
    return list(combinations(symbols, 2))


def _correlation_answer(
    intent: Intent,
    benchmark: str | None,
    correlations: Mapping[frozenset[str], float] | None,
) -> str:
    pairs = _correlation_pairs(intent, benchmark)
    if not pairs:
        return "A correlation needs two symbols, and only one was analysed."
    if correlations is None:
        names = _and([f"{a} and {b}" for a, b in pairs])
        return f"The correlation of daily returns between {names} was not computed."
    known: list[tuple[float, str, str]] = []
    absent: list[str] = []
    for a, b in pairs:
        r = correlations.get(frozenset((a, b)))
        if r is None or not math.isfinite(r):
            absent.append(f"{a} and {b}")
        else:
            known.append((r, a, b))
    na = f" It is n/a for {_and(absent)}." if absent and known else ""
    if not known:
        return f"The correlation of daily returns between {_and(absent)} is n/a (not computed or undefined)."
    if len(known) == 1:
        r, a, b = known[0]
        return f"The correlation of daily returns between {a} and {b} was {r:.2f} ({_strength(r)}).{na}"
    known.sort(key=lambda k: -k[0] if intent.direction != "less" else k[0])
    r, a, b = known[0]
    others = _and([f"{x:.2f} for {p} and {q}" for x, p, q in known[1:]])
    rank = "least" if intent.direction == "less" else "most"
    return f"{a} and {b} were the {rank} correlated pair: {r:.2f} ({_strength(r)}), against {others}.{na}"


def _direct_answer(
    intent: Intent,
    metrics: Mapping[str, SymbolMetrics],
    benchmark: str | None,
    correlations: Mapping[frozenset[str], float] | None,
) -> str:
    if intent.kind == "summary" or intent.metric is None:
        return UNMAPPED
    if intent.kind == "correlation":
        return _correlation_answer(intent, benchmark, correlations)
    ms = [metrics[s] for s in intent.symbols if s in metrics]
    if not ms:
        return UNMAPPED
    if intent.kind == "yes_no" and len(ms) == 2:
        return _yes_no_answer(intent, ms, benchmark)
    if intent.kind in ("which", "compare", "yes_no") and len(ms) >= 2:
        return _which_answer(intent, ms, benchmark)
    return _value_answer(intent, ms, benchmark)


def answer_question(
    question: str,
    metrics: Mapping[str, SymbolMetrics],
    benchmark: str | None,
    window_label: str,
    correlations: Mapping[frozenset[str], float] | None = None,
    optimization: OptimizedMix | None = None,
) -> str:
    """The direct answer, the window used, then the per-symbol summary.

    ``metrics`` holds every analysed symbol (the benchmark's too, when computed);
    ``correlations`` maps a pair of symbols to the Pearson correlation of their daily
    returns, and is only needed when :func:`needs_correlation` says so. A question asking
    for a mix (:func:`optimization_objective`) is answered with ``optimization``, or says
    the mix could not be computed when it is None.
    """
    objective = optimization_objective(question)
    if objective is not None:
        first = (
            mix_sentence(optimization)
            if optimization is not None
            else f"The long-only mix with {OBJECTIVE_PHRASES[objective]} could not be "
            "computed for these symbols over this window (the warnings say why)."
        )
    else:
        intent = parse_question(question, list(metrics), benchmark)
        first = _direct_answer(intent, metrics, benchmark, correlations)
    window = f"Window: {window_label.rstrip('.')}."
    return f"{first} {window}\n\n{rules_commentary(metrics, benchmark)}"
