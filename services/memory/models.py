"""Domain types of the memory service. Times are integer microseconds since the Unix epoch
(UTC), so they survive DuckDB, PostgreSQL, JSON (Redis) and protobuf round trips exactly."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import pyarrow as pa

ROLES = ("system", "user", "assistant")


def now_us() -> int:
    return time.time_ns() // 1000


class Order(Enum):
    ASC = "asc"
    DESC = "desc"


@dataclass(frozen=True)
class NewMessage:
    role: str
    content: str
    client_message_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Token cost (see `StoredMessage.tokens`), counted by the manager before the write.
    tokens: int | None = None


@dataclass(frozen=True)
class StoredMessage:
    message_id: str
    session_id: str
    user_id: str
    sequence: int
    role: str
    content: str
    client_message_id: str | None
    metadata: dict[str, str]
    created_us: int
    # What the message costs as a turn of a built context, rendered as BuildContext renders
    # it (`context_builder.render_turn`: user and system turns fenced as user-role data):
    # `libs.common.tokens.message_costs` of the rendered turn. Counted once at append time
    # (column `context_tokens`); None for rows written before migration 004 (counted when
    # read).
    tokens: int | None = None


@dataclass(frozen=True)
class Appended:
    message_id: str
    sequence: int
    client_message_id: str | None
    deduplicated: bool


@dataclass(frozen=True)
class AppendResult:
    """What one append job did: `owner_mismatch` means nothing was written.

    `incarnation` is the session's internal number: a session erased and created again
    under the same id gets another one, so a cached window of the old one is never taken
    for the new one (services/memory/hot_tier.py)."""

    appended: list[Appended]
    new_messages: list[StoredMessage]
    owner_mismatch: bool = False
    incarnation: int = 0


@dataclass(frozen=True)
class AppendRequest:
    tenant: str
    session_id: str
    user_id: str
    messages: list[NewMessage]
    audit: AuditRecord
    now_us: int


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    last_seq: int


@dataclass(frozen=True)
class SessionTail:
    """What the database says a cached window must match (hot tier, several replicas): the
    owner, the session's incarnation and the sequences it holds now (first_seq > last_seq
    when it holds none)."""

    user_id: str
    incarnation: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class Page:
    messages: list[StoredMessage]
    next_after: int | None  # the boundary sequence the next page continues from; None: last page


@dataclass(frozen=True)
class NewFact:
    text: str
    kind: str
    importance: float
    tags: tuple[str, ...]
    source_session_id: str | None
    expires_us: int | None
    # What `libs.common.untrusted.screen` raised for the text (empty: not flagged); set by
    # the manager before the write.
    injection_signals: tuple[str, ...] = ()
    # The text's vector (float32, unit length) and the model that made it; set by the
    # manager before the write (None: not embedded, e.g. no embedder configured).
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    embedding_model: str = ""
    # "remembered" (Remember) or "extracted" (services/memory/extraction.py), and for an
    # extracted fact the messages it came from.
    origin: str = "remembered"
    source_message_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fact:
    fact_id: str
    user_id: str
    text: str
    kind: str
    importance: float
    tags: tuple[str, ...]
    source_session_id: str | None
    created_us: int
    expires_us: int | None
    # Signals the screen raised when the fact was remembered (empty: not flagged, or stored
    # before migration 004).
    injection_signals: tuple[str, ...] = ()
    # The model that made the stored vector ("": none yet).
    embedding_model: str = ""
    # Set when a newer fact superseded this one (history; Recall reads current facts only).
    valid_to_us: int | None = None
    superseded_by: str = ""
    origin: str = "remembered"
    source_message_ids: tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        return bool(self.injection_signals)


# Facts and postings as the in-process recall index takes them (services/memory/
# recall_index.py): loaded from DuckDB, or just inserted by Remember.
INDEX_FACTS_SCHEMA = pa.schema(
    [
        ("fact_no", pa.int64()),
        ("fact_id", pa.string()),
        ("doc_len", pa.int32()),
        ("importance", pa.float64()),
        ("created_us", pa.int64()),
        ("expires_us", pa.int64()),
        ("kind", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("embedding_model", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
INDEX_POSTINGS_SCHEMA = pa.schema(
    [("term_key", pa.int64()), ("fact_no", pa.int64()), ("tf", pa.int32())]
)


@dataclass(frozen=True)
class InsertedFacts:
    """What a fact write inserted (`INDEX_FACTS_SCHEMA`, `INDEX_POSTINGS_SCHEMA` tables), and
    the user's facts version it committed (0 on a store that keeps none)."""

    facts: pa.Table
    postings: pa.Table
    version: int = 0


@dataclass(frozen=True)
class FactsVersion:
    """A user's facts version (PostgreSQL, several replicas). `version` moves with every
    transaction that changes the user's facts; `reset` is the version of the last one that
    deleted facts which were still live. A recall index at version v is current when
    v >= version; facts added since can be applied when reset <= v (they are the ones
    numbered above the index's highest fact number); otherwise it must be reloaded."""

    version: int = 0
    reset: int = 0


@dataclass(frozen=True)
class IndexSnapshot:
    """A user's facts and postings for the in-process recall index, from one snapshot,
    with the facts version (and reset version) of that snapshot."""

    facts: pa.Table
    postings: pa.Table
    version: int = 0
    reset: int = 0


@dataclass(frozen=True)
class Remembered:
    fact_id: str
    deduplicated: bool
    # The request's fact was flagged by the screen (the manager sets it).
    flagged: bool = False


@dataclass(frozen=True)
class FactFilter:
    kinds: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    created_after_us: int | None = None
    created_before_us: int | None = None

    @property
    def is_empty(self) -> bool:
        return not (
            self.kinds
            or self.tags
            or self.created_after_us is not None
            or self.created_before_us is not None
        )


class RecallMode(Enum):
    """What relevance is made of (RecallRequest.mode, MEMORY_RECALL_MODE)."""

    HYBRID = "hybrid"
    LEXICAL = "lexical"
    VECTOR = "vector"


class Fusion(Enum):
    """How hybrid recall fuses the lexical and the vector part (MEMORY_RECALL_FUSION)."""

    RELATIVE = "relative"  # (1 - a) * bm25_normalized + a * vector_normalized
    RRF = "rrf"  # reciprocal-rank fusion, scaled so that first in both lists is 1


@dataclass(frozen=True)
class RecallWeights:
    """score = bm25 * relevance + recency * recency + importance * importance; `bm25` weighs
    the fused relevance (the setting keeps its name, MEMORY_RECALL_WEIGHT_BM25)."""

    bm25: float
    recency: float
    importance: float
    half_life_days: float
    mode: RecallMode = RecallMode.LEXICAL
    fusion: Fusion = Fusion.RELATIVE
    vector_weight: float = 0.7
    rrf_k: int = 60
    min_similarity: float = 0.0
    # Vector similarity is the cosine of vectors centred on the mean of the user's fact
    # vectors once the user has this many embedded facts (0: raw cosine; recall_index.py),
    # and then `center_min_similarity` is its floor instead of `min_similarity`.
    center_min_facts: int = 0
    center_min_similarity: float = 0.0


@dataclass(frozen=True)
class Extracted:
    """What one extraction write did: the facts stored (or found as duplicates), in
    proposal order, the (superseded, new) id pairs, and the index's part of the insert.
    `skipped` when every source message had been handled before (a retry)."""

    remembered: list[Remembered]
    superseded: list[tuple[str, str]]
    inserted: InsertedFacts
    skipped: bool = False


@dataclass(frozen=True)
class ToEmbed:
    """A stored fact the re-embed job gives a vector of the current model."""

    tenant: str
    user_id: str
    fact_no: int
    text: str


@dataclass(frozen=True)
class QueryVector:
    """A query's embedding (float32, unit length) and the model that made it: only facts
    embedded by the same model get a vector score."""

    values: np.ndarray = field(compare=False, repr=False)
    model: str


@dataclass(frozen=True)
class ScoredFact:
    fact: Fact
    bm25: float
    bm25_normalized: float
    recency: float
    importance: float
    score: float
    vector_similarity: float = 0.0
    vector_normalized: float = 0.0
    relevance: float = 0.0


@dataclass(frozen=True)
class Consent:
    long_term_memory: bool = False
    updated_us: int | None = None
    updated_by: str = ""
    fact_extraction: bool = False


@dataclass(frozen=True)
class AuditRecord:
    """An audit row to write: who did what to whose data. Never content."""

    tenant: str
    caller: str
    key_id: str
    rpc: str
    user_id: str | None
    session_id: str | None = None
    target_ids: tuple[str, ...] = ()
    outcome: str = "ok"
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEntry:
    audit_id: str
    at_us: int
    caller: str
    rpc: str
    session_id: str | None
    target_ids: tuple[str, ...]
    outcome: str
    detail: str


@dataclass(frozen=True)
class ErasureCounts:
    messages: int
    sessions: int
    facts: int
    consent: int
    session_ids: tuple[str, ...]

    def audit_detail(self) -> dict[str, object]:
        """What the erasure's audit row says (ids and counts only), on every store."""
        return {
            "messages_deleted": self.messages,
            "sessions_deleted": self.sessions,
            "facts_deleted": self.facts,
            "consent_deleted": self.consent,
        }


@dataclass(frozen=True)
class PurgeCounts:
    facts: int = 0
    messages: int = 0
    sessions: int = 0
    audit_entries: int = 0
    # (tenant, session_id) whose cached window must be dropped.
    touched_sessions: tuple[tuple[str, str], ...] = ()
    # Of `facts`, those deleted by a kind's max age before their expiry (the others had
    # expired, so recall already ignored them).
    facts_by_age: int = 0

    def audit_detail(self) -> dict[str, object]:
        """What the purge's audit row says, on every store."""
        return {
            "facts_deleted": self.facts,
            "messages_deleted": self.messages,
            "sessions_deleted": self.sessions,
            "audit_entries_deleted": self.audit_entries,
        }


@dataclass(frozen=True)
class FactsPageKey:
    """Where a ListFacts page continues: after this (created_us, fact_id)."""

    created_us: int
    fact_id: str


@dataclass(frozen=True)
class ExtractionCounts:
    """A user's extraction progress, from the store (GetExtractionStatus)."""

    messages_pending: int = 0
    messages_extracted: int = 0
    last_extracted_us: int | None = None
    extracted_facts: int = 0
