#!/usr/bin/env python3
"""glm-jax generation against transformers' GlmForCausalLM.generate on the same random weights.

  python scripts/bench_generate.py [--layers 8 --hidden 1024 --prompt 256 --new 64]

One run, this machine: decode tokens/s (batch 1, greedy) and prefill tokens/s of both, their
ratio, and decode's achieved bytes/s (weights + KV cache read per token / time per token) next
to a measured memory copy. Decode time per token = (time for N new tokens - time for 1) / (N - 1),
so prefill and compilation are excluded; every figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np
from _bench import add_shape_args, best_time, decode_bytes, hf_random_model, memory_bandwidth, shape_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    import glm_jax

    config = shape_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_random_model(pathlib.Path(tmp) / "model", config)
        model = glm_jax.load(pathlib.Path(tmp) / "model", prefill_chunk=args.prompt)
    params = config.num_params
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))
    results = {"parameters": params, "prompt": args.prompt, "new_tokens": args.new,
               "torch_threads": torch.get_num_threads()}

    def jax_run(n):
        return model.generate([prompt[0].tolist()], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)

    def hf_run(n):
        with torch.no_grad():
            return hf.generate(torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    jax_run(args.new), jax_run(1)                              # compile both shapes
    hf_run(2)
    same = jax_run(args.new)[0] == hf_run(args.new)[0, args.prompt:].tolist()
    for name, run in (("glm_jax", jax_run), ("transformers", hf_run)):
        t1, tn = best_time(lambda: run(1), args.repeats), best_time(lambda: run(args.new), args.repeats)
        results[name] = {"prefill_tokens_per_s": args.prompt / t1,
                         "decode_tokens_per_s": (args.new - 1) / (tn - t1)}
    bytes_per_step = decode_bytes(config, args.prompt + args.new // 2, weight_itemsize=4, kv_itemsize=4)
    results["decode_bytes_per_token"] = bytes_per_step
    results["memory"] = memory_bandwidth()
    for name in ("glm_jax", "transformers"):
        r = results[name]
        r["decode_gb_per_s"] = bytes_per_step * r["decode_tokens_per_s"] / 1e9
    results["decode_ratio"] = results["glm_jax"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
    results["prefill_ratio"] = results["glm_jax"]["prefill_tokens_per_s"] / results["transformers"]["prefill_tokens_per_s"]
    results["greedy_tokens_identical"] = same
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"random GLM-4: {params / 1e6:.0f}M parameters (float32), {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads}/{args.kv_heads} heads; prompt {args.prompt}, {args.new} new tokens, batch 1, greedy")
    for name in ("glm_jax", "transformers"):
        r = results[name]
        print(f"{name:<13} prefill {r['prefill_tokens_per_s']:8.1f} tokens/s   decode {r['decode_tokens_per_s']:6.2f} "
              f"tokens/s = {r['decode_gb_per_s']:5.2f} GB/s of weights + KV")
    print(f"ratio glm_jax / transformers: prefill {results['prefill_ratio']:.2f}x, decode {results['decode_ratio']:.2f}x")
    mem = results["memory"]
    print(f"memory, both cores: read {mem['read_gb_per_s']:.1f} GB/s (jitted sum of 2 GiB), copy "
          f"{mem['copy_gb_per_s']:.1f} GB/s read + written (numpy, 2 threads); glm_jax decode streams "
          f"{100 * results['glm_jax']['decode_gb_per_s'] / mem['read_gb_per_s']:.0f}% of the read bandwidth, "
          f"transformers {100 * results['transformers']['decode_gb_per_s'] / mem['read_gb_per_s']:.0f}%")
    print(f"greedy tokens identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
