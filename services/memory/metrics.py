"""Domain metrics of the memory service (the kit already counts RPCs and DB statements)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HOT_TIER_READS = Counter(
    "finsight_memory_hot_tier_reads_total",
    "Session-window reads, by outcome: hit, miss (absent or not covering), stale (shared "
    "store: the window does not match the database's session), bypass (cache not trusted), "
    "error (Redis failed; served from the database).",
    ("outcome",),
)
REDIS_ERRORS = Counter(
    "finsight_memory_redis_errors_total",
    "Redis operations that failed (the RPC was served from the database anyway).",
    ("op",),
)
HOT_TIER_TRUSTED = Gauge(
    "finsight_memory_hot_tier_trusted",
    "1 while the Redis windows are used; 0 while they are bypassed until a flush succeeds "
    "(one process on a DuckDB file; a shared store checks every window instead).",
)
MESSAGES_APPENDED = Counter(
    "finsight_memory_messages_appended_total",
    "Messages stored, and retried ones recognised.",
    ("outcome",),
)
FACTS_REMEMBERED = Counter(
    "finsight_memory_facts_remembered_total",
    "Facts stored, and duplicates recognised.",
    ("outcome",),
)
RECALL_RESULTS = Histogram(
    "finsight_memory_recall_results",
    "Facts returned per Recall.",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100),
)
RECALL_SERVED = Counter(
    "finsight_memory_recall_served_total",
    "Recalls (incl. those of BuildContext) by how they were scored: index (in-process "
    "per-user index), sql (lexical; index disabled, or the user's index over the cap), "
    "transient (hybrid/vector over the cap: a full load per Recall) or pgvector "
    "(hybrid/vector over the cap on PostgreSQL: candidates from pgvector).",
    ("path",),
)
RECALL_INDEX_LOADS = Counter(
    "finsight_memory_recall_index_loads_total",
    "Per-user recall indexes loaded from DuckDB (a miss: first use, eviction, or a "
    "Forget/consent withdrawal/erasure/purge since the last load).",
)
RECALL_INDEX_ENTRIES = Gauge(
    "finsight_memory_recall_index_entries",
    "Postings + facts held by the in-process recall index (bounded by "
    "MEMORY_RECALL_INDEX_MAX_ENTRIES).",
)
CONTEXT_TOKENS = Histogram(
    "finsight_memory_context_tokens",
    "Prompt tokens of built contexts.",
    buckets=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)
PURGED = Counter("finsight_memory_purged_total", "Rows deleted by retention, by kind.", ("kind",))
ERASURES = Counter("finsight_memory_erasures_total", "DeleteUserData calls completed.")
RECALL_INDEX_REFRESHES = Counter(
    "finsight_memory_recall_index_refreshes_total",
    "Cached recall indexes found behind the user's facts version (another replica wrote): "
    "delta = the facts added since were applied, reload = facts were deleted, loaded again.",
    ("kind",),
)
FACTS_FLAGGED = Counter(
    "finsight_memory_facts_flagged_total",
    "Facts of Remember requests the screen flagged as possible instructions (stored and "
    "marked, or deduplicated), by signal (libs.common.untrusted.SIGNALS; a fact may raise "
    "several).",
    ("signal",),
)
CONTEXT_FLAGGED_FACTS = Counter(
    "finsight_memory_context_flagged_facts_total",
    "Recalled facts BuildContext found flagged, by action: excluded (MEMORY_FLAGGED_FACTS="
    "exclude), quoted (quote, and it fitted), omitted (quote, left out for lack of budget).",
    ("action",),
)
EMBEDDINGS = Counter(
    "finsight_memory_embeddings_total",
    "Texts embedded, by use (fact, query, reembed) and outcome (ok, error: the embedder "
    "failed; a fact is stored without a vector for the re-embed to catch up, a query is "
    "recalled lexically).",
    ("use", "outcome"),
)
EMBED_SECONDS = Histogram(
    "finsight_memory_embed_seconds",
    "Time of one embedding call (a batch of texts), by use.",
    ("use",),
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
RECALL_MODE = Counter(
    "finsight_memory_recall_mode_total",
    "Recalls by the mode asked for and the mode served (hybrid or vector asked but served "
    "lexical: no embedder, it failed, or the query had no vector).",
    ("asked", "served"),
)
REEMBED_PENDING = Gauge(
    "finsight_memory_reembed_pending_facts",
    "Facts without a vector of the current embedding model at the last re-embed pass "
    "(0 = caught up).",
)
REEMBEDDED = Counter(
    "finsight_memory_reembedded_facts_total",
    "Facts given a vector of the current embedding model by the background re-embed.",
)
EXTRACTIONS = Counter(
    "finsight_memory_extractions_total",
    "Fact-extraction jobs (the user turns of one AppendMessages), by outcome: ok, "
    "no_consent, throttled (MEMORY_EXTRACTION_TOKENS_PER_MINUTE), gateway_failed, "
    "unparseable (the model's answer is not the JSON asked for), error, dropped_queue_full.",
    ("outcome",),
)
EXTRACTION_PROPOSALS = Counter(
    "finsight_memory_extraction_proposals_total",
    "What became of the extractor's proposals: added, updated (superseded a fact), "
    "duplicate_meaning, duplicate_text, refused (malformed), skipped (turns already "
    "handled, or consent withdrawn meanwhile).",
    ("outcome",),
)
EXTRACTION_QUEUE = Gauge(
    "finsight_memory_extraction_queue", "Extraction jobs waiting (MEMORY_EXTRACTION_QUEUE_MAX)."
)
EXTRACTION_SECONDS = Histogram(
    "finsight_memory_extraction_seconds",
    "Time of the extractor's gateway call.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REINDEXED = Counter(
    "finsight_memory_reindexed_facts_total",
    "Facts whose postings the background re-index rebuilt with the current tokenizer.",
)
EXTRACTION_CATCHUP_TURNS = Counter(
    "finsight_memory_extraction_catchup_turns_total",
    "User turns the catch-up pass offered the extractor again (never handled: queue full, "
    "crash, gateway down, throttled); what became of their jobs is in "
    "finsight_memory_extractions_total.",
)
EXTRACTION_CATCHUP_PENDING = Gauge(
    "finsight_memory_extraction_catchup_pending_turns",
    "Unhandled user turns of consenting users the last catch-up pass found due (older than "
    "MEMORY_EXTRACTION_CATCHUP_AGE_S), counted up to the pass's batch "
    "(MEMORY_EXTRACTION_CATCHUP_BATCH): 0 = caught up.",
)
EXTRACTION_GIVEN_UP = Counter(
    "finsight_memory_extraction_given_up_total",
    "User turns the catch-up no longer offers: their extraction failed for a reason of "
    "its own (unparseable answer, gateway refusal) MEMORY_EXTRACTION_CATCHUP_MAX_ATTEMPTS "
    "times; outages never count.",
)
EXTRACTION_CATCHUP_PASSES = Counter(
    "finsight_memory_extraction_catchup_passes_total",
    "Catch-up passes, by outcome: ran, probe (the gateway failed last: one job to test it), "
    "queue_full (half of the queue or more is taken: nothing offered), skipped_lock (another "
    "replica holds this interval's pass), error (the store failed).",
    ("outcome",),
)
PGVECTOR_AVAILABLE = Gauge(
    "finsight_memory_pgvector_available",
    "1 when the pgvector recall path is on (PostgreSQL, MEMORY_RECALL_PGVECTOR=on, extension "
    "created); 0 when off or unavailable (users over the index cap: transient index load).",
)
PGVECTOR_MIRRORED = Counter(
    "finsight_memory_pgvector_mirrored_facts_total",
    "Fact vectors copied from facts.embedding (bytea) into the pgvector column.",
)
