"""The analytics store's contract, run against BOTH backends: a real DuckDB file and a real
PostgreSQL database (tests/conftest.py `pg_url`), through the same MarketStore.

Upsert counts and idempotency, exact decimals (and the two backends equal bit for bit),
tenant isolation (own over shared, never another tenant's), symbol listings, bar windows,
adjusted-close panels, per-tenant versions, the read cache, and the packed series staying
equal to the bars whatever kind of change came in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from libs.common.duck import Database
from libs.common.pg import PgDatabase
from services.analytics.bars import MAX_PRICE_MICROS, BarColumns
from services.analytics.main import MIGRATIONS, PG_MIGRATIONS, market_backend
from services.analytics.storage import SHARED_TENANT, MarketStore, UpsertCounts

BACKENDS = ["duckdb", "postgresql"]
D0 = dt.date(2024, 1, 1)


def bars(
    symbol: str,
    days: list[dt.date] | list[int],
    closes: list[int],
    *,
    volume: int = 1000,
    spread: int = 0,
) -> BarColumns:
    """Bars of one symbol: `days` as dates or offsets from D0, prices in micro-units."""
    dates = [d if isinstance(d, dt.date) else D0 + dt.timedelta(days=d) for d in days]
    close = np.array(closes, dtype=np.int64)
    return BarColumns(
        np.array([symbol] * len(dates), dtype=object),
        np.array(dates, dtype="datetime64[D]"),
        close,
        close + spread,
        np.maximum(close - spread, 1),
        close,
        close - 1 if spread else close,
        np.full(len(dates), volume, dtype=np.int64),
    )


def concat(*parts: BarColumns) -> BarColumns:
    return BarColumns.concat(list(parts))


def counts(c: UpsertCounts) -> tuple[int, int, int]:
    return (c.inserted, c.updated, c.unchanged)


async def open_store(kind: str, tmp_path: Path, pg_url: str | None, **cache: int) -> MarketStore:
    db: Database | PgDatabase
    if kind == "duckdb":
        db = Database(
            tmp_path / f"contract-{kind}.duckdb", name="contract", migrations_dir=MIGRATIONS
        )
    else:
        assert pg_url is not None
        db = PgDatabase(pg_url, name="contract", migrations_dir=PG_MIGRATIONS)
    await db.open()
    return MarketStore(market_backend(db), **cache)


async def close_store(store: MarketStore) -> None:
    await store.backend.db.close()  # type: ignore[attr-defined]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MarketStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = await open_store(request.param, tmp_path, url)
    yield s
    await close_store(s)


async def version(store: MarketStore, tenant: str) -> int:
    return await store.data_version(tenant)


async def stored_bars(store: MarketStore, tenant: str, symbol: str) -> BarColumns:
    got = await store.bars(await store.view(tenant), symbol, None, None)
    assert got is not None, f"{tenant} cannot read {symbol}"
    return got


def same_bars(a: BarColumns, b: BarColumns) -> None:
    for field in ("symbols", "days", "open", "high", "low", "close", "adj_close", "volume"):
        left, right = getattr(a, field), getattr(b, field)
        assert np.array_equal(left, right), field
        if field != "symbols":
            assert left.dtype == right.dtype, field


# -- upsert ----------------------------------------------------------------------------------
async def test_upsert_counts_inserts_updates_and_leaves_identical_bars(store: MarketStore) -> None:
    first = await store.upsert("acme", bars("AAA", [0, 1, 2], [10_000_000, 10_500_000, 11_000_000]))
    assert counts(first) == (3, 0, 0) and first.data_version == 1

    again = await store.upsert("acme", bars("AAA", [0, 1, 2], [10_000_000, 10_500_000, 11_000_000]))
    assert counts(again) == (0, 0, 3)
    assert again.data_version == first.data_version  # nothing changed: caches stay valid

    fixed = await store.upsert("acme", bars("AAA", [0, 1, 2], [10_000_000, 10_600_000, 11_000_000]))
    assert counts(fixed) == (0, 1, 2) and fixed.data_version == 2

    # One new day, one correction, one identical bar, and a new symbol, in one call.
    mixed = await store.upsert(
        "acme",
        concat(
            bars("AAA", [1, 2, 3], [10_600_000, 11_100_000, 12_000_000]),
            bars("BBB", [0], [5_000_000]),
        ),
    )
    assert counts(mixed) == (2, 1, 1) and mixed.data_version == 3
    # A change of the volume alone is a change.
    vol = await store.upsert("acme", bars("BBB", [0], [5_000_000], volume=7))
    assert counts(vol) == (0, 1, 0)
    assert await store.bar_count("acme") == 5
    got = await stored_bars(store, "acme", "AAA")
    assert got.close.tolist() == [10_000_000, 10_600_000, 11_100_000, 12_000_000]
    assert (await stored_bars(store, "acme", "BBB")).volume.tolist() == [7]
    empty = await store.upsert("acme", BarColumns.empty())
    assert counts(empty) == (0, 0, 0) and empty.data_version == vol.data_version


async def test_prices_and_days_round_trip_exactly(store: MarketStore) -> None:
    extremes = [1, 999_999, 1_000_000, 123_456_789_012_345_678, MAX_PRICE_MICROS, 144_000]
    days = [
        dt.date(1, 1, 1),
        dt.date(1899, 12, 31),
        dt.date(1970, 1, 1),
        dt.date(2000, 1, 1),
        dt.date(2262, 4, 12),
        dt.date(9999, 12, 31),
    ]
    written = bars("EXACT", days, extremes, volume=2**63 - 1)
    assert counts(await store.upsert("acme", written)) == (6, 0, 0)
    same_bars(await stored_bars(store, "acme", "EXACT"), written)
    panel = await store.adj_closes(await store.view("acme"), ["EXACT"], None, None)
    assert panel.adj_close_micros.tolist() == extremes
    epoch = dt.date(1970, 1, 1)
    assert panel.days.tolist() == [(d - epoch).days for d in days]
    # Re-sending the same decimals is recognised as identical, not as a change.
    assert counts(await store.upsert("acme", written)) == (0, 0, 6)


async def test_both_backends_store_and_answer_the_same_bits(tmp_path: Path, pg_url: str) -> None:
    rng = np.random.default_rng(7)
    parts = []
    for i in range(12):
        n = int(rng.integers(1, 400))
        days = sorted(rng.choice(20_000, size=n, replace=False).tolist())
        micros = rng.integers(1, MAX_PRICE_MICROS, size=n, endpoint=True).tolist()
        parts.append(bars(f"R{i:02d}", days, micros, spread=0))
    data = BarColumns.concat(parts)
    duck = await open_store("duckdb", tmp_path, None)
    pg = await open_store("postgresql", tmp_path, pg_url)
    try:
        for tenant in ("acme", SHARED_TENANT):
            assert counts(await duck.upsert(tenant, data)) == counts(await pg.upsert(tenant, data))
        symbols = [f"R{i:02d}" for i in range(12)]
        for s in symbols:
            same_bars(await stored_bars(duck, "acme", s), await stored_bars(pg, "acme", s))
        for window in ((None, None), (D0 + dt.timedelta(days=500), D0 + dt.timedelta(days=9000))):
            a = await duck.adj_closes(await duck.view("globex"), symbols, *window)
            b = await pg.adj_closes(await pg.view("globex"), symbols, *window)
            for field in ("columns", "days", "adj_close_micros"):
                assert np.array_equal(getattr(a, field), getattr(b, field)), field
            assert a.data_version == b.data_version and a.symbols == b.symbols
        assert await duck.list_symbols(await duck.view("acme")) == await pg.list_symbols(
            await pg.view("acme")
        )
    finally:
        await close_store(duck)
        await close_store(pg)


# -- tenancy ---------------------------------------------------------------------------------
async def test_own_series_wins_over_shared_and_other_tenants_stay_invisible(
    store: MarketStore,
) -> None:
    await store.upsert(SHARED_TENANT, bars("AAPL", [0, 1, 2], [100_000_000] * 3))
    await store.upsert(SHARED_TENANT, bars("MSFT", [0, 1], [200_000_000] * 2))
    await store.upsert("acme", bars("AAPL", [5, 6], [1_000_000, 2_000_000]))
    await store.upsert("acme", bars("ACMEONLY", [0], [3_000_000]))

    acme, globex = await store.view("acme"), await store.view("globex")
    assert await store.resolve(acme, ["AAPL", "MSFT", "ACMEONLY", "NOPE"]) == {
        "AAPL": "acme",
        "MSFT": SHARED_TENANT,
        "ACMEONLY": "acme",
    }
    assert await store.resolve(globex, ["AAPL", "ACMEONLY"]) == {"AAPL": SHARED_TENANT}
    assert (await stored_bars(store, "acme", "AAPL")).close.tolist() == [1_000_000, 2_000_000]
    assert (await stored_bars(store, "globex", "AAPL")).close.tolist() == [100_000_000] * 3
    assert await store.bars(globex, "ACMEONLY", None, None) is None

    panel = await store.adj_closes(globex, ["ACMEONLY", "AAPL"], None, None)
    assert panel.missing == ["ACMEONLY"] and len(panel.days) == 0
    panel = await store.adj_closes(globex, ["AAPL"], None, None)
    assert panel.missing == [] and panel.symbols == ["AAPL"]
    assert panel.adj_close_micros.tolist() == [100_000_000] * 3

    listed = {s.symbol: (s.bar_count, s.shared) for s in (await store.list_symbols(globex))[0]}
    assert listed == {"AAPL": (3, True), "MSFT": (2, True)}
    # Asked directly for another tenant's series, a backend returns nothing.
    foreign, _ = await store.backend.series("globex", [("acme", "ACMEONLY")])
    assert len(foreign[0].days) == 0
    assert await store.bar_count("globex") == 0


async def test_list_symbols_summarises_each_resolved_series_in_code_point_order(
    store: MarketStore,
) -> None:
    await store.upsert(SHARED_TENANT, bars("^GSPC", [3, 4, 9], [1_000_000] * 3))
    await store.upsert(SHARED_TENANT, bars("MSFT", [0, 1], [1_000_000] * 2))
    await store.upsert("acme", bars("abc", [2], [1_000_000]))
    await store.upsert("acme", bars("X.Y", [7, 1, 4], [1_000_000] * 3))  # any order in
    await store.upsert("acme", bars("MSFT", [10], [1_000_000]))
    symbols, at = await store.list_symbols(await store.view("acme"))
    assert at == await version(store, "acme")
    assert [(s.symbol, s.first_day, s.last_day, s.bar_count, s.shared) for s in symbols] == [
        ("MSFT", D0 + dt.timedelta(10), D0 + dt.timedelta(10), 1, False),
        ("X.Y", D0 + dt.timedelta(1), D0 + dt.timedelta(7), 3, False),
        ("^GSPC", D0 + dt.timedelta(3), D0 + dt.timedelta(9), 3, True),
        ("abc", D0 + dt.timedelta(2), D0 + dt.timedelta(2), 1, False),
    ]
    # Days added before, between and after the stored ones move the summary.
    await store.upsert("acme", bars("X.Y", [0, 5, 30], [2_000_000] * 3))
    summary = {s.symbol: s for s in (await store.list_symbols(await store.view("acme")))[0]}
    assert (summary["X.Y"].first_day, summary["X.Y"].last_day, summary["X.Y"].bar_count) == (
        D0,
        D0 + dt.timedelta(30),
        6,
    )
    # A tenant with no data of its own sees the shared series, MSFT included.
    others, _ = await store.list_symbols(await store.view("nobody"))
    assert [(s.symbol, s.bar_count, s.shared) for s in others] == [
        ("MSFT", 2, True),
        ("^GSPC", 3, True),
    ]


# -- reads -----------------------------------------------------------------------------------
async def test_bars_are_read_in_day_order_within_inclusive_bounds(store: MarketStore) -> None:
    await store.upsert("acme", bars("WIN", [9, 3, 0, 6], [9, 3, 1, 6]))
    view = await store.view("acme")

    async def window(start: int | None, end: int | None) -> list[int]:
        first = None if start is None else D0 + dt.timedelta(start)
        last = None if end is None else D0 + dt.timedelta(end)
        got = await store.bars(view, "WIN", first, last)
        assert got is not None
        assert got.days.tolist() == sorted(got.days.tolist())
        assert set(got.symbols.tolist()) <= {"WIN"}
        return got.close.tolist()

    assert await window(None, None) == [1, 3, 6, 9]
    assert await window(3, 6) == [3, 6]  # both ends inclusive
    assert await window(4, None) == [6, 9]
    assert await window(None, 2) == [1]
    assert await window(4, 5) == []


async def test_adjusted_close_panel_slices_windows_and_reports_missing(store: MarketStore) -> None:
    await store.upsert("acme", bars("P1", [0, 1, 2, 3], [10, 11, 12, 13]))
    await store.upsert(SHARED_TENANT, bars("P2", [2, 3, 4], [20, 21, 22]))
    view = await store.view("acme")
    unknown = await store.adj_closes(view, ["P2", "NOPE", "P1"], None, None)
    assert unknown.missing == ["NOPE"] and unknown.symbols == []
    panel = await store.adj_closes(
        view, ["P2", "P1", "P2"], D0 + dt.timedelta(1), D0 + dt.timedelta(3)
    )
    assert panel.symbols == ["P2", "P1"] and panel.missing == []
    rows = sorted(
        zip(
            panel.columns.tolist(),
            panel.days.tolist(),
            panel.adj_close_micros.tolist(),
            strict=True,
        )
    )
    base = (D0 - dt.date(1970, 1, 1)).days
    assert rows == [
        (0, base + 2, 20),
        (0, base + 3, 21),
        (1, base + 1, 11),
        (1, base + 2, 12),
        (1, base + 3, 13),
    ]
    assert panel.data_version == view.data_version == await version(store, "acme")
    nothing = await store.adj_closes(view, ["P1"], D0 + dt.timedelta(50), None)
    assert nothing.symbols == ["P1"] and len(nothing.days) == 0


# -- versions --------------------------------------------------------------------------------
async def test_versions_are_per_tenant_and_a_caller_sees_own_plus_shared(
    store: MarketStore,
) -> None:
    assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [0, 0, 0]
    await store.upsert(SHARED_TENANT, bars("S", [0], [1]))
    assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [1, 1, 1]
    a1 = await store.upsert("acme", bars("A", [0], [1]))
    assert a1.data_version == 2
    assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [2, 1, 1]
    await store.upsert("acme", bars("A", [0], [1]))  # unchanged: no bump
    await store.upsert("acme", bars("A", [1], [1]))
    await store.upsert("globex", bars("G", [0], [1]))
    assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [3, 2, 1]
    shared = await store.upsert(SHARED_TENANT, bars("S", [0], [2]))  # moves everyone's
    assert shared.data_version == 2
    assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [4, 3, 2]
    view = await store.view("acme")
    assert view.versions == {"acme": 2, SHARED_TENANT: 2}


async def test_versions_never_go_backwards(store: MarketStore) -> None:
    seen: dict[str, list[int]] = {"acme": [], "globex": []}
    rng = np.random.default_rng(3)
    for step in range(30):
        tenant = ["acme", "globex", SHARED_TENANT][int(rng.integers(0, 3))]
        day = int(rng.integers(0, 5))
        await store.upsert(tenant, bars("V", [day], [int(rng.integers(1, 4))]))
        for t in seen:
            seen[t].append(await version(store, t))
        assert step == len(seen["acme"]) - 1
    for t, values in seen.items():
        assert values == sorted(values), t
        assert values[-1] > values[0], t


# -- the read cache --------------------------------------------------------------------------
def reads(statement: str) -> float:
    value = REGISTRY.get_sample_value(
        "finsight_db_query_seconds_count", {"db": "contract", "statement": statement}
    )
    return value or 0.0


async def test_cached_series_serve_until_their_owner_changes(store: MarketStore) -> None:
    await store.upsert(SHARED_TENANT, bars("SH", [0, 1, 2], [10, 11, 12]))
    await store.upsert("acme", bars("OWN", [0, 1, 2], [20, 21, 22]))
    panel = await store.adj_closes(await store.view("acme"), ["SH", "OWN"], None, None)
    before = reads("read_adj_close")
    again = await store.adj_closes(await store.view("acme"), ["SH", "OWN"], D0, None)
    assert reads("read_adj_close") == before  # both from the cache
    assert again.adj_close_micros.tolist() == panel.adj_close_micros.tolist()

    # acme's own change re-reads its own series only: the shared one is still valid.
    await store.upsert("acme", bars("OWN", [2], [99]))
    fresh = await store.adj_closes(await store.view("acme"), ["SH", "OWN"], None, None)
    assert reads("read_adj_close") == before + 1
    assert fresh.adj_close_micros[fresh.columns == 1].tolist() == [20, 21, 99]
    # Another tenant's ingest changes nothing acme reads: no read at all.
    await store.upsert("globex", bars("OWN", [0], [1]))
    await store.adj_closes(await store.view("acme"), ["SH", "OWN"], None, None)
    assert reads("read_adj_close") == before + 1
    # A shared change re-reads the shared series.
    await store.upsert(SHARED_TENANT, bars("SH", [3], [13]))
    last = await store.adj_closes(await store.view("acme"), ["SH", "OWN"], None, None)
    assert reads("read_adj_close") == before + 2
    assert last.adj_close_micros[last.columns == 0].tolist() == [10, 11, 12, 13]


async def test_a_cache_smaller_than_the_request_still_answers_right(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for kind in BACKENDS:
        url = request.getfixturevalue("pg_url") if kind == "postgresql" else None
        store = await open_store(kind, tmp_path, url, cache_max_rows=5)
        try:
            await store.upsert("acme", bars("C1", [0, 1, 2, 3], [1, 2, 3, 4]))
            await store.upsert("acme", bars("C2", [0, 1, 2, 3], [5, 6, 7, 8]))
            for _ in range(3):
                panel = await store.adj_closes(await store.view("acme"), ["C1", "C2"], None, None)
                assert sorted(panel.adj_close_micros.tolist()) == [1, 2, 3, 4, 5, 6, 7, 8]
            assert store._rows <= 5
        finally:
            await close_store(store)


# -- the packed series follow every kind of change -------------------------------------------
async def test_series_follow_appends_insertions_and_corrections(store: MarketStore) -> None:
    rng = np.random.default_rng(11)
    changes: list[Callable[[], BarColumns]] = [
        lambda: bars("Q", list(range(0, 50)), rng.integers(1, 10**9, 50).tolist()),  # new
        lambda: bars("Q", list(range(50, 60)), rng.integers(1, 10**9, 10).tolist()),  # append
        lambda: bars("Q", [70, 65, 80], rng.integers(1, 10**9, 3).tolist()),  # append, unsorted
        lambda: bars("Q", [-5, 55, 62], rng.integers(1, 10**9, 3).tolist()),  # before + between
        lambda: bars("Q", [10, 20], rng.integers(1, 10**9, 2).tolist()),  # corrections
        lambda: bars("Q", [81, 30], rng.integers(1, 10**9, 2).tolist()),  # append + correction
        lambda: concat(  # one symbol appended, the other corrected, in one call
            bars("Q", [90], rng.integers(1, 10**9, 1).tolist()),
            bars("R", [0, 1], rng.integers(1, 10**9, 2).tolist()),
        ),
        lambda: bars("R", [1, 2], rng.integers(1, 10**9, 2).tolist()),
    ]
    for change in changes:
        await store.upsert("acme", change())
        view = await store.view("acme")
        for symbol in ("Q", "R"):
            stored = await store.bars(view, symbol, None, None)
            if stored is None:
                continue
            panel = await store.adj_closes(view, [symbol], None, None)
            epoch_days = stored.days.astype(np.int64).tolist()
            assert panel.days.tolist() == epoch_days, symbol
            assert panel.adj_close_micros.tolist() == stored.adj_close.tolist(), symbol
            summary = {s.symbol: s for s in (await store.list_symbols(view))[0]}[symbol]
            assert summary.bar_count == len(stored)
            assert summary.first_day == stored.days[0].item()
            assert summary.last_day == stored.days[-1].item()


# -- sample data -----------------------------------------------------------------------------
async def test_the_shared_data_is_loaded_only_when_absent(store: MarketStore) -> None:
    calls: list[int] = []

    def parse() -> BarColumns:
        calls.append(1)
        return bars("SAMPLE", [0, 1, 2], [1, 2, 3])

    loaded = await store.load_shared(parse)
    assert loaded is not None and counts(loaded) == (3, 0, 0) and loaded.data_version == 1
    assert await store.load_shared(parse) is None
    assert calls == [1]  # the second call did not even parse
    assert await store.bar_count(SHARED_TENANT) == 3
    assert await version(store, "acme") == 1


# -- upgrade of an existing DuckDB file --------------------------------------------------------
async def test_a_duckdb_file_from_before_per_tenant_versions_keeps_every_seen_version(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old-migrations"
    old.mkdir()
    for m in sorted(MIGRATIONS.glob("00[12]_*.sql")):
        (old / m.name).write_text(m.read_text())
    path = tmp_path / "upgraded.duckdb"
    db = Database(path, name="contract", migrations_dir=old)
    await db.open()
    await db.write(  # what the release before wrote: bars and one global version
        "old_ingest",
        lambda cur: cur.execute(
            "INSERT INTO bars VALUES ('acme', 'OLD', DATE '2024-01-02', 1, 1, 1, 1, 1, 5);"
            "UPDATE data_version SET version = 7 WHERE id = 1"
        ),
    )
    await db.close()

    db = Database(path, name="contract", migrations_dir=MIGRATIONS)
    assert await db.open() == [3]
    store = MarketStore(market_backend(db))
    try:
        # Every caller saw 7 before the upgrade; every caller sees 7 after it.
        assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [7] * 3
        assert (await stored_bars(store, "acme", "OLD")).volume.tolist() == [5]
        after = await store.upsert("acme", bars("NEW", [0], [1]))
        assert after.data_version == 8
        assert [await version(store, t) for t in ("acme", "globex", SHARED_TENANT)] == [8, 7, 7]
    finally:
        await db.close()
