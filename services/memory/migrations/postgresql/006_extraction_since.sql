-- When the user's current opt-in to fact extraction began (see DuckDB 008): the catch-up
-- mines only turns stored since then. NULL while extraction is off; rows opted in before
-- this migration take their last consent change.
ALTER TABLE consent ADD COLUMN extraction_since timestamptz;
UPDATE consent SET extraction_since = updated_at WHERE fact_extraction;
