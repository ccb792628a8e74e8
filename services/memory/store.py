"""The storage boundary of the memory service: one interface, two implementations.

The domain (manager, batchers, purger, context building) talks only to a `MemoryStore`:
async methods, domain types (services.memory.models) in and out, no SQL, no grpc. Which
implementation runs is configuration only (`MEMORY_DATABASE_URL`, see services/memory/
main.py):

- `DuckStore`: the embedded DuckDB file (`make run`, one replica). Its SQL is
  services/memory/storage.py; writes go through DuckDB's single group-committing writer,
  which is what makes "read, then insert" race-free there.
- `storage_pg.PgStore`: PostgreSQL, any number of replicas on one database. Concurrent
  writers are serialised by row locks and unique constraints instead (see that module).

Both keep the same promises, checked by the same contract tests on both backends
(tests/memory/test_store_contract.py): an acknowledged write is committed; appends are
idempotent by client message id and numbered without gaps per session; the audit row of a
write is in its transaction; consent is checked inside the write that needs it; erasure
and retention delete rows; recall ranks identically (and identically to the in-process
index). `shared` says whether other processes may write the same database, which decides
how the caches above the store stay correct (services/memory/hot_tier.py,
services/memory/recall_index.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np
import pyarrow as pa

from libs.common import lru
from libs.common.duck import Database
from libs.common.pg import PgDatabase
from services.memory import storage
from services.memory.models import (
    AppendRequest,
    AppendResult,
    AuditEntry,
    AuditRecord,
    Consent,
    ErasureCounts,
    Extracted,
    ExtractionCounts,
    Fact,
    FactFilter,
    FactsPageKey,
    FactsVersion,
    IndexSnapshot,
    InsertedFacts,
    NewFact,
    Order,
    PurgeCounts,
    RecallWeights,
    Remembered,
    ScoredFact,
    Session,
    SessionTail,
    StoredMessage,
    ToEmbed,
)

# (tenant -> (message_days, audit_days, fact_days_by_kind)); 0 days = keep forever.
RetentionPolicies = dict[str, tuple[float, float, dict[str, float]]]
# (fact_id, fact, text_hash) of facts to insert for one user.
FactRows = Sequence[tuple[str, NewFact, str]]


class MemoryStore(Protocol):
    """What the memory domain needs from its database. Every method is one transaction (a
    write returns after COMMIT) or one read; none raises for "not found"."""

    backend: str  # "duckdb" | "postgresql"
    # True when other processes (replicas) may write the same database: then no cache of
    # this process may assume it saw every write.
    shared: bool

    # -- messages --------------------------------------------------------------------------
    async def append_batch(self, requests: list[AppendRequest]) -> list[AppendResult]:
        """Many AppendMessages requests, applied in order as if each ran alone."""
        ...

    async def write_audit_batch(self, rows: list[tuple[AuditRecord, int]]) -> list[None]: ...

    async def get_session(self, tenant: str, session_id: str) -> Session | None: ...

    async def session_tail(self, tenant: str, session_id: str) -> SessionTail | None: ...

    async def history_page(
        self, tenant: str, session_id: str, order: Order, boundary: int | None, limit: int
    ) -> list[StoredMessage]: ...

    async def recent_messages(
        self, tenant: str, session_id: str, limit: int
    ) -> list[StoredMessage]: ...

    async def recent_of_session(
        self, tenant: str, session_id: str, limit: int
    ) -> tuple[Session | None, list[StoredMessage]]: ...

    # -- facts -----------------------------------------------------------------------------
    async def remember_facts(
        self,
        tenant: str,
        user_id: str,
        facts: Sequence[NewFact],
        now_us: int,
        audit: AuditRecord,
    ) -> tuple[list[Remembered], InsertedFacts] | None:
        """None (with an audit row) when the user has not consented."""
        ...

    async def insert_facts(
        self,
        tenant: str,
        user_id: str,
        rows: FactRows,
        now_us: int,
        created_us: Sequence[int] | None = None,
    ) -> InsertedFacts:
        """Bulk insert without consent, dedup or audit (tests, benchmarks)."""
        ...

    async def insert_fact_tables(self, facts: pa.Table, postings: pa.Table) -> InsertedFacts:
        """Bulk insert from Arrow tables (`storage.insert_fact_tables` has the columns)."""
        ...

    async def load_recall_index(
        self, tenant: str, user_id: str, after_fact_no: int = 0
    ) -> IndexSnapshot:
        """The user's facts numbered above `after_fact_no` and their postings (sorted by
        term key), from one snapshot."""
        ...

    async def facts_version(self, tenant: str, user_id: str) -> FactsVersion: ...

    async def facts_by_no(
        self, tenant: str, user_id: str, fact_nos: Sequence[int]
    ) -> dict[int, Fact]: ...

    async def recall_facts(
        self,
        tenant: str,
        user_id: str,
        query: str,
        flt: FactFilter,
        k: int,
        now_us: int,
        weights: RecallWeights,
    ) -> list[ScoredFact]:
        """Recall scored in SQL (the index is off or the user too big for it)."""
        ...

    async def forget_facts(
        self,
        tenant: str,
        user_id: str,
        fact_ids: Sequence[str],
        flt: FactFilter | None,
        forget_all: bool,
        now_us: int,
        audit: AuditRecord,
    ) -> list[str]: ...

    # -- consent, export, erasure, retention -------------------------------------------------
    async def get_consent(self, tenant: str, user_id: str) -> Consent: ...

    async def set_consent(
        self,
        tenant: str,
        user_id: str,
        long_term_memory: bool,
        now_us: int,
        audit: AuditRecord,
        fact_extraction: bool = False,
    ) -> tuple[Consent, int]: ...

    # -- extraction (services/memory/extraction.py) ------------------------------------------
    async def extraction_allowed(self, tenant: str, user_id: str) -> bool:
        """Whether the user consented to long-term memory and to fact extraction."""
        ...

    async def write_extraction(
        self,
        tenant: str,
        user_id: str,
        facts: Sequence[NewFact],
        supersedes: Sequence[tuple[int, str]],
        message_ids: Sequence[str],
        now_us: int,
        audit: AuditRecord,
    ) -> Extracted | None:
        """The extractor's proposals in one transaction (`storage.write_extraction`)."""
        ...

    async def extraction_counts(self, tenant: str, user_id: str, now_us: int) -> ExtractionCounts:
        """The user's pending and handled turns and current extracted facts."""
        ...

    async def unextracted_messages(
        self, tenant: str, before_us: int, after_us: int | None, limit: int
    ) -> list[StoredMessage]:
        """Up to `limit` user turns of the tenant, stored in [after_us, before_us), never
        handled by the extractor, of users consenting to extraction; oldest first."""
        ...

    async def list_facts(
        self,
        tenant: str,
        user_id: str,
        kinds: Sequence[str],
        include_history: bool,
        after: FactsPageKey | None,
        limit: int,
        now_us: int,
    ) -> list[Fact]:
        """Up to `limit` of the user's unexpired facts (of `kinds`, if any; current only
        unless `include_history`) by (created_us, fact_id), after `after`."""
        ...

    async def export_facts(
        self, tenant: str, user_id: str, after: str, limit: int
    ) -> list[Fact]: ...

    async def export_messages(
        self, tenant: str, user_id: str, after: tuple[str, int], limit: int
    ) -> list[StoredMessage]: ...

    async def export_audit(
        self, tenant: str, user_id: str, after: tuple[int, str], limit: int
    ) -> list[AuditEntry]: ...

    async def erase_user(
        self, tenant: str, user_id: str, now_us: int, audit: AuditRecord
    ) -> ErasureCounts: ...

    async def retention_tenants(self) -> list[str]: ...

    # -- re-indexing (services/memory/manager.py `reindex_pass`) ----------------------------
    async def facts_to_reindex(self, tenant: str, version: int, limit: int) -> list[ToEmbed]:
        """Up to `limit` of the tenant's facts indexed by a tokenizer older than `version`."""
        ...

    async def reindex_facts(self, tenant: str, rows: Sequence[ToEmbed]) -> int:
        """Their postings and doc_len by the current tokenizer; facts updated."""
        ...

    # -- re-embedding (services/memory/manager.py `reembed_pass`) ---------------------------
    async def facts_to_embed(self, tenant: str, model: str, limit: int) -> list[ToEmbed]:
        """Up to `limit` of the tenant's facts without a vector of `model`."""
        ...

    async def count_to_embed(self, tenant: str, model: str) -> int: ...

    async def set_embeddings(
        self, tenant: str, model: str, rows: Sequence[ToEmbed], vectors: np.ndarray
    ) -> int:
        """Store the vectors (facts deleted meanwhile are skipped); facts updated."""
        ...

    async def purge(
        self, tenants: RetentionPolicies, now_us: int, audit: AuditRecord
    ) -> PurgeCounts: ...

    # -- inspection (tests, operators) -------------------------------------------------------
    async def user_row_counts(self, tenant: str, user_id: str) -> dict[str, int]:
        """Rows held for a user, per table: 'is anything left?'."""
        ...

    async def orphan_postings(self, tenant: str) -> int:
        """Postings whose fact is gone (must stay 0)."""
        ...

    async def analyze(self) -> None:
        """Refresh the planner's statistics after a bulk load (benchmarks, imports)."""
        ...


CONSENT_CACHE_MAX: Final = 65_536  # users; a Consent is ~0.3 KiB with its key


class DuckStore:
    """`MemoryStore` on the embedded DuckDB file (services/memory/storage.py).

    One process owns the file, so what it has written is all there is: consent, read on
    every GetConsent (~5 ms of DuckDB under load against ~0.2 ms for the service's other
    work, benchmarks/bench_simple_reads.py), is kept in a bounded in-process LRU that the
    two writes of consent (SetConsent, erasure) invalidate. A read that overlaps one of
    them is not kept (the generation changed), so a stale value is never cached.
    """

    backend = "duckdb"
    shared = False  # one process owns the file

    def __init__(self, db: Database) -> None:
        self.db = db
        self._consent: OrderedDict[tuple[str, str], Consent] = OrderedDict()
        self._consent_generation = 0

    def _consent_changed(self, tenant: str, user_id: str) -> None:
        self._consent.pop((tenant, user_id), None)
        self._consent_generation += 1

    async def append_batch(self, requests: list[AppendRequest]) -> list[AppendResult]:
        return await self.db.write("append_batch", storage.append_batch, requests)

    async def write_audit_batch(self, rows: list[tuple[AuditRecord, int]]) -> list[None]:
        return await self.db.write("audit_batch", storage.write_audit_batch, rows)

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        return await self.db.read("get_session", storage.get_session, tenant, session_id)

    async def session_tail(self, tenant: str, session_id: str) -> SessionTail | None:
        return await self.db.read("session_tail", storage.session_tail, tenant, session_id)

    async def history_page(
        self, tenant: str, session_id: str, order: Order, boundary: int | None, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "history_page", storage.history_page, tenant, session_id, order, boundary, limit
        )

    async def recent_messages(
        self, tenant: str, session_id: str, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "recent_messages", storage.recent_messages, tenant, session_id, limit
        )

    async def recent_of_session(
        self, tenant: str, session_id: str, limit: int
    ) -> tuple[Session | None, list[StoredMessage]]:
        return await self.db.read(
            "recent_of_session", storage.recent_of_session, tenant, session_id, limit
        )

    async def remember_facts(
        self,
        tenant: str,
        user_id: str,
        facts: Sequence[NewFact],
        now_us: int,
        audit: AuditRecord,
    ) -> tuple[list[Remembered], InsertedFacts] | None:
        return await self.db.write(
            "remember_facts", storage.remember_facts, tenant, user_id, facts, now_us, audit
        )

    async def insert_facts(
        self,
        tenant: str,
        user_id: str,
        rows: FactRows,
        now_us: int,
        created_us: Sequence[int] | None = None,
    ) -> InsertedFacts:
        return await self.db.write(
            "insert_facts", storage.insert_facts, tenant, user_id, rows, now_us, created_us
        )

    async def insert_fact_tables(self, facts: pa.Table, postings: pa.Table) -> InsertedFacts:
        return await self.db.write("insert_facts", storage.insert_fact_tables, facts, postings)

    async def load_recall_index(
        self, tenant: str, user_id: str, after_fact_no: int = 0
    ) -> IndexSnapshot:
        # One process writes this file and keeps its indexes current itself: only full
        # loads happen here (the delta is for replicas that did not see a write).
        if after_fact_no:
            raise ValueError("the DuckDB store loads whole indexes only")
        facts, postings = await self.db.read(
            "recall_index_load", storage.load_recall_index, tenant, user_id
        )
        return IndexSnapshot(facts, postings)

    async def facts_version(self, tenant: str, user_id: str) -> FactsVersion:
        return FactsVersion()  # not shared: the process's own invalidations suffice

    async def facts_by_no(
        self, tenant: str, user_id: str, fact_nos: Sequence[int]
    ) -> dict[int, Fact]:
        return await self.db.read("recall_indexed", storage.facts_by_no, tenant, user_id, fact_nos)

    async def recall_facts(
        self,
        tenant: str,
        user_id: str,
        query: str,
        flt: FactFilter,
        k: int,
        now_us: int,
        weights: RecallWeights,
    ) -> list[ScoredFact]:
        return await self.db.read(
            "recall_facts", storage.recall_facts, tenant, user_id, query, flt, k, now_us, weights
        )

    async def forget_facts(
        self,
        tenant: str,
        user_id: str,
        fact_ids: Sequence[str],
        flt: FactFilter | None,
        forget_all: bool,
        now_us: int,
        audit: AuditRecord,
    ) -> list[str]:
        return await self.db.write(
            "forget_facts",
            storage.forget_facts,
            tenant,
            user_id,
            fact_ids,
            flt,
            forget_all,
            now_us,
            audit,
        )

    async def get_consent(self, tenant: str, user_id: str) -> Consent:
        key = (tenant, user_id)
        cached = lru.fresh(self._consent, key)
        if cached is not None:
            return cached
        generation = self._consent_generation
        consent = await self.db.read("get_consent", storage.get_consent, tenant, user_id)
        if generation == self._consent_generation:
            lru.keep(self._consent, key, consent, CONSENT_CACHE_MAX)
        return consent

    async def set_consent(
        self,
        tenant: str,
        user_id: str,
        long_term_memory: bool,
        now_us: int,
        audit: AuditRecord,
        fact_extraction: bool = False,
    ) -> tuple[Consent, int]:
        try:
            return await self.db.write(
                "set_consent",
                storage.set_consent,
                tenant,
                user_id,
                long_term_memory,
                now_us,
                audit,
                fact_extraction,
            )
        finally:  # committed or not: the next read asks the database
            self._consent_changed(tenant, user_id)

    async def extraction_allowed(self, tenant: str, user_id: str) -> bool:
        consent = await self.get_consent(tenant, user_id)
        return consent.long_term_memory and consent.fact_extraction

    async def write_extraction(
        self,
        tenant: str,
        user_id: str,
        facts: Sequence[NewFact],
        supersedes: Sequence[tuple[int, str]],
        message_ids: Sequence[str],
        now_us: int,
        audit: AuditRecord,
    ) -> Extracted | None:
        return await self.db.write(
            "write_extraction",
            storage.write_extraction,
            tenant,
            user_id,
            facts,
            supersedes,
            message_ids,
            now_us,
            audit,
        )

    async def extraction_counts(self, tenant: str, user_id: str, now_us: int) -> ExtractionCounts:
        return await self.db.read(
            "extraction_counts", storage.extraction_counts, tenant, user_id, now_us
        )

    async def unextracted_messages(
        self, tenant: str, before_us: int, after_us: int | None, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "unextracted_messages",
            storage.unextracted_messages,
            tenant,
            before_us,
            after_us,
            limit,
        )

    async def list_facts(
        self,
        tenant: str,
        user_id: str,
        kinds: Sequence[str],
        include_history: bool,
        after: FactsPageKey | None,
        limit: int,
        now_us: int,
    ) -> list[Fact]:
        return await self.db.read(
            "list_facts",
            storage.list_facts,
            tenant,
            user_id,
            kinds,
            include_history,
            after,
            limit,
            now_us,
        )

    async def export_facts(self, tenant: str, user_id: str, after: str, limit: int) -> list[Fact]:
        return await self.db.read(
            "export_facts", storage.export_facts, tenant, user_id, after, limit
        )

    async def export_messages(
        self, tenant: str, user_id: str, after: tuple[str, int], limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "export_messages", storage.export_messages, tenant, user_id, after, limit
        )

    async def export_audit(
        self, tenant: str, user_id: str, after: tuple[int, str], limit: int
    ) -> list[AuditEntry]:
        return await self.db.read(
            "export_audit", storage.export_audit, tenant, user_id, after, limit
        )

    async def erase_user(
        self, tenant: str, user_id: str, now_us: int, audit: AuditRecord
    ) -> ErasureCounts:
        try:
            return await self.db.write(
                "erase_user", storage.erase_user, tenant, user_id, now_us, audit
            )
        finally:
            self._consent_changed(tenant, user_id)

    async def retention_tenants(self) -> list[str]:
        return await self.db.read("retention_tenants", storage.retention_tenants)

    async def facts_to_embed(self, tenant: str, model: str, limit: int) -> list[ToEmbed]:
        return await self.db.read("facts_to_embed", storage.facts_to_embed, tenant, model, limit)

    async def facts_to_reindex(self, tenant: str, version: int, limit: int) -> list[ToEmbed]:
        return await self.db.read(
            "facts_to_reindex", storage.facts_to_reindex, tenant, version, limit
        )

    async def reindex_facts(self, tenant: str, rows: Sequence[ToEmbed]) -> int:
        return await self.db.write("reindex_facts", storage.reindex_facts, tenant, rows)

    async def count_to_embed(self, tenant: str, model: str) -> int:
        return await self.db.read("count_to_embed", storage.count_to_embed, tenant, model)

    async def set_embeddings(
        self, tenant: str, model: str, rows: Sequence[ToEmbed], vectors: np.ndarray
    ) -> int:
        return await self.db.write(
            "set_embeddings", storage.set_embeddings, tenant, model, rows, vectors
        )

    async def purge(
        self, tenants: RetentionPolicies, now_us: int, audit: AuditRecord
    ) -> PurgeCounts:
        return await self.db.write("purge", storage.purge, tenants, now_us, audit)

    async def user_row_counts(self, tenant: str, user_id: str) -> dict[str, int]:
        return await self.db.read("user_row_counts", storage.user_row_counts, tenant, user_id)

    async def orphan_postings(self, tenant: str) -> int:
        # Postings carry no tenant in DuckDB (they join to facts by number): all of them.
        return await self.db.read("orphan_postings", storage.orphan_postings)

    async def analyze(self) -> None:
        return None  # DuckDB plans these statements without collected statistics


def open_store(db: Database | PgDatabase) -> MemoryStore:
    """The store over the database `libs.common.admin.open_service_store` opened."""
    if isinstance(db, Database):
        return DuckStore(db)
    from services.memory.storage_pg import PgStore

    return PgStore(db)


__all__ = ["DuckStore", "FactRows", "MemoryStore", "RetentionPolicies", "open_store"]
