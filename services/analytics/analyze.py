"""The Analyze flow: window -> metrics -> memory context -> LLM answer -> grounding -> store.

Domain code: the memory service and the LLM gateway are reached through the two small
ports below (`ConversationMemory`, `Completer`), implemented over gRPC in
`downstream.py`. The LLM only writes prose around numbers computed here: the prompt hands
it the metric values and tells it to use those and no others, and every figure of its
answer is then checked against them (`services.analytics.grounding`).

Steps:
- the window: the request's range, else the period the question names ("in 2020", "over
  the last 3 years"), resolved BEFORE the metrics are computed so everyone (the model, the
  rule-based answer) sees the right numbers;
- the question is screened for instructions (`libs.common.untrusted.screen`) and always
  sent as fenced data, never in the system role;
- the model is asked for the structured answer that cites the metric behind each figure,
  as a JSON Schema the gateway enforces (`json_schema`: validated, one repair round with
  the errors); an answer that still does not match it (SCHEMA_MISMATCH) is replaced by the
  rule-based answer, with a warning;
- grounding, by ANALYTICS_GROUNDING_POLICY: `annotate` marks and lists unverified figures,
  `reject` replaces a model answer that has any with the rule-based answer, `off`.

Degradation, never darkness:
- the gateway fails in a way a retry now would not fix (unavailable, no provider,
  budget or rate limit, its share of the deadline spent, anything else but a bad model
  name): the narrative is the rule-based answer to the question
  (`services.analytics.questions.answer_question`), source RULES, and `warnings` says why;
- memory cannot build the context: the LLM gets the metrics and the question only;
- memory cannot store the exchange: the answer is still returned, with a warning.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Final, Literal, Protocol

from opentelemetry import trace

from libs.common.context import remaining_time
from libs.common.errors import FinsightError, Violations
from libs.common.tracing import current_trace_id, tracer
from libs.common.untrusted import DATA_NOTICE, fence, screen
from services.analytics import grounding
from services.analytics import optimize as opt
from services.analytics.grounding import GroundingPolicy, Report
from services.analytics.market import DateWindow, MarketAnalytics, MetricParams, MetricsResult
from services.analytics.metrics import SymbolMetrics
from services.analytics.periods import resolve_period
from services.analytics.portfolio_optimization import (
    OptimizeInput,
    OptimizeResult,
    check_input,
    optimize_portfolio,
)
from services.analytics.questions import (
    Intent,
    OptimizationObjective,
    OptimizedMix,
    answer_question,
    needs_correlation,
    optimization_objective,
    parse_question,
)
from services.analytics.storage import TenantView
from services.analytics.telemetry import (
    COMMENTARY,
    GROUNDING_FIGURES,
    GROUNDING_OUTCOMES,
    QUESTIONS_FLAGGED,
    STRUCTURED_ANSWERS,
)

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
    "words) and do not give personalised investment advice. Every figure you write is "
    "checked against the metrics. " + DATA_NOTICE
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
    # Personal data the gateway kept from the model: (kind, count), never values.
    redactions: tuple[tuple[str, int], ...] = ()
    # json_schema: the first answer did not match and the gateway's repair round fixed it.
    schema_repaired: bool = False


class DownstreamFailed(Exception):
    """A downstream call failed in a way Analyze degrades around; `reason` is for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaMismatch(DownstreamFailed):
    """The model's answer did not match `json_schema`, even after the gateway's repair."""


@dataclass(frozen=True, slots=True)
class Context:
    """The messages memory built, and the recalled facts it flagged as possible
    instructions (excluded or quoted)."""

    turns: list[ChatTurn]
    flagged_fact_ids: tuple[str, ...] = ()


class ConversationMemory(Protocol):
    async def build_context(
        self,
        session_id: str,
        user_id: str,
        query: str,
        system_preamble: str,
        token_budget: int,
        timeout: float | None,
    ) -> Context:
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
        self,
        messages: list[ChatTurn],
        model: str,
        max_tokens: int,
        timeout: float | None,
        json_schema: str = "",
    ) -> Completion:
        """A completion; with `json_schema` one JSON value valid against it (the gateway
        validates and repairs), else SchemaMismatch."""
        ...


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


Source = Literal["llm", "rules", "rejected"]
Outcome = Literal["verified", "annotated", "rejected", "skipped"]


@dataclass(frozen=True, slots=True)
class GroundingResult:
    policy: GroundingPolicy
    outcome: Outcome
    report: Report
    cited: bool = False


@dataclass(frozen=True, slots=True)
class AnalyzeOutcome:
    metrics: MetricsResult
    narrative: str
    source: Source
    model: str
    usage: Usage | None
    trace_id: str
    grounding: GroundingResult
    window: DateWindow
    window_source: str
    warnings: list[str] = field(default_factory=list)
    question_signals: tuple[str, ...] = ()
    flagged_fact_ids: tuple[str, ...] = ()
    redactions: tuple[tuple[str, int], ...] = ()
    # The optimised mix of a question asking for one (what OptimizePortfolio answers for
    # the same symbols, objective and window); None otherwise or when it failed (a warning).
    optimization: OptimizeResult | None = None


@dataclass(frozen=True, slots=True)
class AnalyzeSettings:
    context_token_budget: int = 4096
    max_answer_tokens: int = 800
    llm_timeout_s: float = 30.0
    # Share of the caller's remaining deadline the gateway may use; the rest is kept for
    # the rule-based fallback and for storing the exchange.
    llm_deadline_share: float = 0.7
    memory_timeout_s: float = 3.0
    grounding_policy: GroundingPolicy = "annotate"
    structured_answers: bool = True


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str
    model: str
    usage: Usage
    citations: tuple[grounding.Citation, ...] = ()
    cited: bool = False
    redactions: tuple[tuple[str, int], ...] = ()


def _structured(answer: Completion) -> _Answer:
    """The structured answer (validated by the gateway); parsed again here, and read as free
    text should it still not be one (a gateway that ignored the schema)."""
    try:
        parsed = grounding.parse_structured(answer.content)
    except grounding.SchemaError:
        STRUCTURED_ANSWERS.labels("free_text").inc()
        text = grounding.answer_text(answer.content)
        return _Answer(text, answer.model, answer.usage, redactions=answer.redactions)
    STRUCTURED_ANSWERS.labels("repaired" if answer.schema_repaired else "valid").inc()
    return _Answer(
        parsed.answer, answer.model, answer.usage, parsed.citations, True, answer.redactions
    )


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x * 100:+.2f}%"


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def metrics_block(
    result: MetricsResult,
    correlations: dict[frozenset[str], float] | None = None,
    window_label: str = "",
) -> str:
    """The numbers the LLM may use, one compact line group per symbol."""
    c = result.conventions
    lines = [
        "METRICS (computed by Finsight; the only numbers you may use).",
        f"Conventions: simple daily returns of adjusted close, {c.periods_per_year:g} periods "
        f"per year, sample std (ddof={c.ddof}), annual risk-free rate "
        f"{c.risk_free_annual * 100:.2f}%; VaR/CVaR are historical daily returns "
        "(negative = loss).",
    ]
    if window_label:
        lines.append(f"Window: {window_label}.")
    for m in result.metrics:
        lines.append(_symbol_lines(m))
    for pair, value in sorted((correlations or {}).items(), key=lambda kv: sorted(kv[0])):
        a, b = sorted(pair)
        lines.append(f"- correlation of daily returns {a}/{b}: {_num(value)}")
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
        f"Omega ratio {_num(m.omega)}, tail ratio {_num(m.tail_ratio)}, stability "
        f"{_num(m.stability)}, win rate {_pct(m.win_rate)}",
        f"Gaussian CVaR95 {_pct(m.parametric_cvar_95)}, Cornish-Fisher VaR95 "
        f"{_pct(m.cornish_fisher_var_95)}, Cornish-Fisher CVaR95 {_pct(m.cornish_fisher_cvar_95)}",
    ]
    periods = [
        f"{label} {_pct(p.value)} ({p.period_start.strftime(fmt)})"
        for label, p, fmt in (
            ("best month", m.best_month, "%B %Y"),
            ("worst month", m.worst_month, "%B %Y"),
            ("best year", m.best_year, "%Y"),
            ("worst year", m.worst_year, "%Y"),
        )
        if p is not None
    ]
    if periods:
        parts.append(", ".join(periods))
    if m.relative is not None:
        r = m.relative
        parts.append(
            f"vs {r.benchmark}: beta {_num(r.beta)}, alpha (annual) {_pct(r.alpha)}, "
            f"tracking error {_pct(r.tracking_error)}, information ratio "
            f"{_num(r.information_ratio)}, upside capture {_num(r.up_capture)}, downside "
            f"capture {_num(r.down_capture)}, capture ratio {_num(r.capture_ratio)}, Treynor "
            f"ratio {_num(r.treynor)}"
        )
    return "; ".join(parts)


_OBJECTIVE_NAMES: Final[dict[OptimizationObjective, str]] = {
    "min_variance": "minimum variance (lowest volatility)",
    "max_sharpe": "maximum Sharpe ratio",
    "min_cvar": "minimum 95% CVaR of daily returns",
}


def optimization_block(
    objective: OptimizationObjective, result: OptimizeResult | None, failure: str = ""
) -> str:
    """The optimised mix the question asks for, as the LLM is given it."""
    head = f"OPTIMISED MIX (asked by the question; objective: {_OBJECTIVE_NAMES[objective]})"
    if result is None:
        return (
            f"{head}: it could not be computed ({failure or 'no result'}). Say so; do not "
            "propose weights of your own."
        )
    sol, spec = result.solution, result.spec
    weights = ", ".join(
        f"{s} {w * 100:.2f}%"
        for s, w in sorted(
            zip(spec.symbols, sol.weights.tolist(), strict=True), key=lambda sw: (-sw[1], sw[0])
        )
    )
    return (
        f"{head}, computed by Finsight's optimiser (long-only, weights sum to 100%), "
        f"estimated from the {result.estimates.returns.shape[0]} daily returns "
        f"{result.estimation_first} to {result.estimation_last} on which every symbol has one "
        f"({opt.describe(spec)}): weights {weights}; expected annualised return "
        f"{_pct(sol.expected_return)}, expected annualised volatility "
        f"{_pct(sol.volatility)}, expected Sharpe ratio {_num(sol.sharpe)}. Write a weight as "
        '"SYMBOL 12.3%" and the mix\'s figures as "expected volatility", "expected return", '
        '"expected Sharpe"; cite weights as metric "weight" of the symbol and the expected '
        f'figures as metric "expected_return"/"expected_volatility"/"expected_sharpe" of '
        f'symbol "{grounding.PORTFOLIO}".'
    )


def optimized_mix(objective: OptimizationObjective, result: OptimizeResult) -> OptimizedMix:
    sol = result.solution
    return OptimizedMix(
        objective,
        tuple(zip(result.spec.symbols, sol.weights.tolist(), strict=True)),
        sol.expected_return,
        sol.volatility,
        sol.sharpe,
        result.estimation_first,
        result.estimation_last,
    )


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
        if not question.strip():
            v.add("question", "must not be empty" + (" (only whitespace)" if question else ""))
        else:
            v.check(
                size <= MAX_QUESTION_BYTES,
                "question",
                f"at most {MAX_QUESTION_BYTES} bytes of text, got {size}",
            )
        v.check("\x00" not in question, "question", "must not contain NUL characters")
        v.check(len(model) <= MAX_MODEL_CHARS, "model", f"at most {MAX_MODEL_CHARS} characters")

    async def analyze(self, request: AnalyzeInput) -> AnalyzeOutcome:
        trace_id = current_trace_id()
        warnings: list[str] = []
        signals = self._screen(request.question, warnings)
        view = await self.market.view(request.tenant)
        window, window_source = await self._window(view, request, warnings)
        result = await self.market.compute_metrics(
            view, request.symbols, window, request.benchmark, request.params
        )
        intent = parse_question(request.question, request.symbols, request.benchmark or None)
        correlations = (
            await self.market.correlations(view, request.symbols, window)
            if needs_correlation(intent)
            else {}
        )
        label = window_label(result, window_source)
        objective = optimization_objective(request.question)
        optimization: OptimizeResult | None = None
        failure = ""
        if objective is not None:
            optimization, failure = await self._optimize(
                view, request, intent, window, objective, warnings
            )
        facts = Facts(result, request, window, correlations, label, objective, optimization)
        block = metrics_block(result, correlations, label)
        if objective is not None:
            block += "\n" + optimization_block(objective, optimization, failure)
        context = await self._context(request, warnings)
        messages = _prompt(context.turns if context else None, block, request.question)
        answer = await self._answer(request, messages, warnings)
        narrative, source, checked = self._ground(facts, answer, warnings)
        await self._store(request, narrative, source, trace_id, warnings)
        COMMENTARY.labels(
            "rules" if source == "rejected" else source,
            "ok" if source == "llm" else _reason_label(warnings),
        ).inc()
        return AnalyzeOutcome(
            result,
            narrative,
            source,
            answer.model if answer else "",
            answer.usage if answer else None,
            trace_id,
            checked,
            window,
            window_source,
            warnings,
            signals,
            context.flagged_fact_ids if context else (),
            answer.redactions if answer else (),
            optimization,
        )

    async def _optimize(
        self,
        view: TenantView,
        request: AnalyzeInput,
        intent: Intent,
        window: DateWindow,
        objective: OptimizationObjective,
        warnings: list[str],
    ) -> tuple[OptimizeResult | None, str]:
        """The long-only mix the question asks for, through the OptimizePortfolio use case
        (same validation, estimation, solver and evaluation); a failure is a warning."""
        others = [s for s in dict.fromkeys(request.symbols) if s != request.benchmark]
        symbols = list(intent.symbols) if len(intent.symbols) >= 2 else others
        inputs = OptimizeInput(
            symbols=tuple(dict.fromkeys(symbols)),
            objective=objective,
            window=window,
            evaluation=None,
        )
        with _tracer.start_as_current_span("analytics.analyze.optimize") as span:
            span.set_attribute("analytics.objective", objective)
            v = Violations()
            spec = check_input(v, inputs, request.params)
            try:
                if spec is None:
                    raise ValueError("; ".join(f"{i.field}: {i.description}" for i in v.items))
                return await optimize_portfolio(self.market, view, inputs, spec, request.params), ""
            except (FinsightError, opt.OptimizationFailed, ValueError) as exc:
                reason = exc.message if isinstance(exc, FinsightError) else str(exc)
        warnings.append(f"optimization_failed: {reason}")
        log.warning("analyze optimisation failed", extra={"reason": reason})
        return None, reason

    def _screen(self, question: str, warnings: list[str]) -> tuple[str, ...]:
        """The question is data whatever it says; a flagged one is said so and counted."""
        screening = screen(question)
        for signal in screening.signals:
            QUESTIONS_FLAGGED.labels(signal).inc()
        if screening.flagged:
            warnings.append(
                "question_flagged: it reads like instructions to the model ("
                + ", ".join(screening.signals)
                + "); it was passed to the model only as data"
            )
            log.warning("question flagged", extra={"signals": list(screening.signals)})
        return screening.signals

    async def _window(
        self, view: TenantView, request: AnalyzeInput, warnings: list[str]
    ) -> tuple[DateWindow, str]:
        """The request's range, else the period the question names, else all data."""
        asked = request.window.start is not None or request.window.end is not None
        # Whether the question names a period does not depend on the anchor; its dates do
        # (relative periods end on the last day with data), so the anchor is read only then.
        period = resolve_period(request.question, date.today())
        if asked:
            if period is not None:
                warnings.append(
                    f"question_period_ignored: the question names {period.label}; "
                    "the request's range was used"
                )
            return request.window, "the request's range"
        if period is None:
            return request.window, "all data"
        anchor = await self.market.data_end(view, request.symbols)
        period = resolve_period(request.question, anchor) if anchor else None
        if period is None:
            return request.window, "all data"
        return DateWindow(period.start, period.end), f"the question: {period.label}"

    async def _context(self, request: AnalyzeInput, warnings: list[str]) -> Context | None:
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

    async def _answer(
        self, request: AnalyzeInput, messages: list[ChatTurn], warnings: list[str]
    ) -> _Answer | None:
        """The model's answer (structured when asked and given), or None when no LLM could
        answer (the rule-based answer is used)."""
        structured = self.settings.structured_answers
        if structured:
            messages = [
                *messages[:-1],
                ChatTurn("system", grounding.STRUCTURED_INSTRUCTIONS),
                messages[-1],
            ]
        with _tracer.start_as_current_span("analytics.analyze.complete") as span:
            try:
                first = await self._complete(request, messages, structured)
                span.set_attribute("analytics.commentary_source", "llm")
                if not structured:
                    return _Answer(
                        first.content.strip(),
                        first.model,
                        first.usage,
                        redactions=first.redactions,
                    )
                return _structured(first)
            except SchemaMismatch as exc:
                STRUCTURED_ANSWERS.labels("mismatch").inc()
                warnings.append(
                    "llm_unstructured: the model's answer did not match the answer schema "
                    "after one repair round; the rule-based answer was returned"
                )
                span.set_attribute("analytics.commentary_source", "rules")
                log.warning(
                    "llm answer unstructured; rule-based commentary", extra={"reason": exc.reason}
                )
                return None
            except DownstreamFailed as exc:
                warnings.append(f"llm_unavailable: {exc.reason}")
                span.set_attribute("analytics.commentary_source", "rules")
                log.warning("llm unavailable; rule-based commentary", extra={"reason": exc.reason})
                return None

    async def _complete(
        self, request: AnalyzeInput, messages: list[ChatTurn], structured: bool
    ) -> Completion:
        timeout = _share(self.settings.llm_timeout_s, self.settings.llm_deadline_share)
        if timeout <= 0.05:
            raise DownstreamFailed("no time left in the caller's deadline")
        answer = await self.completer.complete(
            messages,
            request.model,
            self.settings.max_answer_tokens,
            timeout,
            grounding.ANSWER_SCHEMA if structured else "",
        )
        if not answer.content.strip():
            raise DownstreamFailed("the model returned an empty answer")
        return answer

    def _ground(
        self, facts: Facts, answer: _Answer | None, warnings: list[str]
    ) -> tuple[str, Source, GroundingResult]:
        """Check the answer's figures and apply the policy."""
        policy = self.settings.grounding_policy
        source: Source = "llm" if answer is not None else "rules"
        text = answer.text if answer is not None else facts.rules_answer()
        if policy == "off":
            checked = GroundingResult(policy, "skipped", Report(0))
            _observe(checked, source)
            return text, source, checked
        with _tracer.start_as_current_span("analytics.analyze.grounding"):
            checker = grounding.Checker(facts.sources())
            report = checker.check(text, answer.citations if answer else ())
        cited = bool(answer and answer.cited)
        if report.clean:
            checked = GroundingResult(policy, "verified", report, cited)
        elif policy == "reject" and answer is not None:
            warnings.append(
                f"grounding_rejected: {len(report.unverified)} of {report.figures_checked} "
                "figures of the model's answer did not match the computed metrics; the "
                "rule-based answer was returned"
            )
            checked = GroundingResult(policy, "rejected", report, cited)
            text, source = facts.rules_answer(), "rejected"
        else:
            text, report = grounding.annotate(text, report)
            warnings.append(
                f"grounding_unverified: {len(report.unverified)} of {report.figures_checked} "
                f"figures did not match the computed metrics (marked{grounding.UNVERIFIED_MARK})"
            )
            checked = GroundingResult(policy, "annotated", report, cited)
        _observe(checked, "rules" if source == "rejected" else source)
        return text, source, checked

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


@dataclass(frozen=True, slots=True)
class Facts:
    """What an answer may be built from and is checked against."""

    result: MetricsResult
    request: AnalyzeInput
    window: DateWindow
    correlations: dict[frozenset[str], float]
    label: str
    objective: OptimizationObjective | None = None
    optimization: OptimizeResult | None = None

    def rules_answer(self) -> str:
        by_symbol = {m.symbol: m for m in self.result.metrics}
        mix = (
            optimized_mix(self.objective, self.optimization)
            if self.objective is not None and self.optimization is not None
            else None
        )
        return answer_question(
            self.request.question,
            by_symbol,
            self.request.benchmark or None,
            self.label,
            self.correlations or None,
            mix,
        )

    def sources(self) -> grounding.Sources:
        c = self.result.conventions
        sources = grounding.Sources.from_metrics(
            self.result.metrics,
            question=self.request.question,
            window=(self.window.start, self.window.end),
            periods_per_year=c.periods_per_year,
            risk_free=c.risk_free_annual,
            correlations=self.correlations,
        )
        if self.optimization is None:
            return sources
        o, sol = self.optimization, self.optimization.solution
        return sources.with_optimization(
            dict(zip(o.spec.symbols, sol.weights.tolist(), strict=True)),
            expected_return=sol.expected_return,
            volatility=sol.volatility,
            sharpe=sol.sharpe,
            window=(o.estimation_first, o.estimation_last),
            periods=int(o.estimates.returns.shape[0]),
        )


def window_label(result: MetricsResult, window_source: str) -> str:
    """ "2020-01-02 to 2020-12-31 (the question: 2020)": the dates the metrics cover."""
    if not result.metrics:
        return ""
    first = min(m.start_date for m in result.metrics)
    last = max(m.end_date for m in result.metrics)
    return f"{first.isoformat()} to {last.isoformat()} ({window_source})"


def _observe(checked: GroundingResult, source: str) -> None:
    report = checked.report
    unverified = len(report.unverified)
    if report.figures_checked:
        GROUNDING_FIGURES.labels(source, "verified").inc(report.figures_checked - unverified)
    if unverified:
        GROUNDING_FIGURES.labels(source, "unverified").inc(unverified)
    GROUNDING_OUTCOMES.labels(checked.policy, checked.outcome).inc()
    span = trace.get_current_span()
    span.set_attribute("analytics.grounding.policy", checked.policy)
    span.set_attribute("analytics.grounding.outcome", checked.outcome)
    span.set_attribute("analytics.grounding.figures_checked", report.figures_checked)
    span.set_attribute("analytics.grounding.unverified", unverified)
    span.set_attribute("analytics.grounding.cited", checked.cited)
    if unverified:
        log.info(
            "answer figures unverified",
            extra={
                "policy": checked.policy,
                "outcome": checked.outcome,
                "figures_checked": report.figures_checked,
                "unverified": unverified,
            },
        )


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(
        a.prompt_tokens + b.prompt_tokens,
        a.completion_tokens + b.completion_tokens,
        a.cached_prompt_tokens + b.cached_prompt_tokens,
        a.reasoning_tokens + b.reasoning_tokens,
        a.total_tokens + b.total_tokens,
        a.cost_nanos + b.cost_nanos,
        a.currency,
    )


def _prompt(context: list[ChatTurn] | None, block: str, question: str) -> list[ChatTurn]:
    """Context from memory (or just the question), with the metrics right before the question.
    The operator's words (instructions, computed metrics) are system messages; the question
    is data in a fenced user message (memory fences it, and the facts and history, itself)."""
    metrics = ChatTurn("system", block)
    if not context:
        return [
            ChatTurn("system", SYSTEM_PROMPT),
            metrics,
            ChatTurn("user", fence("question", question)),
        ]
    if context[-1].role == "user":
        return [*context[:-1], metrics, context[-1]]
    return [*context, metrics, ChatTurn("user", fence("question", question))]


def _reason_label(warnings: list[str]) -> str:
    for w in warnings:
        if w.startswith("llm_unavailable"):
            return "llm_unavailable"
        if w.startswith("grounding_rejected"):
            return "grounding_rejected"
    return "other"
