"""Personal data in prompts: detection, per-request placeholders, and their restoration.

What is detected (kinds are also the placeholder and metric vocabulary):
  EMAIL    addresses (local@domain.tld);
  PHONE    numbers libphonenumber finds valid: international (+CC …) anywhere; national ones
           of the default region when written as a phone (spaces, dashes, dots, brackets),
           or as a bare digit run only next to a phone word (tel, phone, call, mobile, fax);
  IBAN     with or without spaces/dashes, country format and mod-97 checked (python-stdnum);
  CARD     payment card numbers of 13-19 digits, unbroken or grouped as cards are printed
           (4-4-4-4…, 4-6-5), in an issuer range, Luhn checked;
  SSN      US social security numbers written 123-45-6789 (stdnum.us.ssn rules: no 000/666/9xx
           area, no 00 group, no 0000 serial, no published example), or as 9 digits next to
           "SSN"/"social security";
  ACCOUNT  digit runs (6-34 digits, spaces/dashes allowed) right after an account word:
           account, acct, a/c, routing, ABA, sort code (optionally "no.", "number", "#", ":").
Plain numbers of financial text (prices, percentages, 1,234,567 shares, years, dates) match
none of these. Overlaps resolve deterministically: the longest match wins, then the most
specific kind (checksummed kinds first), then the earliest.

A `Redactor` holds one request's mapping: every distinct value (compared in a canonical form,
so `DE89 3704…` and `DE893704…` are one value) gets one placeholder such as `[EMAIL_1]`; the
answer's placeholders are restored to the value as first written. Bracketed upper-case tags
are what models copy verbatim most reliably, and their closing bracket makes the set of
placeholders prefix-free, which lets `StreamRestorer` hold back only what could still become
one.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

PiiPolicy = Literal["allow", "redact", "block"]
POLICIES: tuple[PiiPolicy, ...] = ("allow", "redact", "block")

EMAIL, PHONE, IBAN, CARD, SSN, ACCOUNT = "EMAIL", "PHONE", "IBAN", "CARD", "SSN", "ACCOUNT"
KINDS = (EMAIL, PHONE, IBAN, CARD, SSN, ACCOUNT)
# Tie-break for overlapping matches of equal length: checksummed kinds are the surest.
_SPECIFICITY = {IBAN: 0, CARD: 1, SSN: 2, EMAIL: 3, PHONE: 4, ACCOUNT: 5}

DEFAULT_PHONE_REGION = "US"

_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# Groups of characters separated by one space or dash; candidates are then narrowed to the
# groups that validate, so a neighbouring word or number is never swallowed.
_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{1,4}){3,9}(?![A-Za-z0-9])")
_DIGIT_GROUPS_RE = re.compile(r"(?<![\w.,-])\d+(?:[ -]\d+)*(?![\w]|[.,]\d)")
_SSN_RE = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_SSN_CONTEXT_RE = re.compile(
    r"(?i)\b(?:ssn|social\s+security(?:\s+(?:no|number|#))?)\b\.?\s*(?:is\s+|:\s*|#\s*)?"
    r"(\d{3}[ -]?\d{2}[ -]?\d{4})(?![\w-])"
)
_ACCOUNT_CONTEXT_RE = re.compile(
    r"(?i)\b(?:bank\s+account|account|acct|a/c|routing|aba|sort\s+code)\b\.?"
    r"(?:\s*(?:no\b\.?|nr\b\.?|num\b\.?|number\b|is\b|#|:))*\s*"
    r"(\d(?:[ -]?\d){5,33})(?![\w]|[.,]\d)"
)
_PHONE_WORD_RE = re.compile(r"(?i)\b(?:tel|telephone|phone|call|mobile|cell|fax|whatsapp)\b")
_PHONE_WORD_WINDOW = 24  # characters before a bare number that may hold a phone word
_PHONE_CANDIDATE_RE = re.compile(r"[+(]?\d[\d ().\-/\u00a0]{5,40}\d")
_PHONE_MARGIN = 3
_PHONE_VALIDATION_BUDGET = 2000  # libphonenumber calls per text
_PHONE_SHAPE_RE = re.compile(r"\+\d[\d ().\-]{5,20}\d|\(?\d{3}\)?[ .\-]\d{3}[ .\-]\d{4}")
_PHONE_FORMATTING = re.compile(r"\d[ .\-)]+\d|\(\d")
_PLACEHOLDER_RE = re.compile(r"\[(?:EMAIL|PHONE|IBAN|CARD|SSN|ACCOUNT)_\d+\]")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    value: str  # as written in the text

    @property
    def canonical(self) -> str:
        """The value compared for "same value, same placeholder"."""
        if self.kind == EMAIL:
            return self.value.lower()
        return re.sub(r"[^0-9A-Za-z+]", "", self.value).upper()


class PiiDetector:
    """Finds personal and financial identifiers in text (pure, thread-safe)."""

    def __init__(self, *, phone_region: str = DEFAULT_PHONE_REGION) -> None:
        if phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {phone_region!r}")
        self.phone_region = phone_region

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order."""
        if not _could_hold_pii(text):
            return []
        # Digits inside anything shaped like an IBAN (valid or not) are its BBAN, never a
        # card or phone number of their own.
        iban_shaped = _Spans()
        for m in _IBAN_RE.finditer(text):
            iban_shaped.add(m.start(), m.end())
        loose = [
            f for f in (*_cards(text), *self._phones(text)) if iban_shaped.is_free(f.start, f.end)
        ]
        candidates = [*_emails(text), *_ibans(text), *_ssns(text), *_accounts(text), *loose]
        return _resolve_overlaps(candidates)

    def _phones(self, text: str) -> Iterator[Finding]:
        # libphonenumber's matcher is pure Python and slow on long text: it only reads the
        # stretches that could hold a number (7+ digits in phone punctuation), with a little
        # context either side for its own boundary checks.
        validated = 0
        for candidate in _PHONE_CANDIDATE_RE.finditer(text):
            if sum(c.isdigit() for c in candidate.group()) < 7:
                continue
            validated += 1
            if validated > _PHONE_VALIDATION_BUDGET:
                # ~0.2 ms each: past the budget (a prompt stuffed with numbers), the cheap
                # shape rule decides, erring towards redacting.
                yield from _phone_shapes(candidate)
                continue
            offset = max(0, candidate.start() - _PHONE_MARGIN)
            window = text[offset : candidate.end() + _PHONE_MARGIN]
            for match in PhoneNumberMatcher(window, self.phone_region, leniency=Leniency.VALID):
                start, raw = offset + match.start, match.raw_string
                if sum(c.isdigit() for c in raw) < 7:
                    continue
                international = raw.startswith("+") or raw.startswith("00")
                written_as_phone = _PHONE_FORMATTING.search(raw) is not None
                if international or written_as_phone or _phone_word_before(text, start):
                    yield Finding(PHONE, start, start + len(raw), raw)


def _phone_shapes(candidate: re.Match[str]) -> Iterator[Finding]:
    for m in _PHONE_SHAPE_RE.finditer(candidate.group()):
        if 7 <= sum(c.isdigit() for c in m.group()) <= 15:
            start = candidate.start() + m.start()
            yield Finding(PHONE, start, start + len(m.group()), m.group())


def _could_hold_pii(text: str) -> bool:
    return "@" in text or any(c.isdigit() for c in text)


def _emails(text: str) -> Iterator[Finding]:
    if "@" not in text:
        return
    for m in _EMAIL_RE.finditer(text):
        yield Finding(EMAIL, m.start(), m.end(), m.group())


def _ibans(text: str) -> Iterator[Finding]:
    for m in _IBAN_RE.finditer(text):
        # Longest prefix of the groups that is a valid IBAN (a trailing word may have joined).
        for end in _group_ends(m.group()):
            candidate = m.group()[:end]
            if stdnum_iban.is_valid(candidate):
                yield Finding(IBAN, m.start(), m.start() + end, candidate)
                break


def _group_ends(s: str) -> list[int]:
    """End offsets of separator-delimited prefixes of s, longest first."""
    ends = [i for i, c in enumerate(s) if c in " -"]
    return [len(s), *reversed(ends)]


def _cards(text: str) -> Iterator[Finding]:
    for m in _DIGIT_GROUPS_RE.finditer(text):
        groups = re.split(r"[ -]", m.group())
        offsets = _group_offsets(m.group(), groups)
        # A run may join a card to neighbouring numbers ("in 2024 4111 1111 …"): try every
        # contiguous slice of groups, longest first.
        found = _best_card(groups, offsets)
        if found is not None:
            start, end = found
            yield Finding(CARD, m.start() + start, m.start() + end, m.group()[start:end])


def _group_offsets(s: str, groups: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for g in groups:
        out.append((pos, pos + len(g)))
        pos += len(g) + 1
    return out


def _best_card(groups: list[str], offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    n = len(groups)
    slices = sorted(
        ((i, j) for i in range(n) for j in range(i + 1, min(n, i + 6) + 1)),
        key=lambda ij: (-(offsets[ij[1] - 1][1] - offsets[ij[0]][0]), ij[0]),
    )
    for i, j in slices:
        part = groups[i:j]
        digits = "".join(part)
        if _card_shaped(part, digits):
            return offsets[i][0], offsets[j - 1][1]
    return None


def _card_shaped(groups: list[str], digits: str) -> bool:
    if not 13 <= len(digits) <= 19 or not _issuer_prefix(digits):
        return False
    sizes = [len(g) for g in groups]
    printed = (
        len(sizes) == 1
        or (all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4)
        or sizes in ([4, 6, 5], [4, 6, 4])
    )
    return printed and luhn.is_valid(digits)


def _issuer_prefix(digits: str) -> bool:
    """An issuer range in use: Visa 4; Mastercard 51-55 and 2221-2720; Amex 34, 37; JCB 35;
    Diners 30, 36, 38, 39; Maestro 50, 56-58; Discover, UnionPay, RuPay and others 6.
    (Rules out runs of years such as 2019 2020 2021 2022.)"""
    two, four = int(digits[:2]), int(digits[:4])
    return (
        digits[0] in "46"
        or 50 <= two <= 58
        or 2221 <= four <= 2720
        or two in (30, 34, 35, 36, 37, 38, 39)
    )


def _ssns(text: str) -> Iterator[Finding]:
    for m in _SSN_RE.finditer(text):
        if stdnum_ssn.is_valid(m.group()):
            yield Finding(SSN, m.start(), m.end(), m.group())
    for m in _SSN_CONTEXT_RE.finditer(text):
        if stdnum_ssn.is_valid(re.sub(r"[ -]", "", m.group(1))):
            yield Finding(SSN, m.start(1), m.end(1), m.group(1))


def _accounts(text: str) -> Iterator[Finding]:
    for m in _ACCOUNT_CONTEXT_RE.finditer(text):
        yield Finding(ACCOUNT, m.start(1), m.end(1), m.group(1))


def _phone_word_before(text: str, start: int) -> bool:
    return _PHONE_WORD_RE.search(text, max(0, start - _PHONE_WORD_WINDOW), start) is not None


def _resolve_overlaps(candidates: Iterable[Finding]) -> list[Finding]:
    ranked = sorted(
        set(candidates), key=lambda f: (-(f.end - f.start), _SPECIFICITY[f.kind], f.start)
    )
    taken = _Spans()
    kept: list[Finding] = []
    for f in ranked:
        if taken.is_free(f.start, f.end):
            taken.add(f.start, f.end)
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


class _Spans:
    """Non-overlapping [start, end) spans, sorted; overlap checks in O(log n) (a prompt may
    hold thousands of findings)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def is_free(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] > start:
            return False
        return i == len(self.starts) or self.starts[i] >= end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


# -- one request's placeholders --------------------------------------------------------------
class Redactor:
    """Replaces a request's identifiers with placeholders and puts them back in answers."""

    def __init__(self, detector: PiiDetector) -> None:
        self.detector = detector
        self.counts: Counter[str] = Counter()
        self._by_value: dict[tuple[str, str], str] = {}
        self._originals: dict[str, str] = {}
        self._numbers: Counter[str] = Counter()
        self._taken: set[str] = set()
        self._prefixes: set[str] | None = None  # proper prefixes of issued placeholders

    def reserve(self, texts: Iterable[str]) -> None:
        """Never issue a placeholder that already appears literally in the request."""
        for text in texts:
            if "[" in text:
                self._taken.update(_PLACEHOLDER_RE.findall(text))

    def redact(self, text: str) -> str:
        findings = self.detector.find(text)
        if not findings:
            return text
        parts: list[str] = []
        pos = 0
        for f in findings:
            parts += [text[pos : f.start], self._placeholder(f)]
            pos = f.end
            self.counts[f.kind] += 1
        parts.append(text[pos:])
        return "".join(parts)

    def _placeholder(self, f: Finding) -> str:
        key = (f.kind, f.canonical)
        found = self._by_value.get(key)
        if found is not None:
            return found
        while True:
            self._numbers[f.kind] += 1
            placeholder = f"[{f.kind}_{self._numbers[f.kind]}]"
            if placeholder not in self._taken:
                break
        self._by_value[key] = placeholder
        self._originals[placeholder] = f.value
        self._prefixes = None
        return placeholder

    @property
    def found(self) -> bool:
        return bool(self._originals)

    @property
    def kinds(self) -> list[str]:
        return sorted(self.counts)

    def summary(self) -> dict[str, int]:
        """Kind → occurrences replaced, sorted by kind (never the values)."""
        return {kind: self.counts[kind] for kind in sorted(self.counts)}

    def restore(self, text: str) -> str:
        """Issued placeholders replaced by their values; any other text (placeholder-like
        or not) left as it is."""
        if not self._originals or "[" not in text:
            return text
        originals = self._originals
        return _PLACEHOLDER_RE.sub(lambda m: originals.get(m.group(), m.group()), text)

    def restorer(self) -> StreamRestorer:
        return StreamRestorer(self)

    def is_partial(self, tail: str) -> bool:
        """True when tail is a proper prefix of an issued placeholder."""
        if self._prefixes is None:
            self._prefixes = {p[:i] for p in self._originals for i in range(1, len(p))}
        return tail in self._prefixes


class StreamRestorer:
    """Restores placeholders in a stream of chunks split anywhere: a trailing piece that may
    still become a placeholder is held back until it completes or cannot; `flush` at the end."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._pending = ""
        self._longest = max((len(p) for p in redactor._originals), default=0)

    def feed(self, chunk: str) -> str:
        text = self._pending + chunk
        if not self._longest:
            return text
        hold = len(text)
        for i in range(max(0, len(text) - self._longest + 1), len(text)):
            if text[i] == "[" and self.redactor.is_partial(text[i:]):
                hold = i
                break
        self._pending = text[hold:]
        return self.redactor.restore(text[:hold])

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return self.redactor.restore(rest)


def effective_policy(
    route_policy: PiiPolicy | None, default_policy: PiiPolicy, *, external: bool
) -> PiiPolicy:
    """A route's own policy wins; otherwise external providers get the default policy and
    providers inside the deployment get `allow`."""
    if route_policy is not None:
        return route_policy
    return default_policy if external else "allow"
