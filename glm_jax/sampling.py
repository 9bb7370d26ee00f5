"""Sampling a token from logits: greedy, temperature, top-k, top-p; parameters are traced."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_STOP_IDS = 8
# top_k up to this many takes `lax.top_k` instead of sorting the vocabulary. 64 covers transformers'
# default of 50 (the one GLM-4 runs with: its generation_config.json names no top_k) and the usual
# 20 and 40 at the least cost: lax.top_k compiles to a partial sort (TopK) on TPU and CPU, whose work
# grows with k; larger top_k values take the full sort.
TOP_K_MAX = 64


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]. temperature 0: greedy. top_k 0 / top_p 1: off.

    In transformers' order: divide by the temperature, keep the top_k largest (and any tied with the
    k-th), then the most likely of those whose probability mass reaches top_p (and any tied with the
    last one). The parameters are traced scalars, or [B] arrays (one request a row: mixed requests
    share one compiled step); `key` is one key for the batch or [B] keys, one a row (a row's draws
    then do not depend on the other rows). Only the branch the parameters need runs: no truncation
    samples without sorting, top_k <= TOP_K_MAX takes `lax.top_k`, anything else sorts the
    vocabulary (the costliest branch any row needs serves every row). Each finds the smallest kept
    value; the draw is over the whole vocabulary below it masked, so ties with the k-th past
    TOP_K_MAX stay."""
    b, v = logits.shape
    k_max = min(TOP_K_MAX, v)
    column = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (b,))[:, None]     # [B, 1]
    temperature, top_p = column(temperature, jnp.float32), column(top_p, jnp.float32)
    top_k = column(top_k, jnp.int32)
    top_k = jnp.where(top_k >= v, 0, top_k)                                  # keeps everything: off
    greedy = lambda: argmax(logits)

    def draw():
        x = logits / jnp.where(temperature == 0, 1.0, temperature)                # [B, V]
        row_branch = jnp.where((top_k == 0) & (top_p >= 1), 0, jnp.where((top_k > 0) & (top_k <= k_max), 1, 2))
        floor = jax.lax.switch(row_branch.max(), [
            lambda: jnp.full((b, 1), -jnp.inf, x.dtype),
            # the barrier keeps XLA from folding slices of the result into the top-k, which turns it
            # back into a sort of the whole vocabulary
            lambda: _floor(x, jax.lax.optimization_barrier(jax.lax.top_k(x, k_max)[0]), top_k, top_p),
            lambda: _floor(x, -jnp.sort(-x, axis=-1), top_k, top_p),
        ])
        masked = jnp.where((x < floor) & (row_branch > 0), -jnp.inf, x)        # rows truncating nothing keep all
        # jax.random.categorical's Gumbel-max draw (the same noise), through `argmax` (categorical
        # takes jnp.argmax's paired reduction: twice the time)
        if jnp.ndim(key) == 0:
            noise = jax.random.gumbel(key, masked.shape, masked.dtype)
        else:
            noise = jax.vmap(lambda k: jax.random.gumbel(k, masked.shape[1:], masked.dtype))(key)
        return jnp.where(temperature[:, 0] == 0, greedy(), argmax(masked + noise))

    return jax.lax.cond(jnp.all(temperature == 0), greedy, draw)


def argmax(x: jax.Array) -> jax.Array:
    """[B, V] -> int32 [B]: the first index of each row's maximum (as jnp.argmax), as a max and a
    min over a masked iota: two vectorised passes instead of jnp.argmax's paired (value, index)
    reduction, which XLA on CPU runs more slowly. The iota is float32 (exact up to 2^24 entries)."""
    v = x.shape[-1]
    iota = jnp.arange(v, dtype=jnp.float32 if v <= 1 << 24 else jnp.int32)
    top = x.max(axis=-1, keepdims=True)
    first = jnp.where(x == top, iota, v).min(axis=-1).astype(jnp.int32)
    return jnp.minimum(first, v - 1)                           # in range whatever a NaN row gives


def _floor(x: jax.Array, desc: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest value that top-k then top-p ([B, 1] each) keep: [B, 1]. x [B, V]; desc [B, n]: the n largest
    values of each row of x in descending order, n >= top_k. Values tied with the k-th may lie past
    n: their mass comes from x itself."""
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, desc.shape[-1] - 1), axis=-1)   # [B, 1]
    cut = jnp.where(top_k > 0, kth, -jnp.inf)                                     # [B, 1] top-k floor
    top = desc[:, :1]
    mass = jnp.where(desc >= cut, jnp.exp(desc - top), 0)                        # [B, n] unnormalised
    total = jnp.where(x >= cut, jnp.exp(x - top), 0).sum(axis=-1, keepdims=True)
    before = (jnp.cumsum(mass, axis=-1) - mass) / total                          # mass above each value
    return jnp.where((desc >= cut) & (before < top_p), desc, jnp.inf).min(axis=-1, keepdims=True)
