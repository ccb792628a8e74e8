-- The analytics store on PostgreSQL (services/analytics/storage_pg.py). Ready to be
-- distributed by tenant (Citus: create_distributed_table('<table>', 'tenant') for each,
-- colocated): every table carries `tenant`, every primary key leads with it, and every
-- statement filters by it. Text keys use the "C" collation: byte order, the order DuckDB
-- sorts in, and the cheapest comparisons for the indexes.

-- Daily price bars, exact decimals with 6 places (the DuckDB schema's DECIMAL(18,6):
-- up to 999,999,999,999.999999). Shared reference data lives under '__shared__'.
CREATE TABLE bars (
    tenant    TEXT COLLATE "C" NOT NULL,
    symbol    TEXT COLLATE "C" NOT NULL,
    ts        DATE             NOT NULL,  -- the trading day of a daily bar
    open      NUMERIC(18,6)    NOT NULL,
    high      NUMERIC(18,6)    NOT NULL,
    low       NUMERIC(18,6)    NOT NULL,
    close     NUMERIC(18,6)    NOT NULL,
    adj_close NUMERIC(18,6)    NOT NULL,
    volume    BIGINT           NOT NULL,
    PRIMARY KEY (tenant, symbol, ts)
);

-- One row per (tenant, symbol) with bars: the summary ListSymbols and symbol resolution
-- read, and the whole adjusted-close series packed for the metric reads (int4 days since
-- 1970-01-01 and int8 micro-units, big-endian, ascending by day; kept uncompressed out of
-- line so a read is a copy, not a decompression). Derived from `bars`, rewritten in the
-- same transaction as every change to them; the CHECK keeps the packing honest.
CREATE TABLE bar_series (
    tenant    TEXT COLLATE "C" NOT NULL,
    symbol    TEXT COLLATE "C" NOT NULL,
    first_day DATE             NOT NULL,
    last_day  DATE             NOT NULL,
    bar_count BIGINT           NOT NULL,
    days      BYTEA            NOT NULL,
    adj_close BYTEA            NOT NULL,
    PRIMARY KEY (tenant, symbol),
    CHECK (octet_length(days) = 4 * bar_count AND octet_length(adj_close) = 8 * bar_count)
);
ALTER TABLE bar_series ALTER COLUMN days SET STORAGE EXTERNAL;
ALTER TABLE bar_series ALTER COLUMN adj_close SET STORAGE EXTERNAL;

-- Per-tenant data version: bumped in the same transaction as any change to the tenant's
-- bars. The row is also the tenant's ingest lock (SELECT ... FOR UPDATE), which makes the
-- inserted/updated/unchanged counts exact with writers on several replicas.
CREATE TABLE data_versions (
    tenant  TEXT COLLATE "C" PRIMARY KEY,
    version BIGINT           NOT NULL
);
