-- Facts from conversations (services/memory/extraction.py): where a fact came from, and
-- its supersession. A superseded fact keeps its row (history) with `valid_to` and the id of
-- the fact that replaced it; Recall and BuildContext read current facts only
-- (`valid_to IS NULL`). Rows stored before this migration are current and remembered.
-- DuckDB does not alter a table an index depends on: 003's index is dropped around it.
DROP INDEX facts_fact_no;
ALTER TABLE facts ADD COLUMN valid_to TIMESTAMP;
ALTER TABLE facts ADD COLUMN superseded_by VARCHAR;
ALTER TABLE facts ADD COLUMN origin VARCHAR;
ALTER TABLE facts ADD COLUMN source_message_ids VARCHAR[];
CREATE INDEX facts_fact_no ON facts (fact_no);

ALTER TABLE consent ADD COLUMN fact_extraction BOOLEAN NOT NULL DEFAULT false;

-- Messages the extractor has handled (one row per message): a retry of the same message
-- never proposes its facts twice.
CREATE TABLE extracted_messages (
    tenant        VARCHAR   NOT NULL,
    user_id       VARCHAR   NOT NULL,
    message_id    VARCHAR   NOT NULL,
    processed_at  TIMESTAMP NOT NULL
);
