#!/usr/bin/env python3
"""The engine's portable paged attention on one device: `paged_tiles` (every row over the longest
row's tiles) against `ragged_tiles` (one list of the pages each row sees), one decode query a row,
on random pools, interleaved rounds; the outputs' largest difference is printed with each case.

  python scripts/bench_tiles.py [--rounds 5] [--json]

Cases: rows x context lengths (tokens), the 162M benchmark model's heads (2 KV heads of 4 queries,
head dim 128), pages of 128, 64-page tiles (what `block_pages` gives a CPU decode query of 8 heads).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import numpy as np  # noqa: E402
from _bench import rounds  # noqa: E402

KV_HEADS, Q_PER_KV, HEAD_DIM, PAGE, TILE = 2, 4, 128, 128, 64
CASES = {"8 x 16K": [16384] * 8, "2 x 16K + 6 x 1K": [16384, 1024, 16384] + [1000] * 5,
         "8 x 2K": [2048] * 8, "1 x 16K + 63 x 900": [16384] + [900] * 63,
         "1 x 1K": [1000], "1 x 16K": [16384], "1 x 60K": [61440]}


def case(lengths: list[int]):
    """(q, lengths, k, v, table): each row's pages consecutive in a pool of just those pages."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    pages = [-(-n // PAGE) for n in lengths]
    k = rng.standard_normal((KV_HEADS, sum(pages) + 1, PAGE, HEAD_DIM), np.float32)
    table = np.zeros((len(lengths), max(pages)), np.int32)
    for i, n in enumerate(pages):
        table[i, :n] = sum(pages[:i]) + np.arange(n)
    q = rng.standard_normal((len(lengths), 1, KV_HEADS * Q_PER_KV, HEAD_DIM), np.float32)
    return (jnp.asarray(q), jnp.asarray(np.array(lengths)[:, None], jnp.int32), jnp.asarray(k),
            jnp.asarray(k * 0.5), jnp.asarray(table))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    import jax

    from glm_jax.engine.paged_attention import paged_tiles, ragged_tiles

    results = {}
    for name, lengths in CASES.items():
        inputs = case(lengths)
        fns = {"paged_tiles": jax.jit(functools.partial(paged_tiles, tile_pages=TILE, ragged=False)),
               "ragged_tiles": jax.jit(functools.partial(ragged_tiles, tile_pages=TILE))}
        outs = {n: f(*inputs) for n, f in fns.items()}
        out = {n: np.asarray(s.acc / s.l[..., None]) for n, s in outs.items()}
        seconds = rounds({n: (lambda f=f: jax.block_until_ready(f(*inputs))) for n, f in fns.items()}, args.rounds)
        ms = {n: 1e3 * statistics.median(s) for n, s in seconds.items()}
        results[name] = {"ms": ms, "ragged_speedup": ms["paged_tiles"] / ms["ragged_tiles"],
                         "max_difference": float(np.abs(out["paged_tiles"] - out["ragged_tiles"]).max())}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'rows x context':<22}{'paged_tiles ms':>16}{'ragged_tiles ms':>17}{'ragged speed-up':>17}{'max diff':>10}")
        for name, r in results.items():
            print(f"{name:<22}{r['ms']['paged_tiles']:>16.2f}{r['ms']['ragged_tiles']:>17.2f}"
                  f"{r['ragged_speedup']:>16.2f}x{r['max_difference']:>10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
