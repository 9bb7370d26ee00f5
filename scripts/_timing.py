"""Shared by the benchmark scripts (run as `python scripts/NAME.py`, so this folder is on sys.path)."""

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs of fn(), in seconds (fn must wait for its own result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
