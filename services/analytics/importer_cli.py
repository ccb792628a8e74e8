"""Import a CSV or Parquet price file into the analytics service over IngestBars.

    python -m services.analytics.importer_cli FILE [--layout auto|long|wide] [--symbol X]
        [--target host:port] [--api-key KEY | --api-key-file PATH] [--reject-all]
        [--stream-rows N]

The file is parsed locally (services/analytics/importer.py: long or wide layout, gzip,
exact decimals), grouped by symbol, and streamed in batches; a rich progress bar shows
rows sent. Rows the parser rejects never leave this machine and are listed at the end
together with the rows the service rejected. Every `--stream-rows` rows (default
1,000,000) one IngestBars stream is closed and committed, so a very large file becomes
several transactions. With `--reject-all` the whole file is one stream and nothing is
written if any row is invalid, whether the parser or the service finds it. The key
defaults to $FINSIGHT_API_KEY, then var/dev-api-key (what `make run` writes).
Exit status: 0 on success, 1 when rows were rejected, 2 on errors.

`stream_file` is the streaming core, shared with the `finsight ingest` command
(libs/cli): one piece of code parses, converts, streams and counts for both.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Final, Literal, Protocol

import grpc
import pyarrow.parquet as pa_parquet
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.common.errors import status_info
from services.analytics.file_bars import MicrosConverter, SymbolColumns, group_by_symbol
from services.analytics.importer import (
    DATE_FORMATS,
    DateFormat,
    ImportBatch,
    ImportFormatError,
    Layout,
    iter_batches,
)

console = Console(stderr=True)

DEFAULT_BATCH_ROWS: Final = 50_000
DEFAULT_STREAM_ROWS: Final = 1_000_000
# Details kept per source; counts are always complete (the service keeps 1,000 per stream).
MAX_REJECTION_DETAILS: Final = 1_000


@dataclass(frozen=True, slots=True)
class RowRejection:
    """A row left out: by the local parser (never sent) or by the service."""

    source: Literal["parser", "service"]
    reason: str
    symbol: str | None = None
    day: date | None = None
    row: int | None = None  # 1-based data row of the file (parser rejections with a row)
    column: str | None = None
    value: str | None = None

    def describe(self) -> str:
        if self.row is not None or (self.day is None and self.source == "parser"):
            return f"row {self.row}: {self.reason} ({self.column}={self.value!r})"
        day = self.day.isoformat() if self.day is not None else "?"
        return f"{self.symbol} {day}: {self.reason}"


@dataclass
class Totals:
    sent: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates_collapsed: int = 0  # identical copies of a row the service kept once
    rejected_by_service: int = 0
    rejected_by_parser: int = 0
    streams: int = 0
    data_version: int = 0
    # --reject-all and the parser rejected rows: the stream was cancelled, nothing written.
    aborted: bool = False
    parser_rejections: list[RowRejection] = field(default_factory=list)
    service_rejections: list[RowRejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.rejected_by_parser + self.rejected_by_service

    def add_parser(self, rejection: RowRejection) -> None:
        self.rejected_by_parser += 1
        if len(self.parser_rejections) < MAX_REJECTION_DETAILS:
            self.parser_rejections.append(rejection)


class IngestProgress(Protocol):
    """What `stream_file` reports while it runs (a progress bar, or nothing)."""

    def started(self, layout: str) -> None: ...

    def advanced(self, rows: int, totals: Totals) -> None: ...

    def finished(self, totals: Totals) -> None: ...


def estimate_rows(path: Path, layout: str) -> int | None:
    """Rows (or cells, for wide files) the progress bar counts toward; None if unknown."""
    try:
        if path.suffix in (".parquet", ".pq"):
            meta = pa_parquet.ParquetFile(path).metadata
            columns = meta.num_columns
            return int(meta.num_rows) * (max(columns - 1, 1) if layout == "wide" else 1)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = f.readline()
            lines = sum(1 for _ in f)
        columns = header.count(b",") + 1
        return lines * (max(columns - 1, 1) if layout == "wide" else 1)
    except OSError:
        return None


class RichProgress:
    """A rich progress bar over the file's rows (cells for wide files), with a bar rate."""

    def __init__(self, path: Path, progress_console: Console) -> None:
        self.path = path
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("{task.fields[rate]}"),
        )  # fmt: skip
        self.progress = Progress(*columns, console=progress_console)
        self.task: TaskID | None = None
        self.t0 = 0.0

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def started(self, layout: str) -> None:
        self.t0 = asyncio.get_running_loop().time()
        total = estimate_rows(self.path, layout)
        self.task = self.progress.add_task(self.path.name, total=total, rate="")
        self.progress.start()  # only now: a file that cannot be opened leaves no empty bar

    def advanced(self, rows: int, totals: Totals) -> None:
        assert self.task is not None
        elapsed = max(asyncio.get_running_loop().time() - self.t0, 1e-9)
        self.progress.update(self.task, advance=rows, rate=f"{totals.sent / elapsed:,.0f} bars/s")

    def finished(self, totals: Totals) -> None:
        # The estimate counts lines; blank or malformed ones are not rows: show 100% anyway.
        if self.task is not None and not totals.aborted:
            task = self.progress.tasks[0]
            self.progress.update(self.task, completed=task.total or task.completed)


def series_pb(group: SymbolColumns) -> pb.BarSeries:
    s = pb.BarSeries(symbol=group.symbol)
    for day in group.days:
        s.dates.add(year=day.year, month=day.month, day=day.day)
    s.open_micros.extend(group.open)
    s.high_micros.extend(group.high)
    s.low_micros.extend(group.low)
    s.close_micros.extend(group.close)
    s.adj_close_micros.extend(group.adj_close)
    s.volumes.extend(group.volume)
    return s


def to_request(
    batch: ImportBatch, convert: MicrosConverter, totals: Totals, policy: int
) -> pb.IngestBarsRequest:
    groups, too_precise = group_by_symbol(batch.bars, convert)
    for r in batch.rejected:
        totals.add_parser(
            RowRejection("parser", r.reason, r.symbol, None, r.row, r.column, r.value)
        )
    for t in too_precise:
        totals.add_parser(RowRejection("parser", t.reason, t.symbol, t.day))
    return pb.IngestBarsRequest(on_invalid=policy, series=[series_pb(g) for g in groups])  # type: ignore[arg-type]


def _service_rejection(r: pb.RejectedBar) -> RowRejection:
    day = date(r.date.year, r.date.month, r.date.day) if r.HasField("date") else None
    return RowRejection("service", r.reason, r.symbol, day)


def add_date_format(parser: argparse.ArgumentParser) -> None:
    """`--date-format`: the same option here and in `finsight ingest`."""
    parser.add_argument(
        "--date-format",
        choices=DATE_FORMATS,
        default="iso",
        help="dates with slashes and the year last: mdy (01/05/2024 = 5 Jan, US) or dmy "
        "(= 1 May); default iso: only YYYY-MM-DD (or YYYY/MM/DD), a file with others refused",
    )


async def stream_file(
    stub: analytics_pb2_grpc.AnalyticsServiceStub,
    path: Path,
    *,
    layout: Layout = "auto",
    symbol: str | None = None,
    date_format: DateFormat = "iso",
    reject_all: bool = False,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    stream_rows: int = DEFAULT_STREAM_ROWS,
    progress: IngestProgress | None = None,
) -> Totals:
    """Parse `path` and stream its bars over IngestBars; the counts and rejections.

    Raises ImportFormatError / OSError for a file that cannot be read as a whole, and
    grpc.aio.AioRpcError when the service fails a stream (earlier streams stay committed;
    with `reject_all` there is only one). Parsing runs in a worker thread, one batch ahead
    of the network. `timeout` is the deadline of each stream.
    """
    policy = pb.INVALID_ROW_POLICY_REJECT_ALL if reject_all else pb.INVALID_ROW_POLICY_SKIP_INVALID
    if reject_all:
        stream_rows = sys.maxsize  # all or nothing: one stream, one transaction
    batches: Iterator[ImportBatch] = iter_batches(
        path, layout=layout, symbol=symbol, batch_size=batch_rows, date_format=date_format
    )
    first = await asyncio.to_thread(next, batches, None)
    totals = Totals()
    if progress is not None:
        progress.started(first.layout if first is not None else "long")
    convert = MicrosConverter()
    pending: list[ImportBatch | None] = [first]

    async def next_batch() -> ImportBatch | None:
        if pending:
            return pending.pop()
        return await asyncio.to_thread(next, batches, None)

    exhausted = False
    # The stream in flight, for the request iterator to cancel.
    calls: list[grpc.aio.StreamUnaryCall[pb.IngestBarsRequest, pb.IngestBarsResponse]] = []
    while not exhausted:
        in_stream = 0

        async def requests() -> AsyncIterator[pb.IngestBarsRequest]:
            nonlocal exhausted, in_stream
            while in_stream < stream_rows:
                batch = await next_batch()
                if batch is None:
                    exhausted = True
                    return
                request = await asyncio.to_thread(to_request, batch, convert, totals, policy)
                if reject_all and totals.rejected_by_parser:
                    # Ending the stream would commit it: cancel it, a cancelled stream
                    # writes nothing.
                    totals.aborted = True
                    calls[-1].cancel()
                    return
                in_stream += len(batch.bars)
                totals.sent += len(batch.bars)
                yield request
                if progress is not None:
                    progress.advanced(len(batch.bars) + len(batch.rejected), totals)

        # A request iterator (not call.write): when the service fails the call early (e.g.
        # PERMISSION_DENIED), the call ends with the service's status, not a write error.
        call = stub.IngestBars(requests(), metadata=metadata, timeout=timeout)
        calls[:] = [call]
        try:
            reply = await call
        except asyncio.CancelledError:
            if not totals.aborted:
                raise
            return totals
        totals.streams += 1
        totals.inserted += reply.inserted
        totals.updated += reply.updated
        totals.unchanged += reply.unchanged
        totals.duplicates_collapsed += reply.duplicates_collapsed
        totals.rejected_by_service += reply.rejected
        totals.data_version = max(totals.data_version, reply.data_version)
        room = MAX_REJECTION_DETAILS - len(totals.service_rejections)
        totals.service_rejections.extend(_service_rejection(r) for r in reply.rejections[:room])
    if progress is not None:
        progress.finished(totals)
    return totals


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
                console.print(f"  {v.field}: {v.description}", markup=False)
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
    parser.add_argument("--layout", choices=("auto", "long", "wide"), default="auto")
    parser.add_argument("--symbol", help="symbol of a single-symbol OHLCV file (e.g. ^GSPC)")
    add_date_format(parser)
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
    parser.add_argument(
        "--reject-all", action="store_true", help="write nothing if any row is invalid"
    )
    parser.add_argument(
        "--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per message"
    )
    parser.add_argument(
        "--stream-rows", type=int, default=DEFAULT_STREAM_ROWS, help="bars per IngestBars stream"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(run(parse_args(argv))))


if __name__ == "__main__":
    main()
