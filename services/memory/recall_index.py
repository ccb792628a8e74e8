"""In-process recall index: each recently used user's postings as numpy arrays.

Why: scoring a query in SQL scans the postings table (DuckDB's planner uses no ART index
for these lookups, and common terms match a large share of a user's facts): 50-130 ms p50
at 100k facts per user on the shared 2-core box; docs/memory.md "Recall performance" lists
the alternatives measured. Here a user's postings are sorted by term key, so a query term
is two binary searches and a slice, and BM25 + recency + importance are computed with numpy
over the matching facts only (~2-3 ms p50 at 100k facts, ~36k candidates per query). DuckDB
is then asked for the k winners by `fact_no` (`storage.facts_by_no`, an ART index scan).

The ranking is exactly `storage.recall_facts`' (same statistics over the user's live facts,
same formula, same `round(score, 12) DESC, fact_id ASC` order); `tests/memory/
test_recall_index.py` compares the two on random corpora with filters and expiry.

Consistency (the database stays the system of record; an index is only ever a copy):
- `UserIndex` is immutable. Searches run on reader threads over a snapshot; all changes
  happen on the event loop by replacing the snapshot.
- A load reads facts and postings in one DuckDB transaction (one snapshot).
- Writes that delete a user's facts (Forget, consent withdrawal, DeleteUserData) call
  `invalidate` after their COMMIT and before their RPC answers; a retention purge that
  deleted facts by age calls `clear`. Remember calls `add` with the rows it inserted (after
  COMMIT, before answering), so remembering costs no reload. Expiry needs nothing: expiry
  times are part of the index and checked against the clock on every search.
- A load that overlaps such a call is *stale*: it still answers the requests that joined
  it (they are concurrent with the write), but it is not kept, and no later request joins
  it.
- Several replicas on one PostgreSQL database (the store is `shared`): the calls above
  only cover this process's own writes. Each index carries the user's facts version of
  the snapshot it was built from; every Recall first reads the current version (one
  primary-key read, services/memory/manager.py) and, when it moved, applies the facts
  added since (`with_added`, those numbered above `max_fact_no`) or, when facts were
  deleted since, reloads.
- Bounded: an LRU over users, capped by `max_entries` (postings + facts, ~16 and ~60-80
  bytes each). A user whose index alone exceeds the cap is served by SQL.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.memory import recall
from services.memory.models import FactFilter, QueryVector, RecallMode, RecallWeights
from services.memory.vectors import vector_matrix

Key = tuple[str, str]  # (tenant, user_id)
_NEVER = np.iinfo(np.int64).max  # expiry of a fact that does not expire
_LN2 = math.log(2)
_US_PER_DAY = 86_400 * 1_000_000
_TOO_BIG_MEMORY = 4096  # users remembered as "too big to cache" (LRU)
# Added postings wait in an unsorted tail (scanned linearly) until it holds more than
# max(TAIL_MIN, sorted postings / 8); then one O(n) merge.
TAIL_MIN = 4096


PRUNE_MIN = 2048  # below this many candidates, score them all
# Facts added to a cached index are centred on its mean as it was (no pass over all the
# vectors per Remember) until the vectors held outgrow the mean's count by this factor.
RECENTRE_GROWTH = 1.125


@dataclass(frozen=True)
class Corpus:
    """Statistics of a user's whole fact set for an index that holds only some of their
    facts (the pgvector path's candidates, services/memory/pgvector.py), so that the same
    scoring code gives every candidate the score the full index would: BM25's N (live
    facts), avgdl and df per query term key, and the mean of the user's fact vectors of
    the index's model (`vectors` of them; None: none)."""

    live: int
    avgdl: float
    df: dict[int, int]
    mean: np.ndarray | None = None
    vectors: int = 0


@dataclass(frozen=True)
class _Live:
    """Which facts are live for `since_us <= now < until_us`, and what depends on it."""

    since_us: int
    until_us: int
    mask: np.ndarray | None  # None: all
    count: int
    length_norm: np.ndarray  # K1 * (1 - B + B * doc_len / avgdl), per fact
    n: int = 0  # BM25's N: `count`, or the corpus' live facts


@dataclass(frozen=True)
class _Centre:
    """A mean of the index's fact vectors, and each fact's distance from it."""

    count: int  # facts with a vector that the mean was taken over
    held: int  # facts with a vector now (more than `count` after additions)
    mean: np.ndarray  # float64 (dimensions,)
    norm: np.ndarray  # float64 per fact: |vector - mean|, 0 for a fact without a vector

    def with_rows(self, vectors: np.ndarray) -> _Centre | None:
        """This centre extended to rows appended to the index (their distances from the
        same mean), or None when they make it stale (the next search recomputes it)."""
        if vectors.ndim != 2 or vectors.shape[1] != len(self.mean):
            return None
        squares = np.einsum("ij,ij->i", vectors, vectors).astype(np.float64)
        total = self.held + int(np.count_nonzero(squares > 0))
        if total > self.count * RECENTRE_GROWTH:
            return None
        norm = _distances(vectors, squares, self.mean)
        return _Centre(self.count, total, self.mean, np.concatenate([self.norm, norm]))


@dataclass(frozen=True)
class Hit:
    """A ranked fact: its internal number and the score parts (as in `ScoredFact`)."""

    fact_no: int
    bm25: float
    bm25_normalized: float
    recency: float
    importance: float
    score: float
    vector_similarity: float = 0.0
    vector_normalized: float = 0.0
    relevance: float = 0.0


def _ids(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fact ids as fixed-width bytes, which sort as DuckDB sorts VARCHAR (byte order).
    Ids of one length (all generated ones) are viewed straight from the Arrow buffer."""
    arr = pc.cast(column, pa.string())
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype="S1")
    if arr.null_count == 0:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
        width = int(offsets[1] - offsets[0])
        if width > 0 and bool(np.all(np.diff(offsets) == width)):
            data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
            return data[offsets[0] : offsets[-1]].view(f"S{width}").copy()
    return np.array([v.encode() for v in arr.to_pylist()], dtype=bytes)


@dataclass(frozen=True)
class UserIndex:
    """One user's facts (by position) and postings (sorted by term key, plus an unsorted
    tail of recent additions that is merged in once it grows)."""

    fact_no: np.ndarray  # int64, position -> fact_no
    fact_id: np.ndarray  # bytes
    doc_len: np.ndarray  # float64
    importance: np.ndarray  # float64
    created_us: np.ndarray  # int64
    expires_us: np.ndarray  # int64 (_NEVER when none)
    kind_code: np.ndarray  # int32 index into `kinds`
    kinds: tuple[str, ...]
    tags: dict[str, np.ndarray]  # tag -> sorted positions
    keys: np.ndarray  # int64, sorted
    post_pos: np.ndarray  # int32 positions
    post_tf: np.ndarray  # int32
    tail_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tail_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    tail_tf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # The user's facts version of the snapshot (0: the store keeps none).
    version: int = 0
    # Vectors of `model` by position (float32, unit length; zeros where a fact has none of
    # this model: it scores 0 on the vector part), and the model ("": no vectors held).
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    model: str = ""
    # Whole-set statistics when this index holds only some of the user's facts (None: all).
    corpus: Corpus | None = None
    _live_cache: list[_Live | None] = field(
        default_factory=lambda: [None], compare=False, repr=False
    )
    _centre_cache: list[_Centre | None] = field(
        default_factory=lambda: [None], compare=False, repr=False
    )

    @property
    def size(self) -> int:
        """What the cache budget counts: postings + facts, and a vector as its bytes in
        16-byte units (a posting's size): 64 for 256 float32 components."""
        return len(self.keys) + len(self.tail_keys) + len(self.fact_no) + self.vectors.size // 4

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    @property
    def max_fact_no(self) -> int:
        """The highest fact number held (facts added later are numbered above it)."""
        return int(self.fact_no.max()) if len(self.fact_no) else 0

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        facts: pa.Table,
        postings: pa.Table,
        version: int = 0,
        model: str = "",
        corpus: Corpus | None = None,
    ) -> UserIndex:
        """From a user's facts and their postings (any order; the loader sorts postings
        by term key in SQL, which saves the sort here), keeping the vectors of `model`;
        `corpus`: the statistics of all the user's facts when these are only some."""
        facts = facts.sort_by("fact_no")
        fact_no = facts["fact_no"].to_numpy()
        kinds_enc = pc.dictionary_encode(facts["kind"]).combine_chunks()
        keys, pos, tf = _postings_arrays(postings, fact_no)
        if len(keys) > 1 and not bool(np.all(keys[1:] >= keys[:-1])):
            order = np.argsort(keys, kind="stable")
            keys, pos, tf = keys[order], pos[order], tf[order]
        return cls(
            fact_no=fact_no,
            fact_id=_ids(facts["fact_id"]),
            doc_len=facts["doc_len"].to_numpy().astype(np.float64),
            importance=facts["importance"].to_numpy().astype(np.float64),
            created_us=facts["created_us"].to_numpy(),
            expires_us=facts["expires_us"].fill_null(_NEVER).to_numpy(),
            kind_code=kinds_enc.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            kinds=tuple(kinds_enc.dictionary.to_pylist()),
            tags=_tag_positions(facts["tags"], 0),
            keys=keys,
            post_pos=pos,
            post_tf=tf,
            version=version,
            vectors=_model_vectors(facts, model),
            model=model,
            corpus=corpus,
        )

    def contains(self, fact_nos: np.ndarray) -> np.ndarray:
        return np.isin(fact_nos, self.fact_no)

    def with_added(
        self, facts: pa.Table, postings: pa.Table, version: int | None = None
    ) -> UserIndex:
        """This index plus newly inserted facts (all absent from it) and their postings, at
        `version` (default: unchanged)."""
        facts = facts.sort_by("fact_no")
        base = len(self.fact_no)
        added_no = facts["fact_no"].to_numpy()
        all_no = np.concatenate([self.fact_no, added_no])
        # Positions are append order; fact_no order is not needed for lookups.
        keys, pos, tf = _postings_arrays(postings, added_no, offset=base)
        kinds = list(self.kinds)
        code_of = {k: i for i, k in enumerate(kinds)}
        codes = []
        for kind in facts["kind"].to_pylist():
            if kind not in code_of:
                code_of[kind] = len(kinds)
                kinds.append(kind)
            codes.append(code_of[kind])
        tags = dict(self.tags)
        for tag, positions in _tag_positions(facts["tags"], base).items():
            old = tags.get(tag)
            tags[tag] = positions if old is None else np.concatenate([old, positions])
        merged = UserIndex(
            fact_no=all_no,
            fact_id=np.concatenate([self.fact_id, _ids(facts["fact_id"])]),
            doc_len=np.concatenate([self.doc_len, facts["doc_len"].to_numpy().astype(float)]),
            importance=np.concatenate([self.importance, facts["importance"].to_numpy()]),
            created_us=np.concatenate([self.created_us, facts["created_us"].to_numpy()]),
            expires_us=np.concatenate(
                [self.expires_us, facts["expires_us"].fill_null(_NEVER).to_numpy()]
            ),
            kind_code=np.concatenate([self.kind_code, np.array(codes, np.int32)]),
            kinds=tuple(kinds),
            tags=tags,
            keys=self.keys,
            post_pos=self.post_pos,
            post_tf=self.post_tf,
            tail_keys=np.concatenate([self.tail_keys, keys]),
            tail_pos=np.concatenate([self.tail_pos, pos]),
            tail_tf=np.concatenate([self.tail_tf, tf]),
            version=self.version if version is None else version,
            vectors=_joined_vectors(
                self.vectors, _model_vectors(facts, self.model, self.dimensions)
            ),
            model=self.model,
        )
        centre = self._centre_cache[0]
        if centre is not None:
            merged._centre_cache[0] = centre.with_rows(merged.vectors[base:])
        if len(merged.tail_keys) > max(TAIL_MIN, len(merged.keys) // 8):
            return merged._merged_tail()
        return merged

    def _merged_tail(self) -> UserIndex:
        """The tail merged into the sorted postings (O(n): one insert per array)."""
        order = np.argsort(self.tail_keys, kind="stable")
        tail_keys = self.tail_keys[order]
        at = np.searchsorted(self.keys, tail_keys, side="right")
        return UserIndex(
            fact_no=self.fact_no,
            fact_id=self.fact_id,
            doc_len=self.doc_len,
            importance=self.importance,
            created_us=self.created_us,
            expires_us=self.expires_us,
            kind_code=self.kind_code,
            kinds=self.kinds,
            tags=self.tags,
            keys=np.insert(self.keys, at, tail_keys),
            post_pos=np.insert(self.post_pos, at, self.tail_pos[order]),
            post_tf=np.insert(self.post_tf, at, self.tail_tf[order]),
            version=self.version,
            vectors=self.vectors,
            model=self.model,
            _centre_cache=[self._centre_cache[0]],  # same vectors, same centre
        )

    # -- searching ---------------------------------------------------------------------------
    def _postings(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        lo = int(np.searchsorted(self.keys, key, side="left"))
        hi = int(np.searchsorted(self.keys, key, side="right"))
        pos, tf = self.post_pos[lo:hi], self.post_tf[lo:hi]
        if len(self.tail_keys):
            more = self.tail_keys == key
            if more.any():
                pos = np.concatenate([pos, self.tail_pos[more]])
                tf = np.concatenate([tf, self.tail_tf[more]])
        return pos, tf

    def _filter(self, cand: np.ndarray, flt: FactFilter) -> np.ndarray:
        """Which of the candidate positions pass the filter (a boolean mask)."""
        keep = np.ones(len(cand), dtype=bool)
        if flt.kinds:
            wanted = set(flt.kinds)
            codes = [i for i, kind in enumerate(self.kinds) if kind in wanted]
            keep &= np.isin(self.kind_code[cand], codes)
        if flt.tags:
            tagged = [self.tags[t] for t in set(flt.tags) if t in self.tags]
            if not tagged:
                return np.zeros(len(cand), dtype=bool)
            keep &= np.isin(cand, np.concatenate(tagged))
        if flt.created_after_us is not None:
            keep &= self.created_us[cand] >= flt.created_after_us
        if flt.created_before_us is not None:
            keep &= self.created_us[cand] < flt.created_before_us
        return keep

    def _live_at(self, now_us: int) -> _Live:
        """The live set at `now_us`, reused until the next fact expires (or the clock moves
        back past the last expiry)."""
        cached = self._live_cache[0]
        if cached is not None and cached.since_us <= now_us < cached.until_us:
            return cached
        live = self.expires_us > now_us
        count = int(np.count_nonzero(live))
        mask = None if count == len(live) else live
        gone = self.expires_us[~live] if mask is not None else self.expires_us[:0]
        avgdl = float(self.doc_len[live].sum()) / count if count else 1.0
        if self.corpus is not None and self.corpus.live:
            avgdl = self.corpus.avgdl
        k1, b = recall.K1, recall.B
        entry = _Live(
            since_us=int(gone.max()) if len(gone) else -_NEVER,
            until_us=int(self.expires_us[live].min()) if count else _NEVER,
            mask=mask,
            count=count,
            # The BM25 length normalisation, written as storage.recall_facts writes it
            # (same operations in the same order: same floating-point result).
            length_norm=k1 * (1 - b + b * self.doc_len / avgdl),
            n=count if self.corpus is None else self.corpus.live,
        )
        self._live_cache[0] = entry  # a racing thread computes the same value
        return entry

    def search(
        self,
        term_keys: Sequence[int],
        flt: FactFilter,
        k: int,
        now_us: int,
        weights: RecallWeights,
        query_vector: QueryVector | None = None,
    ) -> list[Hit]:
        """The top `k` live facts. Lexical mode ranks as `storage.recall_facts` ranks;
        hybrid and vector modes add the cosine similarity of the query's vector (of this
        index's model) to every live fact's (services/memory/recall.py `fuse`)."""
        if len(self.fact_no) == 0:
            return []
        live = self._live_at(now_us)
        if live.count == 0:
            return []
        cos, centred = (
            self._cosine(query_vector, weights.center_min_facts)
            if weights.mode is not RecallMode.LEXICAL
            else (None, False)
        )
        # Centred similarities are lower than plain cosines (unrelated texts: median about
        # -0.01 instead of 0.05): each has its own floor, measured on its own.
        min_similarity = weights.center_min_similarity if centred else weights.min_similarity
        # Without a query vector of this index's model, hybrid and vector recall are lexical.
        mode = weights.mode if cos is not None else RecallMode.LEXICAL
        bm = self._bm25(term_keys, live) if term_keys and mode is not RecallMode.VECTOR else None
        if bm is None and cos is None:
            cand = np.flatnonzero(live.mask) if live.mask is not None else np.arange(live.count)
            raw = np.zeros(len(cand))
            sim = np.zeros(len(cand))
        else:
            matched = np.zeros(len(self.fact_no), dtype=bool)
            if bm is not None:
                matched |= bm > 0  # every matching term adds > 0 (idf > 0, tf >= 1)
            if cos is not None:
                matched |= cos >= min_similarity
            if live.mask is not None:
                matched &= live.mask
            cand = np.flatnonzero(matched)
            raw = bm[cand] if bm is not None else np.zeros(len(cand))
            sim = cos[cand] if cos is not None else np.zeros(len(cand))
        if not flt.is_empty:
            keep = self._filter(cand, flt)
            cand, raw, sim = cand[keep], raw[keep], sim[keep]
        if len(cand) == 0:
            return []
        top = float(raw.max())
        norm = raw / top if top > 0 else np.zeros(len(cand))
        # Below the floor a similarity is noise (unrelated texts score about -0.1 to 0.1
        # with the local model): it neither makes a candidate nor adds relevance, and the
        # floor is the zero of the normalised part (min-max, as the benchmark measured).
        floor = max(min_similarity, 0.0)
        above = np.where(sim >= floor, sim - floor, 0.0)
        vtop = float(above.max())
        vnorm = above / vtop if vtop > 0 else np.zeros(len(cand))
        rel = recall.fuse(norm, vnorm, mode, weights)
        importance = self.importance[cand]
        half_life_us = weights.half_life_days * _US_PER_DAY

        def scores(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(recency, score) of the candidates at positions `at`, as SQL computes them."""
            age = np.maximum(now_us - self.created_us[cand[at]], 0)
            recency = np.exp(-_LN2 * age / half_life_us)
            score = (
                weights.bm25 * rel[at]
                + weights.recency * recency
                + weights.importance * importance[at]
            )
            return recency, score

        sel = np.arange(len(cand))
        if len(cand) > max(PRUNE_MIN, 8 * k):
            # Only candidates that could reach the k-th best score need it computed:
            # recency <= 1, so w_bm25*rel + w_rec + w_imp*importance bounds a score from
            # above (floating-point rounding is monotonic, so the bound holds exactly).
            bound = np.round(
                weights.bm25 * rel + weights.recency * 1.0 + weights.importance * importance,
                12,
            )
            first = np.argpartition(-bound, 8 * k - 1)[: 8 * k]
            exact = np.round(scores(first)[1], 12)
            kth = np.partition(exact, len(first) - k)[len(first) - k]
            sel = np.flatnonzero(bound >= kth)  # the rest score < kth: never chosen
        recency, score = scores(sel)
        rounded = np.round(score, 12)
        if len(sel) > k:  # only the k best and whatever ties the k-th need ordering
            kth = np.partition(rounded, len(sel) - k)[len(sel) - k]
            chosen = np.flatnonzero(rounded >= kth)
        else:
            chosen = np.arange(len(sel))
        order = chosen[np.lexsort((self.fact_id[cand[sel[chosen]]], -rounded[chosen]))][:k]
        return [
            Hit(
                fact_no=int(self.fact_no[cand[sel[j]]]),
                bm25=float(raw[sel[j]]),
                bm25_normalized=float(norm[sel[j]]),
                recency=float(recency[j]),
                importance=float(importance[sel[j]]),
                score=float(score[j]),
                vector_similarity=float(sim[sel[j]]),
                vector_normalized=float(vnorm[sel[j]]),
                relevance=float(rel[sel[j]]),
            )
            for j in order
        ]

    def _bm25(self, term_keys: Sequence[int], live: _Live) -> np.ndarray:
        """BM25 of every fact for the query's terms (0 where none matches or not live)."""
        bm = np.zeros(len(self.fact_no))
        k1 = recall.K1
        for key in sorted(set(term_keys)):
            pos, tf = self._postings(key)
            if live.mask is not None:
                alive = live.mask[pos]
                pos, tf = pos[alive], tf[alive]
            if len(pos) == 0:
                continue
            df = len(pos) if self.corpus is None else self.corpus.df.get(key, len(pos))
            idf = math.log(1 + (live.n - df + 0.5) / (df + 0.5))
            bm[pos] += idf * tf * (k1 + 1) / (tf + live.length_norm[pos])
        return bm

    def _cosine(
        self, query: QueryVector | None, center_min_facts: int = 0
    ) -> tuple[np.ndarray | None, bool]:
        """(similarity of every fact's vector to the query's (float64; 0 for a fact without a
        vector), or None when the query has no vector of this index's model; whether the
        vectors were centred).

        The cosine of the two vectors, each minus the mean `m` of this index's fact vectors
        once it holds at least `center_min_facts` of them (0: never centred):

            sim = (v - m) . (q - m) / (|v - m| |q - m|)

        Why: a static model's vectors are means of word vectors, and all of one user's
        facts share a large common part (the words everyone uses, the user's subject), so
        raw cosines of a query to them all are high and close together; what a fact does
        not share with the others is what tells it apart (docs/memory.md "Recall quality":
        +0.04 to +0.07 recall@10 for vector, +0.02 to +0.055 for hybrid). Below the minimum
        the mean of a few facts is mostly those facts themselves. Cost: one matrix-vector
        product per query as before, plus O(facts) arithmetic; the mean and the distances
        from it are computed on the first search of a loaded index (three passes over the
        vectors), and facts added to it later are centred on that mean (`_Centre.with_rows`)
        until they are an eighth more than it was taken over."""
        if query is None or not self.model or query.model != self.model:
            return None, False
        if self.dimensions == 0 or len(query.values) != self.dimensions:
            return None, False
        centre = self._centred() if center_min_facts > 0 else None
        if centre is None or centre.held < center_min_facts:
            return (self.vectors @ query.values.astype(np.float32)).astype(np.float64), False
        q = query.values.astype(np.float64) - centre.mean
        q_norm = float(np.linalg.norm(q))
        if q_norm == 0.0:
            return np.zeros(len(self.fact_no)), True
        dot = (self.vectors @ q.astype(np.float32)).astype(np.float64) - float(centre.mean @ q)
        scale = centre.norm * q_norm
        ok = scale > 0
        return np.where(ok, np.clip(dot / np.where(ok, scale, 1.0), -1.0, 1.0), 0.0), True

    def _centred(self) -> _Centre:
        """The mean of the fact vectors held (live or not) and each fact's distance from
        it (three passes over the vectors), kept with the snapshot and extended to the
        facts added to it (`with_added`)."""
        cached = self._centre_cache[0]
        if cached is not None:
            return cached
        v = self.vectors
        squares = np.einsum("ij,ij->i", v, v).astype(np.float64)
        count = int(np.count_nonzero(squares > 0))
        if self.corpus is not None:  # the mean of all the user's vectors, not of these
            count = self.corpus.vectors if self.corpus.mean is not None else 0
        if self.corpus is not None and self.corpus.mean is not None and count:
            mean = np.asarray(self.corpus.mean, np.float64)
        else:
            mean = v.sum(axis=0, dtype=np.float64) / count if count else np.zeros(self.dimensions)
        entry = _Centre(count, count, mean, _distances(v, squares, mean))
        self._centre_cache[0] = entry  # a racing thread computes the same value
        return entry


def _distances(vectors: np.ndarray, squares: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """|v - mean| per row (`squares`: |v|^2), 0 for a row without a vector (all zeros)."""
    to_mean = (vectors @ mean.astype(np.float32)).astype(np.float64)
    distance = np.sqrt(np.maximum(squares - 2 * to_mean + float(mean @ mean), 0.0))
    return np.where(squares > 0, distance, 0.0)


def _model_vectors(facts: pa.Table, model: str, width: int = 0) -> np.ndarray:
    """The vectors of `model` among `facts`, zeros for the other facts: shape (n, width),
    or, when `width` is 0, the length of the model's first vector (0: none of the model)."""
    n = facts.num_rows
    if not model or "embedding" not in facts.column_names:
        return np.zeros((n, width), np.float32)
    is_model = pc.fill_null(pc.equal(facts["embedding_model"], model), False)
    if width == 0:
        lengths = pc.list_value_length(pc.filter(facts["embedding"], is_model)).drop_null()
        width = int(lengths[0].as_py()) if len(lengths) else 0
    vectors, ok = vector_matrix(facts["embedding"], width)
    vectors[~(ok & is_model.to_numpy(zero_copy_only=False))] = 0.0
    return vectors


def _joined_vectors(base: np.ndarray, added: np.ndarray) -> np.ndarray:
    """`base` rows then `added` rows; an empty width takes the other's (zeros)."""
    if base.shape[1] != added.shape[1]:
        if base.shape[1] == 0:
            base = np.zeros((base.shape[0], added.shape[1]), np.float32)
        else:  # a model's vectors all have one width: only an absent vector is narrower
            added = np.zeros((added.shape[0], base.shape[1]), np.float32)
    return np.concatenate([base, added])


def _postings_arrays(
    postings: pa.Table, fact_no: np.ndarray, offset: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term keys, fact positions + offset, tf) of the postings whose fact is in `fact_no`
    (sorted ascending)."""
    keys = postings["term_key"].to_numpy()
    nos = postings["fact_no"].to_numpy()
    tf = postings["tf"].to_numpy().astype(np.int32)
    if len(fact_no) == 0:
        return keys[:0], np.zeros(0, np.int32), tf[:0]
    at = np.minimum(np.searchsorted(fact_no, nos), len(fact_no) - 1)
    known = fact_no[at] == nos  # a posting of a fact outside the snapshot is dropped
    pos = (at[known] + offset).astype(np.int32)
    return keys[known], pos, tf[known]


def _tag_positions(column: pa.ChunkedArray, offset: int) -> dict[str, np.ndarray]:
    tags = column.combine_chunks()
    if len(tags) == 0:
        return {}
    flat = pc.list_flatten(tags).to_pylist()
    parents = pc.list_parent_indices(tags).to_numpy() + offset
    out: dict[str, list[int]] = {}
    for tag, parent in zip(flat, parents.tolist(), strict=True):
        out.setdefault(tag, []).append(parent)
    return {t: np.unique(np.array(p, np.int32)) for t, p in out.items()}


@dataclass
class _Load:
    task: asyncio.Task[UserIndex] | None = None
    stale: bool = False


def _retrieve(task: asyncio.Task[UserIndex]) -> None:
    if not task.cancelled():
        task.exception()  # a load nobody awaits any more must not log "never retrieved"


class RecallIndex:
    """LRU of `UserIndex` per (tenant, user), bounded by `max_entries` (0 = disabled)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, UserIndex] = OrderedDict()
        self._loading: dict[Key, _Load] = {}
        self._too_big: OrderedDict[Key, int] = OrderedDict()
        self.size = 0
        self.loads = 0  # loads started (tests, metrics)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: Key) -> UserIndex | None:
        return self._entries.get(key)

    async def get(self, key: Key, load: Callable[[], Awaitable[UserIndex]]) -> UserIndex | None:
        """The user's index (loaded with `load` on a miss), or None: serve from SQL.

        A load runs as its own task, shared by the requests that arrive while it runs, so
        a caller that gives up cancels only its own wait."""
        if not self.enabled or key in self._too_big:
            return None
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        pending = self._loading.get(key)
        if pending is None or pending.stale:
            pending = _Load()
            self._loading[key] = pending
            pending.task = asyncio.create_task(self._load(key, pending, load))
            pending.task.add_done_callback(_retrieve)
        assert pending.task is not None
        # A stale load still answers whoever joined it before it went stale: they all
        # started before the write that made it stale finished (they are concurrent).
        return await asyncio.shield(pending.task)

    async def _load(
        self, key: Key, mine: _Load, load: Callable[[], Awaitable[UserIndex]]
    ) -> UserIndex:
        self.loads += 1
        try:
            index = await load()
        finally:
            if self._loading.get(key) is mine:
                del self._loading[key]
        if index.size > self.max_entries:  # answers these requests; later ones use SQL
            self._too_big[key] = index.size
            while len(self._too_big) > _TOO_BIG_MEMORY:
                self._too_big.popitem(last=False)
        elif not mine.stale:
            self._install(key, index)
        return index

    def _install(self, key: Key, index: UserIndex) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.size
        if index.size > self.max_entries:
            return
        self._entries[key] = index
        self.size += index.size
        while self.size > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted.size

    def _mark_stale(self, key: Key) -> None:
        pending = self._loading.get(key)
        if pending is not None:
            pending.stale = True

    def add(self, key: Key, facts: pa.Table, postings: pa.Table, version: int = 0) -> None:
        """Facts a committed Remember inserted (committing facts `version`, 0 when the store
        keeps none): extend the cached index, if any."""
        self._mark_stale(key)
        entry = self._entries.get(key)
        if entry is None:
            return
        if version and entry.version >= version:  # a load after the COMMIT has them
            return
        if version and entry.version != version - 1:
            return  # another replica wrote in between: the next version check catches up
        if facts.num_rows == 0:
            if version:  # nothing new (all duplicates), but the version moved
                self._install(key, entry.with_added(facts, postings, version))
            return
        present = entry.contains(facts["fact_no"].to_numpy())
        if present.all():  # a load that began after the COMMIT already has them
            return
        if present.any():  # cannot happen (one transaction); never guess
            self.invalidate(key)
            return
        self._install(key, entry.with_added(facts, postings, version or None))

    def replace(self, key: Key, old: UserIndex, new: UserIndex) -> None:
        """Install `new` (built from `old`) unless the entry changed meanwhile."""
        if self._entries.get(key) is old:
            self._install(key, new)

    def invalidate(self, key: Key) -> None:
        """The user's facts changed in a way only a reload reflects (deletions)."""
        self._mark_stale(key)
        self._too_big.pop(key, None)
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.size

    def clear(self) -> None:
        for pending in self._loading.values():
            pending.stale = True
        self._entries.clear()
        self._too_big.clear()
        self.size = 0
