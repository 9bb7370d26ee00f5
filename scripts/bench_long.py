#!/usr/bin/env python3
"""Long-prompt prefill and decode: glm-jax against transformers' GlmForCausalLM (SDPA) on the same
random weights, with the memory-bandwidth roofline of decode measured in the same run.

  python scripts/bench_long.py [--prompts 16384,61440 --new 16 --repeats 3 --prefill-chunk 512]
                               [--skip-transformers] [--json] [--out FILE]

Model: random GLM-4, 2 layers, hidden 512, 8 query / 2 KV heads of dim 128, ffn 1408, vocab 151,552,
float32, rope_theta 1e8, partial rotary 0.5; batch 1, greedy, random prompt ids.

Per prompt length P, both sides do the same work and are timed the same way:
- prefill = time to the first new token (the prompt's forward with a KV cache, then its argmax).
  glm-jax: from calling generate(max_new_tokens=N, on_token=...) to the first callback; its decode
  loop runs one step before handing over token 1, so this includes one decode step. transformers:
  one forward over the prompt (use_cache=True, logits_to_keep=1) and the argmax.
- decode ms/token = time of N-1 steps / (N-1), one step = a one-token forward on the cache + argmax.
  glm-jax: the time between the first and the N-th on_token callback of the same call (the
  compiled decode loop, handing each token to the host). transformers: N-1 forwards with its
  DynamicCache after the prefill, each fed the previous argmax.
  Why not (t(N new) - t(1 new)) / (N-1) as bench_generate.py does: at 60K a prefill lasts minutes,
  and the difference of two such runs is mostly noise next to N-1 decode steps of tens of ms.
- medians over --repeats (min kept too). glm-jax runs one warm-up call first (compilation), which
  is reported as first_call_s. transformers re-runs the prefill for each repeat only while it takes
  at most 30 s; past that, one prefill serves every repeat (each decode repeat starts from a copy
  of its cache), and prefill_runs says how many prefills were timed.
- roofline: a decode step must read every weight except the embedding table (one row of it) and
  the filled KV cache (layers x 2 x kv_heads x head_dim x 4 bytes x tokens, at the mean cache
  length over the timed steps, P + N/2); roofline ms = those bytes / the read bandwidth measured
  by a jitted sum over 2 GiB in this process. % of roofline = roofline ms / measured ms.
- speedups = transformers time / glm-jax time (medians). greedy_tokens_identical compares the N
  greedy tokens of both (random weights: near ties can flip a token; reported, not asserted).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu is installed; keep JAX on the CPU cores

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _bench import LONG_MODEL, decode_bytes, hf_random_model, long_model_config, memory_bandwidth  # noqa: E402

from glm_jax import options  # noqa: E402

VOCAB = LONG_MODEL["vocab"]
PREFILL_REPEAT_LIMIT_S = 30.0   # transformers prefills longer than this are timed once


SIDES = ("glm_jax", "glm_jax_int8", "transformers")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "runs": values}


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--prompts must be a comma-separated list of positive integers, got {text!r}")
    return values


def glm_jax_runs(model, prompt: list[int], new: int, repeats: int) -> tuple[float, list[float], list[float], list[int]]:
    """(first call seconds, prefill seconds per repeat, decode seconds/token per repeat, tokens)."""

    def run():
        stamps = []
        start = time.perf_counter()
        tokens = model.generate([prompt], max_new_tokens=new, temperature=0, stop_ids=(), reuse=False,
                                on_token=lambda row, token: stamps.append(time.perf_counter()))[0]
        return start, stamps, tokens

    start, stamps, _ = run()
    first_call = stamps[-1] - start
    prefill, decode = [], []
    for _ in range(repeats):
        start, stamps, tokens = run()
        prefill.append(stamps[0] - start)
        decode.append((stamps[-1] - stamps[0]) / (new - 1))
    return first_call, prefill, decode, tokens


def transformers_runs(hf, prompt: list[int], new: int, repeats: int) -> tuple[list[float], list[float], list[int]]:
    """(prefill seconds per timed prefill, decode seconds/token per repeat, tokens)."""
    import torch

    ids = torch.tensor([prompt])
    cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # 5.24 renamed it
    prefill, decode = [], []
    with torch.no_grad():
        hf(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)                 # warm-up
        for _ in range(repeats):
            if not prefill or prefill[0] <= PREFILL_REPEAT_LIMIT_S:
                start = time.perf_counter()
                out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
                first = out.logits[:, -1].argmax(-1, keepdim=True)                  # [1, 1]
                prefill.append(time.perf_counter() - start)
                filled = getattr(out, cache_arg)
            cache = copy.deepcopy(filled)
            tokens = [first]
            start = time.perf_counter()
            for _ in range(new - 1):
                out = hf(input_ids=tokens[-1], use_cache=True, **{cache_arg: cache})
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            decode.append((time.perf_counter() - start) / (new - 1))
    return prefill, decode, torch.cat(tokens, 1)[0].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="16384,61440", help="prompt lengths, comma-separated")
    parser.add_argument("--new", type=int, default=16, help="new tokens per run (decode: the last N-1 of them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=options.PREFILL_CHUNK, help="glm-jax Model prefill_chunk")
    parser.add_argument("--layers", type=int, default=LONG_MODEL["layers"])
    parser.add_argument("--hidden", type=int, default=LONG_MODEL["hidden"])
    parser.add_argument("--heads", type=int, default=LONG_MODEL["heads"])
    parser.add_argument("--kv-heads", type=int, default=LONG_MODEL["kv_heads"])
    parser.add_argument("--head-dim", type=int, default=LONG_MODEL["head_dim"])
    parser.add_argument("--ffn", type=int, default=LONG_MODEL["ffn"])
    parser.add_argument("--skip-transformers", action="store_true", help="time glm-jax only")
    parser.add_argument("--kv-cache-dtype", choices=options.KV_CACHE_DTYPES, default=None,
                        help="also time glm-jax with this KV cache (side glm_jax_int8), against its own roofline")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON to this file")
    args = parser.parse_args()
    try:
        prompts = positive_ints(args.prompts)
        for flag, value, least in (("--new", args.new, 2), ("--repeats", args.repeats, 1),
                                   ("--prefill-chunk", args.prefill_chunk, 1)):
            if value < least:
                raise ValueError(f"{flag} must be at least {least}, got {value}")
    except ValueError as e:
        print(f"bench_long.py: error: {e}", file=sys.stderr)
        return 2

    import jax
    import torch
    import transformers

    import glm_jax

    config = long_model_config(max(prompts) + args.new, vocab=VOCAB, hidden=args.hidden, ffn=args.ffn,
                               layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    params = config.num_params
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "model"
        hf = hf_random_model(folder, config)
        model = glm_jax.load(folder, prefill_chunk=args.prefill_chunk)
        quantized = args.kv_cache_dtype and glm_jax.load(folder, prefill_chunk=args.prefill_chunk,
                                                         kv_cache_dtype=args.kv_cache_dtype)

    command = shlex.join(["python", "scripts/bench_long.py", *sys.argv[1:]])
    results = {
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "jax_devices": jax.device_count(), "jax_platform": jax.devices()[0].platform,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "model": {"parameters": params, "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim, "ffn": args.ffn, "vocab": VOCAB,
                  "dtype": "float32", "attn_implementation": hf.config._attn_implementation},
        "new_tokens": args.new, "repeats": args.repeats, "prefill_chunk": args.prefill_chunk,
        "kv_cache_dtype": args.kv_cache_dtype,
        "memory": memory_bandwidth(),
        "lengths": [],
    }
    read_bytes_per_s = results["memory"]["read_gb_per_s"] * 1e9
    rng = np.random.default_rng(0)
    for length in prompts:
        prompt = rng.integers(0, VOCAB, length).tolist()
        step_bytes = decode_bytes(config, length + args.new / 2, weight_itemsize=4, kv_itemsize=4)
        row = {"prompt": length, "decode_bytes_per_token": step_bytes,
               "roofline_ms_per_token": 1e3 * step_bytes / read_bytes_per_s}
        first_call, prefill, decode, jax_tokens = glm_jax_runs(model, prompt, args.new, args.repeats)
        row["glm_jax"] = {"first_call_s": first_call, "prefill_s": summary(prefill),
                          "decode_ms_per_token": summary([1e3 * d for d in decode]), "tokens": jax_tokens}
        if quantized:   # int8 values and a float32 scale per token, layer and KV head
            int8_bytes = decode_bytes(config, length + args.new / 2, weight_itemsize=4, kv_itemsize=1)
            first_call, prefill, decode, tokens = glm_jax_runs(quantized, prompt, args.new, args.repeats)
            row["glm_jax_int8"] = {"first_call_s": first_call, "prefill_s": summary(prefill),
                                   "decode_ms_per_token": summary([1e3 * d for d in decode]), "tokens": tokens,
                                   "decode_bytes_per_token": int8_bytes,
                                   "roofline_ms_per_token": 1e3 * int8_bytes / read_bytes_per_s,
                                   "greedy_tokens_identical_to_float_cache": tokens == jax_tokens}
            row["int8_decode_speedup"] = (row["glm_jax"]["decode_ms_per_token"]["median"] /
                                          row["glm_jax_int8"]["decode_ms_per_token"]["median"])
        if not args.skip_transformers:
            prefill, decode, hf_tokens = transformers_runs(hf, prompt, args.new, args.repeats)
            row["transformers"] = {"prefill_s": summary(prefill), "prefill_runs": len(prefill),
                                   "decode_ms_per_token": summary([1e3 * d for d in decode]), "tokens": hf_tokens}
            for what in ("prefill_s", "decode_ms_per_token"):
                speedup = row["transformers"][what]["median"] / row["glm_jax"][what]["median"]
                row[what.split("_")[0] + "_speedup"] = speedup
            row["greedy_tokens_identical"] = jax_tokens == hf_tokens
        for name in SIDES:
            if name in row:
                ms = row[name]["decode_ms_per_token"]["median"]
                row[name]["roofline_pct"] = 100 * row[name].get("roofline_ms_per_token", row["roofline_ms_per_token"]) / ms
        results["lengths"].append(row)

    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
        return 0
    mem = results["memory"]
    print(command)
    print(f"random GLM-4: {params / 1e6:.0f}M parameters (float32), {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads}/{args.kv_heads} heads of {args.head_dim}, ffn {args.ffn}; batch 1, greedy, {args.new} new "
          f"tokens, glm-jax prefill_chunk {args.prefill_chunk}, median (min) of {args.repeats}")
    print(f"JAX: {results['jax_devices']} {results['jax_platform']} device(s); torch threads "
          f"{results['torch_threads']}; {results['cpu_count']} CPUs; memory read {mem['read_gb_per_s']:.1f} GB/s "
          f"(jitted sum of 2 GiB), copy {mem['copy_gb_per_s']:.1f} GB/s")
    print(f"{'prompt':>7} {'side':<13} {'prefill s':>17} {'decode ms/tok':>17} {'roofline ms':>11} {'% roofline':>10}")
    for row in results["lengths"]:
        for name in SIDES:
            if name not in row:
                continue
            r = row[name]
            p, d = r["prefill_s"], r["decode_ms_per_token"]
            once = r.get("prefill_runs", args.repeats) < args.repeats
            runs = f"  (prefill > {PREFILL_REPEAT_LIMIT_S:.0f} s: timed {r['prefill_runs']}x)" if once else ""
            print(f"{row['prompt']:>7} {name:<13} {p['median']:>8.3f} ({p['min']:6.3f}) {d['median']:>8.2f} "
                  f"({d['min']:6.2f}) {r.get('roofline_ms_per_token', row['roofline_ms_per_token']):>11.2f} "
                  f"{r['roofline_pct']:>9.0f}%{runs}")
        if "transformers" in row:
            print(f"{'':>7} speedup glm_jax vs transformers: prefill {row['prefill_speedup']:.2f}x, decode "
                  f"{row['decode_speedup']:.2f}x; greedy tokens identical: {row['greedy_tokens_identical']}")
        if "glm_jax_int8" in row:
            print(f"{'':>7} int8 cache vs float cache: decode {row['int8_decode_speedup']:.2f}x; greedy tokens "
                  f"identical: {row['glm_jax_int8']['greedy_tokens_identical_to_float_cache']}")
    if args.out:
        print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
