-- The tokenizer version of each fact's postings (see DuckDB 007). NULL = version 1.
ALTER TABLE facts ADD COLUMN tokenizer smallint;
