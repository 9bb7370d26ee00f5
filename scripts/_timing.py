"""Shared by the benchmark scripts (run as `python scripts/NAME.py`, so this folder is on sys.path)."""

import threading
import time
from typing import Callable

import numpy as np


def timings(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of n calls of fn() (fn must wait for its own result)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs of fn(), in seconds (fn must wait for its own result)."""
    return min(timings(fn, repeats))


def memory_bandwidth(size: int = 2 << 30, repeats: int = 5) -> dict:
    """Measured on all cores: read (a jitted sum over `size` bytes) and copy (two threads of numpy
    copyto; bytes read + written). Imports jax: set JAX_PLATFORMS etc. before calling."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).standard_normal(size // 4, np.float32))
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = size / best_time(lambda: total(x).block_until_ready(), repeats) / 1e9
    src = np.ones(size // 8, np.float32)
    dst = np.empty_like(src)
    half = len(src) // 2

    def copy():
        threads = [threading.Thread(target=np.copyto, args=(dst[i * half:(i + 1) * half], src[i * half:(i + 1) * half]))
                   for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]

    return {"read_gb_per_s": read, "copy_gb_per_s": 2 * src.nbytes / best_time(copy, repeats) / 1e9}
