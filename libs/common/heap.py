"""The process's native heap as glibc's malloc sees it (`mallinfo2`), for the metrics.

RSS alone does not tell a leak from memory malloc keeps after it was freed: `in_use` is
what is allocated now (DuckDB, gRPC, OpenSSL, Python objects over 512 bytes), `free` what
malloc holds without it being in use (fragmentation: only that part can `malloc_trim`
return to the system). Measured in issue 17 (docs/reliability.md, "Load and soak"):
memory's RSS rise was `in_use` — DuckDB's buffer-pool eviction queues keeping the storage
of destroyed temporary block handles until a queue is purged — and `malloc_trim(0)`
returned nothing, so the kit does not trim.

Only where the C library is glibc 2.33 or later; elsewhere (musl, macOS) `read()` is None
and the gauge is not exported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes from sbrk (main arena)
            "ordblks",  # free chunks
            "smblks",  # free fastbin chunks
            "hblks",  # mmap-ed chunks
            "hblkhd",  # bytes in mmap-ed chunks (large allocations, always in use)
            "usmblks",
            "fsmblks",  # bytes in free fastbin chunks
            "uordblks",  # bytes in use (arenas)
            "fordblks",  # bytes free (arenas)
            "keepcost",
        )
    ]


@dataclass(frozen=True)
class HeapUsage:
    in_use: int  # allocated: arena chunks in use + mmap-ed chunks
    free: int  # held by malloc, not in use


@cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2  # glibc >= 2.33 (mallinfo's int fields overflow)
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


def read() -> HeapUsage | None:
    """The heap now (summed over every arena), or None without glibc's mallinfo2."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return HeapUsage(in_use=int(info.uordblks + info.hblkhd), free=int(info.fordblks))
