-- Baseline: the schema_migrations table itself is created by libs.common.duck.
SELECT 1;
