"""Attention over grouped KV heads: exact and memory-efficient blockwise, one online-softmax core.

Every attention here takes
  q [batch, time, q_heads, dim], k/v [batch, kv_time, kv_heads, dim],
  q_index [batch, time] and k_index [batch, kv_time]: int32 token-order indices.
A key is visible to a query when `k_index <= q_index` (causal) and `k_index != PAD`; PAD marks empty
cache slots, left padding and the padding blockwise/ring attention add. Indices are token order, not
RoPE positions: RoPE positions are the model's business (they may start at 1,000,000).
KV heads are never repeated: query head h reads KV group h // (q_heads // kv_heads).

The core (`init_state` / `update` / `finish`) keeps a float32 running max, sum and accumulator, so
exact attention, blockwise attention, ring hops and sharded decode all share the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PAD = np.iinfo(np.int32).max  # index of a key that no query may see
HIGHEST = jax.lax.Precision.HIGHEST


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                 k_index: jax.Array) -> jax.Array: ...


@dataclasses.dataclass
class State:
    """Online-softmax state for a block of queries, grouped as [batch, kv_heads, q_per_kv, time]."""

    m: jax.Array    # running max of the scores        [B, G, R, T] f32
    l: jax.Array    # running sum of exp(score - m)    [B, G, R, T] f32
    acc: jax.Array  # running sum of exp(score - m) v  [B, G, R, T, D] f32


jax.tree_util.register_dataclass(State, data_fields=["m", "l", "acc"], meta_fields=[])


def init_state(batch: int, time: int, kv_heads: int, q_per_kv: int, dim: int) -> State:
    shape = (batch, kv_heads, q_per_kv, time)
    return State(m=jnp.full(shape, -jnp.inf, jnp.float32), l=jnp.zeros(shape, jnp.float32),
                 acc=jnp.zeros(shape + (dim,), jnp.float32))


def visible(q_index: jax.Array, k_index: jax.Array, causal: bool) -> jax.Array:
    """[B, T] x [B, S] -> bool [B, T, S]: which keys each query may attend to."""
    k = jnp.asarray(k_index)[:, None, :]
    mask = k != PAD
    if causal:
        mask = mask & (k <= jnp.asarray(q_index)[:, :, None])
    return mask


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, T, G, R, D] with query head h = g * R + r."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, kv_heads, hq // kv_heads, d)


def update(state: State, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> State:
    """Folds one KV block into the state. q [B,T,G,R,D], k/v [B,S,G,D], mask [B,T,S]."""
    s = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32, precision=HIGHEST)
    s = s * (1.0 / np.sqrt(q.shape[-1]))                 # scaled in float32
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.maximum(state.m, s.max(axis=-1))
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)       # rows with nothing visible yet stay at zero
    p = jnp.exp(s - m_safe[..., None])               # [B, G, R, T, S]
    correction = jnp.exp(state.m - m_safe)
    pv = jnp.einsum("bgrts,bsgd->bgrtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                    precision=HIGHEST)
    return State(m=m, l=state.l * correction + p.sum(axis=-1),
                 acc=state.acc * correction[..., None] + pv)


def merge(a: State, b: State) -> State:
    """Combines two states over disjoint key sets (log-sum-exp merge)."""
    m = jnp.maximum(a.m, b.m)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    ca, cb = jnp.exp(a.m - m_safe), jnp.exp(b.m - m_safe)
    return State(m=m, l=a.l * ca + b.l * cb, acc=a.acc * ca[..., None] + b.acc * cb[..., None])


def finish(state: State, dtype) -> jax.Array:
    """State -> attention output [B, T, Hq, D]; queries that saw no key get zeros."""
    out = state.acc / jnp.where(state.l == 0, 1.0, state.l)[..., None]   # [B, G, R, T, D]
    b, g, r, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, g * r, d).astype(dtype)


def exact_attention(q, k, v, q_index, k_index, *, causal: bool = True) -> jax.Array:
    """Reference attention: one [T, S] score block per head. O(T*S) memory."""
    b, t, hq, d = q.shape
    g = k.shape[2]
    state = init_state(b, t, g, hq // g, d)
    state = update(state, group_queries(q, g), k, v, visible(q_index, k_index, causal))
    return finish(state, q.dtype)


def _pad_to(x: jax.Array, multiple: int, axis: int, value) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_index, k_index, *, causal: bool = True, block_q: int = 512,
                        block_k: int = 512) -> jax.Array:
    """Memory-efficient attention: [block_q, block_k] score tiles, never a [T, S] matrix.

    Query blocks are mapped sequentially; each scans the KV blocks and skips those it cannot see
    (beyond the causal diagonal, or all padding), so causal attention does about half the work.
    """
    b, t, hq, d = q.shape
    s_len, g = k.shape[1], k.shape[2]
    block_q, block_k = min(block_q, t), min(block_k, s_len)
    qg = _pad_to(group_queries(q, g), block_q, 1, 0)                     # [B, Tp, G, R, D]
    qi = _pad_to(q_index, block_q, 1, 0)
    k, v = _pad_to(k, block_k, 1, 0), _pad_to(v, block_k, 1, 0)
    ki = _pad_to(k_index, block_k, 1, PAD)
    nq, nk = qg.shape[1] // block_q, k.shape[1] // block_k

    def blocks(x, n):  # [B, n*blk, ...] -> [n, B, blk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, -1, *x.shape[2:]), 1, 0)

    kb, vb, kib = blocks(k, nk), blocks(v, nk), blocks(ki, nk)

    def one_query_block(args):
        q_blk, qi_blk = args

        def step(state, kv):
            k_blk, v_blk, ki_blk = kv
            mask = visible(qi_blk, ki_blk, causal)
            state = jax.lax.cond(mask.any(), lambda st: update(st, q_blk, k_blk, v_blk, mask),
                                 lambda st: st, state)
            return state, None

        state, _ = jax.lax.scan(step, init_state(b, block_q, g, hq // g, d), (kb, vb, kib))
        return finish(state, q.dtype)                              # [B, block_q, Hq, D]

    out = jax.lax.map(one_query_block, (blocks(qg, nq), blocks(qi, nq)))
    return jnp.moveaxis(out, 0, 1).reshape(b, nq * block_q, hq, d)[:, :t]


BLOCKWISE_ABOVE = 2048  # "auto" uses exact attention up to this many keys, blockwise beyond


def auto_attention(q, k, v, q_index, k_index, *, causal: bool = True) -> jax.Array:
    fn = exact_attention if k.shape[1] <= BLOCKWISE_ABOVE else blockwise_attention
    return fn(q, k, v, q_index, k_index, causal=causal)


ATTENTION: dict[str, Callable[..., jax.Array]] = {
    "auto": auto_attention,
    "exact": exact_attention,
    "blockwise": blockwise_attention,
}


def get_attention(spec: str | AttentionFn) -> AttentionFn:
    """'auto' | 'exact' | 'blockwise' | a callable with the AttentionFn signature."""
    if callable(spec):
        return spec
    try:
        return functools.partial(ATTENTION[spec], causal=True)
    except KeyError:
        raise ValueError(f"unknown attention {spec!r}; choose from {', '.join(ATTENTION)} "
                         "or pass a callable") from None
