"""Attention over grouped KV heads: exact and memory-efficient blockwise, one online-softmax core.

Every attention here takes
  q [batch, time, q_heads, dim], k/v [batch, kv_time, kv_heads, dim],
  q_index [batch, time] and k_index [batch, kv_time]: int32 token-order indices.
A key is visible to a query when `k_index <= q_index` (causal), both lie in the same segment (the
bits above SEGMENT_SHIFT: packed training rows hold several examples) and `k_index != PAD`; PAD
marks left padding and the padding blockwise/ring attention add. Indices are token order, not
RoPE positions: RoPE positions are the model's business (they may start at 1,000,000). Because
masking goes by index, any permutation of the tokens (the ring's zigzag layout) is handled alike.
KV heads are never repeated: query head h reads KV group h // (q_heads // kv_heads).

The core keeps a float32 running max, sum and accumulator (`State`); `tiles_forward` folds a whole
KV sequence into it tile by tile, skipping tiles the mask hides, and `tiles_backward` is its
FlashAttention-style gradient (recomputes scores from the saved log-sum-exp). Exact attention,
blockwise attention, every ring hop and sharded decode use these same pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PAD = np.iinfo(np.int32).max  # index of a key that no query may see
# Token indices stay below 2**SEGMENT_SHIFT (2,097,152); the bits above hold the segment (a packed
# example) of a training row, so the indices the ring already moves carry segments too.
SEGMENT_SHIFT = 21


def segment_index(segments, index):
    """Indices of tokens in `segments` (int, 0..1023): segment << SEGMENT_SHIFT | index."""
    return (segments << SEGMENT_SHIFT) | index
HIGHEST = jax.lax.Precision.HIGHEST


def precision(*operands) -> jax.lax.Precision:
    """HIGHEST when an operand is float32 (no TF32 or bf16 passes on GPU/TPU); the default for
    bf16 operands, whose products are exact in the float32 accumulator either way (on GPU,
    HIGHEST on bf16 risks an upcast to float32 matmuls)."""
    return HIGHEST if any(x.dtype == jnp.float32 for x in operands) else jax.lax.Precision.DEFAULT


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                 k_index: jax.Array) -> jax.Array: ...


@dataclasses.dataclass
class State:
    """Online-softmax state for queries grouped as [batch, kv_heads, q_per_kv, time]."""

    m: jax.Array    # running max of the scores        [B, G, R, T] f32
    l: jax.Array    # running sum of exp(score - m)    [B, G, R, T] f32
    acc: jax.Array  # running sum of exp(score - m) v  [B, G, R, T, D] f32

    def map(self, fn) -> "State":
        return State(fn(self.m), fn(self.l), fn(self.acc))

    @property
    def lse(self) -> jax.Array:
        """log-sum-exp of the scores [B, G, R, T]; -inf where nothing was visible."""
        return self.m + jnp.log(self.l)


jax.tree_util.register_dataclass(State, data_fields=["m", "l", "acc"], meta_fields=[])


def init_state(batch: int, time: int, kv_heads: int, q_per_kv: int, dim: int) -> State:
    shape = (batch, kv_heads, q_per_kv, time)
    return State(m=jnp.full(shape, -jnp.inf, jnp.float32), l=jnp.zeros(shape, jnp.float32),
                 acc=jnp.zeros(shape + (dim,), jnp.float32))


def visible(q_index: jax.Array, k_index: jax.Array, causal: bool) -> jax.Array:
    """[B, T] x [B, S] -> bool [B, T, S]: which keys each query may attend to."""
    k, q = jnp.asarray(k_index)[:, None, :], jnp.asarray(q_index)[:, :, None]
    mask = (k != PAD) & (k >> SEGMENT_SHIFT == q >> SEGMENT_SHIFT)
    if causal:
        mask = mask & (k <= q)
    return mask


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, T, G, R, D] with query head h = g * R + r."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, kv_heads, hq // kv_heads, d)


def heads_major(q: jax.Array) -> jax.Array:
    """Grouped queries [B, T, G, R, D] -> [B, G, R, T, D], the layout `update` takes: each KV
    group's R*T query rows are one contiguous matrix, so a score tile is one plain batched matmul
    (with time-major queries XLA on CPU transposes them for every tile). Callers transpose once,
    outside their tile loops."""
    return q.transpose(0, 2, 3, 1, 4)


def _scores(q, k, kv_layout: str = "bsgd", q_layout: str = "bgrtd"):
    """q [B,G,R,T,D] (or q_layout), k [B,S,G,D] (or kv_layout) -> scaled float32 scores [B,G,R,T,S]
    (in q_layout's order, d replaced by s)."""
    s = jnp.einsum(f"{q_layout},{kv_layout}->{q_layout[:-1]}s", q, k, preferred_element_type=jnp.float32,
                   precision=precision(q, k))
    return s * (1.0 / np.sqrt(q.shape[-1]))


def update(state: State, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           kv_layout: str = "bsgd", k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
           q_layout: str = "bgrtd") -> State:
    """Folds one KV block into the state. q [B,G,R,T,D] (`heads_major`), k/v [B,S,G,D] (kv_layout
    "bsgd") or any order of those letters ("bgsd", "gbsd"), mask [B,T,S] (None: every key visible
    to every query). q_layout "gbrtd" takes q [G,B,R,T,D], a state in that order and a mask
    broadcastable to the scores [G,B,R,T,S]: with K/V [G,B,S,D] tiles the products then need no
    transposed copy of them. int8 k/v come with float32 scales (kv_layout without d): scores are
    (q . k) * k_scale and probabilities are multiplied by v_scale before p . v: the int8 block is
    only converted as the products' operand (whether XLA materialises that conversion is the
    compiler's choice)."""
    lead = q_layout[:2]
    per_key = lambda x: jnp.einsum(f"{kv_layout.replace('d', '')}->{lead}s", x)[:, :, None, None, :]  # [B,G,1,1,S]
    if k_scale is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = _scores(q, k, kv_layout, q_layout) * per_key(k_scale)
    else:
        s = _scores(q, k, kv_layout, q_layout)
    if mask is not None:
        s = jnp.where(mask[:, None, None] if mask.ndim == 3 else mask, s, -jnp.inf)
    m = jnp.maximum(state.m, s.max(axis=-1))
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)       # rows with nothing visible yet stay at zero
    p = jnp.exp(s - m_safe[..., None])               # [B, G, R, T, S]
    correction = jnp.exp(state.m - m_safe)
    weights = p if v_scale is None else p * per_key(v_scale)
    pv = jnp.einsum(f"{q_layout[:-1]}s,{kv_layout}->{q_layout}", weights.astype(v.dtype), v,
                    preferred_element_type=jnp.float32,
                    precision=precision(v))
    return State(m=m, l=state.l * correction + p.sum(axis=-1),
                 acc=state.acc * correction[..., None] + pv)


def merge(a: State, b: State) -> State:
    """Combines two states over disjoint key sets (log-sum-exp merge)."""
    m = jnp.maximum(a.m, b.m)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    ca, cb = jnp.exp(a.m - m_safe), jnp.exp(b.m - m_safe)
    return State(m=m, l=a.l * ca + b.l * cb, acc=a.acc * ca[..., None] + b.acc * cb[..., None])


def normalized(state: State) -> jax.Array:
    """Attention output, still grouped: [B, G, R, T, D] float32; zeros where nothing was visible."""
    return state.acc / jnp.where(state.l == 0, 1.0, state.l)[..., None]


def ungroup(out: jax.Array, dtype) -> jax.Array:
    """[B, G, R, T, D] -> [B, T, G*R, D]."""
    b, g, r, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, g * r, d).astype(dtype)


def finish(state: State, dtype) -> jax.Array:
    """State -> attention output [B, T, Hq, D]."""
    return ungroup(normalized(state), dtype)


# -- tiles: the per-device kernels ---------------------------------------------------------------

def _tiles(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Splits `axis` into n tiles and moves the tile index to the front."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _untile(x: jax.Array, axis: int = 1) -> jax.Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def tiles_forward(state: State, q, k, v, q_index, k_index, *, causal: bool, block_q: int,
                  block_k: int, kv_layout: str = "bsgd") -> State:
    """Folds all of k/v into the state, [block_q, block_k] score tiles at a time.

    q [B,T,G,R,D] with T % block_q == 0; k/v [B,S,G,D] (or [B,G,S,D], see `update`) with
    S % block_k == 0. Query tiles are mapped sequentially; each scans the KV tiles, skips those
    its mask hides entirely and applies no mask to those it shows whole.
    """
    seq = kv_layout.index("s")
    nq, nk = q.shape[1] // block_q, k.shape[seq] // block_k
    q = heads_major(q)                                                  # [B, G, R, T, D]
    kv = (_tiles(k, nk, seq), _tiles(v, nk, seq), _tiles(k_index, nk))

    def one_query_tile(args):
        st, q_t, qi_t = args

        def step(st, kv_t):
            k_t, v_t, ki_t = kv_t
            mask = visible(qi_t, ki_t, causal)
            branch = jnp.where(mask.all(), 2, jnp.where(mask.any(), 1, 0))    # hidden, masked, whole
            return jax.lax.switch(branch, [lambda s: s, lambda s: update(s, q_t, k_t, v_t, mask, kv_layout),
                                           lambda s: update(s, q_t, k_t, v_t, None, kv_layout)], st), None

        return jax.lax.scan(step, st, kv)[0]

    tiled = state.map(lambda x: _tiles(x, nq, axis=3))
    out = jax.lax.map(one_query_tile, (tiled, _tiles(q, nq, axis=3), _tiles(q_index, nq)))
    return out.map(lambda x: _untile(x, axis=3))


def tiles_backward(q, k, v, q_index, k_index, lse, dout, delta, *, causal: bool, block_q: int,
                   block_k: int):
    """Gradients of attention w.r.t. q, k, v for one KV sequence, tile by tile (float32).

    q/dout [B,T,G,R,D]; k/v [B,S,G,D]; lse/delta [B,G,R,T] with delta = sum(dout * out, -1) over
    the whole attention (all KV). Returns dq [B,T,G,R,D], dk and dv [B,S,G,D] (float32).
    q, k, v and dout may come in any float dtype: each tile is converted to float32 as it is used.
    A tile every query sees whole skips the mask. The inputs stay time-major; each tile is made
    heads-major as it is used ([B, G, R*bq, D]: one matrix a KV group), and dK/dV accumulate
    transposed ([B, G, D, bk]: qᵀ·ds and doᵀ·p, products XLA's CPU matmul takes without copying
    ds or p). Per-tile heads-major copies, not whole ones of q and dout: whole copies are two
    more [T, Hq, D] buffers a layer."""
    nq, nk = q.shape[1] // block_q, k.shape[1] // block_k
    qs = (_tiles(q, nq), _tiles(q_index, nq), _tiles(dout, nq), _tiles(lse, nq, axis=3),
          _tiles(delta, nq, axis=3))
    scale = 1.0 / np.sqrt(q.shape[-1])
    b, _, g, r, d = q.shape
    rows = lambda x: heads_major(x.astype(jnp.float32)).reshape(b, g, -1, d)      # [B,t,G,R,D] -> [B,G,R*t,D]

    def one_kv_tile(dq, kv_t):
        k_t, v_t, ki_t = kv_t
        k_t, v_t = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k_t, v_t))    # [B, G, bk, D]

        def step(dkv, q_tile):
            q_t, qi_t, do_t, lse_t, de_t = q_tile
            q_t, do_t = rows(q_t), rows(do_t)                                       # [B, G, R*bq, D]
            lse_t, de_t = (x.reshape(b, g, -1, 1) for x in (lse_t, de_t))           # [B, G, R*bq, 1]
            mask = visible(qi_t, ki_t, causal)                                      # [B, bq, bk]

            def grads(dkv, masked: bool):
                dk, dv = dkv
                p = jnp.exp(jnp.einsum("bgmd,bgsd->bgms", q_t, k_t, precision=HIGHEST) * scale - lse_t)
                if masked:                                                          # [B, G, R*bq, bk]
                    p = jnp.where(mask[:, None, None], p.reshape(b, g, r, -1, p.shape[-1]), 0.0).reshape(p.shape)
                dv = dv + jnp.einsum("bgmd,bgms->bgds", do_t, p, precision=HIGHEST)
                dp = jnp.einsum("bgmd,bgsd->bgms", do_t, v_t, precision=HIGHEST)
                ds = p * (dp - de_t) * scale
                dk = dk + jnp.einsum("bgmd,bgms->bgds", q_t, ds, precision=HIGHEST)
                dq_t = jnp.einsum("bgms,bgsd->bgmd", ds, k_t, precision=HIGHEST)    # [B, G, R*bq, D]
                return (dk, dv), dq_t.reshape(b, g, r, -1, d).transpose(0, 3, 1, 2, 4)

            branch = jnp.where(mask.all(), 2, jnp.where(mask.any(), 1, 0))        # hidden, masked, whole
            return jax.lax.switch(branch, [lambda dkv: (dkv, jnp.zeros((b, qi_t.shape[1], g, r, d), jnp.float32)),
                                           functools.partial(grads, masked=True),
                                           functools.partial(grads, masked=False)], dkv)

        zeros = jnp.zeros((b, g, d, k_t.shape[2]), jnp.float32)                 # dk, dv transposed [B, G, D, bk]
        (dk, dv), dq_tiles = jax.lax.scan(step, (zeros, zeros), qs)
        return dq + _untile(dq_tiles), (dk.transpose(0, 3, 1, 2), dv.transpose(0, 3, 1, 2))

    dq, (dk, dv) = jax.lax.scan(one_kv_tile, jnp.zeros(q.shape, jnp.float32),
                                (_tiles(k, nk), _tiles(v, nk), _tiles(k_index, nk)))
    return dq, _untile(dk), _untile(dv)


# -- single-device attention -------------------------------------------------------------------

def exact_attention(q, k, v, q_index, k_index, *, causal: bool = True) -> jax.Array:
    """Reference attention: one [T, S] score block per head. O(T*S) memory."""
    b, t, hq, d = q.shape
    g = k.shape[2]
    state = update(init_state(b, t, g, hq // g, d), heads_major(group_queries(q, g)), k, v,
                   visible(q_index, k_index, causal))
    return finish(state, q.dtype)


def pad_to(x: jax.Array, multiple: int, axis: int, value) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class LocalKernel:
    """The attention a device runs on the KV it holds (one ring hop, or everything it gathered).

    forward(q [B,T,G,R,D], k/v [B,S,G,D], q_index, k_index) -> (out [B,G,R,T,D] f32, lse [B,G,R,T])
    backward(q, k, v, q_index, k_index, lse, dout [B,T,G,R,D] (any float dtype), delta [B,G,R,T]) -> dq, dk, dv (f32),
    where lse and delta = sum(dout * out) belong to the whole attention, not just this KV.
    Any kernel with these two functions (cuDNN, Pallas) can replace the default tiles.
    """

    forward: Callable
    backward: Callable


@functools.lru_cache(maxsize=None)
def tile_kernel(causal: bool = True, block_q: int = 512, block_k: int = 512) -> LocalKernel:
    """The portable kernel: tiles_forward / tiles_backward (T and S must divide by the tiles)."""

    def forward(q, k, v, q_index, k_index):
        b, t, g, r, d = q.shape
        state = tiles_forward(init_state(b, t, g, r, d), q, k, v, q_index, k_index, causal=causal,
                              block_q=block_q, block_k=block_k)
        return normalized(state), state.lse

    def backward(q, k, v, q_index, k_index, lse, dout, delta):
        return tiles_backward(q, k, v, q_index, k_index, lse, dout, delta, causal=causal,
                              block_q=block_q, block_k=block_k)

    return LocalKernel(forward, backward)


def as_state(out: jax.Array, lse: jax.Array) -> State:
    """A kernel's normalized output and log-sum-exp as an online-softmax state (for merging)."""
    seen = lse > -jnp.inf
    return State(m=jnp.where(seen, lse, -jnp.inf), l=seen.astype(jnp.float32), acc=out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_index, k_index, kernel: LocalKernel):
    return kernel.forward(q, k, v, q_index, k_index)[0]


def _flash_fwd(q, k, v, q_index, k_index, kernel):
    out, lse = kernel.forward(q, k, v, q_index, k_index)
    return out, (q, k, v, q_index, k_index, out, lse)


def _flash_bwd(kernel, res, dout):
    q, k, v, q_index, k_index, out, lse = res
    delta = (dout * out).sum(-1)                                        # [B, G, R, T]
    dq, dk, dv = kernel.backward(q, k, v, q_index, k_index, lse, dout.transpose(0, 3, 1, 2, 4), delta)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, q_index, k_index, *, causal: bool = True, block_q: int = 512,
                        block_k: int = 512) -> jax.Array:
    """Memory-efficient attention: [block_q, block_k] score tiles, never a [T, S] matrix, in the
    forward or the backward (a FlashAttention-style custom gradient)."""
    t, s_len, g = q.shape[1], k.shape[1], k.shape[2]
    block_q, block_k = min(block_q, t), min(block_k, s_len)
    qg = pad_to(group_queries(q, g), block_q, 1, 0)
    out = _flash(qg, pad_to(k, block_k, 1, 0), pad_to(v, block_k, 1, 0), pad_to(q_index, block_q, 1, -1),
                 pad_to(k_index, block_k, 1, PAD), tile_kernel(causal, block_q, block_k))
    return ungroup(out, q.dtype)[:, :t]


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
