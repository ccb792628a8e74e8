-- Vectors for semantic recall (services/memory/embedding.py): the fact's embedding and the
-- model that made it. Rows stored before this migration, and rows of an older model, have
-- another (or no) model here: the background re-embed catches them up, and until it does
-- they score 0 on the vector part (never a score from two models).
-- DuckDB does not alter a table an index depends on: 003's index is dropped around it.
DROP INDEX facts_fact_no;
ALTER TABLE facts ADD COLUMN embedding FLOAT[];
ALTER TABLE facts ADD COLUMN embedding_model VARCHAR;
CREATE INDEX facts_fact_no ON facts (fact_no);
