"""agents.runtime: the allocator settings that training applies to its process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agents.runtime import tune_allocator

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# Tunes the allocator, allocates three 4 MiB tensors at once and frees them, ten times after
# three warm-up rounds, and prints the page faults of those ten rounds. In a fresh process:
# glibc's malloc adapts its thresholds to what the process has freed before. With its
# defaults (glibc 2.36) these ten rounds fault ~10k times: the blocks go back to the kernel
# until, after about seven rounds, the adaptive threshold catches up with this one fixed
# pattern (training's varied sizes kept it faulting: 40k-140k faults per ThalamusPPO update).
_FAULTS_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from agents.runtime import tune_allocator
    assert tune_allocator()
    def rounds(n):
        for _ in range(n):
            tensors = [torch.ones(1 << 20) for _ in range(3)]
            del tensors
    rounds(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(10)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults_after_tuning() -> int:
    """Page faults of the script's ten rounds, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@glibc_only
def test_tune_allocator_is_idempotent() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True


@glibc_only
def test_freed_activations_are_reused_without_page_faults() -> None:
    # A round touches 3 x 1024 fresh 4 KiB pages if the memory went back to the kernel.
    tuned = _faults_after_tuning()
    assert tuned < 512, f"{tuned} page faults in 10 rounds: freed blocks were not reused"
