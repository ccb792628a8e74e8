"""The PostgreSQL SQL of the memory service: `PgStore`, the production `MemoryStore`
(services/memory/store.py), on `libs.common.pg.PgDatabase` (psycopg 3, async).

Any number of replicas write one database, so nothing here may rely on being the only
writer (the DuckDB store does: one writer thread). What replaces it:

- Sequences: an append batch first upserts its sessions (INSERT ... ON CONFLICT DO UPDATE,
  in (tenant, session_id) byte order, so two batches lock common sessions in the same
  order and cannot deadlock), which creates missing ones and locks every row until
  COMMIT; it then reads `last_seq` and the stored client message ids *after* the lock
  (READ COMMITTED: a new snapshot per statement), so another replica's committed batch is
  always seen and numbers stay gap-free.
- Idempotency: the same lookup under the same lock returns the stored message of a retry;
  `messages_client_id` (UNIQUE (tenant, session_id, client_message_id)) enforces it
  whatever happens (a violation fails the batch, whose requests are then retried one by
  one, and each finds the winner).
- Facts: every transaction that changes a user's facts locks that user's `fact_versions`
  row first and bumps its version (reset_version too when it deletes live facts); fact
  numbers are drawn from that row under the lock, so they rise in commit order. Recall
  indexes of other replicas check the version per request (services/memory/manager.py).
  Remember reads consent after taking that lock, and withdrawal takes it before deleting
  facts, so a Remember racing a withdrawal can never leave facts behind.
- Lock order, everywhere: sessions (byte order) -> consent -> fact version -> facts.
  Deadlocks and serialization failures left are retried by `PgDatabase.write`; every
  function here derives what it writes from what it reads, so a re-run is safe.
- "Read after the lock sees the other's commit" is READ COMMITTED, PostgreSQL's default.
  A database defaulting to REPEATABLE READ or SERIALIZABLE stays correct: the same
  conflicts then surface as serialization failures, which are retried.

Round trips: the statements of a step are sent together (psycopg pipeline mode), so an
append batch is BEGIN, one round trip to lock and look up, one to write messages,
sessions and audit rows (set-based: arrays through unnest), and COMMIT, whatever the
number of requests. Arrays travel in binary (`%(name)b`): psycopg's text array dumper
costs ~200 µs per 64-element list in Python, the binary one ~30.

Distribution-ready (Citus, sharded by tenant): every table carries `tenant`, every key
leads with it, and every statement below filters by it (tests/memory/test_pg_schema.py
checks `STATEMENTS` and the schema); `CROSS_TENANT` names the statements that are
cross-tenant by design. Statement names in metrics are the DuckDB path's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from libs.common.pg import Conn, PgDatabase
from services.memory import appends, recall
from services.memory.appends import new_id
from services.memory.models import (
    INDEX_FACTS_SCHEMA,
    INDEX_POSTINGS_SCHEMA,
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
from services.memory.store import FactRows, RetentionPolicies
from services.memory.vectors import vector_column, vector_matrix

MAX_AUDIT_TARGETS = 100
_US_PER_DAY = 86_400 * 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Joins variable-length text lists (tags, audit targets) into one array element each:
# unnest cannot take ragged 2-D arrays. Tags and ids never contain it.
SEP = "\x1f"


def _dt(us: int | None) -> datetime | None:
    """Epoch microseconds as a timestamptz parameter (exact)."""
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def _us(column: str) -> str:
    """SQL: a timestamptz column as epoch microseconds (exact: extract gives numeric)."""
    return f"(extract(epoch FROM {column}) * 1000000)::bigint"


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- statements ------------------------------------------------------------------------------
# Tenants: registered by every audit write (every write writes one), iterated by the purge.
REGISTER_TENANTS = """
    INSERT INTO memory_tenants (tenant)
    SELECT DISTINCT u.tenant FROM unnest(%(tenant)b::text[]) AS u(tenant) ORDER BY 1
    ON CONFLICT (tenant) DO NOTHING"""
RETENTION_TENANTS = "SELECT tenant FROM memory_tenants ORDER BY tenant"

INSERT_AUDIT = """
    INSERT INTO audit_log (tenant, audit_id, logged_at, caller, key_id, rpc, user_id,
                           session_id, target_ids, outcome, detail)
    SELECT u.tenant, u.audit_id, u.logged_at, u.caller, u.key_id, u.rpc, u.user_id,
           u.session_id, string_to_array(u.targets, %(sep)s), u.outcome, u.detail::jsonb
    FROM unnest(%(tenant)b::text[], %(audit_id)b::text[], %(logged_at)b::timestamptz[],
                %(caller)b::text[], %(key_id)b::text[], %(rpc)b::text[], %(user_id)b::text[],
                %(session_id)b::text[], %(targets)b::text[], %(outcome)b::text[],
                %(detail)b::text[])
         AS u(tenant, audit_id, logged_at, caller, key_id, rpc, user_id, session_id, targets,
              outcome, detail)"""

# Sessions and messages.
_MESSAGE_COLUMNS = (
    "m.message_id, m.session_id, m.user_id, m.seq, m.role, m.content, m.client_message_id, "
    f"m.metadata, {_us('m.created_at')}, m.context_tokens"
)
LOCK_SESSIONS = """
    INSERT INTO sessions (tenant, session_id, user_id, last_seq, created_at, updated_at)
    SELECT u.tenant, u.session_id, u.user_id, 0, u.at, u.at
    FROM unnest(%(tenant)b::text[], %(session_id)b::text[], %(user_id)b::text[],
                %(at)b::timestamptz[]) WITH ORDINALITY AS u(tenant, session_id, user_id, at, i)
    ORDER BY u.i
    ON CONFLICT (tenant, session_id) DO UPDATE SET last_seq = sessions.last_seq
    RETURNING sessions.tenant, sessions.session_id, sessions.sess_no, sessions.user_id,
              sessions.last_seq"""
STORED_CLIENT_IDS = """
    SELECT m.tenant, m.session_id, m.client_message_id, m.message_id, m.seq
    FROM unnest(%(tenant)b::text[], %(session_id)b::text[], %(cid)b::text[])
         AS w(tenant, session_id, cid)
    JOIN messages m ON m.tenant = w.tenant AND m.session_id = w.session_id
                   AND m.client_message_id = w.cid AND m.client_message_id IS NOT NULL"""
INSERT_MESSAGES = """
    INSERT INTO messages (tenant, session_id, seq, user_id, message_id, role, content,
                          client_message_id, metadata, created_at, context_tokens)
    SELECT u.tenant, u.session_id, u.seq, u.user_id, u.message_id, u.role, u.content, u.cid,
           u.metadata::jsonb, u.created_at, u.tokens
    FROM unnest(%(tenant)b::text[], %(session_id)b::text[], %(seq)b::bigint[],
                %(user_id)b::text[], %(message_id)b::text[], %(role)b::text[],
                %(content)b::text[], %(cid)b::text[], %(metadata)b::text[],
                %(created_at)b::timestamptz[], %(tokens)b::integer[])
         AS u(tenant, session_id, seq, user_id, message_id, role, content, cid, metadata,
              created_at, tokens)"""
UPDATE_SESSIONS = """
    UPDATE sessions AS s SET last_seq = u.last_seq, updated_at = u.updated_at
    FROM unnest(%(tenant)b::text[], %(session_id)b::text[], %(last_seq)b::bigint[],
                %(updated_at)b::timestamptz[]) AS u(tenant, session_id, last_seq, updated_at)
    WHERE s.tenant = u.tenant AND s.session_id = u.session_id"""
GET_SESSION = """
    SELECT s.session_id, s.user_id, s.last_seq FROM sessions s
    WHERE s.tenant = %(tenant)s AND s.session_id = %(session_id)s"""
SESSION_TAIL = """
    SELECT s.user_id, s.sess_no, s.last_seq,
           (SELECT min(m.seq) FROM messages m
            WHERE m.tenant = s.tenant AND m.session_id = s.session_id)
    FROM sessions s WHERE s.tenant = %(tenant)s AND s.session_id = %(session_id)s"""
HISTORY_ASC = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages m
    WHERE m.tenant = %(tenant)s AND m.session_id = %(session_id)s AND m.seq > %(bound)s::bigint
    ORDER BY m.seq ASC LIMIT %(limit)s"""
HISTORY_DESC = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages m
    WHERE m.tenant = %(tenant)s AND m.session_id = %(session_id)s AND m.seq < %(bound)s::bigint
    ORDER BY m.seq DESC LIMIT %(limit)s"""
RECENT_OF_SESSION = f"""
    SELECT s.session_id, s.user_id, s.last_seq, r.*
    FROM sessions s
    LEFT JOIN LATERAL (
        SELECT {_MESSAGE_COLUMNS} FROM messages m
        WHERE m.tenant = s.tenant AND m.session_id = s.session_id
        ORDER BY m.seq DESC LIMIT %(limit)s) AS r ON true
    WHERE s.tenant = %(tenant)s AND s.session_id = %(session_id)s"""

# Facts.
_FACT_COLUMNS = (
    "f.fact_id, f.user_id, f.text, f.kind, f.importance, f.tags, f.source_session_id, "
    f"{_us('f.created_at')}, {_us('f.expires_at')}, f.injection_signals, f.embedding_model, "
    f"{_us('f.valid_to')}, f.superseded_by, f.origin, f.source_message_ids"
)
# Filters with NULL meaning "no condition", so each statement stays one constant text.
_FILTER = """
    (%(kinds)b::text[] IS NULL OR f.kind = ANY(%(kinds)b::text[]))
    AND (%(tags)b::text[] IS NULL OR f.tags && %(tags)b::text[])
    AND (%(after)s::timestamptz IS NULL OR f.created_at >= %(after)s::timestamptz)
    AND (%(before)s::timestamptz IS NULL OR f.created_at < %(before)s::timestamptz)"""
# The user's fact transactions serialise here; `n` fact numbers are reserved.
BUMP_FACTS_VERSION = """
    INSERT INTO fact_versions (tenant, user_id, version, reset_version, next_fact_no)
    VALUES (%(tenant)s, %(user_id)s, 1, CASE WHEN %(reset)s THEN 1 ELSE 0 END,
            %(n)s::bigint + 1)
    ON CONFLICT (tenant, user_id) DO UPDATE SET
        version = fact_versions.version + 1,
        reset_version = CASE WHEN %(reset)s THEN fact_versions.version + 1
                             ELSE fact_versions.reset_version END,
        next_fact_no = fact_versions.next_fact_no + %(n)s::bigint
    RETURNING fact_versions.version, fact_versions.next_fact_no - %(n)s::bigint"""
LOCK_FACTS_VERSION = """
    SELECT v.version FROM fact_versions v
    WHERE v.tenant = %(tenant)s AND v.user_id = %(user_id)s FOR UPDATE"""
FACTS_VERSION = """
    SELECT v.version, v.reset_version FROM fact_versions v
    WHERE v.tenant = %(tenant)s AND v.user_id = %(user_id)s"""
HAS_CONSENT = """
    SELECT c.long_term_memory FROM consent c
    WHERE c.tenant = %(tenant)s AND c.user_id = %(user_id)s"""
FACTS_BY_HASH = f"""
    SELECT f.text_hash, f.fact_id, f.fact_no, {_us("f.expires_at")} FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s
      AND f.text_hash = ANY(%(hashes)b::text[])"""
INSERT_FACTS = """
    INSERT INTO facts (tenant, user_id, fact_no, fact_id, text, text_hash, kind, importance,
                       tags, source_session_id, doc_len, created_at, expires_at,
                       injection_signals, embedding, embedding_model, origin,
                       source_message_ids, tokenizer)
    SELECT %(tenant)s, %(user_id)s, u.fact_no, u.fact_id, u.text, u.text_hash, u.kind,
           u.importance, string_to_array(u.tags, %(sep)s), u.source, u.doc_len, u.created_at,
           u.expires_at, string_to_array(u.signals, %(sep)s), u.embedding, u.embedding_model,
           u.origin, string_to_array(u.sources, %(sep)s), %(tokenizer)s::smallint
    FROM unnest(%(fact_no)b::bigint[], %(fact_id)b::text[], %(text)b::text[],
                %(text_hash)b::text[], %(kind)b::text[], %(importance)b::float8[],
                %(tags)b::text[], %(source)b::text[], %(doc_len)b::integer[],
                %(created_at)b::timestamptz[], %(expires_at)b::timestamptz[],
                %(signals)b::text[], %(embedding)b::bytea[], %(embedding_model)b::text[],
                %(origin)b::text[], %(sources)b::text[])
         AS u(fact_no, fact_id, text, text_hash, kind, importance, tags, source, doc_len,
              created_at, expires_at, signals, embedding, embedding_model, origin, sources)"""
INSERT_POSTINGS = """
    INSERT INTO fact_terms (tenant, user_id, term_key, fact_no, tf)
    SELECT %(tenant)s, %(user_id)s, u.term_key, u.fact_no, u.tf
    FROM unnest(%(term_key)b::bigint[], %(fact_no)b::bigint[], %(tf)b::integer[])
         AS u(term_key, fact_no, tf)"""
DELETE_FACTS_BY_NO = """
    DELETE FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_no = ANY(%(nos)b::bigint[])
    RETURNING f.fact_no, f.fact_id"""
DELETE_FACTS_BY_ID = """
    DELETE FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_id = ANY(%(ids)b::text[])
    RETURNING f.fact_no, f.fact_id"""
DELETE_FACTS_MATCHING = f"""
    DELETE FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND {_FILTER}
    RETURNING f.fact_no, f.fact_id"""
DELETE_POSTINGS = """
    DELETE FROM fact_terms t
    WHERE t.tenant = %(tenant)s AND t.user_id = %(user_id)s AND t.fact_no = ANY(%(nos)b::bigint[])"""
FACTS_BY_NO = f"""
    SELECT f.fact_no, {_FACT_COLUMNS} FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_no = ANY(%(nos)b::bigint[])"""
INDEX_FACTS = f"""
    SELECT f.fact_no, f.fact_id, f.doc_len, f.importance, {_us("f.created_at")},
           {_us("f.expires_at")}, f.kind, f.tags, f.embedding_model, f.embedding
    FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_no > %(after)s::bigint
      AND f.valid_to IS NULL"""
# The postings as three binary columns in one row (big-endian, as numpy reads them): a row
# per posting would cost ~1.3 s of Python per million; this ~0.4 s of server time. Unsorted
# (UserIndex.build sorts them); the three aggregates see the rows in the same order.
INDEX_POSTINGS = """
    SELECT string_agg(int8send(t.term_key), ''::bytea), string_agg(int8send(t.fact_no), ''::bytea),
           string_agg(int4send(t.tf), ''::bytea)
    FROM fact_terms t
    WHERE t.tenant = %(tenant)s AND t.user_id = %(user_id)s AND t.fact_no > %(after)s::bigint"""

# Recall scored in SQL: the same statistics, formula, operation order and rounding as
# services/memory/recall_index.py (np.round(x, 12) is x * 1e12, rint, / 1e12; PostgreSQL's
# round(double precision) is rint), ties by fact id in byte order.
_K1, _B = recall.K1, recall.B
# Joins go back to `facts` by primary key (not through a CTE), so the plan stays a
# sequence of index lookups even before the tables are analysed: the statistics are one
# aggregate, each posting of the query's terms one lookup of its fact.
_LIVE = "(f.expires_at IS NULL OR f.expires_at > %(now)s::timestamptz) AND f.valid_to IS NULL"
_RANKED = """
    parts AS (
        SELECT c.*,
               CASE WHEN max(c.bm25) OVER () > 0 THEN c.bm25 / max(c.bm25) OVER () ELSE 0 END
                   AS bm25_norm,
               exp(-ln(2::float8)
                   * greatest(%(now_us)s::bigint - {created_us}, 0)::float8
                   / %(half_life)s::float8) AS recency
        FROM cand c),
    scored AS (
        SELECT p.fact_no, p.fact_id, p.bm25, p.bm25_norm, p.recency, p.importance,
               %(w_bm25)s::float8 * p.bm25_norm + %(w_rec)s::float8 * p.recency
                   + %(w_imp)s::float8 * p.importance AS score
        FROM parts p)
    SELECT s.fact_no, s.bm25, s.bm25_norm, s.recency, s.importance, s.score FROM scored s
    ORDER BY round(s.score * 1e12::float8) / 1e12::float8 DESC, s.fact_id
    LIMIT %(k)s""".format(created_us=_us("c.created_at"))
# BM25 of the query terms over the user's live facts: the CTEs `stats` (N, avgdl), `hits`,
# `df` and `bm` (fact_no, bm25), shared by RECALL_TERMS and the pgvector path's candidates
# (services/memory/pgvector.py), so both score with the same statistics.
_BM25_CTES = f"""
    WITH stats AS MATERIALIZED (
        SELECT count(*)::float8 AS n, sum(f.doc_len)::float8 / count(*) AS avgdl
        FROM facts f WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND {_LIVE}),
    hits AS MATERIALIZED (
        SELECT t.fact_no, t.term_key, t.tf, f.doc_len
        FROM fact_terms t
        JOIN facts f ON f.tenant = t.tenant AND f.user_id = t.user_id AND f.fact_no = t.fact_no
        WHERE t.tenant = %(tenant)s AND t.user_id = %(user_id)s
          AND t.term_key = ANY(%(keys)b::bigint[]) AND {_LIVE}),
    df AS MATERIALIZED (SELECT h.term_key, count(*)::float8 AS df FROM hits h GROUP BY h.term_key),
    bm AS MATERIALIZED (
        SELECT h.fact_no,
               sum(ln(1::float8 + (s.n - d.df + 0.5::float8) / (d.df + 0.5::float8)) * h.tf
                   * {_K1 + 1!r}::float8
                   / (h.tf + {_K1!r}::float8 * (1::float8 - {_B!r}::float8
                        + {_B!r}::float8 * h.doc_len / s.avgdl))) AS bm25
        FROM hits h JOIN df d ON d.term_key = h.term_key CROSS JOIN stats s
        GROUP BY h.fact_no),
"""
RECALL_TERMS = f"""
{_BM25_CTES}    cand AS (
        SELECT f.fact_no, f.fact_id, f.importance, f.created_at, b.bm25
        FROM bm b
        JOIN facts f ON f.tenant = %(tenant)s AND f.user_id = %(user_id)s
                    AND f.fact_no = b.fact_no
        WHERE {_FILTER}),
    {_RANKED}"""
RECALL_NO_TERMS = f"""
    WITH cand AS (
        SELECT f.fact_no, f.fact_id, f.importance, f.created_at, 0::float8 AS bm25
        FROM facts f
        WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND {_LIVE} AND {_FILTER}),
    {_RANKED}"""

# Consent.
# An opt-in to extraction keeps the time it began while it lasts (the catch-up mines turns
# stored since then); opting out clears it.
UPSERT_CONSENT = """
    INSERT INTO consent AS c (tenant, user_id, long_term_memory, updated_at, updated_by,
                              fact_extraction, extraction_since)
    VALUES (%(tenant)s, %(user_id)s, %(value)s, %(at)s, %(by)s, %(extraction)s,
            CASE WHEN %(extraction)s THEN %(at)s::timestamptz END)
    ON CONFLICT (tenant, user_id) DO UPDATE SET
        long_term_memory = excluded.long_term_memory,
        fact_extraction = excluded.fact_extraction,
        extraction_since = CASE WHEN excluded.fact_extraction
                                THEN coalesce(c.extraction_since, excluded.extraction_since)
                           END,
        updated_at = excluded.updated_at,
        updated_by = excluded.updated_by"""
GET_CONSENT = f"""
    SELECT c.long_term_memory, {_us("c.updated_at")}, c.updated_by, c.fact_extraction
    FROM consent c
    WHERE c.tenant = %(tenant)s AND c.user_id = %(user_id)s"""
EXTRACTION_ALLOWED = """
    SELECT c.long_term_memory AND c.fact_extraction FROM consent c
    WHERE c.tenant = %(tenant)s AND c.user_id = %(user_id)s"""
EXTRACTED_ALREADY = """
    SELECT e.message_id FROM extracted_messages e
    WHERE e.tenant = %(tenant)s AND e.user_id = %(user_id)s
      AND e.message_id = ANY(%(ids)b::text[])"""
MARK_EXTRACTED = """
    INSERT INTO extracted_messages (tenant, user_id, message_id, processed_at)
    SELECT %(tenant)s, %(user_id)s, u.id, %(at)s FROM unnest(%(ids)b::text[]) AS u(id)
    ON CONFLICT (tenant, user_id, message_id) DO NOTHING"""
SUPERSEDE_FACT = """
    UPDATE facts AS f SET valid_to = %(at)s, superseded_by = %(new_id)s,
                          text_hash = f.text_hash || ':' || f.fact_id
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_id = %(old_id)s
      AND f.valid_to IS NULL
    RETURNING f.fact_id"""
DELETE_EXTRACTED = """
    DELETE FROM extracted_messages e WHERE e.tenant = %(tenant)s AND e.user_id = %(user_id)s"""

# Export.
# Re-indexing: facts of an older tokenizer, their postings replaced and doc_len updated.
FACTS_TO_REINDEX = """
    SELECT f.user_id, f.fact_no, f.text FROM facts f
    WHERE f.tenant = %(tenant)s AND coalesce(f.tokenizer, 1) < %(version)s
    ORDER BY f.fact_no LIMIT %(limit)s"""
REINDEXED_FACTS = """
    UPDATE facts AS f SET doc_len = u.doc_len, tokenizer = %(version)s::smallint
    FROM unnest(%(user_id)b::text[], %(fact_no)b::bigint[], %(doc_len)b::integer[])
         AS u(user_id, fact_no, doc_len)
    WHERE f.tenant = %(tenant)s AND f.user_id = u.user_id AND f.fact_no = u.fact_no
    RETURNING f.user_id, f.fact_no"""
DELETE_REINDEXED_POSTINGS = """
    DELETE FROM fact_terms t
    USING unnest(%(user_id)b::text[], %(fact_no)b::bigint[]) AS u(user_id, fact_no)
    WHERE t.tenant = %(tenant)s AND t.user_id = u.user_id AND t.fact_no = u.fact_no"""
INSERT_REINDEXED_POSTINGS = """
    INSERT INTO fact_terms (tenant, user_id, term_key, fact_no, tf)
    SELECT %(tenant)s, u.user_id, u.term_key, u.fact_no, u.tf
    FROM unnest(%(user_id)b::text[], %(term_key)b::bigint[], %(fact_no)b::bigint[],
                %(tf)b::integer[]) AS u(user_id, term_key, fact_no, tf)"""
# Re-embedding: facts without a vector of the current model, and their new vectors (a
# fact deleted or replaced meanwhile matches nothing).
FACTS_TO_EMBED = """
    SELECT f.user_id, f.fact_no, f.text FROM facts f
    WHERE f.tenant = %(tenant)s AND f.embedding_model IS DISTINCT FROM %(model)s
    ORDER BY f.fact_no LIMIT %(limit)s"""
COUNT_TO_EMBED = """
    SELECT count(*) FROM facts f
    WHERE f.tenant = %(tenant)s AND f.embedding_model IS DISTINCT FROM %(model)s"""
SET_EMBEDDINGS = """
    UPDATE facts AS f SET embedding = u.embedding, embedding_model = %(model)s
    FROM unnest(%(user_id)b::text[], %(fact_no)b::bigint[], %(text)b::text[],
                %(embedding)b::bytea[]) AS u(user_id, fact_no, text, embedding)
    WHERE f.tenant = %(tenant)s AND f.user_id = u.user_id AND f.fact_no = u.fact_no
      AND f.text = u.text
    RETURNING f.fact_no"""
EXPORT_FACTS = f"""
    SELECT {_FACT_COLUMNS} FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.fact_id > %(after)s
    ORDER BY f.fact_id LIMIT %(limit)s"""
EXPORT_MESSAGES = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages m
    WHERE m.tenant = %(tenant)s AND m.user_id = %(user_id)s
      AND (m.session_id, m.seq) > (%(after_session)s::text, %(after_seq)s::bigint)
    ORDER BY m.session_id, m.seq LIMIT %(limit)s"""
EXPORT_AUDIT = f"""
    SELECT a.audit_id, {_us("a.logged_at")}, a.caller, a.rpc, a.session_id, a.target_ids,
           a.outcome, a.detail
    FROM audit_log a
    WHERE a.tenant = %(tenant)s AND a.user_id = %(user_id)s
      AND (a.logged_at, a.audit_id) > (%(after_at)s::timestamptz, %(after_id)s)
    ORDER BY a.logged_at, a.audit_id LIMIT %(limit)s"""

# ListFacts: a page of the user's unexpired facts by (created_at, fact_id).
LIST_FACTS = f"""
    SELECT {_FACT_COLUMNS} FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s
      AND (f.expires_at IS NULL OR f.expires_at > %(now)s::timestamptz)
      AND (%(history)s OR f.valid_to IS NULL)
      AND (%(kinds)b::text[] IS NULL OR f.kind = ANY(%(kinds)b::text[]))
      AND (%(after_at)s::timestamptz IS NULL
           OR (f.created_at, f.fact_id) > (%(after_at)s::timestamptz, %(after_id)s::text))
    ORDER BY f.created_at, f.fact_id LIMIT %(limit)s"""

# Extraction status and catch-up.
COUNT_PENDING_TURNS = """
    SELECT count(*) FROM messages m
    JOIN consent c ON c.tenant = m.tenant AND c.user_id = m.user_id
    WHERE m.tenant = %(tenant)s AND m.user_id = %(user_id)s AND m.role = 'user'
      AND c.long_term_memory AND c.fact_extraction AND m.created_at >= c.extraction_since
      AND NOT EXISTS (SELECT 1 FROM extracted_messages e
                      WHERE e.tenant = %(tenant)s AND e.user_id = m.user_id
                        AND e.message_id = m.message_id)"""
EXTRACTED_TURNS = f"""
    SELECT count(*), {_us("max(e.processed_at)")} FROM extracted_messages e
    WHERE e.tenant = %(tenant)s AND e.user_id = %(user_id)s"""
COUNT_EXTRACTED_FACTS = """
    SELECT count(*) FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.origin = 'extracted'
      AND f.valid_to IS NULL AND (f.expires_at IS NULL OR f.expires_at > %(now)s::timestamptz)"""
UNEXTRACTED_TURNS = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages m
    JOIN consent c ON c.tenant = m.tenant AND c.user_id = m.user_id
    WHERE m.tenant = %(tenant)s AND c.tenant = %(tenant)s
      AND c.long_term_memory AND c.fact_extraction AND m.role = 'user'
      AND m.created_at >= c.extraction_since AND m.created_at < %(before)s::timestamptz
      AND (%(after)s::timestamptz IS NULL OR m.created_at >= %(after)s::timestamptz)
      AND NOT EXISTS (SELECT 1 FROM extracted_messages e
                      WHERE e.tenant = %(tenant)s AND e.user_id = m.user_id
                        AND e.message_id = m.message_id)
    ORDER BY m.created_at, m.session_id, m.seq LIMIT %(limit)s"""

# Erasure.
LOCK_USER_SESSIONS = """
    SELECT s.session_id FROM sessions s
    WHERE s.tenant = %(tenant)s AND s.user_id = %(user_id)s
    ORDER BY s.session_id FOR UPDATE"""
DELETE_USER_SESSIONS = """
    DELETE FROM sessions s WHERE s.tenant = %(tenant)s AND s.user_id = %(user_id)s
    RETURNING s.session_id"""
DELETE_SESSION_MESSAGES = """
    DELETE FROM messages m
    WHERE m.tenant = %(tenant)s AND m.session_id = ANY(%(sessions)b::text[])"""
DELETE_CONSENT = """
    DELETE FROM consent c WHERE c.tenant = %(tenant)s AND c.user_id = %(user_id)s"""

# Retention (one tenant per statement; the purge iterates `memory_tenants`).
PURGE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('finsight:memory:purge', 0))"
# A kind's cutoff: its own when listed (NULL = keep forever), else the "*" one.
_KIND_CUTOFF = """coalesce(
        (SELECT c.cutoff FROM unnest(%(kinds)b::text[], %(cutoffs)b::timestamptz[])
                AS c(kind, cutoff) WHERE c.kind = f.kind),
        CASE WHEN f.kind = ANY(%(kinds)b::text[]) THEN NULL ELSE %(star)s::timestamptz END)"""
_PURGEABLE_FACT = f"""(
        (f.expires_at IS NOT NULL AND f.expires_at <= %(now)s::timestamptz)
        OR f.created_at < {_KIND_CUTOFF})"""
PURGEABLE_FACT_USERS = f"""
    SELECT DISTINCT f.user_id FROM facts f
    WHERE f.tenant = %(tenant)s AND {_PURGEABLE_FACT} ORDER BY 1"""
LOCK_FACTS_VERSIONS = """
    SELECT v.user_id FROM fact_versions v
    WHERE v.tenant = %(tenant)s AND v.user_id = ANY(%(users)b::text[])
    ORDER BY v.user_id FOR UPDATE"""
PURGE_FACTS = f"""
    WITH gone AS (
        DELETE FROM facts f WHERE f.tenant = %(tenant)s AND {_PURGEABLE_FACT}
        RETURNING f.tenant, f.user_id, f.fact_no,
                  (f.expires_at IS NOT NULL AND f.expires_at <= %(now)s::timestamptz) AS expired),
    postings AS (
        DELETE FROM fact_terms t USING gone
        WHERE t.tenant = gone.tenant AND t.user_id = gone.user_id AND t.fact_no = gone.fact_no)
    SELECT g.user_id, count(*) FILTER (WHERE g.expired), count(*) FILTER (WHERE NOT g.expired)
    FROM gone g GROUP BY g.user_id"""
RESET_FACTS_VERSIONS = """
    UPDATE fact_versions AS v SET version = v.version + 1, reset_version = v.version + 1
    WHERE v.tenant = %(tenant)s AND v.user_id = ANY(%(users)b::text[])"""
PURGE_MESSAGES = """
    WITH gone AS (
        DELETE FROM messages m WHERE m.tenant = %(tenant)s AND m.created_at < %(cutoff)s
        RETURNING m.session_id)
    SELECT g.session_id, count(*) FROM gone g GROUP BY g.session_id ORDER BY g.session_id"""
PURGE_SESSIONS = """
    DELETE FROM sessions s
    WHERE s.tenant = %(tenant)s AND s.updated_at < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM messages m
                      WHERE m.tenant = s.tenant AND m.session_id = s.session_id)"""
PURGE_AUDIT = """
    DELETE FROM audit_log a WHERE a.tenant = %(tenant)s AND a.logged_at < %(cutoff)s"""

# Inspection.
COUNT_ROWS = {
    table: f"SELECT count(*) FROM {table} x WHERE x.tenant = %(tenant)s AND x.user_id = %(user_id)s"
    for table in (
        "messages",
        "sessions",
        "facts",
        "fact_terms",
        "consent",
        "audit_log",
        "extracted_messages",
    )
}
ORPHAN_POSTINGS = """
    SELECT count(*) FROM fact_terms t
    WHERE t.tenant = %(tenant)s AND NOT EXISTS (
        SELECT 1 FROM facts f
        WHERE f.tenant = t.tenant AND f.user_id = t.user_id AND f.fact_no = t.fact_no)"""

# Planner statistics after a bulk load (autovacuum gets there within a minute or so).
ANALYZE = "ANALYZE facts, fact_terms, messages, sessions"

# The statement catalogue, for the schema test: every SQL text this module sends.
STATEMENTS: dict[str, str] = {
    name: value
    for name, value in list(globals().items())
    if name.isupper() and isinstance(value, str) and not name.startswith("_") and name != "SEP"
} | {f"COUNT_ROWS[{t}]": sql for t, sql in COUNT_ROWS.items()}
# Cross-tenant by design: the purge's list of tenants (a reference table under Citus), and
# the maintenance statement.
CROSS_TENANT = frozenset({"RETENTION_TENANTS", "ANALYZE"})


# -- helpers -----------------------------------------------------------------------------------
async def _all(conn: Conn, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def _one(conn: Conn, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


def _audit_params(rows: Sequence[tuple[AuditRecord, int]]) -> dict[str, Any]:
    return {
        "sep": SEP,
        "tenant": [r.tenant for r, _ in rows],
        "audit_id": [new_id("aud") for _ in rows],
        "logged_at": [_dt(at) for _, at in rows],
        "caller": [r.caller for r, _ in rows],
        "key_id": [r.key_id for r, _ in rows],
        "rpc": [r.rpc for r, _ in rows],
        "user_id": [r.user_id for r, _ in rows],
        "session_id": [r.session_id for r, _ in rows],
        "targets": [SEP.join(r.target_ids[:MAX_AUDIT_TARGETS]) for r, _ in rows],
        "outcome": [r.outcome for r, _ in rows],
        "detail": [_json(r.detail) for r, _ in rows],
    }


async def _queue_audit(conn: Conn, rows: Sequence[tuple[AuditRecord, int]]) -> None:
    """Queue (pipeline mode) or run the audit rows and their tenants' registration."""
    params = _audit_params(rows)
    await conn.execute(REGISTER_TENANTS, {"tenant": params["tenant"]})
    await conn.execute(INSERT_AUDIT, params)


def _message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        message_id=row[0],
        session_id=row[1],
        user_id=row[2],
        sequence=int(row[3]),
        role=row[4],
        content=row[5],
        client_message_id=row[6],
        metadata=dict(row[7]),
        created_us=int(row[8]),
        tokens=None if row[9] is None else int(row[9]),
    )


def _fact(row: Sequence[Any]) -> Fact:
    return Fact(
        fact_id=row[0],
        user_id=row[1],
        text=row[2],
        kind=row[3],
        importance=float(row[4]),
        tags=tuple(row[5]),
        source_session_id=row[6],
        created_us=int(row[7]),
        expires_us=None if row[8] is None else int(row[8]),
        injection_signals=tuple(row[9] or ()),
        embedding_model=row[10] or "",
        valid_to_us=None if row[11] is None else int(row[11]),
        superseded_by=row[12] or "",
        origin=row[13] or "remembered",
        source_message_ids=tuple(row[14] or ()),
    )


def _filter_params(flt: FactFilter | None) -> dict[str, Any]:
    flt = flt or FactFilter()
    return {
        "kinds": list(flt.kinds) or None,
        "tags": list(flt.tags) or None,
        "after": _dt(flt.created_after_us),
        "before": _dt(flt.created_before_us),
    }


# -- messages --------------------------------------------------------------------------------
async def append_batch(conn: Conn, requests: list[AppendRequest]) -> list[AppendResult]:
    """See the module docstring: lock (and create) the sessions in key order, read their
    state and stored client ids under the lock, plan in Python, write set-based."""
    index = appends.session_keys(requests)
    first: dict[int, AppendRequest] = {}
    for r in requests:
        first.setdefault(index[(r.tenant, r.session_id)], r)
    ordered = sorted(index)  # byte order of (tenant, session_id): the lock order
    wanted = appends.wanted_client_ids(requests, index)
    keys = list(index)
    async with conn.pipeline() as pipe:
        locked = await conn.execute(
            LOCK_SESSIONS,
            {
                "tenant": [k[0] for k in ordered],
                "session_id": [k[1] for k in ordered],
                "user_id": [first[index[k]].user_id for k in ordered],
                "at": [_dt(first[index[k]].now_us) for k in ordered],
            },
        )
        stored = (
            await conn.execute(
                STORED_CLIENT_IDS,
                {
                    "tenant": [keys[i][0] for i, _ in wanted],
                    "session_id": [keys[i][1] for i, _ in wanted],
                    "cid": [cid for _, cid in wanted],
                },
            )
            if wanted
            else None
        )
        await pipe.sync()
        state: dict[int, list[int | str]] = {
            index[(t, s)]: [int(no), owner, int(last)]
            for t, s, no, owner, last in await locked.fetchall()
        }
        known: dict[tuple[int, str], tuple[str, int]] = {}
        if stored is not None:
            for t, s, cid, mid, seq in await stored.fetchall():
                known[(index[(t, s)], cid)] = (mid, int(seq))

    plan = appends.plan_appends(requests, index, state, known)
    async with conn.pipeline():
        if plan.rows:
            ms = [m for _, _, m in plan.rows]
            await conn.execute(
                INSERT_MESSAGES,
                {
                    "tenant": [t for _, t, _ in plan.rows],
                    "session_id": [m.session_id for m in ms],
                    "seq": [m.sequence for m in ms],
                    "user_id": [m.user_id for m in ms],
                    "message_id": [m.message_id for m in ms],
                    "role": [m.role for m in ms],
                    "content": [m.content for m in ms],
                    "cid": [m.client_message_id for m in ms],
                    "metadata": [_json(m.metadata) for m in ms],
                    "created_at": [_dt(m.created_us) for m in ms],
                    "tokens": [m.tokens for m in ms],
                },
            )
            touched = sorted(plan.touched, key=lambda i: keys[i])
            await conn.execute(
                UPDATE_SESSIONS,
                {
                    "tenant": [keys[i][0] for i in touched],
                    "session_id": [keys[i][1] for i in touched],
                    "last_seq": [int(state[i][2]) for i in touched],
                    "updated_at": [_dt(plan.touched[i]) for i in touched],
                },
            )
        await _queue_audit(conn, plan.audits)
    return plan.results


async def write_audit_batch(conn: Conn, rows: list[tuple[AuditRecord, int]]) -> list[None]:
    if rows:
        async with conn.pipeline():
            await _queue_audit(conn, rows)
    return [None] * len(rows)


async def get_session(conn: Conn, tenant: str, session_id: str) -> Session | None:
    row = await _one(conn, GET_SESSION, {"tenant": tenant, "session_id": session_id})
    return None if row is None else Session(row[0], row[1], int(row[2]))


async def session_tail(conn: Conn, tenant: str, session_id: str) -> SessionTail | None:
    row = await _one(conn, SESSION_TAIL, {"tenant": tenant, "session_id": session_id})
    if row is None:
        return None
    last = int(row[2])
    return SessionTail(row[0], int(row[1]), last + 1 if row[3] is None else int(row[3]), last)


async def history_page(
    conn: Conn, tenant: str, session_id: str, order: Order, boundary: int | None, limit: int
) -> list[StoredMessage]:
    if order is Order.ASC:
        sql, bound = HISTORY_ASC, boundary or 0
    else:
        sql, bound = HISTORY_DESC, boundary if boundary is not None else 2**62
    params = {"tenant": tenant, "session_id": session_id, "bound": bound, "limit": limit}
    return [_message(r) for r in await _all(conn, sql, params)]


async def recent_of_session(
    conn: Conn, tenant: str, session_id: str, limit: int
) -> tuple[Session | None, list[StoredMessage]]:
    """The session and its last `limit` messages (oldest first), in one statement."""
    rows = await _all(
        conn, RECENT_OF_SESSION, {"tenant": tenant, "session_id": session_id, "limit": limit}
    )
    if not rows:
        return None, []
    session = Session(rows[0][0], rows[0][1], int(rows[0][2]))
    messages = [_message(r[3:]) for r in rows if r[3] is not None]
    messages.sort(key=lambda m: m.sequence)
    return session, messages


async def recent_messages(
    conn: Conn, tenant: str, session_id: str, limit: int
) -> list[StoredMessage]:
    return (await recent_of_session(conn, tenant, session_id, limit))[1]


# -- facts -----------------------------------------------------------------------------------
async def _bump(
    conn: Conn, tenant: str, user_id: str, *, n: int = 0, reset: bool = False
) -> tuple[int, int]:
    """Lock the user's version row (creating it), move it; (version, first reserved no)."""
    row = await _one(
        conn, BUMP_FACTS_VERSION, {"tenant": tenant, "user_id": user_id, "n": n, "reset": reset}
    )
    assert row is not None
    return int(row[0]), int(row[1])


def _fact_rows(
    tenant: str,
    user_id: str,
    rows: FactRows,
    first_no: int,
    now_us: int,
    created_us: Sequence[int] | None,
) -> tuple[dict[str, Any], dict[str, Any], InsertedFacts]:
    """Parameters of INSERT_FACTS and INSERT_POSTINGS for `rows`, numbered from
    `first_no`, and what the recall index takes of them."""
    nos = list(range(first_no, first_no + len(rows)))
    created = list(created_us) if created_us is not None else [now_us] * len(rows)
    doc_lens: list[int] = []
    p_key: list[int] = []
    p_no: list[int] = []
    p_tf: list[int] = []
    for no, (_, fact, _) in zip(nos, rows, strict=True):
        tfs, length = recall.term_frequencies(fact.text)
        doc_lens.append(length)
        for term, tf in tfs.items():
            p_key.append(recall.term_key(tenant, user_id, term))
            p_no.append(no)
            p_tf.append(tf)
    facts = {
        "tenant": tenant,
        "user_id": user_id,
        "sep": SEP,
        "fact_no": nos,
        "fact_id": [r[0] for r in rows],
        "text": [r[1].text for r in rows],
        "text_hash": [r[2] for r in rows],
        "kind": [r[1].kind for r in rows],
        "importance": [float(r[1].importance) for r in rows],
        "tags": [SEP.join(r[1].tags) for r in rows],
        "source": [r[1].source_session_id for r in rows],
        "doc_len": doc_lens,
        "created_at": [_dt(c) for c in created],
        "expires_at": [_dt(r[1].expires_us) for r in rows],
        "signals": [SEP.join(r[1].injection_signals) for r in rows],
        "embedding": [_vector_bytes(r[1].embedding) for r in rows],
        "embedding_model": [r[1].embedding_model or None for r in rows],
        "origin": [r[1].origin for r in rows],
        "sources": [SEP.join(r[1].source_message_ids) for r in rows],
        "tokenizer": recall.TOKENIZER_VERSION,
    }
    postings = {
        "tenant": tenant,
        "user_id": user_id,
        "term_key": p_key,
        "fact_no": p_no,
        "tf": p_tf,
    }
    inserted = InsertedFacts(
        facts=pa.table(
            {
                "fact_no": pa.array(nos, pa.int64()),
                "fact_id": pa.array(facts["fact_id"], pa.string()),
                "doc_len": pa.array(doc_lens, pa.int32()),
                "importance": pa.array(facts["importance"], pa.float64()),
                "created_us": pa.array(created, pa.int64()),
                "expires_us": pa.array([r[1].expires_us for r in rows], pa.int64()),
                "kind": pa.array(facts["kind"], pa.string()),
                "tags": pa.array([list(r[1].tags) for r in rows], pa.list_(pa.string())),
                "embedding_model": pa.array(facts["embedding_model"], pa.string()),
                "embedding": vector_column([r[1].embedding for r in rows]),
            },
            schema=INDEX_FACTS_SCHEMA,
        ),
        postings=pa.table(
            {
                "term_key": pa.array(p_key, pa.int64()),
                "fact_no": pa.array(p_no, pa.int64()),
                "tf": pa.array(p_tf, pa.int32()),
            },
            schema=INDEX_POSTINGS_SCHEMA,
        ),
    )
    return facts, postings, inserted


async def _queue_fact_inserts(conn: Conn, facts: dict[str, Any], postings: dict[str, Any]) -> None:
    if facts["fact_no"]:
        await conn.execute(INSERT_FACTS, facts)
    if postings["fact_no"]:
        await conn.execute(INSERT_POSTINGS, postings)


async def remember_facts(
    conn: Conn,
    tenant: str,
    user_id: str,
    facts: Sequence[NewFact],
    now_us: int,
    audit: AuditRecord,
) -> tuple[list[Remembered], InsertedFacts] | None:
    """Store facts (deduplicated per user); None, with an audit row, without consent.
    Consent and duplicates are read after the user's version row is locked, so neither a
    withdrawal nor a twin Remember on another replica can slip in between."""
    who = {"tenant": tenant, "user_id": user_id}
    hashes = [recall.fact_hash(f.text) for f in facts]
    async with conn.pipeline() as pipe:
        bumped = await conn.execute(BUMP_FACTS_VERSION, {**who, "n": len(facts), "reset": False})
        consent = await conn.execute(HAS_CONSENT, who)
        twins = await conn.execute(FACTS_BY_HASH, {**who, "hashes": sorted(set(hashes))})
        await pipe.sync()
        version, first_no = (int(v) for v in (await bumped.fetchone() or (0, 0)))
        allowed = await consent.fetchone()
        existing = await twins.fetchall()
    if not (allowed and allowed[0]):
        async with conn.pipeline():
            await _queue_audit(conn, [(replace(audit, outcome="CONSENT_REQUIRED"), now_us)])
        return None
    live: dict[str, str] = {}
    stale: list[int] = []
    for text_hash, fact_id, fact_no, expires in existing:
        if expires is not None and expires <= now_us:
            stale.append(int(fact_no))  # an expired twin is replaced, not resurrected
        else:
            live[text_hash] = fact_id
    out: list[Remembered] = []
    rows: list[tuple[str, NewFact, str]] = []
    for fact, text_hash in zip(facts, hashes, strict=True):
        if text_hash in live:
            out.append(Remembered(live[text_hash], True))
            continue
        fact_id = new_id("fct")
        live[text_hash] = fact_id  # a duplicate later in the same request dedups to this one
        rows.append((fact_id, fact, text_hash))
        out.append(Remembered(fact_id, False))
    fact_params, posting_params, inserted = _fact_rows(
        tenant, user_id, rows, first_no, now_us, None
    )
    async with conn.pipeline():
        if stale:
            # Before the inserts (separate statements): the twin's text_hash is reused.
            await conn.execute(DELETE_FACTS_BY_NO, {**who, "nos": stale})
            await conn.execute(DELETE_POSTINGS, {**who, "nos": stale})
        await _queue_fact_inserts(conn, fact_params, posting_params)
        await _queue_audit(
            conn,
            [
                (
                    replace(
                        audit,
                        target_ids=tuple(r.fact_id for r in out),
                        detail={"stored": len(rows), "deduplicated": len(out) - len(rows)},
                    ),
                    now_us,
                )
            ],
        )
    return out, replace(inserted, version=version)


async def insert_facts(
    conn: Conn,
    tenant: str,
    user_id: str,
    rows: FactRows,
    now_us: int,
    created_us: Sequence[int] | None = None,
) -> InsertedFacts:
    """Bulk insert of one user's facts (no consent, dedup or audit: tests, benchmarks)."""
    version, first_no = await _bump(conn, tenant, user_id, n=len(rows))
    fact_params, posting_params, inserted = _fact_rows(
        tenant, user_id, rows, first_no, now_us, created_us
    )
    async with conn.pipeline():
        await conn.execute(REGISTER_TENANTS, {"tenant": [tenant]})
        await _queue_fact_inserts(conn, fact_params, posting_params)
    return replace(inserted, version=version)


async def insert_fact_tables(conn: Conn, facts: pa.Table, postings: pa.Table) -> InsertedFacts:
    """`storage.insert_fact_tables` for PostgreSQL: one user's facts per call (numbers are
    per user), postings chunked so no statement carries millions of parameters."""
    users = set(zip(facts["tenant"].to_pylist(), facts["user_id"].to_pylist(), strict=True))
    if len(users) != 1:
        raise ValueError("insert_fact_tables takes the facts of exactly one user")
    ((tenant, user_id),) = users
    n = facts.num_rows
    version, first_no = await _bump(conn, tenant, user_id, n=n)
    fact_no = np.arange(first_no, first_no + n, dtype=np.int64)[facts["row"].to_numpy()]
    who = {"tenant": tenant, "user_id": user_id}
    signals: list[list[str]] = (
        facts["injection_signals"].to_pylist()
        if "injection_signals" in facts.column_names
        else [[] for _ in range(n)]
    )
    if "embedding" in facts.column_names:
        dim = max((len(v) for v in facts["embedding"].to_pylist() if v), default=0)
        matrix, has = vector_matrix(facts["embedding"], dim)
        vectors: list[np.ndarray | None] = [
            m if h else None for m, h in zip(matrix, has, strict=True)
        ]
        models: list[str | None] = facts["embedding_model"].to_pylist()
    else:
        vectors, models = [None] * n, [None] * n
    origins: list[str | None] = (
        facts["origin"].to_pylist() if "origin" in facts.column_names else ["remembered"] * n
    )
    sources: list[list[str]] = (
        [x or [] for x in facts["source_message_ids"].to_pylist()]
        if "source_message_ids" in facts.column_names
        else [[] for _ in range(n)]
    )
    await conn.execute(REGISTER_TENANTS, {"tenant": [tenant]})
    step = 50_000
    for lo in range(0, n, step):
        part = facts.slice(lo, step)
        await conn.execute(
            INSERT_FACTS,
            {
                **who,
                "sep": SEP,
                "fact_no": fact_no[lo : lo + step].tolist(),
                "fact_id": part["fact_id"].to_pylist(),
                "text": part["text"].to_pylist(),
                "text_hash": part["text_hash"].to_pylist(),
                "kind": part["kind"].to_pylist(),
                "importance": part["importance"].to_pylist(),
                "tags": [SEP.join(t) for t in part["tags"].to_pylist()],
                "source": part["source_session_id"].to_pylist(),
                "doc_len": part["doc_len"].to_pylist(),
                "created_at": [_dt(c) for c in part["created_us"].to_pylist()],
                "expires_at": [_dt(e) for e in part["expires_us"].to_pylist()],
                "signals": [SEP.join(s) for s in signals[lo : lo + step]],
                "embedding": [_vector_bytes(v) for v in vectors[lo : lo + step]],
                "embedding_model": models[lo : lo + step],
                "origin": origins[lo : lo + step],
                "sources": [SEP.join(x) for x in sources[lo : lo + step]],
                "tokenizer": recall.TOKENIZER_VERSION,
            },
        )
    p_no = fact_no[postings["row"].to_numpy()]
    keys = postings["term_key"].to_numpy()
    tfs = postings["tf"].to_numpy()
    step = 200_000
    for lo in range(0, len(p_no), step):
        await conn.execute(
            INSERT_POSTINGS,
            {
                **who,
                "term_key": keys[lo : lo + step].tolist(),
                "fact_no": p_no[lo : lo + step].tolist(),
                "tf": tfs[lo : lo + step].tolist(),
            },
        )
    return InsertedFacts(
        facts=pa.table(
            {
                "fact_no": fact_no,
                **{c: facts[c] for c in ("fact_id", "doc_len", "importance")},
                "created_us": facts["created_us"],
                "expires_us": facts["expires_us"],
                "kind": facts["kind"],
                "tags": facts["tags"],
                "embedding_model": pa.array(models, pa.string()),
                "embedding": vector_column(vectors),
            }
        ).cast(INDEX_FACTS_SCHEMA),
        postings=pa.table({"term_key": keys, "fact_no": p_no, "tf": tfs}).cast(
            INDEX_POSTINGS_SCHEMA
        ),
        version=version,
    )


async def load_recall_index(
    conn: Conn, tenant: str, user_id: str, after_fact_no: int = 0
) -> IndexSnapshot:
    """Run inside one REPEATABLE READ snapshot (`PgDatabase.snapshot`): the version, the
    facts and the postings all describe the same committed state. One round trip."""
    params = {"tenant": tenant, "user_id": user_id, "after": after_fact_no}
    async with conn.pipeline() as pipe:
        version_cur = await conn.execute(FACTS_VERSION, params)
        facts_cur = conn.cursor(binary=True)  # ints and floats without text parsing
        await facts_cur.execute(INDEX_FACTS, params)
        postings_cur = conn.cursor(binary=True)
        await postings_cur.execute(INDEX_POSTINGS, params)
        await pipe.sync()
        version_row = await version_cur.fetchone()
        rows = await facts_cur.fetchall()
        packed = await postings_cur.fetchone()
    keys, nos, tfs = packed if packed is not None and packed[0] is not None else (b"", b"", b"")
    postings = pa.table(
        {
            "term_key": np.frombuffer(keys, ">i8").astype(np.int64),
            "fact_no": np.frombuffer(nos, ">i8").astype(np.int64),
            "tf": np.frombuffer(tfs, ">i4").astype(np.int32),
        },
        schema=INDEX_POSTINGS_SCHEMA,
    )
    facts = index_facts_table(rows)
    version, reset = (int(v) for v in version_row) if version_row else (0, 0)
    return IndexSnapshot(facts, postings, version, reset)


def index_facts_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows of `INDEX_FACTS`' columns as the recall index's facts table."""
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * 10
    return pa.table(
        {
            "fact_no": pa.array(columns[0], pa.int64()),
            "fact_id": pa.array(columns[1], pa.string()),
            "doc_len": pa.array(columns[2], pa.int32()),
            "importance": pa.array(columns[3], pa.float64()),
            "created_us": pa.array(columns[4], pa.int64()),
            "expires_us": pa.array(columns[5], pa.int64()),
            "kind": pa.array(columns[6], pa.string()),
            "tags": pa.array(columns[7], pa.list_(pa.string())),
            "embedding_model": pa.array(columns[8], pa.string()),
            "embedding": vector_column(
                [None if b is None else np.frombuffer(b, "<f4") for b in columns[9]]
            ),
        },
        schema=INDEX_FACTS_SCHEMA,
    )


async def facts_version(conn: Conn, tenant: str, user_id: str) -> FactsVersion:
    row = await _one(conn, FACTS_VERSION, {"tenant": tenant, "user_id": user_id})
    return FactsVersion() if row is None else FactsVersion(int(row[0]), int(row[1]))


async def facts_by_no(
    conn: Conn, tenant: str, user_id: str, fact_nos: Sequence[int]
) -> dict[int, Fact]:
    if not fact_nos:
        return {}
    rows = await _all(
        conn,
        FACTS_BY_NO,
        {"tenant": tenant, "user_id": user_id, "nos": [int(n) for n in fact_nos]},
    )
    return {int(r[0]): _fact(r[1:]) for r in rows}


async def recall_facts(
    conn: Conn,
    tenant: str,
    user_id: str,
    query: str,
    flt: FactFilter,
    k: int,
    now_us: int,
    weights: RecallWeights,
) -> list[ScoredFact]:
    """Top `k` live facts by the weighted score, ranked as `storage.recall_facts` and the
    in-process index rank them."""
    keys = sorted({recall.term_key(tenant, user_id, t) for t in recall.query_terms(query)})
    params = {
        "tenant": tenant,
        "user_id": user_id,
        "now": _dt(now_us),
        "now_us": now_us,
        "k": k,
        "w_bm25": weights.bm25,
        "w_rec": weights.recency,
        "w_imp": weights.importance,
        "half_life": weights.half_life_days * _US_PER_DAY,
        "keys": keys,
        **_filter_params(flt),
    }
    ranked = await _all(conn, RECALL_TERMS if keys else RECALL_NO_TERMS, params)
    found = await facts_by_no(conn, tenant, user_id, [r[0] for r in ranked])
    return [
        ScoredFact(
            fact=found[r[0]],
            bm25=float(r[1]),
            bm25_normalized=float(r[2]),
            recency=float(r[3]),
            importance=float(r[4]),
            score=float(r[5]),
            relevance=float(r[2]),
        )
        for r in ranked
        if r[0] in found
    ]


async def _delete_facts(
    conn: Conn, tenant: str, user_id: str, sql: str, params: dict[str, Any]
) -> list[tuple[int, str]]:
    """Delete facts (the user's version row must be locked) and their postings; bump the
    version with a reset when any went. Returns (fact_no, fact_id) of those deleted."""
    who = {"tenant": tenant, "user_id": user_id}
    gone = [(int(no), str(fid)) for no, fid in await _all(conn, sql, {**who, **params})]
    if gone:
        async with conn.pipeline():
            await conn.execute(DELETE_POSTINGS, {**who, "nos": [no for no, _ in gone]})
            await conn.execute(BUMP_FACTS_VERSION, {**who, "n": 0, "reset": True})
    return gone


async def forget_facts(
    conn: Conn,
    tenant: str,
    user_id: str,
    fact_ids: Sequence[str],
    flt: FactFilter | None,
    forget_all: bool,
    now_us: int,
    audit: AuditRecord,
) -> list[str]:
    who = {"tenant": tenant, "user_id": user_id}
    await conn.execute(LOCK_FACTS_VERSION, who)
    if fact_ids:
        gone = await _delete_facts(
            conn, tenant, user_id, DELETE_FACTS_BY_ID, {"ids": list(fact_ids)}
        )
    else:
        gone = await _delete_facts(
            conn,
            tenant,
            user_id,
            DELETE_FACTS_MATCHING,
            _filter_params(None if forget_all else flt),
        )
    deleted = sorted(fid for _, fid in gone)
    async with conn.pipeline():
        await _queue_audit(
            conn,
            [(replace(audit, target_ids=tuple(deleted), detail={"deleted": len(deleted)}), now_us)],
        )
    return deleted


# -- consent ---------------------------------------------------------------------------------
async def get_consent(conn: Conn, tenant: str, user_id: str) -> Consent:
    row = await _one(conn, GET_CONSENT, {"tenant": tenant, "user_id": user_id})
    if row is None:
        return Consent()
    return Consent(bool(row[0]), int(row[1]), row[2], bool(row[0]) and bool(row[3]))


async def set_consent(
    conn: Conn,
    tenant: str,
    user_id: str,
    long_term_memory: bool,
    now_us: int,
    audit: AuditRecord,
    fact_extraction: bool = False,
) -> tuple[Consent, int]:
    who = {"tenant": tenant, "user_id": user_id}
    extraction = long_term_memory and fact_extraction
    async with conn.pipeline():
        await conn.execute(
            UPSERT_CONSENT,
            {
                **who,
                "value": long_term_memory,
                "at": _dt(now_us),
                "by": audit.caller,
                "extraction": extraction,
            },
        )
        if not long_term_memory:
            await conn.execute(LOCK_FACTS_VERSION, who)
    deleted: list[str] = []
    if not long_term_memory:
        gone = await _delete_facts(
            conn, tenant, user_id, DELETE_FACTS_MATCHING, _filter_params(None)
        )
        deleted = sorted(fid for _, fid in gone)
    async with conn.pipeline():
        await _queue_audit(
            conn,
            [
                (
                    replace(
                        audit,
                        target_ids=tuple(deleted),
                        detail={
                            "long_term_memory": long_term_memory,
                            "fact_extraction": extraction,
                            "facts_deleted": len(deleted),
                        },
                    ),
                    now_us,
                )
            ],
        )
    return Consent(long_term_memory, now_us, audit.caller, extraction), len(deleted)


# -- export ----------------------------------------------------------------------------------
async def export_facts(conn: Conn, tenant: str, user_id: str, after: str, limit: int) -> list[Fact]:
    rows = await _all(
        conn, EXPORT_FACTS, {"tenant": tenant, "user_id": user_id, "after": after, "limit": limit}
    )
    return [_fact(r) for r in rows]


async def export_messages(
    conn: Conn, tenant: str, user_id: str, after: tuple[str, int], limit: int
) -> list[StoredMessage]:
    rows = await _all(
        conn,
        EXPORT_MESSAGES,
        {
            "tenant": tenant,
            "user_id": user_id,
            "after_session": after[0],
            "after_seq": after[1],
            "limit": limit,
        },
    )
    return [_message(r) for r in rows]


async def export_audit(
    conn: Conn, tenant: str, user_id: str, after: tuple[int, str], limit: int
) -> list[AuditEntry]:
    rows = await _all(
        conn,
        EXPORT_AUDIT,
        {
            "tenant": tenant,
            "user_id": user_id,
            "after_at": _dt(after[0]),
            "after_id": after[1],
            "limit": limit,
        },
    )
    return [
        AuditEntry(r[0], int(r[1]), r[2], r[3], r[4], tuple(r[5]), r[6], _json(r[7])) for r in rows
    ]


# -- erasure and retention -------------------------------------------------------------------
async def erase_user(
    conn: Conn, tenant: str, user_id: str, now_us: int, audit: AuditRecord
) -> ErasureCounts:
    """Sessions first (locked in key order, then deleted), then exactly their messages: an
    append racing the erasure either committed before (and is erased with its session) or
    creates a session of its own afterwards, never orphaned messages."""
    who = {"tenant": tenant, "user_id": user_id}
    async with conn.pipeline() as pipe:
        await conn.execute(LOCK_USER_SESSIONS, who)
        deleted_sessions = await conn.execute(DELETE_USER_SESSIONS, who)
        await pipe.sync()
        sessions = sorted(str(r[0]) for r in await deleted_sessions.fetchall())
    async with conn.pipeline() as pipe:
        msgs = await conn.execute(DELETE_SESSION_MESSAGES, {"tenant": tenant, "sessions": sessions})
        consent = await conn.execute(DELETE_CONSENT, who)
        await conn.execute(DELETE_EXTRACTED, who)
        await conn.execute(LOCK_FACTS_VERSION, who)
        await pipe.sync()
        messages, n_consent = msgs.rowcount, consent.rowcount
    gone = await _delete_facts(conn, tenant, user_id, DELETE_FACTS_MATCHING, _filter_params(None))
    counts = ErasureCounts(messages, len(sessions), len(gone), n_consent, tuple(sessions))
    async with conn.pipeline():
        await _queue_audit(conn, [(replace(audit, detail=counts.audit_detail()), now_us)])
    return counts


async def extraction_allowed(conn: Conn, tenant: str, user_id: str) -> bool:
    row = await _one(conn, EXTRACTION_ALLOWED, {"tenant": tenant, "user_id": user_id})
    return bool(row and row[0])


async def write_extraction(
    conn: Conn,
    tenant: str,
    user_id: str,
    facts: Sequence[NewFact],
    supersedes: Sequence[tuple[int, str]],
    message_ids: Sequence[str],
    now_us: int,
    audit: AuditRecord,
) -> Extracted | None:
    """`storage.write_extraction` for PostgreSQL (one transaction; the user's version row
    is locked first, as every fact write does, so consent and the handled messages are
    read under it)."""
    who = {"tenant": tenant, "user_id": user_id}
    await _bump(conn, tenant, user_id, reset=bool(supersedes))
    if not await extraction_allowed(conn, tenant, user_id):
        return None
    done = {r[0] for r in await _all(conn, EXTRACTED_ALREADY, {**who, "ids": list(message_ids)})}
    empty = InsertedFacts(INDEX_FACTS_SCHEMA.empty_table(), INDEX_POSTINGS_SCHEMA.empty_table())
    if message_ids and done >= set(message_ids):
        return Extracted([], [], empty, True)
    remembered: list[Remembered] = []
    inserted = empty
    if facts:
        stored = await remember_facts(conn, tenant, user_id, facts, now_us, audit)
        assert stored is not None  # consent checked above, under the same lock
        remembered, inserted = stored
    superseded: list[tuple[str, str]] = []
    for index, old_id in supersedes:
        new_id = remembered[index].fact_id
        if new_id == old_id:
            continue
        closed = await _all(
            conn, SUPERSEDE_FACT, {**who, "at": _dt(now_us), "new_id": new_id, "old_id": old_id}
        )
        if closed:
            superseded.append((old_id, new_id))
    async with conn.pipeline():
        await conn.execute(MARK_EXTRACTED, {**who, "ids": list(message_ids), "at": _dt(now_us)})
        await _queue_audit(
            conn,
            [
                (
                    replace(
                        audit,
                        rpc="SupersedeFact",
                        target_ids=(old_id, new_id),
                        detail={"superseded": old_id, "by": new_id},
                    ),
                    now_us,
                )
                for old_id, new_id in superseded
            ],
        )
    return Extracted(remembered, superseded, inserted)


async def list_facts(
    conn: Conn,
    tenant: str,
    user_id: str,
    kinds: Sequence[str],
    include_history: bool,
    after: FactsPageKey | None,
    limit: int,
    now_us: int,
) -> list[Fact]:
    rows = await _all(
        conn,
        LIST_FACTS,
        {
            "tenant": tenant,
            "user_id": user_id,
            "now": _dt(now_us),
            "history": include_history,
            "kinds": list(kinds) or None,
            "after_at": _dt(after.created_us) if after else None,
            "after_id": after.fact_id if after else "",
            "limit": limit,
        },
    )
    return [_fact(r) for r in rows]


async def extraction_counts(conn: Conn, tenant: str, user_id: str, now_us: int) -> ExtractionCounts:
    who = {"tenant": tenant, "user_id": user_id}
    async with conn.pipeline() as pipe:
        pending = await conn.execute(COUNT_PENDING_TURNS, who)
        handled = await conn.execute(EXTRACTED_TURNS, who)
        facts = await conn.execute(COUNT_EXTRACTED_FACTS, {**who, "now": _dt(now_us)})
        await pipe.sync()
        n_pending, n_handled, n_facts = (
            await pending.fetchone(),
            await handled.fetchone(),
            await facts.fetchone(),
        )
    assert n_pending is not None and n_handled is not None and n_facts is not None
    return ExtractionCounts(
        int(n_pending[0]),
        int(n_handled[0]),
        None if n_handled[1] is None else int(n_handled[1]),
        int(n_facts[0]),
    )


async def unextracted_messages(
    conn: Conn, tenant: str, before_us: int, after_us: int | None, limit: int
) -> list[StoredMessage]:
    rows = await _all(
        conn,
        UNEXTRACTED_TURNS,
        {"tenant": tenant, "before": _dt(before_us), "after": _dt(after_us), "limit": limit},
    )
    return [_message(r) for r in rows]


def _vector_bytes(vector: np.ndarray | None) -> bytes | None:
    """A vector as the `embedding` column holds it: raw little-endian float32."""
    return None if vector is None else np.asarray(vector, "<f4").tobytes()


async def facts_to_embed(conn: Conn, tenant: str, model: str, limit: int) -> list[ToEmbed]:
    rows = await _all(conn, FACTS_TO_EMBED, {"tenant": tenant, "model": model, "limit": limit})
    return [ToEmbed(tenant, r[0], int(r[1]), r[2]) for r in rows]


async def count_to_embed(conn: Conn, tenant: str, model: str) -> int:
    row = await _one(conn, COUNT_TO_EMBED, {"tenant": tenant, "model": model})
    return int(row[0]) if row else 0


async def set_embeddings(
    conn: Conn, tenant: str, model: str, rows: Sequence[ToEmbed], vectors: np.ndarray
) -> int:
    if not rows:
        return 0
    # Other replicas' indexes hold the old vectors: a reset makes them reload.
    for user_id in sorted({r.user_id for r in rows}):
        await _bump(conn, tenant, user_id, reset=True)
    found = await _all(
        conn,
        SET_EMBEDDINGS,
        {
            "tenant": tenant,
            "model": model,
            "user_id": [r.user_id for r in rows],
            "fact_no": [r.fact_no for r in rows],
            "text": [r.text for r in rows],
            "embedding": [_vector_bytes(v) for v in vectors],
        },
    )
    return len(found)


async def facts_to_reindex(conn: Conn, tenant: str, version: int, limit: int) -> list[ToEmbed]:
    rows = await _all(
        conn, FACTS_TO_REINDEX, {"tenant": tenant, "version": version, "limit": limit}
    )
    return [ToEmbed(tenant, r[0], int(r[1]), r[2]) for r in rows]


async def reindex_facts(conn: Conn, tenant: str, rows: Sequence[ToEmbed]) -> int:
    """`storage.reindex_facts` for PostgreSQL; other replicas reload (a version reset)."""
    if not rows:
        return 0
    for user_id in sorted({r.user_id for r in rows}):
        await _bump(conn, tenant, user_id, reset=True)
    terms = [recall.term_frequencies(r.text) for r in rows]
    updated = await _all(
        conn,
        REINDEXED_FACTS,
        {
            "tenant": tenant,
            "version": recall.TOKENIZER_VERSION,
            "user_id": [r.user_id for r in rows],
            "fact_no": [r.fact_no for r in rows],
            "doc_len": [length for _, length in terms],
        },
    )
    live = {(str(u), int(n)) for u, n in updated}
    todo = [(r, t) for r, t in zip(rows, terms, strict=True) if (r.user_id, r.fact_no) in live]
    users: list[str] = []
    keys: list[int] = []
    nos: list[int] = []
    tfs: list[int] = []
    for row, (counts, _) in todo:
        for term, tf in counts.items():
            users.append(row.user_id)
            keys.append(recall.term_key(tenant, row.user_id, term))
            nos.append(row.fact_no)
            tfs.append(tf)
    who = {
        "tenant": tenant,
        "user_id": [r.user_id for r, _ in todo],
        "fact_no": [r.fact_no for r, _ in todo],
    }
    async with conn.pipeline():
        await conn.execute(DELETE_REINDEXED_POSTINGS, who)
        await conn.execute(
            INSERT_REINDEXED_POSTINGS,
            {"tenant": tenant, "user_id": users, "term_key": keys, "fact_no": nos, "tf": tfs},
        )
    return len(todo)


async def retention_tenants(conn: Conn) -> list[str]:
    return [str(r[0]) for r in await _all(conn, RETENTION_TENANTS, {})]


def _cutoff(now_us: int, days: float) -> datetime | None:
    return _dt(now_us - int(days * _US_PER_DAY)) if days > 0 else None


async def purge(
    conn: Conn, tenants: RetentionPolicies, now_us: int, audit: AuditRecord
) -> PurgeCounts:
    """Delete what retention says must go, tenant by tenant (every statement stays inside
    one tenant). One purge at a time across replicas (a transaction-level advisory lock):
    two would only fight over the same rows."""
    await conn.execute(PURGE_LOCK)
    facts = by_age = messages = sessions = audits = 0
    touched: list[tuple[str, str]] = []
    now = _dt(now_us)
    for tenant, (message_days, audit_days, fact_days) in sorted(tenants.items()):
        explicit = sorted(k for k in fact_days if k != "*")
        rule = {
            "tenant": tenant,
            "now": now,
            "kinds": explicit,
            "cutoffs": [_cutoff(now_us, fact_days[k]) for k in explicit],
            "star": _cutoff(now_us, fact_days.get("*", 0.0)),
        }
        cutoff = _cutoff(now_us, message_days)
        if cutoff is not None:
            async with conn.pipeline() as pipe:
                gone = await conn.execute(PURGE_MESSAGES, {"tenant": tenant, "cutoff": cutoff})
                emptied = await conn.execute(PURGE_SESSIONS, {"tenant": tenant, "cutoff": cutoff})
                await pipe.sync()
                for session_id, n in await gone.fetchall():
                    touched.append((tenant, str(session_id)))
                    messages += int(n)
                sessions += emptied.rowcount
        cutoff = _cutoff(now_us, audit_days)
        if cutoff is not None:
            cur = await conn.execute(PURGE_AUDIT, {"tenant": tenant, "cutoff": cutoff})
            audits += cur.rowcount
        users = [str(r[0]) for r in await _all(conn, PURGEABLE_FACT_USERS, rule)]
        if not users:
            continue
        async with conn.pipeline() as pipe:
            await conn.execute(LOCK_FACTS_VERSIONS, {"tenant": tenant, "users": users})
            purged = await conn.execute(PURGE_FACTS, rule)
            await pipe.sync()
            by_user = await purged.fetchall()
        reset = sorted(str(u) for u, _, old in by_user if old)
        for _, expired, old in by_user:
            facts += int(expired) + int(old)
            by_age += int(old)
        if reset:
            await conn.execute(RESET_FACTS_VERSIONS, {"tenant": tenant, "users": reset})
    counts = PurgeCounts(facts, messages, sessions, audits, tuple(touched), by_age)
    async with conn.pipeline():
        await _queue_audit(conn, [(replace(audit, detail=counts.audit_detail()), now_us)])
    return counts


async def user_row_counts(conn: Conn, tenant: str, user_id: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for table, sql in COUNT_ROWS.items():
        row = await _one(conn, sql, {"tenant": tenant, "user_id": user_id})
        out[table] = int(row[0]) if row else 0
    return out


async def analyze(conn: Conn) -> None:
    await conn.execute(ANALYZE)


async def orphan_postings(conn: Conn, tenant: str) -> int:
    row = await _one(conn, ORPHAN_POSTINGS, {"tenant": tenant})
    return int(row[0]) if row else 0


# -- the store -------------------------------------------------------------------------------
class PgStore:
    """`MemoryStore` on PostgreSQL, shared by every replica of the service."""

    backend = "postgresql"
    shared = True

    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    async def append_batch(self, requests: list[AppendRequest]) -> list[AppendResult]:
        return await self.db.write("append_batch", append_batch, requests)

    async def write_audit_batch(self, rows: list[tuple[AuditRecord, int]]) -> list[None]:
        return await self.db.write("audit_batch", write_audit_batch, rows)

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        return await self.db.read("get_session", get_session, tenant, session_id)

    async def session_tail(self, tenant: str, session_id: str) -> SessionTail | None:
        return await self.db.read("session_tail", session_tail, tenant, session_id)

    async def history_page(
        self, tenant: str, session_id: str, order: Order, boundary: int | None, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "history_page", history_page, tenant, session_id, order, boundary, limit
        )

    async def recent_messages(
        self, tenant: str, session_id: str, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read("recent_messages", recent_messages, tenant, session_id, limit)

    async def recent_of_session(
        self, tenant: str, session_id: str, limit: int
    ) -> tuple[Session | None, list[StoredMessage]]:
        return await self.db.read("recent_of_session", recent_of_session, tenant, session_id, limit)

    async def remember_facts(
        self,
        tenant: str,
        user_id: str,
        facts: Sequence[NewFact],
        now_us: int,
        audit: AuditRecord,
    ) -> tuple[list[Remembered], InsertedFacts] | None:
        return await self.db.write(
            "remember_facts", remember_facts, tenant, user_id, facts, now_us, audit
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
            "insert_facts", insert_facts, tenant, user_id, rows, now_us, created_us
        )

    async def insert_fact_tables(self, facts: pa.Table, postings: pa.Table) -> InsertedFacts:
        return await self.db.write("insert_facts", insert_fact_tables, facts, postings)

    async def load_recall_index(
        self, tenant: str, user_id: str, after_fact_no: int = 0
    ) -> IndexSnapshot:
        name = "recall_index_delta" if after_fact_no else "recall_index_load"
        return await self.db.snapshot(name, load_recall_index, tenant, user_id, after_fact_no)

    async def facts_version(self, tenant: str, user_id: str) -> FactsVersion:
        return await self.db.read("facts_version", facts_version, tenant, user_id)

    async def facts_by_no(
        self, tenant: str, user_id: str, fact_nos: Sequence[int]
    ) -> dict[int, Fact]:
        return await self.db.read("recall_indexed", facts_by_no, tenant, user_id, fact_nos)

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
            "recall_facts", recall_facts, tenant, user_id, query, flt, k, now_us, weights
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
            forget_facts,
            tenant,
            user_id,
            fact_ids,
            flt,
            forget_all,
            now_us,
            audit,
        )

    async def get_consent(self, tenant: str, user_id: str) -> Consent:
        return await self.db.read("get_consent", get_consent, tenant, user_id)

    async def set_consent(
        self,
        tenant: str,
        user_id: str,
        long_term_memory: bool,
        now_us: int,
        audit: AuditRecord,
        fact_extraction: bool = False,
    ) -> tuple[Consent, int]:
        return await self.db.write(
            "set_consent",
            set_consent,
            tenant,
            user_id,
            long_term_memory,
            now_us,
            audit,
            fact_extraction,
        )

    async def export_facts(self, tenant: str, user_id: str, after: str, limit: int) -> list[Fact]:
        return await self.db.read("export_facts", export_facts, tenant, user_id, after, limit)

    async def export_messages(
        self, tenant: str, user_id: str, after: tuple[str, int], limit: int
    ) -> list[StoredMessage]:
        return await self.db.read("export_messages", export_messages, tenant, user_id, after, limit)

    async def export_audit(
        self, tenant: str, user_id: str, after: tuple[int, str], limit: int
    ) -> list[AuditEntry]:
        return await self.db.read("export_audit", export_audit, tenant, user_id, after, limit)

    async def erase_user(
        self, tenant: str, user_id: str, now_us: int, audit: AuditRecord
    ) -> ErasureCounts:
        return await self.db.write("erase_user", erase_user, tenant, user_id, now_us, audit)

    async def retention_tenants(self) -> list[str]:
        return await self.db.read("retention_tenants", retention_tenants)

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
            write_extraction,
            tenant,
            user_id,
            facts,
            supersedes,
            message_ids,
            now_us,
            audit,
        )

    async def extraction_allowed(self, tenant: str, user_id: str) -> bool:
        return await self.db.read("extraction_allowed", extraction_allowed, tenant, user_id)

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
            list_facts,
            tenant,
            user_id,
            kinds,
            include_history,
            after,
            limit,
            now_us,
        )

    async def extraction_counts(self, tenant: str, user_id: str, now_us: int) -> ExtractionCounts:
        return await self.db.read("extraction_counts", extraction_counts, tenant, user_id, now_us)

    async def unextracted_messages(
        self, tenant: str, before_us: int, after_us: int | None, limit: int
    ) -> list[StoredMessage]:
        return await self.db.read(
            "unextracted_messages", unextracted_messages, tenant, before_us, after_us, limit
        )

    async def facts_to_embed(self, tenant: str, model: str, limit: int) -> list[ToEmbed]:
        return await self.db.read("facts_to_embed", facts_to_embed, tenant, model, limit)

    async def facts_to_reindex(self, tenant: str, version: int, limit: int) -> list[ToEmbed]:
        return await self.db.read("facts_to_reindex", facts_to_reindex, tenant, version, limit)

    async def reindex_facts(self, tenant: str, rows: Sequence[ToEmbed]) -> int:
        return await self.db.write("reindex_facts", reindex_facts, tenant, rows)

    async def count_to_embed(self, tenant: str, model: str) -> int:
        return await self.db.read("count_to_embed", count_to_embed, tenant, model)

    async def set_embeddings(
        self, tenant: str, model: str, rows: Sequence[ToEmbed], vectors: np.ndarray
    ) -> int:
        return await self.db.write("set_embeddings", set_embeddings, tenant, model, rows, vectors)

    async def purge(
        self, tenants: RetentionPolicies, now_us: int, audit: AuditRecord
    ) -> PurgeCounts:
        return await self.db.write("purge", purge, tenants, now_us, audit)

    async def user_row_counts(self, tenant: str, user_id: str) -> dict[str, int]:
        return await self.db.read("user_row_counts", user_row_counts, tenant, user_id)

    async def orphan_postings(self, tenant: str) -> int:
        return await self.db.read("orphan_postings", orphan_postings, tenant)

    async def analyze(self) -> None:
        await self.db.read("analyze", analyze)


__all__ = ["CROSS_TENANT", "STATEMENTS", "PgStore"]
