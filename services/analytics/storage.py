"""The analytics storage boundary: one backend interface, two engines, one read cache.

The domain (market.py, the servicer, the sample loader) talks only to :class:`MarketStore`.
It holds the in-process caches and asks a :class:`MarketBackend` for data; the backends are
the only modules with SQL: ``storage_duckdb`` (the embedded default, one process owns the
file) and ``storage_pg`` (the production store, shared by N replicas). Configuration alone
picks one (``ANALYTICS_DATABASE_URL``, see main.py). Prices cross the boundary as int64
micro-units (DECIMAL(18,6) / NUMERIC(18,6) scaled by 1e6, exact); dates as ``datetime64[D]``.

Tenancy: every row carries its tenant. A tenant reads its own bars of a symbol if it has
any, else the shared reference data (:data:`SHARED_TENANT`), never another tenant's.

Data versions. Each tenant has its own version, bumped in the same transaction as any
change to that tenant's bars (an ingest that changes nothing bumps nothing). The version a
caller sees -- in API responses and in the result-cache key -- is the sum over what it can
read: version(own tenant) + version(shared). Both parts only grow, so the sum grows
whenever anything the caller can read changes, and one sum never stands for two states of
one database. (A new database, or one restored from a backup, counts again from where it
stands: the Redis result cache, keyed by tenant and version, must be emptied then.)
One tenant's ingest therefore leaves every other tenant's version (and cache) alone; an
update of the shared data moves everyone's. The PostgreSQL schema needs this anyway (a
single global row cannot be sharded by tenant); DuckDB has the same scheme, so both
backends answer alike.

Read cache. Per tenant the symbol owners, per (owner, symbol) the whole adjusted-close
series, each tagged with the version(s) it was read at and bounded (owners by tenants,
series by rows, least recently used first). Metric requests then slice in-process arrays
instead of reading the database. An entry is used only while its tags equal the current
versions, so a stale entry is never served, and a change of one tenant's data leaves the
shared series cached. Every database read that feeds the cache returns the versions of the
same snapshot; when they are newer than the request's, the request moves on to them (a
mixture of two states is never built: see :meth:`MarketStore.adj_closes`).

Where "current versions" come from (:class:`TenantView`, once per request):

- DuckDB (``sole_writer``): this process is the only writer of its file (DuckDB locks
  it), so it knows every version without asking: it learns them from its own commits and
  from reads, and trusts them until a write fails or is cancelled -- such a write may still
  commit later, so until a no-op write has passed the single writer after it
  (:meth:`MarketBackend.settle`), versions are read per request again.
- PostgreSQL: another replica may write at any moment. Each request reads the versions of
  (tenant, shared) once, one primary-key lookup of at most two rows, and validates the
  cached owners and series against them. Measured (benchmarks/bench_analytics.py, a busy
  2-core machine, Unix socket): p50 0.35-0.38 ms, p99 1-2 ms per check through the kit's
  pool, of which the query itself is ~0.15 ms and the pool's liveness check of the
  connection it lends ~0.08 ms; a ComputeMetrics answered from the Redis result cache
  takes 2.1 ms instead of DuckDB mode's 1.6 ms (medians).
  A write acknowledged by replica A has committed before A answers, so the very next
  request to replica B reads the new version and re-reads what changed: read-your-writes
  across replicas at the price of one indexed read per request, with nothing else to run,
  configure or lose. LISTEN/NOTIFY was rejected for this: a notification is delivered
  asynchronously after the commit, so B can answer the next call before it hears of A's
  write (no read-your-writes), a notification sent while B's listening connection is
  down or reconnecting is lost for good (B would serve stale data until the next change),
  and it needs one extra dedicated connection per replica that no transaction-mode
  pooler passes through. Redis pub/sub has the same delivery gaps.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from libs.common import lru
from services.analytics.bars import BarColumns

log = logging.getLogger(__name__)

# Reserved tenant of the shared reference data (sample data); no API key may carry it.
SHARED_TENANT: Final = "__shared__"

# Owner tenant -> data version, for the tenants one caller can read (see readable_tenants).
Versions = Mapping[str, int]


def readable_tenants(tenant: str) -> tuple[str, ...]:
    """The tenants whose bars `tenant` can read: its own, then the shared data."""
    return (SHARED_TENANT,) if tenant == SHARED_TENANT else (tenant, SHARED_TENANT)


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int
    data_version: int  # the writing tenant's caller-visible version after the write


@dataclass(frozen=True, slots=True)
class Upserted:
    """What a backend's upsert did, and the versions of the writer's readable tenants
    read in the same transaction (after its bump)."""

    inserted: int
    updated: int
    unchanged: int
    versions: dict[str, int]


@dataclass(frozen=True, slots=True)
class SymbolSummary:
    symbol: str
    first_day: date
    last_day: date
    bar_count: int
    shared: bool  # True when the data is the shared reference set


@dataclass(frozen=True, slots=True)
class Series:
    """One stored series' adjusted closes, by day (ascending)."""

    days: npt.NDArray[np.int32]  # days since 1970-01-01
    adj_close_micros: npt.NDArray[np.int64]

    def between(self, start: int | None, end: int | None) -> slice:
        lo = 0 if start is None else int(np.searchsorted(self.days, start, "left"))
        hi = len(self.days) if end is None else int(np.searchsorted(self.days, end, "right"))
        return slice(lo, hi)

    @staticmethod
    def empty() -> Series:
        return Series(np.zeros(0, np.int32), np.zeros(0, np.int64))


@dataclass(frozen=True, slots=True)
class PricePanel:
    """Adjusted closes in long form, one entry per stored bar, in no particular order."""

    symbols: list[str]  # the resolved symbols, in request order; `columns` index into it
    columns: npt.NDArray[np.int32]
    days: npt.NDArray[np.int32]  # days since 1970-01-01
    adj_close_micros: npt.NDArray[np.int64]
    data_version: int
    missing: list[str]  # requested symbols the caller has no data for


class MarketBackend(Protocol):
    """The SQL side of :class:`MarketStore`: one implementation per engine.

    Every method that returns `Versions` reads them in the same snapshot (or, for writes,
    the same transaction) as its data, for exactly :func:`readable_tenants` of its
    `tenant`; a tenant without a version row is at version 0. Reads never return data of
    a tenant outside `readable_tenants(tenant)`.
    """

    @property
    def sole_writer(self) -> bool:
        """True when this process is the only writer of the database (DuckDB)."""
        ...

    async def upsert(self, tenant: str, bars: BarColumns) -> Upserted:
        """Insert new (symbol, day) keys, replace changed bars, leave identical ones; one
        transaction, returned after COMMIT, which bumps the tenant's version iff anything
        changed. Keys are unique within `bars` (bars.validate_stream guarantees it)."""
        ...

    async def load_shared(self, parse: Callable[[], BarColumns]) -> Upserted | None:
        """Upsert `parse()` (blocking; run in a thread) into the shared tenant if it has no
        bars yet, else None. Of several replicas calling at once exactly one loads."""
        ...

    async def settle(self) -> None:
        """Return once every write issued before this call has committed or failed."""
        ...

    async def versions(self, tenant: str) -> dict[str, int]: ...

    async def bar_count(self, tenant: str) -> int:
        """Bars stored under `tenant` itself."""
        ...

    async def list_symbols(self, tenant: str) -> tuple[list[SymbolSummary], dict[str, int]]:
        """Every symbol `tenant` can read, resolved (own over shared), sorted by symbol
        (code point order)."""
        ...

    async def owners(self, tenant: str) -> tuple[dict[str, str], dict[str, int]]:
        """symbol -> owner tenant of every symbol `tenant` can read."""
        ...

    async def bars(
        self, owner: str, symbol: str, start: date | None, end: date | None
    ) -> BarColumns:
        """`owner`'s bars of `symbol` within [start, end] in day order."""
        ...

    async def series(
        self, tenant: str, keys: Sequence[tuple[str, str]]
    ) -> tuple[list[Series], dict[str, int]]:
        """Whole adjusted-close series of (owner, symbol) keys (owners readable by
        `tenant`; any other key reads as empty), in key order."""
        ...

    async def resolved_series(
        self, tenant: str, symbols: Sequence[str]
    ) -> tuple[dict[str, str], list[Series], dict[str, int]]:
        """Owners of `symbols` and the series of the resolved ones (in `symbols` order),
        one snapshot."""
        ...


@dataclass(slots=True)
class TenantView:
    """What one request of one tenant reads: the versions, checked once per request.

    Reads during the request that see newer versions (a commit landed meanwhile) move
    the view forward, so everything the request returns is from one state, and the
    request's `data_version` says which.
    """

    tenant: str
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def data_version(self) -> int:
        return sum(self.versions.values())

    def advance(self, seen: Versions) -> None:
        for owner, version in seen.items():
            self.versions[owner] = max(self.versions.get(owner, version), version)


_EPOCH: Final = date(1970, 1, 1)


def _day(d: date | None) -> int | None:
    return None if d is None else (d - _EPOCH).days


class MarketStore:
    """Bars of every tenant through one backend (see the module's "Read cache").

    `cache_max_rows` bounds the cached series (12 bytes a row); 0 keeps none (every metric
    request reads its series from the database); `cache_max_tenants` bounds the owner maps
    and the versions known in sole-writer mode.
    """

    def __init__(
        self,
        backend: MarketBackend,
        *,
        cache_max_rows: int = 5_000_000,
        cache_max_tenants: int = 1024,
    ) -> None:
        self.backend = backend
        self.cache_max_rows = cache_max_rows
        self.cache_max_tenants = cache_max_tenants
        self._owners: OrderedDict[str, tuple[dict[str, str], dict[str, int]]] = OrderedDict()
        # ListSymbols aggregates every bar of a tenant: served from here while the versions
        # it was read at are the view's.
        self._symbols: OrderedDict[str, tuple[list[SymbolSummary], dict[str, int]]] = OrderedDict()
        self._series: OrderedDict[tuple[str, str], tuple[Series, int]] = OrderedDict()
        self._rows = 0
        # Sole-writer mode only: versions learnt from this process's commits and reads.
        self._known: OrderedDict[str, int] = OrderedDict()
        self._epoch = 0  # moves whenever `_known` may have fallen behind the database
        self._unsettled = 0  # failed or cancelled writes not yet known to be finished
        self._settling: set[asyncio.Task[None]] = set()

    # -- versions ----------------------------------------------------------------------------
    def _trusts_known(self) -> bool:
        return self.backend.sole_writer and self._unsettled == 0

    def _learn(self, epoch: int, versions: Versions) -> None:
        """Remember committed versions (sole-writer mode), unless the knowledge may have
        fallen behind since the read or write that saw them started."""
        if not self._trusts_known() or epoch != self._epoch:
            return
        for owner, version in versions.items():
            self._known[owner] = max(self._known.get(owner, version), version)
            self._known.move_to_end(owner)
        while len(self._known) > 2 * self.cache_max_tenants + 1:
            self._known.popitem(last=False)

    def _doubt_writes(self) -> None:
        """A write failed or was cancelled: it may still commit (DuckDB's committer may be
        running it), so stop trusting the known versions until the writer has settled."""
        if not self.backend.sole_writer:
            return
        self._unsettled += 1
        self._epoch += 1
        self._known.clear()
        task = asyncio.get_running_loop().create_task(self._settle(), name="analytics-settle")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self) -> None:
        try:
            await self.backend.settle()
        except Exception:  # e.g. the database is closing: keep reading versions per request
            log.warning("could not settle the writer; versions are read per request")
            return
        self._unsettled -= 1
        self._epoch += 1
        self._known.clear()

    async def view(self, tenant: str) -> TenantView:
        """The versions `tenant` reads now: known in-process in sole-writer mode, else one
        primary-key read of the version rows."""
        readable = readable_tenants(tenant)
        if self._trusts_known():
            known = {owner: self._known.get(owner) for owner in readable}
            if all(v is not None for v in known.values()):
                return TenantView(tenant, {o: v for o, v in known.items() if v is not None})
        epoch = self._epoch
        versions = await self.backend.versions(tenant)
        self._learn(epoch, versions)
        return TenantView(tenant, dict(versions))

    async def data_version(self, tenant: str) -> int:
        return (await self.view(tenant)).data_version

    # -- writes ------------------------------------------------------------------------------
    async def upsert(self, tenant: str, bars: BarColumns) -> UpsertCounts:
        """Insert new keys, replace changed bars, leave identical ones; one transaction."""
        if len(bars) == 0:
            return UpsertCounts(0, 0, 0, await self.data_version(tenant))
        epoch = self._epoch
        try:
            done = await self.backend.upsert(tenant, bars)
        except BaseException:
            self._doubt_writes()
            raise
        return self._written(epoch, done)

    async def load_shared(self, parse: Callable[[], BarColumns]) -> UpsertCounts | None:
        """Load `parse()` into the shared tenant unless it has data (once per database)."""
        epoch = self._epoch
        try:
            done = await self.backend.load_shared(parse)
        except BaseException:
            self._doubt_writes()
            raise
        return None if done is None else self._written(epoch, done)

    def _written(self, epoch: int, done: Upserted) -> UpsertCounts:
        self._learn(epoch, done.versions)
        return UpsertCounts(
            done.inserted, done.updated, done.unchanged, sum(done.versions.values())
        )

    # -- reads -------------------------------------------------------------------------------
    async def bar_count(self, tenant: str) -> int:
        return await self.backend.bar_count(tenant)

    async def list_symbols(self, view: TenantView) -> tuple[list[SymbolSummary], int]:
        """The caller's symbols and the data version they are from."""
        cached = self._symbols.get(view.tenant)
        if cached is not None and cached[1] == view.versions:
            self._symbols.move_to_end(view.tenant)
            return list(cached[0]), view.data_version
        epoch = self._epoch
        symbols, at = await self.backend.list_symbols(view.tenant)
        lru.keep(self._symbols, view.tenant, (symbols, dict(at)), self.cache_max_tenants)
        self._seen(epoch, view, at)
        return list(symbols), view.data_version

    async def resolve(self, view: TenantView, symbols: Sequence[str]) -> dict[str, str]:
        """Owner tenant of each symbol the caller can read; unknown symbols are absent."""
        cached = self._owners.get(view.tenant)
        if cached is not None and cached[1] == view.versions:
            self._owners.move_to_end(view.tenant)
            owners = cached[0]
        else:
            epoch = self._epoch
            owners, at = await self.backend.owners(view.tenant)
            self._keep_owners(view.tenant, owners, at)
            self._seen(epoch, view, at)
        return {s: owners[s] for s in symbols if s in owners}

    async def bars(
        self, view: TenantView, symbol: str, start: date | None, end: date | None
    ) -> BarColumns | None:
        """The caller's bars of `symbol` within [start, end]; None when it has none."""
        owner = (await self.resolve(view, [symbol])).get(symbol)
        if owner is None:
            return None
        return await self.backend.bars(owner, symbol, start, end)

    async def adj_closes(
        self, view: TenantView, symbols: Sequence[str], start: date | None, end: date | None
    ) -> PricePanel:
        """Adjusted closes of the caller's `symbols` within [start, end], all from one
        state: the panel's data version. When some symbols are unknown to the caller, only
        `missing` is filled in (nothing is read)."""
        wanted = list(dict.fromkeys(symbols))
        owners = await self.resolve(view, wanted)
        unknown = [s for s in wanted if s not in owners]
        if unknown:
            none = np.zeros(0, np.int32)
            return PricePanel([], none, none, np.zeros(0, np.int64), view.data_version, unknown)
        keys = [(owners[s], s) for s in wanted]
        found = {key: self._cached_series(key, view.versions[key[0]]) for key in keys}
        missing = [key for key, series in found.items() if series is None]
        if missing:
            epoch, before = self._epoch, dict(view.versions)
            loaded, at = await self.backend.series(view.tenant, missing)
            self._keep(missing, loaded, at)
            if dict(at) == before:  # the owners and the cached series are from it too
                found.update(zip(missing, loaded, strict=True))
            else:  # a commit landed meanwhile: resolve and read everything at one state
                owners, everything, at = await self.backend.resolved_series(view.tenant, wanted)
                self._keep_owners(view.tenant, owners, at)
                keys = [(owners[s], s) for s in wanted if s in owners]
                self._keep(keys, everything, at)
                found = dict(zip(keys, everything, strict=True))
            self._seen(epoch, view, at)
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
            [symbol for _, symbol in keys],
            np.concatenate(columns),
            np.concatenate(days),
            np.concatenate(prices),
            view.data_version,
            [s for s in wanted if s not in owners],  # unknown now, after a fresher read
        )

    # -- cache bookkeeping -------------------------------------------------------------------
    def _seen(self, epoch: int, view: TenantView, at: Versions) -> None:
        """A read saw the versions `at` (committed, so never older than the view's)."""
        self._learn(epoch, at)
        view.advance(at)

    def _keep_owners(self, tenant: str, owners: dict[str, str], at: Versions) -> None:
        lru.keep(self._owners, tenant, (owners, dict(at)), self.cache_max_tenants)

    def _cached_series(self, key: tuple[str, str], version: int) -> Series | None:
        entry = self._series.get(key)
        if entry is None or entry[1] != version:
            return None
        self._series.move_to_end(key)
        return entry[0]

    def _keep(self, keys: list[tuple[str, str]], loaded: list[Series], at: Versions) -> None:
        for key, series in zip(keys, loaded, strict=True):
            if len(series.days) > self.cache_max_rows:
                continue
            old = self._series.pop(key, None)
            if old is not None:
                self._rows -= len(old[0].days)
            self._series[key] = (series, at[key[0]])
            self._rows += len(series.days)
        while self._rows > self.cache_max_rows:
            _, (evicted, _version) = self._series.popitem(last=False)
            self._rows -= len(evicted.days)


__all__ = [
    "SHARED_TENANT",
    "MarketBackend",
    "MarketStore",
    "PricePanel",
    "Series",
    "SymbolSummary",
    "TenantView",
    "UpsertCounts",
    "Upserted",
    "Versions",
    "readable_tenants",
]
