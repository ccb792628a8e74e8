"""The period a question asks about ("in 2020", "since 2015", "over the last 3 years").

Pure domain code: the standard library only, no clock.  :func:`resolve_period` finds the
period words in a question and turns them into a :class:`Period` (inclusive calendar
dates, either end open).  Relative periods are anchored at ``anchor``, the last date with
data for the requested symbols, never at today's date, so the same question over the same
data always gives the same window.

Rules
-----
* A calendar unit (a year, a quarter "Q1 2020" / "first quarter of 2020", a half
  "H2 2019" / "second half of 2019", a month "March 2020", an ISO day "2020-03-01", a
  decade "the 2010s") runs from its first to its last calendar day: "in 2020", "during
  2008", "2020 only" and a bare "2020" all mean 2020-01-01 to 2020-12-31.
* Ranges include both ends: "from 2010 to 2015" and "2010-2015" are 2010-01-01 to
  2015-12-31; "between March and June 2021" is 2021-03-01 to 2021-06-30.
* "since / from / starting X" opens at the first day of X, "after X" the day after X;
  "until / through / up to X" closes at the last day of X (X included), "before / prior
  to X" the day before X (X excluded).  The other end stays open (``None``).
* "last / past / previous / trailing N days|weeks|months|quarters|years|decades" is the
  N units *to the anchor*: start = anchor minus N units (same day of the month, clamped
  to the month's end), end = anchor.  Without N it is one unit, so **"last year" means
  the 12 months to the anchor, not the previous calendar year** (and "last month" the
  month to the anchor); "last calendar year" / "previous calendar year" is the calendar
  year before the anchor's year.  "Last decade" is the 10 years to the anchor.
* "YTD" / "year to date" / "this year" run from 1 January of the anchor's year to the
  anchor; likewise "this quarter" / "QTD" and "this month" / "MTD".
* "N trading days" is not resolved (the trading calendar is not known here): ``None``.
* Years must lie in 1900-2100 and a range must not end before it starts; otherwise the
  question's period is rejected (``None``), never silently replaced by another one.
* Numbers that are not periods are left alone: percentages ("a 20% drop"), counts ("top
  5 days", "2000 shares"), decimals ("beta above 1.2") and money ("$2000").
* When a question holds several period phrases the longest one wins (it is the most
  specific: "since 2015" over "2015"), the earliest on a tie.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

MIN_YEAR: Final = 1900
MAX_YEAR: Final = 2100
# Where period words are does not depend on the anchor; any date in range will do.
_SPAN_ANCHOR: Final = date(2000, 1, 3)


@dataclass(frozen=True, slots=True)
class Period:
    """An inclusive calendar window; ``None`` leaves that end open."""

    start: date | None
    end: date | None
    label: str  # for people: "2020", "the 3 years to 2022-12-30", "since 2015"
    span: tuple[int, int]  # [start, end) offsets of the period words in the question


class _Invalid(ValueError):
    """Period words that name an impossible period (bad year, end before start)."""


@dataclass(frozen=True, slots=True)
class _Unit:
    first: date
    last: date
    label: str
    is_day: bool = False


_MONTHS: Final = {
    name: number
    for number in range(1, 13)
    for name in {calendar.month_name[number].lower(), calendar.month_abbr[number].lower()}
} | {"sept": 9}
_ORDINALS: Final = {
    "first": 1,
    "1st": 1,
    "second": 2,
    "2nd": 2,
    "third": 3,
    "3rd": 3,
    "fourth": 4,
    "4th": 4,
    "last": 4,
}
_NUMBER_WORDS: Final = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "a": 1,
    "one-year": 1,
}

_MONTH_RE: Final = (
    r"(?:january|february|march|april|may|june|july|august|september|october|november|"
    r"december|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\.?"
)
_YEAR: Final = r"[0-9]{4}"
# A calendar unit.  Alternatives are tried in order, so longer forms come first.
_UNIT_RE: Final = (
    r"(?:"
    rf"{_YEAR}[-/][0-9]{{1,2}}[-/][0-9]{{1,2}}"  # ISO day
    rf"|{_MONTH_RE}\s+[0-9]{{1,2}}(?:st|nd|rd|th)?,?\s+{_YEAR}"  # March 15, 2020
    rf"|[0-9]{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH_RE},?\s+{_YEAR}"  # 15 March 2020
    rf"|{_MONTH_RE},?\s+(?:of\s+)?{_YEAR}"  # March 2020
    rf"|(?:the\s+)?(?:first|second|third|fourth|last|1st|2nd|3rd|4th)\s+quarter\s+(?:of\s+)?{_YEAR}"
    rf"|(?:q[1-4]|[1-4]q)[\s-]*{_YEAR}|{_YEAR}[\s-]*q[1-4]"
    rf"|(?:the\s+)?(?:first|second|1st|2nd)\s+half\s+(?:of\s+)?{_YEAR}"
    rf"|(?:h[12]|[12]h)[\s-]*{_YEAR}|{_YEAR}[\s-]*h[12]"
    rf"|{_YEAR}"
    r")"
)
# Calendar units without their year, for ranges sharing one ("March to June 2021").
_BARE_PART_RE: Final = rf"(?:{_MONTH_RE}|q[1-4])"

# Boundaries: not inside a word, a number, a decimal, money or a percentage.
_B: Final = r"(?<![\w$.,])"
_E: Final = r"(?![\w%]|[.,][0-9])"
_TO: Final = "(?:to|through|thru|until|till|til|-|\u2013|\u2014)"  # hyphen, en and em dash
_FLAGS: Final = re.IGNORECASE | re.ASCII


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, _FLAGS)


_RANGE: Final = _compile(
    rf"{_B}(?:(?:from|since|starting(?:\s+(?:in|from))?)\s+)?(?:the\s+)?(?P<a>{_UNIT_RE})"
    rf"\s*{_TO}\s*(?:the\s+)?(?P<b>{_UNIT_RE}){_E}"
)
_BETWEEN: Final = _compile(
    rf"{_B}between\s+(?:the\s+)?(?P<a>{_UNIT_RE})\s+and\s+(?:the\s+)?(?P<b>{_UNIT_RE}){_E}"
)
_SHARED_YEAR: Final = _compile(
    rf"{_B}(?:(?P<between>between)\s+|from\s+)?(?P<a>{_BARE_PART_RE})"
    rf"\s*(?P<sep>and|{_TO})\s*(?P<b>{_BARE_PART_RE}),?\s+(?:of\s+)?(?P<y>{_YEAR}){_E}"
)
_OPEN_START: Final = _compile(
    rf"{_B}(?P<word>since|from|starting(?:\s+(?:in|from))?|beginning(?:\s+in)?|as\s+of|"
    rf"after|post-?)\s*(?:the\s+(?:start|end)\s+of\s+)?(?:the\s+)?(?P<a>{_UNIT_RE}){_E}"
    r"(?:\s+(?:onwards?|on))?"
)
_OPEN_END: Final = _compile(
    rf"{_B}(?P<word>before|prior\s+to|pre-?|until|till|til|through|thru|up\s+(?:un)?to|"
    rf"up\s+till|ending(?:\s+in)?|by)\s*(?:the\s+end\s+of\s+)?(?:the\s+)?(?P<a>{_UNIT_RE}){_E}"
)
_WITHIN: Final = _compile(
    rf"{_B}(?:(?P<word>in|during|for|over|throughout|within|across|of)\s+)?"
    rf"(?:the\s+(?:year|month)\s+(?:of\s+)?|the\s+)?(?P<a>{_UNIT_RE}){_E}"
    r"(?:\s+(?:only|alone))?"
)
_DECADE: Final = _compile(
    rf"{_B}(?:(?:in|during|over|throughout|across)\s+)?(?:the\s+)?(?P<y>[0-9]{{3}}0)'?s{_E}"
)
_RELATIVE: Final = _compile(
    rf"{_B}(?:(?:over|in|during|for|within|across|of)\s+)?(?:the\s+)?"
    r"(?:last|past|previous|prior|trailing|recent|most\s+recent)\s+"
    r"(?:(?P<n>[0-9]{1,6}|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"fifteen|twenty|thirty)(?:\s*-\s*|\s*))?"
    r"(?P<unit>calendar\s+year|trading\s+days?|sessions?|days?|weeks?|wks?|months?|mos?|"
    r"quarters?|qtrs?|years?|yrs?|decades?|y|m|d|w)(?![\w%])"
)
_TTM: Final = _compile(r"\b(?:ttm|trailing\s+twelve\s+months)\b")
_TO_DATE: Final = _compile(
    r"\b(?:(?P<ytd>ytd|year[\s-]+to[\s-]+date|(?:so\s+far\s+)?this\s+year(?:\s+so\s+far)?)"
    r"|(?P<qtd>qtd|quarter[\s-]+to[\s-]+date|this\s+quarter)"
    r"|(?P<mtd>mtd|month[\s-]+to[\s-]+date|this\s+month))\b"
)


# -- calendar units --------------------------------------------------------------------


def _year(text: str) -> int:
    year = int(text)
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise _Invalid(f"year {year} outside {MIN_YEAR}-{MAX_YEAR}")
    return year


def _month_end(year: int, month: int) -> date:
    return date(year, month, calendar.monthrange(year, month)[1])


def _month(year: int, month: int) -> _Unit:
    return _Unit(
        date(year, month, 1), _month_end(year, month), f"{calendar.month_name[month]} {year}"
    )


def _quarter(year: int, q: int) -> _Unit:
    return _Unit(date(year, 3 * q - 2, 1), _month_end(year, 3 * q), f"Q{q} {year}")


def _half(year: int, h: int) -> _Unit:
    return _Unit(date(year, 6 * h - 5, 1), _month_end(year, 6 * h), f"H{h} {year}")


def _whole_year(year: int) -> _Unit:
    return _Unit(date(year, 1, 1), date(year, 12, 31), str(year))


def _day(year: int, month: int, day: int) -> _Unit:
    try:
        d = date(year, month, day)
    except ValueError as exc:
        raise _Invalid(str(exc)) from exc
    return _Unit(d, d, d.isoformat(), is_day=True)


def _month_number(word: str) -> int:
    return _MONTHS[word.lower().rstrip(".")]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def _parse_unit(text: str) -> _Unit:
    """A calendar unit from text that `_UNIT_RE` matched."""
    iso = re.fullmatch(r"([0-9]{4})[-/]([0-9]{1,2})[-/]([0-9]{1,2})", text)
    if iso:
        return _day(_year(iso[1]), int(iso[2]), int(iso[3]))
    words = _words(text)
    numbers = [w for w in words if w.isdigit()]
    year = _year(next(w for w in numbers if len(w) == 4))
    lowered = text.lower()
    month = next((_month_number(w) for w in words if w in _MONTHS), None)
    if month is not None:
        day = next((w for w in numbers if len(w) <= 2), None)
        return _month(year, month) if day is None else _day(year, month, int(day))
    if "quarter" in words or re.search(r"q[1-4]|[1-4]q", lowered):
        q = _ORDINALS.get(words[0] if words[0] != "the" else words[1])
        found = re.search(r"q([1-4])|([1-4])q", lowered)
        return _quarter(year, q if q is not None else int(next(g for g in found.groups() if g)))  # type: ignore[union-attr]
    if "half" in words or re.search(r"h[12]|[12]h", lowered):
        h = _ORDINALS.get(words[0] if words[0] != "the" else words[1])
        found = re.search(r"h([12])|([12])h", lowered)
        return _half(year, h if h is not None else int(next(g for g in found.groups() if g)))  # type: ignore[union-attr]
    return _whole_year(year)


def _bare_part(text: str, year: int) -> _Unit:
    lowered = text.lower().rstrip(".")
    if lowered in _MONTHS:
        return _month(year, _MONTHS[lowered])
    return _quarter(year, int(lowered[1]))


# -- date arithmetic for relative periods ----------------------------------------------


def _minus_months(anchor: date, months: int) -> date:
    index = anchor.year * 12 + anchor.month - 1 - months
    year, month = divmod(index, 12)
    month += 1
    if not 1 <= year <= 9999:
        raise _Invalid("relative period reaches outside the calendar")
    return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))


def _minus_days(anchor: date, days: int) -> date:
    try:
        return anchor - timedelta(days=days)
    except OverflowError as exc:
        raise _Invalid("relative period reaches outside the calendar") from exc


def _plural(n: int, unit: str) -> str:
    return f"the {unit} to" if n == 1 else f"the {n} {unit}s to"


# -- candidates ------------------------------------------------------------------------


class _Skip(Exception):
    """The match is not a period after all (a count such as "2000 shares")."""


_COUNT_AFTER: Final = _compile(
    r"\s*(?:%|percent|pct|bps|basis|points?|pts|shares?|dollars?|usd|eur|times|trading|"
    r"days?|sessions?|rows?|observations?|symbols?|stocks?|tickers?|x\b|k\b|m\b|bn\b)"
)
_COUNT_BEFORE: Final = _compile(
    r"(?:top|bottom|above|below|under|than|around|about|near|at|hit|reached|of|worst|best)"
    r"\s+$"
)


def _reject_counts(question: str, m: re.Match[str], unit_group: str, bare: bool) -> None:
    """Skip a lone four-digit number that reads as a count or a level, not a year."""
    if not re.fullmatch(r"[0-9]{4}", m[unit_group].strip()):
        return
    if _COUNT_AFTER.match(question, m.end(unit_group)):
        raise _Skip
    if bare and _COUNT_BEFORE.search(question, 0, m.start(unit_group)):
        raise _Skip


def _range_period(a: _Unit, b: _Unit, span: tuple[int, int], label: str | None = None) -> Period:
    if b.last < a.first:
        raise _Invalid(f"{b.label} is before {a.label}")
    return Period(a.first, b.last, label or f"{a.label} to {b.label}", span)


def _from_range(question: str, m: re.Match[str], anchor: date) -> Period:
    _reject_counts(question, m, "b", bare=False)
    return _range_period(_parse_unit(m["a"]), _parse_unit(m["b"]), m.span())


def _from_shared_year(question: str, m: re.Match[str], anchor: date) -> Period:
    if m["sep"].lower() == "and" and not m["between"]:
        raise _Invalid("'X and Y <year>' without 'between' is two periods, not a range")
    year = _year(m["y"])
    a, b = _bare_part(m["a"], year), _bare_part(m["b"], year)
    first = a.label.rsplit(" ", 1)[0]
    return _range_period(a, b, m.span(), f"{first} to {b.label}")


def _from_open_start(question: str, m: re.Match[str], anchor: date) -> Period:
    _reject_counts(question, m, "a", bare=False)
    unit = _parse_unit(m["a"])
    word = m["word"].lower()
    if word.startswith(("after", "post")):
        return Period(unit.last + timedelta(days=1), None, f"after {unit.label}", m.span())
    return Period(unit.first, None, f"since {unit.label}", m.span())


def _from_open_end(question: str, m: re.Match[str], anchor: date) -> Period:
    _reject_counts(question, m, "a", bare=False)
    unit = _parse_unit(m["a"])
    word = m["word"].lower()
    if word.startswith(("before", "prior", "pre")):
        return Period(None, unit.first - timedelta(days=1), f"before {unit.label}", m.span())
    return Period(None, unit.last, f"through {unit.label}", m.span())


def _from_within(question: str, m: re.Match[str], anchor: date) -> Period:
    _reject_counts(question, m, "a", bare=m["word"] is None)
    unit = _parse_unit(m["a"])
    if unit.is_day:
        raise _Invalid("a single day is not a period")
    return Period(unit.first, unit.last, unit.label, m.span())


def _from_decade(question: str, m: re.Match[str], anchor: date) -> Period:
    start = _year(m["y"])
    return Period(date(start, 1, 1), date(start + 9, 12, 31), f"the {start}s", m.span())


def _from_relative(question: str, m: re.Match[str], anchor: date) -> Period:
    unit = m["unit"].lower()
    raw = m["n"]
    if raw is None and (len(unit) == 1 or unit.startswith("day")):
        raise _Skip  # "the last day", "last m": not a trailing period
    n = 1 if raw is None else (int(raw) if raw.isdigit() else _NUMBER_WORDS[raw.lower()])
    if n < 1:
        raise _Invalid("a period of no length")
    to = anchor.isoformat()
    if unit.startswith(("trading", "session")):
        raise _Invalid("trading-day counts need the trading calendar")
    if unit.startswith("calendar"):
        if raw is not None:
            raise _Invalid("'last N calendar year' is not supported")
        year = anchor.year - 1
        return Period(date(year, 1, 1), date(year, 12, 31), str(year), m.span())
    if unit.startswith("dec"):
        start, label = _minus_months(anchor, 120 * n), _plural(10 * n, "year")
    elif unit.startswith("d"):
        start, label = _minus_days(anchor, n), _plural(n, "day")
    elif unit.startswith("w"):
        start, label = _minus_days(anchor, 7 * n), _plural(n, "week")
    elif unit.startswith("mo") or unit == "m":
        start, label = _minus_months(anchor, n), _plural(n, "month")
    elif unit.startswith("q"):
        start, label = _minus_months(anchor, 3 * n), _plural(3 * n, "month")
    else:
        start = _minus_months(anchor, 12 * n)
        label = "the 12 months to" if n == 1 else _plural(n, "year")
    return Period(start, anchor, f"{label} {to}", m.span())


def _from_ttm(question: str, m: re.Match[str], anchor: date) -> Period:
    return Period(_minus_months(anchor, 12), anchor, f"the 12 months to {anchor}", m.span())


def _from_to_date(question: str, m: re.Match[str], anchor: date) -> Period:
    if m["ytd"]:
        start, label = date(anchor.year, 1, 1), f"year to date ({anchor.year})"
    elif m["qtd"]:
        q = (anchor.month - 1) // 3 + 1
        start, label = date(anchor.year, 3 * q - 2, 1), f"quarter to date (Q{q} {anchor.year})"
    else:
        start = date(anchor.year, anchor.month, 1)
        label = f"month to date ({calendar.month_name[anchor.month]} {anchor.year})"
    return Period(start, anchor, label, m.span())


_BUILDERS: Final[
    tuple[tuple[re.Pattern[str], Callable[[str, re.Match[str], date], Period]], ...]
] = (
    (_RANGE, _from_range),
    (_BETWEEN, _from_range),
    (_SHARED_YEAR, _from_shared_year),
    (_OPEN_START, _from_open_start),
    (_OPEN_END, _from_open_end),
    (_WITHIN, _from_within),
    (_DECADE, _from_decade),
    (_RELATIVE, _from_relative),
    (_TTM, _from_ttm),
    (_TO_DATE, _from_to_date),
)


def _candidates(question: str, anchor: date) -> Iterator[tuple[tuple[int, int], Period | None]]:
    """Every period phrase found: its span and its period (None: an impossible period)."""
    for pattern, build in _BUILDERS:
        for m in pattern.finditer(question):
            try:
                yield m.span(), build(question, m, anchor)
            except _Skip:
                continue
            except (_Invalid, ValueError, OverflowError):
                yield m.span(), None


def _valid(period: Period) -> bool:
    if period.start is not None and period.end is not None and period.end < period.start:
        return False
    bounds = [d for d in (period.start, period.end) if d is not None]
    return all(MIN_YEAR <= d.year <= MAX_YEAR for d in bounds)


def period_spans(question: str) -> list[tuple[int, int]]:
    """Where the question has period words, possible or not ("last 30 trading days" too)."""
    return sorted({span for span, _ in _candidates(question, _SPAN_ANCHOR)})


def resolve_period(question: str, anchor: date) -> Period | None:
    """The period the question asks about, or None when it names none (or an impossible one).

    ``anchor`` is the last date with data; relative periods ("last 3 years", "YTD") end
    there.  See the module docstring for the rules.
    """
    found = list(_candidates(question, anchor))
    if not found:
        return None
    _, period = min(found, key=lambda c: (c[0][0] - c[0][1], c[0][0]))
    return period if period is not None and _valid(period) else None
