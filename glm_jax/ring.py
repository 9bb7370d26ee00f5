"""Context-parallel attention over the `sequence` mesh axis: ring and all-gather-KV strategies.

Tokens are spread over the n devices of the axis. With the balanced (zigzag) layout the sequence is
cut into 2n chunks and device i holds chunks i and 2n-1-i, so under a causal mask every device has
the same amount of visible work at every hop; the contiguous layout (device i holds chunk i) is
the baseline scripts/bench_attention.py measures zigzag against. Masking goes by token index, so
the layout needs no special cases.

- ring: K/V (with their Hkv heads, never repeated to Hq) travel one hop per step with ppermute;
  each hop's transfer is issued before that hop's compute so XLA can overlap them. Per device, the
  KV of one hop is folded into a float32 online-softmax state by the tile kernels of attention.py,
  which skip fully masked tiles. Memory per device is O(T/n) in the forward and the backward (a
  custom VJP that sends dK/dV around the ring with K/V and recomputes scores from the saved LSE).
- allgather: each device gathers all K/V once (cheap when Hkv is small: GLM-4 has 2 or 4 KV
  heads), attends its queries to it, and reduce-scatters dK/dV in the backward. O(T) per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .attention import (PAD, AttentionFn, LocalKernel, pad_to, as_state, group_queries, init_state, merge,
                        normalized, tile_kernel, ungroup)
from .options import STRATEGIES, check_choice
from .sharding import Layout, auto_axes

LAYOUTS = ("zigzag", "contiguous")
TILE_MULTIPLE = 8   # tile lengths (tokens) are rounded up to a multiple of this


def _tile(length: int, block: int) -> int:
    """The tile for `length` tokens: as few tiles as `block` allows, equal, rounded up to TILE_MULTIPLE."""
    tiles = -(-length // block)
    return -(-(-(-length // tiles)) // TILE_MULTIPLE) * TILE_MULTIPLE


def token_order(t: int, n: int, layout: str = "zigzag", block: int = 512) -> tuple[np.ndarray, int]:
    """(order, padded length): position p of the device-ordered sequence holds token order[p]
    (order[p] >= t marks padding). Each chunk (half a device's share in the zigzag layout) is
    padded to whole tiles of `_tile(chunk, block)`, so tiles never shrink with awkward lengths:
    T = 4000 on 8 devices runs 250-token chunks as 256-token tiles."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    chunks = 2 * n if layout == "zigzag" else n
    chunk = -(-t // chunks)
    tile = _tile(chunk, block)
    chunk = -(-chunk // tile) * tile
    order = np.arange(chunks * chunk).reshape(chunks, chunk)
    if layout == "zigzag":
        order = np.stack([order[:n], order[::-1][:n]], axis=1)  # device i: chunks i, 2n-1-i
    return order.reshape(-1), chunks * chunk


def tile_sizes(local: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Query and key tiles for a device's `local` tokens: `token_order`'s tiles of each half (a
    zigzag chunk), so a tile never straddles two chunks and masked tiles are skipped. Lengths laid
    out otherwise are padded to whole tiles by the caller."""
    half = local // 2 if local % 2 == 0 else local
    return _tile(half, block_q), _tile(half, block_k)


# -- per-device kernels (inside shard_map) --------------------------------------------------------

def _neighbours(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _context_parallel(q, k, v, q_index, k_index, axis: str, n: int, strategy: str, kernel: LocalKernel):
    return _cp_fwd(q, k, v, q_index, k_index, axis, n, strategy, kernel)[0]


def _cp_fwd(q, k, v, q_index, k_index, axis, n, strategy, kernel):
    """q [B,T,G,R,D] local queries; k/v/k_index this device's share of the keys."""
    if strategy == "allgather":
        gathered = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, k_index)]
        out, lse = kernel.forward(q, *gathered[:2], q_index, gathered[2])
    else:
        def fold(state, kv):
            return merge(state, as_state(*kernel.forward(q, kv[0], kv[1], q_index, kv[2])))

        def hop(carry, _):
            state, kv = carry
            nxt = jax.lax.ppermute(kv, axis, _neighbours(n))      # issued before this hop's compute
            return (fold(state, kv), nxt), None

        b, t, g, r, d = q.shape
        (state, kv), _ = jax.lax.scan(hop, (init_state(b, t, g, r, d), (k, v, k_index)), length=n - 1)
        state = fold(state, kv)
        out, lse = normalized(state), state.lse
    # The output leaves rounded to q's dtype (the caller rounds it so anyway): its cotangent `dout`
    # then comes back in that dtype, not as a float32 copy of the same values.
    return out.astype(q.dtype), (q, k, v, q_index, k_index, out, lse)


def _cp_bwd(axis, n, strategy, kernel, res, dout):
    q, k, v, q_index, k_index, out, lse = res
    delta = (dout.astype(jnp.float32) * out).sum(-1)
    grads = functools.partial(kernel.backward, q, q_index=q_index, lse=lse, dout=dout.transpose(0, 3, 1, 2, 4),
                              delta=delta)
    if strategy == "allgather":
        kg, vg, kig = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, k_index))
        dq, dk, dv = grads(k=kg, v=vg, k_index=kig)
        dk, dv = (jax.lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True) for x in (dk, dv))
    else:
        def hop(carry, _):
            dq, (kc, vc, kic, dkc, dvc) = carry
            kv_next = jax.lax.ppermute((kc, vc, kic), axis, _neighbours(n))
            dq_h, dk_h, dv_h = grads(k=kc, v=vc, k_index=kic)
            dkv_next = jax.lax.ppermute((dkc + dk_h, dvc + dv_h), axis, _neighbours(n))
            return (dq + dq_h, (*kv_next, *dkv_next)), None

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dq, (kc, vc, kic, dkc, dvc)), _ = jax.lax.scan(
            hop, (jnp.zeros(q.shape, jnp.float32), (k, v, k_index, zeros, zeros)), length=n - 1)
        dq_h, dk_h, dv_h = grads(k=kc, v=vc, k_index=kic)
        dq = dq + dq_h
        dk, dv = jax.lax.ppermute((dkc + dk_h, dvc + dv_h), axis, _neighbours(n))  # home again
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_context_parallel.defvjp(_cp_fwd, _cp_bwd)


# -- on global arrays ------------------------------------------------------------------------

# Score tiles of the per-device kernel by platform (default 512): smaller tiles on CPU waste less
# work on the causal diagonal.
TILES = {"cpu": 256}


def context_parallel(layout: Layout, *, strategy: str = "ring", causal: bool = True, axis: str = "sequence",
                     block_q: int | None = None, block_k: int | None = None) -> AttentionFn:
    """Attention on global arrays already in device order (see `token_order`), sharded on `axis`:
    q [B, T, Hq, D], k/v [B, T, Hkv, D], indices [B, T], T divisible by the axis size.
    block_q/block_k: score tiles (default: TILES of the mesh's platform, else 512)."""
    check_choice("strategy", strategy, STRATEGIES)
    n = layout.size(axis)
    tile = TILES.get(layout.mesh.devices.flat[0].platform, 512)
    block_q, block_k = block_q or tile, block_k or tile

    def attend(q, k, v, q_index, k_index):
        b, t, hq, d = q.shape
        g = k.shape[2]
        if k.shape[1] != t or t % n:
            raise ValueError(f"context-parallel attention needs q and k of one length divisible by {n}")
        batch = layout.mesh_axes("batch", b) or None
        heads = layout.mesh_axes("q_heads", hq)
        heads = (heads or None) if heads == layout.mesh_axes("kv_heads", g) else None
        bq, bk = tile_sizes(t // n, block_q, block_k)
        seq = axis if n > 1 else None
        x_spec, i_spec = P(batch, seq, heads, None), P(batch, seq)

        def local(q, k, v, qi, ki):
            pad_q, pad_k = (functools.partial(pad_to, multiple=m, axis=1) for m in (bq, bk))
            out = _context_parallel(pad_q(group_queries(q, k.shape[2]), value=0), pad_k(k, value=0),
                                    pad_k(v, value=0), pad_q(qi, value=-1), pad_k(ki, value=PAD), axis, n,
                                    strategy, tile_kernel(causal, bq, bk))
            return ungroup(out, q.dtype)[:, :q.shape[1]]

        # check_vma off: the online-softmax carry starts replicated and becomes per-device.
        return auto_axes(jax.shard_map(local, mesh=layout.mesh, in_specs=(x_spec, x_spec, x_spec, i_spec, i_spec),
                                       out_specs=x_spec, check_vma=False), q, k, v, q_index, k_index)

    return attend


def ring_attention(q, k, v, q_index=None, k_index=None, *, mesh, causal: bool = True, axis: str = "sequence",
                   strategy: str = "ring", layout: str = "zigzag", block_q: int = 512,
                   block_k: int = 512) -> jax.Array:
    """Sequence-parallel attention on global arrays in natural token order.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]. `mesh`: a Mesh (`jax.make_mesh`'s
    Explicit axes too; q/k/v may be placed on it) or a spec like "sequence=8" (other axes it has
    shard batch and heads). T need not divide by the device count:
    the sequence is padded (padding is masked) and laid out zigzag (or contiguous) across devices.
    Indices default to 0..T-1."""
    mesh_layout = Layout(mesh)
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError(f"ring attention is self-attention: q has {t} tokens, k has {k.shape[1]}")
    default = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_index = default if q_index is None else q_index
    k_index = default if k_index is None else k_index
    order, padded = token_order(t, mesh_layout.size(axis), layout, block_q)
    real = order < t
    take = np.where(real, order, 0)

    def arrange(x, fill):
        x = jnp.take(x, take, axis=1)
        mask = real.reshape((1, -1) + (1,) * (x.ndim - 2))
        return jnp.where(mask, x, fill)

    def in_order(q, k, v, q_index, k_index):
        out = context_parallel(mesh_layout, strategy=strategy, causal=causal, axis=axis, block_q=block_q,
                               block_k=block_k)(arrange(q, 0), arrange(k, 0), arrange(v, 0),
                                                arrange(q_index, -1), arrange(k_index, PAD))
        return jnp.take(out, np.argsort(order)[:t], axis=1)

    return auto_axes(in_order, q, k, v, q_index, k_index)   # inputs typed on an Explicit mesh too
