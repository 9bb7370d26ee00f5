#!/usr/bin/env python3
"""Writes a random GLM-4 checkpoint as an untouched Hugging Face folder would look.

  python scripts/make_random_checkpoint.py --preset glm-4-9b-chat-1m --out /tmp/glm-1m-random
  python scripts/make_random_checkpoint.py --preset demo --out /tmp/glm-demo --dtype float32

Real names, shapes and dtype (bf16), the original `chatglm` layout (or `--layout glm`), the published
10-shard split for full-size presets, plus the unused `rotary_pos_emb.inv_freq`. Weights are normal
with std 0.02 (norms around 1), seeded per tensor name, written one shard at a time
(glm_jax.testing.write_random_checkpoint).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from glm_jax import options
from glm_jax.config import PRESETS
from glm_jax.testing import random_config, write_random_checkpoint

# A small GLM-4 with the real vocabulary and head layout of the 1M model: the embedded default.
DEMO = random_config(hidden_size=256, intermediate_size=640, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=[*PRESETS, "demo"],
                        help="a published model's shapes, or 'demo' (4 layers, hidden 256, real vocabulary)")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder to create")
    parser.add_argument("--layout", choices=options.HF_LAYOUTS, default=options.HF_LAYOUTS[0],
                        help=f"tensor layout (default {options.HF_LAYOUTS[0]})")
    parser.add_argument("--dtype", choices=options.DTYPES, default=None,
                        help="weight dtype (default: bfloat16 for presets, float32 for demo)")
    parser.add_argument("--shards", type=int, default=None, help="number of safetensors files (default 10; demo 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    config = DEMO if args.preset == "demo" else PRESETS[args.preset]
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    shards = args.shards or (1 if args.preset == "demo" else 10)
    try:
        write_random_checkpoint(args.out, config, layout=args.layout, seed=args.seed, num_shards=shards,
                                force=args.force, progress=True)
    except ValueError as e:
        print(f"make_random_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({config.num_params / 1e9:.2f}B parameters, {config.dtype}, {args.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
