"""All SQL of the analytics service: bars, their upsert, and the data version.

Runs on :class:`libs.common.duck.Database` (reads on the reader pool, writes through the
group committer), never imports grpc. Prices cross this boundary as int64 micro-units
(DECIMAL(18,6) scaled by 1e6, exact); dates as ``datetime64[D]``.

Tenancy: every row carries its tenant. A tenant reads its own bars of a symbol if it has
any, else the shared reference data (:data:`SHARED_TENANT`), never another tenant's.

Read cache: this process is the only writer of its database file (DuckDB locks it), so it
knows the data version without asking, and keeps, at that version, each tenant's symbol
owners and the adjusted-close series read so far (bounded by rows, least recently used
first). Every metric request then slices in-process arrays instead of scanning `bars`
(7-11 ms of DuckDB CPU a query on the sample data). A commit that changes data moves the
version and drops both; a result read at another version than the current one is never
kept.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from libs.common.duck import Cursor, Database
from services.analytics.bars import MICROS, BarColumns

# Reserved tenant of the shared reference data (sample data); no API key may carry it.
SHARED_TENANT: Final = "__shared__"

_PRICE_COLUMNS: Final = ("open", "high", "low", "close", "adj_close")
_MICROS_SQL: Final = ", ".join(
    f"CAST({c}::DECIMAL(38,6) * {MICROS} AS BIGINT) AS {c}" for c in _PRICE_COLUMNS
)


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int
    data_version: int


@dataclass(frozen=True, slots=True)
class SymbolSummary:
    symbol: str
    first_day: date
    last_day: date
    bar_count: int
    shared: bool  # True when the data is the shared reference set


@dataclass(frozen=True, slots=True)
class PricePanel:
    """Adjusted closes in long form, one entry per stored bar, in no particular order."""

    columns: npt.NDArray[np.int32]  # index into the requested symbols
    days: npt.NDArray[np.int32]  # days since 1970-01-01
    adj_close_micros: npt.NDArray[np.int64]
    data_version: int


def _decimal_array(micros: npt.NDArray[np.int64]) -> pa.Array:
    """int64 micro-units -> Arrow decimal128(18, 6) without any per-value Python work."""
    values = np.ascontiguousarray(micros, dtype=np.int64)
    words = np.empty((values.shape[0], 2), dtype=np.int64)
    words[:, 0] = values
    words[:, 1] = values >> 63  # sign extension to 128 bits (little endian)
    return pa.Array.from_buffers(pa.decimal128(18, 6), values.shape[0], [None, pa.py_buffer(words)])


def _arrow_table(bars: BarColumns) -> pa.Table:
    return pa.table(
        {
            "symbol": pa.array(bars.symbols.astype(str), type=pa.string()),
            "ts": pa.array(bars.days.astype("datetime64[D]")),
            **{c: _decimal_array(getattr(bars, c)) for c in _PRICE_COLUMNS},
            "volume": pa.array(bars.volume, type=pa.int64()),
        }
    )


def _upsert(conn: Cursor, tenant: str, table: pa.Table) -> UpsertCounts:
    # The view name is unique per connection use; the group committer runs jobs serially.
    conn.register("incoming_bars", table)
    try:
        conn.execute(
            """
            CREATE OR REPLACE TEMP TABLE staged_bars AS
            SELECT i.*,
                   CASE WHEN b.ts IS NULL THEN 'insert'
                        WHEN (b.open, b.high, b.low, b.close, b.adj_close, b.volume)
                             IS NOT DISTINCT FROM
                             (i.open, i.high, i.low, i.close, i.adj_close, i.volume)
                        THEN 'same'
                        ELSE 'update' END AS change
            FROM incoming_bars i
            LEFT JOIN bars b ON b.tenant = $tenant AND b.symbol = i.symbol AND b.ts = i.ts
            """,
            {"tenant": tenant},
        )
    finally:
        conn.unregister("incoming_bars")
    counts = dict(
        conn.execute("SELECT change, count(*) FROM staged_bars GROUP BY change").fetchall()
    )
    inserted, updated = int(counts.get("insert", 0)), int(counts.get("update", 0))
    if inserted + updated:
        conn.execute(
            """
            INSERT INTO bars
            SELECT $tenant, symbol, ts, open, high, low, close, adj_close, volume
            FROM staged_bars WHERE change <> 'same'
            ORDER BY symbol, ts
            ON CONFLICT (tenant, symbol, ts) DO UPDATE SET
                open = excluded.open, high = excluded.high, low = excluded.low,
                close = excluded.close, adj_close = excluded.adj_close, volume = excluded.volume
            """,
            {"tenant": tenant},
        )
        conn.execute("UPDATE data_version SET version = version + 1 WHERE id = 1")
    conn.execute("DROP TABLE staged_bars")
    version = conn.execute("SELECT version FROM data_version WHERE id = 1").fetchone()
    assert version is not None
    return UpsertCounts(inserted, updated, int(counts.get("same", 0)), int(version[0]))


def _version(conn: Cursor) -> int:
    rows = conn.execute("SELECT version FROM data_version WHERE id = 1").fetchall()
    return int(rows[0][0])


def _count(conn: Cursor, tenant: str) -> int:
    row = conn.execute("SELECT count(*) FROM bars WHERE tenant = ?", [tenant]).fetchone()
    assert row is not None
    return int(row[0])


# A symbol is resolved to the caller's own series when it has one, else the shared one.
_RESOLVED = """
    SELECT symbol, arg_min(tenant, tenant = $shared) AS owner
    FROM (SELECT DISTINCT tenant, symbol FROM bars WHERE tenant IN ($tenant, $shared))
    GROUP BY symbol
"""


def _list_symbols(conn: Cursor, tenant: str) -> list[SymbolSummary]:
    rows = conn.execute(
        f"""
        WITH resolved AS ({_RESOLVED})
        SELECT b.symbol, min(b.ts), max(b.ts), count(*), r.owner = $shared
        FROM bars b JOIN resolved r ON b.tenant = r.owner AND b.symbol = r.symbol
        GROUP BY b.symbol, r.owner
        ORDER BY b.symbol
        """,
        {"tenant": tenant, "shared": SHARED_TENANT},
    ).fetchall()
    return [
        SymbolSummary(s, first, last, int(n), bool(shared)) for s, first, last, n, shared in rows
    ]


def _bars(
    conn: Cursor, owner: str, symbol: str, start: date | None, end: date | None
) -> BarColumns:
    result = conn.execute(
        f"""
        SELECT symbol, ts, {_MICROS_SQL}, volume FROM bars
        WHERE tenant = $owner AND symbol = $symbol
          AND ($start IS NULL OR ts >= $start) AND ($end IS NULL OR ts <= $end)
        ORDER BY ts
        """,
        {"owner": owner, "symbol": symbol, "start": start, "end": end},
    ).fetchnumpy()
    return BarColumns(
        result["symbol"].astype(object),
        result["ts"].astype("datetime64[D]"),
        np.asarray(result["open"], dtype=np.int64),
        np.asarray(result["high"], dtype=np.int64),
        np.asarray(result["low"], dtype=np.int64),
        np.asarray(result["close"], dtype=np.int64),
        np.asarray(result["adj_close"], dtype=np.int64),
        np.asarray(result["volume"], dtype=np.int64),
    )


def _decimal_words(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """The unscaled integers of a decimal128(18, 6) column (micro-units), zero-copy per chunk.

    Values of DECIMAL(18,6) fit in the low 64-bit word of each little-endian 128-bit value.
    """
    parts = []
    for chunk in column.chunks:
        words = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
        parts.append(words[chunk.offset * 2 : (chunk.offset + len(chunk)) * 2 : 2])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class _Series:
    """One stored series' adjusted closes, by day (ascending)."""

    days: npt.NDArray[np.int32]  # days since 1970-01-01
    adj_close_micros: npt.NDArray[np.int64]

    def between(self, start: int | None, end: int | None) -> slice:
        lo = 0 if start is None else int(np.searchsorted(self.days, start, "left"))
        hi = len(self.days) if end is None else int(np.searchsorted(self.days, end, "right"))
        return slice(lo, hi)


def _series(conn: Cursor, keys: list[tuple[str, str]]) -> tuple[list[_Series], int]:
    """Whole adjusted-close series of (owner, symbol) pairs and the version they were read
    at (one transaction)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        version = _version(conn)
        table = conn.sql(
            """
            WITH wanted AS (
                SELECT unnest($owners) AS tenant, unnest($symbols) AS symbol,
                       unnest(range(len($symbols))) AS col)
            SELECT w.col::INTEGER AS col, (b.ts - DATE '1970-01-01')::INTEGER AS day,
                   b.adj_close
            FROM bars b JOIN wanted w ON b.tenant = w.tenant AND b.symbol = w.symbol
            ORDER BY col, day
            """,
            params={"owners": [o for o, _ in keys], "symbols": [s for _, s in keys]},
        ).to_arrow_table()
    finally:
        conn.execute("COMMIT")
    cols = table.column("col").to_numpy()
    days = table.column("day").to_numpy().astype(np.int32, copy=False)
    prices = _decimal_words(table.column("adj_close"))
    bounds = np.searchsorted(cols, np.arange(len(keys) + 1), "left")
    return [
        _Series(days[a:b].copy(), prices[a:b].copy()) for a, b in itertools.pairwise(bounds)
    ], version


def _owners_of(conn: Cursor, tenant: str) -> tuple[dict[str, str], int]:
    conn.execute("BEGIN TRANSACTION")
    try:
        version = _version(conn)
        rows = conn.execute(_RESOLVED, {"tenant": tenant, "shared": SHARED_TENANT}).fetchall()
    finally:
        conn.execute("COMMIT")
    return {s: o for s, o in rows}, version


_EPOCH: Final = date(1970, 1, 1)


def _day(d: date | None) -> int | None:
    return None if d is None else (d - _EPOCH).days


class MarketStore:
    """Bars of every tenant in the service's DuckDB database (see the module's "Read cache").

    `cache_max_rows` bounds the cached series (12 bytes a row); 0 keeps none (every metric
    request reads its series from DuckDB); `cache_max_tenants` bounds the owner maps.
    """

    def __init__(
        self, db: Database, *, cache_max_rows: int = 5_000_000, cache_max_tenants: int = 1024
    ) -> None:
        self.db = db
        self.cache_max_rows = cache_max_rows
        self.cache_max_tenants = cache_max_tenants
        self._version: int | None = None  # None: unknown, read it from the database
        self._owners: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._series: OrderedDict[tuple[str, str], _Series] = OrderedDict()
        self._rows = 0

    def _reset(self, version: int | None) -> None:
        self._version = version
        self._owners.clear()
        self._series.clear()
        self._rows = 0

    async def upsert(self, tenant: str, bars: BarColumns) -> UpsertCounts:
        """Insert new keys, replace changed bars, leave identical ones; one transaction."""
        if len(bars) == 0:
            return UpsertCounts(0, 0, 0, await self.data_version())
        table = _arrow_table(bars)
        try:
            counts = await self.db.write("upsert_bars", _upsert, tenant, table)
        except BaseException:
            self._reset(None)  # cancelled or failed: it may have committed all the same
            raise
        if counts.data_version != self._version:
            self._reset(counts.data_version)
        return counts

    async def data_version(self) -> int:
        if self._version is None:
            version = await self.db.read("data_version", _version)
            if self._version is None:  # no write finished meanwhile
                self._version = version
            return version
        return self._version

    async def bar_count(self, tenant: str) -> int:
        return await self.db.read("count_bars", _count, tenant)

    async def list_symbols(self, tenant: str) -> list[SymbolSummary]:
        return await self.db.read("list_symbols", _list_symbols, tenant)

    async def resolve(self, tenant: str, symbols: Sequence[str]) -> dict[str, str]:
        """Owner tenant of each symbol the caller can read; unknown symbols are absent."""
        cached = self._owners.get(tenant)
        if cached is not None:
            self._owners.move_to_end(tenant)
            owners = cached
        else:
            owners, version = await self.db.read("resolve_symbols", _owners_of, tenant)
            if version == await self.data_version():
                self._owners[tenant] = owners
                if len(self._owners) > self.cache_max_tenants:
                    self._owners.popitem(last=False)
        return {s: owners[s] for s in symbols if s in owners}

    async def bars(
        self, owner: str, symbol: str, start: date | None, end: date | None
    ) -> BarColumns:
        return await self.db.read("read_bars", _bars, owner, symbol, start, end)

    async def adj_closes(
        self, owners: dict[str, str], start: date | None, end: date | None
    ) -> PricePanel:
        """Adjusted closes of `owners`' series (symbol -> owner, in column order) within
        [start, end], and the data version they are all from."""
        keys = [(owner, symbol) for symbol, owner in owners.items()]
        version = await self.data_version()
        found = {key: self._series.get(key) for key in keys}
        missing = [key for key, series in found.items() if series is None]
        if missing:
            loaded, read_at = await self.db.read("read_adj_close", _series, missing)
            if read_at == version == self._version:  # the cached ones are from it too
                found.update(zip(missing, loaded, strict=True))
                self._keep(missing, loaded)
            else:  # a commit landed meanwhile: read everything at one version, keep nothing
                loaded, version = await self.db.read("read_adj_close", _series, keys)
                found = dict(zip(keys, loaded, strict=True))
        for key in keys:
            if key in self._series:
                self._series.move_to_end(key)
        first, last = _day(start), _day(end)
        columns = [np.zeros(0, np.int32)]
        days = [np.zeros(0, np.int32)]
        prices = [np.zeros(0, np.int64)]
        for col, key in enumerate(keys):
            series = found[key]
            assert series is not None
            part = series.between(first, last)
            days.append(series.days[part])
            prices.append(series.adj_close_micros[part])
            columns.append(np.full(len(days[-1]), col, dtype=np.int32))
        return PricePanel(
            np.concatenate(columns), np.concatenate(days), np.concatenate(prices), version
        )

    def _keep(self, keys: list[tuple[str, str]], loaded: list[_Series]) -> None:
        for key, series in zip(keys, loaded, strict=True):
            if key in self._series or len(series.days) > self.cache_max_rows:
                continue
            self._series[key] = series
            self._rows += len(series.days)
        while self._rows > self.cache_max_rows:
            _, evicted = self._series.popitem(last=False)
            self._rows -= len(evicted.days)


__all__ = [
    "SHARED_TENANT",
    "MarketStore",
    "PricePanel",
    "SymbolSummary",
    "UpsertCounts",
]
