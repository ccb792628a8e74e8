-- 1. Facts screened as possible instructions (libs/common/untrusted.py `screen`): the
--    signal names it raised, empty when the fact looks like data. Existing rows default to
--    unflagged (a constant default: no table rewrite); BuildContext screens recalled facts
--    again anyway.
ALTER TABLE facts ADD COLUMN injection_signals text[] NOT NULL DEFAULT '{}';

-- 2. A message's cost as BuildContext now renders it (user and stored system turns fenced
--    as data, see DuckDB 004). `tokens` keeps the cost of the old, unfenced shape and is no
--    longer written; rows without `context_tokens` are counted when read.
ALTER TABLE messages ADD COLUMN context_tokens integer;
