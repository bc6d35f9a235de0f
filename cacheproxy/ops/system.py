"""Small Linux/glibc settings the process makes for itself (each a no-op where unavailable).

- Resident memory stays flat: glibc serves a large allocation with mmap only until a freed one
  raises its threshold; after that, large buffers (body chunks, hash read-backs) come from
  per-thread arenas and stay resident after they are freed, tens of MB per busy worker. A fixed
  threshold and few arenas keep memory proportional to what is in flight. The threshold is just
  above 2 MiB, not lower: a TLS read asks for 256 KiB per record (``SSLObject.read``) and an
  encrypted hit reads 1 MiB pieces; served by mmap, each was an mmap, an mremap and a munmap
  whose TLB shootdowns cost more than the decryption (https-origin misses ran at 82 MiB/s with a
  256 KiB threshold, 162 MiB/s with this one; ``bench/tls.py``).
- A worker ends with its supervisor: the kernel sends it SIGTERM when the supervisor dies, even
  by SIGKILL, so no orphan keeps serving the port with nobody to stop it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = (2 << 20) + (64 << 10)
ARENA_MAX = 2
PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def return_large_buffers() -> bool:
    """Tune glibc's malloc. True when it was applied."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))


def die_with_parent(parent: int) -> None:
    """Ask for SIGTERM when ``parent`` dies; exit now if it already has."""
    prctl = getattr(_libc(), "prctl", None)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os._exit(1)
