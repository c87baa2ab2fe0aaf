"""Give the allocator's free memory back to the system.

glibc keeps memory freed by a thread in that thread's arena for reuse; with frames of
hundreds of MB decoded, stacked and rendered in several threads, the daemon's RSS otherwise
ratchets up by the largest temporaries each thread ever freed (measured: +300 MB of anonymous
memory under looping renders, and ~60 MB held by the daemon after a frame; bench/RESULTS.md,
"Reading the results"). Elsewhere than glibc (musl, macOS) there is nothing to trim.
"""

from __future__ import annotations

import ctypes
from typing import Any


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """``malloc_trim(0)``: the free pages of every arena back to the system (a few ms)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
