"""Give freed memory back to the operating system, so that a long run's resident memory is what it holds.

glibc's allocator keeps freed blocks of its heaps for reuse; a run that allocates and frees many
megabyte-sized tensors (one block's activations after another) ends up resident at several times what
it holds. :func:`trim_free_memory` asks glibc to return every free page (``malloc_trim(0)``); it is
called once per block by the block walker and after the tokenizer's large transient allocations. A
no-op on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def trim_free_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
