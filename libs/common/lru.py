"""The kit's bounded LRU map: the services' in-process caches of what their own store says.

An `OrderedDict` used newest-last; `keep` stores a value as the newest entry and drops the
oldest beyond a bound, `fresh` reads one and marks it recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(cache: OrderedDict[K, V], key: K, value: V, most: int) -> None:
    """Store `value` as the newest entry of the LRU `cache`, keeping at most `most`."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > most:
        cache.popitem(last=False)


def fresh(cache: OrderedDict[K, V], key: K) -> V | None:
    """The entry for `key` (now the most recently used), or None."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value
