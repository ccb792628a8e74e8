"""The tenant-rule checker (tests/tenant_sql.py) itself: it must catch what it claims to."""

from __future__ import annotations

import pytest

from tests.tenant_sql import check_statement

TABLES = {"sessions", "messages", "facts"}

GOOD = [
    "SELECT * FROM sessions WHERE tenant = %s AND session_id = %s",
    "SELECT m.seq FROM messages m JOIN sessions s ON s.tenant = m.tenant AND s.sess_no = m.sess_no "
    "WHERE s.tenant = %(tenant)s",
    "SELECT * FROM facts f WHERE f.tenant = ANY(%s)",
    "WITH w AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS u(tenant, id)) "
    "SELECT s.* FROM sessions s JOIN w ON s.tenant = w.tenant AND s.session_id = w.id",
    "UPDATE sessions SET last_seq = u.seq FROM unnest(%s::text[], %s::bigint[]) AS u(tenant, seq) "
    "WHERE sessions.tenant = u.tenant",
    "DELETE FROM facts WHERE tenant = %s AND user_id = %s",
    "INSERT INTO sessions (tenant, session_id) VALUES (%s, %s) "
    "ON CONFLICT (tenant, session_id) DO NOTHING",
    "INSERT INTO messages (tenant, seq) SELECT tenant, seq FROM sessions WHERE tenant = %s",
    "SELECT count(*) FROM messages m WHERE m.tenant = %s AND EXISTS "
    "(SELECT 1 FROM facts f WHERE f.tenant = m.tenant)",
    "SELECT * FROM messages JOIN sessions USING (tenant, sess_no) WHERE sessions.tenant = %s",
    "INSERT INTO sessions AS x (tenant, session_id) SELECT tenant, id FROM facts "
    "WHERE tenant = %s ON CONFLICT (tenant, session_id) DO UPDATE SET n = x.n + 1",
    "WITH c AS (SELECT * FROM facts WHERE tenant = %(t)s), ins AS (INSERT INTO sessions AS x "
    "(tenant, session_id) SELECT %(t)s, c.id FROM c RETURNING x.session_id) SELECT * FROM ins",
]

BAD = [
    ("SELECT * FROM sessions WHERE session_id = %s", "sessions (as sessions) is read without"),
    (
        "SELECT * FROM messages m JOIN sessions s ON s.sess_no = m.sess_no WHERE s.tenant = %s",
        "messages (as m)",
    ),
    ("DELETE FROM facts WHERE fact_no = ANY(%s)", "facts (as facts)"),
    ("UPDATE sessions SET last_seq = 1 WHERE session_id = %s", "sessions"),
    ("INSERT INTO sessions (session_id) VALUES (%s)", "does not set tenant"),
    (
        "INSERT INTO sessions (tenant, session_id) VALUES (%s, %s) ON CONFLICT (session_id) DO NOTHING",
        "does not lead with tenant",
    ),
    (
        "WITH x AS (SELECT * FROM facts WHERE kind = %s) SELECT * FROM x",
        "facts (as facts)",
    ),
    ("SELECT * FROM sessions s WHERE s.tenant <> ''", "sessions (as s)"),
    (
        "WITH ins AS (INSERT INTO sessions (session_id) VALUES (%s) RETURNING 1) SELECT * FROM ins",
        "does not set tenant",
    ),
    (
        "INSERT INTO sessions AS x (tenant, session_id) SELECT tenant, id FROM facts",
        "facts (as facts)",
    ),
]


@pytest.mark.parametrize("sql", GOOD)
def test_statements_that_pin_the_tenant_pass(sql: str) -> None:
    assert check_statement(sql, TABLES) == []


@pytest.mark.parametrize(("sql", "problem"), BAD)
def test_statements_that_forget_the_tenant_are_caught(sql: str, problem: str) -> None:
    found = check_statement(sql, TABLES)
    assert found and problem in str(found[0])


def test_a_table_outside_the_sharded_set_is_not_checked() -> None:
    assert check_statement("SELECT * FROM pg_class WHERE relname = %s", TABLES) == []
