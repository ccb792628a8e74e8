"""The options of an ingest, shared by both command lines (`finsight ingest` and
`python -m services.analytics.importer_cli`), and the names the reader's messages use
for them.

No pyarrow here: `finsight --help` builds every subcommand's parser and must stay fast.
"""

from __future__ import annotations

import argparse
from typing import Final, Literal

Layout = Literal["auto", "long", "wide"]
LAYOUTS: Final[tuple[Layout, ...]] = ("auto", "long", "wide")
# How a date with slashes and the year last is read: "iso" refuses it (only YYYY-MM-DD and
# YYYY/MM/DD), "mdy" reads 01/05/2024 as 5 January (US), "dmy" as 1 May.
DateFormat = Literal["iso", "mdy", "dmy"]
DATE_FORMATS: Final[tuple[DateFormat, ...]] = ("iso", "mdy", "dmy")

DEFAULT_BATCH_ROWS: Final = 50_000
DEFAULT_STREAM_ROWS: Final = 1_000_000


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 rows per message or stream cannot work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_ingest_options(parser: argparse.ArgumentParser) -> None:
    """--layout, --symbol, --date-format, --reject-all, --batch-rows, --stream-rows."""
    parser.add_argument("--layout", choices=LAYOUTS, default="auto")
    parser.add_argument("--symbol", help="symbol of a single-symbol OHLCV file (e.g. ^GSPC)")
    parser.add_argument(
        "--date-format",
        choices=DATE_FORMATS,
        default="iso",
        help="dates with slashes and the year last: mdy (01/05/2024 = 5 Jan, US) or dmy "
        "(= 1 May); default iso: only YYYY-MM-DD (or YYYY/MM/DD), a file with others refused",
    )
    parser.add_argument(
        "--reject-all",
        action="store_true",
        help="all or nothing: write nothing if any row is invalid",
    )
    parser.add_argument(
        "--batch-rows",
        type=positive_int,
        default=DEFAULT_BATCH_ROWS,
        metavar="N",
        help=f"rows per stream message ({DEFAULT_BATCH_ROWS:,})",
    )
    parser.add_argument(
        "--stream-rows",
        type=positive_int,
        default=DEFAULT_STREAM_ROWS,
        metavar="N",
        help=f"bars per IngestBars stream, i.e. per transaction ({DEFAULT_STREAM_ROWS:,})",
    )
