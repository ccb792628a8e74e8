"""The personal-data detector's precision and recall, and placeholder restoration (also
across arbitrary stream chunkings)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.llm_gateway.pii import (
    ACCOUNT,
    CARD,
    EMAIL,
    IBAN,
    PHONE,
    SSN,
    PiiDetector,
    Redactor,
    effective_policy,
)

DETECTOR = PiiDetector(phone_region="US")

# (kind, value as usually written); each is embedded in a sentence and must be found whole.
IDENTIFIERS: list[tuple[str, str]] = [
    (EMAIL, "jane.doe@example.com"),
    (EMAIL, "j.smith+invest@bank.co.uk"),
    (EMAIL, "ANALYST_01@Finsight.io"),
    (EMAIL, "ops-team@mail.example-bank.de"),
    (PHONE, "+1 212-555-0123"),
    (PHONE, "+1 (415) 555-2671"),
    (PHONE, "+44 20 7946 0958"),
    (PHONE, "+49 30 901820"),
    (PHONE, "+33 1 42 68 53 00"),
    (PHONE, "+81 3-1234-5678"),
    (PHONE, "+41 44 668 18 00"),
    (PHONE, "(212) 555-0123"),
    (PHONE, "212-555-0123"),
    (PHONE, "212.555.0123"),
    (PHONE, "415 555 2671"),
    (IBAN, "DE89 3704 0044 0532 0130 00"),
    (IBAN, "DE89370400440532013000"),
    (IBAN, "GB29 NWBK 6016 1331 9268 19"),
    (IBAN, "GB29NWBK60161331926819"),
    (IBAN, "FR14 2004 1010 0505 0001 3M02 606"),
    (IBAN, "NL91ABNA0417164300"),
    (IBAN, "ES91-2100-0418-4502-0005-1332"),
    (IBAN, "CH93 0076 2011 6238 5295 7"),
    (IBAN, "IT60 X054 2811 1010 0000 0123 456"),
    (IBAN, "BE71 0961 2345 6769"),
    (CARD, "4111 1111 1111 1111"),
    (CARD, "4111-1111-1111-1111"),
    (CARD, "4111111111111111"),
    (CARD, "5555 5555 5555 4444"),
    (CARD, "5105105105105100"),
    (CARD, "2223 0031 2200 3222"),
    (CARD, "3782 822463 10005"),
    (CARD, "371449635398431"),
    (CARD, "6011 1111 1111 1117"),
    (CARD, "3530 1113 3330 0000"),
    (CARD, "4222222222222"),
    (CARD, "6011 0009 9013 9424"),
    (SSN, "536-22-1234"),
    (SSN, "123-45-6789"),
    (ACCOUNT, "12345678"),
    (ACCOUNT, "0012-3456-78"),
    (ACCOUNT, "021000021"),
    (ACCOUNT, "000123456789"),
    (ACCOUNT, "98765432"),
    (ACCOUNT, "12-34-56"),
    (ACCOUNT, "4455667788"),
]
# Context words the kinds without a fixed shape need (the others need none).
CONTEXT = {
    ACCOUNT: [
        "Please wire it to account {}.",
        "Our acct no. {} at the branch.",
        "The routing number {} belongs to the bank.",
        "Account #: {} (checking)",
        "Credit a/c {} today",
        "sort code {} and the rest",
        "my account number is {}, thanks",
    ],
}
SSN_IN_CONTEXT = [
    ("SSN 536221234 on file", "536221234"),
    ("social security number: 536 22 1234.", "536 22 1234"),
    ("ssn: 078051121 for the form", "078051121"),
]
PHONE_WORD = [("call 2125550123 tomorrow", "2125550123"), ("tel: 4155552671", "4155552671")]

BENIGN = [
    "Revenue rose 34.1% to $1,234,567 in 2024.",
    "Apple bought back 1,234,567 shares on 2024-01-15.",
    "EPS of $3.45 vs 3.12 expected; guidance for 2025 at 12-15%.",
    "The 10-year yield hit 4.56% on 12/31/2023.",
    "Q3 2023 revenue: 89,498 million USD, up 1.2% year over year.",
    "The fund holds 4111 bonds and 1111 stocks.",
    "ISIN US0378331005 and CUSIP 037833100 identify the stock.",
    "Net income was 2125550123 dollars over the decade.",
    "Price target 415 USD, 555 units, 2671 orders.",
    "The company accounted for 12345678 in receivables.",
    "Trading volume reached 12345678901234 shares.",
    "Bond matures 2031-06-15; coupon 5.125%.",
    "Market cap 2.95 trillion, P/E 28.4, dividend yield 0.52%.",
    "Invoice 2024-0001-2345 was paid on 2024-03-01.",
    "The call option at strike 150 expires 2025-03-21.",
    "European notation: 1 234 567,89 EUR of assets.",
    "Population 331 449 281 in the last census.",
    "Phone sales rose 12 percent to 123456 units.",
    "Revenue for 2019 2020 2021 2022 grew steadily.",
    "The index closed at 4,783.45, up 0.8%.",
    "Fed funds target 5.25-5.50% since July 2023.",
    "Timestamp 1700000000 marks the close.",
    "CIK 0000320193 files the 10-K.",
    "Order 123456789 shipped on 2024-02-02.",
    "Account balance was $1,234,567.89 at year end.",
    "Accounts payable of 4,567,890 rose 3%.",
    "The account grew 12% in 2024.",
    "Routing of 2024 orders moved to the new desk.",
    "Basis points: 25 bps hike, then 50 bps.",
    "From 1990 to 2024 the CAGR was 7.2%.",
    "The trade settled at 12/31/2024 13:45:00 UTC.",
    "HK$ 12 345 678 in the quarter.",
    "The ratio improved from 3:2 to 5:4.",
    "Version 1.2.3 of the model, release 2024.06.",
    "Shares outstanding: 15,441,880,000.",
    "EBITDA margin 28.6%, net debt/EBITDA 1.9x.",
    "The portfolio lost 4111.11 USD, about 1111.11 EUR.",
    "Goldman raised its target to 4,500 from 4,200.",
    "ZIP code 10001 and suite 2300.",
    "Dates 2024-01-01, 2024-04-01, 2024-07-01, 2024-10-01.",
    "Volume 5 555 555 555 555 traded (thousands separated by spaces).",
    "Deal value 1 500 000 000 EUR.",
    "Price 19.99 at 2024-11-29 09:30.",
    "Reference 4111-1111 and batch 2024-77.",
    "Case number 2024-CV-001234 was filed.",
    "The fiscal year 2023/2024 closed in June.",
    "Email volumes rose 12% in 2023 (a metric, not an address).",
    "The SEC filed 8-K on 2024-05-06 about 10,000,000 notes.",
]


def embed(kind: str, value: str, index: int) -> list[str]:
    if kind in CONTEXT:
        return [template.format(value) for template in CONTEXT[kind]][index % 7 : index % 7 + 1]
    return [f"Please note {value} for the file.", f"{value}", f"(see: {value})"]


@pytest.mark.parametrize(("kind", "value"), IDENTIFIERS)
def test_every_identifier_in_its_usual_form_is_found_whole(kind: str, value: str) -> None:
    for text in embed(kind, value, IDENTIFIERS.index((kind, value))):
        found = DETECTOR.find(text)
        assert [(f.kind, f.value) for f in found] == [(kind, value)], text


@pytest.mark.parametrize(("text", "value"), [*SSN_IN_CONTEXT, *PHONE_WORD])
def test_bare_numbers_are_found_next_to_their_context_word(text: str, value: str) -> None:
    assert [f.value for f in DETECTOR.find(text)] == [value]


def test_benign_finance_sentences_have_no_detections() -> None:
    flagged = {text: DETECTOR.find(text) for text in BENIGN}
    assert {t: f for t, f in flagged.items() if f} == {}
    assert len(BENIGN) >= 45 and len(IDENTIFIERS) >= 45


@pytest.mark.parametrize(
    "text",
    [
        "IBAN DE89 3704 0044 0532 0130 01",  # mod-97 fails
        "IBAN GB29 NWBK 6016 1331 9268 18",
        "NL91ABNA0417164301",
        "card 4111 1111 1111 1112",  # Luhn fails
        "card 5555-5555-5555-4445",
        "371449635398432",
        "SSN 000-12-3456",  # area 000 is never issued
        "SSN 666-12-3456",
        "SSN 900-12-3456",
        "SSN 536-00-1234",
        "SSN 078-05-1120",  # the published Woolworth wallet example
    ],
)
def test_invalid_checksums_and_unissued_numbers_are_not_found(text: str) -> None:
    assert DETECTOR.find(text) == []


def test_overlaps_resolve_to_the_longest_most_specific_match() -> None:
    text = "Pay DE89 3704 0044 0532 0130 00 or call +44 20 7946 0958, account 12345678."
    assert [f.kind for f in DETECTOR.find(text)] == [IBAN, PHONE, ACCOUNT]
    # A card after an account word is a card, not an account number (same span, more specific).
    assert [f.kind for f in DETECTOR.find("account 4111111111111111")] == [CARD]
    # Deterministic whatever the order the kinds are found in.
    assert DETECTOR.find(text) == DETECTOR.find(text)


def test_the_default_region_reads_national_phone_numbers() -> None:
    assert [f.kind for f in PiiDetector(phone_region="GB").find("ring 020 7946 0958")] == [PHONE]
    assert PiiDetector(phone_region="US").find("ring 020 7946 0958") == []
    with pytest.raises(ValueError, match="unknown phone region"):
        PiiDetector(phone_region="XX")


def test_same_value_same_placeholder_and_restored_as_first_written() -> None:
    r = Redactor(DETECTOR)
    text = (
        "From jane@x.com to JANE@x.com: IBAN DE89 3704 0044 0532 0130 00, "
        "again DE89370400440532013000, and bob@y.org."
    )
    redacted = r.redact(text)
    assert redacted == (
        "From [EMAIL_1] to [EMAIL_1]: IBAN [IBAN_1], again [IBAN_1], and [EMAIL_2]."
    )
    assert r.summary() == {"EMAIL": 3, "IBAN": 2}
    assert r.restore("Sent [IBAN_1] to [EMAIL_2] ([EMAIL_9] unknown)") == (
        "Sent DE89 3704 0044 0532 0130 00 to bob@y.org ([EMAIL_9] unknown)"
    )


def test_placeholders_already_in_the_prompt_are_never_issued() -> None:
    r = Redactor(DETECTOR)
    prompt = "Template says [EMAIL_1]; the real one is ann@z.com"
    r.reserve([prompt])
    assert r.redact(prompt) == "Template says [EMAIL_1]; the real one is [EMAIL_2]"
    assert r.restore("[EMAIL_1] vs [EMAIL_2]") == "[EMAIL_1] vs ann@z.com"


def test_policy_by_route_then_by_provider() -> None:
    assert effective_policy(None, "redact", external=True) == "redact"
    assert effective_policy(None, "block", external=False) == "allow"
    assert effective_policy("block", "redact", external=False) == "block"
    assert effective_policy("allow", "block", external=True) == "allow"


# -- streaming restoration -----------------------------------------------------------------
_VALUES = ["ann@z.com", "DE89 3704 0044 0532 0130 00", "+44 20 7946 0958", "536-22-1234"]
_STREAM_REDACTOR = Redactor(DETECTOR)
_PLACEHOLDERS = [_STREAM_REDACTOR.redact(v) for v in _VALUES]
_PIECES = [*_PLACEHOLDERS, "[", "]", "[EMAIL_", "[IBAN_1", "[EMAIL_12]", " ", "text", "_1]", "ü"]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(_PIECES) | st.text(max_size=6), max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
def test_stream_restoration_equals_whole_restoration_for_any_chunking(
    pieces: list[str], cuts: list[int]
) -> None:
    text = "".join(pieces)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    restorer = _STREAM_REDACTOR.restorer()
    out = [restorer.feed(chunk) for chunk in chunks]
    out.append(restorer.flush())
    assert "".join(out) == _STREAM_REDACTOR.restore(text)


def test_a_placeholder_split_in_one_character_chunks_is_restored_once_complete() -> None:
    restorer = _STREAM_REDACTOR.restorer()
    emitted = [restorer.feed(c) for c in "IBAN: [IBAN_1]!"]
    assert emitted[:6] == list("IBAN: ")
    assert emitted[6:13] == [""] * 7  # "[IBAN_1" could still become the placeholder
    assert emitted[13] == _VALUES[1] and emitted[14] == "!"
    assert restorer.flush() == ""
    # A prefix that turns out not to be one is released as soon as it cannot be.
    assert [restorer.feed(c) for c in "[IBX"] == ["", "", "", "[IBX"]
    assert restorer.feed("[EMAIL_") == "" and restorer.flush() == "[EMAIL_"


def test_a_prompt_stuffed_with_numbers_is_screened_quickly_and_still_redacted() -> None:
    import time

    lines = [f"Client {i}: call +44 20 7946 {i % 10000:04d}, account {i:08d}" for i in range(6000)]
    text = "\n".join(lines)
    started = time.perf_counter()
    found = DETECTOR.find(text)
    assert time.perf_counter() - started < 5  # libphonenumber alone would take ~1 s per 5000
    assert [f.kind for f in found] == [PHONE, ACCOUNT] * 6000
    r = Redactor(DETECTOR)
    assert r.restore(r.redact(text)) == text
