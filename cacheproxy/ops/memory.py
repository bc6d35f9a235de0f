"""Keep resident memory flat: large buffers go back to the system when freed.

glibc serves a large allocation with mmap only until a freed one raises its threshold; after that,
large buffers (body chunks, hash read-backs) come from per-thread arenas and stay resident after
they are freed, tens of MB per busy worker. A fixed threshold and a small number of arenas keep
memory where it belongs: proportional to what is in flight, not to what once was.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 10
ARENA_MAX = 2


def return_large_buffers() -> bool:
    """Tune glibc's malloc (a no-op elsewhere). True when it was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))
