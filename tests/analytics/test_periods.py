"""The period a question names, anchored at the last date with data (never the clock)."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.analytics.periods import Period, resolve_period

ANCHOR = date(2022, 12, 30)
D = date.fromisoformat
# Words that period phrases are made of, for the property test to combine.
PERIOD_WORDS = [
    "in",
    "since",
    "from",
    "to",
    "until",
    "before",
    "after",
    "between",
    "and",
    "last",
    "past",
    "3",
    "90",
    "years",
    "months",
    "days",
    "Q1",
    "H2",
    "March",
    "June",
    "2020",
    "2015",
    "1850",
    "2021-03-01",
    "-",
    "ytd",
    "this",
    "year",
    "decade",
    "the",
    "%",
    "1.2",
    "of",
    "first",
    "quarter",
    "half",
    "2019-2021",
]


@pytest.mark.parametrize(
    ("question", "start", "end", "label"),
    [
        # calendar units
        ("How did AAPL do in 2020?", "2020-01-01", "2020-12-31", "2020"),
        ("max drawdown during 2008", "2008-01-01", "2008-12-31", "2008"),
        ("And over 2020 only?", "2020-01-01", "2020-12-31", "2020"),
        ("the 2008 crisis", "2008-01-01", "2008-12-31", "2008"),
        ("returns in March 2020", "2020-03-01", "2020-03-31", "March 2020"),
        ("volatility in mar. 2020", "2020-03-01", "2020-03-31", "March 2020"),
        ("Q1 2020 sharpe", "2020-01-01", "2020-03-31", "Q1 2020"),
        ("2020 Q4", "2020-10-01", "2020-12-31", "Q4 2020"),
        ("first quarter of 2020", "2020-01-01", "2020-03-31", "Q1 2020"),
        ("the last quarter of 2020", "2020-10-01", "2020-12-31", "Q4 2020"),
        ("H2 2019", "2019-07-01", "2019-12-31", "H2 2019"),
        ("second half of 2019", "2019-07-01", "2019-12-31", "H2 2019"),
        ("in the 2010s", "2010-01-01", "2019-12-31", "the 2010s"),
        # ranges
        ("from 2010 to 2015", "2010-01-01", "2015-12-31", "2010 to 2015"),
        ("2019-2021", "2019-01-01", "2021-12-31", "2019 to 2021"),
        ("between 2016 and 2019", "2016-01-01", "2019-12-31", "2016 to 2019"),
        ("between March and June 2021", "2021-03-01", "2021-06-30", "March to June 2021"),
        ("from March 2020 to June 2021", "2020-03-01", "2021-06-30", "March 2020 to June 2021"),
        ("Q1-Q3 2020", "2020-01-01", "2020-09-30", "Q1 to Q3 2020"),
        ("2020-03-01 to 2020-06-30", "2020-03-01", "2020-06-30", "2020-03-01 to 2020-06-30"),
        (
            "between 2020-03-01 and 2020-06-30",
            "2020-03-01",
            "2020-06-30",
            "2020-03-01 to 2020-06-30",
        ),
        # open ends
        ("since 2015", "2015-01-01", None, "since 2015"),
        ("since March 2020", "2020-03-01", None, "since March 2020"),
        ("since 2020-03-23", "2020-03-23", None, "since 2020-03-23"),
        ("from 2015 onwards", "2015-01-01", None, "since 2015"),
        ("after 2008", "2009-01-01", None, "after 2008"),
        ("before 2000", None, "1999-12-31", "before 2000"),
        ("pre-2000", None, "1999-12-31", "before 2000"),
        ("until 2010", None, "2010-12-31", "through 2010"),
        ("up to June 2010", None, "2010-06-30", "through June 2010"),
        # relative to the anchor
        ("over the last 3 years", "2019-12-30", "2022-12-30", "the 3 years to 2022-12-30"),
        ("over the last three years", "2019-12-30", "2022-12-30", "the 3 years to 2022-12-30"),
        ("past 6 months", "2022-06-30", "2022-12-30", "the 6 months to 2022-12-30"),
        ("last 90 days", "2022-10-01", "2022-12-30", "the 90 days to 2022-12-30"),
        ("the last 2 weeks", "2022-12-16", "2022-12-30", "the 2 weeks to 2022-12-30"),
        ("last 5y", "2017-12-30", "2022-12-30", "the 5 years to 2022-12-30"),
        ("last year", "2021-12-30", "2022-12-30", "the 12 months to 2022-12-30"),
        ("trailing twelve months", "2021-12-30", "2022-12-30", "the 12 months to 2022-12-30"),
        ("last quarter", "2022-09-30", "2022-12-30", "the 3 months to 2022-12-30"),
        ("last decade", "2012-12-30", "2022-12-30", "the 10 years to 2022-12-30"),
        ("last calendar year", "2021-01-01", "2021-12-31", "2021"),
        ("YTD", "2022-01-01", "2022-12-30", "year to date (2022)"),
        ("year to date", "2022-01-01", "2022-12-30", "year to date (2022)"),
        ("this year", "2022-01-01", "2022-12-30", "year to date (2022)"),
        ("this quarter", "2022-10-01", "2022-12-30", "quarter to date (Q4 2022)"),
        ("month-to-date", "2022-12-01", "2022-12-30", "month to date (December 2022)"),
    ],
)
def test_period_forms(question: str, start: str | None, end: str | None, label: str) -> None:
    period = resolve_period(question, ANCHOR)
    assert period is not None
    assert (period.start, period.end) == (start and D(start), end and D(end))
    assert period.label == label


def test_relative_periods_follow_the_anchor_not_the_clock() -> None:
    period = resolve_period("last 3 years", date(2009, 3, 9))
    assert period == Period(D("2006-03-09"), D("2009-03-09"), "the 3 years to 2009-03-09", (0, 12))
    leap = resolve_period("past 12 months", date(2020, 2, 29))
    assert leap is not None and leap.start == D("2019-02-28")
    assert resolve_period("ytd", date(2008, 10, 15)) == Period(
        D("2008-01-01"), D("2008-10-15"), "year to date (2008)", (0, 3)
    )


def test_span_covers_the_period_words() -> None:
    question = "Which had the deeper drawdown over the last 3 years?"
    period = resolve_period(question, ANCHOR)
    assert period is not None
    assert question[slice(*period.span)] == "over the last 3 years"


@pytest.mark.parametrize(
    "question",
    [
        "which had a 20% drop?",
        "top 5 days for aapl",
        "is beta above 1.2?",
        "a Sharpe above 1.5",
        "lost 2000 points",
        "2000 shares of GE",
        "a 2020% gain",
        "SP500 versus AAPL",
        "an index at 2000",
        "$2020 invested",
        "which fell the most?",
        "the last day",
        "1.2020 is not a year",
        "",
    ],
)
def test_numbers_that_are_not_periods(question: str) -> None:
    assert resolve_period(question, ANCHOR) is None


@pytest.mark.parametrize(
    "question",
    [
        "in 1850",
        "since 2150",
        "from 1850 to 2020",
        "from 2015 to 2010",
        "between June and March 2021",
        "2020-02-30 to 2020-03-30",
        "last 30 trading days",
        "last 99999 years",
    ],
)
def test_impossible_periods_are_rejected(question: str) -> None:
    assert resolve_period(question, ANCHOR) is None


def test_the_longest_period_phrase_wins() -> None:
    period = resolve_period("since 2015, and how about 2019?", ANCHOR)
    assert period is not None and period.label == "since 2015"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=80)
    | st.lists(
        st.sampled_from(PERIOD_WORDS),
        max_size=8,
    ).map(" ".join),
    anchor=st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)),
)
def test_never_raises_and_never_ends_before_it_starts(text: str, anchor: date) -> None:
    period = resolve_period(text, anchor)
    if period is not None:
        if period.start is not None and period.end is not None:
            assert period.start <= period.end
        assert 0 <= period.span[0] < period.span[1] <= len(text)
