#!/usr/bin/env python3
"""glm-4-9b-chat-1m on one accelerator, random bf16 weights made on the device (issue #15).

  python scripts/bench_gpu.py [--budget-s 420] [--prefill-chunk 4096] [--out FILE] [--kernel auto]
                              [--sections accuracy,transformers,...] [--compile-cache DIR] [--profile DIR]
  python scripts/bench_gpu.py --small --out /tmp/bench.json   # a tiny config, same code (tests: CPU)

Sections, in this order (the first three always run; the others are skipped, recorded as
"skipped", once the time since start plus their rough cost exceeds --budget-s). Each runs in its own
try/except (a failure is recorded as {"error": ...}) and the JSON is rewritten after each one.

- device: HBM bandwidth, the best of 20 jitted in-place `x + 1` over a 4 GiB float32 array (bytes
  read + written) after 3 untimed (a limit is a best case: the median of 10 read 1,838 GB/s on a
  fresh H100 whose decode ran at its usual speed, 2,552 GB/s minutes later on the same machine); bf16 peak, median of 7 calls of 8 chained 8192^3 bf16 matmuls; the datasheet
  figures of known chips; jax's memory_stats (JAX may grow its pool to 95% of the GPU's memory).
- model: every weight of glm-4-9b-chat-1m made on the device by a jitted fill (std 0.02 like the
  model's own init, but uniform, from a hash; RMSNorm weights 1), bf16, on the one-device layout.
- context_1k, context_8k, context_32k: glm-jax Engine (greedy, no stop ids, batch 1, random
  prompt ids). t(n) = best of 3 calls of generate(max_new_tokens=n) after a compiling call.
  decode s/token = (t(N) - t(1)) / (N - 1). glm-jax's t(1) holds the prefill and one decode step
  (its loop runs the model on token 1 before stopping), so prefill s = t(1) - one step.
  Decode roofline: a step must read every weight except the embedding table (one row of it) and
  the filled K/V cache, layers x 2 x kv_heads x head_dim x 2 B x (prompt + 1 + N/2) tokens (the
  mean over the timed steps 2..N); roofline fraction = bytes / step seconds / the measured copy
  bandwidth. Prefill MFU = model FLOPs / prefill s / the measured bf16 peak (and / the datasheet
  peak): model FLOPs = 2 x (weights but the embedding) per token + 4 x layers x heads x head_dim
  per visible key, the output layer once (only the last token's logits are needed). Query t sees
  t + 1 keys, so P(P+1)/2 keys in all, whatever the chunking: chunk i of C tokens has C queries
  seeing i*C + (C+1)/2 keys on average.
  --profile DIR (GPU): one more 1K call (prefill and 32 decode steps) under JAX's profiler; the
  kernels of each compiled program from its Perfetto JSON: count, summed time, span (summed / span:
  how busy the GPU was), per decode step, and the costliest kernels.
- products: where a decode step's time goes. Each weight matrix a step multiplies by (layer 0's
  arrays, [N, K]) times one bf16 row, as XLA compiles it alone: seconds per product (50 dependent
  products in one program, divided; median of 5), GB/s of weight read and its fraction of the
  copy bandwidth; summed over the layers, against context_1k's measured step. Timed alone each
  product pays its own launch and the dependency kernel, so the sum can exceed the step (on an
  H100: 9.67 ms of products against an 8.53 ms step): per-product GB/s, not a decomposition.
- accuracy: teacher-forced logits [P, V] of one random 3-chunk prompt (P = 3 x chunk / 4) from
  the bf16 weights through glm-jax's XLA kernel, glm-jax's cuDNN kernel (GPU) and transformers
  (SDPA, one forward), each against a float32 reference: glm-jax on the same weights cast to
  float32, float32 cache, XLA kernel at HIGHEST precision. Relative error, max abs error and top-1
  agreement per path; cuDNN counts as accurate when its error is at most 1.25x the XLA path's and
  its top-1 agreement at most 2 points lower (the library's "auto" kernel takes cuDNN on GPUs).
- transformers: GlmForCausalLM (SDPA, bf16) built on the meta device and given the very same
  device arrays (torch.from_dlpack, reshaped to the HF layout by glm_jax.convert's mapping, no copy), generate() timed the same way at 1K (decode) and 8K (prefill;
  transformers' t(1) is the prefill alone). Greedy agreement with glm-jax's 1K tokens. The torch
  model is freed before the long sections.
- longest_fit: compile_report (one prefill chunk against the full cache, and the decode loop;
  abstract weights, compiled for this device) at the longest multiple of 64K (at most 1,048,576)
  that arithmetic allows (the weights and 3% for temporaries off the device's memory limit,
  memory_stats bytes_limit, over the cache's bytes per token); lowered and compiled again (at most
  4 tries) while the compiled peak does not fit.
  bf16 cache, and the int8 cache where this build has one.
- prefill_128k: one 131,072-token prefill (generate with max_new_tokens=1, so one decode step is
  included). The first call includes compilation; it is run a second time if the budget allows.

--small runs all of it on a tiny config (2 layers, hidden 256, 4/2 heads, vocab 1024) with prompts
of 64 / 128 / 192 / 1024 tokens (the first three share one cache bucket: fewer compiles), prefill
chunks of 64, small arrays and an assumed 32 MiB memory limit for the fit.
The JSON (default benchmarks/results/DATE-bench-gpu-DEVICE.json) names the device; progress lines
go to stderr; a summary goes to stdout. Exit 1 if a section failed, 2 on bad input.
"""

from __future__ import annotations

import os
import re

# One device: this benchmark measures a single chip (simulated CPU devices are forced to 1).
# JAX grows its GPU pool on demand, up to 95% of memory, so torch can use what JAX has not taken.
_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_force_host_platform_device_count=1").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

from _timing import timings  # noqa: E402  (this script's folder is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))   # this checkout's glm_jax, installed or not (a GPU image installs nothing)
START = time.perf_counter()
GiB = 1 << 30

# The attention kernel of every Engine this script makes (--kernel, one of options.KERNELS): "auto"
# (the library's default: gpu on a GPU), "xla" (portable) or "gpu" (cuDNN flash attention for
# prefill chunks, the Pallas kernel for decode); section accuracy measures both against a float32 reference.
from glm_jax.options import DEFAULT_KERNEL, KERNELS  # noqa: E402

# device_kind substring (first match wins): dense bf16 FLOP/s and HBM bytes/s, as NVIDIA states them.
DATASHEET = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),        # SXM
    ("H200", 989e12, 4.8e12),
)

TARGETS = {  # issue #15
    "decode_roofline_fraction_1k": 0.85,
    "prefill_mfu_32k": 0.55,
    "decode_vs_transformers_1k": 3.0,
}


@dataclasses.dataclass(frozen=True)
class Scale:
    """Every size the benchmark uses: the real model, or a tiny one with the same code paths."""

    config_name: str
    contexts: dict[str, tuple[int, int]]   # section -> (prompt tokens, new tokens N)
    huge_prompt: int                       # prefill_128k
    prefill_chunk: int
    copy_bytes: int                        # the bandwidth array
    matmul: tuple[int, int]                # (n, chained matmuls per call)
    fit_unit: int                          # the longest fit is a multiple of this
    fit_cap: int
    memory_limit: int | None               # None: the device's own bytes_limit
    repeats: int
    cost_s: dict[str, float]               # rough seconds per optional section (budget skips)

    @functools.cached_property
    def config(self):
        from glm_jax.config import PRESETS

        full = PRESETS["glm-4-9b-chat-1m"]
        if self.config_name == "small":
            return full.replace(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=64)
        return full


FULL = Scale("glm-4-9b-chat-1m", {"context_1k": (1024, 128), "context_8k": (8192, 16), "context_32k": (32768, 128)},
             huge_prompt=131072, prefill_chunk=4096, copy_bytes=4 * GiB, matmul=(8192, 8), fit_unit=65536,
             fit_cap=1048576, memory_limit=None, repeats=3,
             cost_s={"products": 20, "decode_kernel": 120, "context_8k": 45, "transformers": 60, "accuracy": 90, "context_32k": 60, "longest_fit": 100,
                     "prefill_128k": 60, "int8_32k": 60})
SMALL = Scale("small", {"context_1k": (64, 128), "context_8k": (128, 64), "context_32k": (192, 32)},
              huge_prompt=1024, prefill_chunk=64, copy_bytes=16 << 20, matmul=(256, 2), fit_unit=1024,
              fit_cap=65536, memory_limit=32 << 20, repeats=2,
              cost_s={"products": 3, "decode_kernel": 10, "context_8k": 2, "transformers": 5, "accuracy": 5, "context_32k": 3, "longest_fit": 10,
                      "prefill_128k": 3, "int8_32k": 3})

OPTIONAL = ("products", "accuracy", "context_8k", "transformers", "context_32k", "longest_fit", "prefill_128k", "int8_32k",
            "decode_kernel")


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def random_ids(vocab: int, length: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(length).integers(0, vocab, length).tolist()


# -- formulas -------------------------------------------------------------------------------------

def decode_bytes(config, cached_tokens: float, kv_itemsize: int = 2) -> float:
    """Bytes one decode step must read: the bf16 weights but the embedding table (one row of it),
    and the K/V of the cached tokens (int8: 1-byte values plus a float32 scale per token and head)."""
    weights = config.num_params - (config.vocab_size - 1) * config.hidden_size
    scales = 0 if kv_itemsize == 2 else config.num_layers * 2 * config.num_kv_heads * 4
    return 2 * weights + (config.kv_bytes_per_token(kv_itemsize) + scales) * cached_tokens


def prefill_flops(config, prompt: int) -> float:
    """Model FLOPs of a causal prefill of `prompt` tokens that yields the last token's logits."""
    from glm_jax.compile_report import model_flops

    head = 2 * config.vocab_size * config.hidden_size
    return model_flops(config, 1, prompt, (prompt + 1) / 2) - head * (prompt - 1)


def datasheet(kind: str) -> dict:
    for name, flops, bandwidth in DATASHEET:
        if name in kind:
            return {"match": name, "bf16_flops_per_s": flops, "hbm_bytes_per_s": bandwidth}
    return {"match": None, "bf16_flops_per_s": None, "hbm_bytes_per_s": None}


def ratio(a, b):
    return a / b if a is not None and b else None


# -- the run ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, scale: Scale):
        self.args, self.scale, self.config = args, scale, scale.config
        self.results: dict = {}
        self.arrays = self.graphdef = self.state = self.generator = self.layout = None
        self.tokens: dict[int, list[int]] = {}     # glm-jax greedy tokens by prompt length

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - START)

    def device(self) -> dict:
        return self.results.get("device", {})

    def need_model(self):
        if self.generator is None:
            raise RuntimeError("no model (the model section failed)")

    def write(self, complete: bool = False) -> None:
        self.results["meta"]["elapsed_s"] = time.perf_counter() - START
        self.results["meta"]["complete"] = complete
        self.results["targets"] = targets(self.results)
        out = pathlib.Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(out)


def make_generator(bench: Bench):
    from glm_jax.engine import Engine

    return Engine(bench.config, bench.graphdef, bench.state, bench.layout, prefill_chunk=bench.args.prefill_chunk,
                  kernel=bench.args.kernel, serving=False)


def section_device(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    add_one = jax.jit(lambda x: x + 1, donate_argnums=0)           # in place: no fresh buffer per call
    x = [add_one(jnp.zeros(bench.scale.copy_bytes // 4, jnp.float32)).block_until_ready()]

    def copy():
        x[0] = add_one(x[0]).block_until_ready()

    timings(copy, 3)
    copy_s = min(timings(copy, 20))
    copy_bandwidth = 2 * bench.scale.copy_bytes / copy_s            # read + written
    del x
    n, chain = bench.scale.matmul
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(2), (n, n)) / n ** 0.5).astype(jnp.bfloat16)   # keeps |x| ~ 1
    chained = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, x: x @ b, a))
    chained(a, b).block_until_ready()
    matmul_s = statistics.median(timings(lambda: chained(a, b).block_until_ready(), 7))
    peak = 2 * n ** 3 * chain / matmul_s
    sheet = datasheet(dev.device_kind)
    return {"kind": dev.device_kind, "platform": dev.platform, "devices_visible": len(jax.devices()),
            "copy_array_bytes": bench.scale.copy_bytes, "copy_seconds": copy_s,
            "copy_bytes_per_s": copy_bandwidth, "matmul": f"{chain} x bf16 [{n},{n}] @ [{n},{n}]",
            "matmul_seconds": matmul_s, "bf16_flops_per_s": peak, "datasheet": sheet,
            "copy_of_datasheet": ratio(copy_bandwidth, sheet["hbm_bytes_per_s"]),
            "matmul_of_datasheet": ratio(peak, sheet["bf16_flops_per_s"]),
            "memory_stats": dev.memory_stats()}


def section_model(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    from glm_jax.params import param_specs, split_model
    from glm_jax.sharding import Layout, make_mesh

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def fill(seed, shape, ones):
        """Made on the device. Uniform with std 0.02 (the model init's scale) from a hash of each
        element's index and `seed` (jax.random's normal takes seconds to compile per shape)."""
        if ones:
            return jnp.ones(shape, jnp.bfloat16)
        x = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + seed * jnp.uint32(0x9E3779B9)
        x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
        x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
        x = x ^ (x >> 16)
        uniform = (x >> 8).astype(jnp.float32) * 2.0 ** -23 - 1.0                  # [-1, 1)
        return (uniform * (0.02 * 3 ** 0.5)).astype(jnp.bfloat16)

    start = time.perf_counter()
    bench.layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    arrays = {}
    for i, (name, spec) in enumerate(param_specs(bench.config, jnp.bfloat16).items()):
        value = fill(jnp.uint32(i), spec.shape, spec.axes == ("norm",))
        arrays[name] = jax.device_put(value, bench.layout.sharding(spec.axes, spec.shape))
    jax.block_until_ready(arrays)
    bench.arrays = arrays
    bench.graphdef, bench.state = split_model(bench.config, jnp.bfloat16, arrays)
    bench.generator = make_generator(bench)
    stats = jax.devices()[0].memory_stats() or {}
    return {"config": bench.scale.config_name, "glm_config": bench.config.to_dict(),
            "parameters": bench.config.num_params,
            "weight_bytes": sum(a.nbytes for a in arrays.values()), "dtype": "bfloat16",
            "build_seconds": time.perf_counter() - start, "bytes_in_use": stats.get("bytes_in_use")}


def context_figures(bench: Bench, prompt: int, new: int, t1: float, tn: float | None, first_has_step: bool) -> dict:
    """Prefill and decode figures from t(1) and t(N) (see the module docstring)."""
    dev, config = bench.device(), bench.config
    step = (tn - t1) / (new - 1) if tn is not None else None
    prefill = t1 - step if first_has_step else t1
    flops = prefill_flops(config, prompt)
    out = {"prompt_tokens": prompt, "new_tokens": new, "t1_seconds": t1, "tn_seconds": tn,
           "prefill_seconds": prefill, "prefill_tokens_per_s": prompt / prefill, "prefill_model_flops": flops,
           "prefill_mfu": ratio(flops / prefill, dev.get("bf16_flops_per_s")),
           "prefill_mfu_datasheet": ratio(flops / prefill, dev.get("datasheet", {}).get("bf16_flops_per_s"))}
    if step is not None:
        moved = decode_bytes(config, prompt + 1 + new / 2)
        out.update(decode_seconds_per_token=step, decode_tokens_per_s=1 / step, decode_bytes_per_step=moved,
                   decode_bytes_per_s=moved / step,
                   decode_roofline_fraction=ratio(moved / step, dev.get("copy_bytes_per_s")),
                   decode_roofline_fraction_datasheet=ratio(moved / step,
                                                            dev.get("datasheet", {}).get("hbm_bytes_per_s")))
    return out


def glm_run(bench: Bench, prompt: list[int]) -> Callable[[int], list[int]]:
    return lambda n: bench.generator.generate([prompt], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)[0]


def measure(run: Callable[[int], list[int]], new: int, repeats: int) -> tuple[float, float | None, list[int]]:
    """(best t(1), best t(new) or None when new is 1, the tokens of run(new)); after a warm-up call."""
    out = {}

    def call(n):
        out[n] = run(n)

    call(new)                                                  # compiles prefill and decode
    t1 = min(timings(lambda: call(1), repeats))
    tn = min(timings(lambda: call(new), repeats)) if new > 1 else None
    return t1, tn, out[new]


def section_context(name: str) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        bench.need_model()
        prompt, new = bench.scale.contexts[name]
        run = glm_run(bench, random_ids(bench.config.vocab_size, prompt))
        t1, tn, tokens = measure(run, new, bench.scale.repeats)
        bench.tokens[prompt] = tokens
        out = context_figures(bench, prompt, new, t1, tn, first_has_step=True)
        if name == "context_1k" and bench.args.profile:
            out["profile"] = profile(bench, lambda: run(PROFILED_STEPS + 1), bench.args.profile)
        return out

    return run


PROFILED_STEPS = 32


def decode_products(config) -> dict[str, tuple[int, int]]:
    """The weight matrices a decode step multiplies by, as [N, K] (torch's [out, in])."""
    h, f, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_up_proj": (2 * f, h),
            "down_proj": (h, f), "lm_head": (config.vocab_size, h)}


def seconds_per_product(x, w, repeats: int = 50) -> float:
    """Seconds of one x [1, K] @ w [N, K]^T (float32 accumulation, as the model's dense layers):
    `repeats` dependent products in one program (each x depends on the last result, so none is
    hoisted or skipped; the dependency adds one tiny kernel per product), divided; median of 5."""
    import jax
    import jax.numpy as jnp

    def chain(x, w):
        def body(_, s):
            xi = (x.astype(jnp.float32) + 0.0 * s).astype(x.dtype)
            return jnp.einsum("mk,nk->mn", xi, w, preferred_element_type=jnp.float32)[0, 0]
        return jax.lax.fori_loop(0, repeats, body, jnp.float32(0))

    f = jax.jit(chain)
    f(x, w).block_until_ready()
    return statistics.median(t / repeats for t in timings(lambda: f(x, w).block_until_ready(), 5))


def section_products(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    bench.need_model()
    copy = bench.device().get("copy_bytes_per_s")
    out, per_step = {}, 0.0
    for name, (n, k) in decode_products(bench.config).items():
        key = "lm_head" if name == "lm_head" else next(a for a in bench.arrays if a.startswith("layers.0.")
                                                       and a.endswith(name))
        w = bench.arrays[key].reshape(n, k)
        seconds = seconds_per_product(jax.random.normal(jax.random.key(3), (1, k), jnp.bfloat16), w)
        per_step += seconds * (1 if name == "lm_head" else bench.config.num_layers)
        out[name] = {"shape": [n, k], "bytes": w.nbytes, "seconds": seconds, "gb_per_s": w.nbytes / seconds / 1e9,
                     "of_copy_bandwidth": ratio(w.nbytes / seconds, copy)}
    step = (bench.results.get("context_1k") or {}).get("decode_seconds_per_token")
    return {"products": out, "per_step_seconds": per_step, "context_1k_step_seconds": step,
            "rest_seconds": None if step is None else step - per_step}


def attention_call_seconds(attend, q, q_index, k, v, index, repeats: int = 50) -> float:
    """Seconds of one decode attention call (`cache_ops`' attend): `repeats` dependent calls in
    one program (each query depends on the last output), divided; median of 5."""
    import jax

    def chain(q):
        body = lambda _, x: attend(x, q_index, k, v, index).astype(x.dtype) * 0.5 + q
        return jax.lax.fori_loop(0, repeats, body, q)

    f = jax.jit(chain)
    f(q).block_until_ready()
    return statistics.median(t / repeats for t in timings(lambda: f(q).block_until_ready(), 5))


def section_decode_kernel(bench: Bench) -> dict:
    """The decode step's attention: the Pallas kernel that kernel "gpu" ("auto" on a GPU) uses for
    one token a row, against XLA's tiles (kernel "xla"). Per case (the 1K and 32K contexts' filled
    slots, prompt + 1 + N/2, and the int8 cache at 32K): one layer's attention call alone (one row,
    the model's heads, the engine's cache bucket, bf16 or int8 with random scales), microseconds
    and the largest difference from XLA's output and from a float32 reference (the XLA kernel on
    float32 copies of the values the cache holds). Then the decode through an Engine with kernel
    "xla" (its prefill too, untimed here) against this run's context_1k, context_32k and int8_32k,
    where they ran (greedy tokens are not compared: the two prefill kernels' bf16 logits part at
    the first token on random weights)."""
    import jax
    import jax.numpy as jnp

    from glm_jax.attention import PAD, group_queries, heads_major, normalized, ungroup
    from glm_jax.engine import Engine, cache_length
    from glm_jax.engine.cache import cache_ops, cache_order
    from glm_jax.kernels.decode_pallas import decode_by_length

    bench.need_model()
    c, layout = bench.config, bench.layout
    g, hq, d = c.num_kv_heads, c.num_heads, c.head_dim
    order = cache_order(layout, g)
    cases = {"context_1k": ("context_1k", None), "context_32k": ("context_32k", None),
             "int8_32k": ("context_32k", "int8")}
    f32 = lambda x: x.astype(jnp.float32)
    out: dict = {"cache_order": order, "attention": {}}
    interpret = layout.mesh.devices.flat[0].platform != "gpu"   # off GPUs, Pallas' interpreter runs it

    def pallas(q, q_index, k, v, k_index, k_scale=None, v_scale=None):   # the kernel on the one-row cache
        state = decode_by_length(heads_major(group_queries(q, g)), k, v, q_index[:, 0] + 1, jnp.arange(q.shape[0]),
                                 k_scale, v_scale, kv_layout=order, interpret=interpret)
        return ungroup(normalized(state), q.dtype)

    for name, (context, dtype) in cases.items():
        prompt, new = bench.scale.contexts[context]
        filled = prompt + 1 + new // 2
        slots = cache_length(prompt + new, 1)
        shape = tuple({"b": 1, "s": slots, "g": g, "d": d}[x] for x in order)
        keys = jax.random.split(jax.random.key(7), 5)
        q = jax.random.normal(keys[2], (1, 1, hq, d), jnp.bfloat16)
        if dtype == "int8":
            k, v = (jax.random.randint(key, shape, -127, 128, jnp.int8) for key in keys[:2])
            scales = tuple(jax.random.uniform(key, shape[:-1], jnp.float32, 0.5, 1.5) / 127 for key in keys[3:])
            held = tuple(f32(x) * s[..., None] for x, s in zip((k, v), scales))
        else:
            k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:2])
            scales, held = (), (f32(k), f32(v))
        index = jnp.where(jnp.arange(slots) < filled, jnp.arange(slots), PAD).astype(jnp.int32)[None]
        q_index = jnp.full((1, 1), filled - 1, jnp.int32)
        kernels = {"xla": cache_ops(layout, order, kernel="xla")[1], "pallas": pallas}
        got = {kernel: f32(jax.jit(attend)(q, q_index, k, v, index, *scales)) for kernel, attend in kernels.items()}
        reference = jax.jit(kernels["xla"])(f32(q), q_index, *held, index)
        seconds = {kernel: attention_call_seconds(functools.partial(attend, k_scale=scales[0], v_scale=scales[1])
                                                  if scales else attend, q, q_index, k, v, index)
                   for kernel, attend in kernels.items()}
        out["attention"][name] = {
            "filled_slots": filled, "cache_slots": slots, "cache_dtype": dtype or "bfloat16",
            "microseconds": {"xla": seconds["xla"] * 1e6, "pallas": seconds["pallas"] * 1e6},
            "speedup": seconds["xla"] / seconds["pallas"],
            "max_abs_pallas_vs_xla": float(jnp.abs(got["pallas"] - got["xla"]).max()),
            "max_abs_pallas_vs_float32": float(jnp.abs(got["pallas"] - reference).max()),
            "max_abs_xla_vs_float32": float(jnp.abs(got["xla"] - reference).max())}
        log(f"decode_kernel {name}: {out['attention'][name]}")
    engines: dict = {}
    for name, (context, dtype) in cases.items():
        mine = bench.results.get(name) or {}
        if "decode_seconds_per_token" not in mine:
            continue                                   # compared with a section of this run only
        if dtype not in engines:
            engines[dtype] = Engine(c, bench.graphdef, bench.state, layout, prefill_chunk=bench.args.prefill_chunk,
                                    kernel="xla", kv_cache_dtype=dtype, serving=False)
        prompt, new = mine["prompt_tokens"], mine["new_tokens"]
        ids = random_ids(c.vocab_size, prompt)
        run = lambda n: engines[dtype].generate([ids], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)[0]
        # XLA's prefill is slow at 32K (each timing call prefills): fewer repeats there
        t1, tn, _ = measure(run, new, bench.scale.repeats if name == "context_1k" else 2)
        step = (tn - t1) / (new - 1)
        out[f"engine_xla_{name}"] = {"decode_seconds_per_token": step}
        out[f"engine_default_{name}"] = {"decode_seconds_per_token": mine["decode_seconds_per_token"]}
        out[f"decode_speedup_{name}"] = ratio(step, mine["decode_seconds_per_token"])
        log(f"decode_kernel {name}: XLA tiles {step * 1e3:.2f} ms/token, default "
            f"{mine['decode_seconds_per_token'] * 1e3:.2f}")
    del engines
    gc.collect()
    return out


def profile(bench: Bench, call: Callable[[], object], folder: str) -> dict:
    """Kernel time of one traced call (a prefill and PROFILED_STEPS decode steps) from JAX's
    profiler (its Perfetto JSON, kept in `folder`): per compiled program, the kernels run, their
    summed time and the span from the first start to the last end (summed time / span: how busy
    the GPU was); for the decode loop, per step, with its 25 costliest kernels."""
    import glob

    import jax

    if bench.device().get("platform") != "gpu":
        return {"unavailable": f"kernel traces are read on a GPU, not {bench.device().get('platform')}"}
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        call()
    trace = max(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
    return {"trace": os.path.relpath(trace, folder), **kernel_summary(trace, "GPU")}


def kernel_summary(trace: str, device: str) -> dict:
    """The kernel events of the processes whose name holds `device`, summarised (see `profile`)."""
    import collections
    import gzip

    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if device in name}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
    programs = collections.defaultdict(list)
    for e in kernels:
        args = e.get("args") or {}
        programs[args.get("hlo_module") or args.get("hlo_module_name") or "?"].append(e)
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    per_thread = collections.Counter()
    for e in kernels:
        per_thread[threads.get((e["pid"], e.get("tid")), "?")] += e["dur"]
    streams = {key for key, name in threads.items() if "stream" in name.lower()}
    if streams:   # kernels run on streams; other lines of the device (module or op views) repeat them
        kernels = [e for e in kernels if (e["pid"], e.get("tid")) in streams]
    result = {"processes": sorted(names[p] for p in gpu), "thread_us": dict(per_thread.most_common(12)),
              "events": len(kernels), "programs": {}}
    for module, evs in sorted(programs.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = sum(e["dur"] for e in evs)
        span = max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs)
        entry = {"kernels": len(evs), "kernel_us": busy, "span_us": span, "busy_fraction": busy / span if span else None}
        by = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            key = (e["name"][:80], ((e.get("args") or {}).get("hlo_op") or "")[:60])
            by[key][0] += 1
            by[key][1] += e["dur"]
        entry["top"] = [{"kernel": k, "hlo_op": op, "count": n, "us": t}
                        for (k, op), (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]]
        if "decode" in module:
            entry.update(kernels_per_step=len(evs) / PROFILED_STEPS, kernel_us_per_step=busy / PROFILED_STEPS,
                         span_us_per_step=span / PROFILED_STEPS)
        result["programs"][module] = entry
    sample = next((e for e in kernels if e.get("args")), None)
    result["sample_event_args"] = sorted((sample or {}).get("args", {}))
    return result


def hf_model(config, arrays: dict):
    """transformers' GlmForCausalLM (SDPA, bf16) on the given device arrays, without copying them
    and without a random init of its own."""
    import torch
    import transformers

    try:
        from glm_jax.convert.layout import GLM, hf_config, hf_tensors
    except ModuleNotFoundError:   # not installed: glm_jax.convert is the source folder convert/
        from convert.layout import GLM, hf_config, hf_tensors

    state = {}
    for tensor in hf_tensors(config, GLM):
        parts = [part.to_hf(torch.from_dlpack(arrays[part.param])) for part in tensor.parts]
        state[tensor.name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    device = next(iter(state.values())).device
    cfg = {k: v for k, v in hf_config(config, GLM).items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg.update(eos_token_id=None, pad_token_id=None)             # exactly N tokens, like glm-jax without stop ids
    hf_cfg = transformers.GlmConfig(**cfg)
    with torch.device("meta"):
        model = transformers.GlmForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.load_state_dict(state, strict=True, assign=True)             # the bf16 device arrays themselves
    with torch.device(device):       # RoPE inverse frequencies: a buffer the state dict does not hold
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"transformers model still has meta tensors: {', '.join(on_meta[:3])}")
    return model.eval().requires_grad_(False), device


def section_transformers(bench: Bench) -> dict:
    import torch
    import transformers

    bench.need_model()
    transformers.logging.set_verbosity_error()
    if bench.args.small:
        torch.set_num_threads(1)   # tiny matrices: more threads only wait on each other (and on JAX's)
    model, device = hf_model(bench.config, bench.arrays)
    try:
        def hf_run(prompt: list[int]) -> Callable[[int], list[int]]:
            ids = torch.tensor([prompt], device=device)

            def run(n):
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
                return out[0, len(prompt):].tolist()                      # to the host: waits for the GPU
            return run

        result = {"attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
                  "transformers": transformers.__version__, "device": str(device)}
        decode_prompt, new = bench.scale.contexts["context_1k"]
        t1, tn, tokens = measure(hf_run(random_ids(bench.config.vocab_size, decode_prompt)), new, bench.scale.repeats)
        result["decode_1k"] = context_figures(bench, decode_prompt, new, t1, tn, first_has_step=False)
        prefill_prompt = bench.scale.contexts["context_8k"][0]
        t1, _, _ = measure(hf_run(random_ids(bench.config.vocab_size, prefill_prompt)), 1, bench.scale.repeats)
        result["prefill_8k"] = context_figures(bench, prefill_prompt, 1, t1, None, first_has_step=False)
        ours = bench.tokens.get(decode_prompt)
        if ours is not None:
            same = [a == b for a, b in zip(ours, tokens)]
            result["greedy_1k"] = {"compared": len(same), "leading_identical": (same + [False]).index(False),
                                   "identical": sum(same)}
        glm = bench.results
        result["decode_speedup_1k"] = ratio(glm.get("context_1k", {}).get("decode_tokens_per_s"),
                                            result["decode_1k"]["decode_tokens_per_s"])
        result["prefill_speedup_8k"] = ratio(glm.get("context_8k", {}).get("prefill_tokens_per_s"),
                                             result["prefill_8k"]["prefill_tokens_per_s"])
        return result
    finally:   # free the torch model (and the gate_up copies) before the long sections
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def chunk_logits(config, graphdef, state, layout, kernel: str, prompt: list[int], chunk: int):
    """Every position's logits [P, V] (float32, on the device) of a chunked prefill with `kernel`,
    the cache in the weights' dtype."""
    import jax
    import numpy as np

    from glm_jax.engine import cache_length, init_cache, model_step

    step = jax.jit(functools.partial(model_step, graphdef, layout=layout, kernel=kernel, last_only=False),
                   donate_argnums=(1,))
    cache = init_cache(config, layout, 1, cache_length(len(prompt), 1), jax.tree.leaves(state)[0].dtype)
    ids = np.asarray(prompt, np.int32)[None]
    out = []
    for start in range(0, len(prompt), chunk):
        part = slice(start, start + chunk)
        logits, cache = step(state, cache, ids[:, part], np.arange(len(prompt), dtype=np.int32)[None, part],
                             np.arange(start, start + chunk, dtype=np.int32), np.ones((1, chunk), bool))
        out.append(logits[0])
    return jax.numpy.concatenate(out)


def hf_logits(bench: Bench, prompt: list[int]):
    """transformers' logits [P, V] (bf16 model, float32 result, on the device) of the whole prompt."""
    import jax.numpy as jnp
    import torch

    model, device = hf_model(bench.config, bench.arrays)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt], device=device)).logits[0].float().contiguous()
        return jnp.from_dlpack(logits).copy() if device.type != "cpu" else jnp.asarray(logits.numpy())
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def section_accuracy(bench: Bench) -> dict:
    """Teacher-forced logits of one random prompt (3 prefill chunks: the first attends to itself
    only, the others also to the cache) from the bf16 model through each path: glm-jax with the
    XLA kernel, with cuDNN (GPU only), and transformers (SDPA, the whole prompt at once), against a
    float32 reference: glm-jax with the same weights cast to float32, float32 cache, XLA kernel at
    HIGHEST precision. Per path: relative error (Frobenius), max abs error, the fraction of
    positions whose top-1 token is the reference's."""
    import jax
    import jax.numpy as jnp

    from glm_jax.params import split_model

    bench.need_model()
    chunk = max(bench.args.prefill_chunk // 4, 16)
    prompt = random_ids(bench.config.vocab_size, 3 * chunk)
    gpu = bench.device().get("platform") == "gpu"
    paths = {"glm_jax_bf16_xla": lambda: chunk_logits(bench.config, bench.graphdef, bench.state, bench.layout, "xla",
                                                      prompt, chunk)}
    if gpu:
        paths["glm_jax_bf16_cudnn"] = lambda: chunk_logits(bench.config, bench.graphdef, bench.state, bench.layout,
                                                           "gpu", prompt, chunk)
    paths["transformers_bf16_sdpa"] = lambda: hf_logits(bench, prompt)
    logits, result = {}, {"prompt_tokens": len(prompt), "chunk": chunk}
    for name, fn in paths.items():
        try:
            logits[name] = fn().block_until_ready()
        except Exception as e:  # one path failing still leaves the others compared
            result[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    arrays32 = {k: v.astype(jnp.float32) for k, v in bench.arrays.items()}
    graphdef32, state32 = split_model(bench.config, jnp.float32, arrays32)
    ref = chunk_logits(bench.config, graphdef32, state32, bench.layout, "xla", prompt, chunk).block_until_ready()
    del arrays32, state32
    top_ref = ref.argmax(-1)
    for name, got in logits.items():
        result[name] = {"relative_error": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                        "max_abs_error": float(jnp.abs(got - ref).max()),
                        "top1_agreement": float((got.argmax(-1) == top_ref).mean())}
        log(f"  {name}: {result[name]['relative_error']:.2e} relative, top-1 {result[name]['top1_agreement']:.3f}")
    result["reference"] = {"path": "glm_jax_float32_xla", "logits_std": float(ref.std()),
                           "top1_margin_median": float(jnp.median(jnp.diff(jax.lax.top_k(ref, 2)[0], axis=-1)))}
    xla, cudnn = result.get("glm_jax_bf16_xla", {}), result.get("glm_jax_bf16_cudnn", {})
    if "relative_error" in xla and "relative_error" in cudnn:
        # cuDNN is as exact as the XLA path when neither its error nor its top-1 misses are larger by
        # more than the run-to-run spread of bf16 rounding (25% of the error, 2 points of top-1)
        result["cudnn_as_accurate_as_xla"] = (cudnn["relative_error"] <= 1.25 * xla["relative_error"]
                                              and cudnn["top1_agreement"] >= xla["top1_agreement"] - 0.02)
    return result


def int8_cache_keyword() -> dict | None:
    """compile_report's keyword for an int8 KV cache, if this build has one (issue #14)."""
    from glm_jax.compile_report import compile_report

    return {"kv_cache_dtype": "int8"} if "kv_cache_dtype" in inspect.signature(compile_report).parameters else None


def abstract_cache_bytes(config, length: int, **cache_kwargs) -> int:
    """Bytes of a batch-1 cache of `length` slots on one device (K/V, scales, index)."""
    import jax
    import jax.numpy as jnp

    from glm_jax.engine import abstract_cache, cache_dtype
    from glm_jax.sharding import Layout, make_mesh

    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    cache = abstract_cache(config, layout, 1, length, cache_dtype(cache_kwargs.get("kv_cache_dtype"), jnp.bfloat16))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def fit_search(bench: Bench, limit: int, **cache_kwargs) -> dict:
    """The longest multiple of fit_unit (up to fit_cap) whose prefill chunk and decode step fit."""
    import jax.numpy as jnp

    from glm_jax.compile_report import compile_report

    scale, chunk = bench.scale, bench.args.prefill_chunk
    compiles = []

    def peaks(length: int) -> dict:
        log(f"  compile_report at {length:,} tokens {cache_kwargs or ''}")
        prefill, decode = compile_report(bench.config, topology="local", seq_len=length, chunk=chunk,
                                         dtype=jnp.bfloat16, **cache_kwargs)
        row = {"seq_len": length, "prefill_chunk_peak_bytes": prefill.peak_bytes_per_device,
               "decode_peak_bytes": decode.peak_bytes_per_device,
               "kv_cache_bytes": decode.kv_cache_bytes_per_device}
        row["fits"] = max(row["prefill_chunk_peak_bytes"], row["decode_peak_bytes"]) <= limit
        compiles.append(row)
        return row

    # First guess from arithmetic: the memory the weights leave (less 3% for temporaries) over the
    # cache's bytes per token. A guess that does not fit is lowered by a conservative line (all
    # but the weights taken as growing with the length); one that fits is the answer, with the
    # room it leaves. One compile pair in the usual case, at most four.
    weights = 2 * bench.config.num_params
    per_token = abstract_cache_bytes(bench.config, 65536, **cache_kwargs) / 65536
    unit, cap = scale.fit_unit, scale.fit_cap
    guess = (limit * 0.97 - weights) / per_token
    result = {"predicted_tokens": guess, "cache_bytes_per_token": per_token, "compiles": compiles}
    longest = None
    for _ in range(4):
        length = min(cap, int(guess // unit) * unit)
        if length < unit:
            break
        if bench.left() <= 0:
            result["stopped"] = "budget"
            break
        row = peaks(length)
        peak = max(row["prefill_chunk_peak_bytes"], row["decode_peak_bytes"])
        if row["fits"]:
            longest = length
            result["room_bytes"] = limit - peak
            break
        guess = min(length - unit, length * (limit - weights) / (peak - weights))
    return {**result, "longest_tokens": longest, "fits_1m": longest is not None and longest >= 1048576}


def section_longest_fit(bench: Bench) -> dict:
    import jax

    config = bench.config
    limit = bench.scale.memory_limit or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise RuntimeError("the device reports no memory limit (memory_stats()['bytes_limit'])")
    million = 1048576
    shape = (f"{config.num_layers} layers x 2 x {config.num_kv_heads} KV heads x {config.head_dim} x "
             f"{{b}} B x 1,048,576 tokens = {{gib:g}} GiB")
    result = {"memory_limit_bytes": limit,
              "memory_limit_source": "assumed (--small)" if bench.scale.memory_limit else "memory_stats bytes_limit",
              "prefill_chunk": bench.args.prefill_chunk,
              "arithmetic": {"weight_bytes": 2 * config.num_params,
                             "kv_cache_bytes_1m_bf16": config.kv_bytes_per_token(2) * million,
                             "kv_cache_bytes_1m_int8": config.kv_bytes_per_token(1) * million,
                             "bf16": shape.format(b=2, gib=config.kv_bytes_per_token(2) * million / GiB),
                             "int8": shape.format(b=1, gib=config.kv_bytes_per_token(1) * million / GiB)
                             + " (plus scales)"}}
    result["bf16"] = fit_search(bench, limit)
    int8 = int8_cache_keyword()
    if int8 is None:
        result["int8"] = {"unavailable": "int8 cache not available in this build "
                                         "(compile_report has no kv_cache_dtype)"}
    elif bench.left() < bench.scale.cost_s["longest_fit"] / 2:
        result["int8"] = {"skipped": "budget"}
    else:
        result["int8"] = fit_search(bench, limit, **int8)
    return result


def section_prefill_128k(bench: Bench) -> dict:
    bench.need_model()
    prompt = bench.scale.huge_prompt
    run = glm_run(bench, random_ids(bench.config.vocab_size, prompt))
    first = timings(lambda: run(1), 1)[0]
    log(f"  first call {first:.1f} s (with compilation)")
    again = bench.left() > first                  # a second call costs less: no compilation
    seconds = timings(lambda: run(1), 1)[0] if again else first
    flops = prefill_flops(bench.config, prompt)
    dev = bench.device()
    return {"prompt_tokens": prompt, "first_call_seconds": first, "seconds": seconds,
            "includes_compile": not again, "includes_one_decode_step": True,
            "prefill_tokens_per_s": prompt / seconds, "prefill_model_flops": flops,
            "prefill_mfu": ratio(flops / seconds, dev.get("bf16_flops_per_s")),
            "prefill_mfu_datasheet": ratio(flops / seconds, dev.get("datasheet", {}).get("bf16_flops_per_s"))}


def section_int8_32k(bench: Bench) -> dict:
    """The int8 KV cache at the 32K context: decode and prefill speed against the bf16 cache's
    (context_32k), and how many of the bf16 cache's greedy tokens it reproduces."""
    from glm_jax.engine import Engine

    bench.need_model()
    gen = Engine(bench.config, bench.graphdef, bench.state, bench.layout, prefill_chunk=bench.args.prefill_chunk,
                 kernel=bench.args.kernel, kv_cache_dtype="int8", serving=False)
    prompt, new = bench.scale.contexts["context_32k"]
    new = min(new, 32)
    ids = random_ids(bench.config.vocab_size, prompt)
    run = lambda n: gen.generate([ids], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)[0]
    t1, tn, tokens = measure(run, new, bench.scale.repeats)
    result = context_figures(bench, prompt, new, t1, tn, first_has_step=True)
    moved = decode_bytes(bench.config, prompt + 1 + new / 2, kv_itemsize=1)
    result.update(decode_bytes_per_step=moved, decode_roofline_fraction=ratio(
        moved / result["decode_seconds_per_token"], bench.device().get("copy_bytes_per_s")))
    bf16 = bench.results.get("context_32k") or {}
    result["decode_speedup_vs_bf16_cache"] = ratio(bf16.get("decode_seconds_per_token"),
                                                   result["decode_seconds_per_token"])
    ours = bench.tokens.get(prompt)
    if ours is not None:
        same = [a == b for a, b in zip(tokens, ours)]
        result["greedy_vs_bf16_cache"] = {"compared": len(same), "leading_identical": (same + [False]).index(False)}
    return result


SECTIONS: tuple[tuple[str, Callable[[Bench], dict]], ...] = (
    ("device", section_device),
    ("model", section_model),
    ("context_1k", section_context("context_1k")),
    ("products", section_products),
    ("accuracy", section_accuracy),
    ("context_8k", section_context("context_8k")),
    ("transformers", section_transformers),
    ("context_32k", section_context("context_32k")),
    ("longest_fit", section_longest_fit),
    ("prefill_128k", section_prefill_128k),
    ("int8_32k", section_int8_32k),
    ("decode_kernel", section_decode_kernel),
)


def targets(results: dict) -> dict:
    get = lambda section, key: (results.get(section) or {}).get(key)
    fit = results.get("longest_fit") or {}
    return {
        "decode_roofline_fraction_1k": get("context_1k", "decode_roofline_fraction"),
        "prefill_mfu_32k": get("context_32k", "prefill_mfu"),
        "decode_vs_transformers_1k": get("transformers", "decode_speedup_1k"),
        "longest_tokens_bf16": (fit.get("bf16") or {}).get("longest_tokens"),
        "longest_tokens_int8": (fit.get("int8") or {}).get("longest_tokens"),
        "goals": {**TARGETS, "longest_tokens": "1,048,576 on one H200 with the bf16 cache, one H100 with int8"},
    }


def summary(results: dict) -> str:
    lines = [f"bench_gpu on {results['meta']['device_kind']} ({results['meta']['config']}), "
             f"{results['meta']['elapsed_s']:.0f} s"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
    times = lambda x: "n/a" if x is None else f"{x:.2f}x"
    for name, _ in SECTIONS:
        r = results.get(name)
        if r is None or "error" in r or "skipped" in r:
            lines.append(f"  {name:<13} {'not run' if r is None else r.get('error') or 'skipped: ' + r['skipped']}")
        elif name == "device":
            lines.append(f"  {name:<13} copy {r['copy_bytes_per_s'] / 1e9:,.0f} GB/s, bf16 matmul "
                         f"{r['bf16_flops_per_s'] / 1e12:,.1f} TFLOP/s (of datasheet: "
                         f"{fmt(r['copy_of_datasheet'], '.0%')}, {fmt(r['matmul_of_datasheet'], '.0%')})")
        elif name.startswith("context"):
            lines.append(f"  {name:<13} decode {r['decode_tokens_per_s']:,.1f} tok/s = "
                         f"{fmt(r['decode_roofline_fraction'], '.0%')} of roofline; prefill "
                         f"{r['prefill_tokens_per_s']:,.0f} tok/s, MFU {fmt(r['prefill_mfu'], '.0%')}")
        elif name == "transformers":
            lines.append(f"  {name:<13} decode {r['decode_1k']['decode_tokens_per_s']:,.1f} tok/s at 1K "
                         f"(glm-jax {times(r['decode_speedup_1k'])}), prefill 8K "
                         f"{r['prefill_8k']['prefill_tokens_per_s']:,.0f} tok/s "
                         f"(glm-jax {times(r['prefill_speedup_8k'])}), greedy {r.get('greedy_1k')}")
        elif name == "accuracy":
            paths = [f"{k} {v['relative_error']:.1e} top-1 {v['top1_agreement']:.3f}" for k, v in r.items()
                     if isinstance(v, dict) and "relative_error" in v]
            lines.append(f"  {name:<13} logits vs float32: " + "; ".join(paths)
                         + f" (cuDNN as accurate as XLA: {r.get('cudnn_as_accurate_as_xla', 'n/a')})")
        elif name == "longest_fit":
            int8 = r["int8"].get("longest_tokens", r["int8"].get("unavailable") or r["int8"].get("skipped"))
            lines.append(f"  {name:<13} bf16 cache {fmt(r['bf16']['longest_tokens'], ',')} tokens, int8 {int8} "
                         f"(limit {r['memory_limit_bytes'] / GiB:.3g} GiB)")
        elif name == "prefill_128k":
            lines.append(f"  {name:<13} {r['seconds']:.1f} s, {r['prefill_tokens_per_s']:,.0f} tok/s, MFU "
                         f"{fmt(r['prefill_mfu'], '.0%')}{' (with compilation)' if r['includes_compile'] else ''}")
        elif name == "int8_32k":
            lines.append(f"  {name:<13} decode {r['decode_tokens_per_s']:,.1f} tok/s = "
                         f"{fmt(r['decode_roofline_fraction'], '.0%')} of its roofline, "
                         f"{times(r['decode_speedup_vs_bf16_cache'])} the bf16 cache; greedy "
                         f"{r.get('greedy_vs_bf16_cache')}")
        elif name == "products":
            parts = [f"{k} {v['gb_per_s']:,.0f}" for k, v in r["products"].items()]
            rest = r["rest_seconds"]
            lines.append(f"  {name:<13} GB/s " + ", ".join(parts) + f"; per step {r['per_step_seconds'] * 1e3:.2f} ms"
                         + ("" if rest is None else f" + the rest {rest * 1e3:.2f} ms"))
        elif name == "decode_kernel":
            parts = [f"{k} {v['microseconds']['xla']:.1f} -> {v['microseconds']['pallas']:.1f} us "
                     f"(max diff {v['max_abs_pallas_vs_xla']:.1e})" for k, v in r["attention"].items()]
            decode = [f"{k[11:]} {v['decode_seconds_per_token'] * 1e3:.2f} ms/token "
                      f"(default {times(r['decode_speedup_' + k[11:]])} faster)" for k, v in r.items()
                      if k.startswith("engine_xla")]
            lines.append(f"  {name:<13} attention XLA -> Pallas: " + ", ".join(parts) + "; decode with XLA's tiles: "
                         + ", ".join(decode))
        elif name == "model":
            lines.append(f"  {name:<13} {r['weight_bytes'] / 1e9:.2f} GB bf16 made in {r['build_seconds']:.1f} s")
    t = results["targets"]
    lines.append(f"  targets: decode roofline 1K {fmt(t['decode_roofline_fraction_1k'], '.2f')} (>= 0.85), "
                 f"prefill MFU 32K {fmt(t['prefill_mfu_32k'], '.2f')} (>= 0.55), vs transformers "
                 f"{times(t['decode_vs_transformers_1k'])} (>= 3)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny config, the same code (tests, CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip optional sections once this many seconds are nearly spent (default 420)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill step (default 4096; 128 with --small)")
    parser.add_argument("--kernel", default=DEFAULT_KERNEL, choices=KERNELS,
                        help="attention kernel of the timed Engines (default auto: gpu on a GPU)")
    parser.add_argument("--sections", help=f"optional sections to run, comma-separated (default all: "
                                           f"{','.join(OPTIONAL)})")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace one 1K generate (prefill and 32 decode steps) with JAX's profiler into DIR "
                             "and summarise its kernel times (GPU only)")
    parser.add_argument("--compile-cache", help="JAX persistent compilation cache folder (reused by a rerun)")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/DATE-bench-gpu-DEVICE.json)")
    args = parser.parse_args(argv)
    scale = SMALL if args.small else FULL
    args.prefill_chunk = args.prefill_chunk or scale.prefill_chunk
    problems = []
    if args.budget_s <= 0:
        problems.append(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.prefill_chunk <= 0 or args.prefill_chunk & (args.prefill_chunk - 1):
        problems.append(f"--prefill-chunk must be a positive power of two, got {args.prefill_chunk}")
    chosen = OPTIONAL if args.sections is None else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in chosen if s not in OPTIONAL]
    if unknown:
        problems.append(f"--sections: unknown {unknown[0]!r}; choose from {', '.join(OPTIONAL)}")
    if problems:
        print(f"bench_gpu.py: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)
    args.sections = chosen
    return args, scale


def main(argv=None) -> int:
    args, scale = parse_args(argv)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    devices = jax.devices()
    if len(devices) > 1:
        print(f"bench_gpu.py: measures one device, {len(devices)} visible (set CUDA_VISIBLE_DEVICES=0)",
              file=sys.stderr)
        return 2
    kind = devices[0].device_kind
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") + ("-small" if args.small else "")
        args.out = ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-bench-gpu-{slug}.json"
    import glm_jax.attention as attention

    bench = Bench(args, scale)
    bench.results["meta"] = {
        "device_kind": kind, "platform": devices[0].platform, "jax": jax.__version__, "config": scale.config_name,
        "small": args.small, "budget_s": args.budget_s, "prefill_chunk": args.prefill_chunk,
        "attention_kernel": args.kernel,
        "attention_settings": {k: v for k, v in vars(attention).items()
                               if k.isupper() and isinstance(v, (bool, int, float, str))},
        "sections": [name for name, _ in SECTIONS if name in ("device", "model", "context_1k") + args.sections],
        "command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
    log(f"{kind}, jax {jax.__version__}, {scale.config_name}, budget {args.budget_s:.0f} s -> {args.out}")
    bench.write()
    failed = False
    for name, fn in SECTIONS:
        if name not in bench.results["meta"]["sections"]:
            continue
        if name in OPTIONAL and bench.left() < scale.cost_s[name]:
            bench.results[name] = {"skipped": "budget"}
            log(f"{name}: skipped (budget: {bench.left():.0f} s left, needs about {scale.cost_s[name]:.0f})")
        else:
            log(f"{name} ...")
            start = time.perf_counter()
            try:
                bench.results[name] = fn(bench)
                bench.results[name]["section_seconds"] = time.perf_counter() - start
                log(f"{name}: done in {time.perf_counter() - start:.1f} s")
            except Exception as e:  # recorded, and the next section goes on
                failed = True
                bench.results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"{name}: FAILED\n{traceback.format_exc()}")
        bench.write()
    bench.write(complete=True)
    print(summary(bench.results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
