#!/usr/bin/env python3
"""Attention strategies side by side on 8 simulated CPU devices.

  python scripts/bench_attention.py [--lengths 1024,2048,4096,8192] [--heads 8 --kv-heads 1]

For each T: exact (one device), blockwise (one device), ring contiguous, ring zigzag (balanced)
and all-gather-KV (zigzag), causal, float32; best-of-N wall time and the ratio to single-device
blockwise. Then the causal work per hop from the tile masks: on real hardware a ring hop lasts as
long as its busiest device, so the critical path is the sum over hops of the maximum tile count.
On this machine the 8 "devices" share 2 cores, so times measure total work, not the critical path.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _bench import best_time  # noqa: E402

from glm_jax.attention import blockwise_attention, exact_attention  # noqa: E402
from glm_jax.ring import ring_attention, tile_sizes, token_order  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    return best_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def critical_path(t: int, n: int, layout: str, block: int) -> tuple[int, int]:
    """(total visible tiles, sum over ring hops of the busiest device's visible tiles)."""
    order, padded = token_order(t, n, layout, block)
    local = padded // n
    bq, bk = tile_sizes(local, block, block)
    idx = np.where(order < t, order, -1).reshape(n, local)
    q_tiles = idx.reshape(n, local // bq, bq)
    k_tiles = np.where(idx < 0, np.iinfo(np.int32).max, idx).reshape(n, local // bk, bk)
    total, path = 0, 0
    for hop in range(n):
        counts = []
        for dev in range(n):
            kv = k_tiles[(dev - hop) % n]
            # a tile is computed when any key in it is visible to any query in it
            seen = (kv.min(axis=1)[None, :] <= q_tiles[dev].max(axis=1)[:, None])
            counts.append(int(seen.sum()))
        total += sum(counts)
        path += max(counts)
    return total, path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--exact-max", type=int, default=4096, help="skip exact attention above this T")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = jax.device_count()
    b = args.block
    rows = []
    for t in map(int, args.lengths.split(",")):
        ks = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(ks[0], (1, t, args.heads, args.dim))
        k = jax.random.normal(ks[1], (1, t, args.kv_heads, args.dim))
        v = jax.random.normal(ks[2], (1, t, args.kv_heads, args.dim))
        idx = jnp.arange(t, dtype=jnp.int32)[None]
        fns = {
            "exact": jax.jit(lambda q, k, v: exact_attention(q, k, v, idx, idx)),
            "blockwise": jax.jit(lambda q, k, v: blockwise_attention(q, k, v, idx, idx, block_q=b, block_k=b)),
            "ring contiguous": jax.jit(lambda q, k, v: ring_attention(
                q, k, v, mesh=f"sequence={n}", layout="contiguous", block_q=b, block_k=b)),
            "ring zigzag": jax.jit(lambda q, k, v: ring_attention(
                q, k, v, mesh=f"sequence={n}", layout="zigzag", block_q=b, block_k=b)),
            "allgather zigzag": jax.jit(lambda q, k, v: ring_attention(
                q, k, v, mesh=f"sequence={n}", strategy="allgather", block_q=b, block_k=b)),
        }
        row = {"T": t}
        for name, fn in fns.items():
            if name == "exact" and t > args.exact_max:
                continue
            row[name] = timed(fn, q, k, v, repeats=args.repeats)
        for layout in ("contiguous", "zigzag"):
            row[f"tiles {layout}"] = critical_path(t, n, layout, b)
        rows.append(row)
        if not args.json:
            base = row["blockwise"]
            print(f"T={t}: " + "  ".join(f"{name} {row[name] * 1e3:.0f} ms ({row[name] / base:.2f}x)"
                                         for name in fns if name in row))
            (tc, pc), (tz, pz) = row["tiles contiguous"], row["tiles zigzag"]
            print(f"        causal tiles computed: contiguous {tc} (critical path {pc}), zigzag {tz} "
                  f"(critical path {pz}): the balanced layout saves {100 * (1 - pz / pc):.0f}% of the ring's time")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
