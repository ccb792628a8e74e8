"""The PostgreSQL backend of the analytics store: the production store, N replicas.

Runs on :class:`libs.common.pg.PgDatabase` (psycopg 3 async): reads that need one state
run in a REPEATABLE READ READ ONLY snapshot, writes in one transaction that returns after
COMMIT and is re-run by the kit on a deadlock or serialization failure (every step below
derives from what it reads, so a re-run is safe). Any replica may write, so
``sole_writer`` is False: :class:`~services.analytics.storage.MarketStore` reads the
versions once per request (``data_versions``, a primary-key read) instead of trusting
what it saw last. Every statement is in :data:`SQL`; each filters by tenant (checked by
tests/analytics/test_store_replicas.py with tests/tenant_sql.py).

Ingest, one transaction:

1. Lock the tenant: its ``data_versions`` row, ``SELECT ... FOR UPDATE``. Ingests of one
   tenant are serialized across replicas (other tenants' run in parallel), so what the
   statements below read of the tenant's bars is exactly what they change: the inserted /
   updated / unchanged counts are exact, nothing is lost or counted twice, and the packed
   series (below) are extended from a state nobody else is changing.
2. COPY the bars in binary into a session temp table (``ON COMMIT DELETE ROWS``, created
   once per connection): fixed-width rows built with numpy in one buffer, no per-value
   Python work -- the symbol as an index into a text[] parameter, the day as PostgreSQL's
   binary date, prices as binary NUMERIC built from the micro-units (exact: the digits
   are the micro-units' decimal digits), the volume as int8.
3. Symbols the tenant has no bars of yet: a plain INSERT (nothing can conflict, see
   ``insert_fresh``). Symbols it has: one statement classifies each staged row against the
   stored bar and ``INSERT ... ON CONFLICT (tenant, symbol, ts) DO UPDATE ... WHERE (...)
   IS DISTINCT FROM (...)`` only the new and changed ones -- an identical re-ingest writes
   nothing (ON CONFLICT alone would lock every conflicting row even when it changes none)
   -- and reports per symbol how many rows were new, changed, and from which day.
4. The packed series (``bar_series``: one row per symbol with the whole adjusted-close
   series as int4 days + int8 micro-units): new symbols and symbols that only gained days
   after their last one get the new days appended, packed here with numpy; a symbol with
   corrections or days inserted before its last one is rebuilt from ``bars``.
5. Bump the tenant's version if anything changed; read the caller's versions.

Prices come back by an exact multiplication by 1000000 to int8, so the round trip of
micro-units is exact and equal to DuckDB's bit for bit. Metric reads take the packed
series (one row per symbol, a byte copy) instead of ~8,000 rows per symbol: reading the 20
sample series row by row costs ~60 ms of PostgreSQL CPU, packed ~2-4 ms. ListSymbols and
symbol resolution read the same rows' summary columns.

Sample data: `load_shared` runs in a write transaction that first takes a
transaction-level advisory lock without waiting (``pg_try_advisory_xact_lock``) and checks
"does the shared tenant have bars?" inside it. Of replicas starting together one gets the
lock and loads (parsing inside its transaction); the others retry every 0.2 s until they
find the data, so exactly one load happens and nobody waits out a statement timeout.

The staging table is the one table without `tenant`: it is temporary, per session, never
distributed. Like the kit's session settings it needs session pooling behind PgBouncer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from libs.common.pg import Conn, PgDatabase
from services.analytics.bars import BarColumns
from services.analytics.storage import (
    SHARED_TENANT,
    Series,
    SymbolSummary,
    Upserted,
    readable_tenants,
)

# work_mem of an ingest transaction (each of its hashes and sorts may use this much).
INGEST_WORK_MEM: Final = "64MB"
_SAMPLE_LOCK: Final = f"finsight-analytics:load-shared:{SHARED_TENANT}"
_DAYS_1970_TO_2000: Final = 10_957  # PostgreSQL's binary date counts days from 2000-01-01

# Every statement this backend runs (the schema test checks that each filters by tenant).
SQL: Final = {
    "versions": "SELECT tenant, version FROM data_versions WHERE tenant = ANY(%(tenants)s)",
    "lock_tenant_insert": (
        "INSERT INTO data_versions (tenant, version) VALUES (%(tenant)s, 0) "
        "ON CONFLICT (tenant) DO NOTHING"
    ),
    "lock_tenant": "SELECT version FROM data_versions WHERE tenant = %(tenant)s FOR UPDATE",
    "bump_version": ("UPDATE data_versions SET version = version + 1 WHERE tenant = %(tenant)s"),
    "ingest_work_mem": "SELECT set_config('work_mem', %(work_mem)s, true)",
    "staging_table": """
        CREATE TEMP TABLE IF NOT EXISTS staged_bars (
            sym INTEGER NOT NULL, ts DATE NOT NULL,
            open NUMERIC NOT NULL, high NUMERIC NOT NULL, low NUMERIC NOT NULL,
            close NUMERIC NOT NULL, adj_close NUMERIC NOT NULL, volume BIGINT NOT NULL
        ) ON COMMIT DELETE ROWS""",
    "copy_staged": "COPY staged_bars FROM STDIN (FORMAT BINARY)",
    "existing_symbols": (
        "SELECT symbol, last_day FROM bar_series "
        "WHERE tenant = %(tenant)s AND symbol = ANY(%(symbols)s::text[])"
    ),
    # Symbols the tenant has no bar of: every staged row is new. Nothing can conflict (the
    # tenant is locked, and a series row exists iff bars do), so a plain INSERT: ON
    # CONFLICT's speculative insertion would cost ~45 % more for no effect, and were the
    # invariant ever broken, the primary key fails the ingest instead of hiding it.
    "insert_fresh": """
        INSERT INTO bars (tenant, symbol, ts, open, high, low, close, adj_close, volume)
        SELECT %(tenant)s, n.symbol, s.ts, s.open, s.high, s.low, s.close, s.adj_close, s.volume
        FROM staged_bars s
        JOIN unnest(%(symbols)s::text[]) WITH ORDINALITY AS n(symbol, idx) ON n.idx = s.sym
        WHERE s.sym = ANY(%(fresh)s::int[])""",
    # Symbols with bars already: classify each staged row, write the new and changed ones,
    # and say per symbol how many of each and from which day on.
    "upsert_existing": """
        WITH changed AS MATERIALIZED (
            SELECT n.symbol, s.ts, s.open, s.high, s.low, s.close, s.adj_close, s.volume,
                   b.ts IS NULL AS is_new
            FROM staged_bars s
            JOIN unnest(%(symbols)s::text[]) WITH ORDINALITY AS n(symbol, idx) ON n.idx = s.sym
            LEFT JOIN bars b ON b.tenant = %(tenant)s AND b.symbol = n.symbol AND b.ts = s.ts
            WHERE s.sym = ANY(%(existing)s::int[])
              AND (b.ts IS NULL
                   OR (b.open, b.high, b.low, b.close, b.adj_close, b.volume)
                      IS DISTINCT FROM (s.open, s.high, s.low, s.close, s.adj_close, s.volume))
        ), written AS (
            INSERT INTO bars AS b (tenant, symbol, ts, open, high, low, close, adj_close, volume)
            SELECT %(tenant)s, symbol, ts, open, high, low, close, adj_close, volume
            FROM changed
            ON CONFLICT (tenant, symbol, ts) DO UPDATE SET
                open = excluded.open, high = excluded.high, low = excluded.low,
                close = excluded.close, adj_close = excluded.adj_close, volume = excluded.volume
            WHERE (b.open, b.high, b.low, b.close, b.adj_close, b.volume)
                  IS DISTINCT FROM (excluded.open, excluded.high, excluded.low,
                                    excluded.close, excluded.adj_close, excluded.volume)
        )
        SELECT symbol, count(*) FILTER (WHERE is_new), count(*) FILTER (WHERE NOT is_new),
               min(ts)
        FROM changed GROUP BY symbol""",
    # New trailing days of each symbol, packed by the caller, appended to its series.
    "append_series": """
        INSERT INTO bar_series AS x
            (tenant, symbol, first_day, last_day, bar_count, days, adj_close)
        SELECT %(tenant)s, a.symbol, a.first_day, a.last_day, a.bar_count, a.days, a.adj_close
        FROM unnest(%(symbols)s::text[], %(firsts)s::date[], %(lasts)s::date[],
                    %(counts)s::int8[], %(days)s::bytea[], %(prices)s::bytea[])
             AS a(symbol, first_day, last_day, bar_count, days, adj_close)
        ON CONFLICT (tenant, symbol) DO UPDATE SET
            last_day = excluded.last_day,
            bar_count = x.bar_count + excluded.bar_count,
            days = x.days || excluded.days,
            adj_close = x.adj_close || excluded.adj_close""",
    # The packed series of symbols whose change was not a pure append, rebuilt from bars.
    "rebuild_series": """
        INSERT INTO bar_series AS x
            (tenant, symbol, first_day, last_day, bar_count, days, adj_close)
        SELECT tenant, symbol, min(ts), max(ts), count(*),
               string_agg(int4send(ts - DATE '1970-01-01'), ''::bytea ORDER BY ts),
               string_agg(int8send((adj_close * 1000000)::int8), ''::bytea ORDER BY ts)
        FROM bars WHERE tenant = %(tenant)s AND symbol = ANY(%(symbols)s::text[])
        GROUP BY tenant, symbol
        ON CONFLICT (tenant, symbol) DO UPDATE SET
            first_day = excluded.first_day, last_day = excluded.last_day,
            bar_count = excluded.bar_count, days = excluded.days,
            adj_close = excluded.adj_close""",
    "count_bars": (
        "SELECT coalesce(sum(bar_count), 0)::bigint FROM bar_series WHERE tenant = %(tenant)s"
    ),
    "shared_exists": "SELECT EXISTS (SELECT 1 FROM bar_series WHERE tenant = %(tenant)s)",
    "sample_lock": "SELECT pg_try_advisory_xact_lock(hashtextextended(%(lock)s, 0))",
    "summaries": (
        "SELECT tenant, symbol, first_day, last_day, bar_count FROM bar_series "
        "WHERE tenant = ANY(%(tenants)s)"
    ),
    "owners": "SELECT tenant, symbol FROM bar_series WHERE tenant = ANY(%(tenants)s)",
    "series": """
        SELECT x.tenant, x.symbol, x.days, x.adj_close
        FROM bar_series x
        JOIN unnest(%(owners)s::text[], %(symbols)s::text[]) AS w(tenant, symbol)
          ON x.tenant = w.tenant AND x.symbol = w.symbol
        WHERE x.tenant = ANY(%(tenants)s)""",
    "bars": """
        SELECT string_agg(int4send(ts - DATE '1970-01-01'), ''::bytea ORDER BY ts),
               string_agg(int8send((open * 1000000)::int8), ''::bytea ORDER BY ts),
               string_agg(int8send((high * 1000000)::int8), ''::bytea ORDER BY ts),
               string_agg(int8send((low * 1000000)::int8), ''::bytea ORDER BY ts),
               string_agg(int8send((close * 1000000)::int8), ''::bytea ORDER BY ts),
               string_agg(int8send((adj_close * 1000000)::int8), ''::bytea ORDER BY ts),
               string_agg(int8send(volume), ''::bytea ORDER BY ts)
        FROM bars
        WHERE tenant = %(owner)s AND symbol = %(symbol)s
          AND ts >= %(start)s AND ts <= %(end)s""",
}

# One staged row in COPY BINARY: a 16-bit field count, then (32-bit length, value) per
# field. Prices go in as PostgreSQL's binary NUMERIC, built from the micro-units: 5
# base-10000 digits (weight 2: three integer digits cover < 10^12, two fraction digits the
# 6 decimals), display scale 6; the server strips the zero digits. Exact, and no
# conversion left to do in SQL.
_PRICES: Final = ("open", "high", "low", "close", "adj_close")
_NUMERIC: Final = [
    ("len", ">i4"),
    ("ndigits", ">i2"),
    ("weight", ">i2"),
    ("sign", ">u2"),
    ("dscale", ">i2"),
    ("digits", ">i2", (5,)),
]
_ROW: Final = np.dtype(
    [
        ("fields", ">i2"),
        ("sym_len", ">i4"),
        ("sym", ">i4"),
        ("ts_len", ">i4"),
        ("ts", ">i4"),
        *((name, _NUMERIC) for name in _PRICES),
        ("volume_len", ">i4"),
        ("volume", ">i8"),
    ]
)
_NUMERIC_NEG: Final = 0x4000
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER: Final = b"\xff\xff"
_COPY_CHUNK: Final = 4 << 20


def _numeric_digits(micros: npt.NDArray[np.int64], out: npt.NDArray[Any]) -> None:
    """|micros| / 1e6 as 5 base-10000 digits into `out` (one row per value, most
    significant first)."""
    whole, frac = np.divmod(np.abs(micros), 1_000_000)
    out[:, 0] = whole // 10**8
    out[:, 1] = (whole // 10**4) % 10**4
    out[:, 2] = whole % 10**4
    out[:, 3] = frac // 100
    out[:, 4] = (frac % 100) * 100


@dataclass(frozen=True, slots=True)
class _Staged:
    """Bars as COPY BINARY rows (sent between the header and the trailer, never copied
    into one more buffer), the symbols their `sym` field indexes (1-based), and the
    columns the packed series are built from."""

    payload: npt.NDArray[np.uint8]
    symbols: list[str]
    sym: npt.NDArray[np.int32]  # 1-based index into `symbols`, per row
    days: npt.NDArray[np.int32]  # days since 1970-01-01
    adj_close: npt.NDArray[np.int64]  # micro-units

    @property
    def rows(self) -> int:
        return len(self.sym)


def _stage(bars: BarColumns) -> _Staged:
    """The COPY payload of `bars` (CPU only: run it in a thread for big ingests)."""
    encoded = pa.array(bars.symbols, type=pa.string()).dictionary_encode()
    sym = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32) + 1
    days = bars.days.astype("datetime64[D]").astype(np.int64).astype(np.int32)
    rows = np.empty(len(bars), dtype=_ROW)
    rows["fields"] = 8
    rows["sym_len"], rows["sym"] = 4, sym
    rows["ts_len"], rows["ts"] = 4, days - _DAYS_1970_TO_2000
    for name in _PRICES:
        micros = np.asarray(getattr(bars, name), dtype=np.int64)
        field = rows[name]
        field["len"], field["ndigits"], field["weight"], field["dscale"] = 18, 5, 2, 6
        field["sign"] = np.where(micros < 0, _NUMERIC_NEG, 0)
        _numeric_digits(micros, field["digits"])
    rows["volume_len"], rows["volume"] = 8, bars.volume
    return _Staged(
        rows.view(np.uint8),
        encoded.dictionary.to_pylist(),
        sym,
        days,
        np.asarray(bars.adj_close, dtype=np.int64),
    )


_EPOCH: Final = date(1970, 1, 1)


def _packed(staged: _Staged, wanted: dict[int, int | None]) -> dict[str, Any]:
    """The append_series arguments: per symbol index in `wanted`, its staged rows after the
    day given (None: all of them), sorted by day and packed."""
    index = np.fromiter(wanted, dtype=np.int32, count=len(wanted))
    after = np.array([-(2**31) if d is None else d for d in wanted.values()], dtype=np.int64)
    position = np.full(len(staged.symbols) + 1, -1, dtype=np.int64)
    position[index] = np.arange(len(index))
    slot = position[staged.sym]
    keep = (slot >= 0) & (staged.days > after[np.maximum(slot, 0)])
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((staged.days[rows], slot[rows]))]
    bounds = np.searchsorted(slot[rows], np.arange(len(index) + 1))
    out: dict[str, list[Any]] = {k: [] for k in ("symbols", "firsts", "lasts", "counts")}
    out |= {"days": [], "prices": []}
    for i, sym in enumerate(index.tolist()):
        part = rows[bounds[i] : bounds[i + 1]]
        days = staged.days[part]
        out["symbols"].append(staged.symbols[sym - 1])
        out["firsts"].append(_EPOCH + timedelta(days=int(days[0])))
        out["lasts"].append(_EPOCH + timedelta(days=int(days[-1])))
        out["counts"].append(len(part))
        out["days"].append(days.astype(">i4").tobytes())
        out["prices"].append(staged.adj_close[part].astype(">i8").tobytes())
    return out


async def _versions(conn: Conn, tenant: str) -> dict[str, int]:
    readable = readable_tenants(tenant)
    cur = await conn.execute(SQL["versions"], {"tenants": list(readable)})
    found = {t: int(v) for t, v in await cur.fetchall()}
    return {t: found.get(t, 0) for t in readable}


async def _upsert(conn: Conn, tenant: str, staged: _Staged) -> Upserted:
    """Inside the caller's write transaction (see the module docstring, "Ingest")."""
    args: dict[str, Any] = {"tenant": tenant, "symbols": staged.symbols}
    await conn.execute(SQL["lock_tenant_insert"], args)
    await conn.execute(SQL["lock_tenant"], args)
    await conn.execute(SQL["ingest_work_mem"], {"work_mem": INGEST_WORK_MEM}, prepare=False)
    await conn.execute(SQL["staging_table"], prepare=False)
    cur = conn.cursor()
    async with cur.copy(SQL["copy_staged"]) as copy:
        await copy.write(_COPY_HEADER)
        for at in range(0, len(staged.payload), _COPY_CHUNK):
            await copy.write(staged.payload[at : at + _COPY_CHUNK].data)
        await copy.write(_COPY_TRAILER)
    index = {symbol: i for i, symbol in enumerate(staged.symbols, start=1)}
    rows = await (await conn.execute(SQL["existing_symbols"], args, prepare=False)).fetchall()
    last_day = {index[symbol]: (day - _EPOCH).days for symbol, day in rows}
    fresh = [i for i in index.values() if i not in last_day]
    inserted = updated = 0
    append: dict[int, int | None] = {}
    rebuild: list[str] = []
    if fresh:
        done = await conn.execute(SQL["insert_fresh"], {**args, "fresh": fresh}, prepare=False)
        inserted += done.rowcount
        append |= dict.fromkeys(fresh)
    if last_day:
        changes = await (
            await conn.execute(
                SQL["upsert_existing"], {**args, "existing": list(last_day)}, prepare=False
            )
        ).fetchall()
        for symbol, new, changed, first in changes:
            inserted, updated = inserted + new, updated + changed
            i = index[symbol]
            if changed == 0 and (first - _EPOCH).days > last_day[i]:
                append[i] = last_day[i]  # only new days after the stored ones
            else:
                rebuild.append(symbol)
    if append:
        await conn.execute(
            SQL["append_series"], {"tenant": tenant, **_packed(staged, append)}, prepare=False
        )
    if rebuild:
        await conn.execute(
            SQL["rebuild_series"], {"tenant": tenant, "symbols": rebuild}, prepare=False
        )
    if inserted + updated:
        await conn.execute(SQL["bump_version"], args)
    unchanged = staged.rows - inserted - updated
    return Upserted(inserted, updated, unchanged, await _versions(conn, tenant))


@dataclass(frozen=True, slots=True)
class _Busy:
    """Another replica holds the sample-load lock right now."""


async def _load_if_empty(conn: Conn, parse: Callable[[], BarColumns]) -> Upserted | _Busy | None:
    lock = await (await conn.execute(SQL["sample_lock"], {"lock": _SAMPLE_LOCK})).fetchone()
    if not (lock and lock[0]):
        return _Busy()
    present = await (await conn.execute(SQL["shared_exists"], {"tenant": SHARED_TENANT})).fetchone()
    if present and present[0]:
        return None
    staged = await asyncio.to_thread(lambda: _stage(parse()))
    return await _upsert(conn, SHARED_TENANT, staged)


def _resolve(rows: Sequence[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """symbol -> its row, the caller's own over the shared one (rows lead with tenant)."""
    chosen: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[0] != SHARED_TENANT or row[1] not in chosen:
            chosen[row[1]] = row
    return chosen


async def _owners_now(conn: Conn, tenant: str) -> dict[str, str]:
    cur = await conn.execute(SQL["owners"], {"tenants": list(readable_tenants(tenant))})
    return {symbol: row[0] for symbol, row in _resolve(await cur.fetchall()).items()}


async def _list_symbols(conn: Conn, tenant: str) -> tuple[list[SymbolSummary], dict[str, int]]:
    cur = await conn.execute(SQL["summaries"], {"tenants": list(readable_tenants(tenant))})
    chosen = _resolve(await cur.fetchall())
    summaries = [
        SymbolSummary(symbol, first, last, int(n), owner == SHARED_TENANT)
        for symbol, (owner, _, first, last, n) in sorted(chosen.items())
    ]
    return summaries, await _versions(conn, tenant)


def _int_array(data: bytes | None, kind: str) -> npt.NDArray[Any]:
    if data is None:
        return np.zeros(0, dtype=kind)
    return np.frombuffer(data, dtype=np.dtype(kind).newbyteorder(">")).astype(kind)


async def _read_series(conn: Conn, tenant: str, keys: Sequence[tuple[str, str]]) -> list[Series]:
    if not keys:
        return []
    cur = conn.cursor(binary=True)
    await cur.execute(
        SQL["series"],
        {
            "owners": [o for o, _ in keys],
            "symbols": [s for _, s in keys],
            "tenants": list(readable_tenants(tenant)),
        },
    )
    packed = {
        (owner, symbol): (days, prices) for owner, symbol, days, prices in await cur.fetchall()
    }
    out = []
    for key in keys:
        if key not in packed:
            out.append(Series.empty())
            continue
        days, prices = packed[key]
        out.append(Series(_int_array(days, "int32"), _int_array(prices, "int64")))
    return out


async def _series(
    conn: Conn, tenant: str, keys: Sequence[tuple[str, str]]
) -> tuple[list[Series], dict[str, int]]:
    return await _read_series(conn, tenant, keys), await _versions(conn, tenant)


async def _owners(conn: Conn, tenant: str) -> tuple[dict[str, str], dict[str, int]]:
    return await _owners_now(conn, tenant), await _versions(conn, tenant)


async def _resolved_series(
    conn: Conn, tenant: str, symbols: Sequence[str]
) -> tuple[dict[str, str], list[Series], dict[str, int]]:
    owners = await _owners_now(conn, tenant)
    keys = [(owners[s], s) for s in symbols if s in owners]
    return owners, await _read_series(conn, tenant, keys), await _versions(conn, tenant)


async def _bars(
    conn: Conn, owner: str, symbol: str, start: date | None, end: date | None
) -> BarColumns:
    cur = conn.cursor(binary=True)
    await cur.execute(
        SQL["bars"],
        {"owner": owner, "symbol": symbol, "start": start or date.min, "end": end or date.max},
    )
    row = await cur.fetchone()
    assert row is not None
    days = _int_array(row[0], "int32").astype(np.int64).astype("datetime64[D]")
    prices = [_int_array(column, "int64") for column in row[1:]]
    return BarColumns(np.full(len(days), symbol, dtype=object), days, *prices)


async def _count(conn: Conn, tenant: str) -> int:
    row = await (await conn.execute(SQL["count_bars"], {"tenant": tenant})).fetchone()
    assert row is not None
    return int(row[0])


class PgMarketBackend:
    """:class:`~services.analytics.storage.MarketBackend` on a shared PostgreSQL database."""

    sole_writer = False
    retry_busy_s: float = 0.2

    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    async def upsert(self, tenant: str, bars: BarColumns) -> Upserted:
        staged = await asyncio.to_thread(_stage, bars)
        return await self.db.write("upsert_bars", _upsert, tenant, staged)

    async def load_shared(self, parse: Callable[[], BarColumns]) -> Upserted | None:
        while True:
            outcome = await self.db.write("load_sample", _load_if_empty, parse)
            if not isinstance(outcome, _Busy):
                return outcome
            await asyncio.sleep(self.retry_busy_s)

    async def settle(self) -> None:
        return None  # each write is its own transaction: finished when its call returns

    async def versions(self, tenant: str) -> dict[str, int]:
        return await self.db.read("data_version", _versions, tenant)

    async def bar_count(self, tenant: str) -> int:
        return await self.db.read("count_bars", _count, tenant)

    async def list_symbols(self, tenant: str) -> tuple[list[SymbolSummary], dict[str, int]]:
        return await self.db.snapshot("list_symbols", _list_symbols, tenant)

    async def owners(self, tenant: str) -> tuple[dict[str, str], dict[str, int]]:
        return await self.db.snapshot("resolve_symbols", _owners, tenant)

    async def bars(
        self, owner: str, symbol: str, start: date | None, end: date | None
    ) -> BarColumns:
        return await self.db.read("read_bars", _bars, owner, symbol, start, end)

    async def series(
        self, tenant: str, keys: Sequence[tuple[str, str]]
    ) -> tuple[list[Series], dict[str, int]]:
        return await self.db.snapshot("read_adj_close", _series, tenant, list(keys))

    async def resolved_series(
        self, tenant: str, symbols: Sequence[str]
    ) -> tuple[dict[str, str], list[Series], dict[str, int]]:
        return await self.db.snapshot(
            "resolve_read_adj_close", _resolved_series, tenant, list(symbols)
        )


__all__ = ["SQL", "PgMarketBackend"]
