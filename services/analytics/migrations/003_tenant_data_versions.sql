-- One data version per tenant instead of one global row: an ingest moves only its own
-- tenant's version (and cache); a caller sees version(own) + version('__shared__').
-- The shared row starts at the old global version and every other tenant at 0, so each
-- caller's version starts exactly where the global one was: no version a client has
-- already seen goes backwards, and cached results keyed by it stay right.
CREATE TABLE data_versions (
    tenant  VARCHAR PRIMARY KEY,
    version BIGINT  NOT NULL
);
INSERT INTO data_versions SELECT '__shared__', version FROM data_version WHERE id = 1;
DROP TABLE data_version;
