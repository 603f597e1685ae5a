"""Process-wide settings and measurements shared by ``binq generate`` and the benchmark workers."""

from __future__ import annotations

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


def set_threads(threads: int) -> None:
    """Run torch, and binq's CPU kernels (they take torch's thread count and OpenMP pool), on ``threads``."""
    import torch

    torch.set_num_threads(threads)
