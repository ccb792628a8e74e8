"""`finsight analyze` and `finsight chat`: questions about the metrics, answered by Analyze.

Every answer shows where it came from (the LLM, or the rule-based answer when the gateway
could not answer or the model's answer was rejected for its figures), the model, the tokens
and the cost the gateway billed, the window the metrics cover, and in plain words the
grounding check of its figures, personal data kept from the model and any question or
recalled fact that read like instructions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from typing import Any

import grpc
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.cli.commands import CliError, emit, out
from libs.cli.connection import Connection, describe_error, error_json
from libs.cli.llm_cmds import tokens
from libs.cli.memory_cmds import facts_to_show, show_facts
from libs.cli.options import add_conversation, add_range, date_range, rate, session_id, user_id
from libs.cli.render import day, money_amount, num, pct, plain, short_enum, usd

err_console = Console(stderr=True, highlight=False)
HELP = (
    "Ask a question about the symbols. Commands: /symbols A B … (set the symbols), "
    "/benchmark SYM (or /benchmark none), /session (show ids), /facts (what memory keeps "
    "about you; /facts all: with the superseded ones), /help, exit (or Ctrl-D)."
)


def request_for(
    args: argparse.Namespace,
    session: str,
    user: str,
    symbols: list[str],
    question: str,
    benchmark: str | None,
) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        session_id=session,
        user_id=user,
        symbols=symbols,
        question=question,
        benchmark=benchmark or "",
        range=date_range(args),
        risk_free_rate=args.rf,
        model=args.model or "",
    )


def billed_cost(reply: pb.AnalyzeResponse) -> float:
    """What the gateway billed for the answer (0 for the rule-based summary or a cache hit)."""
    return money_amount(reply.cost) if reply.HasField("cost") else 0.0


def answer_data(reply: pb.AnalyzeResponse, session: str, user: str, cost: float) -> dict[str, Any]:
    data = plain(reply)
    data["session_id"] = session
    data["user_id"] = user
    data["cost_usd"] = cost
    return data


def render_answer(reply: pb.AnalyzeResponse, session: str, user: str, cost: float) -> None:
    source = short_enum(pb.CommentarySource.Name(reply.commentary_source), "COMMENTARY_SOURCE_")
    color = "green" if source == "LLM" else "yellow"
    if reply.commentary_source == pb.COMMENTARY_SOURCE_GROUNDING_REJECTED:
        source = "RULES (model answer rejected)"
    out.print(
        Panel(
            Markdown(reply.narrative or "(no answer)"),
            title="Answer",
            subtitle=f"[{color}]{source}[/]",
            border_style=color,
        )
    )
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("source", f"[{color}]{source}[/]")
    llm = reply.commentary_source != pb.COMMENTARY_SOURCE_RULES and bool(reply.model)
    facts.add_row("model", escape(reply.model) if llm else "- (rule-based answer)")
    facts.add_row("tokens", tokens(reply.usage) if llm else "0")
    facts.add_row("cost", usd(cost))
    if reply.window.HasField("start") or reply.window.HasField("end"):
        start = day(reply.window.start) if reply.window.HasField("start") else "first day"
        end = day(reply.window.end) if reply.window.HasField("end") else "last day"
        facts.add_row("window", escape(f"{start} → {end} ({reply.window_source})"))
    elif reply.window_source:
        facts.add_row("window", escape(reply.window_source))
    facts.add_row("figures", grounding_words(reply.grounding))
    for u in reply.grounding.unverified_figures:
        facts.add_row("[yellow]  unverified[/]", escape(f"“{u.text}”: {u.reason}"))
    if reply.redactions:
        kept = ", ".join(f"{r.count} {r.kind.lower().replace('_', ' ')}" for r in reply.redactions)
        facts.add_row(
            "personal data",
            escape(f"kept from the model: {kept} (placeholders sent, restored in the answer)"),
        )
    if reply.question_injection_signals:
        facts.add_row(
            "[yellow]question[/]",
            escape(
                "read like instructions to the model ("
                + ", ".join(reply.question_injection_signals)
                + "); it was treated as data"
            ),
        )
    if reply.flagged_fact_ids:
        facts.add_row(
            "[yellow]memory[/]",
            escape(
                f"{len(reply.flagged_fact_ids)} recalled fact(s) looked like instructions "
                "and were kept out of (or quoted in) the prompt"
            ),
        )
    facts.add_row("session / user", escape(f"{session} / {user}"))
    if reply.trace_id:
        facts.add_row("trace id", reply.trace_id)
    for warning in reply.warnings:
        facts.add_row("[yellow]warning[/]", escape(warning))
    out.print(facts)
    if reply.metrics:
        table = Table(title="Metrics used", title_justify="left")
        for name in ("symbol", "period", "total return", "CAGR", "volatility", "Sharpe", "max DD"):
            table.add_column(name, justify="left" if name in ("symbol", "period") else "right")
        for m in reply.metrics:
            table.add_row(
                m.symbol,
                f"{day(m.start_date)} → {day(m.end_date)}",
                pct(m.total_return),
                pct(m.cagr),
                pct(m.volatility),
                num(m.sharpe),
                pct(m.drawdown.max_drawdown),
            )
        out.print(table)


def grounding_words(g: pb.Grounding) -> str:
    """The grounding check in plain words."""
    n, bad = g.figures_checked, len(g.unverified_figures)
    if g.outcome == pb.GROUNDING_OUTCOME_SKIPPED:
        return "not checked (grounding policy off)"
    if g.outcome == pb.GROUNDING_OUTCOME_VERIFIED:
        if n == 0:
            return "[green]no figures to check[/]"
        how = " (the model cited the metric behind its figures)" if g.cited else ""
        return f"[green]all {n} checked against the computed metrics{how}[/]"
    if g.outcome == pb.GROUNDING_OUTCOME_REJECTED:
        return (
            f"[yellow]the model's answer stated {bad} of {n} figures that did not match the "
            "computed metrics, so the rule-based answer is shown[/]"
        )
    if g.outcome == pb.GROUNDING_OUTCOME_ANNOTATED:
        return (
            f"[yellow]{bad} of {n} did not match the computed metrics "
            "(marked \\[unverified] in the answer)[/]"
        )
    return "-"


# -- analyze ---------------------------------------------------------------------------------
async def analyze(args: argparse.Namespace, conn: Connection) -> int:
    if len(args.items) < 2:
        raise CliError('give one or more symbols, then the question: analyze AAPL MSFT "Which…?"')
    *symbols, question = args.items
    session, user = session_id(args), user_id(args)
    request = request_for(args, session, user, symbols, question, args.benchmark)
    async with conn.channel("analytics") as channel:
        reply = await analytics_pb2_grpc.AnalyticsServiceStub(channel).Analyze(
            request, metadata=conn.metadata, timeout=conn.timeout
        )
    cost = billed_cost(reply)
    if args.json:
        emit(args, answer_data(reply, session, user, cost), None)
    else:
        render_answer(reply, session, user, cost)
    return 0


# -- chat ------------------------------------------------------------------------------------
class LineReader:
    """stdin lines for the event loop, read by a daemon thread (Ctrl-C never waits on it)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.wanted = threading.Event()
        self.closed = False
        threading.Thread(target=self._run, name="finsight-chat-stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.closed:
                return
            line = sys.stdin.readline()
            self.loop.call_soon_threadsafe(self.queue.put_nowait, line if line else None)
            if not line:
                return

    async def read(self) -> str | None:
        """The next line without its newline; None at end of input."""
        self.wanted.set()
        line = await self.queue.get()
        return None if line is None else line.rstrip("\r\n")

    def close(self) -> None:
        """Lets the thread end when it is waiting for the next request (not mid-read)."""
        self.closed = True
        self.wanted.set()


def _say(text: str) -> None:
    """Chat chatter goes to stderr so stdout stays the answers (JSON lines with --json)."""
    err_console.print(text)


class Chat:
    """One interactive session: the ids, symbols and benchmark kept across turns."""

    def __init__(self, args: argparse.Namespace, conn: Connection) -> None:
        self.args = args
        self.conn = conn
        self.session, self.user = session_id(args), user_id(args)
        self.symbols: list[str] = list(args.symbols or [])
        self.benchmark: str | None = args.benchmark
        self.failures = 0

    async def command(self, text: str) -> None:
        """A /command line (some call a service: /facts)."""
        name, _, rest = text.partition(" ")
        if name == "/symbols":
            self.symbols = rest.split()
            _say(f"symbols: {escape(' '.join(self.symbols)) or '(none)'}")
        elif name == "/benchmark":
            self.benchmark = None if rest.strip() in ("", "none") else rest.strip()
            _say(f"benchmark: {escape(self.benchmark or '(none)')}")
        elif name == "/session":
            _say(escape(f"session {self.session}, user {self.user}"))
        elif name == "/facts" and rest.strip() in ("", "all"):
            await self.facts(history=rest.strip() == "all")
        else:
            _say(HELP)

    async def facts(self, *, history: bool) -> None:
        """The user's facts (ListFacts), on stderr like the other chatter: stdout stays
        the answers. A failure is reported and the chat goes on (it is not a failed turn)."""
        chat_service = self.conn.last_service
        try:
            found = await facts_to_show(self.conn, self.user, history=history)
        except grpc.aio.AioRpcError as error:
            _, lines = describe_error(error, self.conn)
            err_console.print("[bold red]error[/]: " + escape("\n".join(lines)))
            return
        finally:  # the turns' errors name analytics again
            self.conn.last_service = chat_service
        show_facts(err_console, self.user, found, history=history)

    async def ask(self, stub: analytics_pb2_grpc.AnalyticsServiceStub, question: str) -> None:
        """One turn. A failed turn is reported in plain words and the chat goes on."""
        if not self.symbols:
            _say("[yellow]no symbols yet[/]: set them with /symbols A B (or --symbols)")
            return
        request = request_for(
            self.args, self.session, self.user, self.symbols, question, self.benchmark
        )
        try:
            reply = await stub.Analyze(
                request, metadata=self.conn.metadata, timeout=self.conn.timeout
            )
        except grpc.aio.AioRpcError as error:
            self.failures += 1
            info, lines = describe_error(error, self.conn)
            if self.args.json:
                print(json.dumps(error_json(info)), flush=True)
            else:
                err_console.print("[bold red]error[/]: " + escape("\n".join(lines)))
            return
        cost = billed_cost(reply)
        if self.args.json:
            data = answer_data(reply, self.session, self.user, cost)
            print(json.dumps(data, default=str), flush=True)
        else:
            render_answer(reply, self.session, self.user, cost)


async def chat(args: argparse.Namespace, conn: Connection) -> int:
    state = Chat(args, conn)
    interactive = sys.stdin.isatty()
    _say(f"[bold]finsight chat[/]: session {escape(state.session)}, user {escape(state.user)}")
    _say(f"symbols: {escape(' '.join(state.symbols)) or '(none yet: /symbols A B)'}. {HELP}")
    reader = LineReader()
    try:
        async with conn.channel("analytics") as channel:
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
            while True:
                if interactive:
                    err_console.print("[bold cyan]you>[/] ", end="")
                line = await reader.read()
                text = "exit" if line is None else line.strip()
                if text.lower() in ("exit", "quit", "/exit", "/quit"):
                    break
                if text.startswith("/"):
                    await state.command(text)
                elif text:
                    await state.ask(stub, text)
    finally:
        reader.close()
    _say(escape(f"bye (session {state.session})"))
    return 1 if state.failures else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "analyze",
        help='metrics plus an answer to a question: analyze AAPL MSFT "Which is riskier?"',
    )
    p.add_argument("items", nargs="+", metavar="SYMBOL… QUESTION")
    _common(p)
    p.set_defaults(handler=analyze)

    p = sub.add_parser(
        "chat",
        help="an interactive Analyze session that keeps one memory session across turns",
        description="Reads questions from stdin until end of input or `exit`. " + HELP,
    )
    p.add_argument("--symbols", nargs="+", metavar="SYMBOL", help="symbols to start with")
    _common(p)
    p.set_defaults(handler=chat)


def _common(p: argparse.ArgumentParser) -> None:
    add_conversation(p)
    p.add_argument("--benchmark", metavar="SYM")
    add_range(p)
    p.add_argument("--rf", type=rate, default=0.0, help="annual risk-free rate: 0.04 or 4%%")
    p.add_argument("--model", help="LLM route or model (default: the gateway's default route)")
