"""Embeddings: deterministic vectors, usage and the OpenAI `/embeddings` JSON.

A vector is a hashed bag of words: every lower-cased word token (``\\w+``) adds 1 to the
bucket ``blake2b(word) mod dimensions``, then the vector is L2-normalised. Texts sharing
words are therefore similar (cosine > 0), the same text always gets the same vector, and
texts with no word in common are orthogonal unless their words collide in a bucket.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 8192
MAX_INPUTS = 2048

_WORD_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def embed_text(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The deterministic unit vector of `text` (a text without words hashes whole)."""
    vector = [0.0] * dimensions
    for word in words(text) or [text]:
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        vector[int.from_bytes(digest, "little") % dimensions] += 1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


def prompt_tokens(texts: Sequence[str]) -> int:
    """A "token" is a whitespace-separated word, as for chat (at least 1 per input)."""
    return sum(max(1, len(t.split())) for t in texts)


def inputs_of(body: Mapping[str, Any]) -> list[str]:
    raw = body["input"]
    return [raw] if isinstance(raw, str) else list(raw)


def embeddings_payload(
    entry_id: int, body: Mapping[str, Any], override: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    texts = inputs_of(body)
    dimensions = int(body.get("dimensions") or DEFAULT_DIMENSIONS)
    tokens = prompt_tokens(texts)
    usage: dict[str, Any] = {"prompt_tokens": tokens, "total_tokens": tokens}
    usage.update(override or {})
    return {
        "object": "list",
        "id": f"embd-dev-{entry_id}",
        "created": int(time.time()),
        "model": str(body["model"]),
        "data": [
            {"object": "embedding", "index": i, "embedding": embed_text(t, dimensions)}
            for i, t in enumerate(texts)
        ],
        "usage": usage,
    }


def validate_embeddings_body(body: object) -> str | None:
    """Return a 400 message for a malformed embeddings request, None when it is acceptable."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "'model' is required and must be a string"
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return "'input' must be a string or a non-empty array of strings"
    if len(raw) > MAX_INPUTS:
        return f"'input' must have at most {MAX_INPUTS} entries"
    if not all(isinstance(t, str) and t for t in raw):
        return "every 'input' entry must be a non-empty string (token arrays are not supported)"
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int)
        or isinstance(dimensions, bool)
        or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        return f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}"
    if body.get("encoding_format", "float") != "float":
        return "only encoding_format 'float' is supported"
    return None
