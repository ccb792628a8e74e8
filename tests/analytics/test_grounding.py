"""Numeric grounding: figures of answers checked against the computed metrics."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.analytics.commentary import rules_commentary
from services.analytics.grounding import (
    UNVERIFIED_MARK,
    Checker,
    Citation,
    SchemaError,
    Sources,
    annotate,
    extract,
    parse_structured,
)
from tests.analytics.grounding_cases import BENCHMARK, CORPUS, METRICS, QUESTION, cases


def checker(question: str = QUESTION) -> Checker:
    return Checker(
        Sources.from_metrics(
            list(METRICS.values()), question=question, periods_per_year=252, risk_free=0.02
        )
    )


def test_corpus_correct_answers_are_never_flagged_and_wrong_figures_always_are() -> None:
    check = checker()
    corpus = cases()
    assert len(corpus) >= 100
    ok = [c for c in corpus if c.label == "ok"]
    bad = [c for c in corpus if c.label == "bad"]
    false_flags, missed, right_flagged, checked = [], [], 0, 0
    for case in corpus:
        report = check.check(case.text)
        checked += report.figures_checked
        flagged = {(u.start, u.end) for u in report.unverified}
        wanted = set(case.wrong)
        false_flags += [(case.line, case.text[s:e]) for s, e in flagged - wanted]
        missed += [(case.line, case.text[s:e]) for s, e in wanted - flagged]
        right_flagged += len(wanted & flagged)
    wrong_total = sum(len(c.wrong) for c in bad)
    print(
        f"\ngrounding corpus: {len(ok)} correct answers, {len(bad)} with wrong figures; "
        f"{checked} figures checked; false flags {len(false_flags)}; "
        f"wrong figures flagged {right_flagged}/{wrong_total}"
    )
    assert not false_flags, false_flags
    assert not missed, missed


@pytest.mark.parametrize(
    "text",
    ["34.1%", "34%", "34.08%", "-34.08%", "\u221234.1%", "0.34", "-0.341", "34 percent"],
)
def test_the_roundings_a_writer_uses_match(text: str) -> None:
    m = METRICS["AAPL"]
    dd = replace(m.drawdown, max_drawdown=-0.34082)
    sources = Sources.from_metrics([replace(m, drawdown=dd)])
    report = Checker(sources).check(f"AAPL's maximum drawdown was {text}.")
    assert report.figures_checked == 1 and report.clean, report


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("The total return was -30.0%.", False),
        ("It fell 30% over the window.", False),
        ("It was down 30.0%.", False),
        ("It lost 30%.", False),
        ("It rose 30%.", True),
        ("It gained 30.0% in total.", True),
        ("The total return was +30%.", True),
        ("The total return was 30%.", True),  # a signed measure, written unsigned: positive
    ],
)
def test_words_carry_signs(text: str, flagged: bool) -> None:
    m = replace(METRICS["XOM"], total_return=-0.30, cagr=-0.07)
    report = Checker(Sources.from_metrics([m])).check(text)
    assert report.figures_checked == 1
    assert (not report.clean) == flagged, report


def test_a_figure_about_a_named_metric_must_match_that_metric() -> None:
    m = replace(METRICS["AAPL"], cagr=0.206, volatility=0.31)
    check = Checker(Sources.from_metrics([m]))
    assert check.check("Its CAGR was 20.6%.").clean
    report = check.check("Its volatility was 20.6%.")
    assert [u.text for u in report.unverified] == ["20.6%"]
    assert "volatility" in report.unverified[0].reason
    assert check.check("It compounded 20.6% a year with 31% volatility.").clean
    assert check.check("A figure tied to nothing: 20.6%.").clean  # any computed value


def test_dates_and_years_must_come_from_the_metrics_or_the_window() -> None:
    check = checker()
    aapl = METRICS["AAPL"]
    assert aapl.drawdown.trough_date is not None
    trough = aapl.drawdown.trough_date
    assert check.check(f"The trough came on {trough.isoformat()}.").clean
    assert check.check(f"The trough came on {trough:%B} {trough.day}, {trough.year}.").clean
    assert check.check("Over 2019 and 2020 the stock rallied.").clean  # inside the window
    assert not check.check("Back in 2008 it crashed.").clean  # outside it
    assert not check.check("The trough came on 2020-03-23.").clean


def test_numbers_of_the_question_and_conventions_are_grounded() -> None:
    check = checker("If I had put $10,000 into AAPL, how would 3 years have gone?")
    report = check.check(
        "A $10,000 position over 3 years is not something I can value: over 1,259 daily "
        "returns with 252 periods a year and a 2% risk-free rate, the 95% VaR is what I have."
    )
    assert report.clean, report


def test_the_rule_based_commentary_is_fully_grounded() -> None:
    text = rules_commentary(METRICS, BENCHMARK)
    report = checker().check(text)
    assert report.figures_checked > 40
    assert report.clean, report.unverified


def test_cited_figures_are_checked_against_exactly_the_cited_metric() -> None:
    aapl, msft = METRICS["AAPL"], METRICS["MSFT"]
    answer = f"Volatility was {aapl.volatility * 100:.1f}% and {msft.volatility * 100:.1f}%."
    check = checker()
    right = [
        Citation(f"{aapl.volatility * 100:.1f}%", "AAPL", "volatility"),
        Citation(f"{msft.volatility * 100:.1f}%", "msft", "volatility"),
    ]
    assert check.check(answer, right).clean
    swapped = [Citation(right[0].text, "MSFT", "volatility"), right[1]]
    report = check.check(answer, swapped)
    assert [u.text for u in report.unverified] == [right[0].text]
    unknown = check.check(answer, [Citation(right[0].text, "AAPL", "vibes")])
    assert "unknown metric" in unknown.unverified[0].reason


def test_structured_answers_are_parsed_and_schema_failures_explained() -> None:
    good = parse_structured(
        '```json\n{"answer": "Up 3.1%.", "figures": '
        '[{"text": "3.1%", "symbol": "AAPL", "metric": "total_return"}]}\n```'
    )
    assert good.answer == "Up 3.1%." and good.citations[0].metric == "total_return"
    assert parse_structured('{"answer": "No figures."}').citations == ()
    for bad, why in [
        ("Up 3.1%.", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"answer": ""}', '"answer"'),
        ('{"answer": "x", "figures": {}}', '"figures" must be a list'),
        ('{"answer": "x", "figures": [{"text": "1"}]}', '"figures"[0]'),
    ]:
        with pytest.raises(SchemaError, match=re.escape(why)):
            parse_structured(bad)


def test_annotate_marks_each_unverified_figure_and_moves_the_offsets() -> None:
    check = checker()
    text = "AAPL returned +184.2% with volatility 91.0% and a drawdown of 2.5%."
    marked, report = annotate(text, check.check(text))
    assert len(report.unverified) == 3
    assert marked.count(UNVERIFIED_MARK) == 3
    for u in report.unverified:
        assert marked[u.start : u.end] == u.text
        assert marked[u.end :].startswith(UNVERIFIED_MARK)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_extraction_never_fails_and_spans_are_the_text(text: str) -> None:
    for f in extract(text):
        assert text[f.start : f.end] == f.text
    marked, report = annotate(text, checker().check(text))
    for u in report.unverified:
        assert marked[u.start : u.end] == u.text


def test_extract_reads_kinds() -> None:
    kinds = [
        (f.kind, f.text)
        for f in extract("On 2020-03-23, March 2020 and in 2021 it fell 3.5 pp, $1,200, 1.25x, 12%")
    ]
    assert kinds == [
        ("date", "2020-03-23"),
        ("month", "March 2020"),
        ("year", "2021"),
        ("points", "3.5 pp"),
        ("money", "$1,200"),
        ("number", "1.25x"),
        ("percent", "12%"),
    ]
    assert date(2020, 3, 23).toordinal() == extract("2020-03-23")[0].value


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# Corpora written by helpers who had not seen the checker or the corpus above. Measured
# blind, before the checker learnt from them: heldout 2 of 191 correct figures falsely
# flagged, 34/45 wrong ones flagged; heldout2 5 of 226 falsely flagged, 39/45 flagged. The
# checker was then improved on what they showed (tables, possessive tickers, "no recovery
# by", figures named after them, decimals for returns), so they are regression sets now.
# (file, most false flags, least share of wrong figures flagged)
HELD_OUT = [("grounding_heldout.tsv", 0, 0.9), ("grounding_heldout2.tsv", 0, 0.85)]


@pytest.mark.parametrize(("name", "max_false", "min_flagged"), HELD_OUT)
def test_held_out_corpora(name: str, max_false: int, min_flagged: float) -> None:
    corpus = cases(corpus=CORPUS.parent / name)
    check = checker()
    false_flags, flagged, wrong = [], 0, 0
    for case in corpus:
        report = check.check(case.text)
        spans = [(u.start, u.end) for u in report.unverified]
        false_flags += [
            (case.line, case.text[s:e])
            for s, e in spans
            if not any(_overlaps((s, e), w) for w in case.wrong)
        ]
        flagged += sum(any(_overlaps(w, s) for s in spans) for w in case.wrong)
        wrong += len(case.wrong)
    print(
        f"\n{name}: {len(corpus)} answers, {wrong} wrong figures: flagged {flagged}/{wrong} "
        f"({flagged / wrong:.0%}), false flags {len(false_flags)} {false_flags}"
    )
    assert len(false_flags) <= max_false, false_flags
    assert flagged / wrong >= min_flagged


# -- the extended metric set (issue 16) ------------------------------------------------------


def _extended_sources() -> Sources:
    from services.analytics.metrics import PeriodReturn

    m = METRICS["AAPL"]
    assert m.relative is not None
    rel = replace(m.relative, up_capture=1.0487, down_capture=0.9213, capture_ratio=1.1383,
                  treynor=0.0812)  # fmt: skip
    aapl = replace(
        m, omega=1.1234, tail_ratio=0.9671, stability=0.8846, win_rate=0.54123,
        parametric_cvar_95=-0.03214, cornish_fisher_var_95=-0.02871,
        cornish_fisher_cvar_95=-0.04519, relative=rel,
        best_month=PeriodReturn(0.21437, date(2020, 4, 1), date(2020, 4, 30), 21),
        worst_month=PeriodReturn(-0.18275, date(2020, 3, 1), date(2020, 3, 31), 22),
        best_year=PeriodReturn(0.8897, date(2019, 1, 1), date(2019, 12, 31), 252),
        worst_year=PeriodReturn(-0.2642, date(2022, 1, 1), date(2022, 12, 31), 251),
    )  # fmt: skip
    others = [v for k, v in METRICS.items() if k != "AAPL"]
    return Sources.from_metrics([aapl, *others], periods_per_year=252, risk_free=0.02)


@pytest.mark.parametrize(
    ("text", "wrong"),
    [
        ("AAPL's win rate was 54.1%.", "AAPL's win rate was 58.1%."),
        ("AAPL won on 54% of its trading days (win rate).", "AAPL's hit rate was 61%."),
        ("AAPL had an Omega ratio of 1.12.", "AAPL had an Omega ratio of 1.32."),
        ("Its omega was 1.123.", "Its omega was 1.2."),
        ("The tail ratio was 0.97.", "The tail ratio was 1.07."),
        ("Stability of returns 0.88 for AAPL.", "Stability of returns 0.78 for AAPL."),
        ("AAPL's upside capture was 105%.", "AAPL's upside capture was 115%."),
        ("An up-capture of 1.05 and a downside capture of 92.1%.", "Downside capture 0.82."),
        ("The capture ratio was 1.14.", "The capture ratio was 1.41."),
        ("AAPL's Treynor ratio was 0.08.", "AAPL's Treynor ratio was 0.18."),
        ("A Treynor of 8.1% a year.", "Treynor 0.06."),
        ("The Gaussian CVaR95 was -3.21%.", "The Gaussian CVaR95 was -4.21%."),
        ("Its Cornish-Fisher VaR was -2.9%.", "AAPL's Cornish-Fisher VaR was -3.9%."),
        ("The Cornish-Fisher CVaR was -4.52%.", "The Cornish-Fisher CVaR was -3.21%."),
        ("Its best month was +21.4% (April 2020).", "Its best month was +24.1%."),
        ("The worst month, March 2020, lost 18.3%.", "Its worst month was -13.8%."),
        ("AAPL's best year was +89% (2019).", "AAPL's best year was +98%."),
        ("Its worst calendar year was -26.4%, in 2022.", "Its worst year was -36.4%."),
    ],
)
def test_the_extended_metrics_are_checked_against_that_metric(text: str, wrong: str) -> None:
    check = Checker(_extended_sources())
    report = check.check(text)
    assert report.clean, (text, report.unverified)
    bad = check.check(wrong)
    assert len(bad.unverified) == 1, (wrong, bad)


def test_an_extended_metrics_value_is_not_another_metrics_figure() -> None:
    """A figure tied to a classic metric never matches an extended one (AAPL's win rate,
    54.1%, as its volatility), nor an untied figure in an answer naming none of them."""
    check = Checker(_extended_sources())
    assert not check.check("AAPL's volatility was 54.1%.").clean
    assert not check.check("AAPL moved 21.4% at one point.").clean
    assert check.check("AAPL's best month: 21.4%.").clean
