"""Job functions for the benchmark runner's Ray tests: stdlib only, so a fresh worker
imports them fast (``tests/test_bench_ray.py``)."""

from __future__ import annotations

import os
import time


def die_or_finish(job: tuple[str, float, bool]) -> tuple[str, str | None]:
    """``(key, seconds, die)``: sleep, then exit without a result (``die``) or return one."""
    key, seconds, die = job
    time.sleep(seconds)
    if die:
        os._exit(9)  # as a process the OOM killer ends: no exception, no result
    return key, None if key != "fails" else "ValueError: bad run"
