-- Daily price bars, per tenant. Prices are exact decimals with 6 places: the sample data
-- has adjusted closes as small as 0.144 (3 decimals) and OHLCV files with 6 decimals;
-- DECIMAL(18,6) holds up to 999,999,999,999.999999 exactly (stored as a 64-bit integer).
-- Shared reference data (the sample data) lives under the reserved tenant '__shared__'.
CREATE TABLE bars (
    tenant    VARCHAR       NOT NULL,
    symbol    VARCHAR       NOT NULL,
    ts        DATE          NOT NULL,  -- the trading day of a daily bar
    open      DECIMAL(18,6) NOT NULL,
    high      DECIMAL(18,6) NOT NULL,
    low       DECIMAL(18,6) NOT NULL,
    close     DECIMAL(18,6) NOT NULL,
    adj_close DECIMAL(18,6) NOT NULL,
    volume    BIGINT        NOT NULL,
    PRIMARY KEY (tenant, symbol, ts)
);

-- One row: bumped in the same transaction as every change to `bars`, so a cached result
-- keyed by the version can never outlive the data it was computed from.
CREATE TABLE data_version (
    id      INTEGER PRIMARY KEY,
    version BIGINT  NOT NULL
);
INSERT INTO data_version VALUES (1, 0);
