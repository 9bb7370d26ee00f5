"""The KV cache: its type, shapes and shardings, int8 storage, striping, and writes and attention on it.

The cache holds, per layer, K and V [batch, slots, kv_heads, dim] in the weights' dtype ([batch,
kv_heads, slots, dim] when a device holds one KV head, see `cache_order`), plus one
index [batch, slots] (the slot's token index, PAD while empty or for left padding). It is sharded
by the logical rules: batch on data/fsdp, slots on `sequence`, KV heads on `tensor`. Writes and
attention run inside shard_map: every device writes the slots it owns and attends over its own
part of the cache; the partial results merge by a log-sum-exp reduction across `sequence`
(pmax + psum of a [batch, heads, queries, dim] state), so no KV moves per token.

Slots are striped over the `sequence` devices (STRIPE at a time, round robin), so any prefix of
the sequence is spread evenly and every device has its share of the work at every prefill chunk
and decode step.

Attention on the cache has one signature, `(q, q_index, k, v, k_index, k_scale, v_scale, rows)`:
the sharded `attend` of `cache_ops` takes it, and so does each per-device kernel it dispatches to
(`tiles`, `pallas_decode`, `cudnn_prefill`), on the device's part of the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..attention import (PAD, State, cache_forward, group_queries, heads_major, init_state, normalized,
                         ungroup)
from ..config import GLMConfig
from ..kernels.cudnn import cudnn_chunk
from ..kernels.decode_pallas import decode_by_length, decode_tiles
from ..options import KERNELS, KV_CACHE_DTYPES, check_choice
from ..sharding import Layout

@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]   # per layer, dims in `order`: [B, S, G, D] or [B, G, S, D]
    v: tuple[jax.Array, ...]
    index: jax.Array           # [B, S] int32: token index of each slot, PAD if none
    # int8 caches only: per layer, the float32 scale of each slot's K (V) head, dims of `order`
    # without D ([B, S, G] or [B, G, S]); the value is int8 * scale. Empty otherwise.
    k_scale: tuple[jax.Array, ...] = ()
    v_scale: tuple[jax.Array, ...] = ()
    order: str = "bsgd"        # static: the dim order of k and v

    @property
    def length(self) -> int:
        return self.index.shape[1]

    @property
    def quantized(self) -> bool:
        return bool(self.k_scale)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "index", "k_scale", "v_scale"],
                                 meta_fields=["order"])

_CACHE_AXES = {"b": "batch", "s": "cache_seq", "g": "kv_heads", "d": "head_dim"}


def cache_dtype(kv_cache_dtype: str | None, weights_dtype):
    """The K/V storage dtype: the weights' unless `kv_cache_dtype` names one of KV_CACHE_DTYPES."""
    if kv_cache_dtype is None:
        return jnp.dtype(weights_dtype)
    return jnp.dtype(check_choice("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES))


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (int8 [..., D], float32 scale [...]): symmetric, one scale per vector
    (per token and KV head), |error| <= scale / 2 = max|x| / 254."""
    x32 = x.astype(jnp.float32)
    scale = jnp.abs(x32).max(axis=-1) / 127.0
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return q.astype(jnp.int8), scale


def cache_heads(config: GLMConfig, layout: Layout) -> int:
    return config.num_kv_heads * layout.kv_repeat(config.num_kv_heads, config.num_heads)


def cache_order(layout: Layout, heads: int, platform: str | None = None) -> str:
    """[B, S, G, D] on accelerators; [B, G, S, D] when a device holds a single KV head, so that the
    slot dim, not a size-1 head dim, sits next to the minor one (else TPU layout assignment pads
    or copies the whole cache inside the decode loop), and always on CPU (whose dots want each
    head's [S, D] contiguous: with [B, S, G, D] XLA transposed the whole cache at every step).
    platform: the mesh's unless given."""
    platform = platform or layout.mesh.devices.flat[0].platform
    shards = math.prod(layout.size(a) for a in layout.mesh_axes("kv_heads", heads))
    return "bgsd" if heads // shards == 1 or platform == "cpu" else "bsgd"


def _spec(layout: Layout, order: str, shape) -> P:
    return layout.spec([_CACHE_AXES[c] for c in order], shape)


def cache_shapes(config: GLMConfig, layout: Layout, batch: int, length: int) -> tuple[tuple[int, ...], str]:
    """(shape of each K/V array, its dim order)."""
    heads = cache_heads(config, layout)
    order = cache_order(layout, heads)
    dims = {"b": batch, "s": length, "g": heads, "d": config.head_dim}
    return tuple(dims[c] for c in order), order


def cache_shardings(config: GLMConfig, layout: Layout, batch: int, length: int, quantized: bool = False) -> KVCache:
    shape, order = cache_shapes(config, layout, batch, length)
    kv = NamedSharding(layout.mesh, _spec(layout, order, shape))
    idx = NamedSharding(layout.mesh, _spec(layout, "bs", (batch, length)))
    scale_order = order.replace("d", "")
    scale = NamedSharding(layout.mesh, _spec(layout, scale_order, shape[:order.index("d")]))
    scales = (scale,) * config.num_layers if quantized else ()
    return KVCache(k=(kv,) * config.num_layers, v=(kv,) * config.num_layers, index=idx, k_scale=scales,
                   v_scale=scales, order=order)


def abstract_cache(config: GLMConfig, layout: Layout, batch: int, length: int, dtype) -> KVCache:
    """The cache as ShapeDtypeStructs with their shardings (K/V in `dtype`; int8 adds scales)."""
    quantized = jnp.dtype(dtype) == jnp.int8
    shard = cache_shardings(config, layout, batch, length, quantized)
    shape, order = cache_shapes(config, layout, batch, length)
    struct = lambda shape, dtype, shardings: tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=s) for s in shardings)
    scale_shape = shape[:order.index("d")]
    return KVCache(k=struct(shape, dtype, shard.k), v=struct(shape, dtype, shard.v),
                   index=jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=shard.index),
                   k_scale=struct(scale_shape, jnp.float32, shard.k_scale),
                   v_scale=struct(scale_shape, jnp.float32, shard.v_scale), order=order)


def init_cache(config: GLMConfig, layout: Layout, batch: int, length: int, dtype) -> KVCache:
    """An empty cache, created directly in its sharded layout (compiled once per shape). dtype
    int8: an int8 cache with float32 scales."""
    return _cache_maker(config, layout, batch, length, jnp.dtype(dtype))()


@functools.lru_cache(maxsize=32)
def _cache_maker(config: GLMConfig, layout: Layout, batch: int, length: int, dtype):
    like = abstract_cache(config, layout, batch, length, dtype)

    def make():
        zeros = lambda structs: tuple(jnp.zeros(x.shape, x.dtype) for x in structs)
        return KVCache(k=zeros(like.k), v=zeros(like.v), index=jnp.full((batch, length), PAD, jnp.int32),
                       k_scale=zeros(like.k_scale), v_scale=zeros(like.v_scale), order=like.order)

    return jax.jit(make, out_shardings=jax.tree.map(lambda x: x.sharding, like))


STRIPE = 512  # slots per stripe: stripes go round the `sequence` devices in turn


def stripe(local_length: int) -> int:
    """Stripe size for a device holding `local_length` slots (all of them when that is small)."""
    return min(STRIPE, local_length)


def _local_slots(slots: jax.Array, length: int, axis: str) -> jax.Array:
    """Global slot numbers -> this device's local ones; slots it does not own -> `length` (dropped).

    Slots are striped: stripe j (slots j*b .. j*b+b-1) lives on device j % n, so every device holds
    an equal share of any prefix of the sequence. Prefill chunks and decode steps then find the
    visible keys spread evenly over the devices, instead of on the first few."""
    n, b = jax.lax.axis_size(axis), stripe(length)
    j = slots // b
    local = (j // n) * b + slots % b
    return jnp.where((j % n == jax.lax.axis_index(axis)) & (local < length), local, length)


def resolve_kernel(kernel: str, platform: str) -> str:
    """The attention `kernel` (one of options.KERNELS) for a mesh of `platform` devices: "auto" is
    "gpu" on a GPU and "xla" elsewhere. "gpu" elsewhere than on a GPU is refused (its kernels
    compile for GPUs only; the CPU tests call them directly, in Pallas' interpreter or through
    jax.nn's XLA path)."""
    check_choice("attention kernel", kernel, KERNELS)
    if kernel == "auto":
        return "gpu" if platform == "gpu" else "xla"
    if kernel == "gpu" and platform != "gpu":
        raise ValueError(f"attention kernel 'gpu' needs GPU devices, not {platform}; use 'auto' or 'xla'")
    return kernel


BLOCK_MIN, BLOCK_MAX = 128, 8192   # KV tile sizes of a prefill chunk's score tiles (powers of two)
# float32 values per score tile: CPU tiles that stay in its caches, TPU, and GPU tiles large
# enough that the tile loop does not dominate
SCORE_BUDGETS = {"cpu": 1 << 21, "tpu": 1 << 24, "gpu": 1 << 28}


def cache_block(local_length: int, queries: int, budget: int) -> int:
    """KV tile for a prefill chunk over a device's `local_length` slots: score tiles of `queries`
    (chunk tokens x local query heads) rows hold at most `budget` float32 values; a power of two
    from BLOCK_MIN to BLOCK_MAX that divides the local length (whole stripes above STRIPE), or all
    of it."""
    fits = 1 << (max(1, budget // max(queries, 1)).bit_length() - 1)
    block = max(BLOCK_MIN, min(BLOCK_MAX, fits))
    if local_length <= block:
        return local_length
    while local_length % block:
        block //= 2
    return block


def score_budget(platform: str) -> int:
    """float32 values per prefill score tile on `platform` (TPU's for any other)."""
    return SCORE_BUDGETS.get(platform, SCORE_BUDGETS["tpu"])


def _owned(rows: jax.Array, local_batch: int, batch_axes) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: global cache rows [b] -> (held by this device [b], local row numbers [b])."""
    offset = jax.lax.axis_index(batch_axes) * local_batch if batch_axes else 0
    return (rows >= offset) & (rows < offset + local_batch), rows - offset


# -- per-device kernels: q [b,C,Hq,D], q_index [b,C], the device's k/v [B,S,G,D] (or [B,G,S,D])
#    and k_index [b,S] (already of `rows`), scales or None, rows (local, int32 [b]) or None -> State

def tiles(q, q_index, k, v, k_index, k_scale=None, v_scale=None, rows=None, *, order: str, block_k: int) -> State:
    """The portable kernel: `cache_forward`'s loop over the filled tiles."""
    qg = group_queries(q, k.shape[order.index("g")])
    return cache_forward(init_state(*qg.shape[:2], *qg.shape[2:]), qg, k, v, q_index, k_index, k_scale, v_scale,
                         block_k=block_k, kv_layout=order, rows=rows)


def pallas_decode(q, q_index, k, v, k_index, k_scale=None, v_scale=None, rows=None, *, order: str,
                  block_k: int) -> State:
    """One query a row (C = 1) by `decode_by_length`, for the engine's rows (slot p holds position
    p): the query sees slots [0, q_index] without consulting k_index."""
    qg = group_queries(q, k.shape[order.index("g")])
    lengths = jnp.maximum(q_index[:, 0] + 1, 0)
    return decode_by_length(heads_major(qg), k, v, lengths, jnp.arange(q.shape[0]) if rows is None else rows,
                            k_scale, v_scale, kv_layout=order)


def cudnn_prefill(q, q_index, k, v, k_index, k_scale=None, v_scale=None, rows=None, *, order: str,
                  block_k: int) -> State:
    """A prefill chunk (float cache, [B,S,G,D]) by `cudnn_chunk` when its rows are whole (filled
    from slot 0: cuDNN masks by lengths, not by the index), else by `tiles`."""
    c = q.shape[1]
    start = q_index.max() - (c - 1)
    whole = jnp.all(q_index >= 0) & ((start == 0) | jnp.all(k_index[:, 0] != PAD))
    kr, vr = (x if rows is None else x[rows] for x in (k, v))
    return jax.lax.cond(whole, lambda: cudnn_chunk(q, kr, vr, start),
                        lambda: tiles(q, q_index, k, v, k_index, rows=rows, order=order, block_k=block_k))


def cache_ops(layout: Layout, order: str, *, axis: str = "sequence", budget: int | None = None, kernel: str = "auto"):
    """(write, attend) on the sharded cache, both shard_mapped over the mesh. `order`: the K/V
    dim order ("bsgd" or "bgsd"). `kernel` (see `resolve_kernel`): "xla" runs `tiles`; "gpu" runs,
    on a cache held by one device, `cudnn_prefill` for prefill chunks of a float "bsgd" cache and
    `pallas_decode` for decode steps, `tiles` otherwise.
    `budget`: float32 values per prefill score tile (default: `score_budget` of the mesh's chips).

    write(cache_part, values, slots, rows=None) -> cache_part with the slots set: K/V take values
    [b,C,G,D] (as the model makes them), int8 scales [b,C,G], the index [B,S] takes [b,C]; slots
    [C] (shared by the rows) or [b,C]; slots no device owns (DROP) are skipped.
    attend(q [b,C,Hq,D], q_index [b,C], k, v, k_index [B,S], k_scale, v_scale, rows=None) -> [b,C,Hq,D]
    (scales None unless the cache is int8: dequantized tile by tile inside the attention).
    b is the cache's batch B, or that of `rows` (int32 [b]): the cache rows the tokens belong to,
    written and attended where they are (rows >= B are skipped). One row (a prefill beside running
    requests) is sliced tile by tile, never copied; several (a decode step of the active rows)
    are gathered.
    """
    platform = layout.mesh.devices.flat[0].platform
    kernel = resolve_kernel(kernel, platform)
    n = layout.size(axis)
    seq, heads_dim = order.index("s"), order.index("g")

    def write(cache_part, values, slots, rows=None):
        part_order = {4: order, 3: order.replace("d", ""), 2: "bs"}[cache_part.ndim]
        spec, at = _spec(layout, part_order, cache_part.shape), part_order.index("s")
        batch_axes, some_rows = spec[0], rows is not None
        slots = jnp.broadcast_to(slots, values.shape[:2])                       # [b, C]

        def local(part, vals, slots, rows):
            if some_rows:                                                       # [b, 1]: rows this device owns
                mine, local_rows = _owned(rows, part.shape[0], batch_axes)
                index = jnp.where(mine, local_rows, part.shape[0])[:, None]
            else:
                index = jnp.arange(part.shape[0])[:, None]                      # [Bl, 1]
            # vals keep the model's [b, C, ...] order: numpy indexing by batch and slot indices
            # (adjacent or not) puts their [b, C] dims first either way
            where = (index,) + (slice(None),) * (at - 1) + (_local_slots(slots, part.shape[at], axis),)
            return part.at[where].set(vals, mode="drop")

        # values [b, C, G, D]: heads split as the cache's, batch too unless some rows are written
        batch_spec = None if some_rows else batch_axes
        value_spec = P(*(batch_spec if c == "b" else None if c == "s" else spec[part_order.index(c)]
                         for c in "bsgd"[:cache_part.ndim]))
        return jax.shard_map(local, mesh=layout.mesh, in_specs=(spec, value_spec, P(batch_spec, None), P()),
                             out_specs=spec, check_vma=False)(cache_part, values, slots,
                                                              jnp.zeros(1, jnp.int32) if rows is None else rows)

    def attend(q, q_index, k, v, k_index, k_scale=None, v_scale=None, rows=None):
        b, c, hq, d = q.shape
        g, s = k.shape[heads_dim], k.shape[seq]
        kv_spec = list(_spec(layout, order, k.shape))
        if layout.mesh_axes("q_heads", hq) != layout.mesh_axes("kv_heads", g):
            kv_spec[heads_dim] = None                       # heads not split alike: keep them whole
        kv_spec = P(*kv_spec)
        batch_axes, some_rows = kv_spec[0], rows is not None
        batch_spec = None if some_rows else batch_axes
        q_spec = P(batch_spec, None, kv_spec[heads_dim], None)
        idx_spec = P(batch_axes, kv_spec[seq])
        split = kv_spec[heads_dim] or ()
        local_heads = hq // math.prod(layout.size(a) for a in ((split,) if isinstance(split, str) else split))
        bk = cache_block(s // n, c * local_heads, budget or score_budget(platform))
        one_device = kernel == "gpu" and n == 1
        if one_device and c == 1 and decode_tiles(s, b * g) is not None:
            run = pallas_decode
        elif one_device and c > 1 and order == "bsgd" and k_scale is None:
            run = cudnn_prefill
        else:
            run = tiles
        scale_spec = P(*(a for i, a in enumerate(kv_spec) if i != order.index("d")))

        def local(q, qi, rows, k, v, ki, *scales):
            if some_rows:  # each row attends on the device holding it; the others add zeros below
                mine, rows = _owned(rows, k.shape[0], batch_axes)
                rows = jnp.clip(rows, 0, k.shape[0] - 1)
                ki = ki[rows]
            state = run(q, qi, k, v, ki, *scales, rows=rows if some_rows else None, order=order, block_k=bk)
            if n > 1:  # log-sum-exp merge of the partial states across the sequence axis
                m = jax.lax.pmax(state.m, axis)
                m_safe = jnp.where(m == -jnp.inf, 0.0, m)
                scale = jnp.exp(state.m - m_safe)
                state = dataclasses.replace(state, m=m, l=jax.lax.psum(state.l * scale, axis),
                                            acc=jax.lax.psum(state.acc * scale[..., None], axis))
            out = normalized(state)                                             # [b, G, R, C, D]
            if some_rows and batch_axes:
                out = jax.lax.psum(jnp.where(mine[:, None, None, None, None], out, 0.0), batch_axes)
            return ungroup(out, q.dtype)

        scales = () if k_scale is None else (k_scale, v_scale)
        return jax.shard_map(local, mesh=layout.mesh,
                             in_specs=(q_spec, P(batch_spec, None), P(), kv_spec, kv_spec, idx_spec)
                             + (scale_spec,) * len(scales),
                             out_specs=q_spec, check_vma=False)(q, q_index,
                                                                jnp.zeros(1, jnp.int32) if rows is None else rows,
                                                                k, v, k_index, *scales)

    return write, attend


DROP = 1 << 30  # a slot no device owns: writes to it are dropped
