"""Process-wide settings and measurements shared by ``binq generate`` and the benchmark workers."""

from __future__ import annotations

import importlib.util
import logging
import resource
import sys

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """The peak resident set of this process so far.

    On Linux, ``VmHWM`` of /proc/self/status: ``ru_maxrss`` survives ``exec``, so a worker started
    from a large parent would report at least the parent's size (the forked copy it replaced).
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def set_threads(threads: int, numba: bool = True) -> None:
    """Run torch, and numba's kernels when numba is installed, on ``threads`` threads.

    ``numba=False`` leaves numba unimported: an engine that never runs a numba kernel should not
    pay its memory in a peak-RSS comparison. numba goes first: starting its OpenMP pool resets
    torch's thread count (they share the OpenMP runtime).
    """
    import torch

    if numba and importlib.util.find_spec("numba") is not None:
        import numba as numba_module

        available = numba_module.config.NUMBA_NUM_THREADS
        if threads > available:
            log.warning("numba has %d threads (NUMBA_NUM_THREADS), fewer than the %d asked for", available, threads)
        numba_module.set_num_threads(min(threads, available))
    torch.set_num_threads(threads)
