"""Process-wide settings that make CPU training faster; applied by ``agents.experiment.training``.

Training allocates and frees the same multi-MiB activations every minibatch (on DoorKey a
``[256, 63, 64]`` float token tensor is 4 MiB, and an update makes hundreds of them). With
glibc's default malloc, blocks that large are ``mmap``-ed and unmapped again on free, and the
heap top is trimmed back to the kernel, so every reuse page-faults the memory in once more,
one fault per 4 KiB page. :func:`tune_allocator` keeps freed memory in the process instead
(what it saves: ``docs/measurements.md``, "allocator").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["tune_allocator"]

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks below this come from the heap, not from their own ``mmap`` (glibc's maximum)."""
TRIM_THRESHOLD = 1024 * 1024 * 1024
"""Free memory at the heap top is returned to the kernel only above this."""
TOP_PAD = 64 * 1024 * 1024
"""Extra memory requested from the kernel each time the heap grows."""


@functools.cache
def tune_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse (``mallopt``); idempotent.

    The cost is memory that stays mapped after its peak: the process's resident size does
    not shrink back below its high-water mark (which ``train`` reaches in its first update
    anyway). A no-op where the C library is not glibc (macOS, musl, Windows).

    :return: True if the settings are in effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError outside glibc)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a bad value.
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
