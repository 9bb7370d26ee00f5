"""Shared by the benchmark scripts (run as `python scripts/NAME.py`, so this folder is on sys.path):
timing (single calls, interleaved rounds), roofline figures, and random models (glm_jax.testing's,
also as transformers' GlmForCausalLM on the very same weights)."""

import pathlib
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


def rounds(sides: dict[str, Callable[[], object]], n: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each side's calls over n timed rounds, after `warmup` untimed ones (compilation,
    first use of buffers). Each round calls every side once, so a drift in the machine's speed falls
    on all of them."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(n):
        for name, fn in sides.items():
            seconds[name] += timings(fn, 1)
    return seconds


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


# -- roofline figures ------------------------------------------------------------------------------

def decode_bytes(config, cached_tokens: float, weight_itemsize: int = 2, kv_itemsize: int = 2) -> float:
    """Bytes one decode step must read: every weight but the embedding table (one row of it), and the
    K/V of the cached tokens (int8, kv_itemsize 1: 1-byte values plus a float32 scale per token, layer
    and KV head)."""
    weights = config.num_params - (config.vocab_size - 1) * config.hidden_size
    scales = 0 if kv_itemsize != 1 else config.num_layers * 2 * config.num_kv_heads * 4
    return weight_itemsize * weights + (config.kv_bytes_per_token(kv_itemsize) + scales) * cached_tokens


def prefill_flops(config, prompt: int) -> float:
    """Model FLOPs of a causal prefill of `prompt` tokens that yields the last token's logits. Query t
    sees t + 1 keys, so P(P+1)/2 keys in all, whatever the chunking."""
    from glm_jax.compile_report import model_flops

    head = 2 * config.vocab_size * config.hidden_size
    return model_flops(config, 1, prompt, (prompt + 1) / 2) - head * (prompt - 1)


# -- random models ---------------------------------------------------------------------------------

def hf_random_model(folder: pathlib.Path, config, *, seed: int = 0, attn_implementation: str = "sdpa", **weights):
    """transformers' GlmForCausalLM (float32, eval mode) of a random `glm`-layout folder written at
    `folder` (glm_jax.testing.write_random_checkpoint): glm_jax.load(folder) has the same weights."""
    import transformers

    from glm_jax.testing import write_random_checkpoint

    write_random_checkpoint(folder, config, layout="glm", seed=seed, force=True, **weights)
    return transformers.GlmForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation).eval()
