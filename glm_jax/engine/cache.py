"""The KV cache: a pool of fixed-size pages shared by every request, its shardings, int8 storage,
and writes and attention through page tables.

Per layer, K and V are a pool [G, P, page, D] (KV heads, pages, slots a page, head dim), plus
float32 scales [G, P, page] when stored as int8. A request holds a page table: the page of each
of its logical pages (tokens j*page .. j*page+page-1 of the request are in logical page j). The
cache carries the tables of the engine's B rows, `pages` [B, M] (M logical pages a row at most).
Position p of row r lives in slot p % page of page pages[r, p // page].

The page dim is split over the `sequence` devices in contiguous blocks (device d holds pages
[d*P/n, (d+1)*P/n)); the allocator (engine/pages.py) puts logical page j on device j % n, so any
prefix of a request is spread evenly and every device has its share of the work at every step.
KV heads go over `tensor`. Writes and attention run inside shard_map: every device writes the
slots it owns and attends over its own pages of each row; the partial results merge by a
log-sum-exp reduction across `sequence` (pmax + psum of a [b, heads, queries, dim] state), so no
KV moves per token.

Visibility is by position alone: a query at position q sees its row's positions <= q. On one
device those are a prefix of the row's local slots (local slot s: slot s % page of the row's s //
page-th local page), its `lengths`. The per-device kernels over them, and the choice of one per
call, are in paged_attention.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..attention import normalized, ungroup
from ..config import GLMConfig
from ..options import KV_CACHE_DTYPES, check_choice
from ..sharding import Layout
from .paged_attention import block_pages, local_kernel, resolve_kernel, score_budget


@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]   # per layer, the pool [G, P, page, D]
    v: tuple[jax.Array, ...]
    pages: jax.Array           # [B, M] int32: the page tables of the engine's rows
    # int8 caches only: per layer, the float32 scale of each slot's K (V) head [G, P, page]; the
    # value is int8 * scale. Empty otherwise.
    k_scale: tuple[jax.Array, ...] = ()
    v_scale: tuple[jax.Array, ...] = ()

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def quantized(self) -> bool:
        return bool(self.k_scale)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "pages", "k_scale", "v_scale"], meta_fields=[])

POOL_AXES = ("kv_heads", "cache_pages", None, "head_dim")
DROP = 1 << 30  # a slot no device owns: writes to it are dropped


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


def page_devices(layout: Layout) -> int:
    """Devices the pool's pages are split over (the `cache_pages` rule's mesh axes)."""
    return math.prod(layout.size(a) for a in dict(layout.rules).get("cache_pages", ()))


def pool_pages(tokens: int, page_size: int, devices: int) -> int:
    """Pages for `tokens` slots: whole pages, a multiple of `devices` (each holds an equal block)."""
    pages = -(-max(tokens, 1) // page_size)
    return -(-pages // devices) * devices


def table_width(max_model_len: int, page_size: int, devices: int) -> int:
    """Logical pages a row's table holds: enough for `max_model_len` tokens, a multiple of `devices`."""
    return pool_pages(max_model_len, page_size, devices)


def cache_shardings(config: GLMConfig, layout: Layout, batch: int, width: int, num_pages: int, page_size: int,
                    quantized: bool = False) -> KVCache:
    shape = (cache_heads(config, layout), num_pages, page_size, config.head_dim)
    kv = layout.sharding(POOL_AXES, shape)
    scale = layout.sharding(POOL_AXES[:3], shape[:3])
    scales = (scale,) * config.num_layers if quantized else ()
    return KVCache(k=(kv,) * config.num_layers, v=(kv,) * config.num_layers,
                   pages=NamedSharding(layout.mesh, P()), k_scale=scales, v_scale=scales)


def abstract_cache(config: GLMConfig, layout: Layout, batch: int, width: int, num_pages: int, page_size: int,
                   dtype) -> KVCache:
    """The cache as ShapeDtypeStructs with their shardings: a pool of `num_pages` pages of
    `page_size` slots (K/V in `dtype`; int8 adds scales) and `batch` page tables of `width` pages."""
    quantized = jnp.dtype(dtype) == jnp.int8
    shard = cache_shardings(config, layout, batch, width, num_pages, page_size, quantized)
    shape = (cache_heads(config, layout), num_pages, page_size, config.head_dim)
    struct = lambda shape, dtype, shardings: tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=s) for s in shardings)
    return KVCache(k=struct(shape, dtype, shard.k), v=struct(shape, dtype, shard.v),
                   pages=jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=shard.pages),
                   k_scale=struct(shape[:3], jnp.float32, shard.k_scale),
                   v_scale=struct(shape[:3], jnp.float32, shard.v_scale))


def init_cache(config: GLMConfig, layout: Layout, batch: int, width: int, num_pages: int, page_size: int,
               dtype) -> KVCache:
    """An empty cache, created directly in its sharded layout (compiled once per shape)."""
    return _cache_maker(config, layout, batch, width, num_pages, page_size, jnp.dtype(dtype))()


@functools.lru_cache(maxsize=32)
def _cache_maker(config: GLMConfig, layout: Layout, batch: int, width: int, num_pages: int, page_size: int, dtype):
    like = abstract_cache(config, layout, batch, width, num_pages, page_size, dtype)

    def make():
        zeros = lambda structs: tuple(jnp.zeros(x.shape, x.dtype) for x in structs)
        return KVCache(k=zeros(like.k), v=zeros(like.v), pages=jnp.zeros((batch, width), jnp.int32),
                       k_scale=zeros(like.k_scale), v_scale=zeros(like.v_scale))

    return jax.jit(make, out_shardings=jax.tree.map(lambda x: x.sharding, like))


def one_row_cache(config: GLMConfig, layout: Layout, length: int, page_size: int, dtype) -> KVCache:
    """A cache of one row (row 0) holding `length` tokens in its own pages, placed as the allocator
    places them (logical page j on page device j % n): for scripts and tests that call
    `model_step` directly."""
    n = page_devices(layout)
    width = table_width(length, page_size, n)
    cache = init_cache(config, layout, 1, width, width, page_size, dtype)
    j = jnp.arange(width, dtype=jnp.int32)
    return dataclasses.replace(cache, pages=((j % n) * (width // n) + j // n)[None])


def cache_bytes_per_token(config: GLMConfig, layout: Layout, dtype) -> int:
    """Bytes one token's K/V take over all layers on the whole mesh (int8: with its scales)."""
    per_head = config.head_dim * jnp.dtype(dtype).itemsize + (4 if jnp.dtype(dtype) == jnp.int8 else 0)
    return 2 * config.num_layers * cache_heads(config, layout) * per_head


def page_slots(table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int) -> jax.Array:
    """Global pool slots (page * page_size + offset) of positions [b, C] of rows whose tables are
    table [b, M]; DROP where not valid."""
    page = jnp.take_along_axis(table, jnp.clip(positions // page_size, 0, table.shape[1] - 1), axis=1)
    return jnp.where(valid, page * page_size + positions % page_size, DROP)


def local_lengths(q_pos: jax.Array, device, devices: int, page_size: int) -> jax.Array:
    """Local slots a query at position q_pos [b, C] (-1: none) sees on `device` of `devices`, whose
    local pages are the row's logical pages device, device + devices, ...: a prefix of them."""
    seen = q_pos + 1
    full, rest = seen // page_size, seen % page_size
    local_full = jnp.maximum(0, (full - device + devices - 1) // devices)
    return local_full * page_size + jnp.where(full % devices == device, rest, 0)


def cache_ops(layout: Layout, *, budget: int | None = None, kernel: str = "auto"):
    """(write, attend) on the sharded pool, both shard_mapped over the mesh. `kernel` (see
    `resolve_kernel`): "xla" runs `paged_tiles`; "gpu" and "tpu" their kernels where
    `local_kernel` takes them.
    `budget`: float32 values per score tile (default: `score_budget` of the mesh's chips).

    write(part, values, slots) -> part with the slots set: a K/V pool [G,P,page,D] takes values
    [b,C,G,D] (as the model makes them), an int8 scale pool [G,P,page] takes [b,C,G]; slots [b,C]
    are global pool slots (`page_slots`); DROP is skipped.
    attend(q [b,C,Hq,D], q_pos [b,C], k, v, table [b,M], k_scale, v_scale) -> [b,C,Hq,D]: the
    queries at positions q_pos (-1: sees nothing) of rows with page tables `table` (scales None
    unless the pool is int8: dequantized tile by tile inside the attention).
    """
    platform = layout.mesh.devices.flat[0].platform
    kernel = resolve_kernel(kernel, platform)

    def page_axes(num_pages):
        return layout.mesh_axes("cache_pages", num_pages)

    def write(part, values, slots):
        spec = layout.spec(POOL_AXES[:part.ndim], part.shape)
        axes = page_axes(part.shape[1])
        value_spec = P(None, None, spec[0], *((None,) if part.ndim == 4 else ()))

        def local(part, vals, slots):
            g, pages, page = part.shape[:3]
            first = (jax.lax.axis_index(axes) if axes else 0) * pages * page
            mine = (slots >= first) & (slots < first + pages * page)
            size = pages * page
            # rows of a [G*P*page, D] view (the pool's own layout): scattered along [G, P*page, D]'s
            # middle dim, XLA's TPU compiler copied each layer's pool to a slot-major layout and back
            # (int8 at 2M tokens on v5e-8: 22 GiB of decode temporaries); by (page, offset), too
            at = jnp.where(mine, slots - first, -1).reshape(-1)                 # [n]
            rows = jnp.where(at >= 0, jnp.arange(g)[:, None] * size + at, g * size).reshape(-1)   # [G*n]; dropped
            flat = part.reshape((g * size,) + part.shape[3:])
            new = jnp.moveaxis(vals, 2, 0).reshape((g * at.shape[0],) + part.shape[3:]).astype(part.dtype)
            return flat.at[rows].set(new, mode="drop").reshape(part.shape)

        return jax.shard_map(local, mesh=layout.mesh, in_specs=(spec, value_spec, P()), out_specs=spec,
                             check_vma=False)(part, values, slots)

    def attend(q, q_pos, k, v, table, k_scale=None, v_scale=None):
        b, c, hq, d = q.shape
        g, num_pages, page_size = k.shape[:3]
        axes = page_axes(num_pages)
        n = math.prod(layout.size(a) for a in axes)
        kv_spec = list(layout.spec(POOL_AXES, k.shape))
        if layout.mesh_axes("q_heads", hq) != layout.mesh_axes("kv_heads", g):
            kv_spec[0] = None                               # heads not split alike: keep them whole
        kv_spec = P(*kv_spec)
        q_spec = P(None, None, kv_spec[0], None)
        split = kv_spec[0] or ()
        local_heads = hq // math.prod(layout.size(a) for a in ((split,) if isinstance(split, str) else split))
        tile = block_pages(page_size, c * local_heads, budget or score_budget(platform))
        width = -(-table.shape[1] // n) * n
        run = local_kernel(kernel, n, b, c, width // n, k_scale is not None)

        def local(q, q_pos, table, k, v, *scales):
            device = jax.lax.axis_index(axes) if axes else 0
            lengths = local_lengths(q_pos, device, n, page_size)
            # the row's local pages: logical pages device, device + n, ... (ids -> local ids)
            mine = jnp.pad(table, ((0, 0), (0, width - table.shape[1]))).reshape(b, width // n, n)
            mine = jnp.take(mine, device, axis=2) - device * k.shape[1]
            state = run(q, lengths, k, v, mine, *scales, tile_pages=tile)
            if n > 1:  # log-sum-exp merge of the partial states across the page devices
                m = jax.lax.pmax(state.m, axes)
                m_safe = jnp.where(m == -jnp.inf, 0.0, m)
                scale = jnp.exp(state.m - m_safe)
                state = dataclasses.replace(state, m=m, l=jax.lax.psum(state.l * scale, axes),
                                            acc=jax.lax.psum(state.acc * scale[..., None], axes))
            return ungroup(normalized(state), q.dtype)

        scales = () if k_scale is None else (k_scale, v_scale)
        scale_spec = P(*kv_spec[:3])
        return jax.shard_map(local, mesh=layout.mesh,
                             in_specs=(q_spec, P(), P(), kv_spec, kv_spec) + (scale_spec,) * len(scales),
                             out_specs=q_spec, check_vma=False)(q, q_pos, table, k, v, *scales)

    return write, attend
