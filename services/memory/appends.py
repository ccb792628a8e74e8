"""How a batch of AppendMessages requests is applied, whatever the store: the pure part.

Both stores read the same facts first (each session's number, owner and `last_seq`, and
which of the batch's client message ids are already stored), under their own guarantee
that nobody else appends to those sessions meanwhile (DuckDB: the single writer thread;
PostgreSQL: the session rows locked by the transaction). `plan_appends` then decides
everything else in Python, exactly as if each request ran alone, in order: sequence
numbers continue per session across the batch, a client message id stored earlier (in
the batch or before) deduplicates a later one, and a request for a session of another
user writes only its audit row. The store writes the plan in a few set-based statements.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from services.memory.models import (
    Appended,
    AppendRequest,
    AppendResult,
    AuditRecord,
    StoredMessage,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def session_keys(requests: list[AppendRequest]) -> dict[tuple[str, str], int]:
    """(tenant, session_id) -> its number in the batch, in order of first appearance."""
    index: dict[tuple[str, str], int] = {}
    for r in requests:
        index.setdefault((r.tenant, r.session_id), len(index))
    return index


def wanted_client_ids(
    requests: list[AppendRequest], index: dict[tuple[str, str], int]
) -> list[tuple[int, str]]:
    """(session number, client message id) pairs whose stored copies must be looked up."""
    return sorted(
        {
            (index[(r.tenant, r.session_id)], m.client_message_id)
            for r in requests
            for m in r.messages
            if m.client_message_id
        }
    )


@dataclass
class AppendPlan:
    results: list[AppendResult] = field(default_factory=list)
    # (session number, tenant, message) of every message to insert
    rows: list[tuple[int, str, StoredMessage]] = field(default_factory=list)
    audits: list[tuple[AuditRecord, int]] = field(default_factory=list)
    # session number -> updated_us, for sessions that got messages
    touched: dict[int, int] = field(default_factory=dict)


def plan_appends(
    requests: list[AppendRequest],
    index: dict[tuple[str, str], int],
    state: dict[int, list[int | str]],
    known: dict[tuple[int, str], tuple[str, int]],
) -> AppendPlan:
    """Apply `requests` in order. `state[i]` is [incarnation, owner, last_seq] of session i
    (updated here); `known` maps (i, client message id) to the stored (message_id, seq)
    (extended here)."""
    plan = AppendPlan()
    for r in requests:
        i = index[(r.tenant, r.session_id)]
        incarnation, owner, last_seq = int(state[i][0]), str(state[i][1]), int(state[i][2])
        if owner != r.user_id:
            plan.audits.append((replace(r.audit, outcome="SESSION_USER_MISMATCH"), r.now_us))
            plan.results.append(AppendResult([], [], owner_mismatch=True))
            continue
        appended: list[Appended] = []
        new: list[StoredMessage] = []
        for m in r.messages:
            cid = m.client_message_id
            if cid and (i, cid) in known:
                mid, old_seq = known[(i, cid)]
                appended.append(Appended(mid, old_seq, cid, True))
                continue
            last_seq += 1
            stored = StoredMessage(
                new_id("msg"),
                r.session_id,
                r.user_id,
                last_seq,
                m.role,
                m.content,
                cid,
                dict(m.metadata),
                r.now_us,
                m.tokens,
            )
            if cid:
                known[(i, cid)] = (stored.message_id, last_seq)
            new.append(stored)
            plan.rows.append((i, r.tenant, stored))
            appended.append(Appended(stored.message_id, last_seq, cid, False))
        state[i][2] = last_seq
        if new:
            plan.touched[i] = r.now_us
        plan.audits.append(
            (
                replace(
                    r.audit,
                    target_ids=tuple(a.message_id for a in appended),
                    detail={"stored": len(new), "deduplicated": len(appended) - len(new)},
                ),
                r.now_us,
            )
        )
        plan.results.append(AppendResult(appended, new, incarnation=incarnation))
    return plan
