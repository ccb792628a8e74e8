"""Load the bundled sample data into the shared reference tenant on first start.

Runs as a background task after the server started (readiness stays NOT_SERVING until it
is done), parses in a worker thread, and writes everything in ONE transaction: a crash
half-way leaves the database empty and the next start loads again. When the shared data
already exists nothing is read. Several replicas starting at once on one PostgreSQL
database load it exactly once: the store decides who loads inside the writing
transaction (`MarketStore.load_shared`); the others find the data and become ready. A
database that is unavailable meanwhile (a PostgreSQL failover) delays the load, it does
not fail it: the replica stays not-ready and tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np

from libs.barfiles.columns import MicrosConverter, SymbolColumns, group_by_symbol
from libs.barfiles.reader import Bar, Layout, iter_batches
from libs.common.errors import Unavailable
from services.analytics.bars import BarColumns, SeriesInput, ValidatedStream, validate_stream
from services.analytics.storage import SHARED_TENANT, MarketStore
from services.analytics.telemetry import SAMPLE_LOAD_SECONDS, SAMPLE_LOADS

log = logging.getLogger(__name__)

SAMPLE_DIR: Final = Path(__file__).parent / "sample_data"


@dataclass(frozen=True, slots=True)
class SampleFile:
    name: str
    layout: Layout
    symbol: str | None = None


SAMPLE_FILES: Final = (
    SampleFile("sp500_dataset.csv.gz", "wide"),
    SampleFile("sp500_index.csv.gz", "wide"),
    SampleFile("sp500_ohlcv.csv.gz", "long", "^GSPC"),
    SampleFile("nasdaq_ohlcv.csv.gz", "long", "^IXIC"),
)


def series_input(group: SymbolColumns, message_index: int, series_index: int) -> SeriesInput:
    """One symbol's columns as the service's validation input (as if sent over IngestBars)."""
    ymd = np.array([(d.year, d.month, d.day) for d in group.days], dtype=np.int64).reshape(-1, 3)
    return SeriesInput(
        message_index,
        series_index,
        group.symbol,
        ymd[:, 0],
        ymd[:, 1],
        ymd[:, 2],
        np.array(group.open, dtype=np.int64),
        np.array(group.high, dtype=np.int64),
        np.array(group.low, dtype=np.int64),
        np.array(group.close, dtype=np.int64),
        np.array(group.adj_close, dtype=np.int64),
        np.array(group.volume, dtype=np.int64),
    )


def parse_samples(directory: Path = SAMPLE_DIR) -> ValidatedStream:
    """Every sample file as validated columns (blocking: call in a thread)."""
    series: list[SeriesInput] = []
    convert = MicrosConverter()
    for file_index, spec in enumerate(SAMPLE_FILES):
        bars: list[Bar] = []
        # The sample files write US dates (1/4/1999 is 4 January).
        batches = iter_batches(
            directory / spec.name, layout=spec.layout, symbol=spec.symbol, date_format="mdy"
        )
        for batch in batches:
            bars.extend(batch.bars)
            if batch.rejected:
                log.warning(
                    "sample rows rejected by the parser",
                    extra={"file": spec.name, "rejected": len(batch.rejected)},
                )
        groups, too_precise = group_by_symbol(bars, convert)
        if too_precise:
            log.warning(
                "sample rows too precise", extra={"file": spec.name, "rows": len(too_precise)}
            )
        series.extend(series_input(g, file_index, i) for i, g in enumerate(groups))
    return validate_stream(series)


class SampleLoader:
    def __init__(self, store: MarketStore, directory: Path = SAMPLE_DIR) -> None:
        self.store = store
        self.directory = directory
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        # "loaded": this process wrote the sample; "present": it was there already.
        self.outcome: Literal["loaded", "present"] | None = None

    async def ready(self) -> bool:
        return self.done.is_set() and self.error is None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._load()
                    return
                except Unavailable as exc:  # e.g. PostgreSQL restarting: not ready yet
                    log.warning(
                        "sample data: the database is unavailable; retrying",
                        extra={"retry_s": exc.retry_after or 1.0},
                    )
                    await asyncio.sleep(exc.retry_after or 1.0)
        except Exception as exc:
            self.error = exc
            log.exception("sample data load failed")
        finally:
            self.done.set()

    async def _load(self) -> None:
        if await self.store.bar_count(SHARED_TENANT) > 0:
            self._present()
            return
        started = time.perf_counter()
        parsed: list[tuple[float, int]] = []

        def parse() -> BarColumns:
            checked = parse_samples(self.directory)
            parsed.append((time.perf_counter(), len(checked.rejections)))
            return checked.bars

        counts = await self.store.load_shared(parse)
        if counts is None:  # another replica loaded it meanwhile
            self._present()
            return
        elapsed = time.perf_counter() - started
        SAMPLE_LOAD_SECONDS.observe(elapsed)
        SAMPLE_LOADS.labels("loaded").inc()
        self.outcome = "loaded"
        parsed_at, rejected = parsed[-1]
        log.info(
            "sample data loaded",
            extra={
                "bars": counts.inserted,
                "rejected": rejected,
                "parse_s": round(parsed_at - started, 3),
                "total_s": round(elapsed, 3),
            },
        )

    def _present(self) -> None:
        SAMPLE_LOADS.labels("present").inc()
        self.outcome = "present"
        log.info("sample data already loaded")
