"""Import a CSV or Parquet price file into the analytics service over IngestBars.

    python -m services.analytics.importer_cli FILE [--layout auto|long|wide] [--symbol X]
        [--date-format iso|mdy|dmy] [--target host:port] [--api-key KEY | --key-file PATH]
        [--reject-all] [--batch-rows N] [--stream-rows N]

A thin entry point over the client library libs/barfiles (the same code as `finsight
ingest`): libs/barfiles/reader.py parses the file locally (long or wide layout, gzip,
exact decimals), libs/barfiles/ingest.py groups it by symbol and streams it in batches; a
rich progress bar shows rows sent. Rows the parser rejects never leave this machine and
are listed at the end (with the file's line number) together with the rows the service
rejected. Every `--stream-rows` bars (default 1,000,000) one IngestBars stream is closed
and committed, so a very large file becomes several transactions. With `--reject-all` the
whole file is one stream and nothing is written if any row is invalid, whether the parser
or the service finds it. The key defaults to $FINSIGHT_API_KEY, then var/dev-api-key
(what `make run` writes). Exit status: 0 on success, 1 when rows were rejected, 2 on
errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2_grpc
from libs.barfiles.ingest import RichProgress, Totals, field_flag, stream_file
from libs.barfiles.options import add_ingest_options
from libs.barfiles.reader import ImportFormatError
from libs.common.errors import status_info

console = Console(stderr=True)


async def run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("FINSIGHT_API_KEY")
    if not key and args.api_key_file.exists():
        key = args.api_key_file.read_text().strip()
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    path = Path(args.file)
    async with grpc.aio.insecure_channel(
        args.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        try:
            with RichProgress(path, console) as progress:
                totals = await stream_file(
                    stub,
                    path,
                    layout=args.layout,
                    symbol=args.symbol,
                    date_format=args.date_format,
                    reject_all=args.reject_all,
                    metadata=metadata,
                    batch_rows=args.batch_rows,
                    stream_rows=args.stream_rows,
                    progress=progress,
                )
        except (ImportFormatError, OSError) as exc:
            console.print(f"cannot import {path}: {exc}", style="red", markup=False)
            return 2
        except grpc.aio.AioRpcError as exc:
            info = status_info(exc)
            console.print(f"{info.code.name}: {info.message}", style="red", markup=False)
            for v in info.field_violations[:20]:
                where = field_flag(v.field, args.reject_all) or v.field
                console.print(f"  {where}: {v.description}", markup=False)
            return 2
    report(totals)
    return 1 if totals.rejected else 0


def report(t: Totals) -> None:
    table = Table(title="IngestBars summary")
    for name in (
        "sent",
        "inserted",
        "updated",
        "unchanged",
        "rejected (service)",
        "rejected (parser)",
    ):
        table.add_column(name, justify="right")
    table.add_row(*(f"{n:,}" for n in (t.sent, t.inserted, t.updated, t.unchanged,
                                       t.rejected_by_service, t.rejected_by_parser)))  # fmt: skip
    Console().print(table)
    if t.aborted:
        console.print("nothing written: --reject-all and the parser rejected rows", style="red")
    for r in [*t.parser_rejections, *t.service_rejections][:50]:
        console.print(f"  rejected: {r.describe()}", markup=False, highlight=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.analytics.importer_cli", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("file", help="CSV (optionally .gz) or Parquet file")
    add_ingest_options(parser)
    parser.add_argument(
        "--target",
        "--analytics-target",
        default="127.0.0.1:50053",
        help="analytics host:port (the finsight CLI's --target / --analytics-target)",
    )
    parser.add_argument("--api-key", help="API key with scope analytics.write")
    parser.add_argument(
        "--key-file",
        "--api-key-file",
        dest="api_key_file",
        type=Path,
        default=Path("var/dev-api-key"),
        help="API key file (the finsight CLI's --key-file; --api-key-file is the old name)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(run(parse_args(argv))))


if __name__ == "__main__":
    main()
