-- Facts from conversations: origin, source messages and supersession (see DuckDB 006).
-- Nullable columns without defaults: no table rewrite.
ALTER TABLE facts ADD COLUMN valid_to timestamptz;
ALTER TABLE facts ADD COLUMN superseded_by text COLLATE "C";
ALTER TABLE facts ADD COLUMN origin text COLLATE "C";
ALTER TABLE facts ADD COLUMN source_message_ids text[];

ALTER TABLE consent ADD COLUMN fact_extraction boolean NOT NULL DEFAULT false;

CREATE TABLE extracted_messages (
    tenant        text COLLATE "C" NOT NULL,
    user_id       text COLLATE "C" NOT NULL,
    message_id    text COLLATE "C" NOT NULL,
    processed_at  timestamptz      NOT NULL,
    PRIMARY KEY (tenant, user_id, message_id)
);
