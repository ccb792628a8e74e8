-- 1. Facts screened as possible instructions (libs/common/untrusted.py `screen`): the
--    signal names it raised, empty when the fact looks like data. Rows stored before this
--    migration are unflagged here; BuildContext screens recalled facts again anyway.
--    DuckDB does not alter a table an index depends on: 003's index is dropped around it.
DROP INDEX facts_fact_no;
ALTER TABLE facts ADD COLUMN injection_signals VARCHAR[] NOT NULL DEFAULT [];
CREATE INDEX facts_fact_no ON facts (fact_no);

-- 2. A message's cost as BuildContext now renders it (user and stored system turns fenced
--    as data, services/memory/context_builder.py `render_turn`). A new column rather than a
--    rewrite of `tokens` (003), which holds the cost of the old, unfenced shape: rows
--    written before this migration have NULL here and are counted when read.
ALTER TABLE messages ADD COLUMN context_tokens INTEGER;
