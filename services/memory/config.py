"""Settings of the memory service (environment variable = field name in upper case).

Retention is set by defaults plus per-tenant overrides (JSON), for example:

    MEMORY_MESSAGE_RETENTION_DAYS=365
    MEMORY_FACT_RETENTION_DAYS='{"episodic": 90}'
    MEMORY_TENANT_RETENTION='{"acme": {"message_retention_days": 30,
                                       "fact_retention_days": {"episodic": 7}}}'

A tenant override replaces only what it sets; `fact_retention_days` entries are merged
per kind over the defaults. `0` means "keep forever". docs/memory.md explains the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from libs.common.config import CommonSettings

DEFAULT_PREAMBLE = (
    "You are Finsight, a careful assistant for financial analysis. Answer from the data and "
    "facts provided, say when you are unsure, and never present speculation as advice."
)


class TenantRetention(BaseModel):
    """A tenant's retention override; unset fields inherit the defaults."""

    model_config = ConfigDict(extra="forbid")

    message_retention_days: float | None = Field(default=None, ge=0)
    audit_retention_days: float | None = Field(default=None, ge=0)
    fact_retention_days: dict[str, float] = Field(default_factory=dict)


class RetentionPolicy(BaseModel):
    """Effective retention of one tenant (days; 0 = forever)."""

    message_days: float
    audit_days: float
    fact_days: dict[str, float]

    def fact_days_for(self, kind: str) -> float:
        return self.fact_days.get(kind, self.fact_days.get("*", 0.0))


class MemorySettings(CommonSettings):
    service_name: ClassVar[str] = "memory"
    full_service_name: ClassVar[str] = "finsight.memory.v1.MemoryService"

    memory_grpc_port: int = Field(50052, ge=0, le=65535)
    memory_metrics_port: int = Field(9102, ge=0, le=65535)
    memory_db_path: Path | None = Field(
        None, description="DuckDB file; default <data dir>/memory.duckdb"
    )
    memory_database_url: SecretStr | None = Field(
        None,
        description="postgresql:// URI of the production store (or MEMORY_DATABASE_URL_FILE); "
        "unset = the DuckDB file",
    )

    # Hot tier (Redis): the recent window of each session.
    memory_redis_prefix: str = Field(
        "finsight:memory",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key this service writes (on a DuckDB file flushed at "
        "start-up; replicas on PostgreSQL share it and never flush it)",
    )
    memory_hot_window: int = Field(
        100, ge=1, le=1000, description="Most recent messages of a session kept in Redis"
    )
    memory_hot_ttl_s: int = Field(
        3600, ge=1, le=30 * 86400, description="Redis TTL of a session window, refreshed on append"
    )

    # Retention.
    memory_message_retention_days: float = Field(
        365.0, ge=0, description="Messages older than this are purged (0 = keep forever)"
    )
    memory_audit_retention_days: float = Field(
        730.0, ge=0, description="Audit entries older than this are purged (0 = keep forever)"
    )
    memory_fact_retention_days: dict[str, float] = Field(
        default_factory=dict,
        description='Max age of facts per kind, JSON {"kind": days}; "*" = every kind',
    )
    memory_tenant_retention: dict[str, TenantRetention] = Field(
        default_factory=dict,
        description='Per-tenant overrides, JSON {"tenant": {"message_retention_days": 30, ...}}',
    )
    memory_purge_interval_s: float = Field(
        3600.0, ge=0, description="Seconds between background purges (0 = no background purge)"
    )

    # Recall scoring: score = w_bm25 * bm25/max(bm25) + w_recency * recency + w_importance * imp.
    memory_recall_weight_bm25: float = Field(
        0.6, ge=0, le=1, description="Weight of lexical relevance"
    )
    memory_recall_weight_recency: float = Field(0.2, ge=0, le=1, description="Weight of recency")
    memory_recall_weight_importance: float = Field(
        0.2, ge=0, le=1, description="Weight of importance"
    )
    memory_recency_half_life_days: float = Field(
        30.0, gt=0, description="Age at which a fact's recency score halves"
    )

    # Semantic recall (docs/memory.md "Hybrid recall").
    memory_recall_mode: Literal["hybrid", "lexical", "vector"] = Field(
        "hybrid",
        description="What Recall's relevance is made of when a request does not say: hybrid "
        "= BM25 and vector similarity fused; lexical = BM25 only; vector = vectors only "
        "(hybrid and vector fall back to lexical when no embedder is configured or it fails)",
    )
    memory_recall_fusion: Literal["relative", "rrf"] = Field(
        "relative",
        description="How hybrid recall fuses its parts: relative = (1 - a) * bm25_normalized "
        "+ a * vector_normalized (a = MEMORY_RECALL_VECTOR_WEIGHT); rrf = reciprocal-rank "
        "fusion (MEMORY_RECALL_RRF_K), scaled to [0, 1]",
    )
    memory_recall_vector_weight: float = Field(
        0.7, ge=0, le=1, description="Share of the vector part in relative fusion"
    )
    memory_recall_min_similarity: float = Field(
        0.15,
        ge=-1,
        le=1,
        description="Cosine similarity below which a fact's vector is not a match (neither "
        "a candidate nor relevance) and the zero of vector_normalized; unrelated texts score "
        "about -0.1 to 0.1 with the local model (the plain cosine: users below "
        "MEMORY_RECALL_CENTER_MIN_FACTS)",
    )
    memory_recall_center_min_facts: int = Field(
        100,
        ge=0,
        description="From this many embedded facts of a user on, vector similarity is the "
        "cosine of vectors centred on the mean of the user's fact vectors (what all of "
        "them share says nothing about which one a query means); below it, and with 0, "
        "the plain cosine",
    )
    memory_recall_center_min_similarity: float = Field(
        0.1,
        ge=-1,
        le=1,
        description="MEMORY_RECALL_MIN_SIMILARITY for centred similarities (they run lower: "
        "unrelated texts score about -0.13 to 0.09 with the local model)",
    )
    memory_recall_rrf_k: int = Field(
        60, ge=1, le=10_000, description="The k of reciprocal-rank fusion: 1 / (k + rank)"
    )
    memory_embedding_provider: Literal["local", "gateway", "none"] = Field(
        "local",
        description="Who embeds facts and queries: local = the static model shipped in the "
        "wordllama wheel, in process, offline; gateway = the LLM gateway's Embed RPC "
        "(MEMORY_EMBEDDING_ROUTE); none = no vectors (lexical recall only)",
    )
    memory_embedding_route: str | None = Field(
        None,
        max_length=128,
        description="Gateway route alias or embedding model for MEMORY_EMBEDDING_PROVIDER="
        "gateway (unset: the gateway's default embedding route)",
    )
    memory_llm_gateway_target: str = Field(
        "dns:///127.0.0.1:50051", description="llm_gateway address (gateway embeddings)"
    )
    memory_embedding_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Longest wait for one embedding call"
    )
    memory_reembed_interval_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between background passes that re-index facts of an older "
        "tokenizer and re-embed facts without a vector of the current model (0 = none; a "
        "pass runs until they are all done)",
    )
    memory_reembed_batch: int = Field(
        256, ge=1, le=4096, description="Facts re-indexed or embedded per background step"
    )

    # Facts from conversations (docs/memory.md "Facts from conversations").
    memory_extraction_tenants: list[str] = Field(
        default_factory=list,
        description='Tenants whose conversations may be mined for facts (JSON list; ["*"] = '
        "all); each user also opts in (SetConsent fact_extraction). Empty = off",
    )
    memory_extraction_route: str = Field(
        "default",
        min_length=1,
        max_length=128,
        description="Gateway chat route (or model) the extractor calls; give it a route of "
        "its own to budget and monitor it apart",
    )
    memory_extraction_queue_max: int = Field(
        1000, ge=1, le=1_000_000, description="Extraction jobs waiting at most (then dropped)"
    )
    memory_extraction_tokens_per_minute: int = Field(
        20_000, ge=100, description="Extraction tokens per tenant and minute, per replica"
    )
    memory_extraction_max_tokens: int = Field(
        600, ge=50, le=8192, description="Completion tokens of one extraction call"
    )
    memory_extraction_known_facts: int = Field(
        20, ge=0, le=100, description="Current facts shown to the model (closest to the turns)"
    )
    memory_extraction_dedup_similarity: float = Field(
        0.94,
        ge=0,
        le=1,
        description="Vector similarity at which a proposed fact is a duplicate of a current one",
    )
    memory_extraction_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Longest wait for one extraction call"
    )
    memory_extraction_catchup_interval_s: float = Field(
        60.0,
        ge=0,
        description="Seconds between catch-up passes that offer the extractor the user turns "
        "it never handled (queue full, crash, gateway down), for opted-in tenants and "
        "consenting users (0 = no catch-up)",
    )
    memory_extraction_catchup_age_s: float = Field(
        300.0,
        ge=0,
        description="Grace period: a turn younger than this is left to the extraction that "
        "its AppendMessages queued",
    )
    memory_extraction_catchup_max_age_s: float = Field(
        7 * 86400.0,
        ge=0,
        description="Turns older than this are not caught up (bounds the cost of a user who "
        "opts in with a long history; 0 = any age the message retention keeps)",
    )
    memory_extraction_catchup_batch: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Turns one catch-up pass offers at most (per replica pass, all tenants); "
        "it never fills more than half of MEMORY_EXTRACTION_QUEUE_MAX",
    )
    memory_extraction_catchup_max_attempts: int = Field(
        3,
        ge=0,
        le=100,
        description="Failed extractions of a user turn (its own fault: an answer that does "
        "not parse, a gateway refusal such as INVALID_ARGUMENT) after which the catch-up no "
        "longer offers it; gateway outages and throttling never count (0 = no cap)",
    )

    memory_recall_index_max_entries: int = Field(
        12_000_000,
        ge=0,
        le=1_000_000_000,
        description="Cap of the in-process recall index, in 16-byte entries: a posting is "
        "one, a fact ~5, a 256-d vector 64 (a user with 100k facts and vectors ~7.4M, "
        "~120 MiB); least recently used users are evicted, a user whose index alone exceeds "
        "it is served by SQL (hybrid: a transient load per Recall, or pgvector). 0 = always SQL",
    )
    memory_recall_pgvector: Literal["on", "off"] = Field(
        "on",
        description="PostgreSQL: users over MEMORY_RECALL_INDEX_MAX_ENTRIES are recalled in "
        "hybrid/vector mode from pgvector candidates (the extension is created at start-up; "
        "missing or not creatable: a warning, and the transient load per Recall as with off)",
    )
    memory_recall_pgvector_candidates: int = Field(
        200,
        ge=10,
        le=1000,
        description="Candidates the pgvector path takes per Recall by cosine, by BM25 and by "
        "lexical score: max(10 k, this) each; scored exactly as the in-process index scores "
        "them",
    )
    memory_recall_pgvector_min_facts: int = Field(
        20_000,
        ge=1,
        description="Mirrored vectors from which a user served by the pgvector path gets an "
        "HNSW index of their own (built concurrently, in the background); below it the "
        "nearest facts are found by an exact scan of the user's vectors",
    )

    # BuildContext.
    memory_system_preamble: str = Field(
        DEFAULT_PREAMBLE,
        min_length=1,
        max_length=8192,
        description="System message that opens every built context",
    )
    memory_context_default_facts: int = Field(
        8, ge=0, le=50, description="Facts recalled by default"
    )
    memory_context_facts_share: float = Field(
        0.25, ge=0, le=1, description="Largest share of the token budget the facts may take"
    )
    memory_context_max_messages: int = Field(
        200, ge=1, le=2000, description="Most recent session messages BuildContext considers"
    )
    memory_flagged_facts: Literal["exclude", "quote"] = Field(
        "exclude",
        description="Recalled facts screened as possible instructions: exclude = left out of "
        "BuildContext; quote = included in the facts block, quoted behind a flagged marker",
    )

    memory_audit_reads: bool = Field(
        True, description="Audit reads of personal data, not only writes"
    )

    @model_validator(mode="after")
    def _weights_are_usable(self) -> MemorySettings:
        if (
            self.memory_recall_weight_bm25
            + self.memory_recall_weight_recency
            + self.memory_recall_weight_importance
        ) <= 0:
            raise ValueError("MEMORY_RECALL_WEIGHT_* must not all be 0")
        return self

    @property
    def grpc_port(self) -> int:
        return self.memory_grpc_port

    @property
    def metrics_port(self) -> int:
        return self.memory_metrics_port

    @property
    def db_path(self) -> Path:
        return self.memory_db_path or self.finsight_data_dir / "memory.duckdb"

    def retention_for(self, tenant: str) -> RetentionPolicy:
        """Defaults with the tenant's override applied."""
        override = self.memory_tenant_retention.get(tenant)
        policy = RetentionPolicy(
            message_days=self.memory_message_retention_days,
            audit_days=self.memory_audit_retention_days,
            fact_days=dict(self.memory_fact_retention_days),
        )
        if override is None:
            return policy
        if override.message_retention_days is not None:
            policy.message_days = override.message_retention_days
        if override.audit_retention_days is not None:
            policy.audit_days = override.audit_retention_days
        policy.fact_days.update(override.fact_retention_days)
        return policy
