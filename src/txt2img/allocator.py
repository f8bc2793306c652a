"""Reusing freed memory within a call on CPUs (Linux with glibc).

glibc returns every freed block above its mmap threshold (at most 32 MB) to the kernel at once, and maps fresh
pages, which the kernel must fault in and zero, for the next allocation. A 512 × 512 Stable Diffusion decode
frees and allocates activations of 100 MB and more dozens of times, so on a CPU about a sixth of its time
went into page faults (measured on a 2-core machine: 7 million minor faults and 11.5 s of system time over 12
component calls; 1 million and 1.8 s with freed memory kept, and the decoder 17% faster).

While a pipeline call runs on the CPU, ``reuse_freed_memory`` has glibc serve every allocation from its heap
and keep what is freed there (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` high), so that each
activation reuses pages that an earlier one faulted in. When the last concurrent call ends it returns the
freed memory to the system (``malloc_trim``) and leaves glibc in the state its own dynamic threshold reaches
after the first large free (blocks above 32 MB mapped, below it from the heap), so the rest of the process
is not slowed down. Peak memory is unchanged: the heap holds what the call held at its peak, and no more.

Turn it off with ``set_memory_reuse(False)`` or ``TXT2IMG_REUSE_FREED_MEMORY=0``. On other systems, or
without glibc, nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit systems
GLIBC_MMAP_MAX = 65536  # glibc's default number of mapped blocks

MIN_PIXELS = 256 * 256
"""Output pixels (batch × height × width) from which a pipeline call keeps freed memory: smaller calls allocate
nothing that glibc would map on its own, and the period's own cost (about 2 ms, mostly ``malloc_trim``) would
show (the embedded model at 64 × 64: 126 images/s without, 103 with it at batch 1; 235 and 279 at batch 64)."""

_enabled: bool | None = None  # set_memory_reuse; None: the environment variable (default on)
_lock = threading.Lock()
_active_calls = 0


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both; musl and others lack them
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def set_memory_reuse(enabled: bool | None) -> None:
    """Switch the reuse of freed memory within CPU calls on or off (on by default where supported).

    Args:
        enabled: ``True`` or ``False``; ``None`` to go back to ``TXT2IMG_REUSE_FREED_MEMORY`` (``"0"`` is off).
    """
    global _enabled
    _enabled = enabled


def memory_reuse_enabled() -> bool:
    """Whether calls on the CPU keep freed memory for reuse: switched on, and supported here (Linux, glibc)."""
    if _LIBC is None:
        return False
    if _enabled is not None:
        return _enabled
    return os.environ.get("TXT2IMG_REUSE_FREED_MEMORY", "1").strip() not in ("0", "false", "off", "no")


def _keep_freed_memory(libc: ctypes.CDLL) -> None:
    libc.mallopt(M_MMAP_MAX, 0)  # every block from the heap, none mapped on its own
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # freed memory at the heap's top stays


def _release_freed_memory(libc: ctypes.CDLL) -> None:
    libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)  # as glibc's dynamic threshold sets them
    libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed memory for reuse while the block runs; overlapping blocks (threads) share one period.

    Args:
        enabled: ``False`` makes this a no-op (e.g. for a call on a GPU).
    """
    libc = _LIBC if enabled and memory_reuse_enabled() else None
    if libc is None:
        yield
        return
    global _active_calls
    with _lock:
        if _active_calls == 0:
            _keep_freed_memory(libc)
        _active_calls += 1
    try:
        yield
    finally:
        with _lock:
            _active_calls -= 1
            if _active_calls == 0:
                _release_freed_memory(libc)
