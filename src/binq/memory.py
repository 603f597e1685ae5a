"""Give freed memory back to the operating system, so that a long run's resident memory is what it holds.

glibc's allocator keeps freed blocks of its heaps for reuse; a run that allocates and frees many
megabyte-sized tensors (one block's activations after another) ends up resident at several times what
it holds. :func:`trim_free_memory` asks glibc to return every free page (``malloc_trim(0)``); it is
called once per block by the block walker and after the tokenizer's large transient allocations.
Within a block, :func:`map_large_allocations` has glibc serve every allocation of one window's hidden
states or more (:func:`mapping_threshold`) from its own mapping, given back the moment it is freed
(glibc's default threshold climbs to 32 MB as large blocks are freed, and every smaller activation
then stays in the heap until the next trim).
Both are no-ops on other C libraries.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Iterator

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
AFTER_RUN_THRESHOLD = 32 << 20  # glibc's ceiling for its own climbing threshold, set again after a run
LARGE_ALLOCATION = 4 << 20  # above GPTQ's per-column temporaries of 7168-row layers (3.5 MB)
# A streamed run's threshold until its model's size is known (loading, finite checks, tokenizing): on
# SmolLM2 under the quick protocol, mapping from the start instead of from the first block took the
# peak from 872 to 739 MiB (docs/MEMORY.md).
STREAM_LOAD_THRESHOLD = 1 << 20


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):  # musl and others have neither malloc_trim nor mallopt's parameters
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def mapping_threshold(activation_bytes: int) -> int:
    """The threshold for :func:`map_large_allocations`: the largest power of two not above one window's
    hidden states (``activation_bytes``), so that every activation is mapped, and at most
    :data:`LARGE_ALLOCATION`, below which GPTQ's per-column temporaries of a 7168-row layer stay in the
    heap (mapping them costs GPTQ some 5 % of its time); at least 128 KiB, glibc's own default."""
    threshold = 1 << max(17, int(activation_bytes).bit_length() - 1)
    return min(threshold, LARGE_ALLOCATION)


@contextlib.contextmanager
def large_allocations_mapped(threshold: int) -> Iterator[None]:
    """:func:`map_large_allocations` for the duration of a block: afterwards the threshold is set to
    32 MiB, about where glibc's own climbing threshold ends (a setting cannot be undone, and a low one
    left in place would map every temporary of whatever the process does next)."""
    map_large_allocations(threshold)
    try:
        yield
    finally:
        map_large_allocations(AFTER_RUN_THRESHOLD)


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Have glibc map allocations of ``threshold`` bytes or more on their own, returned to the operating
    system when freed (for the rest of the process). Whether the setting took."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1


def trim_free_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
