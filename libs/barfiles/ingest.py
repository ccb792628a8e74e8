"""Stream a CSV or Parquet price file to the analytics service over IngestBars (the client).

`stream_file` is the streaming core of both command lines, `finsight ingest` (libs/cli)
and `python -m services.analytics.importer_cli`: one piece of code parses (with
libs/barfiles/reader.py), converts, streams and counts for both. The file is parsed
locally, grouped by symbol and streamed in batches; rows the reader rejects never leave
this machine. Every `stream_rows` bars one IngestBars stream is closed and committed, so a
very large file becomes several transactions; with `reject_all` the whole file is one
stream and nothing is written if any row is invalid, whether the reader or the service
finds it.
"""

from __future__ import annotations

import asyncio
import gzip
import re
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

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from libs.barfiles.columns import MicrosConverter, SymbolColumns, group_by_symbol
from libs.barfiles.options import DEFAULT_BATCH_ROWS, DEFAULT_STREAM_ROWS
from libs.barfiles.reader import DateFormat, ImportBatch, Layout, iter_batches

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
    line: int | None = None  # CSV: the line an editor shows the row on (header = line 1)

    @property
    def where(self) -> str:
        """Where in the file: "line 7" (CSV), "row 6" (Parquet), or "" (not known)."""
        if self.line is not None:
            return f"line {self.line}"
        return "" if self.row is None else f"row {self.row}"

    def describe(self) -> str:
        if self.source == "parser" and (self.where or self.day is None):
            value = f"{self.column}={self.value!r}" if self.column else repr(self.value)
            return f"{self.where or '?'}: {self.reason} ({value})"
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
            RowRejection("parser", r.reason, r.symbol, None, r.row, r.column, r.value, r.line)
        )
    for t in too_precise:
        totals.add_parser(RowRejection("parser", t.reason, t.symbol, t.day))
    return pb.IngestBarsRequest(on_invalid=policy, series=[series_pb(g) for g in groups])  # type: ignore[arg-type]


def _service_rejection(r: pb.RejectedBar) -> RowRejection:
    day = date(r.date.year, r.date.month, r.date.day) if r.HasField("date") else None
    return RowRejection("service", r.reason, r.symbol, day)


# IngestBars request fields a user of the command lines sets with a flag (a field violation
# on one of them is rendered naming the flag; the field stays in --json, the API contract).
_MESSAGE_FIELD: Final = re.compile(r"messages\[\d+\]")


def field_flag(field_path: str, reject_all: bool) -> str | None:
    """The command-line flag behind an IngestBars field violation, or None.

    `messages[i]` is the stream that grew past the service's row limit: its size is
    --stream-rows, or the whole file with --reject-all.
    """
    if not _MESSAGE_FIELD.fullmatch(field_path):
        return None
    if reject_all:
        return "--reject-all (the whole file is one IngestBars stream: leave it out, or split the file)"
    return "--stream-rows (bars per IngestBars stream: give a smaller number)"


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
