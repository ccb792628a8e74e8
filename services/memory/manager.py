"""The Memory Manager: history, facts, recall, context, consent, export and erasure.

Domain code: plain types in and out (services.memory.models), no protobuf, no grpc, no
SQL: storage is a `MemoryStore` (services/memory/store.py: DuckDB or PostgreSQL). The
tenant always comes from the authenticated caller (`libs.common.context`). Every read and
write of personal data leaves an audit row; for writes it is written in the same
transaction as the data.

With a shared store (PostgreSQL, several replicas) the caches above it are checked
against it per request: a session's Redis window against the session's tail (one
primary-key read, services/memory/hot_tier.py), a user's recall index against the user's
facts version (one primary-key read, services/memory/recall_index.py). A write
acknowledged by one replica is visible through every other on the next call.

Facts and questions are not the operator's: every remembered fact is screened
(`libs.common.untrusted.screen`) and stored with the signals it raised; BuildContext
screens recalled facts again (rows stored before migration 004, or before a better
screen), leaves flagged ones out or quotes them (MEMORY_FLAGGED_FACTS), and fences
everything but the preamble (services/memory/context_builder.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace

import numpy as np
from opentelemetry import trace

from libs.common import context, tokens
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.common.tracing import tracer
from libs.common.untrusted import screen
from services.memory import limits as lim
from services.memory import metrics, pagination, recall
from services.memory.batcher import Batcher
from services.memory.catchup import ExtractionCatchUp
from services.memory.config import MemorySettings
from services.memory.context_builder import BuiltContext, FlaggedFacts, build_context
from services.memory.embedding import Embedder, EmbeddingUnavailable
from services.memory.extraction import Completer, Extractor, Job, Proposal
from services.memory.hot_tier import HotTier, Lookup, Window
from services.memory.models import (
    Appended,
    AppendRequest,
    AppendResult,
    AuditEntry,
    AuditRecord,
    Consent,
    ErasureCounts,
    ExtractionCounts,
    Fact,
    FactFilter,
    FactsPageKey,
    Fusion,
    NewFact,
    NewMessage,
    Order,
    Page,
    QueryVector,
    RecallMode,
    RecallWeights,
    Remembered,
    ScoredFact,
    SessionTail,
    StoredMessage,
    now_us,
)
from services.memory.pgvector import PgVector
from services.memory.recall_index import RecallIndex, UserIndex
from services.memory.store import MemoryStore
from services.memory.token_counter import TokenCounter

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
EXPORT_PAGE = 500
# Indexes up to this size (postings + facts) are searched on the event loop: a thread hop
# costs more than their search (~0.1 ms at 20k).
_INLINE_SEARCH = 20_000
_US_PER_DAY = 86_400 * 1_000_000

ExportItem = Consent | Fact | StoredMessage | AuditEntry


@dataclass(frozen=True)
class HistoryPage:
    messages: list[StoredMessage]
    next_page_token: str


@dataclass(frozen=True)
class FactsPage:
    facts: list[Fact]
    next_page_token: str


@dataclass(frozen=True)
class ExtractionStatus:
    tenant_enabled: bool
    user_consented: bool
    counts: ExtractionCounts
    replica_queue_depth: int


class MemoryManager:
    def __init__(
        self,
        settings: MemorySettings,
        store: MemoryStore,
        hot: HotTier,
        index: RecallIndex | None = None,
        embedder: Embedder | None = None,
        completer: Completer | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self._reembedder: asyncio.Task[None] | None = None
        self.store = store
        self.hot = hot
        self.index = (
            index if index is not None else RecallIndex(settings.memory_recall_index_max_entries)
        )
        # PostgreSQL with pgvector (services/memory/pgvector.py), set by main.build.
        self.pgvector: PgVector | None = None
        self.appends: Batcher[AppendRequest, AppendResult] = Batcher(
            "append_batch", store.append_batch, after_commit=self._write_through
        )
        self.token_counter = TokenCounter()
        self.audits: Batcher[tuple[AuditRecord, int], None] = Batcher(
            "audit_batch", store.write_audit_batch
        )
        self.weights = RecallWeights(
            bm25=settings.memory_recall_weight_bm25,
            recency=settings.memory_recall_weight_recency,
            importance=settings.memory_recall_weight_importance,
            half_life_days=settings.memory_recency_half_life_days,
            mode=RecallMode(settings.memory_recall_mode),
            fusion=Fusion(settings.memory_recall_fusion),
            vector_weight=settings.memory_recall_vector_weight,
            rrf_k=settings.memory_recall_rrf_k,
            min_similarity=settings.memory_recall_min_similarity,
            center_min_facts=settings.memory_recall_center_min_facts,
            center_min_similarity=settings.memory_recall_center_min_similarity,
        )
        self.extractor = self._build_extractor(completer)
        self.catchup = (
            ExtractionCatchUp(settings, store, self.extractor, hot.redis)
            if self.extractor is not None
            else None
        )

    def start(self) -> None:
        self.token_counter.start()
        self.appends.start()
        self.audits.start()
        if self.settings.memory_reembed_interval_s > 0:
            self._reembedder = asyncio.create_task(self._reembed_loop())
        if self.extractor is not None:
            self.extractor.start()
        if self.catchup is not None:
            self.catchup.start()

    async def close(self) -> None:
        if self.catchup is not None:
            await self.catchup.close()
        if self.extractor is not None:
            await self.extractor.close()
        if self._reembedder is not None:
            self._reembedder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reembedder
        if self.embedder is not None:
            await self.embedder.close()
        await self.appends.close()
        await self.audits.close()
        await self.token_counter.close()

    # -- re-embedding ------------------------------------------------------------------------
    async def _reembed_loop(self) -> None:
        while True:
            try:
                await self.reindex_pass()
                if self.embedder is not None:
                    await self.reembed_pass()
                if self.pgvector is not None:
                    await self.pgvector.mirror_pass(await self.store.retention_tenants())
            except asyncio.CancelledError:
                raise
            except Exception:  # a store outage: try again next round
                log.exception("re-embed pass failed")
            await asyncio.sleep(self.settings.memory_reembed_interval_s)

    async def reindex_pass(self) -> int:
        """Bring every fact indexed by an older tokenizer to the current one
        (`recall.TOKENIZER_VERSION`), a batch at a time; the facts re-indexed. Until a
        user's facts are done, their old terms (unstemmed) match less: lexical recall is
        degraded, never wrong about which facts exist."""
        version = recall.TOKENIZER_VERSION
        batch = self.settings.memory_reembed_batch
        done = 0
        with _tracer.start_as_current_span("memory.reindex") as span:
            for tenant in await self.store.retention_tenants():
                while rows := await self.store.facts_to_reindex(tenant, version, batch):
                    updated = await self.store.reindex_facts(tenant, rows)
                    for user_id in {r.user_id for r in rows}:
                        self.index.invalidate((tenant, user_id))
                    done += updated
                    metrics.REINDEXED.inc(updated)
                    if updated == 0:
                        break
            span.set_attribute("memory.reindex.facts", done)
        if done:
            log.info("re-indexed facts", extra={"facts": done, "tokenizer": version})
        return done

    async def reembed_pass(self) -> int:
        """Give every fact without a vector of the current model one (stored before
        vectors existed, under another model, or while the embedder was failing), a batch
        at a time; the facts updated. Stops early, to retry next pass, when the embedder
        fails. Idempotent: replicas running it at once write the same vectors."""
        assert self.embedder is not None
        model = self.embedder.model
        batch = self.settings.memory_reembed_batch
        done = pending = 0
        with _tracer.start_as_current_span("memory.reembed") as span:
            for tenant in await self.store.retention_tenants():
                while rows := await self.store.facts_to_embed(tenant, model, batch):
                    with context.acting_for(tenant):  # billed to the tenant, not to memory
                        vectors = await self._embed("reembed", [r.text for r in rows])
                    if vectors is None:
                        pending += await self.store.count_to_embed(tenant, model)
                        break
                    updated = await self.store.set_embeddings(tenant, model, rows, vectors)
                    for user_id in {r.user_id for r in rows}:
                        self.index.invalidate((tenant, user_id))
                    done += updated
                    metrics.REEMBEDDED.inc(updated)
                    if updated == 0:  # all deleted meanwhile; the next pass sees the rest
                        pending += await self.store.count_to_embed(tenant, model)
                        break
            span.set_attribute("memory.reembed.facts", done)
            span.set_attribute("memory.reembed.pending", pending)
        metrics.REEMBED_PENDING.set(pending)
        if done:
            log.info("re-embedded facts", extra={"facts": done, "model": model})
        return done

    # -- audit -------------------------------------------------------------------------------
    @staticmethod
    def _audit(rpc: str, user_id: str | None, session_id: str | None = None) -> AuditRecord:
        ident = context.current_identity()
        return AuditRecord(
            tenant=ident.tenant,
            caller=ident.caller,
            key_id=ident.key_id,
            rpc=rpc,
            user_id=user_id,
            session_id=session_id,
        )

    async def _audit_read(self, record: AuditRecord) -> None:
        if self.settings.memory_audit_reads:
            await self.audits.submit((record, now_us()))

    # -- messages ----------------------------------------------------------------------------
    async def append(
        self, session_id: str, user_id: str, messages: list[NewMessage]
    ) -> list[Appended]:
        with _tracer.start_as_current_span("memory.append.count_tokens"):
            costs = await self.token_counter.costs([(m.role, m.content) for m in messages])
        request = AppendRequest(
            tenant=context.current_tenant(),
            session_id=session_id,
            user_id=user_id,
            messages=[replace(m, tokens=c) for m, c in zip(messages, costs, strict=True)],
            audit=self._audit("AppendMessages", user_id, session_id),
            now_us=now_us(),
        )
        with _tracer.start_as_current_span("memory.append.commit"):
            result = await self.appends.submit(request)
        if result.owner_mismatch:
            raise FailedPrecondition(
                "the session belongs to another user", reason="SESSION_USER_MISMATCH"
            )
        if self.extractor is not None and result.new_messages:
            self.extractor.offer(request.tenant, user_id, session_id, result.new_messages)
        metrics.MESSAGES_APPENDED.labels("stored").inc(len(result.new_messages))
        metrics.MESSAGES_APPENDED.labels("deduplicated").inc(
            len(result.appended) - len(result.new_messages)
        )
        return result.appended

    async def _write_through(
        self, requests: list[AppendRequest], results: list[AppendResult]
    ) -> None:
        """After COMMIT, from the batcher's task (not the RPC's): a client that gives up
        cannot leave a committed append out of the cache."""
        groups: dict[tuple[str, str], list[StoredMessage]] = {}
        incarnations: dict[tuple[str, str], int] = {}
        for request, result in zip(requests, results, strict=True):
            key = (request.tenant, request.session_id)
            groups.setdefault(key, []).extend(result.new_messages)
            if result.new_messages:
                incarnations[key] = result.incarnation
        await self.hot.write_through(
            [(t, s, ms, incarnations.get((t, s), 0)) for (t, s), ms in groups.items()]
        )

    async def _cached(
        self, tenant: str, session_id: str
    ) -> tuple[Lookup, SessionTail | None, Window | None]:
        """What Redis holds for the session, and the window that may answer from it.

        Shared store: the session's tail is read from the database alongside (one
        primary-key read), and the window is used only if it matches it: same incarnation,
        reaching the last committed sequence; it is trimmed to the sequences the database
        still holds. A tail of None then means the session does not exist."""
        with _tracer.start_as_current_span("memory.hot_tier.read"):
            if not self.store.shared:
                seen = await self.hot.lookup(tenant, session_id)
                return seen, None, seen.window
            seen, tail = await asyncio.gather(
                self.hot.lookup(tenant, session_id), self.store.session_tail(tenant, session_id)
            )
        window = seen.window
        if tail is None:
            if window is not None:  # left by an erasure or purge whose invalidation failed
                await self.hot.forget_window(tenant, session_id)
            return seen, None, None
        if window is not None:
            if window.incarnation != tail.incarnation or window.hi < tail.last_seq:
                metrics.HOT_TIER_READS.labels("stale").inc()
                window = None
            else:
                window = window.trimmed(tail.first_seq, tail.last_seq)
        return seen, tail, window

    def _refillable(self, window: Window | None, tail: SessionTail | None) -> bool:
        """A read that went to the database may (re)fill the window: none is usable, or only
        a short one (the messages appended since a flush, fewer than the window and not from
        the session's start), which would send every longer read to the database until
        enough new appends arrived."""
        if not self.hot.trusted:
            return False
        first = tail.first_seq if tail is not None else 1
        return window is None or (window.lo > first and len(window.messages) < self.hot.window)

    async def _fill(
        self, tenant: str, session_id: str, seen: Lookup, tail: SessionTail | None
    ) -> None:
        recent = await self.store.recent_messages(tenant, session_id, self.hot.window)
        await self.hot.fill(tenant, session_id, recent, seen, _incarnation(tail))

    async def history(
        self, session_id: str, user_id: str | None, page_size: int, page_token: str, order: Order
    ) -> HistoryPage:
        tenant = context.current_tenant()
        boundary = pagination.decode_token(page_token, session_id, order)
        audit = self._audit("GetHistory", user_id, session_id)
        seen, tail, window = await self._cached(tenant, session_id)
        page: Page | None = None
        owner = user_id
        if self.store.shared and (tail is None or (user_id and tail.user_id != user_id)):
            await self._audit_read(replace(audit, outcome="NOT_FOUND"))
            raise NotFound(
                "no such session" + (" for this user" if user_id else ""),
                reason="SESSION_NOT_FOUND",
            )
        if window is not None:
            owner = window.messages[-1].user_id
            if user_id and owner != user_id:
                await self._audit_read(replace(audit, outcome="NOT_FOUND"))
                raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
            first = tail.first_seq if tail is not None else 1
            page = pagination.page_from_window(window, order, boundary, page_size, first)
        if page is not None:
            metrics.HOT_TIER_READS.labels("hit").inc()
        else:
            if tail is not None:  # the shared path read the session already
                owner = tail.user_id
            else:
                session = await self.store.get_session(tenant, session_id)
                if session is None or (user_id and session.user_id != user_id):
                    await self._audit_read(replace(audit, outcome="NOT_FOUND"))
                    raise NotFound(
                        "no such session" + (" for this user" if user_id else ""),
                        reason="SESSION_NOT_FOUND",
                    )
                owner = session.user_id
            rows = await self.store.history_page(tenant, session_id, order, boundary, page_size + 1)
            more = len(rows) > page_size
            rows = rows[:page_size]
            page = Page(rows, rows[-1].sequence if more and rows else None)
            if self._refillable(window, tail):
                await self._fill(tenant, session_id, seen, tail)
        await self._audit_read(
            replace(audit, user_id=owner, target_ids=tuple(m.message_id for m in page.messages))
        )
        token = (
            ""
            if page.next_after is None
            else pagination.encode_token(session_id, order, page.next_after)
        )
        return HistoryPage(page.messages, token)

    async def recent(
        self, tenant: str, session_id: str, user_id: str, limit: int
    ) -> list[StoredMessage]:
        """The last `limit` messages (oldest first); [] for an unknown session."""
        seen, tail, window = await self._cached(tenant, session_id)
        if self.store.shared:
            if tail is None:
                return []
            if tail.user_id != user_id:
                raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
        if window is not None:
            if window.messages[-1].user_id != user_id:
                raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
            first = tail.first_seq if tail is not None else 1
            if window.lo <= first or len(window.messages) >= limit:
                metrics.HOT_TIER_READS.labels("hit").inc()
                return window.messages[-limit:]
        session, rows = await self.store.recent_of_session(tenant, session_id, limit)
        if session is None:
            return []
        if session.user_id != user_id:
            raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
        if self._refillable(window, tail):
            if limit >= self.hot.window or len(rows) < limit:
                await self.hot.fill(tenant, session_id, rows, seen, _incarnation(tail))
            else:
                await self._fill(tenant, session_id, seen, tail)
        return rows

    # -- facts -------------------------------------------------------------------------------
    def _expiry(self, tenant: str, fact: NewFact, now: int) -> int | None:
        days = self.settings.retention_for(tenant).fact_days_for(fact.kind)
        if days <= 0:
            return fact.expires_us
        by_policy = now + int(days * _US_PER_DAY)
        return by_policy if fact.expires_us is None else min(fact.expires_us, by_policy)

    async def _prepare_facts(self, tenant: str, facts: list[NewFact], now: int) -> list[NewFact]:
        """The facts as stored: screened, with their retention expiry and their vectors."""
        with _tracer.start_as_current_span("memory.remember.screen"):
            signals = await _screen_texts([f.text for f in facts])
        facts = [
            replace(f, expires_us=self._expiry(tenant, f, now), injection_signals=s)
            for f, s in zip(facts, signals, strict=True)
        ]
        return await self._embed_facts(facts)

    async def remember(self, user_id: str, facts: list[NewFact]) -> list[Remembered]:
        tenant = context.current_tenant()
        now = now_us()
        facts = await self._prepare_facts(tenant, facts, now)
        flagged = [f for f in facts if f.injection_signals]
        try:
            done = await self.store.remember_facts(
                tenant, user_id, facts, now, self._audit("Remember", user_id)
            )
        except BaseException:
            self.index.invalidate((tenant, user_id))  # committed or not: do not guess
            raise
        if done is None:
            raise FailedPrecondition(
                "the user has not consented to long-term memory (SetConsent)",
                reason="CONSENT_REQUIRED",
            )
        out, inserted = done
        self.index.add((tenant, user_id), inserted.facts, inserted.postings, inserted.version)
        stored = sum(1 for r in out if not r.deduplicated)
        metrics.FACTS_REMEMBERED.labels("stored").inc(stored)
        metrics.FACTS_REMEMBERED.labels("deduplicated").inc(len(out) - stored)
        _record_flagged_facts(tenant, flagged, len(facts))
        return [
            replace(r, flagged=bool(f.injection_signals)) for r, f in zip(out, facts, strict=True)
        ]

    async def list_facts(
        self,
        user_id: str,
        kinds: list[str],
        include_history: bool,
        page_size: int,
        page_token: str,
    ) -> FactsPage:
        """A page of the user's facts (ListFacts), from the store: the recall index holds
        current facts only, and no cache holds facts."""
        tenant = context.current_tenant()
        binding = pagination.facts_binding(tenant, user_id, kinds, include_history)
        after = pagination.decode_facts_token(page_token, binding)
        with _tracer.start_as_current_span("memory.list_facts") as span:
            rows = await self.store.list_facts(
                tenant, user_id, kinds, include_history, after, page_size + 1, now_us()
            )
            more = len(rows) > page_size
            rows = rows[:page_size]
            span.set_attribute("memory.list_facts.facts", len(rows))
            span.set_attribute("memory.list_facts.history", include_history)
        await self._audit_read(
            replace(self._audit("ListFacts", user_id), target_ids=tuple(f.fact_id for f in rows))
        )
        token = (
            pagination.encode_facts_token(
                binding, FactsPageKey(rows[-1].created_us, rows[-1].fact_id)
            )
            if more and rows
            else ""
        )
        return FactsPage(rows, token)

    async def extraction_status(self, user_id: str) -> ExtractionStatus:
        """GetExtractionStatus: opt-ins, the store's counts, this replica's queue."""
        tenant = context.current_tenant()
        with _tracer.start_as_current_span("memory.extraction_status"):
            consent, counts = await asyncio.gather(
                self.store.get_consent(tenant, user_id),
                self.store.extraction_counts(tenant, user_id, now_us()),
            )
        await self._audit_read(self._audit("GetExtractionStatus", user_id))
        extractor = self.extractor
        return ExtractionStatus(
            tenant_enabled=extractor is not None and extractor.enabled_for(tenant),
            user_consented=consent.long_term_memory and consent.fact_extraction,
            counts=counts,
            replica_queue_depth=extractor.queue_depth if extractor is not None else 0,
        )

    # -- extraction (services/memory/extraction.py) ------------------------------------------
    def _build_extractor(self, completer: Completer | None) -> Extractor | None:
        tenants = self.settings.memory_extraction_tenants
        if completer is None or not tenants:
            return None
        return Extractor(
            completer,
            tenants=tenants,
            queue_max=self.settings.memory_extraction_queue_max,
            tokens_per_minute=self.settings.memory_extraction_tokens_per_minute,
            answer_tokens=self.settings.memory_extraction_max_tokens,
            handle=self._write_extracted,
            known_facts=self._known_facts,
            allowed=self.store.extraction_allowed,
        )

    async def _known_facts(self, job: Job) -> list[Fact]:
        """The current facts the model is shown: those closest to the new turns."""
        text = " ".join(m.content for m in job.turns)[: lim.MAX_QUERY_BYTES // 2]
        found = await self._recall(
            job.tenant, job.user_id, text, FactFilter(), self.settings.memory_extraction_known_facts
        )
        return [s.fact for s in found]

    def _same_fact(self, similarity: float, text: str, other: str) -> bool:
        """Two facts that mean the same: vector similarity at the threshold and the same
        numbers (static vectors barely see "120 shares" vs "200 shares"; in finance the
        numbers are the fact)."""
        threshold = self.settings.memory_extraction_dedup_similarity
        return similarity >= threshold and _numbers(text) == _numbers(other)

    async def _is_duplicate(self, job: Job, proposal: Proposal, vector: QueryVector) -> bool:
        """A current fact that means the same as the proposal; the fact an UPDATE
        supersedes is not its duplicate."""
        top = await self._recall(
            job.tenant,
            job.user_id,
            proposal.text,
            FactFilter(),
            3,
            RecallMode.VECTOR,
            vector,
            raw_similarity=True,
        )
        return any(
            s.fact.fact_id != proposal.supersedes
            and self._same_fact(s.vector_similarity, s.fact.text, proposal.text)
            for s in top
        )

    async def _write_extracted(self, job: Job, proposals: list[Proposal]) -> None:
        """Write what the model proposed (after dedup by meaning against the current facts
        and the batch's earlier proposals), marking the turns handled even when nothing is
        new, in one transaction. Each proposal is embedded once: the same vector finds its
        duplicates and is stored with the fact."""
        vectors = (
            await self._embed("fact", [p.text for p in proposals])
            if self.embedder is not None and proposals
            else None
        )
        model = self.embedder.model if self.embedder is not None else ""
        kept: list[tuple[Proposal, np.ndarray | None]] = []
        for i, proposal in enumerate(proposals):
            vector = None if vectors is None else vectors[i]
            if vector is not None and (
                await self._is_duplicate(job, proposal, QueryVector(vector, model))
                or any(
                    other is not None
                    and self._same_fact(float(vector @ other), proposal.text, earlier.text)
                    for earlier, other in kept
                )
            ):
                metrics.EXTRACTION_PROPOSALS.labels("duplicate_meaning").inc()
                continue
            kept.append((proposal, vector))
        now = now_us()
        sources = tuple(m.message_id for m in job.turns)
        facts = await self._prepare_facts(
            job.tenant,
            [
                NewFact(
                    p.text,
                    p.kind,
                    p.importance,
                    (),
                    job.session_id,
                    None,
                    embedding=v,
                    embedding_model=model if v is not None else "",
                    origin="extracted",
                    source_message_ids=sources,
                )
                for p, v in kept
            ],
            now,
        )
        supersedes = [(i, p.supersedes) for i, (p, _) in enumerate(kept) if p.op == "UPDATE"]
        key = (job.tenant, job.user_id)
        try:
            done = await self.store.write_extraction(
                job.tenant,
                job.user_id,
                facts,
                supersedes,
                list(sources),
                now,
                self._audit("ExtractFacts", job.user_id, job.session_id),
            )
        except BaseException:
            self.index.invalidate(key)
            raise
        if done is None or done.skipped:
            metrics.EXTRACTION_PROPOSALS.labels("skipped").inc(len(kept))
            return
        if done.superseded:
            self.index.invalidate(key)  # a fact left the current set: reload
        else:
            self.index.add(key, done.inserted.facts, done.inserted.postings, done.inserted.version)
        added = sum(1 for r in done.remembered if not r.deduplicated)
        metrics.EXTRACTION_PROPOSALS.labels("added").inc(added - len(done.superseded))
        metrics.EXTRACTION_PROPOSALS.labels("updated").inc(len(done.superseded))
        metrics.EXTRACTION_PROPOSALS.labels("duplicate_text").inc(len(done.remembered) - added)
        log.info(
            "facts extracted",
            extra={
                "session_id": job.session_id,
                "messages": len(sources),
                "added": added - len(done.superseded),
                "superseded": len(done.superseded),
            },
        )

    async def _embed_facts(self, facts: list[NewFact]) -> list[NewFact]:
        """The facts with their vectors: those without one are embedded (left as they are
        when no embedder is configured or it fails: stored without one, the re-embed
        catches up)."""
        missing = [i for i, f in enumerate(facts) if f.embedding is None]
        if self.embedder is None or not missing:
            return facts
        vectors = await self._embed("fact", [facts[i].text for i in missing])
        if vectors is None:
            return facts
        out = list(facts)
        for i, vector in zip(missing, vectors, strict=True):
            out[i] = replace(facts[i], embedding=vector, embedding_model=self.embedder.model)
        return out

    async def _embed(self, use: str, texts: list[str]) -> np.ndarray | None:
        """Vectors of `texts`, or None when the embedder failed (counted and logged)."""
        assert self.embedder is not None
        started = time.perf_counter()
        with _tracer.start_as_current_span("memory.embed") as span:
            span.set_attribute("memory.embed.use", use)
            span.set_attribute("memory.embed.texts", len(texts))
            span.set_attribute("memory.embed.model", self.embedder.model)
            try:
                vectors = await self.embedder.embed(texts)
            except EmbeddingUnavailable as exc:
                span.set_attribute("memory.embed.error", str(exc))
                metrics.EMBEDDINGS.labels(use, "error").inc(len(texts))
                log.warning("embedding failed", extra={"use": use, "error": str(exc)})
                return None
        metrics.EMBED_SECONDS.labels(use).observe(time.perf_counter() - started)
        metrics.EMBEDDINGS.labels(use, "ok").inc(len(texts))
        return vectors

    async def _query_vector(self, query: str, mode: RecallMode) -> QueryVector | None:
        if mode is RecallMode.LEXICAL or self.embedder is None or not query.strip():
            return None
        vectors = await self._embed("query", [query])
        if vectors is None or len(vectors) != 1 or not vectors[0].any():
            return None  # a query of unknown words only has a zero vector: nothing to rank
        return QueryVector(vectors[0], self.embedder.model)

    @property
    def _index_model(self) -> str:
        return self.embedder.model if self.embedder is not None else ""

    async def _recall(
        self,
        tenant: str,
        user_id: str,
        query: str,
        flt: FactFilter,
        k: int,
        mode: RecallMode | None = None,
        vector: QueryVector | None = None,
        raw_similarity: bool = False,
    ) -> list[ScoredFact]:
        """`vector`: the query's, when the caller has it already (else embedded here).
        `raw_similarity`: plain cosine, not centred (what dedup thresholds are measured on)."""
        asked = mode or self.weights.mode
        with _tracer.start_as_current_span("memory.recall.bm25") as span:
            if vector is None:
                vector = await self._query_vector(query, asked)
            served = asked if vector is not None else RecallMode.LEXICAL
            weights = replace(self.weights, mode=served)
            if raw_similarity:
                weights = replace(weights, center_min_facts=0)
            index = await self._user_index(tenant, user_id)
            args = (tenant, user_id, query, flt, k, now_us(), weights)
            candidates = None
            if index is None and vector is not None and self.pgvector is not None:
                # PostgreSQL: candidates from pgvector, scored by the same code (pgvector.py).
                candidates = await self.pgvector.candidates_index(
                    tenant,
                    user_id,
                    self._index_model,
                    [recall.term_key(tenant, user_id, t) for t in recall.query_terms(query)],
                    flt,
                    k,
                    args[5],
                    vector,
                    weights,
                )
            if candidates is not None:
                path = "pgvector"
                found = await search_indexed(self.store, candidates, *args, vector)
            elif index is None and served is RecallMode.LEXICAL:
                path = "sql"
                found = await self.store.recall_facts(*args)
            elif index is None:
                # Hybrid and vector scoring live in the index only: a user over its cap (or
                # the index off) pays a transient load per Recall (docs/memory.md).
                path = "transient"
                with _tracer.start_as_current_span("memory.recall.index_load"):
                    transient = await load_user_index(
                        self.store, tenant, user_id, self._index_model
                    )
                found = await search_indexed(self.store, transient, *args, vector)
            else:
                path = "index"
                found = await self._search_indexed(index, *args, vector)
            span.set_attribute("memory.recall.path", path)
            span.set_attribute("memory.recall.mode", served.value)
            span.set_attribute("memory.recall.results", len(found))
        metrics.RECALL_MODE.labels(asked.value, served.value).inc()
        metrics.RECALL_SERVED.labels(path).inc()
        metrics.RECALL_RESULTS.observe(len(found))
        metrics.RECALL_INDEX_ENTRIES.set(self.index.size)
        return found

    async def _user_index(self, tenant: str, user_id: str) -> UserIndex | None:
        """The user's recall index (None: serve from SQL). With a shared store, checked
        against the user's facts version first (one primary-key read): another replica may
        have remembered or forgotten since it was built."""
        key = (tenant, user_id)

        def load() -> Awaitable[UserIndex]:
            return self._load_index(tenant, user_id)

        if not self.store.shared:
            return await self.index.get(key, load)
        current = await self.store.facts_version(tenant, user_id)
        index = await self.index.get(key, load)
        if index is None or index.version >= current.version:
            return index
        if current.reset <= index.version:
            with _tracer.start_as_current_span("memory.recall.index_delta"):
                delta = await self.store.load_recall_index(tenant, user_id, index.max_fact_no)
            if delta.reset <= index.version:  # no deletion since: the additions are all
                metrics.RECALL_INDEX_REFRESHES.labels("delta").inc()
                fresh = index.with_added(delta.facts, delta.postings, delta.version)
                self.index.replace(key, index, fresh)
                return fresh
        metrics.RECALL_INDEX_REFRESHES.labels("reload").inc()
        self.index.invalidate(key)
        return await self.index.get(key, load)

    async def _load_index(self, tenant: str, user_id: str) -> UserIndex:
        with _tracer.start_as_current_span("memory.recall.index_load"):
            metrics.RECALL_INDEX_LOADS.inc()
            return await load_user_index(self.store, tenant, user_id, self._index_model)

    async def _search_indexed(
        self,
        index: UserIndex,
        tenant: str,
        user_id: str,
        query: str,
        flt: FactFilter,
        k: int,
        now: int,
        weights: RecallWeights,
        vector: QueryVector | None = None,
    ) -> list[ScoredFact]:
        return await search_indexed(
            self.store, index, tenant, user_id, query, flt, k, now, weights, vector
        )

    async def recall(
        self,
        user_id: str,
        query: str,
        k: int,
        flt: FactFilter,
        mode: RecallMode | None = None,
    ) -> list[ScoredFact]:
        tenant = context.current_tenant()
        found = await self._recall(tenant, user_id, query, flt, k, mode)
        await self._audit_read(
            replace(self._audit("Recall", user_id), target_ids=tuple(s.fact.fact_id for s in found))
        )
        return found

    async def forget(
        self, user_id: str, fact_ids: list[str], flt: FactFilter | None, forget_all: bool
    ) -> list[str]:
        tenant = context.current_tenant()
        try:
            return await self.store.forget_facts(
                tenant, user_id, fact_ids, flt, forget_all, now_us(), self._audit("Forget", user_id)
            )
        finally:  # after COMMIT, before the answer: no later Recall sees a forgotten fact
            self.index.invalidate((tenant, user_id))

    # -- context -----------------------------------------------------------------------------
    async def build_context(
        self, session_id: str, user_id: str, query: str, budget: int, max_facts: int, preamble: str
    ) -> BuiltContext:
        tenant = context.current_tenant()
        audit = self._audit("BuildContext", user_id, session_id)
        try:
            history = await self.recent(
                tenant, session_id, user_id, self.settings.memory_context_max_messages
            )
        except NotFound:
            await self._audit_read(replace(audit, outcome="NOT_FOUND"))
            raise
        facts = (
            await self._recall(tenant, user_id, query, FactFilter(), max_facts)
            if max_facts > 0
            else []
        )
        mode = FlaggedFacts(self.settings.memory_flagged_facts)
        with _tracer.start_as_current_span("memory.context.fit"):
            try:
                built, query_signals = await asyncio.to_thread(
                    _fit_screened,
                    preamble=preamble,
                    facts=[s.fact for s in facts],
                    history=history,
                    query=query,
                    budget=budget,
                    facts_share=self.settings.memory_context_facts_share,
                    flagged_facts=mode,
                )
            except tokens.ContextOverflowError as exc:
                raise InvalidArgument.field(
                    "token_budget",
                    f"the preamble and query alone need {exc.required_tokens} "
                    f"tokens; budget is {budget}",
                ) from None
        metrics.CONTEXT_TOKENS.observe(built.total_tokens)
        _record_flagged_context(tenant, built, mode, query_signals)
        by_seq = {m.sequence: m.message_id for m in history}
        await self._audit_read(
            replace(
                audit,
                target_ids=tuple(built.included_fact_ids)
                + tuple(by_seq[s] for s in built.included_sequences),
                detail={
                    "facts": len(built.included_fact_ids),
                    "flagged_facts": len(built.flagged_fact_ids),
                    "messages": len(built.included_sequences),
                    "tokens": built.total_tokens,
                },
            )
        )
        return built

    # -- consent -----------------------------------------------------------------------------
    async def set_consent(
        self, user_id: str, long_term_memory: bool, fact_extraction: bool = False
    ) -> tuple[Consent, int]:
        tenant = context.current_tenant()
        try:
            return await self.store.set_consent(
                tenant,
                user_id,
                long_term_memory,
                now_us(),
                self._audit("SetConsent", user_id),
                fact_extraction,
            )
        finally:
            if not long_term_memory:  # withdrawal deletes the user's facts
                self.index.invalidate((tenant, user_id))

    async def get_consent(self, user_id: str) -> Consent:
        tenant = context.current_tenant()
        consent = await self.store.get_consent(tenant, user_id)
        await self._audit_read(self._audit("GetConsent", user_id))
        return consent

    # -- export and erasure ------------------------------------------------------------------
    async def export(self, user_id: str) -> AsyncIterator[ExportItem]:
        """Everything stored about the user, page by page (bounded memory)."""
        tenant = context.current_tenant()
        # Audited first: a client that stops reading half-way has still read something.
        await self._audit_read(self._audit("ExportUserData", user_id))
        yield await self.store.get_consent(tenant, user_id)
        after_fact = ""
        while True:
            facts = await self.store.export_facts(tenant, user_id, after_fact, EXPORT_PAGE)
            for fact in facts:
                yield fact
            if len(facts) < EXPORT_PAGE:
                break
            after_fact = facts[-1].fact_id
        after_msg = ("", 0)
        while True:
            messages = await self.store.export_messages(tenant, user_id, after_msg, EXPORT_PAGE)
            for message in messages:
                yield message
            if len(messages) < EXPORT_PAGE:
                break
            after_msg = (messages[-1].session_id, messages[-1].sequence)
        after_audit = (-1, "")
        while True:
            entries = await self.store.export_audit(tenant, user_id, after_audit, EXPORT_PAGE)
            for entry in entries:
                yield entry
            if len(entries) < EXPORT_PAGE:
                break
            after_audit = (entries[-1].at_us, entries[-1].audit_id)

    async def erase(self, user_id: str) -> tuple[ErasureCounts, int]:
        tenant = context.current_tenant()
        try:
            counts = await self.store.erase_user(
                tenant, user_id, now_us(), self._audit("DeleteUserData", user_id)
            )
        finally:
            self.index.invalidate((tenant, user_id))
        if self.pgvector is not None:
            try:  # their definitions name the user: gone with the user's rows
                await self.pgvector.drop_user_indexes(tenant, user_id)
            except Exception:
                log.exception("dropping an erased user's HNSW index failed (drop it by hand)")
        cached = await self.hot.invalidate((tenant, s) for s in counts.session_ids)
        metrics.ERASURES.inc()
        log.info(
            "user data erased",
            extra={
                "tenant": tenant,
                "messages": counts.messages,
                "facts": counts.facts,
                "sessions": counts.sessions,
                "cache_entries": cached,
            },
        )
        return counts, cached


# Texts up to this many characters in all are screened on the event loop (~0.25 ms per
# 100 characters); more (100 facts of 4 KiB, a 32 KiB query) on a thread.
_INLINE_SCREEN_CHARS = 4096


def _screen_all(texts: list[str]) -> list[tuple[str, ...]]:
    return [screen(t).signals for t in texts]


async def _screen_texts(texts: list[str]) -> list[tuple[str, ...]]:
    if sum(map(len, texts)) <= _INLINE_SCREEN_CHARS:
        return _screen_all(texts)
    return await asyncio.to_thread(_screen_all, texts)


def _fit_screened(
    *,
    preamble: str,
    facts: list[Fact],
    history: list[StoredMessage],
    query: str,
    budget: int,
    facts_share: float,
    flagged_facts: FlaggedFacts,
) -> tuple[BuiltContext, tuple[str, ...]]:
    """`build_context` with the recalled facts' signals settled, and the query's signals:
    all of it CPU-bound, run off the event loop."""
    built = build_context(
        preamble=preamble,
        facts=[_screened(f) for f in facts],
        history=history,
        query=query,
        budget=budget,
        facts_share=facts_share,
        flagged_facts=flagged_facts,
    )
    return built, screen(query).signals if query else ()


def _screened(fact: Fact) -> Fact:
    """The fact with the signals to act on: those stored at Remember, or, for a fact stored
    unflagged (before migration 004, or before the screen learnt a pattern), a fresh screen."""
    if fact.injection_signals:
        return fact
    return replace(fact, injection_signals=screen(fact.text).signals)


def _record_flagged_facts(tenant: str, flagged: list[NewFact], total: int) -> None:
    """Counts only: a flagged fact's text is personal data and never logged."""
    trace.get_current_span().set_attributes(
        {"memory.remember.facts": total, "memory.remember.flagged_facts": len(flagged)}
    )
    if not flagged:
        return
    by_signal: dict[str, int] = {}
    for fact in flagged:
        for signal in fact.injection_signals:
            by_signal[signal] = by_signal.get(signal, 0) + 1
    for signal, n in by_signal.items():
        metrics.FACTS_FLAGGED.labels(signal).inc(n)
    log.info(
        "facts flagged as possible instructions",
        extra={"tenant": tenant, "facts": total, "flagged": len(flagged), "signals": by_signal},
    )


def _record_flagged_context(
    tenant: str, built: BuiltContext, mode: FlaggedFacts, query_signals: tuple[str, ...]
) -> None:
    quoted = len(built.quoted_fact_ids)
    excluded = len(built.flagged_fact_ids) if mode is FlaggedFacts.EXCLUDE else 0
    omitted = len(built.flagged_fact_ids) - quoted - excluded
    trace.get_current_span().set_attributes(
        {
            "memory.context.flagged_facts": len(built.flagged_fact_ids),
            "memory.context.flagged_facts_excluded": excluded,
            "memory.context.flagged_facts_quoted": quoted,
            "memory.context.query_flagged": bool(query_signals),
        }
    )
    for action, n in (("excluded", excluded), ("quoted", quoted), ("omitted", omitted)):
        if n:
            metrics.CONTEXT_FLAGGED_FACTS.labels(action).inc(n)
    if built.flagged_fact_ids or query_signals:
        log.info(
            "context built around flagged text",
            extra={
                "tenant": tenant,
                "flagged_facts": len(built.flagged_fact_ids),
                "excluded": excluded,
                "quoted": quoted,
                "query_signals": list(query_signals),
                "mode": mode.value,
            },
        )


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _numbers(text: str) -> list[str]:
    return sorted(_NUMBER.findall(text))


def _incarnation(tail: SessionTail | None) -> int:
    return tail.incarnation if tail is not None else 0


async def load_user_index(
    store: MemoryStore, tenant: str, user_id: str, model: str = ""
) -> UserIndex:
    """A user's recall index, built from one snapshot of the store (off the event loop),
    with the vectors of `model`."""
    snapshot = await store.load_recall_index(tenant, user_id)
    return await asyncio.to_thread(
        UserIndex.build, snapshot.facts, snapshot.postings, snapshot.version, model
    )


async def search_indexed(
    store: MemoryStore,
    index: UserIndex,
    tenant: str,
    user_id: str,
    query: str,
    flt: FactFilter,
    k: int,
    now: int,
    weights: RecallWeights,
    vector: QueryVector | None = None,
) -> list[ScoredFact]:
    """Score with the index (off the event loop when it is big), then fetch the winners'
    rows; a fact deleted since the index snapshot is gone from them and left out."""
    keys = [recall.term_key(tenant, user_id, t) for t in recall.query_terms(query)]
    if index.size > _INLINE_SEARCH:
        hits = await asyncio.to_thread(index.search, keys, flt, k, now, weights, vector)
    else:
        hits = index.search(keys, flt, k, now, weights, vector)
    found = await store.facts_by_no(tenant, user_id, [h.fact_no for h in hits])
    return [
        ScoredFact(
            found[h.fact_no],
            h.bm25,
            h.bm25_normalized,
            h.recency,
            h.importance,
            h.score,
            h.vector_similarity,
            h.vector_normalized,
            h.relevance,
        )
        for h in hits
        if h.fact_no in found
    ]
