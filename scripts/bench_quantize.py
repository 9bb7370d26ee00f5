#!/usr/bin/env python3
"""Decode speed with quantized weights against float weights, same run, same random model.

  python scripts/bench_quantize.py [--layers 8 --hidden 1024 --ffn 2816 --vocab 32768 --prompt 128 --new 65]

Loads one random model folder (glm_jax.testing.write_random_model; a 32,768-token vocabulary by
default, so that the output layer, which stays in float, is a tenth of the weights) as each variant (float32, bfloat16, int8 and int4 projections in either
compute dtype), then runs greedy generation of --new tokens from the same --prompt for every variant in
interleaved rounds (`_bench.rounds`). Decode time per token comes from the per-token timestamps
(`on_token`): (last - first) / (new - 1), so prefill and the first token are left out. Prints
tokens/s per variant (median of the rounds) and the bytes of weights each decode step reads.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from _bench import add_shape_args, rounds, shape_config  # noqa: E402

VARIANTS = {"float32": ("float32", None), "int8 (f32 compute)": ("float32", "int8"),
            "bfloat16": ("bfloat16", None), "int8 (bf16 compute)": ("bfloat16", "int8"),
            "int4 (bf16 compute)": ("bfloat16", "int4")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=65)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import jax.numpy as jnp

    import glm_jax
    from glm_jax.params import param_specs
    from glm_jax.quantize import stored_bytes, stored_specs
    from glm_jax.options import Quantization
    from glm_jax.testing import write_random_model

    config = shape_config(args, vocab_size=args.vocab, pad_token_id=0, eos_token_ids=(1,))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt).tolist()
    models, results = {}, {"parameters": config.num_params, "prompt": args.prompt, "new_tokens": args.new}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_model(pathlib.Path(tmp) / "model", config)
        for name, (dtype, q) in VARIANTS.items():
            models[name] = glm_jax.load(pathlib.Path(tmp) / "model", dtype=dtype, quantize=q)
    per_token: dict[str, list[float]] = {name: [] for name in models}

    def run(name):
        stamps = []
        ids = models[name].generate([prompt], max_new_tokens=args.new, temperature=0, stop_ids=(), reuse=False,
                                    on_token=lambda row, token: stamps.append(time.perf_counter()))
        per_token[name].append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        return ids

    first = {name: run(name)[0] for name in models}                     # compiles; the greedy tokens
    for name in per_token:
        per_token[name].clear()
    rounds({name: (lambda name=name: run(name)) for name in models}, args.rounds, warmup=0)
    for name, (dtype, q) in VARIANTS.items():
        stored = stored_specs(param_specs(config, getattr(jnp, dtype)), Quantization.parse(q))
        embed = stored_bytes({n: s for n, s in stored.items() if n == "embed"})
        seconds = statistics.median(per_token[name])
        results[name] = {"decode_tokens_per_s": 1 / seconds, "seconds_per_token": per_token[name],
                         "weight_bytes_read_per_token": stored_bytes(stored) - embed,
                         "same_tokens_as_float32": int(sum(a == b for a, b in zip(first[name], first["float32"])))}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{config.num_params / 1e6:.0f}M parameters, prompt {args.prompt}, {args.new} new tokens, "
          f"median of {args.rounds} interleaved rounds")
    for name in VARIANTS:
        r = results[name]
        print(f"  {name:22s} {r['decode_tokens_per_s']:7.2f} tokens/s  weights read {r['weight_bytes_read_per_token'] / 1e6:7.1f} MB"
              f"/token  greedy tokens equal to float32's: {r['same_tokens_as_float32']}/{args.new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
