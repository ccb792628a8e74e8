"""The memory service's PostgreSQL schema and statements are distribution-ready (Citus,
sharded by tenant), read from a real migrated database and from the statement catalogue:

- every table carries `tenant`, and every primary key and unique index leads with it;
- every statement of `storage_pg.STATEMENTS` pins its tenant (tests/tenant_sql.py), but the
  few listed in `CROSS_TENANT`, which must really be cross-tenant (the list stays minimal);
- every statement is valid against the schema (PostgreSQL prepares it, or runs it).
"""

from __future__ import annotations

import psycopg
import pytest

from libs.common.pg import MIGRATIONS_TABLE, PgDatabase
from services.memory import storage_pg
from services.memory.main import MIGRATIONS
from tests.tenant_sql import check_statement, to_native_params


@pytest.fixture
async def schema(pg_url: str) -> str:
    db = PgDatabase(pg_url, name="memory", migrations_dir=MIGRATIONS / "postgresql")
    await db.open()
    await db.close()
    return pg_url


def _tables(conn: psycopg.Connection) -> dict[str, list[str]]:
    rows = conn.execute(
        "SELECT c.relname, a.attname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public' "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relkind = 'r' ORDER BY c.relname, a.attnum"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    out.pop(MIGRATIONS_TABLE)  # the kit's bookkeeping, keyed by service
    return out


async def test_every_table_is_keyed_by_tenant(schema: str) -> None:
    with psycopg.connect(schema) as conn:
        tables = _tables(conn)
        keys = conn.execute(
            "SELECT t.relname, i.relname, a.attname, x.indisprimary FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public' "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0] "
            "WHERE x.indisunique"
        ).fetchall()
    assert set(tables) >= {"sessions", "messages", "facts", "fact_terms", "audit_log"}
    for table, columns in tables.items():
        assert "tenant" in columns, table
    leading = {(t, i): (col, primary) for t, i, col, primary in keys if t in tables}
    assert {t for (t, _), (_, primary) in leading.items() if primary} == set(tables)
    for (table, index), (column, _) in leading.items():
        assert column == "tenant", f"{index} on {table} leads with {column}"


async def test_every_statement_pins_its_tenant_and_is_valid(schema: str) -> None:
    with psycopg.connect(schema) as conn:
        tables = set(_tables(conn))
        for name, sql in storage_pg.STATEMENTS.items():
            violations = check_statement(sql, tables)
            if name in storage_pg.CROSS_TENANT:
                assert violations, f"{name} is listed as cross-tenant but pins its tenant"
            else:
                assert not violations, f"{name}: {violations[0]}"
            if sql.split()[0] == "ANALYZE":  # maintenance: not preparable, run it
                conn.execute(sql)
                continue
            conn.execute(f"PREPARE check_statement AS {to_native_params(sql)}".encode())
            conn.execute("DEALLOCATE check_statement")
    assert len(storage_pg.STATEMENTS) > 40  # the catalogue is the module's SQL, not a sample
