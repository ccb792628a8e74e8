"""PostgreSQL mode: recall candidates from pgvector for users whose in-process index would
be over its cap (docs/memory.md "PostgreSQL: pgvector for large users").

Without this, such a user is served in hybrid/vector mode by a transient load of all
their facts per Recall. Here PostgreSQL returns a bounded candidate set instead:

- the N nearest facts by cosine (`embedding_v <=> q`, N = max(10 k,
  MEMORY_RECALL_PGVECTOR_CANDIDATES)) among the user's current, unexpired facts that pass
  the request's filters; the query is centred on the user's mean vector (`avg(vector)`)
  when their similarities are centred, which orders by the centred dot product;
- the N best by BM25 (same SQL as `storage_pg.RECALL_TERMS`), with the document
  frequency of every query term and N / avgdl over the user's live facts;
- facts whose vector is not mirrored into `embedding_v` yet (at most
  `MAX_UNMIRRORED`; more: the transient path serves).

The union is scored by `recall_index.UserIndex.search` itself, over a small index built
from the candidates with the user's whole-set statistics (`recall_index.Corpus`): every
candidate gets exactly the ScoreParts the full index gives it (the mean is pgvector's
float32 `avg`: within ~1e-7). What can differ is only which facts are candidates.

Schema, done at start-up and not in a migration (the extension may be missing, or not
creatable by the service's role: the store must start anyway): `CREATE EXTENSION vector`,
columns `facts.embedding_v vector` (no fixed dimension: models differ) and
`facts.embedding_v_model` (the model its mirror was made from), and a partial index of the
facts not mirrored yet. `facts.embedding` (bytea) stays the source: the in-process index
reads it, a background pass mirrors it (`mirror_pass`). An HNSW index is per user, built
(CONCURRENTLY, in the background) the first time a user with at least
MEMORY_RECALL_PGVECTOR_MIN_FACTS mirrored facts is served: partial on the user and model,
on `(embedding_v::vector(dims))`. pgvector 0.6 filters an HNSW scan after it (no iterative
scans before 0.8), so one global index would return mostly other users' facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from psycopg import sql as psql

from libs.common.pg import Conn, PgDatabase
from libs.common.tracing import tracer
from services.memory import metrics, recall
from services.memory.models import (
    INDEX_POSTINGS_SCHEMA,
    FactFilter,
    QueryVector,
    RecallMode,
    RecallWeights,
)
from services.memory.recall_index import Corpus, UserIndex
from services.memory.storage_pg import (
    _BM25_CTES,
    _FILTER,
    _LIVE,
    _US_PER_DAY,
    FACTS_VERSION,
    _dt,
    _filter_params,
    _us,
    index_facts_table,
)

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAX_UNMIRRORED = 4096  # facts not mirrored yet scored from bytea; more: transient path
MAX_EF_SEARCH = 1000  # pgvector's limit of hnsw.ef_search
_CENTRES_KEPT = 1024  # users whose mirrored mean is cached (2 KiB each at 256 dimensions)

SETUP = [
    "SELECT pg_advisory_xact_lock(hashtextextended('finsight:memory:pgvector', 0))",
    "CREATE EXTENSION IF NOT EXISTS vector",
    "ALTER TABLE facts ADD COLUMN IF NOT EXISTS embedding_v vector, "
    'ADD COLUMN IF NOT EXISTS embedding_v_model text COLLATE "C"',
    # What the mirror pass and the candidates query look for.
    "CREATE INDEX IF NOT EXISTS facts_unmirrored ON facts (tenant, user_id) "
    "WHERE embedding IS NOT NULL AND embedding_v_model IS DISTINCT FROM embedding_model",
]
VERSION = "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
READY = "SELECT to_regclass('facts_unmirrored') IS NOT NULL"
_UNMIRRORED = "f.embedding IS NOT NULL AND f.embedding_v_model IS DISTINCT FROM f.embedding_model"
MIRROR_PENDING = f"""
    SELECT f.user_id, f.fact_no, f.embedding, f.embedding_model FROM facts f
    WHERE f.tenant = %(tenant)s AND {_UNMIRRORED}
    LIMIT %(limit)s"""
MIRROR_SET = """
    UPDATE facts f SET embedding_v = u.v::vector, embedding_v_model = u.model
    FROM unnest(%(user_id)b::text[], %(fact_no)b::bigint[], %(v)b::text[], %(model)b::text[])
         AS u(user_id, fact_no, v, model)
    WHERE f.tenant = %(tenant)s AND f.user_id = u.user_id AND f.fact_no = u.fact_no
      AND f.embedding_model = u.model"""
CENTRE = """
    SELECT avg(f.embedding_v)::real[], count(*) FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.valid_to IS NULL
      AND f.embedding_model = %(model)s AND f.embedding_v_model = %(model)s
      AND f.embedding_v IS NOT NULL"""
UNMIRRORED = f"""
    SELECT f.fact_no, f.embedding FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.valid_to IS NULL
      AND f.embedding_model = %(model)s AND {_UNMIRRORED}
    LIMIT %(limit)s"""
_K1, _B = recall.K1, recall.B
# Rows (part, key, value): 0 = (term key, df); 1 = a candidate's fact_no: the n best by
# BM25 that pass the filter, and the n best by the lexical score (recency and importance
# count too); 2 = (live facts, avgdl). Same statistics as storage_pg.RECALL_TERMS.
LEXICAL = f"""
{_BM25_CTES}    cand AS MATERIALIZED (
        SELECT b.fact_no, f.fact_id, b.bm25,
               %(w_bm25)s::float8 * b.bm25 / max(b.bm25) OVER ()
                   + %(w_rec)s::float8 * exp(-ln(2::float8)
                       * greatest(%(now_us)s::bigint - {_us("f.created_at")}, 0)::float8
                       / %(half_life)s::float8)
                   + %(w_imp)s::float8 * f.importance AS lexical
        FROM bm b
        JOIN facts f ON f.tenant = %(tenant)s AND f.user_id = %(user_id)s
                    AND f.fact_no = b.fact_no
        WHERE {_FILTER})
    SELECT 0, d.term_key, d.df FROM df d
    UNION ALL
    (SELECT 1, c.fact_no, c.bm25 FROM cand c ORDER BY c.bm25 DESC, c.fact_id LIMIT %(n)s)
    UNION ALL
    (SELECT 1, c.fact_no, c.lexical FROM cand c ORDER BY c.lexical DESC, c.fact_id LIMIT %(n)s)
    UNION ALL
    SELECT 2, s.n::bigint, s.avgdl FROM stats s"""
# The n nearest by cosine; with the user's HNSW index (its predicate is implied by this
# WHERE once the parameters are known: custom plans) an index scan, else an exact sort.
ANN = f"""
    SELECT f.fact_no FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s AND f.embedding_v_model = %(model)s
      AND f.valid_to IS NULL AND f.embedding_v IS NOT NULL AND {_LIVE} AND {_FILTER}
    ORDER BY f.embedding_v::vector({{dims}}) <=> %(q)s::vector({{dims}})
    LIMIT %(n)s"""
CANDIDATE_FACTS = """
    SELECT f.fact_no, f.fact_id, f.doc_len, f.importance, {created}, {expires}, f.kind, f.tags,
           f.embedding_model, f.embedding
    FROM facts f
    WHERE f.tenant = %(tenant)s AND f.user_id = %(user_id)s
      AND f.fact_no = ANY(%(nos)b::bigint[]) AND f.valid_to IS NULL""".format(
    created=_us("f.created_at"), expires=_us("f.expires_at")
)
CANDIDATE_POSTINGS = """
    SELECT t.term_key, t.fact_no, t.tf FROM fact_terms t
    WHERE t.tenant = %(tenant)s AND t.user_id = %(user_id)s
      AND t.fact_no = ANY(%(nos)b::bigint[]) AND t.term_key = ANY(%(keys)b::bigint[])"""
HNSW_STATE = """
    SELECT x.indisvalid FROM pg_class c JOIN pg_index x ON x.indexrelid = c.oid
    WHERE c.relname = %(name)s"""

# The statements of this module, for the schema tests (ANN at 256 dimensions).
STATEMENTS: dict[str, str] = {
    "MIRROR_PENDING": MIRROR_PENDING,
    "MIRROR_SET": MIRROR_SET,
    "CENTRE": CENTRE,
    "UNMIRRORED": UNMIRRORED,
    "LEXICAL": LEXICAL,
    "ANN": ANN.format(dims=256),
    "CANDIDATE_FACTS": CANDIDATE_FACTS,
    "CANDIDATE_POSTINGS": CANDIDATE_POSTINGS,
}


def vector_text(vector: np.ndarray) -> str:
    """pgvector's text form, exact: each float32 written as the shortest float64 repr,
    which parses back to the same float32."""
    return "[" + ",".join(map(repr, np.asarray(vector, np.float32).astype(float).tolist())) + "]"


def _user_prefix(tenant: str, user_id: str) -> str:
    digest = hashlib.blake2b(f"{tenant}\x1f{user_id}".encode(), digest_size=8)
    return f"facts_hnsw_{digest.hexdigest()}_"


def hnsw_index_name(tenant: str, user_id: str, model: str, dims: int) -> str:
    """The user's HNSW index for a model: named by a digest of the user (what an erasure
    finds them by) and one of the model, never by the ids themselves."""
    digest = hashlib.blake2b(f"{model}\x1f{dims}".encode(), digest_size=4)
    return f"{_user_prefix(tenant, user_id)}{digest.hexdigest()}"


@dataclass(frozen=True)
class _Lexical:
    df: dict[int, int]
    nos: list[int]
    live: int
    avgdl: float


async def _setup(conn: Conn) -> str:
    # Done already (the index is created last, in the same transaction): no ALTER TABLE,
    # whose exclusive lock would queue behind running queries at every start-up.
    ready = await (await conn.execute(READY)).fetchone()
    if not (ready and ready[0]):
        for statement in SETUP:
            await conn.execute(statement)
    row = await (await conn.execute(VERSION)).fetchone()
    return str(row[0]) if row else ""


async def _mirror_pending(conn: Conn, tenant: str, limit: int) -> list[tuple[Any, ...]]:
    cur = await conn.execute(MIRROR_PENDING, {"tenant": tenant, "limit": limit})
    return await cur.fetchall()


async def _mirror_set(conn: Conn, tenant: str, rows: Sequence[tuple[Any, ...]]) -> int:
    def text(raw: bytes) -> str | None:  # a malformed vector is marked done, without one
        return vector_text(np.frombuffer(raw, "<f4")) if raw and len(raw) % 4 == 0 else None

    cur = await conn.execute(
        MIRROR_SET,
        {
            "tenant": tenant,
            "user_id": [r[0] for r in rows],
            "fact_no": [int(r[1]) for r in rows],
            "v": [text(r[2]) for r in rows],
            "model": [r[3] for r in rows],
        },
    )
    return cur.rowcount


async def _corpus_part(
    conn: Conn, params: dict[str, Any], lexical: bool
) -> tuple[_Lexical | None, int, list[tuple[Any, ...]]]:
    """The BM25 statistics and candidates (when `lexical`), the user's facts version, and
    the facts not mirrored yet: one round trip."""
    async with conn.pipeline() as pipe:
        lex_cur = await conn.execute(LEXICAL, params) if lexical else None
        version_cur = await conn.execute(FACTS_VERSION, params)
        unmirrored_cur = await conn.execute(UNMIRRORED, params)
        await pipe.sync()
        lex_rows = await lex_cur.fetchall() if lex_cur is not None else None
        version_row = await version_cur.fetchone()
        unmirrored = await unmirrored_cur.fetchall()
    version = int(version_row[0]) if version_row else 0
    lex = None
    if lex_rows is not None:
        df: dict[int, int] = {}
        nos: list[int] = []
        live, avgdl = 0, 1.0
        for part, key, value in lex_rows:
            if part == 0:
                df[int(key)] = int(value)
            elif part == 1:
                nos.append(int(key))
            else:
                live, avgdl = int(key), float(value) if value is not None else 1.0
        lex = _Lexical(df, nos, live, avgdl)
    return lex, version, unmirrored


async def _centre(conn: Conn, params: dict[str, Any]) -> tuple[np.ndarray | None, int]:
    row = await (await conn.execute(CENTRE, params)).fetchone()
    if row is None or not row[1] or row[0] is None:
        return None, 0
    return np.asarray(row[0], np.float64), int(row[1])


async def _ann(conn: Conn, sql: str, params: dict[str, Any], ef_search: int) -> list[int]:
    await conn.execute(
        "SELECT set_config('hnsw.ef_search', %s, true), "
        "set_config('plan_cache_mode', 'force_custom_plan', true)",
        [str(ef_search)],
    )
    cur = await conn.execute(sql, params)
    return [int(r[0]) for r in await cur.fetchall()]


async def _candidate_rows(
    conn: Conn, params: dict[str, Any]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    async with conn.pipeline() as pipe:
        facts_cur = conn.cursor(binary=True)
        await facts_cur.execute(CANDIDATE_FACTS, params)
        postings_cur = await conn.execute(CANDIDATE_POSTINGS, params)
        await pipe.sync()
        facts = await facts_cur.fetchall()
        postings = await postings_cur.fetchall()
    return facts, postings


async def _drop_indexes(conn: Conn, prefix: str) -> int:
    cur = await conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'facts' "
        "AND starts_with(indexname, %(prefix)s)",
        {"prefix": prefix},
    )
    names = [row[0] for row in await cur.fetchall()]
    for name in names:
        await conn.execute(
            psql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(psql.Identifier(name))
        )
    return len(names)


async def _hnsw_state(conn: Conn, name: str) -> bool | None:
    cur = await conn.execute(HNSW_STATE, {"name": name})
    row = await cur.fetchone()
    return None if row is None else bool(row[0])


class PgVector:
    """The pgvector path of one process (None in the manager when off or unavailable)."""

    def __init__(
        self,
        db: PgDatabase,
        version: str,
        candidates: int = 200,
        min_facts: int = 20_000,
        batch: int = 256,
    ) -> None:
        self.db = db
        self.version = version
        self.candidates = candidates
        self.min_facts = min_facts
        self.batch = batch
        self._hnsw: dict[str, asyncio.Task[bool]] = {}  # known or being built
        self._centres: dict[tuple[str, str, str], tuple[tuple[int, int], Any, int]] = {}

    # -- start-up ------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls, db: PgDatabase, enabled: bool, candidates: int, min_facts: int, batch: int
    ) -> PgVector | None:
        """Create the extension and columns if they are missing; None (with one warning)
        when pgvector is off, not installed on the server, or not creatable here."""
        if not enabled:
            metrics.PGVECTOR_AVAILABLE.set(0)
            return None
        try:
            version = await db.write("pgvector_setup", _setup)
        except Exception as exc:  # no extension files, no privilege: today's paths serve
            metrics.PGVECTOR_AVAILABLE.set(0)
            log.warning(
                "pgvector unavailable: large users are recalled by a transient index load",
                extra={"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
            )
            return None
        metrics.PGVECTOR_AVAILABLE.set(1)
        log.info("pgvector recall path on", extra={"pgvector_version": version})
        return cls(db, version, candidates, min_facts, batch)

    async def close(self) -> None:
        """Stop HNSW builds still running (CONCURRENTLY: an interrupted one leaves an invalid
        index, dropped and rebuilt the next time)."""
        for task in self._hnsw.values():
            task.cancel()
        for task in self._hnsw.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drop_user_indexes(self, tenant: str, user_id: str) -> int:
        """After an erasure: drop the user's HNSW indexes (their definitions name the tenant
        and user id); how many were dropped. CONCURRENTLY, outside any transaction."""
        prefix = _user_prefix(tenant, user_id)
        for name in [n for n in self._hnsw if n.startswith(prefix)]:
            task = self._hnsw.pop(name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return int(await self.db.read("pgvector_hnsw_drop", _drop_indexes, prefix))

    # -- mirroring -----------------------------------------------------------------------------
    async def mirror_pass(self, tenants: Sequence[str]) -> int:
        """Copy every fact's bytea vector into `embedding_v` (new facts, re-embedded ones,
        facts stored before pgvector was on), a batch at a time; the facts mirrored."""
        done = 0
        with _tracer.start_as_current_span("memory.pgvector.mirror") as span:
            for tenant in tenants:
                while rows := await self.db.read(
                    "pgvector_mirror_pending", _mirror_pending, tenant, self.batch
                ):
                    updated = await self.db.write("pgvector_mirror", _mirror_set, tenant, rows)
                    done += updated
                    metrics.PGVECTOR_MIRRORED.inc(updated)
                    if updated < len(rows):  # changed meanwhile, or no vector: next pass
                        break
            span.set_attribute("memory.pgvector.mirrored", done)
        return done

    # -- recall --------------------------------------------------------------------------------
    async def candidates_index(
        self,
        tenant: str,
        user_id: str,
        model: str,
        term_keys: Sequence[int],
        flt: FactFilter,
        k: int,
        now_us: int,
        vector: QueryVector,
        weights: RecallWeights,
    ) -> UserIndex | None:
        """A small recall index over the user's candidates, with their whole-set statistics
        (None: too many facts not mirrored yet, serve another way)."""
        if not model or vector.model != model:
            return None
        dims = len(vector.values)
        n = max(10 * k, self.candidates)
        lexical = weights.mode is not RecallMode.VECTOR
        center_min_facts = weights.center_min_facts
        keys = sorted(set(term_keys)) if lexical else []
        params: dict[str, Any] = {
            "now_us": now_us,
            "w_bm25": weights.bm25,
            "w_rec": weights.recency,
            "w_imp": weights.importance,
            "half_life": weights.half_life_days * _US_PER_DAY,
            "tenant": tenant,
            "user_id": user_id,
            "model": model,
            "now": _dt(now_us),
            "keys": keys,
            "n": n,
            "limit": MAX_UNMIRRORED + 1,
            **_filter_params(flt),
        }
        lex, version, unmirrored = await self.db.snapshot(
            "recall_pgvector_stats", _corpus_part, params, bool(keys)
        )
        if len(unmirrored) > MAX_UNMIRRORED:
            return None
        # The mirrored vectors' mean, per facts version and number of facts not mirrored
        # yet (both move whenever the set of mirrored vectors does).
        key, stamp = (tenant, user_id, model), (version, len(unmirrored))
        cached = self._centres.get(key)
        if cached is None or cached[0] != stamp:
            mirrored_mean, mirrored = await self.db.snapshot(
                "recall_pgvector_centre", _centre, params
            )
            self._centres[key] = (stamp, mirrored_mean, mirrored)
            while len(self._centres) > _CENTRES_KEPT:
                self._centres.pop(next(iter(self._centres)))
        else:
            _, mirrored_mean, mirrored = cached
        extra = [np.frombuffer(b, "<f4") for _, b in unmirrored if len(b) == 4 * dims]
        count = mirrored + len(extra)
        mean: np.ndarray | None = None
        if count:
            total = np.zeros(dims, np.float64)
            if mirrored_mean is not None:
                total += mirrored_mean * mirrored
            for v in extra:
                total += v
            mean = total / count
        q = vector.values.astype(np.float64)
        if mean is not None and center_min_facts > 0 and count >= center_min_facts:
            q = q - mean  # nearest by the centred dot product (fact vectors are unit length)
        nos: set[int] = {int(no) for no, _ in unmirrored}
        if lex is not None:
            nos.update(lex.nos)
        if mirrored and bool(q.any()):
            with _tracer.start_as_current_span("memory.recall.pgvector_ann") as span:
                span.set_attribute("memory.recall.pgvector.candidates", n)
                ann = await self.db.snapshot(
                    "recall_pgvector_ann",
                    _ann,
                    ANN.format(dims=dims),
                    {**params, "q": vector_text(q)},
                    min(max(n, 40), MAX_EF_SEARCH),
                )
                span.set_attribute("memory.recall.pgvector.found", len(ann))
            nos.update(ann)
            if mirrored >= self.min_facts:
                self._ensure_hnsw(tenant, user_id, model, dims)
        if not nos:
            return UserIndex.build(
                index_facts_table([]), _postings([]), model=model, corpus=Corpus(0, 1.0, {})
            )
        facts, postings = await self.db.snapshot(
            "recall_pgvector_rows", _candidate_rows, {**params, "nos": sorted(nos)}
        )
        corpus = Corpus(
            live=lex.live if lex is not None else 0,
            avgdl=lex.avgdl if lex is not None else 1.0,
            df=lex.df if lex is not None else {},
            mean=mean,
            vectors=count,
        )
        return await asyncio.to_thread(
            UserIndex.build, index_facts_table(facts), _postings(postings), 0, model, corpus
        )

    # -- HNSW ----------------------------------------------------------------------------------
    def _ensure_hnsw(self, tenant: str, user_id: str, model: str, dims: int) -> None:
        name = hnsw_index_name(tenant, user_id, model, dims)
        if name in self._hnsw:
            return
        task = asyncio.create_task(self.build_hnsw(tenant, user_id, model, dims))
        self._hnsw[name] = task
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def build_hnsw(self, tenant: str, user_id: str, model: str, dims: int) -> bool:
        """Build the user's HNSW index (CONCURRENTLY: writes go on) unless it exists; True
        when it is there and valid. One replica builds it (advisory lock), others skip."""
        name = hnsw_index_name(tenant, user_id, model, dims)
        try:
            with _tracer.start_as_current_span("memory.pgvector.hnsw_build") as span:
                span.set_attribute("memory.pgvector.index", name)
                built = await self.db.read(
                    "pgvector_hnsw_build", self._build, name, tenant, user_id, model, dims
                )
                span.set_attribute("memory.pgvector.built", built)
            return built
        except Exception:
            log.exception("HNSW index build failed", extra={"index": name})
            self._hnsw.pop(name, None)  # try again on a later Recall
            return False

    async def _build(
        self, conn: Conn, name: str, tenant: str, user_id: str, model: str, dims: int
    ) -> bool:
        lock = await conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [name])
        got = await lock.fetchone()
        if not got or not got[0]:
            return False  # another replica builds it
        try:
            state = await _hnsw_state(conn, name)
            if state:
                return True
            if state is False:  # an earlier CONCURRENTLY build failed half-way
                await conn.execute(
                    psql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(psql.Identifier(name))
                )
            await conn.execute("SELECT set_config('statement_timeout', '0', false)")
            await conn.execute(
                psql.SQL(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON facts USING hnsw "
                    "((embedding_v::vector({dims})) vector_cosine_ops) "
                    "WHERE tenant = {tenant} AND user_id = {user} "
                    "AND embedding_v_model = {model} AND valid_to IS NULL"
                ).format(
                    name=psql.Identifier(name),
                    dims=psql.Literal(int(dims)),
                    tenant=psql.Literal(tenant),
                    user=psql.Literal(user_id),
                    model=psql.Literal(model),
                )
            )
            log.info("HNSW index built", extra={"index": name, "dims": dims})
            return bool(await _hnsw_state(conn, name))
        finally:
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false), "
                "pg_advisory_unlock(hashtextextended(%s, 0))",
                [f"{self.db.statement_timeout_ms}ms", name],
            )


def _postings(rows: Sequence[tuple[Any, ...]]) -> pa.Table:
    return pa.table(
        {
            "term_key": pa.array([int(r[0]) for r in rows], pa.int64()),
            "fact_no": pa.array([int(r[1]) for r in rows], pa.int64()),
            "tf": pa.array([int(r[2]) for r in rows], pa.int32()),
        },
        schema=INDEX_POSTINGS_SCHEMA,
    )
