#!/usr/bin/env python3
"""glm-4-9b-chat-1m on one accelerator, random bf16 weights made on the device (issue #15).

  python scripts/bench_gpu.py [--budget-s 420] [--prefill-chunk 4096] [--out FILE] [--kernel auto]
                              [--sections accuracy,transformers,...] [--compile-cache DIR] [--profile DIR]
  python scripts/bench_gpu.py --small --out /tmp/bench.json   # a tiny config, same code (tests: CPU)

Sections, in this order (the first three always run; the others are skipped, recorded as
"skipped", once the time since start plus their rough cost exceeds --budget-s). Each runs in its own
try/except (a failure is recorded as {"error": ...}) and the JSON is rewritten after each one.

- device: HBM bandwidth, the best of 20 jitted in-place `x + 1` over a 4 GiB float32 array (bytes
  read + written) after 3 untimed (a best case: the median varies from run to run); bf16 peak, the
  median of 7 calls of 8 chained 8192^3 bf16 matmuls; the datasheet figures of known chips; jax's
  memory_stats (JAX may grow its pool to 95% of the GPU's memory).
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
  product pays its own launch and the dependency kernel, so the sum can exceed the step:
  per-product GB/s, not a decomposition.
- accuracy: teacher-forced logits [P, V] of one random 3-chunk prompt (P = 3 x chunk / 4) from
  the bf16 weights through glm-jax's XLA kernel, glm-jax's GPU kernel (cuDNN) and transformers
  (SDPA, one forward), each against a float32 reference: glm-jax on the same weights cast to
  float32, float32 cache, XLA kernel at HIGHEST precision. Relative error, max abs error and top-1
  agreement per path; cuDNN counts as accurate when its error is at most 1.25x the XLA path's and
  its top-1 agreement at most 2 points lower (the library's "auto" kernel takes cuDNN on GPUs).
- transformers: GlmForCausalLM (SDPA, bf16) built on the meta device and given the very same
  device arrays (torch.from_dlpack, reshaped to the HF layout by glm_jax.convert's mapping, no
  copy), generate() timed the same way at 1K (decode) and 8K (prefill;
  transformers' t(1) is the prefill alone). Greedy agreement with glm-jax's 1K tokens. The torch
  model is freed before the long sections.
- longest_fit: compile_report (one prefill chunk against the full cache, and the decode loop;
  abstract weights, compiled for this device) at the longest multiple of 64K (at most 1,048,576)
  that arithmetic allows (the weights and 3% for temporaries off the device's memory limit,
  memory_stats bytes_limit, over the cache's bytes per token); lowered and compiled again (at most
  4 tries) while the compiled peak does not fit; the bf16 cache, then the int8 cache.
- int8_32k: the int8 KV cache at the 32K context against the bf16 cache's (context_32k).
- decode_kernel: the Pallas decode attention against XLA's tiles, one call alone and in the Engine.
- prefill_128k: one 131,072-token prefill (generate with max_new_tokens=1, so one decode step is
  included). The first call includes compilation; it is run a second time if the budget allows.

--small runs all of it on a tiny config (2 layers, hidden 256, 4/2 heads, vocab 1024) with prompts
of 64 / 128 / 192 / 1024 tokens (the first three share one cache bucket: fewer compiles), prefill
chunks of 64, small arrays and an assumed 32 MiB memory limit for the fit.
The JSON (default benchmarks/results/DATE-bench-gpu-DEVICE.json) names the device; progress lines
go to stderr; a summary goes to stdout. Exit 1 if a section failed, 2 on bad input.
The sections live in scripts/gpu/ (device, context, kernels, hf, fit; bench: the shared state; report:
the summary). Needs glm_jax installed (`pip install -e .`: glm_jax.convert is the folder convert/).
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
import datetime  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))   # this checkout's glm_jax before an installed one

from gpu.bench import (AUTO, FULL, GPU, OPTIONAL, SECTION_NAMES, SMALL, XLA, Bench,  # noqa: E402  (scripts/ on sys.path)
                       log)
from gpu.context import section_context, section_int8_32k, section_prefill_128k  # noqa: E402
from gpu.device import section_device, section_model  # noqa: E402
from gpu.fit import section_longest_fit  # noqa: E402
from gpu.hf import section_accuracy, section_transformers  # noqa: E402
from gpu.kernels import section_decode_kernel, section_products  # noqa: E402
from gpu.report import summary  # noqa: E402


SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "device": section_device,
    "model": section_model,
    "context_1k": section_context("context_1k"),
    "products": section_products,
    "accuracy": section_accuracy,
    "context_8k": section_context("context_8k"),
    "transformers": section_transformers,
    "context_32k": section_context("context_32k"),
    "longest_fit": section_longest_fit,
    "prefill_128k": section_prefill_128k,
    "int8_32k": section_int8_32k,
    "decode_kernel": section_decode_kernel,
}
assert tuple(SECTIONS) == SECTION_NAMES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny config, the same code (tests, CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip optional sections once this many seconds are nearly spent (default 420)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill step (default 4096; 128 with --small)")
    parser.add_argument("--kernel", default=AUTO, choices=(AUTO, XLA, GPU),
                        help=f"attention kernel of the timed Engines (default {AUTO}: the GPU's on a GPU)")
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
        "sections": [name for name in SECTIONS if name in ("device", "model", "context_1k") + args.sections],
        "command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
    log(f"{kind}, jax {jax.__version__}, {scale.config_name}, budget {args.budget_s:.0f} s -> {args.out}")
    bench.write()
    failed = False
    for name, fn in SECTIONS.items():
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
