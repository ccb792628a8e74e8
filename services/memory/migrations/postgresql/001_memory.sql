-- Memory service schema on PostgreSQL (services/memory/storage_pg.py), distribution-ready:
-- a Citus-style cluster shards every table by tenant, so every table carries `tenant`,
-- every primary key and unique index leads with it, and every statement filters by it
-- (checked by tests/memory/test_pg_schema.py). Ids compare byte-wise (COLLATE "C"), as
-- in DuckDB: recall ties, export pages and history order must not depend on a locale.
-- Times are timestamptz (microseconds); the service converts to and from epoch µs exactly.

-- Tenants seen by any write (every write writes an audit row, which registers its tenant):
-- what the retention purge iterates, instead of scanning the big tables. A reference
-- table under Citus.
CREATE TABLE memory_tenants (
    tenant      text COLLATE "C" NOT NULL,
    first_seen  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant)
);

-- A session's incarnation: a session erased and created again under the same id gets a
-- new number, so no cached window of the old one is taken for the new one. Only unique,
-- never compared for order.
CREATE SEQUENCE session_no_seq;

-- One row per conversation. `last_seq` makes sequences gap-free: appends lock the row
-- (INSERT ... ON CONFLICT DO UPDATE, in key order) and number after the locked value.
CREATE TABLE sessions (
    tenant      text COLLATE "C" NOT NULL,
    session_id  text COLLATE "C" NOT NULL,
    sess_no     bigint           NOT NULL DEFAULT nextval('session_no_seq'),
    user_id     text COLLATE "C" NOT NULL,
    last_seq    bigint           NOT NULL,
    created_at  timestamptz      NOT NULL,
    updated_at  timestamptz      NOT NULL,
    PRIMARY KEY (tenant, session_id)
);
CREATE INDEX sessions_user ON sessions (tenant, user_id, session_id);
CREATE INDEX sessions_updated ON sessions (tenant, updated_at);

CREATE TABLE messages (
    tenant             text COLLATE "C" NOT NULL,
    session_id         text COLLATE "C" NOT NULL,
    seq                bigint           NOT NULL,
    user_id            text COLLATE "C" NOT NULL,
    message_id         text COLLATE "C" NOT NULL,
    role               text             NOT NULL,
    content            text             NOT NULL,
    client_message_id  text COLLATE "C",
    metadata           jsonb            NOT NULL,   -- object of strings
    created_at         timestamptz      NOT NULL,
    tokens             integer,                     -- cost as a context turn (see DuckDB 003)
    PRIMARY KEY (tenant, session_id, seq)
);
-- Idempotency: one message per client message id and session, whatever the replica.
CREATE UNIQUE INDEX messages_client_id ON messages (tenant, session_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
CREATE INDEX messages_user ON messages (tenant, user_id, session_id, seq);  -- export, erasure
CREATE INDEX messages_created ON messages (tenant, created_at);               -- retention

-- Per user: the facts version the recall index of every replica checks (one primary-key
-- read per Recall), and the counter fact numbers are drawn from. `version` moves with
-- every transaction that changes the user's facts, `reset_version` with those that delete
-- live facts; fact numbers are allocated under this row's lock, so they rise in commit
-- order and "facts added since" is "fact_no above the highest one an index holds".
-- Kept after an erasure (ids and counters, no content): a new row would restart the
-- version and make another replica's cached index look current.
CREATE TABLE fact_versions (
    tenant         text COLLATE "C" NOT NULL,
    user_id        text COLLATE "C" NOT NULL,
    version        bigint           NOT NULL,
    reset_version  bigint           NOT NULL,
    next_fact_no   bigint           NOT NULL,
    PRIMARY KEY (tenant, user_id)
);

CREATE TABLE facts (
    tenant             text COLLATE "C" NOT NULL,
    user_id            text COLLATE "C" NOT NULL,
    fact_no            bigint           NOT NULL,   -- per user, from fact_versions
    fact_id            text COLLATE "C" NOT NULL,
    text               text             NOT NULL,
    text_hash          text COLLATE "C" NOT NULL,   -- sha256 of the normalised text (dedup)
    kind               text COLLATE "C" NOT NULL,
    importance         double precision NOT NULL,
    tags               text[]           NOT NULL,
    source_session_id  text COLLATE "C",
    doc_len            integer          NOT NULL,   -- BM25 document length (terms)
    created_at         timestamptz      NOT NULL,
    expires_at         timestamptz,
    PRIMARY KEY (tenant, user_id, fact_no)
);
CREATE UNIQUE INDEX facts_fact_id ON facts (tenant, user_id, fact_id);
CREATE UNIQUE INDEX facts_text ON facts (tenant, user_id, text_hash);
CREATE INDEX facts_expiry ON facts (tenant, expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX facts_created ON facts (tenant, created_at);

-- The BM25 term index: one posting per (fact, distinct term); term_key is a 64-bit hash of
-- (tenant, user_id, term). Keyed by user so a query's postings are one index range.
CREATE TABLE fact_terms (
    tenant    text COLLATE "C" NOT NULL,
    user_id   text COLLATE "C" NOT NULL,
    term_key  bigint           NOT NULL,
    fact_no   bigint           NOT NULL,
    tf        integer          NOT NULL,
    PRIMARY KEY (tenant, user_id, term_key, fact_no)
);
CREATE INDEX fact_terms_fact ON fact_terms (tenant, user_id, fact_no);

CREATE TABLE consent (
    tenant            text COLLATE "C" NOT NULL,
    user_id           text COLLATE "C" NOT NULL,
    long_term_memory  boolean          NOT NULL,
    updated_at        timestamptz      NOT NULL,
    updated_by        text             NOT NULL,
    PRIMARY KEY (tenant, user_id)
);

-- Who read or wrote whose personal data. Ids and counts only, never content.
CREATE TABLE audit_log (
    tenant      text COLLATE "C" NOT NULL,
    audit_id    text COLLATE "C" NOT NULL,
    logged_at   timestamptz      NOT NULL,
    caller      text             NOT NULL,
    key_id      text             NOT NULL,
    rpc         text             NOT NULL,
    user_id     text COLLATE "C",
    session_id  text COLLATE "C",
    target_ids  text[]           NOT NULL,
    outcome     text             NOT NULL,
    detail      jsonb            NOT NULL,
    PRIMARY KEY (tenant, audit_id)
);
CREATE INDEX audit_log_user ON audit_log (tenant, user_id, logged_at, audit_id);
CREATE INDEX audit_log_logged ON audit_log (tenant, logged_at);
