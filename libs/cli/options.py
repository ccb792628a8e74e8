"""Argument types and option groups shared by several commands."""

from __future__ import annotations

import argparse
import os
import re
import uuid
from datetime import date

from finsight.common.v1 import common_pb2
from libs.cli.render import pb_date

_ID_RE = re.compile(r"[^A-Za-z0-9._:@-]")


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def rate(text: str) -> float:
    """An annual rate as a fraction (`0.04`) or a percentage (`4%`)."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (0.04 or 4%)") from None


def add_range(parser: argparse.ArgumentParser, what: str = "prices") -> None:
    parser.add_argument(
        "--from", dest="start", type=iso_date, metavar="DATE", help=f"first day of {what}"
    )
    parser.add_argument(
        "--to", dest="end", type=iso_date, metavar="DATE", help=f"last day of {what}"
    )


def date_range(args: argparse.Namespace) -> common_pb2.DateRange:
    rng = common_pb2.DateRange()
    if args.start is not None:
        rng.start.CopyFrom(pb_date(args.start))
    if args.end is not None:
        rng.end.CopyFrom(pb_date(args.end))
    return rng


def add_conversation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--session", metavar="ID", help="memory session id (default: a new cli-… id)"
    )
    parser.add_argument(
        "--user", metavar="ID", help="user id (default $FINSIGHT_USER, else your login name)"
    )


def session_id(args: argparse.Namespace) -> str:
    return str(args.session or f"cli-{uuid.uuid4().hex[:16]}")


def user_id(args: argparse.Namespace) -> str:
    if args.user:
        return str(args.user)
    name = os.environ.get("FINSIGHT_USER") or os.environ.get("USER") or "cli"
    # Memory ids are 1-128 of [A-Za-z0-9._:@-]: a login name with other characters is mapped.
    return _ID_RE.sub("_", name)[:128] or "cli"
