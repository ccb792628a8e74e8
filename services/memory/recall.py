"""Lexical recall: the tokenizer, term keys and BM25 constants shared by indexing and search.

BM25 (Robertson/Sparck Jones, the Lucene variant whose IDF is never negative):

    score(D, Q) = sum over distinct terms t of Q present in D of
        idf(t) * tf(t, D) * (K1 + 1) / (tf(t, D) + K1 * (1 - B + B * |D| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

N, df and avgdl are computed over the *user's* live (unexpired) facts only: a user is a
partition, so another user's or tenant's facts never influence a score. The scoring lives
in `recall_index` and in the stores' `recall_facts` (storage.py, storage_pg.py); this
module only turns text into terms.

Tokenisation (version `TOKENIZER_VERSION` = 2): NFKC normalisation, case folding, maximal
runs of letters/digits, minus an English stop-word list (function words and the question
words users ask with: "how", "much", "tell"…), each word stemmed with Snowball's English
(Porter2) stemmer ("stocks" and "stock" are one term, "holdings" and "holding" too); a
token with a digit is kept as it is ("2021", "401k", "3m"), and tickers are words like any
other ("msft", "aapl" are their own stems). Version 1 (before 2026-12) had a short stop
list and no stemming; facts indexed by it are re-indexed in the background
(services/memory/manager.py `reindex_pass`), their `tokenizer` column says which.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np
import snowballstemmer

from services.memory.models import Fusion, RecallMode, RecallWeights

K1 = 1.2
B = 0.75
MAX_TERM_CHARS = 64
TOKENIZER_VERSION = 2
_STEMMER = snowballstemmer.stemmer("english")

_WORD = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")

STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "will",
        "with",
        "you",
        "your",
        # Version 2: function words and the words questions are asked with.
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "also",
        "am",
        "any",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "further",
        "get",
        "got",
        "had",
        "having",
        "here",
        "how",
        "just",
        "know",
        "like",
        "many",
        "more",
        "most",
        "much",
        "now",
        "off",
        "once",
        "only",
        "other",
        "over",
        "own",
        "remind",
        "same",
        "should",
        "since",
        "some",
        "such",
        "tell",
        "too",
        "under",
        "until",
        "up",
        "very",
        "while",
        "why",
        "would",
    }
)


def tokenize(text: str) -> list[str]:
    """Terms of `text`, in order, duplicates kept (they are the term frequencies)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [_term(w) for w in _WORD.findall(folded) if w not in STOPWORDS]


@functools.lru_cache(maxsize=65_536)
def _term(word: str) -> str:
    """A word's term: its stem, or itself when it holds a digit."""
    if any(c.isdigit() for c in word):
        return word[:MAX_TERM_CHARS]
    return _STEMMER.stemWord(word)[:MAX_TERM_CHARS]


def term_frequencies(text: str) -> tuple[Counter[str], int]:
    """(tf per distinct term, document length in terms)."""
    terms = tokenize(text)
    return Counter(terms), len(terms)


def query_terms(query: str) -> list[str]:
    """Distinct terms of a query, sorted (a repeated query word counts once)."""
    return sorted(set(tokenize(query)))


def term_key(tenant: str, user_id: str, term: str) -> int:
    """Signed 64-bit key of a term inside one user's partition (blake2b, stable across runs).

    A collision could only add a posting to a candidate list; candidates are always joined
    back to facts filtered by the exact tenant and user, so it can never cross partitions.
    """
    digest = hashlib.blake2b(f"{tenant}\x00{user_id}\x00{term}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def normalise_fact(text: str) -> str:
    """The form two facts are compared in for deduplication."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def fact_hash(text: str) -> str:
    return hashlib.sha256(normalise_fact(text).encode()).hexdigest()


def fuse(
    bm25_normalized: np.ndarray,
    vector_normalized: np.ndarray,
    mode: RecallMode,
    weights: RecallWeights,
) -> np.ndarray:
    """The relevance each candidate's score weighs, in [0, 1] (ScoreParts.relevance).

    Both inputs are normalised over the candidates (divided by the best). Lexical and
    vector modes use one part; hybrid fuses them: "relative" is the convex combination
    (1 - a) * bm25 + a * vector (relative-score fusion); "rrf" is reciprocal-rank fusion,
    sum over the two rankings of 1 / (k + rank) for the candidates each ranks (a
    candidate with a part of 0 is not in that ranking; ties share the better rank),
    multiplied by (k + 1) / 2 so that first in both is 1.
    """
    if mode is RecallMode.LEXICAL:
        return bm25_normalized
    if mode is RecallMode.VECTOR:
        return vector_normalized
    if weights.fusion is Fusion.RRF:
        k = weights.rrf_k
        return (_reciprocal_ranks(bm25_normalized, k) + _reciprocal_ranks(vector_normalized, k)) * (
            (k + 1) / 2
        )
    a = weights.vector_weight
    return (1 - a) * bm25_normalized + a * vector_normalized


def _reciprocal_ranks(values: np.ndarray, k: int) -> np.ndarray:
    """1 / (k + rank) of the positive values (rank 1 = largest; equal values share the
    better rank), 0 for the rest."""
    out = np.zeros(len(values))
    ranked = values > 0
    if ranked.any():
        present = values[ranked]
        ascending = np.sort(present)
        greater = len(ascending) - np.searchsorted(ascending, present, side="right")
        out[ranked] = 1.0 / (k + 1 + greater)
    return out
