#!/usr/bin/env python3
"""The int8 KV cache against the float cache on the same weights: per-step decode logits.

  python scripts/int8_accuracy.py FOLDER [FOLDER ...] [--new 200] [--dtype bfloat16] [--json]

For each model folder (the test fixtures under tests/data/fixtures work): greedy-decode --new tokens
with the float cache (the weights' dtype) after the reference prompt, then run the same tokens
(teacher-forced) with the int8 cache, and report the relative error of each step's logits
(||int8 - float|| / ||float||), the top-1 agreement, and how many of int8's own greedy tokens
equal the float cache's. The bf16 rows also give the bf16-weights noise the project measures
(float32 weights vs bf16 weights, both with float caches) as the yardstick.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from glm_jax import options  # noqa: E402


def step_logits(model, kv_cache_dtype, prompt, tokens):
    """Logits [len(tokens), V] of each decode step after `prompt`, fed `tokens` one at a time."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from glm_jax.engine import cache_dtype, model_step, one_row_cache
    from glm_jax.sharding import Layout, make_mesh

    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    step = jax.jit(functools.partial(model_step, model.graphdef, layout=layout), donate_argnums=(1,))
    p = len(prompt)
    cache = one_row_cache(model.config, layout, p + len(tokens), 128, cache_dtype(kv_cache_dtype, model.dtype))
    row = np.zeros(1, np.int32)
    logits, cache = step(model.state, cache, np.asarray([prompt], np.int32), np.arange(p, dtype=np.int32)[None],
                         np.ones((1, p), bool), row)
    out = [logits[0]]
    for i, token in enumerate(tokens[:-1]):
        logits, cache = step(model.state, cache, np.asarray([[token]], np.int32), np.asarray([[p + i]], np.int32),
                             np.ones((1, 1), bool), row)
        out.append(logits[0])
    return np.asarray(jnp.stack(out))


def measure(folder: pathlib.Path, new: int, dtype: str | None) -> dict:
    import numpy as np

    import glm_jax

    model = glm_jax.load(folder, dtype=dtype)
    prompt = np.load(folder / "reference.npz")["input_ids"][0].tolist()
    tokens = model.generate([prompt], max_new_tokens=new, temperature=0, stop_ids=())[0]
    ref = step_logits(model, None, prompt, tokens)
    got = step_logits(model, "int8", prompt, tokens)
    own = glm_jax.load(folder, dtype=dtype, kv_cache_dtype="int8").generate(
        [prompt], max_new_tokens=new, temperature=0, stop_ids=())[0]
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    same = [a == b for a, b in zip(own, tokens)]
    result = {"folder": str(folder), "dtype": str(model.dtype), "steps": new,
              "logits_relative_error_median": float(np.median(rel)), "logits_relative_error_max": float(rel.max()),
              "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
              "greedy_leading_identical": (same + [False]).index(False), "greedy_identical": int(sum(same))}
    if str(model.dtype) == "bfloat16":   # the yardstick: bf16 weights against float32 weights
        f32 = step_logits(glm_jax.load(folder, dtype="float32"), None, prompt, tokens)
        noise = np.linalg.norm(ref - f32, axis=-1) / np.linalg.norm(f32, axis=-1)
        result.update(bf16_noise_relative_error_median=float(np.median(noise)),
                      bf16_noise_top1_agreement=float((ref.argmax(-1) == f32.argmax(-1)).mean()))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=pathlib.Path, help="model folders with a reference.npz prompt")
    parser.add_argument("--new", type=int, default=200, help="decode steps (default 200)")
    parser.add_argument("--dtype", choices=options.DTYPES, default=None,
                        help="compute dtype (default: the stored weights')")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    for folder in args.folders:
        if not (folder / "reference.npz").is_file():
            parser.exit(2, f"int8_accuracy.py: {folder}: no reference.npz (a prompt to start from)\n")
    results = [measure(f, args.new, args.dtype) for f in args.folders]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        noise = (f"; bf16 weights vs fp32: {r['bf16_noise_relative_error_median']:.2e}, top-1 "
                 f"{r['bf16_noise_top1_agreement']:.3f}") if "bf16_noise_relative_error_median" in r else ""
        print(f"{r['folder']} ({r['dtype']}, {r['steps']} steps): int8 vs float cache logits "
              f"{r['logits_relative_error_median']:.2e} median / {r['logits_relative_error_max']:.2e} max relative, "
              f"top-1 {r['top1_agreement']:.3f}; own greedy {r['greedy_leading_identical']} leading / "
              f"{r['greedy_identical']} identical{noise}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
