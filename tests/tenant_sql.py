"""Does a SQL statement keep to one tenant? The checker behind the distribution-ready tests.

A Citus-style distributed PostgreSQL shards every table by `tenant`: a statement that
names a sharded table without pinning its tenant fans out to every node (slow) or, worse,
reads across tenants. The rule checked here, on PostgreSQL's own parser (pglast):

- every reference to a table of the schema in a SELECT / UPDATE / DELETE (at any depth:
  CTEs, sub-queries, joins) is constrained by a comparison on that reference's `tenant`
  column (`t.tenant = $1`, `t.tenant = ANY($1)`, `t.tenant IN (...)`, or
  `t.tenant = other.tenant` for a join between references that are themselves pinned);
- every INSERT names the `tenant` column, and an `ON CONFLICT` target leads with it.

The checker is deliberately syntactic and conservative: it cannot prove that a parameter
holds the caller's tenant (the storage code's tests do that); it proves that no statement
forgets the tenant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind

_PLACEHOLDER = re.compile(r"%\((\w+)\)[sbt]|%s|%b|%t")


def to_native_params(sql: str) -> str:
    """psycopg's `%s` / `%(name)s` placeholders as `$n`, which PostgreSQL's parser reads."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql.replace("%%", "%"))


@dataclass(frozen=True)
class Violation:
    sql: str
    problem: str

    def __str__(self) -> str:
        short = " ".join(self.sql.split())[:160]
        return f"{self.problem}: {short}"


def _nodes(node: Any) -> Iterator[Any]:
    """Every AST node under `node` (depth first), itself included."""
    if isinstance(node, ast.Node):
        yield node
        for name in node:
            yield from _nodes(getattr(node, name))
    elif isinstance(node, tuple | list):
        for item in node:
            yield from _nodes(item)


def _column(node: Any) -> tuple[str, ...] | None:
    if isinstance(node, ast.ColumnRef):
        parts: list[str] = []
        fields: Any = node.fields
        for f in fields:
            if not isinstance(f, ast.String):
                return None
            parts.append(str(f.sval))
        return tuple(parts)
    if isinstance(node, ast.TypeCast):
        return _column(node.arg)
    return None


def _tenant_comparisons(stmt: Any) -> tuple[set[str | None], list[tuple[str | None, str | None]]]:
    """(qualifiers constrained by a value, pairs of qualifiers compared with each other) for
    every `<q>.tenant` comparison in the statement; None is an unqualified `tenant`."""
    by_value: set[str | None] = set()
    pairs: list[tuple[str | None, str | None]] = []
    for node in _nodes(stmt):
        if isinstance(node, ast.A_Expr) and node.kind in (
            A_Expr_Kind.AEXPR_OP,
            A_Expr_Kind.AEXPR_OP_ANY,
            A_Expr_Kind.AEXPR_IN,
        ):
            name = node.name[-1].sval if node.name else ""
            if name != "=":
                continue
            left, right = _column(node.lexpr), _column(node.rexpr)
            sides = [c for c in (left, right) if c is not None and c[-1] == "tenant"]
            if len(sides) == 2:
                pairs.append((_qualifier(sides[0]), _qualifier(sides[1])))
            elif len(sides) == 1:
                by_value.add(_qualifier(sides[0]))
        elif isinstance(node, ast.JoinExpr) and node.usingClause:
            names = [u.sval for u in node.usingClause if isinstance(u, ast.String)]
            if "tenant" in names:
                pairs.append((_alias_of(node.larg), _alias_of(node.rarg)))
    return by_value, pairs


def _qualifier(col: tuple[str, ...]) -> str | None:
    return col[-2] if len(col) >= 2 else None


def _alias_of(node: Any) -> str | None:
    if isinstance(node, ast.RangeVar):
        return node.alias.aliasname if node.alias else node.relname
    if isinstance(node, ast.RangeSubselect) and node.alias:
        return str(node.alias.aliasname)
    return None


def _relations(
    stmt: Any, tables: set[str], skip: frozenset[int] | set[int] = frozenset()
) -> list[tuple[str, str | None]]:
    """(table, name it is referred to by) of every schema table the statement reads."""
    out = []
    ctes = {c.ctename for c in _nodes(stmt) if isinstance(c, ast.CommonTableExpr)}
    for node in _nodes(stmt):
        if isinstance(node, ast.RangeVar) and node.relname in tables and id(node) not in skip:
            if node.relname in ctes and node.schemaname is None:
                continue
            out.append((node.relname, node.alias.aliasname if node.alias else node.relname))
    return out


def _derived_sources(stmt: Any) -> set[str | None]:
    out: set[str | None] = set()
    for node in _nodes(stmt):
        if isinstance(node, ast.CommonTableExpr):
            out.add(node.ctename)
        elif isinstance(node, ast.RangeFunction | ast.RangeSubselect) and node.alias:
            out.add(node.alias.aliasname)
    return out


def check_statement(sql: str, tables: Iterable[str]) -> list[Violation]:
    """Violations of the tenant rule in `sql` (psycopg placeholders allowed), for the
    sharded `tables`."""
    known = set(tables)
    out: list[Violation] = []
    for raw in parse_sql(to_native_params(sql)):
        stmt: Any = raw.stmt
        inserts: list[Any] = [n for n in _nodes(stmt) if isinstance(n, ast.InsertStmt)]
        for insert in inserts:  # at any depth: a CTE may insert too
            target = insert.relation.relname
            if target not in known:
                continue
            cols = [c.name for c in insert.cols or ()]
            if "tenant" not in cols:
                out.append(Violation(sql, f"INSERT INTO {target} does not set tenant"))
            conflict = insert.onConflictClause
            elems = conflict.infer.indexElems if conflict and conflict.infer else None
            if elems and elems[0].name != "tenant":
                out.append(
                    Violation(sql, f"ON CONFLICT target on {target} does not lead with tenant")
                )
        # An INSERT's target is checked above (its rows carry the tenant they set, its
        # ON CONFLICT updates only the conflicting row); what it reads is checked below.
        targets = {id(insert.relation) for insert in inserts}
        relations = _relations(stmt, known, skip=targets)
        if not relations:
            continue
        by_value, pairs = _tenant_comparisons(stmt)
        # Rows that do not come from a sharded table (parameter arrays through unnest, CTEs
        # and sub-queries, whose own table references are checked where they appear) pin
        # whatever is joined to them on tenant.
        pinned = set(by_value) | _derived_sources(stmt)
        changed = True
        while changed:  # a join on tenant to a pinned reference pins the other side
            changed = False
            for a, b in pairs:
                if a in pinned and b not in pinned:
                    pinned.add(b)
                    changed = True
                elif b in pinned and a not in pinned:
                    pinned.add(a)
                    changed = True
        single = len({name for _, name in relations}) == 1
        for table, name in relations:
            if name in pinned or (single and None in pinned):
                continue
            out.append(Violation(sql, f"{table} (as {name}) is read without a tenant filter"))
    return out
