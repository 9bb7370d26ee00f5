"""The per-device paged attention kernels and the choice between them. One signature, `(q [b,C,Hq,D],
lengths [b,C] (local slots each query sees), the device's pool k, v [G,P,page,D], table [b,M] (the
rows' local page ids), k_scale, v_scale (int8 pools) or None) -> State`: `paged_tiles` (portable;
`ragged_tiles` for several rows), `gpu_decode`, `gpu_prefill`, `tpu_decode`. `local_kernel` picks
one per call; `engine/cache.py`'s `cache_ops` runs it on every device and merges across them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..attention import State, group_queries, heads_major, init_state, update
from ..options import KERNELS, check_choice


AUTO_KERNELS = {"gpu": "gpu", "tpu": "tpu"}   # what "auto" is on these platforms ("xla" on others)


def resolve_kernel(kernel: str, platform: str) -> str:
    """The attention `kernel` (one of options.KERNELS) for a mesh of `platform` devices: "auto" is
    AUTO_KERNELS' choice for the platform, else "xla". "gpu" and "tpu" elsewhere than on their
    platform are refused (their kernels compile for it only; the CPU tests call them directly,
    in Pallas' interpreters)."""
    check_choice("attention kernel", kernel, KERNELS)
    if kernel == "auto":
        return AUTO_KERNELS.get(platform, "xla")
    if kernel in ("gpu", "tpu") and platform != kernel:
        raise ValueError(f"attention kernel {kernel!r} needs {kernel.upper()} devices, not {platform}; "
                         "use 'auto' or 'xla'")
    return kernel


BLOCK_MIN, BLOCK_MAX = 128, 8192   # slots of a score tile's KV side (powers of two)
# float32 values per score tile: CPU tiles that stay in its caches, TPU, and GPU tiles large
# enough that the tile loop does not dominate
SCORE_BUDGETS = {"cpu": 1 << 21, "tpu": 1 << 24, "gpu": 1 << 28}


def score_budget(platform: str) -> int:
    """float32 values per score tile on `platform` (TPU's for any other)."""
    return SCORE_BUDGETS.get(platform, SCORE_BUDGETS["tpu"])


def block_pages(page_size: int, queries: int, budget: int) -> int:
    """Pages a score tile gathers: score tiles of `queries` (tokens x local query heads) rows
    hold at most `budget` float32 values, BLOCK_MIN to BLOCK_MAX slots (at least one page)."""
    fits = 1 << (max(1, budget // max(queries, 1)).bit_length() - 1)
    return max(1, max(BLOCK_MIN, min(BLOCK_MAX, fits)) // page_size)


REST_TILES = 8   # the pages past a row's whole tiles go in tiles this many times smaller
ONE_TILE_SLOTS = 1024   # a table of at most this many slots, within one tile, is read as one masked tile


def paged_tiles(q, lengths, k, v, table, k_scale=None, v_scale=None, *, tile_pages: int,
                ragged: bool = True) -> State:
    """The portable kernel: every query of the chunk at once over tiles of its rows' pages
    (gathered from the pool): whole tiles of `tile_pages` pages up to the longest row's visible
    slots, then the rest in tiles REST_TILES times smaller (a short row reads little past its
    end). A tile every query sees whole skips the mask. Several rows compute in the gathered tiles' [G, b] order (no
    transposed copy of them); one row in [b, G] order (XLA's CPU products of a [G, 1] batch are
    2x slower). A short table (one tile of at most ONE_TILE_SLOTS slots) is one masked tile: no
    loop, one tile to compile instead of four (short requests, the tests). Several rows past one
    tile go to `ragged_tiles` (faster for several rows, slower for one: docs/benchmarks.md), unless
    `ragged` is False (scripts/bench_tiles.py compares the two)."""
    b, c = lengths.shape
    g, _, page, d = k.shape
    one_tile = table.shape[1] <= tile_pages and table.shape[1] * page <= ONE_TILE_SLOTS
    if ragged and b > 1 and not one_tile:
        return ragged_tiles(q, lengths, k, v, table, k_scale, v_scale, tile_pages=tile_pages)
    swap = b > 1
    flip = lambda x: x.swapaxes(0, 1)
    order, tile_order = (flip, lambda x: x) if swap else (lambda x: x, flip)  # queries/state; tiles ([G, b, ...])
    q_layout, kv_layout = ("gbrtd", "gbsd") if swap else ("bgrtd", "bgsd")
    qg = order(heads_major(group_queries(q, g)))                            # [G, b, R, C, D] or [b, G, R, C, D]
    columns = table.shape[1]
    tile_pages = min(tile_pages, columns)
    rest_pages = max(1, tile_pages // REST_TILES)
    table = jnp.pad(jnp.clip(table, 0, k.shape[1] - 1), ((0, 0), (0, tile_pages)))
    shortest = lengths.min()      # a query seeing nothing here may see pages on other devices: it counts

    def tile(start, pages):  # the tile of `pages` pages from page `start` on: K, V, scales, mask
        span = pages * page

        def gather(x, ids):  # [G, P, page(, D)] -> [G, b, span(, D)] (or [b, G, ...] for one row)
            t = x[:, ids]                                                   # [G, b, T, page(, D)]
            return tile_order(t.reshape(t.shape[:2] + (span,) + t.shape[4:]))

        ids = jax.lax.dynamic_slice_in_dim(table, start, pages, 1)
        scales = [None if x is None else gather(x, ids) for x in (k_scale, v_scale)]
        mask = start * page + jnp.arange(span, dtype=jnp.int32) < lengths[:, :, None]     # [b, C, span]
        return gather(k, ids), gather(v, ids), scales, (mask[None, :, None] if swap else mask)

    def fold(state, first, tiles, pages):  # `tiles` tiles of `pages` pages from page `first` on
        def step(i, st):
            start = first + i * pages
            k_t, v_t, scales, mask = tile(start, pages)
            # under lax.cond the products run as plain matmuls on the gathered tiles (fused with the
            # gather outside one, XLA's CPU backend is 2-3x slower)
            return jax.lax.cond((start + pages) * page <= shortest,
                                lambda st: update(st, qg, k_t, v_t, None, kv_layout, *scales, q_layout=q_layout),
                                lambda st: update(st, qg, k_t, v_t, mask, kv_layout, *scales, q_layout=q_layout), st)

        return jax.lax.fori_loop(0, tiles, step, state)

    state = init_state(b, c, g, q.shape[2] // g, d).map(order)
    if one_tile:
        k_t, v_t, scales, mask = tile(0, columns)
        return update(state, qg, k_t, v_t, mask, kv_layout, *scales, q_layout=q_layout).map(order)
    needed = -(-lengths.max() // page)                                      # pages the longest row sees
    whole_tiles = needed // tile_pages
    state = fold(state, 0, whole_tiles, tile_pages)
    rest = -(-(needed - whole_tiles * tile_pages) // rest_pages)
    return fold(state, whole_tiles * tile_pages, rest, rest_pages).map(order)


def ragged_tiles(q, lengths, k, v, table, k_scale=None, v_scale=None, *, tile_pages: int) -> State:
    """Several rows of mixed lengths: the pages each row sees, of every row, as one list of (row,
    page) items taken `tile_pages` at a time (each item with its row's queries), so the work
    follows the pages the rows see, not rows x the longest row's (`paged_tiles` computes every row
    over the longest row's tiles: one 16K row among short ones made each a 16K row). Each tile's
    per-item states merge into their rows' by log-sum-exp (segment max and sums)."""
    b, c = lengths.shape
    g, _, page, d = k.shape
    qg = heads_major(group_queries(q, g))                                   # [b, G, R, C, D]
    r = qg.shape[2]
    seen = -(-lengths.max(axis=1) // page)                                  # [b] pages each row sees
    ends = jnp.cumsum(seen)
    starts, total = ends - seen, ends[-1]
    table = jnp.clip(table, 0, k.shape[1] - 1)

    def step(i, state):
        item = i * tile_pages + jnp.arange(tile_pages)                     # [T]
        live = item < total
        row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), b - 1)
        j = jnp.clip(item - starts[row], 0, table.shape[1] - 1)
        ids = table[row, j]
        gather = lambda x: x[:, ids].swapaxes(0, 1)                          # [T, G, page(, D)]
        scales = [None if x is None else gather(x) for x in (k_scale, v_scale)]
        slot = j[:, None] * page + jnp.arange(page)                         # [T, page]
        mask = (slot[:, None, :] < lengths[row][:, :, None]) & live[:, None, None]      # [T, C, page]
        part = update(init_state(tile_pages, c, g, r, d), qg[row], gather(k), gather(v), mask, "bgsd", *scales)
        into = jnp.where(live, row, b)                                      # dead items: no row
        m = jnp.maximum(state.m, jax.ops.segment_max(part.m, into, b))
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        own, theirs = jnp.exp(state.m - m_safe), jnp.exp(part.m - m_safe[row])
        return State(m=m, l=state.l * own + jax.ops.segment_sum(part.l * theirs, into, b),
                     acc=state.acc * own[..., None] + jax.ops.segment_sum(part.acc * theirs[..., None], into, b))

    return jax.lax.fori_loop(0, -(-total // tile_pages), step, init_state(b, c, g, r, d))


def gpu_decode(q, lengths, k, v, table, k_scale=None, v_scale=None, *, tile_pages: int) -> State:
    """One query a row (C = 1) by the paged Pallas (Triton) decode kernel."""
    from ..kernels.decode_pallas import paged_decode

    return paged_decode(q, lengths, k, v, table, k_scale, v_scale)


def gpu_prefill(q, lengths, k, v, table, k_scale=None, v_scale=None, *, tile_pages: int,
                implementation: str = "cudnn") -> State:
    """One row's prefill chunk (C > 1, a float pool held by one device) by `cudnn_chunk` on the
    row's pages gathered into a contiguous [1, M*page, G, D] K and V (position p at slot p), when
    the chunk is whole: its first query is real, so (chunks being left-padded) all are, at
    positions start .. start+C-1 after the row's slots [0, start). Otherwise (a short last chunk)
    by `paged_tiles`. implementation: `cudnn_chunk`'s ("xla": its CPU test seam)."""
    from ..kernels.cudnn import cudnn_chunk

    g, _, _, d = k.shape
    start = lengths[0, 0] - 1

    def fused():
        ids = jnp.clip(table[0], 0, k.shape[1] - 1)
        rows = [x[:, ids].reshape(g, -1, d).transpose(1, 0, 2)[None] for x in (k, v)]     # [1, M*page, G, D]
        return cudnn_chunk(q, *rows, start, implementation)

    return jax.lax.cond(start >= 0, fused, lambda: paged_tiles(q, lengths, k, v, table, tile_pages=tile_pages))


def tpu_decode(q, lengths, k, v, table, k_scale=None, v_scale=None, *, tile_pages: int) -> State:
    """One query a row (C = 1) by the Pallas TPU paged-attention kernel (`tpu_paged_decode`),
    every table entry made a valid page id (it fetches whole blocks of the table's pages)."""
    from ..kernels.paged_tpu import tpu_paged_decode

    return tpu_paged_decode(q, lengths, k, v, jnp.clip(table, 0, k.shape[1] - 1), k_scale, v_scale)


# Table entries (rows x local table pages) `tpu_decode` takes at most: the kernel's table lives in
# the TPU core's scalar memory, 1 MiB on a v5e (a 256 x 1024 table does not compile there), so
# half of it; larger calls take `paged_tiles`.
TPU_TABLE_ENTRIES = 1 << 17


def local_kernel(kernel: str, devices: int, rows: int, chunk: int, table_pages: int, quantized: bool):
    """The per-device kernel of an attention call of `rows` rows of `chunk` queries on a pool over
    `devices` page devices, local tables of `table_pages` pages: for "gpu" on one device,
    `gpu_decode` for decode steps and `gpu_prefill` for one row's chunk of a float pool; for
    "tpu", `tpu_decode` for decode steps within TPU_TABLE_ENTRIES (int8 pools too, by their own
    kernel: XLA's tiles in the decode loop hold copies of the whole cache, 28 GiB of temporaries
    at 2M int8 tokens on v5e-8); `paged_tiles` for everything else."""
    if kernel == "gpu" and devices == 1 and (chunk == 1 or (rows == 1 and not quantized)):
        return gpu_decode if chunk == 1 else gpu_prefill
    if kernel == "tpu" and chunk == 1 and rows * table_pages <= TPU_TABLE_ENTRIES:
        return tpu_decode
    return paged_tiles
