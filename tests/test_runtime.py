"""agents.runtime: the allocator settings that training applies to its process."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from agents.runtime import tune_allocator

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# Allocates three 4 MiB tensors at once and frees them, in a fresh process (glibc's malloc
# adapts its thresholds to what a process has freed before), and prints from glibc's own
# bookkeeping (mallinfo2, summed over arenas): the bytes of blocks mmap-ed for them, and the
# free bytes the heap keeps after the free. With glibc's defaults each block gets its own mmap
# and goes back to the kernel on free, so every reuse page-faults 1024 pages in again
# (training's varied sizes kept that up: 40k-140k faults per ThalamusPPO update). Counting the
# page faults themselves is not deterministic: the kernel adds minor faults of its own (NUMA
# hinting, page migration) on a busy machine.
_ALLOCATION_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, torch
    from agents.runtime import tune_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        assert tune_allocator()
    before = libc.mallinfo2()
    tensors = [torch.ones(1 << 20) for _ in range(3)]
    during = libc.mallinfo2()
    del tensors
    after = libc.mallinfo2()
    print(during.hblkhd - before.hblkhd, after.fordblks - before.fordblks)
    """
)
_MIB = 1024 * 1024


def _mmapped_and_kept(setting: str) -> tuple[int, int]:
    """Bytes mmap-ed for three 4 MiB tensors, and free bytes the heap kept after freeing them."""
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATION_SCRIPT, setting],
        capture_output=True,
        text=True,
        check=True,
    )
    mmapped, kept = out.stdout.split()
    return int(mmapped), int(kept)


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        return False
    return True


@glibc_only
def test_tune_allocator_is_idempotent() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True


@glibc_only
@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("setting", ["default", "tuned"])
def test_freed_activations_stay_in_the_process_for_reuse(setting: str) -> None:
    mmapped, kept = _mmapped_and_kept(setting)
    if setting == "default":  # the problem the tuning solves, as this glibc has it
        assert mmapped >= 12 * _MIB and kept < 12 * _MIB, (mmapped, kept)
    else:
        assert mmapped == 0, f"{mmapped} bytes were mmap-ed: the blocks bypass the heap"
        assert kept >= 12 * _MIB, f"only {kept} free bytes kept: the heap was trimmed on free"
