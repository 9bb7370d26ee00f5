"""The engine's device programs: the model step on the cache, a row's prefill chunk, a row's
admission, a decode burst, a speculative verification step, and the one cached set of their jitted
forms (`programs_for`).

A decode step, top to bottom: `decode_burst` -> `model_step` (writes the step's K/V into the
cache and attends over it with `cache.cache_ops`) -> the model (model.py), which calls
`model_step`'s per-layer `attend(layer, q, k, v)` -> `sample` (sampling.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import GLMConfig
from ..sampling import MAX_STOP_IDS, sample
from ..sharding import Layout
from .cache import KVCache, cache_ops, cache_shardings, page_slots, quantize
from .multihost import Plan
from .speculative import accepted


def model_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: jax.Array,
               positions: jax.Array, valid: jax.Array, rows: jax.Array, *, layout: Layout,
               last_only: bool = True, kernel: str = "auto") -> tuple[jax.Array, KVCache]:
    """Runs tokens [b, C] of cache rows `rows` (int32 [b]; rows >= B are padding) at `positions`
    [b, C], writing their K/V to the rows' pages (tokens with valid [b, C] False write nothing and
    see nothing); returns float32 logits ([b, V] with last_only, else [b, C, V]) and the new cache."""
    model = nnx.merge(graphdef, state)
    write, attend_cache = cache_ops(layout, kernel=kernel)
    table = cache.pages[jnp.minimum(rows, cache.pages.shape[0] - 1)]                # [b, M]
    slots = page_slots(table, positions, valid, cache.page_size)
    q_pos = jnp.where(valid, positions, -1)
    ks, vs, k_scales, v_scales = list(cache.k), list(cache.v), list(cache.k_scale), list(cache.v_scale)

    def attend(i, q, k, v):  # the model's per-layer attention: store this layer's K/V, attend over the pages
        if cache.quantized:
            (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
            k_scales[i], v_scales[i] = write(k_scales[i], k_scale, slots), write(v_scales[i], v_scale, slots)
        ks[i], vs[i] = write(ks[i], k, slots), write(vs[i], v, slots)
        scales = (k_scales[i], v_scales[i]) if cache.quantized else ()
        return attend_cache(q, q_pos, ks[i], vs[i], table, *scales)

    logits = model(tokens, positions, attend, layout=layout, last_only=last_only).astype(jnp.float32)
    cache = KVCache(tuple(ks), tuple(vs), cache.pages, tuple(k_scales), tuple(v_scales))
    return (logits[:, -1] if last_only else logits), cache


@dataclasses.dataclass
class Rows:
    """The decode state of every cache row, on device."""
    token: jax.Array        # [B] int32: the row's next token, drawn, not yet emitted
    position: jax.Array     # [B] int32: slot (= RoPE position) of the row's next token
    active: jax.Array       # [B] bool: decoding
    remaining: jax.Array    # [B] int32: tokens the row may still draw
    count: jax.Array        # [B] int32: tokens emitted (draw n folds n into the row's key)
    key: jax.Array          # [B] PRNG keys
    temperature: jax.Array  # [B] float32
    top_k: jax.Array        # [B] int32
    top_p: jax.Array        # [B] float32
    stop_ids: jax.Array     # [B, MAX_STOP_IDS] int32, -1 padded


jax.tree_util.register_dataclass(Rows, data_fields=[f.name for f in dataclasses.fields(Rows)], meta_fields=[])


def init_rows(batch: int) -> Rows:
    i32 = lambda: jnp.zeros((batch,), jnp.int32)
    return Rows(token=i32(), position=i32(), active=jnp.zeros((batch,), bool),
                remaining=i32(), count=i32(), key=jax.random.split(jax.random.key(0), batch),
                temperature=jnp.zeros((batch,), jnp.float32), top_k=i32(), top_p=jnp.ones((batch,), jnp.float32),
                stop_ids=jnp.full((batch, MAX_STOP_IDS), -1, jnp.int32))


def admit(rows: Rows, row, logits, position, max_tokens, seed, temperature, top_k, top_p, stop_ids, drawn) -> Rows:
    """Rows with `row` starting to decode: its next token drawn from the prompt's last logits
    [1, V] (draw `drawn` of the row's key: the tokens it emitted before, 0 unless it resumes after
    a preemption), and its parameters (max_tokens: what it may still draw)."""
    at = lambda x, value: x.at[row].set(value)
    key = jax.random.key(seed)
    token = sample(logits, jax.random.fold_in(key, drawn)[None], temperature, top_k, top_p)[0]
    return Rows(token=at(rows.token, token), position=at(rows.position, position), active=at(rows.active, True),
                remaining=at(rows.remaining, max_tokens), count=at(rows.count, drawn),
                key=at(rows.key, key), temperature=at(rows.temperature, temperature),
                top_k=at(rows.top_k, top_k), top_p=at(rows.top_p, top_p), stop_ids=at(rows.stop_ids, stop_ids))


def prefill_row(graphdef, params, cache: KVCache, row, tokens, positions, valid, *, layout: Layout,
                kernel: str = "auto") -> tuple[jax.Array, KVCache]:
    """One prefill chunk of row `row` (int32): tokens, positions, valid [1, C]. Returns the last
    token's logits [1, V] and the cache."""
    return model_step(graphdef, params, cache, tokens, positions, valid, row[None], layout=layout, kernel=kernel)


def set_pages(cache: KVCache, rows, columns, pages) -> KVCache:
    """The cache with page-table entries set: pages[rows[i], columns[i]] = pages[i] (int32 [U]
    each; rows >= B are padding, dropped)."""
    return dataclasses.replace(cache, pages=cache.pages.at[rows, columns].set(pages, mode="drop"))


def _select(rows: Rows, cancel, selected) -> tuple[Rows, Rows]:
    """(rows with `cancel` [B] stopped, the rows `selected` [b] as a Rows of b; entries >= B inactive)."""
    batch = rows.active.shape[0]
    rows = dataclasses.replace(rows, active=rows.active & ~cancel)
    sub = jax.tree.map(lambda x: x[jnp.minimum(selected, batch - 1)], rows)           # [b] of each field
    return rows, dataclasses.replace(sub, active=sub.active & (selected < batch))


def _store(rows: Rows, sub: Rows, selected, out) -> tuple[Rows, jax.Array]:
    """(rows with the selected ones set back, tokens `out` [b, S] with the pending token column
    appended: [b, S+1], -1 where a row no longer decodes)."""
    rows = jax.tree.map(lambda full, part: full.at[selected].set(part, mode="drop"), rows, sub)
    return rows, jnp.concatenate([out, jnp.where(sub.active, sub.token, -1)[:, None]], axis=1)


def _stopping(sub: Rows) -> jax.Array:
    """[b]: the pending token ends its row (a stop id, or the last it may draw): emitted, not fed."""
    return jnp.any(sub.token[:, None] == sub.stop_ids, axis=-1) | (sub.remaining <= 1)


def decode_burst(graphdef, params, cache: KVCache, rows: Rows, cancel, selected, *, steps: int, layout: Layout,
                 kernel: str = "auto") -> tuple[KVCache, Rows, jax.Array]:
    """Up to `steps` tokens for each active row among `selected` (int32 [b], cache rows; entries
    >= B pad the bucket), all on device; fewer once none is active. Only those b rows are computed.
    cancel [B] bool: rows to stop first. Returns the cache, the rows and tokens [b, steps + 1]: the
    emitted ones (-1 where a row drew nothing), then each row's pending token (-1: none). A row stops
    after a stop id or its last allowed token; those final tokens are not fed back (their K/V are
    never needed). Each step emits the rows' drawn tokens, feeds them and draws the next from their
    logits: only tokens [b] carry over between steps and bursts, never the [b, V] logits."""
    rows, sub = _select(rows, cancel, selected)
    out = jnp.full((selected.shape[0], steps), -1, jnp.int32)

    def cond(carry):
        i, _, sub, _ = carry
        return (i < steps) & jnp.any(sub.active)

    def body(carry):
        i, cache, sub, out = carry
        token, drawn = sub.token, sub.active                                             # [b] each
        feed = drawn & ~_stopping(sub)
        logits, cache = model_step(graphdef, params, cache, token[:, None], sub.position[:, None], feed[:, None],
                                   selected, layout=layout, kernel=kernel)
        count = sub.count + drawn
        keys = jax.vmap(jax.random.fold_in)(sub.key, count)
        following = sample(logits, keys, sub.temperature, sub.top_k, sub.top_p)           # [b]
        sub = dataclasses.replace(sub, token=jnp.where(feed, following, token), position=sub.position + feed,
                                  active=feed, count=count, remaining=sub.remaining - drawn)
        return i + 1, cache, sub, out.at[:, i].set(jnp.where(drawn, token, -1))

    _, cache, sub, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, sub, out))
    return (cache, *_store(rows, sub, selected, out))


def verify_step(graphdef, params, cache: KVCache, rows: Rows, cancel, selected, drafts, *, layout: Layout,
                kernel: str = "auto") -> tuple[KVCache, Rows, jax.Array]:
    """One step for each active row among `selected` (as `decode_burst`) that feeds its pending
    token and its drafts (int32 [b, K]; a row's first n >= 0 count, at most `remaining` - 2) as
    K+1 queries at the next positions; emits the pending token and the drafts the model agrees with
    (speculative.accepted: its draws keyed by draw number, as plain decoding draws them), then holds
    the model's draw after the last of them as the pending token. Returns as `decode_burst`, tokens
    [b, K + 2]. Rejected drafts' K/V lie past the row's position: unseen, overwritten later."""
    rows, sub = _select(rows, cancel, selected)
    b, k = drafts.shape
    feed = sub.active & ~_stopping(sub)
    n = jnp.cumprod(drafts >= 0, axis=1).sum(axis=1)
    n = jnp.where(feed, jnp.clip(jnp.minimum(n, sub.remaining - 2), 0, k), 0)             # [b]
    fed = jnp.concatenate([sub.token[:, None], jnp.maximum(drafts, 0)], axis=1)            # [b, K+1]
    offsets = jnp.arange(k + 1)
    valid = feed[:, None] & (offsets <= n[:, None])
    logits, cache = model_step(graphdef, params, cache, fed, sub.position[:, None] + offsets, valid, selected,
                               layout=layout, kernel=kernel, last_only=False)              # [b, K+1, V]
    keys = jax.vmap(lambda key, c: jax.vmap(lambda i: jax.random.fold_in(key, i))(c + 1 + offsets))(sub.key, sub.count)
    repeat = lambda x: jnp.repeat(x, k + 1)
    targets = sample(logits.reshape(b * (k + 1), -1), keys.reshape(-1), repeat(sub.temperature), repeat(sub.top_k),
                     repeat(sub.top_p)).reshape(b, k + 1)
    kept = jnp.where(feed, accepted(drafts, n, targets, sub.stop_ids), 0)                 # [b]
    emitted = jnp.where(sub.active, 1 + kept, 0)
    last = jnp.take_along_axis(fed, kept[:, None], axis=1)[:, 0]
    alive = feed & ~((kept > 0) & jnp.any(last[:, None] == sub.stop_ids, axis=-1))
    out = jnp.where(offsets[None] < emitted[:, None], fed, -1)
    following = jnp.take_along_axis(targets, kept[:, None], axis=1)[:, 0]
    sub = dataclasses.replace(sub, token=jnp.where(alive, following, sub.token), position=sub.position + emitted,
                              active=alive, count=sub.count + emitted, remaining=sub.remaining - emitted)
    return (cache, *_store(rows, sub, selected, out))


@dataclasses.dataclass(frozen=True)
class Programs:
    init_rows: Callable
    set_pages: Callable
    prefill: Callable
    admit: Callable
    decode: Callable
    verify: Callable


PAGE_UPDATES = 256   # page-table entries a `set_pages` call sets (one compiled shape; more take more calls)


@functools.lru_cache(maxsize=16)
def programs_for(config: GLMConfig, graphdef, layout: Layout, kernel: str, batch: int, width: int, num_pages: int,
                 page_size: int, dtype) -> Programs:
    """The engine's programs for one cache shape (`batch` page tables of `width` pages over a pool
    of `num_pages` pages of `page_size`; `kernel` resolved, see `paged_attention.resolve_kernel`), jitted
    once: the cache and rows keep fixed shardings (replicated rows) and are donated, so every call
    after the first reuses the same executable. compile_report compiles these."""
    cache_sh = cache_shardings(config, layout, batch, width, num_pages, page_size, jnp.dtype(dtype) == jnp.int8)
    rep = NamedSharding(layout.mesh, P())
    rows_sh = jax.tree.map(lambda _: rep, jax.eval_shape(lambda: init_rows(batch)))
    return Programs(
        init_rows=jax.jit(functools.partial(init_rows, batch), out_shardings=rows_sh),
        set_pages=jax.jit(set_pages, donate_argnums=(0,), out_shardings=cache_sh),
        prefill=jax.jit(functools.partial(prefill_row, graphdef, layout=layout, kernel=kernel),
                        donate_argnums=(1,), out_shardings=(rep, cache_sh)),
        admit=jax.jit(admit, donate_argnums=(0,), out_shardings=rows_sh),
        decode=jax.jit(functools.partial(decode_burst, graphdef, layout=layout, kernel=kernel),
                       static_argnames=("steps",), donate_argnums=(1, 2), out_shardings=(cache_sh, rows_sh, rep)),
        verify=jax.jit(functools.partial(verify_step, graphdef, layout=layout, kernel=kernel),
                       donate_argnums=(1, 2), out_shardings=(cache_sh, rows_sh, rep)))


def update_pages(programs: Programs, cache: KVCache, updates: np.ndarray) -> KVCache:
    """Sets page-table entries updates [U, 3] (row, logical page, page), PAGE_UPDATES at a time."""
    batch = cache.pages.shape[0]
    for at in range(0, len(updates), PAGE_UPDATES):
        part = np.zeros((PAGE_UPDATES, 3), np.int32)
        part[:, 0] = batch                                                  # padding: dropped
        block = updates[at:at + PAGE_UPDATES]
        part[:len(block)] = block
        cache = programs.set_pages(cache, part[:, 0], part[:, 1], part[:, 2])
    return cache


def run_plan(programs: Programs, state, cache: KVCache, rows: Rows, plan: Plan) -> tuple[KVCache, Rows, jax.Array | None]:
    """A scheduler round on device: the plan's page-table entries, its prefill chunks in order
    (admitting a row after its prompt's last chunk), then its decode burst, or its verification
    step when it carries drafts. Returns the cache, the rows and the tokens (`decode_burst`; None
    without either)."""
    cache = update_pages(programs, cache, plan.pages)
    for chunk in plan.chunks:
        size = len(chunk.tokens)
        valid = (np.arange(size) >= size - chunk.real)[None]
        positions = np.where(valid, chunk.start - (size - chunk.real) + np.arange(size), 0).astype(np.int32)
        logits, cache = programs.prefill(state, cache, jnp.int32(chunk.row), chunk.tokens[None], positions, valid)
        if chunk.admit is not None:
            p = chunk.admit
            stops = np.full(MAX_STOP_IDS, -1, np.int32)
            stops[:len(p.stop_ids)] = p.stop_ids
            rows = programs.admit(rows, jnp.int32(chunk.row), logits, jnp.int32(chunk.start + chunk.real),
                                  jnp.int32(p.max_tokens - chunk.drawn), jnp.uint32(p.seed % 2**32),
                                  jnp.float32(p.temperature), jnp.int32(p.top_k), jnp.float32(p.top_p), stops,
                                  jnp.int32(chunk.drawn))
    if not len(plan.decode):
        return cache, rows, None
    if plan.drafts is not None:
        return programs.verify(state, cache, rows, plan.cancel, plan.decode, plan.drafts)
    return programs.decode(state, cache, rows, plan.cancel, plan.decode, steps=plan.steps)


def run_all(programs: Programs, state, cache: KVCache, rows: Rows, chunk_sizes, buckets,
            steps, draft_tokens: int = 0) -> tuple[KVCache, Rows, jax.Array]:
    """Runs every program on nothing (row B, which does not exist; no slot or page-table entry is
    written, no row changes), so that each compiles: a page-table update, a prefill of each chunk
    size, an admission, a decode burst of each row bucket (b < B: padding rows only; b = B: every
    row, none active) for each of `steps`, and a verification step of `draft_tokens` drafts per
    bucket when that is > 0. Returns the cache, the rows and the last burst's tokens."""
    batch = rows.active.shape[0]
    cache = update_pages(programs, cache, np.array([[batch, 0, 0]], np.int32))
    for size in chunk_sizes:
        zeros = np.zeros((1, size), np.int32)
        logits, cache = programs.prefill(state, cache, jnp.int32(batch), zeros, zeros, np.zeros((1, size), bool))
    rows = programs.admit(rows, jnp.int32(batch), logits, jnp.int32(0), jnp.int32(0), jnp.uint32(0), jnp.float32(0),
                          jnp.int32(0), jnp.float32(1), np.full(MAX_STOP_IDS, -1, np.int32), jnp.int32(0))
    for b in buckets:
        for n in steps:
            selected = np.arange(b, dtype=np.int32) if b == batch else np.full(b, batch, np.int32)
            cache, rows, tokens = programs.decode(state, cache, rows, np.zeros(batch, bool), selected, steps=n)
        if draft_tokens:
            cache, rows, tokens = programs.verify(state, cache, rows, np.zeros(batch, bool), selected,
                                                  np.full((b, draft_tokens), -1, np.int32))
    return cache, rows, tokens
