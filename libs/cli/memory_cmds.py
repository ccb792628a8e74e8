"""`finsight memory export USER` and `finsight memory erase USER --yes`: a user's personal data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.cli.commands import CliError, emit
from libs.cli.connection import Connection
from libs.cli.render import plain

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("memory", help="export or erase everything stored about a user")
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
