"""The DuckDB SQL of the memory service (the embedded store; `storage_pg` is the PostgreSQL
one, `store` the interface the domain uses). Synchronous functions taking a DuckDB cursor;
`store.DuckStore` runs them with `Database.read(name, fn, ...)` or, for writes,
`Database.write(name, fn, ...)` (inside one group-committed transaction, on the single
writer thread).

Write functions must be safe to re-run after a rollback (the group committer retries a
failed batch job by job), so they derive everything from the database state they read.
Because every write runs on the one writer thread, "read then insert" is race-free: two
concurrent appends with the same client message id are serialised, and the second sees
the first one's row even inside the same batch transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from services.memory import appends, recall
from services.memory.appends import new_id
from services.memory.models import (
    INDEX_FACTS_SCHEMA,
    INDEX_POSTINGS_SCHEMA,
    AppendRequest,
    AppendResult,
    AuditEntry,
    AuditRecord,
    Consent,
    ErasureCounts,
    Extracted,
    ExtractionCounts,
    Fact,
    FactFilter,
    FactsPageKey,
    InsertedFacts,
    NewFact,
    Order,
    PurgeCounts,
    RecallWeights,
    Remembered,
    ScoredFact,
    Session,
    SessionTail,
    StoredMessage,
    ToEmbed,
)
from services.memory.vectors import vector_column

Cursor = duckdb.DuckDBPyConnection
MAX_AUDIT_TARGETS = 100
_US_PER_DAY = 86_400 * 1_000_000


# -- audit ---------------------------------------------------------------------------------
def insert_audit(cur: Cursor, record: AuditRecord, at_us: int) -> str:
    audit_id = new_id("aud")
    cur.execute(
        "INSERT INTO audit_log VALUES (?, make_timestamp(?), ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            audit_id,
            at_us,
            record.tenant,
            record.caller,
            record.key_id,
            record.rpc,
            record.user_id,
            record.session_id,
            list(record.target_ids[:MAX_AUDIT_TARGETS]),
            record.outcome,
            json.dumps(record.detail, sort_keys=True, separators=(",", ":")),
        ],
    )
    return audit_id


# -- sessions and messages -----------------------------------------------------------------
_MESSAGE_COLUMNS = (
    "message_id, session_id, user_id, seq, role, content, client_message_id, "
    "metadata, epoch_us(created_at), context_tokens"
)


def _message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        message_id=row[0],
        session_id=row[1],
        user_id=row[2],
        sequence=int(row[3]),
        role=row[4],
        content=row[5],
        client_message_id=row[6],
        metadata=json.loads(row[7]),
        created_us=int(row[8]),
        tokens=None if row[9] is None else int(row[9]),
    )


def get_session(cur: Cursor, tenant: str, session_id: str) -> Session | None:
    row = cur.execute(
        "SELECT session_id, user_id, last_seq FROM sessions WHERE tenant = ? AND session_id = ?",
        [tenant, session_id],
    ).fetchone()
    return None if row is None else Session(row[0], row[1], int(row[2]))


def session_tail(cur: Cursor, tenant: str, session_id: str) -> SessionTail | None:
    """The session's owner, incarnation and retained sequences (see `SessionTail`)."""
    row = cur.execute(
        "SELECT s.user_id, s.sess_no, s.last_seq, "
        "(SELECT min(m.seq) FROM messages m WHERE m.sess_no = s.sess_no) "
        "FROM sessions s WHERE s.tenant = ? AND s.session_id = ?",
        [tenant, session_id],
    ).fetchone()
    if row is None:
        return None
    last = int(row[2])
    return SessionTail(row[0], int(row[1]), last + 1 if row[3] is None else int(row[3]), last)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# Set-based writes pass their rows as Arrow tables that DuckDB reads by *name* through its
# replacement scans (a local variable of the frame that calls `execute`): no register /
# unregister round trips (~0.3-0.5 ms each), any number of rows in one statement. Measured
# against the alternatives in DuckDB 2.0 (one INSERT of 1-640 rows, ms; noisy 2-core box):
#     VALUES (?, ...) list: 1.1 / 3.2 / 10.8 / 145      executemany: 1.7 / 15 / 68 / -
#     unnest(?) lists:      1.6 / 1.9 / 3.3 / 20        register + INSERT: 2.5 / 2.7 / 3.9 / 12
#     replacement scan:     1.7 / 1.8 / 2.3 / 5.7       (for 1 / 16 / 64 / 640 rows)
# Several statements then run in ONE `execute` (a ";"-separated script without
# parameters), so a whole append batch costs two calls into DuckDB plus BEGIN/COMMIT.
# The names below must never be those of real tables (the catalog would win).
def _audit_table(rows: Sequence[tuple[AuditRecord, int]]) -> pa.Table:
    return pa.table(
        {
            "audit_id": pa.array([new_id("aud") for _ in rows], pa.string()),
            "logged_at": pa.array([at for _, at in rows], pa.timestamp("us")),
            "tenant": pa.array([r.tenant for r, _ in rows], pa.string()),
            "caller": pa.array([r.caller for r, _ in rows], pa.string()),
            "key_id": pa.array([r.key_id for r, _ in rows], pa.string()),
            "rpc": pa.array([r.rpc for r, _ in rows], pa.string()),
            "user_id": pa.array([r.user_id for r, _ in rows], pa.string()),
            "session_id": pa.array([r.session_id for r, _ in rows], pa.string()),
            "target_ids": pa.array(
                [list(r.target_ids[:MAX_AUDIT_TARGETS]) for r, _ in rows], pa.list_(pa.string())
            ),
            "outcome": pa.array([r.outcome for r, _ in rows], pa.string()),
            "detail": pa.array([_json(r.detail) for r, _ in rows], pa.string()),
        }
    )


_INSERT_AUDIT = "INSERT INTO audit_log BY NAME SELECT * FROM arrow_new_audit"


def _run_script(
    cur: Cursor,
    sql: str,
    *,
    arrow_new_audit: pa.Table | None = None,
    arrow_new_messages: pa.Table | None = None,
    arrow_new_sessions: pa.Table | None = None,
    arrow_session_updates: pa.Table | None = None,
    arrow_lookup: pa.Table | None = None,
    arrow_lookup_ids: pa.Table | None = None,
    arrow_vectors: pa.Table | None = None,
    arrow_reindexed: pa.Table | None = None,
) -> None:
    """Run `sql` (statements separated by ";"). The keyword arguments are locals of this
    frame, which is where DuckDB's replacement scan finds the tables the SQL names."""
    cur.execute(sql)


def _query(cur: Cursor, sql: str, **tables: pa.Table | None) -> list[tuple[Any, ...]]:
    """`_run_script` for one SELECT; returns its rows."""
    _run_script(cur, sql, **tables)
    return cur.fetchall()


def insert_audit_rows(cur: Cursor, rows: Sequence[tuple[AuditRecord, int]]) -> None:
    """Insert many audit rows in one statement."""
    if rows:
        _run_script(cur, _INSERT_AUDIT, arrow_new_audit=_audit_table(rows))


def write_audit_batch(cur: Cursor, rows: list[tuple[AuditRecord, int]]) -> list[None]:
    """Batcher job: the audit rows of many reads."""
    insert_audit_rows(cur, rows)
    return [None] * len(rows)


def _lookup_sessions(
    cur: Cursor, keys: list[tuple[str, str]], wanted: list[tuple[int, str]]
) -> tuple[dict[int, tuple[int, str, int]], dict[tuple[int, str], tuple[str, int]]]:
    """ONE query for what a batch of appends needs to know: the state of its sessions and
    the client message ids already stored in them.

    `keys[i]` is (tenant, session_id); `wanted` holds (i, client_message_id). Returns
    ({i: (sess_no, owner, last_seq)}, {(i, cid): (message_id, seq)})."""
    found = (
        "SELECT r.i, s.sess_no, s.user_id, s.last_seq FROM sessions s JOIN arrow_lookup r "
        "ON s.tenant = r.tenant AND s.session_id = r.session_id"
    )
    if wanted:
        sql = f"""
            WITH found AS MATERIALIZED ({found})
            SELECT 0 AS part, i, sess_no, user_id, last_seq, NULL::VARCHAR AS cid FROM found
            UNION ALL
            SELECT 1, f.i, m.seq, m.message_id, NULL, m.client_message_id
            FROM messages m JOIN found f ON m.sess_no = f.sess_no
            JOIN arrow_lookup_ids w ON w.i = f.i AND w.cid = m.client_message_id"""
    else:  # the common case: no client ids, no CTE
        sql = f"SELECT 0, *, NULL::VARCHAR FROM ({found})"
    rows = _query(
        cur,
        sql,
        arrow_lookup=pa.table(
            {
                "i": pa.array(range(len(keys)), pa.int64()),
                "tenant": pa.array([k[0] for k in keys], pa.string()),
                "session_id": pa.array([k[1] for k in keys], pa.string()),
            }
        ),
        arrow_lookup_ids=pa.table(
            {
                "i": pa.array([w[0] for w in wanted], pa.int64()),
                "cid": pa.array([w[1] for w in wanted], pa.string()),
            }
        )
        if wanted
        else None,
    )
    state: dict[int, tuple[int, str, int]] = {}
    known: dict[tuple[int, str], tuple[str, int]] = {}
    for part, i, number, text, last_seq, cid in rows:
        if part == 0:
            state[int(i)] = (int(number), text, int(last_seq))
        else:
            known[(int(i), cid)] = (text, int(number))
    return state, known


def append_batch(cur: Cursor, requests: list[AppendRequest]) -> list[AppendResult]:
    """Many AppendMessages requests in one set-based job (see services/memory/batcher.py):
    two calls into DuckDB whatever the number of requests (a lookup query, then one script
    inserting messages, new sessions, session updates and audit rows), plus one to number
    the new sessions when there are any.

    Requests are applied in order, exactly as if each ran alone (`appends.plan_appends`).
    """
    index = appends.session_keys(requests)
    keys = list(index)
    wanted = appends.wanted_client_ids(requests, index)
    found, known = _lookup_sessions(cur, keys, wanted)
    # i -> [sess_no, owner, last_seq]
    state: dict[int, list[Any]] = {i: list(v) for i, v in found.items()}
    fresh = [i for i in range(len(keys)) if i not in found]
    if fresh:  # a third call, only for batches that open sessions (nextval is slow in a join)
        numbers = cur.execute(
            f"SELECT nextval('session_no_seq') FROM range({len(fresh)})"
        ).fetchall()
        for r in requests:
            i = index[(r.tenant, r.session_id)]
            if i not in state:
                state[i] = [int(numbers.pop()[0]), r.user_id, 0]

    plan = appends.plan_appends(requests, index, state, known)
    results, rows, audits, touched = plan.results, plan.rows, plan.audits, plan.touched
    rows = [(int(state[i][0]), tenant, m) for i, tenant, m in rows]

    script = [_INSERT_AUDIT]
    tables: dict[str, pa.Table | None] = {"arrow_new_audit": _audit_table(audits)}
    if rows:
        script.append("INSERT INTO messages BY NAME SELECT * FROM arrow_new_messages")
        tables["arrow_new_messages"] = _messages_table(rows)
    created = [i for i in touched if i not in found]
    if created:
        script.append("INSERT INTO sessions BY NAME SELECT * FROM arrow_new_sessions")
        tables["arrow_new_sessions"] = pa.table(
            {
                "sess_no": pa.array([state[i][0] for i in created], pa.int64()),
                "tenant": pa.array([keys[i][0] for i in created], pa.string()),
                "session_id": pa.array([keys[i][1] for i in created], pa.string()),
                "user_id": pa.array([state[i][1] for i in created], pa.string()),
                "last_seq": pa.array([state[i][2] for i in created], pa.int64()),
                "created_at": pa.array([touched[i] for i in created], pa.timestamp("us")),
                "updated_at": pa.array([touched[i] for i in created], pa.timestamp("us")),
            }
        )
    updated = [i for i in touched if i in found]
    if updated:
        script.append(
            "UPDATE sessions SET last_seq = u.last_seq, updated_at = u.updated_at "
            "FROM arrow_session_updates u WHERE sessions.sess_no = u.sess_no"
        )
        tables["arrow_session_updates"] = pa.table(
            {
                "sess_no": pa.array([state[i][0] for i in updated], pa.int64()),
                "last_seq": pa.array([state[i][2] for i in updated], pa.int64()),
                "updated_at": pa.array([touched[i] for i in updated], pa.timestamp("us")),
            }
        )
    _run_script(cur, ";\n".join(script), **tables)
    return results


def _messages_table(rows: Sequence[tuple[int, str, StoredMessage]]) -> pa.Table:
    return pa.table(
        {
            "sess_no": pa.array([r[0] for r in rows], pa.int64()),
            "seq": pa.array([r[2].sequence for r in rows], pa.int64()),
            "tenant": pa.array([r[1] for r in rows], pa.string()),
            "session_id": pa.array([r[2].session_id for r in rows], pa.string()),
            "user_id": pa.array([r[2].user_id for r in rows], pa.string()),
            "message_id": pa.array([r[2].message_id for r in rows], pa.string()),
            "role": pa.array([r[2].role for r in rows], pa.string()),
            "content": pa.array([r[2].content for r in rows], pa.string()),
            "client_message_id": pa.array([r[2].client_message_id for r in rows], pa.string()),
            "metadata": pa.array([_json(r[2].metadata) for r in rows], pa.string()),
            "created_at": pa.array([r[2].created_us for r in rows], pa.timestamp("us")),
            "context_tokens": pa.array([r[2].tokens for r in rows], pa.int32()),
        }
    )


def history_page(
    cur: Cursor, tenant: str, session_id: str, order: Order, boundary: int | None, limit: int
) -> list[StoredMessage]:
    """Up to `limit` messages after (asc) or before (desc) the `boundary` sequence."""
    if order is Order.ASC:
        cond, direction = "seq > ?", "ASC"
        bound = boundary or 0
    else:
        cond, direction = "seq < ?", "DESC"
        bound = boundary if boundary is not None else 2**62
    rows = cur.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE tenant = ? AND session_id = ? AND {cond} "
        f"ORDER BY seq {direction} LIMIT ?",
        [tenant, session_id, bound, limit],
    ).fetchall()
    return [_message(r) for r in rows]


def recent_messages(cur: Cursor, tenant: str, session_id: str, limit: int) -> list[StoredMessage]:
    """The last `limit` messages of a session, oldest first."""
    return recent_of_session(cur, tenant, session_id, limit)[1]


def recent_of_session(
    cur: Cursor, tenant: str, session_id: str, limit: int
) -> tuple[Session | None, list[StoredMessage]]:
    """The session and its last `limit` messages (oldest first), in one read: the messages
    are found by the internal session number (an integer filter scans ~35 % faster than
    the (tenant, session_id) strings on a large messages table)."""
    row = cur.execute(
        "SELECT sess_no, session_id, user_id, last_seq FROM sessions "
        "WHERE tenant = ? AND session_id = ?",
        [tenant, session_id],
    ).fetchone()
    if row is None:
        return None, []
    rows = cur.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE sess_no = ? ORDER BY seq DESC LIMIT ?",
        [row[0], limit],
    ).fetchall()
    return Session(row[1], row[2], int(row[3])), [_message(r) for r in reversed(rows)]


# -- facts ---------------------------------------------------------------------------------
_FACT_COLUMNS = (
    "f.fact_id, f.user_id, f.text, f.kind, f.importance, f.tags, "
    "f.source_session_id, epoch_us(f.created_at), epoch_us(f.expires_at), f.injection_signals, "
    "f.embedding_model, epoch_us(f.valid_to), f.superseded_by, f.origin, f.source_message_ids"
)


def _fact(row: Sequence[Any]) -> Fact:
    return Fact(
        fact_id=row[0],
        user_id=row[1],
        text=row[2],
        kind=row[3],
        importance=float(row[4]),
        tags=tuple(row[5]),
        source_session_id=row[6],
        created_us=int(row[7]),
        expires_us=None if row[8] is None else int(row[8]),
        injection_signals=tuple(row[9] or ()),
        embedding_model=row[10] or "",
        valid_to_us=None if row[11] is None else int(row[11]),
        superseded_by=row[12] or "",
        origin=row[13] or "remembered",
        source_message_ids=tuple(row[14] or ()),
    )


def has_consent(cur: Cursor, tenant: str, user_id: str) -> bool:
    row = cur.execute(
        "SELECT long_term_memory FROM consent WHERE tenant = ? AND user_id = ?", [tenant, user_id]
    ).fetchone()
    return bool(row and row[0])


def remember_facts(
    cur: Cursor,
    tenant: str,
    user_id: str,
    facts: Sequence[NewFact],
    now_us: int,
    audit: AuditRecord,
) -> tuple[list[Remembered], InsertedFacts] | None:
    """Store facts (deduplicated per user). None, with an audit row, when consent is missing:
    consent is checked inside the write transaction so it cannot race a withdrawal."""
    if not has_consent(cur, tenant, user_id):
        insert_audit(cur, replace(audit, outcome="CONSENT_REQUIRED"), now_us)
        return None
    hashes = [recall.fact_hash(f.text) for f in facts]
    live: dict[str, str] = {}
    stale: list[str] = []
    for text_hash, fact_id, expires in cur.execute(
        "SELECT text_hash, fact_id, epoch_us(expires_at) FROM facts "
        "WHERE tenant = ? AND user_id = ? AND list_contains(?, text_hash)",
        [tenant, user_id, sorted(set(hashes))],
    ).fetchall():
        if expires is not None and expires <= now_us:
            stale.append(fact_id)  # an expired twin is replaced, not resurrected
        else:
            live[text_hash] = fact_id
    if stale:
        _delete_facts(cur, tenant, user_id, stale)

    out: list[Remembered] = []
    rows: list[tuple[str, NewFact, str]] = []
    for fact, text_hash in zip(facts, hashes, strict=True):
        if text_hash in live:
            out.append(Remembered(live[text_hash], True))
            continue
        fact_id = new_id("fct")
        live[text_hash] = fact_id  # a duplicate later in the same request dedups to this one
        rows.append((fact_id, fact, text_hash))
        out.append(Remembered(fact_id, False))
    inserted = insert_facts(cur, tenant, user_id, rows, now_us)
    insert_audit(
        cur,
        replace(
            audit,
            target_ids=tuple(r.fact_id for r in out),
            detail={"stored": len(rows), "deduplicated": len(out) - len(rows)},
        ),
        now_us,
    )
    return out, inserted


def insert_facts(
    cur: Cursor,
    tenant: str,
    user_id: str,
    rows: Sequence[tuple[str, NewFact, str]],
    now_us: int,
    created_us: Sequence[int] | None = None,
) -> InsertedFacts:
    """Insert facts (fact_id, fact, text_hash) of one user and their postings.

    `created_us` overrides the creation times (tests)."""
    doc_lens: list[int] = []
    p_key: list[int] = []
    p_row: list[int] = []
    p_tf: list[int] = []
    for row, (_, fact, _) in enumerate(rows):
        tfs, length = recall.term_frequencies(fact.text)
        doc_lens.append(length)
        for term, tf in tfs.items():
            p_key.append(recall.term_key(tenant, user_id, term))
            p_row.append(row)
            p_tf.append(tf)
    n = len(rows)
    created = list(created_us) if created_us is not None else [now_us] * n
    return insert_fact_tables(
        cur,
        pa.table(
            {
                "row": pa.array(range(n), pa.int64()),
                "tenant": pa.array([tenant] * n, pa.string()),
                "user_id": pa.array([user_id] * n, pa.string()),
                "fact_id": pa.array([r[0] for r in rows], pa.string()),
                "text": pa.array([r[1].text for r in rows], pa.string()),
                "text_hash": pa.array([r[2] for r in rows], pa.string()),
                "kind": pa.array([r[1].kind for r in rows], pa.string()),
                "importance": pa.array([r[1].importance for r in rows], pa.float64()),
                "tags": pa.array([list(r[1].tags) for r in rows], pa.list_(pa.string())),
                "source_session_id": pa.array([r[1].source_session_id for r in rows], pa.string()),
                "doc_len": pa.array(doc_lens, pa.int32()),
                "created_us": pa.array(created, pa.int64()),
                "expires_us": pa.array([r[1].expires_us for r in rows], pa.int64()),
                "injection_signals": pa.array(
                    [list(r[1].injection_signals) for r in rows], pa.list_(pa.string())
                ),
                "embedding": vector_column([r[1].embedding for r in rows]),
                "embedding_model": pa.array(
                    [r[1].embedding_model or None for r in rows], pa.string()
                ),
                "origin": pa.array([r[1].origin for r in rows], pa.string()),
                "tokenizer": pa.array([recall.TOKENIZER_VERSION] * n, pa.int32()),
                "source_message_ids": pa.array(
                    [list(r[1].source_message_ids) for r in rows], pa.list_(pa.string())
                ),
            }
        ),
        pa.table(
            {
                "term_key": pa.array(p_key, pa.int64()),
                "row": pa.array(p_row, pa.int64()),
                "tf": pa.array(p_tf, pa.int32()),
            }
        ),
    )


def insert_fact_tables(cur: Cursor, facts: pa.Table, postings: pa.Table) -> InsertedFacts:
    """Insert facts and postings given as Arrow tables, whatever their number, in one
    statement each (the bulk path; `insert_facts` is built on it).

    `facts` has the columns of `insert_facts`' table: row (0..n-1), tenant, user_id,
    fact_id, text, text_hash, kind, importance, tags, source_session_id, doc_len,
    created_us, expires_us and optionally injection_signals (absent: unflagged) and
    embedding + embedding_model (absent: not embedded);
    `postings` has term_key, row, tf. Term keys must be
    `recall.term_key(tenant, user_id, term)` of the fact's own user. Internal fact numbers
    come from `fact_no_seq` here."""
    n = facts.num_rows
    if n == 0:
        return InsertedFacts(INDEX_FACTS_SCHEMA.empty_table(), INDEX_POSTINGS_SCHEMA.empty_table())
    numbers = cur.execute(f"SELECT nextval('fact_no_seq') AS n FROM range({n})").fetchnumpy()
    fact_no = np.sort(np.asarray(numbers["n"], dtype=np.int64))
    by_row = fact_no[facts["row"].to_numpy()]
    arrow_facts = pa.table(
        {
            "fact_no": by_row,
            **{
                c: facts[c]
                for c in (
                    "tenant",
                    "user_id",
                    "fact_id",
                    "text",
                    "text_hash",
                    "kind",
                    "importance",
                    "tags",
                    "source_session_id",
                    "doc_len",
                )
            },
            "created_at": facts["created_us"].cast(pa.timestamp("us")),
            "expires_at": facts["expires_us"].cast(pa.timestamp("us")),
            "injection_signals": _signals_column(facts),
            "embedding": _optional(facts, "embedding", pa.list_(pa.float32())),
            "embedding_model": _optional(facts, "embedding_model", pa.string()),
            "origin": _optional(facts, "origin", pa.string()),
            "tokenizer": (
                facts["tokenizer"].cast(pa.int32())
                if "tokenizer" in facts.column_names
                else pa.array([recall.TOKENIZER_VERSION] * n, pa.int32())
            ),
            "source_message_ids": _optional(facts, "source_message_ids", pa.list_(pa.string())),
        }
    )
    arrow_postings = pa.table(
        {
            "term_key": postings["term_key"],
            "fact_no": fact_no[postings["row"].to_numpy()],
            "tf": postings["tf"],
        }
    )
    _insert_facts_script(cur, arrow_facts, arrow_postings)
    return InsertedFacts(
        facts=pa.table(
            {
                "fact_no": by_row,
                "fact_id": facts["fact_id"],
                "doc_len": facts["doc_len"],
                "importance": facts["importance"],
                "created_us": facts["created_us"],
                "expires_us": facts["expires_us"],
                "kind": facts["kind"],
                "tags": facts["tags"],
                "embedding_model": arrow_facts["embedding_model"],
                "embedding": arrow_facts["embedding"],
            },
            schema=INDEX_FACTS_SCHEMA,
        ),
        postings=arrow_postings.cast(INDEX_POSTINGS_SCHEMA),
    )


def _optional(facts: pa.Table, name: str, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """A column of `facts` cast to `kind`, or nulls when it is absent."""
    if name in facts.column_names:
        return facts[name].cast(kind)
    return pa.nulls(facts.num_rows, kind)


def _signals_column(facts: pa.Table) -> pa.Array | pa.ChunkedArray:
    if "injection_signals" in facts.column_names:
        return facts["injection_signals"]
    return pa.array([[] for _ in range(facts.num_rows)], pa.list_(pa.string()))


def _insert_facts_script(cur: Cursor, arrow_facts: pa.Table, arrow_postings: pa.Table) -> None:
    """Both inserts in one call; the tables are found by name in this frame (see
    `_run_script`)."""
    cur.execute(
        "INSERT INTO facts BY NAME SELECT * FROM arrow_facts;\n"
        "INSERT INTO fact_terms BY NAME SELECT * FROM arrow_postings"
    )


# -- recall --------------------------------------------------------------------------------
def load_recall_index(cur: Cursor, tenant: str, user_id: str) -> tuple[pa.Table, pa.Table]:
    """A user's facts and postings for `recall_index.UserIndex`, from one snapshot (one
    read-only transaction), so every posting refers to a fact of the same state."""
    cur.execute("BEGIN TRANSACTION")
    try:
        facts = cur.sql(
            "SELECT fact_no, fact_id, doc_len, importance, epoch_us(created_at) AS created_us, "
            "epoch_us(expires_at) AS expires_us, kind, tags, embedding_model, embedding "
            "FROM facts WHERE tenant = ? AND user_id = ? AND valid_to IS NULL",
            params=[tenant, user_id],
        ).to_arrow_table()
        postings = cur.sql(
            "SELECT t.term_key, t.fact_no, t.tf FROM fact_terms t SEMI JOIN "
            "(SELECT fact_no FROM facts WHERE tenant = ? AND user_id = ? AND valid_to IS NULL) f "
            "ON t.fact_no = f.fact_no ORDER BY t.term_key",  # DuckDB sorts in parallel
            params=[tenant, user_id],
        ).to_arrow_table()
    finally:
        cur.execute("ROLLBACK")
    return facts.cast(INDEX_FACTS_SCHEMA), postings.cast(INDEX_POSTINGS_SCHEMA)


def facts_by_no(cur: Cursor, tenant: str, user_id: str, fact_nos: Sequence[int]) -> dict[int, Fact]:
    """The facts with these internal numbers that (still) belong to the user.

    Only the IN list filters in SQL, so DuckDB answers it from the `facts_fact_no` ART
    index (migration 003), ~2 ms at 1M facts; with the tenant/user predicates added it
    plans a hash join over the user's rows instead (~13-30 ms). Ownership is checked here.
    """
    if not fact_nos:
        return {}
    numbers = ", ".join(str(int(n)) for n in fact_nos)  # integers: safe to inline
    rows = cur.execute(
        f"SELECT f.fact_no, f.tenant, {_FACT_COLUMNS} FROM facts f WHERE f.fact_no IN ({numbers})"
    ).fetchall()
    return {int(r[0]): _fact(r[2:]) for r in rows if r[1] == tenant and r[3] == user_id}


def _filter_sql(flt: FactFilter, alias: str = "f") -> tuple[str, list[Any]]:
    parts: list[str] = []
    params: list[Any] = []
    if flt.kinds:
        parts.append(f"list_contains(?, {alias}.kind)")
        params.append(list(flt.kinds))
    if flt.tags:
        parts.append(f"list_has_any({alias}.tags, ?::VARCHAR[])")
        params.append(list(flt.tags))
    if flt.created_after_us is not None:
        parts.append(f"{alias}.created_at >= make_timestamp(?)")
        params.append(flt.created_after_us)
    if flt.created_before_us is not None:
        parts.append(f"{alias}.created_at < make_timestamp(?)")
        params.append(flt.created_before_us)
    return (" AND " + " AND ".join(parts)) if parts else "", params


def recall_facts(
    cur: Cursor,
    tenant: str,
    user_id: str,
    query: str,
    flt: FactFilter,
    k: int,
    now_us: int,
    weights: RecallWeights,
) -> list[ScoredFact]:
    """Top `k` live facts of the user by the weighted score (see services/memory/recall.py).

    Ranking is by the score rounded to 1e-12 (so float summation order cannot reorder
    equal scores), then by fact id. Only narrow columns travel through the scoring; text and
    tags are fetched for the k winners only (`facts_by_no`).

    The SQL path: used when the in-process index is disabled or the user's index is too
    big for it (services/memory/recall_index.py ranks identically), and as the baseline
    of the benchmark.
    """
    keys = sorted({recall.term_key(tenant, user_id, t) for t in recall.query_terms(query)})
    filter_sql, filter_params = _filter_sql(flt)
    named: dict[str, Any] = {
        "tenant": tenant,
        "user": user_id,
        "now": now_us,
        "k": k,
        "w_bm25": weights.bm25,
        "w_rec": weights.recency,
        "w_imp": weights.importance,
        "half_life": weights.half_life_days * _US_PER_DAY,
    }
    for i, p in enumerate(filter_params):
        named[f"f{i}"] = p
        filter_sql = filter_sql.replace("?", f"$f{i}", 1)
    ok = f"(TRUE{filter_sql})"
    live = (
        f"SELECT f.fact_no, f.fact_id, f.doc_len, f.importance, f.created_at, {ok} AS ok "
        "FROM facts f WHERE f.tenant = $tenant AND f.user_id = $user "
        "AND (f.expires_at IS NULL OR f.expires_at > make_timestamp($now)) AND f.valid_to IS NULL"
    )
    if keys:
        # Term keys are integers computed here, safe to inline; inlining lets DuckDB push
        # the IN list into the scan of the postings.
        key_list = ", ".join(str(key) for key in keys)
        k1, b = recall.K1, recall.B
        matched = f"""
            stats AS (SELECT count(*)::DOUBLE AS n, avg(doc_len) AS avgdl FROM live),
            hits AS (
                SELECT t.fact_no, t.term_key, t.tf, l.doc_len
                FROM fact_terms t JOIN live l ON l.fact_no = t.fact_no
                WHERE t.term_key IN ({key_list})),
            df AS (SELECT term_key, count(*)::DOUBLE AS df FROM hits GROUP BY term_key),
            bm AS (
                SELECT h.fact_no,
                       sum(ln(1 + (s.n - df.df + 0.5) / (df.df + 0.5)) * h.tf * ({k1} + 1)
                           / (h.tf + {k1} * (1 - {b} + {b} * h.doc_len / s.avgdl))) AS bm25
                FROM hits h JOIN df ON df.term_key = h.term_key CROSS JOIN stats s
                GROUP BY h.fact_no),
            cand AS (
                SELECT l.fact_no, l.fact_id, l.importance, l.created_at, bm.bm25
                FROM bm JOIN live l ON l.fact_no = bm.fact_no WHERE l.ok)"""
    else:
        matched = """
            cand AS (SELECT fact_no, fact_id, importance, created_at, 0.0::DOUBLE AS bm25
                     FROM live WHERE ok)"""
    sql = f"""
        WITH live AS ({live}),
        {matched},
        parts AS (
            SELECT *,
                   CASE WHEN max(bm25) OVER () > 0 THEN bm25 / max(bm25) OVER () ELSE 0 END
                       AS bm25_norm,
                   exp(-ln(2) * greatest($now - epoch_us(created_at), 0) / $half_life)
                       AS recency
            FROM cand),
        top AS (
            SELECT fact_no, fact_id, bm25, bm25_norm, recency, importance,
                   $w_bm25 * bm25_norm + $w_rec * recency + $w_imp * importance AS score
            FROM parts)
        SELECT fact_no, bm25, bm25_norm, recency, importance, score FROM top
        ORDER BY round(score, 12) DESC, fact_id
        LIMIT $k"""
    ranked = cur.execute(sql, named).fetchall()
    found = facts_by_no(cur, tenant, user_id, [r[0] for r in ranked])
    return [
        ScoredFact(
            fact=found[r[0]],
            bm25=float(r[1]),
            bm25_normalized=float(r[2]),
            recency=float(r[3]),
            importance=float(r[4]),
            score=float(r[5]),
            relevance=float(r[2]),
        )
        for r in ranked
        if r[0] in found
    ]


# -- extraction ---------------------------------------------------------------------------
def extraction_allowed(cur: Cursor, tenant: str, user_id: str) -> bool:
    row = cur.execute(
        "SELECT long_term_memory AND fact_extraction FROM consent WHERE tenant = ? AND user_id = ?",
        [tenant, user_id],
    ).fetchone()
    return bool(row and row[0])


def write_extraction(
    cur: Cursor,
    tenant: str,
    user_id: str,
    facts: Sequence[NewFact],
    supersedes: Sequence[tuple[int, str]],
    message_ids: Sequence[str],
    now_us: int,
    audit: AuditRecord,
) -> Extracted | None:
    """One transaction: the proposed facts stored (deduplicated as Remember does), each
    (proposal index, old fact id) of `supersedes` closed (`valid_to`, `superseded_by`; its
    text hash moved aside so the text may become current again later), the source messages
    marked handled, and an audit row per supersession with both ids. None without consent
    (checked here, so it cannot race a withdrawal); `skipped` when every message was
    handled before (a retry never doubles facts)."""
    if not extraction_allowed(cur, tenant, user_id):
        return None
    done = {
        r[0]
        for r in cur.execute(
            "SELECT message_id FROM extracted_messages WHERE tenant = ? AND user_id = ? "
            "AND list_contains(?, message_id)",
            [tenant, user_id, list(message_ids)],
        ).fetchall()
    }
    if message_ids and done >= set(message_ids):
        return Extracted(
            [],
            [],
            InsertedFacts(INDEX_FACTS_SCHEMA.empty_table(), INDEX_POSTINGS_SCHEMA.empty_table()),
            True,
        )
    remembered: list[Remembered] = []
    inserted = InsertedFacts(INDEX_FACTS_SCHEMA.empty_table(), INDEX_POSTINGS_SCHEMA.empty_table())
    if facts:
        stored = remember_facts(cur, tenant, user_id, facts, now_us, audit)
        assert stored is not None  # consent checked above, same transaction
        remembered, inserted = stored
    superseded: list[tuple[str, str]] = []
    for index, old_id in supersedes:
        new_id = remembered[index].fact_id
        if new_id == old_id:
            continue  # the "update" restated the fact: nothing changes
        closed = cur.execute(
            "UPDATE facts SET valid_to = make_timestamp(?), superseded_by = ?, "
            "text_hash = text_hash || ':' || fact_id "
            "WHERE tenant = ? AND user_id = ? AND fact_id = ? AND valid_to IS NULL "
            "RETURNING fact_id",
            [now_us, new_id, tenant, user_id, old_id],
        ).fetchall()
        if closed:
            superseded.append((old_id, new_id))
            insert_audit(
                cur,
                replace(
                    audit,
                    rpc="SupersedeFact",
                    target_ids=(old_id, new_id),
                    detail={"superseded": old_id, "by": new_id},
                ),
                now_us,
            )
    fresh = [m for m in message_ids if m not in done]
    if fresh:
        cur.executemany(
            "INSERT INTO extracted_messages VALUES (?, ?, ?, make_timestamp(?))",
            [[tenant, user_id, m, now_us] for m in fresh],
        )
    return Extracted(remembered, superseded, inserted)


def extraction_counts(cur: Cursor, tenant: str, user_id: str, now_us: int) -> ExtractionCounts:
    """The user's unhandled user turns, handled turns (and the last handling time), and
    current, unexpired extracted facts."""
    pending = cur.execute(
        "SELECT count(*) FROM messages m JOIN consent c ON c.tenant = m.tenant "
        "AND c.user_id = m.user_id WHERE m.tenant = ? AND m.user_id = ? "
        "AND c.long_term_memory AND c.fact_extraction AND m.created_at >= c.extraction_since "
        "AND m.role = 'user' AND NOT EXISTS (SELECT 1 FROM extracted_messages e "
        "WHERE e.tenant = ? AND e.user_id = m.user_id AND e.message_id = m.message_id)",
        [tenant, user_id, tenant],
    ).fetchone()
    handled = cur.execute(
        "SELECT count(*), epoch_us(max(processed_at)) FROM extracted_messages "
        "WHERE tenant = ? AND user_id = ?",
        [tenant, user_id],
    ).fetchone()
    facts = cur.execute(
        "SELECT count(*) FROM facts f WHERE f.tenant = ? AND f.user_id = ? "
        "AND f.origin = 'extracted' AND f.valid_to IS NULL "
        "AND (f.expires_at IS NULL OR f.expires_at > make_timestamp(?))",
        [tenant, user_id, now_us],
    ).fetchone()
    assert pending is not None and handled is not None and facts is not None
    return ExtractionCounts(
        int(pending[0]),
        int(handled[0]),
        None if handled[1] is None else int(handled[1]),
        int(facts[0]),
    )


def unextracted_messages(
    cur: Cursor, tenant: str, before_us: int, after_us: int | None, limit: int
) -> list[StoredMessage]:
    """Up to `limit` of the tenant's user turns stored before `before_us` (and at or after
    `after_us`) that the extractor never handled, of users who consent to extraction and
    stored since their opt-in, oldest first (the catch-up pass)."""
    rows = cur.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.tenant = ? AND EXISTS (SELECT 1 "
        "FROM consent c WHERE c.tenant = ? AND c.user_id = m.user_id AND c.long_term_memory "
        "AND c.fact_extraction AND m.created_at >= c.extraction_since) "
        "AND m.role = 'user' AND m.created_at < make_timestamp(?) "
        "AND m.created_at >= make_timestamp(?) AND NOT EXISTS (SELECT 1 FROM "
        "extracted_messages e WHERE e.tenant = m.tenant AND e.user_id = m.user_id "
        "AND e.message_id = m.message_id) "
        "ORDER BY m.created_at, m.session_id, m.seq LIMIT ?",
        [tenant, tenant, before_us, after_us or 0, limit],
    ).fetchall()
    return [_message(r) for r in rows]


def list_facts(
    cur: Cursor,
    tenant: str,
    user_id: str,
    kinds: Sequence[str],
    include_history: bool,
    after: FactsPageKey | None,
    limit: int,
    now_us: int,
) -> list[Fact]:
    """A page of the user's unexpired facts by (created_at, fact_id), after `after`; current
    ones only unless `include_history`."""
    sql = (
        f"SELECT {_FACT_COLUMNS} FROM facts f WHERE f.tenant = ? AND f.user_id = ? "
        "AND (f.expires_at IS NULL OR f.expires_at > make_timestamp(?)) "
        "AND (? OR f.valid_to IS NULL) "
        "AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], f.kind)) "
        "AND (epoch_us(f.created_at), f.fact_id) > (?, ?) "
        "ORDER BY f.created_at, f.fact_id LIMIT ?"
    )
    key = after or FactsPageKey(-(2**62), "")
    rows = cur.execute(
        sql,
        [
            tenant,
            user_id,
            now_us,
            include_history,
            list(kinds),
            list(kinds),
            key.created_us,
            key.fact_id,
            limit,
        ],
    ).fetchall()
    return [_fact(r) for r in rows]


# -- re-indexing (a new tokenizer version) --------------------------------------------------
def facts_to_reindex(cur: Cursor, tenant: str, version: int, limit: int) -> list[ToEmbed]:
    """Up to `limit` of the tenant's facts indexed by an older tokenizer, oldest first."""
    rows = cur.execute(
        "SELECT user_id, fact_no, text FROM facts WHERE tenant = ? "
        "AND coalesce(tokenizer, 1) < ? ORDER BY fact_no LIMIT ?",
        [tenant, version, limit],
    ).fetchall()
    return [ToEmbed(tenant, r[0], int(r[1]), r[2]) for r in rows]


def reindex_facts(cur: Cursor, tenant: str, rows: Sequence[ToEmbed]) -> int:
    """Replace these facts' postings and doc_len by the current tokenizer's (one
    transaction; a fact deleted meanwhile is skipped); the facts updated."""
    if not rows:
        return 0
    live = {
        int(r[0])
        for r in cur.execute(
            "SELECT fact_no FROM facts WHERE tenant = ? AND list_contains(?, fact_no)",
            [tenant, [r.fact_no for r in rows]],
        ).fetchall()
    }
    todo = [r for r in rows if r.fact_no in live]
    if not todo:
        return 0
    keys: list[int] = []
    nos: list[int] = []
    tfs: list[int] = []
    lengths: list[int] = []
    for row in todo:
        counts, length = recall.term_frequencies(row.text)
        lengths.append(length)
        for term, tf in counts.items():
            keys.append(recall.term_key(tenant, row.user_id, term))
            nos.append(row.fact_no)
            tfs.append(tf)
    numbers = [r.fact_no for r in todo]
    cur.execute("DELETE FROM fact_terms WHERE list_contains(?, fact_no)", [numbers])
    _run_script(
        cur,
        "INSERT INTO fact_terms BY NAME SELECT * FROM arrow_reindexed",
        arrow_reindexed=pa.table(
            {
                "term_key": pa.array(keys, pa.int64()),
                "fact_no": pa.array(nos, pa.int64()),
                "tf": pa.array(tfs, pa.int32()),
            }
        ),
    )
    cur.executemany(
        "UPDATE facts SET doc_len = ?, tokenizer = ? WHERE tenant = ? AND fact_no = ?",
        [[n, recall.TOKENIZER_VERSION, tenant, no] for n, no in zip(lengths, numbers, strict=True)],
    )
    return len(todo)


# -- re-embedding ---------------------------------------------------------------------------
def facts_to_embed(cur: Cursor, tenant: str, model: str, limit: int) -> list[ToEmbed]:
    """Up to `limit` of the tenant's facts without a vector of `model`, oldest first."""
    rows = cur.execute(
        "SELECT user_id, fact_no, text FROM facts WHERE tenant = ? "
        "AND embedding_model IS DISTINCT FROM ? ORDER BY fact_no LIMIT ?",
        [tenant, model, limit],
    ).fetchall()
    return [ToEmbed(tenant, r[0], int(r[1]), r[2]) for r in rows]


def count_to_embed(cur: Cursor, tenant: str, model: str) -> int:
    row = cur.execute(
        "SELECT count(*) FROM facts WHERE tenant = ? AND embedding_model IS DISTINCT FROM ?",
        [tenant, model],
    ).fetchone()
    return int(row[0]) if row else 0


def set_embeddings(
    cur: Cursor, tenant: str, model: str, rows: Sequence[ToEmbed], vectors: np.ndarray
) -> int:
    """Store `model`'s vectors of these facts (a fact deleted meanwhile is skipped: the
    update matches nothing); the number of facts updated."""
    if not rows:
        return 0
    vectors_table = pa.table(
        {
            "tenant": pa.array([tenant] * len(rows), pa.string()),
            "model": pa.array([model] * len(rows), pa.string()),
            "user_id": pa.array([r.user_id for r in rows], pa.string()),
            "fact_no": pa.array([r.fact_no for r in rows], pa.int64()),
            "text": pa.array([r.text for r in rows], pa.string()),
            "embedding": vector_column(list(vectors)),
        }
    )
    found = _query(
        cur,
        "UPDATE facts SET embedding = v.embedding, embedding_model = v.model "
        "FROM arrow_vectors v WHERE facts.tenant = v.tenant AND facts.user_id = v.user_id "
        "AND facts.fact_no = v.fact_no AND facts.text = v.text RETURNING facts.fact_no",
        arrow_vectors=vectors_table,
    )
    return len(found)


def _delete_facts(cur: Cursor, tenant: str, user_id: str, fact_ids: Sequence[str]) -> list[str]:
    rows = cur.execute(
        "SELECT fact_no, fact_id FROM facts WHERE tenant = ? AND user_id = ? "
        "AND list_contains(?, fact_id)",
        [tenant, user_id, list(fact_ids)],
    ).fetchall()
    return _delete_fact_rows(cur, rows)


def _delete_fact_rows(cur: Cursor, rows: Sequence[Sequence[Any]]) -> list[str]:
    if not rows:
        return []
    nos = [int(r[0]) for r in rows]
    cur.execute("DELETE FROM fact_terms WHERE list_contains(?, fact_no)", [nos])
    cur.execute("DELETE FROM facts WHERE list_contains(?, fact_no)", [nos])
    return sorted(str(r[1]) for r in rows)


def forget_facts(
    cur: Cursor,
    tenant: str,
    user_id: str,
    fact_ids: Sequence[str],
    flt: FactFilter | None,
    forget_all: bool,
    now_us: int,
    audit: AuditRecord,
) -> list[str]:
    if fact_ids:
        deleted = _delete_facts(cur, tenant, user_id, fact_ids)
    else:
        filter_sql, params = _filter_sql(flt or FactFilter()) if not forget_all else ("", [])
        rows = cur.execute(
            f"SELECT f.fact_no, f.fact_id FROM facts f WHERE f.tenant = ? AND f.user_id = ?"
            f"{filter_sql}",
            [tenant, user_id, *params],
        ).fetchall()
        deleted = _delete_fact_rows(cur, rows)
    insert_audit(
        cur, replace(audit, target_ids=tuple(deleted), detail={"deleted": len(deleted)}), now_us
    )
    return deleted


# -- consent -------------------------------------------------------------------------------
def get_consent(cur: Cursor, tenant: str, user_id: str) -> Consent:
    row = cur.execute(
        "SELECT long_term_memory, epoch_us(updated_at), updated_by, fact_extraction FROM consent "
        "WHERE tenant = ? AND user_id = ?",
        [tenant, user_id],
    ).fetchone()
    if row is None:
        return Consent()
    return Consent(bool(row[0]), int(row[1]), row[2], bool(row[0]) and bool(row[3]))


def set_consent(
    cur: Cursor,
    tenant: str,
    user_id: str,
    long_term_memory: bool,
    now_us: int,
    audit: AuditRecord,
    fact_extraction: bool = False,
) -> tuple[Consent, int]:
    extraction = long_term_memory and fact_extraction
    # An opt-in keeps the time it began while it lasts (the catch-up mines turns since then).
    since = cur.execute(
        "SELECT epoch_us(extraction_since) FROM consent WHERE tenant = ? AND user_id = ? "
        "AND fact_extraction",
        [tenant, user_id],
    ).fetchone()
    since_us = (since[0] if since and since[0] is not None else now_us) if extraction else None
    cur.execute("DELETE FROM consent WHERE tenant = ? AND user_id = ?", [tenant, user_id])
    cur.execute(
        "INSERT INTO consent (tenant, user_id, long_term_memory, updated_at, updated_by, "
        "fact_extraction, extraction_since) VALUES (?, ?, ?, make_timestamp(?), ?, ?, "
        "make_timestamp(?))",
        [tenant, user_id, long_term_memory, now_us, audit.caller, extraction, since_us],
    )
    deleted: list[str] = []
    if not long_term_memory:
        rows = cur.execute(
            "SELECT fact_no, fact_id FROM facts WHERE tenant = ? AND user_id = ?", [tenant, user_id]
        ).fetchall()
        deleted = _delete_fact_rows(cur, rows)
    insert_audit(
        cur,
        replace(
            audit,
            target_ids=tuple(deleted),
            detail={
                "long_term_memory": long_term_memory,
                "fact_extraction": extraction,
                "facts_deleted": len(deleted),
            },
        ),
        now_us,
    )
    return Consent(long_term_memory, now_us, audit.caller, extraction), len(deleted)


# -- export --------------------------------------------------------------------------------
def export_facts(cur: Cursor, tenant: str, user_id: str, after: str, limit: int) -> list[Fact]:
    rows = cur.execute(
        f"SELECT {_FACT_COLUMNS} FROM facts f WHERE f.tenant = ? AND f.user_id = ? "
        "AND f.fact_id > ? ORDER BY f.fact_id LIMIT ?",
        [tenant, user_id, after, limit],
    ).fetchall()
    return [_fact(r) for r in rows]


def export_messages(
    cur: Cursor, tenant: str, user_id: str, after: tuple[str, int], limit: int
) -> list[StoredMessage]:
    rows = cur.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE tenant = ? AND user_id = ? "
        "AND (session_id, seq) > (?, ?) ORDER BY session_id, seq LIMIT ?",
        [tenant, user_id, after[0], after[1], limit],
    ).fetchall()
    return [_message(r) for r in rows]


def export_audit(
    cur: Cursor, tenant: str, user_id: str, after: tuple[int, str], limit: int
) -> list[AuditEntry]:
    rows = cur.execute(
        "SELECT audit_id, epoch_us(logged_at), caller, rpc, session_id, target_ids, outcome, detail "
        "FROM audit_log WHERE tenant = ? AND user_id = ? AND (epoch_us(logged_at), audit_id) > (?, ?) "
        "ORDER BY logged_at, audit_id LIMIT ?",
        [tenant, user_id, after[0], after[1], limit],
    ).fetchall()
    return [AuditEntry(r[0], int(r[1]), r[2], r[3], r[4], tuple(r[5]), r[6], r[7]) for r in rows]


# -- erasure and retention -----------------------------------------------------------------
def erase_user(
    cur: Cursor, tenant: str, user_id: str, now_us: int, audit: AuditRecord
) -> ErasureCounts:
    sessions = [
        r[0]
        for r in cur.execute(
            "SELECT session_id FROM sessions WHERE tenant = ? AND user_id = ? ORDER BY session_id",
            [tenant, user_id],
        ).fetchall()
    ]
    messages = _count(
        cur, "DELETE FROM messages WHERE tenant = ? AND user_id = ?", [tenant, user_id]
    )
    n_sessions = _count(
        cur, "DELETE FROM sessions WHERE tenant = ? AND user_id = ?", [tenant, user_id]
    )
    rows = cur.execute(
        "SELECT fact_no, fact_id FROM facts WHERE tenant = ? AND user_id = ?", [tenant, user_id]
    ).fetchall()
    facts = len(_delete_fact_rows(cur, rows))
    consent = _count(cur, "DELETE FROM consent WHERE tenant = ? AND user_id = ?", [tenant, user_id])
    cur.execute(
        "DELETE FROM extracted_messages WHERE tenant = ? AND user_id = ?", [tenant, user_id]
    )
    counts = ErasureCounts(messages, n_sessions, facts, consent, tuple(sessions))
    insert_audit(cur, replace(audit, detail=counts.audit_detail()), now_us)
    return counts


def _count(cur: Cursor, sql: str, params: list[Any]) -> int:
    row = cur.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def retention_tenants(cur: Cursor) -> list[str]:
    rows = cur.execute(
        "SELECT tenant FROM sessions UNION SELECT tenant FROM facts "
        "UNION SELECT tenant FROM audit_log ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def purge(
    cur: Cursor,
    tenants: dict[str, tuple[float, float, dict[str, float]]],
    now_us: int,
    audit: AuditRecord,
) -> PurgeCounts:
    """Delete what retention says must go. `tenants` maps each tenant to
    (message_days, audit_days, fact_days_by_kind); 0 days = keep forever."""
    expired = cur.execute(
        "SELECT fact_no, fact_id FROM facts WHERE expires_at <= make_timestamp(?)", [now_us]
    ).fetchall()
    facts = len(_delete_fact_rows(cur, expired))
    by_age = 0  # facts deleted by a kind's max age (they had not expired)
    messages = sessions = audits = 0
    touched: list[tuple[str, str]] = []
    for tenant, (message_days, audit_days, fact_days) in sorted(tenants.items()):
        for kind, days in sorted(fact_days.items()):
            if days <= 0:
                continue
            cutoff = now_us - int(days * _US_PER_DAY)
            kind_sql = "" if kind == "*" else " AND kind = ?"
            explicit = [k for k, d in fact_days.items() if k != "*"] if kind == "*" else []
            rows = cur.execute(
                "SELECT fact_no, fact_id FROM facts WHERE tenant = ? AND created_at < "
                f"make_timestamp(?){kind_sql} AND NOT list_contains(?, kind)",
                [tenant, cutoff, *([kind] if kind != "*" else []), explicit],
            ).fetchall()
            by_age += len(_delete_fact_rows(cur, rows))
        if message_days > 0:
            cutoff = now_us - int(message_days * _US_PER_DAY)
            touched += [
                (tenant, r[0])
                for r in cur.execute(
                    "SELECT DISTINCT session_id FROM messages WHERE tenant = ? "
                    "AND created_at < make_timestamp(?) ORDER BY 1",
                    [tenant, cutoff],
                ).fetchall()
            ]
            messages += _count(
                cur,
                "DELETE FROM messages WHERE tenant = ? AND created_at < make_timestamp(?)",
                [tenant, cutoff],
            )
            sessions += _count(
                cur,
                "DELETE FROM sessions s WHERE tenant = ? AND updated_at < make_timestamp(?) "
                "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.sess_no = s.sess_no)",
                [tenant, cutoff],
            )
        if audit_days > 0:
            cutoff = now_us - int(audit_days * _US_PER_DAY)
            audits += _count(
                cur,
                "DELETE FROM audit_log WHERE tenant = ? AND logged_at < make_timestamp(?)",
                [tenant, cutoff],
            )
    facts += by_age
    counts = PurgeCounts(facts, messages, sessions, audits, tuple(touched), by_age)
    insert_audit(cur, replace(audit, detail=counts.audit_detail()), now_us)
    return counts


def user_row_counts(cur: Cursor, tenant: str, user_id: str) -> dict[str, int]:
    """Rows held for a user, per table (tests and operators: 'is anything left?')."""
    out = {}
    for table in ("messages", "sessions", "facts", "consent", "audit_log", "extracted_messages"):
        out[table] = _count(
            cur, f"SELECT count(*) FROM {table} WHERE tenant = ? AND user_id = ?", [tenant, user_id]
        )
    out["fact_terms"] = _count(
        cur,
        "SELECT count(*) FROM fact_terms t JOIN facts f ON f.fact_no = t.fact_no "
        "WHERE f.tenant = ? AND f.user_id = ?",
        [tenant, user_id],
    )
    return out


def orphan_postings(cur: Cursor) -> int:
    """Postings whose fact is gone (must stay 0: deletes remove both)."""
    return _count(
        cur, "SELECT count(*) FROM fact_terms t ANTI JOIN facts f ON f.fact_no = t.fact_no", []
    )
