"""Distribution-ready PostgreSQL schema (issue 12, docs/architecture.md "Scale beyond one
machine"): past one primary the answer is a distributed PostgreSQL (Citus or a managed
equivalent) sharded by tenant. That only works if

1. every table carries `tenant` (NOT NULL), and every primary key and unique index leads
   with it (a distributed unique constraint must include the distribution column);
2. every statement filters by tenant (else it fans out to every node, or reads across
   tenants): checked on PostgreSQL's own parser by tests/tenant_sql.py, over the
   statement catalogue, which is every SQL text in the service's PostgreSQL storage
   module (its string constants, composed or not);
3. no statement is built at run time from pieces the checker cannot see.

The schema comes from applying the service's real migrations to a fresh database.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import psycopg
import pytest
from pglast import parse_sql
from pglast.parser import ParseError

from libs.common.pg import MIGRATIONS_TABLE, PgDatabase
from tests.tenant_sql import check_statement, to_native_params

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {
    "memory": ("services.memory.storage_pg", ROOT / "services/memory/migrations/postgresql"),
    "analytics": (
        "services.analytics.storage_pg",
        ROOT / "services/analytics/migrations/postgresql",
    ),
}
# Bookkeeping of the migration runner: one row per applied migration, not tenant data.
NOT_SHARDED = {MIGRATIONS_TABLE}
# Small tables a distributed PostgreSQL keeps whole on every node (Citus reference
# tables): reading them without a tenant filter does not fan out. They still carry the
# tenant and are keyed by it.
REFERENCE_TABLES = {"memory_tenants"}
_DML = ("select", "insert", "update", "delete", "with", "copy")


async def _schema(url: str, service: str) -> dict[str, list[str]]:
    db = PgDatabase(url, name=service, migrations_dir=SERVICES[service][1])
    await db.open()
    await db.close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ).fetchall()
    tables: dict[str, list[str]] = {}
    for table, column, nullable in rows:
        tables.setdefault(table, []).append(column if nullable == "NO" else f"{column}?")
    return tables


def _unique_keys(url: str) -> list[tuple[str, str, list[str]]]:
    """(table, index, columns in order) of every primary key and unique index."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT t.relname, i.relname,
                   array_agg(a.attname ORDER BY k.ord)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
            LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
            WHERE n.nspname = current_schema() AND (x.indisprimary OR x.indisunique)
            GROUP BY t.relname, i.relname
            """
        ).fetchall()
    return [(t, i, [c if c is not None else "<expression>" for c in cols]) for t, i, cols in rows]


def catalogue(module_name: str) -> list[str]:
    """Every SQL text the module holds once imported: its module-level strings (also inside
    dicts, tuples and lists, and f-strings composed of constants at import) that parse as
    a DML statement."""
    module = importlib.import_module(module_name)
    found: list[str] = []

    def visit(value: object, depth: int = 0) -> None:
        if isinstance(value, str):
            text = value.strip()
            if text.lower().startswith(_DML) and _parses(text):
                found.append(text)
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                visit(item, depth + 1)
        elif isinstance(value, tuple | list | frozenset | set) and depth < 3:
            for item in value:
                visit(item, depth + 1)

    for name, value in vars(module).items():
        if not name.startswith("__"):
            visit(value)
    return found


def dynamic_sql(module_name: str) -> list[str]:
    """f-strings inside functions that look like SQL: statements assembled at run time,
    which the checker cannot see whole."""
    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    out = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if not isinstance(node, ast.JoinedStr):
                continue
            literal = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
            words = literal.lower().split()
            if words and words[0] in _DML and any(w in words for w in ("from", "into", "set")):
                out.append(f"line {node.lineno}: {' '.join(words)[:120]}")
    return out


def _parses(sql: str) -> bool:
    try:
        parse_sql(to_native_params(sql))
    except ParseError:
        return False
    return True


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_every_table_carries_the_tenant_and_every_key_leads_with_it(
    service: str, pg_url: str
) -> None:
    tables = await _schema(pg_url, service)
    sharded = {t: cols for t, cols in tables.items() if t not in NOT_SHARDED}
    assert sharded, "the migrations created no table"
    missing = [t for t, cols in sharded.items() if "tenant" not in cols]
    assert not missing, f"tables without a NOT NULL tenant column: {missing}"
    keys = [k for k in _unique_keys(pg_url) if k[0] in sharded]
    unkeyed = set(sharded) - {t for t, _, _ in keys}
    assert not unkeyed, f"tables without a primary key: {sorted(unkeyed)}"
    wrong = [(t, i, cols) for t, i, cols in keys if cols[0] != "tenant"]
    assert not wrong, f"primary keys / unique indexes not led by tenant: {wrong}"


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_every_statement_filters_by_tenant(service: str, pg_url: str) -> None:
    tables = set(await _schema(pg_url, service)) - NOT_SHARDED - REFERENCE_TABLES
    statements = catalogue(SERVICES[service][0])
    assert len(statements) >= 5, f"too few statements found in {SERVICES[service][0]}"
    violations = [str(v) for sql in statements for v in check_statement(sql, tables)]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_statement_is_assembled_at_run_time(service: str) -> None:
    found = dynamic_sql(SERVICES[service][0])
    assert not found, "SQL built with f-strings (use parameters or psycopg.sql):\n" + "\n".join(
        found
    )
