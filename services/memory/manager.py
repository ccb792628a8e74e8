"""The Memory Manager: history, facts, recall, context, consent, export and erasure.

Domain code: plain types in and out (services.memory.models), no protobuf, no grpc. The
tenant always comes from the authenticated caller (`libs.common.context`). Every read and
write of personal data leaves an audit row; for writes it is written in the same
transaction as the data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from libs.common import context, tokens
from libs.common.duck import Database
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.common.tracing import tracer
from services.memory import metrics, pagination, recall, storage
from services.memory.batcher import Batcher
from services.memory.config import MemorySettings
from services.memory.context_builder import BuiltContext, build_context
from services.memory.hot_tier import HotTier, Window
from services.memory.models import (
    Appended,
    AppendRequest,
    AppendResult,
    AuditEntry,
    AuditRecord,
    Consent,
    ErasureCounts,
    Fact,
    FactFilter,
    NewFact,
    NewMessage,
    Order,
    Page,
    RecallWeights,
    Remembered,
    ScoredFact,
    StoredMessage,
    now_us,
)
from services.memory.recall_index import RecallIndex, UserIndex
from services.memory.token_counter import TokenCounter

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
EXPORT_PAGE = 500
_US_PER_DAY = 86_400 * 1_000_000

ExportItem = Consent | Fact | StoredMessage | AuditEntry


@dataclass(frozen=True)
class HistoryPage:
    messages: list[StoredMessage]
    next_page_token: str


class MemoryManager:
    def __init__(
        self,
        settings: MemorySettings,
        db: Database,
        hot: HotTier,
        index: RecallIndex | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.hot = hot
        self.index = (
            index if index is not None else RecallIndex(settings.memory_recall_index_max_entries)
        )
        self.appends: Batcher[AppendRequest, AppendResult] = Batcher(
            db, "append_batch", storage.append_batch, after_commit=self._write_through
        )
        self.token_counter = TokenCounter()
        self.audits: Batcher[tuple[AuditRecord, int], None] = Batcher(
            db, "audit_batch", storage.write_audit_batch
        )
        self.weights = RecallWeights(
            bm25=settings.memory_recall_weight_bm25,
            recency=settings.memory_recall_weight_recency,
            importance=settings.memory_recall_weight_importance,
            half_life_days=settings.memory_recency_half_life_days,
        )

    def start(self) -> None:
        self.token_counter.start()
        self.appends.start()
        self.audits.start()

    async def close(self) -> None:
        await self.appends.close()
        await self.audits.close()
        await self.token_counter.close()

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
        for request, result in zip(requests, results, strict=True):
            groups.setdefault((request.tenant, request.session_id), []).extend(result.new_messages)
        await self.hot.write_through([(t, s, ms) for (t, s), ms in groups.items()])

    async def _window(self, tenant: str, session_id: str) -> Window | None:
        with _tracer.start_as_current_span("memory.hot_tier.read"):
            return await self.hot.window_of(tenant, session_id)

    def _refillable(self, window: Window | None) -> bool:
        """A read that went to DuckDB may (re)fill the window: none is cached, or only a short
        one (the messages appended since a flush, fewer than the window and not from the
        session's start), which would send every longer read to DuckDB until enough new
        appends arrived."""
        if not self.hot.trusted:
            return False
        return window is None or (window.lo > 1 and len(window.messages) < self.hot.window)

    async def _fill(self, tenant: str, session_id: str, generation: int) -> None:
        recent = await self.db.read(
            "recent_messages", storage.recent_messages, tenant, session_id, self.hot.window
        )
        await self.hot.fill(tenant, session_id, recent, generation)

    async def history(
        self, session_id: str, user_id: str | None, page_size: int, page_token: str, order: Order
    ) -> HistoryPage:
        tenant = context.current_tenant()
        boundary = pagination.decode_token(page_token, session_id, order)
        audit = self._audit("GetHistory", user_id, session_id)
        generation = self.hot.generation
        window = await self._window(tenant, session_id)
        page: Page | None = None
        owner = user_id
        if window is not None:
            owner = window.messages[-1].user_id
            if user_id and owner != user_id:
                await self._audit_read(replace(audit, outcome="NOT_FOUND"))
                raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
            page = pagination.page_from_window(window, order, boundary, page_size)
        if page is not None:
            metrics.HOT_TIER_READS.labels("hit").inc()
        else:
            session = await self.db.read("get_session", storage.get_session, tenant, session_id)
            if session is None or (user_id and session.user_id != user_id):
                await self._audit_read(replace(audit, outcome="NOT_FOUND"))
                raise NotFound(
                    "no such session" + (" for this user" if user_id else ""),
                    reason="SESSION_NOT_FOUND",
                )
            owner = session.user_id
            rows = await self.db.read(
                "history_page",
                storage.history_page,
                tenant,
                session_id,
                order,
                boundary,
                page_size + 1,
            )
            more = len(rows) > page_size
            rows = rows[:page_size]
            page = Page(rows, rows[-1].sequence if more and rows else None)
            if self._refillable(window):
                await self._fill(tenant, session_id, generation)
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
        generation = self.hot.generation
        window = await self._window(tenant, session_id)
        if window is not None:
            if window.messages[-1].user_id != user_id:
                raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
            if window.lo == 1 or len(window.messages) >= limit:
                metrics.HOT_TIER_READS.labels("hit").inc()
                return window.messages[-limit:]
        session, rows = await self.db.read(
            "recent_of_session", storage.recent_of_session, tenant, session_id, limit
        )
        if session is None:
            return []
        if session.user_id != user_id:
            raise NotFound("no such session for this user", reason="SESSION_NOT_FOUND")
        if self._refillable(window):
            if limit >= self.hot.window or len(rows) < limit:
                await self.hot.fill(tenant, session_id, rows, generation)
            else:
                await self._fill(tenant, session_id, generation)
        return rows

    # -- facts -------------------------------------------------------------------------------
    def _expiry(self, tenant: str, fact: NewFact, now: int) -> int | None:
        days = self.settings.retention_for(tenant).fact_days_for(fact.kind)
        if days <= 0:
            return fact.expires_us
        by_policy = now + int(days * _US_PER_DAY)
        return by_policy if fact.expires_us is None else min(fact.expires_us, by_policy)

    async def remember(self, user_id: str, facts: list[NewFact]) -> list[Remembered]:
        tenant = context.current_tenant()
        now = now_us()
        facts = [
            NewFact(
                f.text,
                f.kind,
                f.importance,
                f.tags,
                f.source_session_id,
                self._expiry(tenant, f, now),
            )
            for f in facts
        ]
        try:
            done = await self.db.write(
                "remember_facts",
                storage.remember_facts,
                tenant,
                user_id,
                facts,
                now,
                self._audit("Remember", user_id),
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
        self.index.add((tenant, user_id), inserted.facts, inserted.postings)
        stored = sum(1 for r in out if not r.deduplicated)
        metrics.FACTS_REMEMBERED.labels("stored").inc(stored)
        metrics.FACTS_REMEMBERED.labels("deduplicated").inc(len(out) - stored)
        return out

    async def _recall(
        self, tenant: str, user_id: str, query: str, flt: FactFilter, k: int
    ) -> list[ScoredFact]:
        with _tracer.start_as_current_span("memory.recall.bm25") as span:
            key = (tenant, user_id)
            index = await self.index.get(key, lambda: self._load_index(tenant, user_id))
            args = (tenant, user_id, query, flt, k, now_us(), self.weights)
            if index is None:
                path = "sql"
                found = await self.db.read("recall_facts", storage.recall_facts, *args)
            else:
                path = "index"
                found = await self.db.read("recall_indexed", _search_indexed, index, *args)
            span.set_attribute("memory.recall.path", path)
            span.set_attribute("memory.recall.results", len(found))
        metrics.RECALL_SERVED.labels(path).inc()
        metrics.RECALL_RESULTS.observe(len(found))
        metrics.RECALL_INDEX_ENTRIES.set(self.index.size)
        return found

    async def _load_index(self, tenant: str, user_id: str) -> UserIndex:
        with _tracer.start_as_current_span("memory.recall.index_load"):
            metrics.RECALL_INDEX_LOADS.inc()
            return await self.db.read("recall_index_load", _load_user_index, tenant, user_id)

    async def recall(self, user_id: str, query: str, k: int, flt: FactFilter) -> list[ScoredFact]:
        tenant = context.current_tenant()
        found = await self._recall(tenant, user_id, query, flt, k)
        await self._audit_read(
            replace(self._audit("Recall", user_id), target_ids=tuple(s.fact.fact_id for s in found))
        )
        return found

    async def forget(
        self, user_id: str, fact_ids: list[str], flt: FactFilter | None, forget_all: bool
    ) -> list[str]:
        tenant = context.current_tenant()
        try:
            return await self.db.write(
                "forget_facts",
                storage.forget_facts,
                tenant,
                user_id,
                fact_ids,
                flt,
                forget_all,
                now_us(),
                self._audit("Forget", user_id),
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
        with _tracer.start_as_current_span("memory.context.fit"):
            try:
                built = await asyncio.to_thread(
                    build_context,
                    preamble=preamble,
                    facts=[s.fact for s in facts],
                    history=history,
                    query=query,
                    budget=budget,
                    facts_share=self.settings.memory_context_facts_share,
                )
            except tokens.ContextOverflowError as exc:
                raise InvalidArgument.field(
                    "token_budget",
                    f"the preamble and query alone need {exc.required_tokens} "
                    f"tokens; budget is {budget}",
                ) from None
        metrics.CONTEXT_TOKENS.observe(built.total_tokens)
        by_seq = {m.sequence: m.message_id for m in history}
        await self._audit_read(
            replace(
                audit,
                target_ids=tuple(built.included_fact_ids)
                + tuple(by_seq[s] for s in built.included_sequences),
                detail={
                    "facts": len(built.included_fact_ids),
                    "messages": len(built.included_sequences),
                    "tokens": built.total_tokens,
                },
            )
        )
        return built

    # -- consent -----------------------------------------------------------------------------
    async def set_consent(self, user_id: str, long_term_memory: bool) -> tuple[Consent, int]:
        tenant = context.current_tenant()
        try:
            return await self.db.write(
                "set_consent",
                storage.set_consent,
                tenant,
                user_id,
                long_term_memory,
                now_us(),
                self._audit("SetConsent", user_id),
            )
        finally:
            if not long_term_memory:  # withdrawal deletes the user's facts
                self.index.invalidate((tenant, user_id))

    async def get_consent(self, user_id: str) -> Consent:
        tenant = context.current_tenant()
        consent = await self.db.read("get_consent", storage.get_consent, tenant, user_id)
        await self._audit_read(self._audit("GetConsent", user_id))
        return consent

    # -- export and erasure ------------------------------------------------------------------
    async def export(self, user_id: str) -> AsyncIterator[ExportItem]:
        """Everything stored about the user, page by page (bounded memory)."""
        tenant = context.current_tenant()
        # Audited first: a client that stops reading half-way has still read something.
        await self._audit_read(self._audit("ExportUserData", user_id))
        yield await self.db.read("get_consent", storage.get_consent, tenant, user_id)
        after_fact = ""
        while True:
            facts = await self.db.read(
                "export_facts", storage.export_facts, tenant, user_id, after_fact, EXPORT_PAGE
            )
            for fact in facts:
                yield fact
            if len(facts) < EXPORT_PAGE:
                break
            after_fact = facts[-1].fact_id
        after_msg = ("", 0)
        while True:
            messages = await self.db.read(
                "export_messages", storage.export_messages, tenant, user_id, after_msg, EXPORT_PAGE
            )
            for message in messages:
                yield message
            if len(messages) < EXPORT_PAGE:
                break
            after_msg = (messages[-1].session_id, messages[-1].sequence)
        after_audit = (-1, "")
        while True:
            entries = await self.db.read(
                "export_audit", storage.export_audit, tenant, user_id, after_audit, EXPORT_PAGE
            )
            for entry in entries:
                yield entry
            if len(entries) < EXPORT_PAGE:
                break
            after_audit = (entries[-1].at_us, entries[-1].audit_id)

    async def erase(self, user_id: str) -> tuple[ErasureCounts, int]:
        tenant = context.current_tenant()
        try:
            counts = await self.db.write(
                "erase_user",
                storage.erase_user,
                tenant,
                user_id,
                now_us(),
                self._audit("DeleteUserData", user_id),
            )
        finally:
            self.index.invalidate((tenant, user_id))
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


# -- helpers run on reader threads / off the event loop --------------------------------------
def _load_user_index(cur: storage.Cursor, tenant: str, user_id: str) -> UserIndex:
    facts, postings = storage.load_recall_index(cur, tenant, user_id)
    return UserIndex.build(facts, postings)


def _search_indexed(
    cur: storage.Cursor,
    index: UserIndex,
    tenant: str,
    user_id: str,
    query: str,
    flt: FactFilter,
    k: int,
    now: int,
    weights: RecallWeights,
) -> list[ScoredFact]:
    keys = [recall.term_key(tenant, user_id, t) for t in recall.query_terms(query)]
    hits = index.search(keys, flt, k, now, weights)
    found = storage.facts_by_no(cur, tenant, user_id, [h.fact_no for h in hits])
    # A fact deleted since the index snapshot is gone from `found` and simply left out.
    return [
        ScoredFact(found[h.fact_no], h.bm25, h.bm25_normalized, h.recency, h.importance, h.score)
        for h in hits
        if h.fact_no in found
    ]
