"""All SQL of the analytics service: bars, their upsert, and the data version.

Runs on :class:`libs.common.duck.Database` (reads on the reader pool, writes through the
group committer), never imports grpc. Prices cross this boundary as int64 micro-units
(DECIMAL(18,6) scaled by 1e6, exact); dates as ``datetime64[D]``.

Tenancy: every row carries its tenant. A tenant reads its own bars of a symbol if it has
any, else the shared reference data (:data:`SHARED_TENANT`), never another tenant's.
"""

from __future__ import annotations

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


def _resolve(conn: Cursor, tenant: str, symbols: list[str]) -> dict[str, str]:
    rows = conn.execute(
        f"""
        WITH resolved AS ({_RESOLVED})
        SELECT symbol, owner FROM resolved WHERE list_contains($symbols, symbol)
        """,
        {"tenant": tenant, "shared": SHARED_TENANT, "symbols": symbols},
    ).fetchall()
    return {s: o for s, o in rows}


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


def _adj_closes(
    conn: Cursor, owners: dict[str, str], start: date | None, end: date | None
) -> PricePanel:
    # One transaction: the version reported is the one the prices were read at.
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
            WHERE ($start IS NULL OR b.ts >= $start) AND ($end IS NULL OR b.ts <= $end)
            """,
            params={
                "owners": list(owners.values()),
                "symbols": list(owners.keys()),
                "start": start,
                "end": end,
            },
        ).to_arrow_table()
    finally:
        conn.execute("COMMIT")
    return PricePanel(
        table.column("col").to_numpy().astype(np.int32, copy=False),
        table.column("day").to_numpy().astype(np.int32, copy=False),
        _decimal_words(table.column("adj_close")),
        version,
    )


class MarketStore:
    """Bars of every tenant in the service's DuckDB database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def upsert(self, tenant: str, bars: BarColumns) -> UpsertCounts:
        """Insert new keys, replace changed bars, leave identical ones; one transaction."""
        if len(bars) == 0:
            return UpsertCounts(0, 0, 0, await self.data_version())
        table = _arrow_table(bars)
        return await self.db.write("upsert_bars", _upsert, tenant, table)

    async def data_version(self) -> int:
        return await self.db.read("data_version", _version)

    async def bar_count(self, tenant: str) -> int:
        return await self.db.read("count_bars", _count, tenant)

    async def list_symbols(self, tenant: str) -> list[SymbolSummary]:
        return await self.db.read("list_symbols", _list_symbols, tenant)

    async def resolve(self, tenant: str, symbols: Sequence[str]) -> dict[str, str]:
        """Owner tenant of each symbol the caller can read; unknown symbols are absent."""
        return await self.db.read("resolve_symbols", _resolve, tenant, list(symbols))

    async def bars(
        self, owner: str, symbol: str, start: date | None, end: date | None
    ) -> BarColumns:
        return await self.db.read("read_bars", _bars, owner, symbol, start, end)

    async def adj_closes(
        self, owners: dict[str, str], start: date | None, end: date | None
    ) -> PricePanel:
        return await self.db.read("read_adj_close", _adj_closes, owners, start, end)


__all__ = [
    "SHARED_TENANT",
    "MarketStore",
    "PricePanel",
    "SymbolSummary",
    "UpsertCounts",
]
