"""What every section of bench_gpu shares: the sizes (the real model or a tiny one), the run's state
and its JSON, the goals, and the glm-jax timing helpers (t(1) and t(N) of an Engine)."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Callable

from _bench import decode_bytes, prefill_flops, timings

from glm_jax import options

START = time.perf_counter()
GiB = 1 << 30

# device_kind substring (first match wins): dense bf16 FLOP/s and HBM bytes/s, as NVIDIA states them.
DATASHEET = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),        # SXM
    ("H200", 989e12, 4.8e12),
)

# The engine's attention kernels a GPU runs, in options' order (the fourth, "tpu", needs TPUs): the
# library's default, the portable tiles, and the GPU's (cuDNN flash attention for prefill chunks,
# the Pallas kernel for decode steps).
AUTO, XLA, GPU = options.KERNELS[:3]

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
        from glm_jax.testing import random_config

        if self.config_name == "small":
            return random_config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=64, dtype="bfloat16")
        return PRESETS[self.config_name]


FULL = Scale("glm-4-9b-chat-1m", {"context_1k": (1024, 128), "context_8k": (8192, 16), "context_32k": (32768, 128)},
             huge_prompt=131072, prefill_chunk=4096, copy_bytes=4 * GiB, matmul=(8192, 8), fit_unit=65536,
             fit_cap=1048576, memory_limit=None, repeats=3,
             cost_s={"products": 20, "decode_kernel": 120, "context_8k": 45, "transformers": 60, "accuracy": 90,
                     "context_32k": 60, "longest_fit": 100, "prefill_128k": 60, "int8_32k": 60})
SMALL = Scale("small", {"context_1k": (64, 128), "context_8k": (128, 64), "context_32k": (192, 32)},
              huge_prompt=1024, prefill_chunk=64, copy_bytes=16 << 20, matmul=(256, 2), fit_unit=1024,
              fit_cap=65536, memory_limit=32 << 20, repeats=2,
              cost_s={"products": 3, "decode_kernel": 10, "context_8k": 2, "transformers": 5, "accuracy": 5,
                      "context_32k": 3, "longest_fit": 10, "prefill_128k": 3, "int8_32k": 3})

# Every section in run order: the first three always run, the others (OPTIONAL) when chosen and the
# budget allows.
SECTION_NAMES = ("device", "model", "context_1k", "products", "accuracy", "context_8k", "transformers", "context_32k",
                 "longest_fit", "prefill_128k", "int8_32k", "decode_kernel")
OPTIONAL = ("products", "accuracy", "context_8k", "transformers", "context_32k", "longest_fit", "prefill_128k",
            "int8_32k", "decode_kernel")


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def random_ids(vocab: int, length: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(length).integers(0, vocab, length).tolist()


def datasheet(kind: str) -> dict:
    for name, flops, bandwidth in DATASHEET:
        if name in kind:
            return {"match": name, "bf16_flops_per_s": flops, "hbm_bytes_per_s": bandwidth}
    return {"match": None, "bf16_flops_per_s": None, "hbm_bytes_per_s": None}


def ratio(a, b):
    return a / b if a is not None and b else None


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
