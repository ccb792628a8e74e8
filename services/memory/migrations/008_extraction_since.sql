-- When the user's current opt-in to fact extraction began: the catch-up pass mines only
-- turns stored since then (turns from before a user opted in are never extracted), and
-- GetExtractionStatus counts only those as pending. NULL while extraction is off. Rows
-- opted in before this migration: their last consent change is the best date known.
ALTER TABLE consent ADD COLUMN extraction_since TIMESTAMP;
UPDATE consent SET extraction_since = updated_at WHERE fact_extraction;
