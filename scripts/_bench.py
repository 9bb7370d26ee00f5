"""Shared by the benchmark scripts (run as `python scripts/NAME.py`, so this folder is on sys.path):
timing (single calls, interleaved rounds), roofline figures, random models (glm_jax.testing's, also
as transformers' GlmForCausalLM on the very same weights; the long-context benchmark model), and a
worker subprocess that runs another tree's glm_jax (an earlier commit, for side-by-side runs)."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import traceback
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


# the long-context benchmark model ("162M" in docs/benchmarks.md): bench_long.py, bench_paged.py
LONG_MODEL = {"layers": 2, "hidden": 512, "heads": 8, "kv_heads": 2, "head_dim": 128, "ffn": 1408, "vocab": 151552}


def add_shape_args(parser) -> None:
    """The benchmark model's shape flags (default: the 398M model of bench_generate.py)."""
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=2816)


def shape_config(args, **fields):
    """A random GLM-4 config of `add_shape_args`' flags (rope theta 1e8, 8,192 positions; `fields` override)."""
    from glm_jax.testing import random_config

    return random_config(hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.kv_heads, rope_theta=1e8, max_seq_len=8192, **fields)


def long_model_config(max_seq_len: int, *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                      ffn: int, vocab: int):
    """The config of the long-context benchmark model (fields as LONG_MODEL): random GLM-4, float32,
    rope_theta 1e8, partial rotary 0.5."""
    from glm_jax.testing import random_config

    return random_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=1e8,
                         max_seq_len=max_seq_len)


# -- another tree's glm_jax in a worker subprocess ---------------------------------------------------

def serve_ops(ops: dict[str, Callable]) -> None:
    """The worker's end: one JSON {"op", "args"} a line on stdin, one JSON line back on the original
    stdout ({"ok": result} or {"error": traceback}); whatever libraries print goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        call = json.loads(line)
        try:
            reply = {"ok": ops[call["op"]](**call["args"])}
        except Exception:  # noqa: BLE001 - handed to the caller, which raises it
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Local:
    """`ops` run in this process, called like a Worker (results through JSON, as from one)."""

    def __init__(self, ops: dict[str, Callable]):
        self.ops = ops

    def __call__(self, op: str, **args):
        return json.loads(json.dumps(self.ops[op](**args)))

    def close(self) -> None:
        pass


class Worker:
    """`python SCRIPT *args` run from `root` with PYTHONPATH=root (so `import glm_jax` gives that
    tree's code), serving `serve_ops`; calling it runs one op there and returns its result."""

    def __init__(self, script: pathlib.Path, args: list[str], root: pathlib.Path):
        env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.proc = subprocess.Popen([sys.executable, str(script), *args], cwd=root, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, op: str, **args):
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({self.proc.wait()}) during {op}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{op} failed in the worker:\n{reply['error']}")
        return reply["ok"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
