"""The decode step's attention as one Pallas (Triton) kernel: one query a row against K/V read
through its page table from the engine's page pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import State, group_queries, heads_major

DECODE_PROGRAMS = 128           # at least this many programs when the cache allows (an H100 has 132 SMs)
TILE_MAX = 128                  # block_k: a whole page up to this many slots, else a power-of-two part of one
PAGE_MIN = 16                   # the smallest page (a tile of Triton's dot)
MIN_ROWS = 16                   # Triton's dot wants 16+ rows (GQA groups of GLM-4 have 8): queries are padded
NUM_WARPS = 4                   # Triton launch parameters of the kernel
NUM_STAGES = 2


def decode_tiles(pages: int, page: int, programs: int) -> tuple[int, int]:
    """(block_k, splits) of the decode kernel for tables of `pages` pages of `page` slots and
    `programs` (rows x KV groups) programs per split: tiles of min(page, TILE_MAX) slots, and the
    number of equal slot ranges, a divisor of the tile count, that brings the programs to
    DECODE_PROGRAMS."""
    block = min(page, TILE_MAX)
    tiles = pages * page // block
    want = max(1, -(-DECODE_PROGRAMS // programs))
    return block, max(d for d in range(1, min(tiles, want) + 1) if tiles % d == 0)


def paged_decode(q: jax.Array, lengths: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array,
                 k_scale: jax.Array | None = None, v_scale: jax.Array | None = None, *,
                 interpret: bool = False) -> State:
    """One query a row against a page pool, as one Pallas (Triton) kernel (XLA spends about ten
    small kernels a layer on this attention). q [b,1,Hq,D]; lengths int32 [b,1]; k/v [G,P,page,D]
    (page a power of two, 16 or more); table int32 [b,M]: row i's page ids in order; int8 pools
    come with float32 scales [G,P,page], applied as in `update` (each tile converted to q's dtype
    in the kernel). Query i sees slots [0, lengths[i]) of its row, slot s being slot s % page of
    page table[i, s // page]; table entries past a row's length are never read.
    The row's M*page slots are cut into `splits` equal ranges (`decode_tiles`: tiles are pages, or
    power-of-two parts of them of TILE_MAX slots); a program per (row, KV group, range) folds
    its range's filled tiles into a float32 online-softmax state, stopping at the row's length;
    the ranges' states are merged here by log-sum-exp. -> State [b,G,R,1(,D)].
    interpret: run the kernel in Pallas' interpreter (a test seam for CPUs: the engine never sets it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    g, _, page, _ = k.shape
    if page < PAGE_MIN or page & (page - 1):
        raise ValueError(f"page size {page} must be a power of two of at least {PAGE_MIN}")
    q = heads_major(group_queries(q, g))                                               # [b, G, R, 1, D]
    b, _, r, _, d = q.shape
    block_k, splits = decode_tiles(table.shape[1], page, b * g)
    span = table.shape[1] * page // splits
    rp = max(MIN_ROWS, 1 << (r - 1).bit_length())
    qp = jnp.pad(q[:, :, :, 0], ((0, 0), (0, 0), (0, rp - r), (0, 0)))                # [b, G, Rp, D]
    scale = 1.0 / np.sqrt(d)
    scaled = k_scale is not None

    def kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, *refs):
        ks_ref, vs_ref, acc_ref, m_ref, l_ref = refs if scaled else (None, None, *refs)
        i, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        length = lengths_ref[i]
        start = j * span
        tiles = jax.lax.div(jnp.clip(length - start, 0, span) + (block_k - 1), block_k)   # filled tiles here
        qt = q_ref[...]                                                                # [Rp, D]

        def tile(ref, first):      # [block_k, D] of K or V, [block_k] of a scale, from slot `first` on
            return ref[h, table_ref[i, jax.lax.div(first, page)], pl.ds(jax.lax.rem(first, page), block_k)]

        def step(t, carry):
            acc, m, l = carry
            first = start + t * block_k
            s = plgpu.dot(qt, tile(k_ref, first).astype(qt.dtype), trans_b=True) * scale  # [Rp, block_k] f32
            if scaled:
                s = s * tile(ks_ref, first)[None, :]
            slot = first + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            s = jnp.where(slot < length, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp(s - m_new[:, None])
            correction = jnp.exp(m - m_new)
            weights = p * jnp.where(slot < length, tile(vs_ref, first)[None, :], 0.0) if scaled else p
            vt = tile(v_ref, first).astype(qt.dtype)  # slots past the length may hold anything (0 * NaN is NaN)
            column = first + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            vt = jnp.where(column < length, vt, jnp.zeros_like(vt))
            pv = plgpu.dot(weights.astype(vt.dtype), vt)                              # [Rp, D] f32
            return acc * correction[:, None] + pv, m_new, l * correction + p.sum(axis=1)

        init = (jnp.zeros((rp, d), jnp.float32), jnp.full((rp,), -jnp.inf, jnp.float32),
                jnp.zeros((rp,), jnp.float32))
        acc, m, l = jax.lax.fori_loop(0, tiles, step, init)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

    whole = pl.BlockSpec()                            # the whole array, indexed in the kernel
    scales = (k_scale, v_scale) if scaled else ()
    acc, m, l = pl.pallas_call(
        kernel, grid=(b, g, splits),
        in_specs=[whole, whole, pl.BlockSpec((None, None, rp, d), lambda i, h, j: (i, h, 0, 0)), whole, whole]
        + [whole] * len(scales),
        out_specs=[pl.BlockSpec((None, None, None, rp, d), lambda i, h, j: (j, i, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rp), lambda i, h, j: (j, i, h, 0)),
                   pl.BlockSpec((None, None, None, rp), lambda i, h, j: (j, i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, b, g, rp, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, g, rp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, g, rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret, name="paged_decode",
    )(lengths[:, 0].astype(jnp.int32), table.astype(jnp.int32), qp, k, v, *scales)
    m, l, acc = m[..., :r, None], l[..., :r, None], acc[..., :r, None, :]          # [splits, b, G, R, 1(, D)]
    top = m.max(axis=0)
    weight = jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top))                     # 0 for an empty range
    return State(m=top, l=(l * weight).sum(axis=0), acc=(acc * weight[..., None]).sum(axis=0))
