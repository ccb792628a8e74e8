-- Memory service schema. Every row carries its tenant; user_id partitions inside a tenant.
-- Times are TIMESTAMP (UTC). No PRIMARY KEY/UNIQUE constraints: the single writer thread
-- (libs.common.duck group committer) enforces uniqueness in services/memory/storage.py,
-- and DuckDB's over-eager index checks would fail delete+insert of one key in a batch.

CREATE SEQUENCE session_no_seq START 1;
CREATE SEQUENCE fact_no_seq START 1;

-- One row per conversation; last_seq makes per-session sequence numbers gap-free.
CREATE TABLE sessions (
    sess_no     BIGINT    NOT NULL,   -- internal join key
    tenant      VARCHAR   NOT NULL,
    session_id  VARCHAR   NOT NULL,
    user_id     VARCHAR   NOT NULL,
    last_seq    BIGINT    NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);

CREATE TABLE messages (
    sess_no            BIGINT    NOT NULL,
    seq                BIGINT    NOT NULL,
    tenant             VARCHAR   NOT NULL,
    session_id         VARCHAR   NOT NULL,
    user_id            VARCHAR   NOT NULL,
    message_id         VARCHAR   NOT NULL,
    role               VARCHAR   NOT NULL,
    content            VARCHAR   NOT NULL,
    client_message_id  VARCHAR,
    metadata           VARCHAR   NOT NULL,   -- JSON object of strings
    created_at         TIMESTAMP NOT NULL
);

CREATE TABLE facts (
    fact_no            BIGINT    NOT NULL,   -- internal join key of the term index
    tenant             VARCHAR   NOT NULL,
    user_id            VARCHAR   NOT NULL,
    fact_id            VARCHAR   NOT NULL,
    text               VARCHAR   NOT NULL,
    text_hash          VARCHAR   NOT NULL,   -- sha256 of the normalised text (dedup)
    kind               VARCHAR   NOT NULL,
    importance         DOUBLE    NOT NULL,
    tags               VARCHAR[] NOT NULL,
    source_session_id  VARCHAR,
    doc_len            INTEGER   NOT NULL,   -- BM25 document length (terms)
    created_at         TIMESTAMP NOT NULL,
    expires_at         TIMESTAMP
);

-- The BM25 term index: one posting per (fact, distinct term). term_key is a 64-bit hash of
-- (tenant, user_id, term), so a query's postings are found by one integer filter.
CREATE TABLE fact_terms (
    term_key  BIGINT  NOT NULL,
    fact_no   BIGINT  NOT NULL,
    tf        INTEGER NOT NULL
);

CREATE TABLE consent (
    tenant            VARCHAR   NOT NULL,
    user_id           VARCHAR   NOT NULL,
    long_term_memory  BOOLEAN   NOT NULL,
    updated_at        TIMESTAMP NOT NULL,
    updated_by        VARCHAR   NOT NULL
);

-- Who read or wrote whose personal data. Ids and counts only, never content.
CREATE TABLE audit_log (
    audit_id    VARCHAR   NOT NULL,
    logged_at   TIMESTAMP NOT NULL,
    tenant      VARCHAR   NOT NULL,
    caller      VARCHAR   NOT NULL,
    key_id      VARCHAR   NOT NULL,
    rpc         VARCHAR   NOT NULL,
    user_id     VARCHAR,
    session_id  VARCHAR,
    target_ids  VARCHAR[] NOT NULL,
    outcome     VARCHAR   NOT NULL,
    detail      VARCHAR   NOT NULL    -- JSON
);
