#!/usr/bin/env python3
"""Writes a random GLM-4 checkpoint as an untouched Hugging Face folder would look.

  python scripts/make_random_checkpoint.py --preset glm-4-9b-chat-1m --out /tmp/glm-1m-random
  python scripts/make_random_checkpoint.py --preset demo --out /tmp/glm-demo --dtype float32

Real names, shapes and dtype (bf16), the original `chatglm` layout (or `--layout glm`), the published
10-shard split for full-size presets, plus the unused `rotary_pos_emb.inv_freq`. Weights are normal
with std 0.02 (norms around 1), seeded per tensor name, written one shard at a time.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import zlib

import numpy as np

from glm_jax.config import PRESETS, GLMConfig
from glm_jax.convert.checkpoint import atomic_folder, np_dtype
from glm_jax.convert.hf import default_shards, write_hf
from glm_jax.convert.layout import CHATGLM, IGNORED, hf_tensors
from glm_jax.progress import Progress

# A small GLM-4 with the real vocabulary and head layout of the 1M model: the embedded default.
DEMO = PRESETS["glm-4-9b-chat-1m"].replace(hidden_size=256, intermediate_size=640, num_layers=4,
                                           num_heads=8, num_kv_heads=4, head_dim=32, dtype="float32")


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if "layernorm" in name or "norm.weight" in name:
        x = x * np.float32(5) + np.float32(1)
    return x.astype(dtype)


def make(config: GLMConfig, out: pathlib.Path, *, layout: str = CHATGLM, seed: int = 0, num_shards: int = 10,
         force: bool = False, progress: bool = True) -> None:
    dtype = np_dtype(config.dtype)
    plan = hf_tensors(config, layout)
    weight_map = default_shards(plan, dtype.itemsize, num_shards)
    extra = {}
    for name in IGNORED[layout]:  # the original checkpoints carry this unused buffer (base 10000)
        rot = config.rotary_dim
        extra[name] = (1.0 / 10000 ** (np.arange(0, rot, 2, dtype=np.float32) / rot)).astype(dtype)
        weight_map[name] = weight_map[plan[0].name]
    total = sum(int(np.prod(t.shape)) for t in plan) * dtype.itemsize
    with atomic_folder(out, force) as tmp, Progress(f"random {out.name}", total, enabled=progress) as bar:
        write_hf(tmp, config, layout, lambda t: random_tensor(t.name, t.shape, dtype, seed), weight_map,
                 extra=extra, progress=bar.update)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=[*PRESETS, "demo"],
                        help="a published model's shapes, or 'demo' (4 layers, hidden 256, real vocabulary)")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder to create")
    parser.add_argument("--layout", choices=("chatglm", "glm"), default=CHATGLM, help="tensor layout (default chatglm)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
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
        make(config, args.out, layout=args.layout, seed=args.seed, num_shards=shards, force=args.force)
    except ValueError as e:
        print(f"make_random_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({config.num_params / 1e9:.2f}B parameters, {config.dtype}, {args.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
