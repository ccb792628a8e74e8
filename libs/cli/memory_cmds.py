"""`finsight memory export | erase | consent | facts | extraction`: what the memory service keeps
about a user.

`export USER` and `erase USER --yes` are the user's personal data as a whole; `consent USER`
shows or changes the consent choices (long-term memory, fact extraction); `facts USER` lists
the user's facts, with `--history` also the ones a newer fact superseded; `extraction USER`
whether facts are extracted from the user's conversations, and how far along.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.cli.commands import CliError, emit, out
from libs.cli.connection import Connection
from libs.cli.render import plain, short_enum

err_console = Console(stderr=True, highlight=False)
ITEM_TYPES = ("consent", "fact", "message", "audit_entry")
PLURALS = {
    "consent": "consent",
    "fact": "facts",
    "message": "messages",
    "audit_entry": "audit entries",
}


def export_line(item: pb.ExportUserDataResponse) -> dict[str, Any]:
    """One JSON line: {"type": "fact", "fact": {...}} (the oneof member that is set)."""
    kind = item.WhichOneof("item")
    if kind is None:
        return {"type": "unknown"}
    return {"type": kind, kind: plain(getattr(item, kind))}


async def _write_export(conn: Connection, user: str, sink: IO[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    async with conn.channel("memory") as channel:
        call = memory_pb2_grpc.MemoryServiceStub(channel).ExportUserData(
            pb.ExportUserDataRequest(user_id=user), metadata=conn.metadata, timeout=conn.timeout
        )
        async for item in call:
            line = export_line(item)
            counts[line["type"]] += 1
            sink.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    return counts


async def export(args: argparse.Namespace, conn: Connection) -> int:
    if args.out is None:
        counts = await _write_export(conn, args.user, sys.stdout)
        sys.stdout.flush()
        summary = ", ".join(f"{counts[t]} {PLURALS[t]}" for t in ITEM_TYPES)
        err_console.print(f"exported {escape(args.user)}: {summary}")
        return 0
    path = Path(args.out)
    # Written under a temporary name and renamed once the stream ended: an export cut by
    # an error never leaves a partial file that looks complete.
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as sink:
            counts = await _write_export(conn, args.user, sink)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    data = {"user_id": args.user, "file": str(path), **{t: counts[t] for t in ITEM_TYPES}}
    table = Table(title=f"Export of {escape(args.user)} → {escape(str(path))}")
    for t in ITEM_TYPES:
        table.add_column(PLURALS[t], justify="right")
    table.add_row(*(f"{counts[t]:,}" for t in ITEM_TYPES))
    emit(args, data, table)
    return 0


async def erase(args: argparse.Namespace, conn: Connection) -> int:
    if not args.yes:
        raise CliError(
            f"this permanently erases every message, session, fact and consent of user "
            f"{args.user!r}; run again with --yes to confirm (export it first: "
            f"finsight memory export {args.user} --out FILE)"
        )
    async with conn.channel("memory") as channel:
        reply = await memory_pb2_grpc.MemoryServiceStub(channel).DeleteUserData(
            pb.DeleteUserDataRequest(user_id=args.user),
            metadata=conn.metadata,
            timeout=conn.timeout,
        )
    data = {"user_id": args.user, **plain(reply)}
    table = Table(title=f"Erased user {escape(args.user)}")
    labels = {
        "messages_deleted": "messages",
        "sessions_deleted": "sessions",
        "facts_deleted": "facts",
        "consent_deleted": "consent records",
        "cache_entries_deleted": "cache entries",
    }
    for label in labels.values():
        table.add_column(label, justify="right")
    table.add_row(*(f"{getattr(reply, field):,}" for field in labels))
    emit(args, data, table)
    return 0


# -- consent ---------------------------------------------------------------------------------
def on_off(value: bool) -> str:
    return "on" if value else "off"


def _when(ts: Any) -> str:
    """A Timestamp as `YYYY-MM-DD HH:MM:SS` UTC; `-` when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def consent_table(user: str, consent: pb.Consent, facts_deleted: int | None = None) -> Table:
    table = Table(
        title=f"Consent of {escape(user)}",
        caption="fact extraction also needs the tenant's opt-in (MEMORY_EXTRACTION_TENANTS)",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("long-term memory", on_off(consent.long_term_memory))
    table.add_row("fact extraction", on_off(consent.fact_extraction))
    never = not consent.HasField("update_time")
    table.add_row("last changed", "never set (no consent)" if never else _when(consent.update_time))
    table.add_row("changed by", escape(consent.updated_by) or "-")
    if facts_deleted is not None:
        table.add_row("facts deleted", f"{facts_deleted:,}")
    return table


_NEEDS_LONG_TERM = (
    "--fact-extraction on needs long-term memory, which is {state} for {user!r} "
    "(the service would ignore it): give --long-term-memory on --fact-extraction on"
)


async def consent(args: argparse.Namespace, conn: Connection) -> int:
    """No flag: GetConsent. With flags: SetConsent, a flag left out keeping its value."""
    if args.long_term_memory == "off" and args.fact_extraction == "on":
        raise CliError(_NEEDS_LONG_TERM.format(user=args.user, state="turned off"))
    async with conn.channel("memory") as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        current = (
            await stub.GetConsent(
                pb.GetConsentRequest(user_id=args.user),
                metadata=conn.metadata,
                timeout=conn.timeout,
            )
        ).consent
        if args.long_term_memory is None and args.fact_extraction is None:
            emit(args, {"user_id": args.user, **plain(current)}, consent_table(args.user, current))
            return 0
        long_term = (
            current.long_term_memory
            if args.long_term_memory is None
            else args.long_term_memory == "on"
        )
        extraction = (
            current.fact_extraction
            if args.fact_extraction is None
            else args.fact_extraction == "on"
        )
        if args.fact_extraction == "on" and not long_term:
            raise CliError(_NEEDS_LONG_TERM.format(user=args.user, state="off"))
        reply = await stub.SetConsent(
            # Without long-term memory the service ignores fact_extraction: send it off.
            pb.SetConsentRequest(
                user_id=args.user,
                long_term_memory=long_term,
                fact_extraction=extraction and long_term,
            ),
            metadata=conn.metadata,
            timeout=conn.timeout,
        )
    data = {"user_id": args.user, **plain(reply.consent), "facts_deleted": reply.facts_deleted}
    deleted = None if long_term else reply.facts_deleted
    emit(args, data, consent_table(args.user, reply.consent, deleted))
    if not args.json and args.long_term_memory == "off":
        err_console.print(
            f"long-term memory withdrawn: {reply.facts_deleted:,} fact(s) of "
            f"{escape(args.user)} deleted"
        )
    return 0


# -- facts -----------------------------------------------------------------------------------
async def read_facts(
    conn: Connection, user: str, *, history: bool = False, kind: str | None = None
) -> list[pb.Fact]:
    """The user's facts from ListFacts, page by page: the current ones, with `history` also
    the superseded ones; only those of `kind` when given."""
    facts: list[pb.Fact] = []
    request = pb.ListFactsRequest(
        user_id=user, include_history=history, kinds=[kind] if kind else [], page_size=500
    )
    async with conn.channel("memory") as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        while True:
            page = await stub.ListFacts(request, metadata=conn.metadata, timeout=conn.timeout)
            facts.extend(page.facts)
            if not page.next_page_token:
                return facts
            request.page_token = page.next_page_token


def _since(fact: pb.Fact) -> tuple[int, str]:
    ts = fact.valid_from if fact.HasField("valid_from") else fact.create_time
    return ts.ToMicroseconds(), fact.fact_id


def is_current(fact: pb.Fact) -> bool:
    return not fact.HasField("valid_to")


def fact_rows(facts: Iterable[pb.Fact], history: bool) -> list[tuple[pb.Fact, int]]:
    """(fact, depth) in display order: the current facts by valid_from; with `history`, each
    followed by the facts it replaced (depth 1), newest first, each followed by the ones
    that one replaced (depth 2) and so on; then superseded facts whose successor is gone
    (forgotten, or of another kind than `--kind`), by valid_from."""
    facts = list(facts)
    current = sorted((f for f in facts if is_current(f)), key=_since)
    if not history:
        return [(f, 0) for f in current]
    replaced: dict[str, list[pb.Fact]] = {}
    for f in facts:
        if not is_current(f):
            replaced.setdefault(f.superseded_by, []).append(f)
    rows: list[tuple[pb.Fact, int]] = []
    seen: set[str] = set()

    def add(fact: pb.Fact, depth: int) -> None:
        if fact.fact_id in seen:  # a cycle would be a bug of the data: show it once
            return
        seen.add(fact.fact_id)
        rows.append((fact, depth))
        older = replaced.get(fact.fact_id, [])
        for old in sorted(older, key=lambda o: o.valid_to.ToMicroseconds(), reverse=True):
            add(old, depth + 1)

    for f in current:
        add(f, 0)
    for f in sorted((f for f in facts if not is_current(f)), key=_since):
        if f.fact_id not in seen:
            add(f, 0)
    return rows


def origin_word(fact: pb.Fact) -> str:
    if fact.origin == pb.FACT_ORIGIN_UNSPECIFIED:
        return "-"
    return short_enum(pb.FactOrigin.Name(fact.origin), "FACT_ORIGIN_").lower()


def facts_summary(facts: Iterable[pb.Fact]) -> str:
    facts = list(facts)
    old = sum(1 for f in facts if not is_current(f))
    return f"{len(facts) - old} current, {old} superseded"


def facts_table(user: str, rows: list[tuple[pb.Fact, int]], history: bool) -> Table:
    facts = [f for f, _ in rows]
    title = f"Facts about {user}" + (" (with history)" if history else "")
    caption = facts_summary(facts) if history else f"{len(facts)} current"
    table = Table(title=Text(title), caption=caption)
    table.add_column("id", no_wrap=True)
    table.add_column("text", ratio=1)
    table.add_column("kind")
    table.add_column("origin")
    table.add_column("since (UTC)", no_wrap=True)
    if history:
        table.add_column("until (UTC)", no_wrap=True)
        table.add_column("replaced by", no_wrap=True)
    table.add_column("session")
    for fact, depth in rows:
        superseded = not is_current(fact)
        style = "dim" if superseded else ""
        text = Text(("  " * (depth - 1) + "↳ " if depth else "") + fact.text, style=style)
        cells: list[Text] = [
            Text(fact.fact_id, style=style),
            text,
            Text(fact.kind or "general", style=style),
            Text(origin_word(fact), style=style),
            Text(_when(fact.valid_from if fact.HasField("valid_from") else fact.create_time)),
        ]
        if history:
            cells.append(Text(_when(fact.valid_to) if superseded else "current", style=style))
            cells.append(Text(fact.superseded_by or "-", style=style))
        cells.append(Text(fact.source_session_id or "-", style=style))
        table.add_row(*cells)
    return table


def show_facts(
    console: Console,
    user: str,
    facts: list[pb.Fact],
    *,
    history: bool,
    kind: str | None = None,
) -> None:
    """The facts as a table on `console`, or a line saying there are none."""
    rows = fact_rows(facts, history)
    of_kind = f" of kind {kind}" if kind else ""
    if not rows:
        older = sum(1 for f in facts if not is_current(f))
        hint = f" ({older} superseded: --history lists them)" if older and not history else ""
        console.print(Text(f"{user}: no facts{of_kind} yet{hint}"))
        return
    console.print(facts_table(user, rows, history))


async def facts_to_show(
    conn: Connection, user: str, *, history: bool, kind: str | None = None
) -> list[pb.Fact]:
    """What `show_facts` needs: the facts asked for; when no current one exists, the
    superseded ones too (so it can say that --history would list some)."""
    found = await read_facts(conn, user, history=history, kind=kind)
    if not found and not history:
        found = await read_facts(conn, user, history=True, kind=kind)
    return found


async def facts(args: argparse.Namespace, conn: Connection) -> int:
    if args.json:
        found = await read_facts(conn, args.user, history=args.history, kind=args.kind)
        emit(args, [plain(f) for f, _ in fact_rows(found, args.history)], None)
        return 0
    found = await facts_to_show(conn, args.user, history=args.history, kind=args.kind)
    show_facts(out, args.user, found, history=args.history, kind=args.kind)
    return 0


# -- extraction status -------------------------------------------------------------------------
def extraction_table(user: str, status: pb.GetExtractionStatusResponse) -> Table:
    running = status.tenant_enabled and status.user_consented
    table = Table(
        title=f"Fact extraction for {escape(user)}",
        caption="on" if running else "off: needs the tenant's opt-in and the user's consent",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tenant opted in", "yes" if status.tenant_enabled else "no")
    table.add_row("user consented", "yes" if status.user_consented else "no")
    table.add_row("turns pending", f"{status.messages_pending:,}")
    table.add_row("turns extracted", f"{status.messages_extracted:,}")
    last = status.last_extraction_time
    table.add_row(
        "last extraction", _when(last) if status.HasField("last_extraction_time") else "never"
    )
    table.add_row("extracted facts (current)", f"{status.extracted_facts:,}")
    table.add_row("queue (this replica)", f"{status.replica_queue_depth:,}")
    return table


async def extraction(args: argparse.Namespace, conn: Connection) -> int:
    async with conn.channel("memory") as channel:
        status = await memory_pb2_grpc.MemoryServiceStub(channel).GetExtractionStatus(
            pb.GetExtractionStatusRequest(user_id=args.user),
            metadata=conn.metadata,
            timeout=conn.timeout,
        )
    data = {"user_id": args.user, **plain(status)}
    emit(args, data, extraction_table(args.user, status))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "memory",
        help="a user's data: export, erase, consent, facts (and their history), extraction",
    )
    memory_sub = p.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    e = memory_sub.add_parser(
        "export",
        help="everything stored about USER, as JSON lines",
        description="Streams ExportUserData: consent first, then facts, messages (by session, "
        'in order) and audit entries, one JSON object per line ({"type": ..., <type>: {...}}).',
    )
    e.add_argument("user", metavar="USER")
    e.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    e.set_defaults(handler=export)
    d = memory_sub.add_parser(
        "erase",
        help="erase USER's messages, sessions, facts and consent (needs --yes)",
        description="DeleteUserData: permanent. The audit log keeps that it happened (counts).",
    )
    d.add_argument("user", metavar="USER")
    d.add_argument("--yes", action="store_true", help="confirm the erasure")
    d.set_defaults(handler=erase)
    c = memory_sub.add_parser(
        "consent",
        help="show USER's consent, or change it with --long-term-memory / --fact-extraction",
        description="No flag: GetConsent. With a flag: SetConsent (a flag left out keeps its "
        "current value). Withdrawing long-term memory deletes USER's facts. Fact extraction "
        "needs long-term memory (and the tenant's opt-in, MEMORY_EXTRACTION_TENANTS).",
    )
    c.add_argument("user", metavar="USER")
    c.add_argument(
        "--long-term-memory", choices=("on", "off"), help="may facts about USER be stored"
    )
    c.add_argument(
        "--fact-extraction",
        choices=("on", "off"),
        help="may facts be extracted from USER's conversations (needs long-term memory on)",
    )
    c.set_defaults(handler=consent)
    f = memory_sub.add_parser(
        "facts",
        help="USER's current facts (--history: also the ones a newer fact superseded)",
        description="The facts of ListFacts, by valid_from: id, text, kind, origin "
        "(remembered with Remember, or extracted from conversations), since when, source "
        "session. --history adds superseded facts under the fact that replaced them, with "
        "when they were replaced (until) and by which fact.",
    )
    f.add_argument("user", metavar="USER")
    f.add_argument("--history", action="store_true", help="also superseded facts")
    f.add_argument("--kind", metavar="KIND", help="only facts of this kind")
    f.set_defaults(handler=facts)
    x = memory_sub.add_parser(
        "extraction",
        help="is fact extraction on for USER, and how far along is it",
        description="GetExtractionStatus: the tenant's opt-in and USER's consent, USER's turns "
        "pending and extracted, when the last one was, USER's current extracted facts, and "
        "the extraction queue of the memory replica that answered.",
    )
    x.add_argument("user", metavar="USER")
    x.set_defaults(handler=extraction)
