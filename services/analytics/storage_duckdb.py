"""The DuckDB backend of the analytics store: the embedded default (`make run`, dev).

Runs on :class:`libs.common.duck.Database` (reads on the reader pool, each multi-statement
read in one transaction so it sees one state; writes through the group committer, which
answers after COMMIT). This process is the only writer of its file (DuckDB locks it), hence
``sole_writer``: :class:`~services.analytics.storage.MarketStore` then knows the versions
without asking. Ingest registers the bars as an Arrow table (prices as decimal128(18, 6)
built from the micro-units without per-value Python work), classifies each row against the
stored one (insert / same / update) and upserts only what changed, so the counts are
exact and a re-ingest writes nothing. Reads return prices through the decimals' unscaled
integers (zero-copy for the adjusted-close series).

Versions live in ``data_versions(tenant, version)`` (migration 003, which replaced the
single global row and seeded the shared row with its value, so no version a client had
seen goes backwards).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from datetime import date
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from libs.common.duck import Cursor, Database
from services.analytics.bars import MICROS, BarColumns
from services.analytics.storage import (
    SHARED_TENANT,
    Series,
    SymbolSummary,
    Upserted,
    readable_tenants,
)

T = TypeVar("T")

_PRICE_COLUMNS: Final = ("open", "high", "low", "close", "adj_close")
_MICROS_SQL: Final = ", ".join(
    f"CAST({c}::DECIMAL(38,6) * {MICROS} AS BIGINT) AS {c}" for c in _PRICE_COLUMNS
)


def _decimal_array(micros: npt.NDArray[np.int64]) -> pa.Array:
    """int64 micro-units -> Arrow decimal128(18, 6) without any per-value Python work."""
    values = np.ascontiguousarray(micros, dtype=np.int64)
    words = np.empty((values.shape[0], 2), dtype=np.int64)
    words[:, 0] = values
    words[:, 1] = values >> 63  # sign extension to 128 bits (little endian)
    return pa.Array.from_buffers(pa.decimal128(18, 6), values.shape[0], [None, pa.py_buffer(words)])


def arrow_table(bars: BarColumns) -> pa.Table:
    return pa.table(
        {
            "symbol": pa.array(bars.symbols.astype(str), type=pa.string()),
            "ts": pa.array(bars.days.astype("datetime64[D]")),
            **{c: _decimal_array(getattr(bars, c)) for c in _PRICE_COLUMNS},
            "volume": pa.array(bars.volume, type=pa.int64()),
        }
    )


def _versions(conn: Cursor, tenant: str) -> dict[str, int]:
    readable = readable_tenants(tenant)
    rows = conn.execute(
        "SELECT tenant, version FROM data_versions WHERE tenant IN ($tenant, $shared)",
        {"tenant": tenant, "shared": SHARED_TENANT},
    ).fetchall()
    found = {t: int(v) for t, v in rows}
    return {t: found.get(t, 0) for t in readable}


def upsert(conn: Cursor, tenant: str, table: pa.Table) -> Upserted:
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
        conn.execute(
            """
            INSERT INTO data_versions VALUES ($tenant, 1)
            ON CONFLICT (tenant) DO UPDATE SET version = data_versions.version + 1
            """,
            {"tenant": tenant},
        )
    conn.execute("DROP TABLE staged_bars")
    return Upserted(inserted, updated, int(counts.get("same", 0)), _versions(conn, tenant))


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


def _in_transaction(conn: Cursor, fn: Callable[[], T]) -> T:
    """`fn()` inside one read transaction: every statement sees the same state."""
    conn.execute("BEGIN TRANSACTION")
    try:
        return fn()
    finally:
        conn.execute("COMMIT")


def _list_symbols(conn: Cursor, tenant: str) -> tuple[list[SymbolSummary], dict[str, int]]:
    def read() -> tuple[list[SymbolSummary], dict[str, int]]:
        rows = conn.execute(
            f"""
            WITH resolved AS ({_RESOLVED})
            SELECT b.symbol, min(b.ts), max(b.ts), count(*), r.owner = $shared
            FROM bars b JOIN resolved r ON b.tenant = r.owner AND b.symbol = r.symbol
            WHERE b.tenant IN ($tenant, $shared)
            GROUP BY b.symbol, r.owner
            ORDER BY b.symbol
            """,
            {"tenant": tenant, "shared": SHARED_TENANT},
        ).fetchall()
        summaries = [
            SymbolSummary(s, first, last, int(n), bool(shared))
            for s, first, last, n, shared in rows
        ]
        return summaries, _versions(conn, tenant)

    return _in_transaction(conn, read)


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


def _read_series(conn: Cursor, tenant: str, keys: Sequence[tuple[str, str]]) -> list[Series]:
    if not keys:
        return []
    table = conn.sql(
        """
        WITH wanted AS (
            SELECT unnest($owners) AS tenant, unnest($symbols) AS symbol,
                   unnest(range(len($symbols))) AS col)
        SELECT w.col::INTEGER AS col, (b.ts - DATE '1970-01-01')::INTEGER AS day, b.adj_close
        FROM bars b JOIN wanted w ON b.tenant = w.tenant AND b.symbol = w.symbol
        WHERE b.tenant IN ($tenant, $shared)
        ORDER BY col, day
        """,
        params={
            "owners": [o for o, _ in keys],
            "symbols": [s for _, s in keys],
            "tenant": tenant,
            "shared": SHARED_TENANT,
        },
    ).to_arrow_table()
    cols = table.column("col").to_numpy()
    days = table.column("day").to_numpy().astype(np.int32, copy=False)
    prices = _decimal_words(table.column("adj_close"))
    bounds = np.searchsorted(cols, np.arange(len(keys) + 1), "left")
    return [Series(days[a:b].copy(), prices[a:b].copy()) for a, b in itertools.pairwise(bounds)]


def _owners_now(conn: Cursor, tenant: str) -> dict[str, str]:
    rows = conn.execute(_RESOLVED, {"tenant": tenant, "shared": SHARED_TENANT}).fetchall()
    return {s: o for s, o in rows}


def _series(
    conn: Cursor, tenant: str, keys: Sequence[tuple[str, str]]
) -> tuple[list[Series], dict[str, int]]:
    return _in_transaction(
        conn, lambda: (_read_series(conn, tenant, keys), _versions(conn, tenant))
    )


def _owners(conn: Cursor, tenant: str) -> tuple[dict[str, str], dict[str, int]]:
    return _in_transaction(conn, lambda: (_owners_now(conn, tenant), _versions(conn, tenant)))


def _resolved_series(
    conn: Cursor, tenant: str, symbols: Sequence[str]
) -> tuple[dict[str, str], list[Series], dict[str, int]]:
    def read() -> tuple[dict[str, str], list[Series], dict[str, int]]:
        owners = _owners_now(conn, tenant)
        keys = [(owners[s], s) for s in symbols if s in owners]
        return owners, _read_series(conn, tenant, keys), _versions(conn, tenant)

    return _in_transaction(conn, read)


def _nothing(conn: Cursor) -> None:
    return None


class DuckMarketBackend:
    """:class:`~services.analytics.storage.MarketBackend` on this process's DuckDB file."""

    sole_writer = True

    def __init__(self, db: Database) -> None:
        self.db = db

    async def upsert(self, tenant: str, bars: BarColumns) -> Upserted:
        return await self.db.write("upsert_bars", upsert, tenant, arrow_table(bars))

    async def load_shared(self, parse: Callable[[], BarColumns]) -> Upserted | None:
        # The only writer: nobody else can load between the check and the write.
        if await self.bar_count(SHARED_TENANT) > 0:
            return None
        bars = await asyncio.to_thread(parse)
        return await self.upsert(SHARED_TENANT, bars)

    async def settle(self) -> None:
        # The group committer is one FIFO writer: once this no-op has committed, every
        # write queued before it has committed or failed.
        await self.db.write("settle_writes", _nothing)

    async def versions(self, tenant: str) -> dict[str, int]:
        return await self.db.read("data_version", _versions, tenant)

    async def bar_count(self, tenant: str) -> int:
        return await self.db.read("count_bars", _count, tenant)

    async def list_symbols(self, tenant: str) -> tuple[list[SymbolSummary], dict[str, int]]:
        return await self.db.read("list_symbols", _list_symbols, tenant)

    async def owners(self, tenant: str) -> tuple[dict[str, str], dict[str, int]]:
        return await self.db.read("resolve_symbols", _owners, tenant)

    async def bars(
        self, owner: str, symbol: str, start: date | None, end: date | None
    ) -> BarColumns:
        return await self.db.read("read_bars", _bars, owner, symbol, start, end)

    async def series(
        self, tenant: str, keys: Sequence[tuple[str, str]]
    ) -> tuple[list[Series], dict[str, int]]:
        return await self.db.read("read_adj_close", _series, tenant, list(keys))

    async def resolved_series(
        self, tenant: str, symbols: Sequence[str]
    ) -> tuple[dict[str, str], list[Series], dict[str, int]]:
        return await self.db.read("resolve_read_adj_close", _resolved_series, tenant, list(symbols))


__all__ = ["DuckMarketBackend", "arrow_table", "upsert"]
