"""The rule-based fallback answers the question that was asked, from the metrics.

`data/questions.tsv` holds questions as users type them (typos, lower-case tickers,
periods); they run against the synthetic metrics below, whose values differ clearly so
that every expected answer can be checked by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest

from services.analytics.commentary import rules_commentary
from services.analytics.grounding import Checker, Sources
from services.analytics.metrics import (
    BenchmarkRelative,
    DatedReturn,
    DrawdownInfo,
    PeriodReturn,
    SymbolMetrics,
)
from services.analytics.periods import resolve_period
from services.analytics.questions import (
    UNMAPPED,
    Intent,
    OptimizedMix,
    answer_question,
    needs_correlation,
    optimization_objective,
    parse_question,
)

TABLE = Path(__file__).parent / "data" / "questions.tsv"
ANCHOR = date(2022, 12, 30)
WINDOW = "2015-01-02 to 2022-12-30"
BENCH = "SP500"
MIN_DIRECT_RATE = 0.90


def _metrics(
    symbol: str,
    *,
    total: float,
    cagr: float,
    vol: float,
    sharpe: float,
    sortino: float,
    calmar: float,
    mdd: float,
    peak: date,
    trough: date,
    var: float,
    cvar: float,
    skew: float,
    kurt: float,
    best: tuple[float, date],
    worst: tuple[float, date],
    positive: float,
    rel: tuple[float, float, float, float] | None,
) -> SymbolMetrics:
    relative = (
        None if rel is None else BenchmarkRelative(BENCH, *rel, 2014, date(2015, 1, 5), ANCHOR)
    )
    return SymbolMetrics(
        symbol=symbol,
        start_date=date(2015, 1, 2),
        end_date=ANCHOR,
        n_returns=2014,
        total_return=total,
        cagr=cagr,
        volatility=vol,
        sharpe=sharpe,
        sortino=sortino,
        calmar=calmar,
        drawdown=DrawdownInfo(mdd, peak, trough, None, 500, 700),
        var_95=var,
        var_99=var * 1.5,
        cvar_95=cvar,
        cvar_99=cvar * 1.5,
        parametric_var_95=var,
        parametric_var_99=var * 1.4,
        skew=skew,
        kurtosis=kurt,
        best=DatedReturn(*best),
        worst=DatedReturn(*worst),
        positive_share=positive,
        relative=relative,
    )


CRASH = date(2020, 3, 16)
METRICS: dict[str, SymbolMetrics] = {
    "SP500": _metrics(
        "SP500", total=1.10, cagr=0.098, vol=0.182, sharpe=0.61, sortino=0.80, calmar=0.29,
        mdd=-0.339, peak=date(2020, 2, 19), trough=date(2020, 3, 23), var=-0.0171,
        cvar=-0.0275, skew=-0.85, kurt=14.2, best=(0.0938, date(2020, 3, 24)),
        worst=(-0.1198, CRASH), positive=0.541, rel=None,
    ),
    "AAPL": _metrics(
        "AAPL", total=3.21, cagr=0.197, vol=0.321, sharpe=0.74, sortino=1.05, calmar=0.51,
        mdd=-0.385, peak=date(2018, 10, 3), trough=date(2019, 1, 3), var=-0.0290,
        cvar=-0.0440, skew=-0.12, kurt=5.1, best=(0.1198, date(2020, 3, 13)),
        worst=(-0.1286, CRASH), positive=0.532, rel=(1.21, 0.052, 0.170, 0.41),
    ),
    "MSFT": _metrics(
        "MSFT", total=2.95, cagr=0.186, vol=0.274, sharpe=0.81, sortino=1.12, calmar=0.49,
        mdd=-0.379, peak=date(2021, 11, 19), trough=date(2022, 11, 3), var=-0.0255,
        cvar=-0.0395, skew=0.05, kurt=7.9, best=(0.1421, date(2020, 3, 13)),
        worst=(-0.1474, CRASH), positive=0.548, rel=(1.15, 0.061, 0.140, 0.52),
    ),
    "GE": _metrics(
        "GE", total=-0.45, cagr=-0.072, vol=0.356, sharpe=-0.05, sortino=-0.07, calmar=-0.10,
        mdd=-0.715, peak=date(2016, 7, 20), trough=date(2020, 3, 23), var=-0.0330,
        cvar=-0.0520, skew=0.31, kurt=9.4, best=(0.1410, date(2020, 4, 29)),
        worst=(-0.1276, CRASH), positive=0.487, rel=(1.05, -0.151, 0.280, -0.58),
    ),
}  # fmt: skip
CORRELATIONS: dict[frozenset[str], float] = {
    frozenset(pair): r
    for pair, r in (
        (("AAPL", "MSFT"), 0.68),
        (("AAPL", "GE"), 0.35),
        (("MSFT", "GE"), 0.33),
        (("AAPL", "SP500"), 0.74),
        (("MSFT", "SP500"), 0.79),
        (("GE", "SP500"), 0.55),
    )
}


@dataclass(frozen=True)
class Case:
    line: int
    question: str
    symbols: list[str]
    benchmark: str | None
    kind: str
    metric: str | None
    direction: str | None
    checks: list[str]
    period: str
    label: str


def _cases() -> list[Case]:
    lines = [
        (n, line)
        for n, line in enumerate(TABLE.read_text(encoding="utf-8").splitlines(), 1)
        if line and not line.startswith("#")
    ]
    header, *rows = lines
    reader = csv.DictReader(
        [line for _, line in [header, *rows]], delimiter="\t", quoting=csv.QUOTE_NONE
    )
    return [
        Case(
            line=n,
            question=row["question"],
            symbols=row["symbols"].split(","),
            benchmark=row["benchmark"] or None,
            kind=row["kind"],
            metric=row["metric"] or None,
            direction=row["direction"] or None,
            checks=[c for c in row["check"].split(";") if c],
            period=row["period"],
            label=row["label"],
        )
        for (n, _), row in zip(rows, reader, strict=True)
    ]


CASES = _cases()


def _subset(case: Case) -> dict[str, SymbolMetrics]:
    names = [*case.symbols, *([case.benchmark] if case.benchmark else [])]
    return {name: METRICS[name] for name in dict.fromkeys(names)}


def _first_sentence(answer: str) -> str:
    return answer.split(" Window: ", 1)[0]


def _first_symbol(sentence: str) -> str | None:
    found = [(m.start(), s) for s in METRICS for m in re.finditer(rf"\b{s}\b", sentence)]
    return min(found)[1] if found else None


def _period_problem(case: Case) -> str | None:
    period = resolve_period(case.question, ANCHOR)
    if not case.period:
        return None if period is None else f"unexpected period {period.label!r}"
    if case.period == "none":
        return None if period is None else f"period {period.label!r}, expected none"
    if period is None:
        return "no period found"
    start, end = (date.fromisoformat(p) if p else None for p in case.period.split(".."))
    if (period.start, period.end) != (start, end):
        return f"period {period.start}..{period.end}, expected {case.period}"
    if case.label and period.label != case.label:
        return f"label {period.label!r}, expected {case.label!r}"
    return None


def _passes(check: str, first: str) -> bool:
    name, _, arg = check.partition(":")
    if name == "first":
        return _first_symbol(first) == arg
    if name == "contains":
        return arg in first
    if name == "unmapped":
        return first == UNMAPPED
    if name in ("yes", "no"):
        return first.startswith(name.capitalize())
    raise ValueError(f"unknown check {check!r}")


def _problems(case: Case) -> list[str]:
    metrics = _subset(case)
    intent = parse_question(case.question, list(metrics), case.benchmark)
    problems: list[str] = []
    expected = (case.kind, case.metric, case.direction)
    if (intent.kind, intent.metric, intent.direction) != expected:
        problems.append(f"intent {intent.kind}/{intent.metric}/{intent.direction}")
    answer = answer_question(case.question, metrics, case.benchmark, WINDOW, CORRELATIONS)
    first = _first_sentence(answer)
    problems += [f"check {check} failed" for check in case.checks if not _passes(check, first)]
    period = _period_problem(case)
    if period:
        problems.append(period)
    if problems:
        problems.append(f"answer: {first}")
    return problems


def test_the_table_is_big_and_varied() -> None:
    assert len(CASES) >= 60
    kinds = {c.kind for c in CASES}
    assert kinds >= {"which", "compare", "value", "yes_no", "correlation", "summary"}
    assert len({c.metric for c in CASES if c.metric}) >= 18


def test_most_questions_are_answered_directly_and_correctly() -> None:
    failures = [(c, p) for c in CASES if (p := _problems(c))]
    rate = 1 - len(failures) / len(CASES)
    print(f"\ndirect-answer rate: {rate:.1%} ({len(CASES) - len(failures)}/{len(CASES)})")
    for case, problems in failures:
        print(f"  line {case.line}: {case.question!r}: " + "; ".join(problems))
    assert rate >= MIN_DIRECT_RATE


# -- must-pass cases ---------------------------------------------------------------------


def _answer(question: str, names: list[str], benchmark: str | None = BENCH, **kw: object) -> str:
    metrics = {n: METRICS[n] for n in names}
    return answer_question(question, metrics, benchmark, WINDOW, **kw)  # type: ignore[arg-type]


def test_deeper_drawdown_names_the_symbol_with_its_figures_and_dates() -> None:
    answer = _answer("Which one had the deeper drawdown?", ["GE", "MSFT"], None)
    assert answer.startswith(
        "GE had the deeper drawdown: -71.5% (peak 2016-07-20, trough 2020-03-23) "
        "against -37.9% for MSFT. Window: 2015-01-02 to 2022-12-30.\n\n"
    )


def test_the_answer_is_followed_by_the_window_and_the_summary() -> None:
    metrics = {n: METRICS[n] for n in ["SP500", "AAPL", "MSFT"]}
    answer = answer_question("which fell the most?", metrics, BENCH, WINDOW)
    first, summary = answer.split("\n\n", 1)
    assert first.endswith(" Window: 2015-01-02 to 2022-12-30.")
    assert summary == rules_commentary(metrics, BENCH)


def test_is_x_riskier_than_y_is_a_yes_or_no_with_both_volatilities() -> None:
    yes = _first_sentence(_answer("Is AAPL riskier than MSFT?", ["AAPL", "MSFT"]))
    assert yes == "Yes — AAPL was riskier than MSFT by annualised volatility: 32.1% vs 27.4%."
    no = _first_sentence(_answer("is msft riskier than aapl", ["AAPL", "MSFT"]))
    assert no == "No — MSFT was not riskier than AAPL by annualised volatility: 27.4% vs 32.1%."


def test_riskier_than_the_benchmark_compares_with_the_benchmark() -> None:
    first = _first_sentence(_answer("Was GE riskier than the index?", ["SP500", "GE"]))
    assert first.startswith("Yes — GE was riskier than SP500")


def test_best_and_worst_day_give_the_figure_and_the_date() -> None:
    worst = _first_sentence(_answer("which had the worst day?", ["AAPL", "MSFT"]))
    assert worst == (
        "MSFT had the bigger one-day loss: -14.7% on 2020-03-16 against -12.9% for AAPL."
    )
    best = _first_sentence(_answer("best day for aapl", ["AAPL"], None))
    assert best == "AAPL's best day was +12.0% on 2020-03-13."


def test_correlation_uses_the_given_correlations_or_says_it_was_not_computed() -> None:
    first = _first_sentence(
        _answer("how correlated are aapl and msft", ["AAPL", "MSFT"], correlations=CORRELATIONS)
    )
    assert first == (
        "The correlation of daily returns between AAPL and MSFT was 0.68 (moderately positive)."
    )
    missing = _first_sentence(_answer("corelation of AAPL and MSFT", ["AAPL", "MSFT"]))
    assert "not computed" in missing
    nan = _first_sentence(
        _answer(
            "correlation of AAPL and MSFT",
            ["AAPL", "MSFT"],
            correlations={frozenset(("AAPL", "MSFT")): math.nan},
        )
    )
    assert "n/a" in nan


def test_needs_correlation_only_for_correlation_questions() -> None:
    assert needs_correlation(parse_question("how correlated are X and Y?", ["X", "Y"], None))
    assert not needs_correlation(parse_question("which fell the most?", ["X", "Y"], None))


def test_ties_are_said_as_ties() -> None:
    twin = dataclasses.replace(METRICS["AAPL"], symbol="TWIN", sharpe=METRICS["AAPL"].sharpe + 1e-4)
    metrics = {"AAPL": METRICS["AAPL"], "TWIN": twin}
    first = _first_sentence(answer_question("which had the higher sharpe?", metrics, None, WINDOW))
    assert first == "AAPL and TWIN are tied on Sharpe ratio at 0.74."
    yes_no = _first_sentence(answer_question("is AAPL riskier than TWIN?", metrics, None, WINDOW))
    assert yes_no.startswith("Neither — AAPL and TWIN had the same annualised volatility")


def test_undefined_metrics_are_not_compared() -> None:
    flat = dataclasses.replace(METRICS["MSFT"], symbol="FLAT", sharpe=math.nan)
    metrics = {"AAPL": METRICS["AAPL"], "FLAT": flat}
    first = _first_sentence(answer_question("which had the better sharpe", metrics, None, WINDOW))
    assert first == (
        "Only AAPL has a defined Sharpe ratio (0.74); it is n/a for FLAT, "
        "so they cannot be compared."
    )
    value = _first_sentence(answer_question("sharpe of flat", metrics, None, WINDOW))
    assert "n/a" in value and "FLAT" in value


def test_relative_metrics_without_a_benchmark_say_so() -> None:
    plain = {n: dataclasses.replace(METRICS[n], relative=None) for n in ["AAPL", "MSFT"]}
    first = _first_sentence(answer_question("which has the higher beta", plain, None, WINDOW))
    assert first == "The beta is not available: no benchmark was given."


def test_an_unmapped_question_says_so_then_gives_the_summary() -> None:
    metrics = {n: METRICS[n] for n in ["AAPL", "MSFT"]}
    answer = answer_question("Tell me a story", metrics, None, "2020-01-02 to 2020-12-31")
    assert answer.startswith(f"{UNMAPPED} Window: 2020-01-02 to 2020-12-31.\n\n")
    assert answer.endswith(rules_commentary(metrics, None))


def test_tickers_are_found_in_any_case_but_common_words_are_not_tickers() -> None:
    intent = parse_question("is aapl riskier than msft?", ["MSFT", "AAPL"], None)
    assert intent.symbols == ("AAPL", "MSFT")
    all_of_them = parse_question("which of all had the deeper drawdown", ["ALL", "KO"], None)
    assert all_of_them == Intent("which", "max_drawdown", "more", ("ALL", "KO"), False)
    named = parse_question("did ALL beat KO?", ["ALL", "KO"], None)
    assert named.symbols == ("ALL", "KO") and named.kind == "yes_no"


def test_the_benchmark_can_be_named_as_the_index() -> None:
    intent = parse_question("is GE safer than the index?", ["GE"], BENCH)
    assert intent.kind == "yes_no" and intent.symbols == ("GE", BENCH)
    assert intent.verb == "safer"


@pytest.mark.parametrize(
    ("question", "metric"),
    [
        ("drawdwon of aapl", "max_drawdown"),
        ("volatilty of aapl", "volatility"),
        ("sharp ratio of aapl", "sharpe"),
        ("aapl retrun", "total_return"),
        ("corelation of aapl and msft", "correlation"),
        ("sortnio of aapl", "sortino"),
    ],
)
def test_typos_map_to_the_metric(question: str, metric: str) -> None:
    assert parse_question(question, ["AAPL", "MSFT"], None).metric == metric


def test_period_words_do_not_change_the_metric() -> None:
    intent = parse_question("Which fell the most over the last 90 days?", ["AAPL", "GE"], None)
    assert (intent.kind, intent.metric, intent.direction) == ("which", "max_drawdown", "more")
    period = resolve_period("Which fell the most over the last 90 days?", ANCHOR)
    assert period is not None and period.label == "the 90 days to 2022-12-30"


def test_the_same_question_gives_the_same_answer() -> None:
    metrics = {n: METRICS[n] for n in ["SP500", "AAPL", "MSFT", "GE"]}
    reordered = dict(reversed(list(metrics.items())))
    question = "which had the deepest drawdown?"
    assert answer_question(question, metrics, BENCH, WINDOW) == answer_question(
        question, reordered, BENCH, WINDOW
    )


def test_impossible_period_words_do_not_change_the_metric_either() -> None:
    intent = parse_question("which fell the most in the last 30 trading days", ["AAPL", "GE"], None)
    assert intent.metric == "max_drawdown"


def test_every_rule_based_answer_in_the_table_is_fully_grounded() -> None:
    """The rule-based answers quote only metric values: the grounding checker verifies every
    figure of all of them (the same check Analyze runs on each answer)."""
    checked = 0
    for case in CASES:
        metrics = _subset(case)
        answer = answer_question(case.question, metrics, case.benchmark, WINDOW, CORRELATIONS)
        first, last = WINDOW.split(" to ")
        sources = Sources.from_metrics(
            list(metrics.values()),
            question=case.question,
            window=(date.fromisoformat(first), date.fromisoformat(last)),
            correlations=CORRELATIONS,
        )
        report = Checker(sources).check(answer)
        checked += report.figures_checked
        assert report.clean, (case.line, case.question, report.unverified)
    assert checked > 1000


# -- the extended metric set and the optimisation intent (issue 16) ------------------------

_EXTENDED = {
    "AAPL": dict(omega=1.14, tail_ratio=0.97, stability=0.91, win_rate=0.538),
    "MSFT": dict(omega=1.18, tail_ratio=1.04, stability=0.83, win_rate=0.551),
}
_CAPTURES = {"AAPL": (1.12, 1.05, 1.0667, 0.081), "MSFT": (1.08, 0.93, 1.1613, 0.095)}
_PERIODS = {
    "AAPL": ((0.214, date(2020, 4, 1)), (-0.183, date(2020, 3, 1)), (0.89, 2019), (-0.05, 2022)),
    "MSFT": ((0.156, date(2015, 10, 1)), (-0.129, date(2022, 4, 1)), (0.57, 2019), (-0.28, 2022)),
}


def _extended(symbol: str) -> SymbolMetrics:
    m = METRICS[symbol]
    assert m.relative is not None
    up, down, ratio, treynor = _CAPTURES[symbol]
    relative = dataclasses.replace(
        m.relative, up_capture=up, down_capture=down, capture_ratio=ratio, treynor=treynor
    )
    (bm, bm_start), (wm, wm_start), (by, by_year), (wy, wy_year) = _PERIODS[symbol]

    def month(v: float, start: date) -> PeriodReturn:
        return PeriodReturn(v, start, start.replace(day=28), 21)

    def year(v: float, y: int) -> PeriodReturn:
        return PeriodReturn(v, date(y, 1, 1), date(y, 12, 31), 252)

    return dataclasses.replace(
        m,
        relative=relative,
        best_month=month(bm, bm_start),
        worst_month=month(wm, wm_start),
        best_year=year(by, by_year),
        worst_year=year(wy, wy_year),
        **_EXTENDED[symbol],  # type: ignore[arg-type]
    )


EXTENDED = {s: _extended(s) for s in ("AAPL", "MSFT")} | {"SP500": METRICS["SP500"]}


@pytest.mark.parametrize(
    ("question", "metric", "first", "figure"),
    [
        ("Which had the higher win rate?", "win_rate", "MSFT", "55.1%"),
        ("which had the higher omega?", "omega", "MSFT", "1.18"),
        ("Which had the better tail ratio?", "tail_ratio", "MSFT", "1.04"),
        ("Which had the higher upside capture?", "up_capture", "AAPL", "1.12"),
        ("which had the lower downside capture?", "down_capture", "MSFT", "0.93"),
        ("Which had the better capture ratio?", "capture_ratio", "MSFT", "1.16"),
        ("Which had the higher Treynor ratio?", "treynor", "MSFT", "0.10"),
        ("Which had the higher stability of returns?", "stability", "AAPL", "0.91"),
        ("Which had the best month?", "best_month", "AAPL", "+21.4% (April 2020)"),
        ("Which had the worst month?", "worst_month", "AAPL", "-18.3% (March 2020)"),
        ("Which had the best year?", "best_year", "AAPL", "+89.0% (in 2019)"),
        ("which had the worst calendar year?", "worst_year", "MSFT", "-28.0% (in 2022)"),
    ],
)
def test_the_extended_metrics_are_asked_and_answered_directly_and_grounded(
    question: str, metric: str, first: str, figure: str
) -> None:
    intent = parse_question(question, list(EXTENDED), BENCH)
    assert (intent.kind, intent.metric) == ("which", metric)
    answer = answer_question(question, EXTENDED, BENCH, WINDOW)
    direct = _first_sentence(answer)
    assert _first_symbol(direct) == first and figure in direct, direct
    sources = Sources.from_metrics(
        list(EXTENDED.values()),
        question=question,
        window=(date(2015, 1, 2), ANCHOR),
    )
    report = Checker(sources).check(answer)
    assert report.clean, (direct, report.unverified)


def test_a_single_symbols_extended_metric_is_stated() -> None:
    answer = answer_question("What was AAPL's best month?", EXTENDED, BENCH, WINDOW)
    assert _first_sentence(answer) == "AAPL's best month was +21.4% (April 2020)."
    answer = answer_question("What was MSFT's win rate?", EXTENDED, BENCH, WINDOW)
    assert _first_sentence(answer) == ("MSFT's win rate (positive among non-zero days) was 55.1%.")


@pytest.mark.parametrize(
    ("question", "objective"),
    [
        ("What mix of AAPL, MSFT and KO would have had the lowest volatility?", "min_variance"),
        ("which weights would have maximised the Sharpe ratio over 2019?", "max_sharpe"),
        ("how should I split between these to minimise CVaR?", "min_cvar"),
        ("What allocation would have been least risky?", "min_variance"),
        ("the minimum-variance portfolio of these?", "min_variance"),
        ("Which blend gives the best risk-adjusted return?", "max_sharpe"),
        ("how much of each to hold for the smallest expected shortfall", "min_cvar"),
        ("Optimise the weights for the steadiest ride", "min_variance"),
        # Not a mix: a metric question, or a mix with no objective.
        ("Which had the lowest volatility?", None),
        ("Which had the higher Sharpe ratio in 2019?", None),
        ("What is the CVaR of AAPL?", None),
        ("What mix would you suggest?", None),
    ],
)
def test_the_optimisation_intent_and_its_objective(question: str, objective: str | None) -> None:
    assert optimization_objective(question) == objective


MIX = OptimizedMix(
    "min_variance",
    (("AAPL", 0.10876), ("MSFT", 0.27912), ("KO", 0.61212)),
    expected_return=0.14812,
    volatility=0.15267,
    sharpe=0.9712,
    first=date(2015, 1, 5),
    last=date(2020, 12, 31),
)


def _mix_sources(question: str) -> Sources:
    return Sources.from_metrics(
        list(EXTENDED.values()), question=question, window=(date(2015, 1, 2), ANCHOR)
    ).with_optimization(
        dict(MIX.weights),
        expected_return=MIX.expected_return,
        volatility=MIX.volatility,
        sharpe=MIX.sharpe,
        window=(MIX.first, MIX.last),
        periods=1510,
    )


def test_the_mix_is_stated_directly_and_every_figure_is_grounded() -> None:
    question = "What mix of AAPL, MSFT and KO would have had the lowest volatility?"
    answer = answer_question(question, EXTENDED, BENCH, WINDOW, optimization=MIX)
    assert _first_sentence(answer) == (
        "Over 2015-01-05 to 2020-12-31 the long-only mix with the lowest volatility would "
        "have been KO 61.2%, MSFT 27.9% and AAPL 10.9%: expected annualised volatility "
        "15.3%, expected return +14.8%, expected Sharpe ratio 0.97."
    )
    check = Checker(_mix_sources(question))
    assert check.check(answer).clean
    # A swapped or wrong weight is flagged, against the symbol it is written next to.
    wrong = answer.replace("KO 61.2%, MSFT 27.9%", "KO 27.9%, MSFT 61.2%")
    assert [u.text for u in check.check(wrong).unverified] == ["27.9%", "61.2%"]
    for text, flagged in (
        ("Put 61.2% in KO, 27.9% in MSFT and 10.9% in AAPL.", []),
        ("Put 61% in KO, 28% in MSFT and 11% in AAPL.", []),
        ("Put 60% in KO, 28% in MSFT and 11% in AAPL.", ["60%"]),
        ("The mix's expected volatility is 15.27%, its expected return 14.81%.", []),
        ("The mix's expected volatility is 14.3%.", ["14.3%"]),
        ("Its expected Sharpe ratio would be 1.12.", ["1.12"]),
    ):
        assert [u.text for u in check.check(text).unverified] == flagged, text


def test_a_mix_that_could_not_be_computed_is_said_so() -> None:
    question = "how should I split between these to minimise CVaR?"
    answer = answer_question(question, EXTENDED, BENCH, WINDOW)
    assert _first_sentence(answer) == (
        "The long-only mix with the smallest 95% CVaR (daily) could not be computed for these "
        "symbols over this window (the warnings say why)."
    )
