"""gRPC servicer of finsight.memory.v1.MemoryService: validates and translates protobuf
to domain types and back; the work is done by MemoryManager and Purger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from libs.common.errors import Violations
from services.memory import limits as lim
from services.memory.manager import MemoryManager
from services.memory.models import (
    AuditEntry,
    Consent,
    Fact,
    FactFilter,
    NewFact,
    NewMessage,
    Order,
    RecallMode,
    ScoredFact,
    StoredMessage,
    now_us,
)
from services.memory.retention import Purger

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

_ROLE_IN = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
_ROLE_OUT = {v: k for k, v in _ROLE_IN.items()}
_ORDER = {
    pb.SORT_ORDER_UNSPECIFIED: Order.ASC,
    pb.SORT_ORDER_ASCENDING: Order.ASC,
    pb.SORT_ORDER_DESCENDING: Order.DESC,
}


# -- time ----------------------------------------------------------------------------------
def _ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


# -- domain -> protobuf --------------------------------------------------------------------
def _chat(role: str, content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=_ROLE_OUT.get(role, common_pb2.ROLE_USER), content=content)


def _message_pb(m: StoredMessage) -> pb.StoredMessage:
    return pb.StoredMessage(
        message_id=m.message_id,
        session_id=m.session_id,
        user_id=m.user_id,
        sequence=m.sequence,
        message=_chat(m.role, m.content),
        client_message_id=m.client_message_id or "",
        metadata=m.metadata,
        create_time=_ts(m.created_us),
    )


_ORIGINS = {"remembered": pb.FACT_ORIGIN_REMEMBERED, "extracted": pb.FACT_ORIGIN_EXTRACTED}


def _fact_pb(f: Fact) -> pb.Fact:
    out = pb.Fact(
        fact_id=f.fact_id,
        user_id=f.user_id,
        text=f.text,
        kind=f.kind,
        importance=f.importance,
        tags=list(f.tags),
        source_session_id=f.source_session_id or "",
        create_time=_ts(f.created_us),
        injection_signals=list(f.injection_signals),
        embedding_model=f.embedding_model,
        valid_from=_ts(f.created_us),
        superseded_by=f.superseded_by,
        origin=_ORIGINS.get(f.origin, pb.FACT_ORIGIN_UNSPECIFIED),
        source_message_ids=list(f.source_message_ids),
    )
    if f.expires_us is not None:
        out.expire_time.CopyFrom(_ts(f.expires_us))
    if f.valid_to_us is not None:
        out.valid_to.CopyFrom(_ts(f.valid_to_us))
    return out


def _consent_pb(c: Consent) -> pb.Consent:
    out = pb.Consent(
        long_term_memory=c.long_term_memory,
        updated_by=c.updated_by,
        fact_extraction=c.fact_extraction,
    )
    if c.updated_us is not None:
        out.update_time.CopyFrom(_ts(c.updated_us))
    return out


def _audit_pb(a: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        audit_id=a.audit_id,
        time=_ts(a.at_us),
        caller=a.caller,
        rpc=a.rpc,
        session_id=a.session_id or "",
        target_ids=list(a.target_ids),
        outcome=a.outcome,
        detail=a.detail,
    )


_RECALL_MODES = {
    pb.RECALL_MODE_HYBRID: RecallMode.HYBRID,
    pb.RECALL_MODE_LEXICAL: RecallMode.LEXICAL,
    pb.RECALL_MODE_VECTOR: RecallMode.VECTOR,
}


def _scored_pb(s: ScoredFact) -> pb.RecalledFact:
    return pb.RecalledFact(
        fact=_fact_pb(s.fact),
        score=pb.ScoreParts(
            bm25=s.bm25,
            bm25_normalized=s.bm25_normalized,
            recency=s.recency,
            importance=s.importance,
            score=s.score,
            vector_similarity=s.vector_similarity,
            vector_normalized=s.vector_normalized,
            relevance=s.relevance,
        ),
    )


# -- protobuf -> domain, with validation -----------------------------------------------------
def _filter(v: Violations, field: str, msg: pb.FactFilter) -> FactFilter:
    if len(msg.kinds) > lim.MAX_FILTER_VALUES:
        v.add(f"{field}.kinds", f"at most {lim.MAX_FILTER_VALUES} kinds")
    for i, kind in enumerate(msg.kinds):
        lim.check_kind(v, f"{field}.kinds[{i}]", kind)
    if len(msg.tags) > lim.MAX_FILTER_VALUES:
        v.add(f"{field}.tags", f"at most {lim.MAX_FILTER_VALUES} tags")
    for i, tag in enumerate(msg.tags):
        lim.check_tag(v, f"{field}.tags[{i}]", tag)
    after = (
        v.timestamp_us(f"{field}.created_after", msg.created_after)
        if msg.HasField("created_after")
        else None
    )
    before = (
        v.timestamp_us(f"{field}.created_before", msg.created_before)
        if msg.HasField("created_before")
        else None
    )
    if after is not None and before is not None and after >= before:
        v.add(f"{field}.created_before", "must be after created_after")
    return FactFilter(tuple(msg.kinds), tuple(msg.tags), after, before)


def _has_time(msg: pb.FactFilter) -> bool:  # set, if not valid: then it is reported as such
    return msg.HasField("created_after") or msg.HasField("created_before")


def _new_messages(v: Violations, request: pb.AppendMessagesRequest) -> list[NewMessage]:
    if not 1 <= len(request.messages) <= lim.MAX_BATCH_MESSAGES:
        v.add("messages", f"must hold 1 to {lim.MAX_BATCH_MESSAGES} messages")
        return []  # refused whole: checking each of 100,000 entries would only hold up others
    out: list[NewMessage] = []
    total = 0
    seen: set[str] = set()
    for i, m in enumerate(request.messages):
        field = f"messages[{i}]"
        if m.message.role not in _ROLE_IN:
            v.add(f"{field}.message.role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        total += lim.check_text(
            v, f"{field}.message.content", m.message.content, max_bytes=lim.MAX_CONTENT_BYTES
        )
        cid = m.client_message_id
        lim.check_id(v, f"{field}.client_message_id", cid, required=False)
        if cid and cid in seen:
            v.add(f"{field}.client_message_id", "is repeated within the request")
        seen.add(cid)
        lim.check_metadata(v, f"{field}.metadata", dict(m.metadata))
        out.append(
            NewMessage(
                _ROLE_IN.get(m.message.role, "user"),
                m.message.content,
                cid or None,
                dict(m.metadata),
            )
        )
    if total > lim.MAX_BATCH_BYTES:
        v.add("messages", f"content must total at most {lim.MAX_BATCH_BYTES} bytes (got {total})")
    return out


def _new_facts(v: Violations, request: pb.RememberRequest) -> list[NewFact]:
    if not 1 <= len(request.facts) <= lim.MAX_BATCH_FACTS:
        v.add("facts", f"must hold 1 to {lim.MAX_BATCH_FACTS} facts")
        return []  # refused whole, without checking each entry
    now = now_us()
    out: list[NewFact] = []
    for i, f in enumerate(request.facts):
        field = f"facts[{i}]"
        lim.check_text(v, f"{field}.text", f.text, max_bytes=lim.MAX_FACT_BYTES)
        kind = f.kind or lim.DEFAULT_KIND
        lim.check_kind(v, f"{field}.kind", kind)
        importance = f.importance if f.HasField("importance") else lim.DEFAULT_IMPORTANCE
        lim.check_importance(v, f"{field}.importance", importance)
        if len(f.tags) > lim.MAX_TAGS:
            v.add(f"{field}.tags", f"at most {lim.MAX_TAGS} tags")
        for j, tag in enumerate(f.tags):
            lim.check_tag(v, f"{field}.tags[{j}]", tag)
        lim.check_id(v, f"{field}.source_session_id", f.source_session_id, required=False)
        expires = (
            v.timestamp_us(f"{field}.expire_time", f.expire_time)
            if f.HasField("expire_time")
            else None
        )
        if expires is not None and expires <= now:
            v.add(f"{field}.expire_time", "must be in the future")
        out.append(
            NewFact(
                f.text,
                kind,
                importance,
                tuple(dict.fromkeys(f.tags)),
                f.source_session_id or None,
                expires,
            )
        )
    return out


class MemoryServicer:
    def __init__(self, manager: MemoryManager, purger: Purger) -> None:
        self.manager = manager
        self.purger = purger

    async def AppendMessages(
        self, request: pb.AppendMessagesRequest, ctx: Ctx
    ) -> pb.AppendMessagesResponse:
        v = Violations()
        lim.check_id(v, "session_id", request.session_id)
        lim.check_id(v, "user_id", request.user_id)
        messages = _new_messages(v, request)
        v.raise_if_any()
        appended = await self.manager.append(request.session_id, request.user_id, messages)
        return pb.AppendMessagesResponse(
            messages=[
                pb.AppendedMessage(
                    message_id=a.message_id,
                    sequence=a.sequence,
                    client_message_id=a.client_message_id or "",
                    deduplicated=a.deduplicated,
                )
                for a in appended
            ]
        )

    async def GetHistory(self, request: pb.GetHistoryRequest, ctx: Ctx) -> pb.GetHistoryResponse:
        v = Violations()
        lim.check_id(v, "session_id", request.session_id)
        lim.check_id(v, "user_id", request.user_id, required=False)
        lim.check_range(v, "page_size", request.page_size, 1, lim.MAX_PAGE_SIZE)
        v.check(request.order in _ORDER, "order", "is not a known SortOrder")
        v.check(len(request.page_token) <= 1024, "page_token", "is not a page token")
        v.raise_if_any()
        page = await self.manager.history(
            request.session_id,
            request.user_id or None,
            request.page_size or lim.DEFAULT_PAGE_SIZE,
            request.page_token,
            _ORDER[request.order],
        )
        return pb.GetHistoryResponse(
            messages=[_message_pb(m) for m in page.messages], next_page_token=page.next_page_token
        )

    async def Remember(self, request: pb.RememberRequest, ctx: Ctx) -> pb.RememberResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        facts = _new_facts(v, request)
        v.raise_if_any()
        out = await self.manager.remember(request.user_id, facts)
        return pb.RememberResponse(
            facts=[
                pb.RememberedFact(fact_id=r.fact_id, deduplicated=r.deduplicated, flagged=r.flagged)
                for r in out
            ]
        )

    async def Recall(self, request: pb.RecallRequest, ctx: Ctx) -> pb.RecallResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        lim.check_text(v, "query", request.query, max_bytes=lim.MAX_QUERY_BYTES, required=False)
        lim.check_range(v, "k", request.k, 1, lim.MAX_K)
        flt = _filter(v, "filter", request.filter)
        mode = _RECALL_MODES.get(request.mode)
        if mode is None and request.mode != pb.RECALL_MODE_UNSPECIFIED:
            v.add("mode", f"unknown recall mode {request.mode}")
        v.raise_if_any()
        found = await self.manager.recall(
            request.user_id, request.query, request.k or lim.DEFAULT_K, flt, mode
        )
        return pb.RecallResponse(facts=[_scored_pb(s) for s in found])

    async def Forget(self, request: pb.ForgetRequest, ctx: Ctx) -> pb.ForgetResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        if len(request.fact_ids) > lim.MAX_FORGET_IDS:
            v.add("fact_ids", f"at most {lim.MAX_FORGET_IDS} ids")
        for i, fid in enumerate(request.fact_ids[: lim.MAX_FORGET_IDS]):
            lim.check_stored_id(v, f"fact_ids[{i}]", fid, "fct")
        flt = _filter(v, "filter", request.filter) if request.HasField("filter") else None
        chosen = sum([bool(request.fact_ids), flt is not None, request.all])
        if chosen != 1:
            v.add("fact_ids", "give exactly one of fact_ids, filter or all")
        elif flt is not None and flt.is_empty and not _has_time(request.filter):
            v.add("filter", "must set at least one criterion (use all=true to forget everything)")
        v.raise_if_any()
        deleted = await self.manager.forget(
            request.user_id, list(request.fact_ids), flt, request.all
        )
        return pb.ForgetResponse(fact_ids=deleted)

    async def ListFacts(self, request: pb.ListFactsRequest, ctx: Ctx) -> pb.ListFactsResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        if len(request.kinds) > lim.MAX_FILTER_VALUES:
            v.add("kinds", f"at most {lim.MAX_FILTER_VALUES} kinds")
        for i, kind in enumerate(request.kinds[: lim.MAX_FILTER_VALUES]):
            lim.check_kind(v, f"kinds[{i}]", kind)
        lim.check_range(v, "page_size", request.page_size, 1, lim.MAX_PAGE_SIZE)
        v.check(len(request.page_token) <= 1024, "page_token", "is not a page token")
        v.raise_if_any()
        page = await self.manager.list_facts(
            request.user_id,
            list(dict.fromkeys(request.kinds)),
            request.include_history,
            request.page_size or lim.DEFAULT_PAGE_SIZE,
            request.page_token,
        )
        return pb.ListFactsResponse(
            facts=[_fact_pb(f) for f in page.facts], next_page_token=page.next_page_token
        )

    async def GetExtractionStatus(
        self, request: pb.GetExtractionStatusRequest, ctx: Ctx
    ) -> pb.GetExtractionStatusResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        status = await self.manager.extraction_status(request.user_id)
        out = pb.GetExtractionStatusResponse(
            tenant_enabled=status.tenant_enabled,
            user_consented=status.user_consented,
            messages_pending=status.counts.messages_pending,
            messages_extracted=status.counts.messages_extracted,
            extracted_facts=status.counts.extracted_facts,
            replica_queue_depth=status.replica_queue_depth,
        )
        if status.counts.last_extracted_us is not None:
            out.last_extraction_time.CopyFrom(_ts(status.counts.last_extracted_us))
        return out

    async def BuildContext(
        self, request: pb.BuildContextRequest, ctx: Ctx
    ) -> pb.BuildContextResponse:
        v = Violations()
        lim.check_id(v, "session_id", request.session_id)
        lim.check_id(v, "user_id", request.user_id)
        lim.check_text(
            v, "query", request.query, max_bytes=lim.MAX_BUILD_QUERY_BYTES, required=False
        )
        lim.check_range(
            v,
            "token_budget",
            request.token_budget,
            lim.MIN_BUDGET,
            lim.MAX_BUDGET,
            zero_means_default=False,
        )
        lim.check_range(v, "max_facts", request.max_facts, 1, lim.MAX_CONTEXT_FACTS)
        lim.check_text(
            v,
            "system_preamble",
            request.system_preamble,
            max_bytes=lim.MAX_PREAMBLE_BYTES,
            required=False,
        )
        v.raise_if_any()
        settings = self.manager.settings
        built = await self.manager.build_context(
            request.session_id,
            request.user_id,
            request.query,
            request.token_budget,
            request.max_facts or settings.memory_context_default_facts,
            request.system_preamble or settings.memory_system_preamble,
        )
        return pb.BuildContextResponse(
            messages=[_chat(role, content) for role, content in built.messages],
            total_tokens=built.total_tokens,
            included_fact_ids=built.included_fact_ids,
            omitted_fact_ids=built.omitted_fact_ids,
            included_sequences=built.included_sequences,
            omitted_message_count=built.omitted_message_count,
            flagged_fact_ids=built.flagged_fact_ids,
        )

    async def SetConsent(self, request: pb.SetConsentRequest, ctx: Ctx) -> pb.SetConsentResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        consent, deleted = await self.manager.set_consent(
            request.user_id, request.long_term_memory, request.fact_extraction
        )
        return pb.SetConsentResponse(consent=_consent_pb(consent), facts_deleted=deleted)

    async def GetConsent(self, request: pb.GetConsentRequest, ctx: Ctx) -> pb.GetConsentResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        return pb.GetConsentResponse(
            consent=_consent_pb(await self.manager.get_consent(request.user_id))
        )

    async def ExportUserData(
        self, request: pb.ExportUserDataRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ExportUserDataResponse]:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        async for item in self.manager.export(request.user_id):
            if isinstance(item, Consent):
                yield pb.ExportUserDataResponse(consent=_consent_pb(item))
            elif isinstance(item, Fact):
                yield pb.ExportUserDataResponse(fact=_fact_pb(item))
            elif isinstance(item, StoredMessage):
                yield pb.ExportUserDataResponse(message=_message_pb(item))
            else:
                yield pb.ExportUserDataResponse(audit_entry=_audit_pb(item))

    async def DeleteUserData(
        self, request: pb.DeleteUserDataRequest, ctx: Ctx
    ) -> pb.DeleteUserDataResponse:
        v = Violations()
        lim.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        counts, cached = await self.manager.erase(request.user_id)
        return pb.DeleteUserDataResponse(
            messages_deleted=counts.messages,
            sessions_deleted=counts.sessions,
            facts_deleted=counts.facts,
            consent_deleted=counts.consent,
            cache_entries_deleted=cached,
        )

    async def PurgeExpired(
        self, request: pb.PurgeExpiredRequest, ctx: Ctx
    ) -> pb.PurgeExpiredResponse:
        counts = await self.purger.run_for_caller()
        return pb.PurgeExpiredResponse(
            facts_deleted=counts.facts,
            messages_deleted=counts.messages,
            sessions_deleted=counts.sessions,
            audit_entries_deleted=counts.audit_entries,
        )
