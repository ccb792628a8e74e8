"""The Analyze flow: metrics -> memory context -> LLM narrative -> memory store.

Domain code: the memory service and the LLM gateway are reached through the two small
ports below (`ConversationMemory`, `Completer`), implemented over gRPC in
`downstream.py`. The LLM only writes prose around numbers computed here: the prompt hands
it the metric values and tells it to use those and no others.

Degradation, never darkness:
- the gateway fails in a way a retry now would not fix (unavailable, no provider,
  budget or rate limit, its share of the deadline spent, anything else but a bad model
  name): the narrative is `rules_commentary` of the same metrics, source RULES, and
  `warnings` says why;
- memory cannot build the context: the LLM gets the metrics and the question only;
- memory cannot store the exchange: the answer is still returned, with a warning.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from libs.common.context import remaining_time
from libs.common.errors import Violations
from libs.common.tracing import current_trace_id, tracer
from services.analytics.commentary import rules_commentary
from services.analytics.market import DateWindow, MarketAnalytics, MetricParams, MetricsResult
from services.analytics.metrics import SymbolMetrics
from services.analytics.telemetry import COMMENTARY

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

Role = Literal["system", "user", "assistant"]
ID_RE: Final = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
MAX_QUESTION_BYTES: Final = 4096
MAX_MODEL_CHARS: Final = 128

SYSTEM_PROMPT: Final = (
    "You are a financial analyst assistant inside Finsight. Answer the user's question "
    "about the securities listed in the METRICS message. Use only the numbers given there: "
    "do not invent, estimate or recompute figures, and do not use outside knowledge of "
    "prices or events. Quote numbers as given (percentages with their sign). If the "
    "metrics do not answer the question, say so plainly. Be concise (at most about 250 "
    "words) and do not give personalised investment advice."
)


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    # What the gateway billed for the call, in nano-units of `currency`.
    cost_nanos: int = 0
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    model: str
    usage: Usage


class DownstreamFailed(Exception):
    """A downstream call failed in a way Analyze degrades around; `reason` is for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConversationMemory(Protocol):
    async def build_context(
        self,
        session_id: str,
        user_id: str,
        query: str,
        system_preamble: str,
        token_budget: int,
        timeout: float | None,
    ) -> list[ChatTurn]:
        """Preamble, recalled facts, recent turns and the query as the last user message."""
        ...

    async def append_exchange(
        self,
        session_id: str,
        user_id: str,
        turns: list[ChatTurn],
        client_ids: list[str],
        metadata: dict[str, str],
        timeout: float | None,
    ) -> None: ...


class Completer(Protocol):
    async def complete(
        self, messages: list[ChatTurn], model: str, max_tokens: int, timeout: float | None
    ) -> Completion: ...


@dataclass(frozen=True, slots=True)
class AnalyzeInput:
    tenant: str
    session_id: str
    user_id: str
    symbols: list[str]
    question: str
    benchmark: str
    window: DateWindow
    params: MetricParams
    model: str


@dataclass(frozen=True, slots=True)
class AnalyzeOutcome:
    metrics: MetricsResult
    narrative: str
    source: Literal["llm", "rules"]
    model: str
    usage: Usage | None
    trace_id: str
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AnalyzeSettings:
    context_token_budget: int = 4096
    max_answer_tokens: int = 800
    llm_timeout_s: float = 30.0
    # Share of the caller's remaining deadline the gateway may use; the rest is kept for
    # the rule-based fallback and for storing the exchange.
    llm_deadline_share: float = 0.7
    memory_timeout_s: float = 3.0


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x * 100:+.2f}%"


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def metrics_block(result: MetricsResult) -> str:
    """The numbers the LLM may use, one compact line group per symbol."""
    c = result.conventions
    lines = [
        "METRICS (computed by Finsight; the only numbers you may use).",
        f"Conventions: simple daily returns of adjusted close, {c.periods_per_year:g} periods "
        f"per year, sample std (ddof={c.ddof}), annual risk-free rate "
        f"{c.risk_free_annual * 100:.2f}%; VaR/CVaR are historical daily returns "
        "(negative = loss).",
    ]
    for m in result.metrics:
        lines.append(_symbol_lines(m))
    return "\n".join(lines)


def _symbol_lines(m: SymbolMetrics) -> str:
    dd = m.drawdown
    parts = [
        f"- {m.symbol}: {m.start_date} to {m.end_date} ({m.n_returns} daily returns)",
        f"total return {_pct(m.total_return)}, CAGR {_pct(m.cagr)}, "
        f"annualised volatility {_pct(m.volatility)}",
        f"Sharpe {_num(m.sharpe)}, Sortino {_num(m.sortino)}, Calmar {_num(m.calmar)}",
        f"max drawdown {_pct(dd.max_drawdown)}"
        + (
            f" (peak {dd.peak_date}, trough {dd.trough_date}, "
            + (f"recovered {dd.recovery_date})" if dd.recovery_date else "not recovered)")
            if dd.peak_date
            else ""
        ),
        f"VaR95 {_pct(m.var_95)}, CVaR95 {_pct(m.cvar_95)}, VaR99 {_pct(m.var_99)}, "
        f"CVaR99 {_pct(m.cvar_99)}",
        f"skew {_num(m.skew)}, excess kurtosis {_num(m.kurtosis)}, "
        f"best day {_pct(m.best.value)} ({m.best.date}), worst day {_pct(m.worst.value)} "
        f"({m.worst.date}), positive days {_pct(m.positive_share)}",
    ]
    if m.relative is not None:
        r = m.relative
        parts.append(
            f"vs {r.benchmark}: beta {_num(r.beta)}, alpha (annual) {_pct(r.alpha)}, "
            f"tracking error {_pct(r.tracking_error)}, information ratio "
            f"{_num(r.information_ratio)}"
        )
    return "; ".join(parts)


def _share(seconds: float, share: float = 1.0) -> float:
    remaining = remaining_time()
    if remaining is None:
        return seconds
    return max(0.0, min(seconds, remaining * share))


class Analyzer:
    def __init__(
        self,
        market: MarketAnalytics,
        memory: ConversationMemory,
        completer: Completer,
        settings: AnalyzeSettings | None = None,
    ) -> None:
        self.market = market
        self.memory = memory
        self.completer = completer
        self.settings = settings or AnalyzeSettings()

    @staticmethod
    def check_request(
        v: Violations, session_id: str, user_id: str, question: str, model: str
    ) -> None:
        for name, value in (("session_id", session_id), ("user_id", user_id)):
            v.check(bool(ID_RE.fullmatch(value)), name, "1-128 characters of [A-Za-z0-9._:@-]")
        size = len(question.encode("utf-8"))
        v.check(
            0 < size <= MAX_QUESTION_BYTES and bool(question.strip()),
            "question",
            f"1 to {MAX_QUESTION_BYTES} bytes of text, got {size}",
        )
        v.check("\x00" not in question, "question", "must not contain NUL characters")
        v.check(len(model) <= MAX_MODEL_CHARS, "model", f"at most {MAX_MODEL_CHARS} characters")

    async def analyze(self, request: AnalyzeInput) -> AnalyzeOutcome:
        trace_id = current_trace_id()
        warnings: list[str] = []
        result = await self.market.compute_metrics(
            await self.market.view(request.tenant),
            request.symbols,
            request.window,
            request.benchmark,
            request.params,
        )
        block = metrics_block(result)
        context = await self._context(request, warnings)
        messages = _prompt(context, block, request.question)
        narrative, source, model, usage = await self._narrative(request, result, messages, warnings)
        await self._store(request, narrative, source, trace_id, warnings)
        COMMENTARY.labels(source, "ok" if source == "llm" else _reason_label(warnings)).inc()
        return AnalyzeOutcome(result, narrative, source, model, usage, trace_id, warnings)

    async def _context(self, request: AnalyzeInput, warnings: list[str]) -> list[ChatTurn] | None:
        with _tracer.start_as_current_span("analytics.analyze.build_context"):
            try:
                return await self.memory.build_context(
                    request.session_id,
                    request.user_id,
                    request.question,
                    SYSTEM_PROMPT,
                    self.settings.context_token_budget,
                    _share(self.settings.memory_timeout_s, 0.2),
                )
            except DownstreamFailed as exc:
                warnings.append(f"memory_context_unavailable: {exc.reason}")
                log.warning("memory context unavailable", extra={"reason": exc.reason})
                return None

    async def _narrative(
        self,
        request: AnalyzeInput,
        result: MetricsResult,
        messages: list[ChatTurn],
        warnings: list[str],
    ) -> tuple[str, Literal["llm", "rules"], str, Usage | None]:
        with _tracer.start_as_current_span("analytics.analyze.complete") as span:
            timeout = _share(self.settings.llm_timeout_s, self.settings.llm_deadline_share)
            try:
                if timeout <= 0.05:
                    raise DownstreamFailed("no time left in the caller's deadline")
                answer = await self.completer.complete(
                    messages, request.model, self.settings.max_answer_tokens, timeout
                )
                if not answer.content.strip():
                    raise DownstreamFailed("the model returned an empty answer")
            except DownstreamFailed as exc:
                warnings.append(f"llm_unavailable: {exc.reason}")
                span.set_attribute("analytics.commentary_source", "rules")
                log.warning("llm unavailable; rule-based commentary", extra={"reason": exc.reason})
                by_symbol = {m.symbol: m for m in result.metrics}
                text = rules_commentary(by_symbol, request.benchmark or None)
                return text, "rules", "", None
            span.set_attribute("analytics.commentary_source", "llm")
            return answer.content.strip(), "llm", answer.model, answer.usage

    async def _store(
        self,
        request: AnalyzeInput,
        narrative: str,
        source: str,
        trace_id: str,
        warnings: list[str],
    ) -> None:
        exchange = trace_id or uuid.uuid4().hex
        with _tracer.start_as_current_span("analytics.analyze.append_messages"):
            try:
                await self.memory.append_exchange(
                    request.session_id,
                    request.user_id,
                    [ChatTurn("user", request.question), ChatTurn("assistant", narrative)],
                    [f"analyze:{exchange}:q", f"analyze:{exchange}:a"],
                    {
                        "source": "analytics.Analyze",
                        "commentary_source": source,
                        "symbols": ",".join(request.symbols)[:512],
                    },
                    _share(self.settings.memory_timeout_s),
                )
            except DownstreamFailed as exc:
                warnings.append(f"memory_store_failed: {exc.reason}")
                log.warning("memory store failed", extra={"reason": exc.reason})


def _prompt(context: list[ChatTurn] | None, block: str, question: str) -> list[ChatTurn]:
    """Context from memory (or just the question), with the metrics right before the question."""
    metrics = ChatTurn("system", block)
    if not context:
        return [ChatTurn("system", SYSTEM_PROMPT), metrics, ChatTurn("user", question)]
    if context[-1].role == "user":
        return [*context[:-1], metrics, context[-1]]
    return [*context, metrics, ChatTurn("user", question)]


def _reason_label(warnings: list[str]) -> str:
    for w in warnings:
        if w.startswith("llm_unavailable"):
            return "llm_unavailable"
    return "other"
