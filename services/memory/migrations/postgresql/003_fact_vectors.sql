-- Vectors for semantic recall (services/memory/embedding.py): the fact's embedding and the
-- model that made it (see DuckDB 005). Nullable columns without defaults: no table rewrite.
-- The vector is raw little-endian float32 (bytea), which the recall index reads straight
-- into numpy: scoring happens in each replica's in-process index (exact). A pgvector column
-- with an HNSW index for users beyond the index's cap is a later step (docs/memory.md).
ALTER TABLE facts ADD COLUMN embedding bytea;
ALTER TABLE facts ADD COLUMN embedding_model text COLLATE "C";
-- The re-embed job's scan: facts not embedded by the current model.
CREATE INDEX facts_embedding_model ON facts (tenant, embedding_model);
