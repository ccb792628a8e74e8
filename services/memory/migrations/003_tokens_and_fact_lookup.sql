-- 1. Token cost of each message, counted once at append time (services/memory/
--    context_builder.py `turn_costs`: libs.common.tokens, DeepSeek tokenizer and chat
--    template, exactly as the gateway counts), so BuildContext fits a long session by adding
--    integers instead of re-tokenizing every turn on every call. NULL for rows written
--    before this migration: those are counted when read.
ALTER TABLE messages ADD COLUMN tokens INTEGER;

-- 2. Recall fetches its k winners by internal number (`fact_no IN (...)`, see
--    storage.facts_by_no). With this ART index DuckDB answers that with an index scan
--    (~2 ms at 1M facts) instead of a hash join over a whole row group (~13-20 ms).
--    Not UNIQUE on purpose (see 002): fact numbers come from a sequence and are never reused.
CREATE INDEX facts_fact_no ON facts (fact_no);
