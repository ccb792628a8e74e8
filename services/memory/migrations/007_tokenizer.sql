-- The tokenizer version each fact's postings and doc_len were made with
-- (services/memory/recall.py TOKENIZER_VERSION). NULL = version 1 (no stemming); the
-- background re-index brings such facts to the current version.
DROP INDEX facts_fact_no;
ALTER TABLE facts ADD COLUMN tokenizer INTEGER;
CREATE INDEX facts_fact_no ON facts (fact_no);
