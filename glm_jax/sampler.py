"""Compiled generation: a preallocated KV cache, chunked prefill and an on-device decode loop.

The cache holds, per layer, K and V [batch, slots, kv_heads, dim] in the weights' dtype ([batch,
kv_heads, slots, dim] when a device holds one KV head, see `cache_order`), plus one
index [batch, slots] (the slot's token index, PAD while empty or for left padding). It is sharded
by the logical rules: batch on data/fsdp, slots on `sequence`, KV heads on `tensor`. Writes and
attention run inside shard_map: every device writes the slots it owns and attends over its own
part of the cache; the partial results merge by a log-sum-exp reduction across `sequence`
(pmax + psum of a [batch, heads, queries, dim] state), so no KV moves per token.

Slots are striped over the `sequence` devices (512 at a time, round robin), so any prefix of the
sequence is spread evenly and every device has its share of the work at every prefill chunk and
decode step. Prompts are left-padded to a multiple of the prefill chunk; the prompt occupies slots [0, P) and
decoding continues at slot P. A prompt's RoPE positions start at 0 at its first real token.
Compiled programs: the prefill step once per (batch bucket, chunk, cache bucket), the decode loop
once per (batch bucket, cache bucket); the cache is donated between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .attention import PAD, group_queries, init_state, normalized, tiles_forward, ungroup
from .config import GLMConfig
from .progress import Progress
from .ring import tile_sizes
from .sharding import Layout

MAX_STOP_IDS = 8


@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]   # per layer, dims in `order`: [B, S, G, D] or [B, G, S, D]
    v: tuple[jax.Array, ...]
    index: jax.Array           # [B, S] int32: token index of each slot, PAD if none
    order: str = "bsgd"        # static: the dim order of k and v

    @property
    def length(self) -> int:
        return self.index.shape[1]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "index"], meta_fields=["order"])

_CACHE_AXES = {"b": "batch", "s": "cache_seq", "g": "kv_heads", "d": "head_dim"}


def cache_heads(config: GLMConfig, layout: Layout) -> int:
    return config.num_kv_heads * layout.kv_repeat(config.num_kv_heads, config.num_heads)


def cache_order(layout: Layout, heads: int) -> str:
    """[B, S, G, D] normally; [B, G, S, D] when a device holds a single KV head, so that the slot
    dim, not a size-1 head dim, sits next to the minor one (else TPU layout assignment pads or
    copies the whole cache inside the decode loop)."""
    shards = math.prod(layout.size(a) for a in layout.mesh_axes("kv_heads", heads))
    return "bgsd" if heads // shards == 1 else "bsgd"


def _spec(layout: Layout, order: str, shape) -> P:
    return layout.spec([_CACHE_AXES[c] for c in order], shape)


def cache_shapes(config: GLMConfig, layout: Layout, batch: int, length: int) -> tuple[tuple[int, ...], str]:
    """(shape of each K/V array, its dim order)."""
    heads = cache_heads(config, layout)
    order = cache_order(layout, heads)
    dims = {"b": batch, "s": length, "g": heads, "d": config.head_dim}
    return tuple(dims[c] for c in order), order


def cache_shardings(config: GLMConfig, layout: Layout, batch: int, length: int) -> KVCache:
    shape, order = cache_shapes(config, layout, batch, length)
    kv = NamedSharding(layout.mesh, _spec(layout, order, shape))
    idx = NamedSharding(layout.mesh, _spec(layout, "bs", (batch, length)))
    return KVCache(k=(kv,) * config.num_layers, v=(kv,) * config.num_layers, index=idx, order=order)


def init_cache(config: GLMConfig, layout: Layout, batch: int, length: int, dtype) -> KVCache:
    """An empty cache, created directly in its sharded layout."""
    shape, order = cache_shapes(config, layout, batch, length)

    def make():
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return KVCache(k=zeros(), v=zeros(), index=jnp.full((batch, length), PAD, jnp.int32), order=order)

    return jax.jit(make, out_shardings=cache_shardings(config, layout, batch, length))()


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


def cache_ops(layout: Layout, order: str, *, axis: str = "sequence", block: int = 512):
    """(write, attend) on the sharded cache, both shard_mapped over the mesh. `order`: the K/V
    dim order ("bsgd" or "bgsd").

    write(cache_part, values, slots) -> cache_part with the slots set: K/V take values [B,C,G,D]
    (as the model makes them), the index [B,S] takes [B,C].
    attend(q [B,C,Hq,D], q_index [B,C], k, v, k_index [B,S]) -> [B,C,Hq,D].
    """
    n = layout.size(axis)
    seq, heads_dim = order.index("s"), order.index("g")

    def write(cache_part, values, slots):
        if cache_part.ndim == 4:
            spec, at = _spec(layout, order, cache_part.shape), seq
            values = jnp.einsum(f"bsgd->{order}", values)
        else:
            spec, at = _spec(layout, "bs", cache_part.shape), 1
        value_spec = P(*(None if i == at else a for i, a in enumerate(spec)))

        def local(part, vals, slots):
            where = (slice(None),) * at + (_local_slots(slots, part.shape[at], axis),)
            return part.at[where].set(vals, mode="drop")

        return jax.shard_map(local, mesh=layout.mesh, in_specs=(spec, value_spec, P()),
                             out_specs=spec, check_vma=False)(cache_part, values, slots)

    def attend(q, q_index, k, v, k_index):
        b, c, hq, d = q.shape
        g, s = k.shape[heads_dim], k.shape[seq]
        kv_spec = list(_spec(layout, order, k.shape))
        if layout.mesh_axes("q_heads", hq) != layout.mesh_axes("kv_heads", g):
            kv_spec[heads_dim] = None                       # heads not split alike: keep them whole
        kv_spec = P(*kv_spec)
        q_spec = P(kv_spec[0], None, kv_spec[heads_dim], None)
        idx_spec = P(kv_spec[0], kv_spec[seq])
        bq, bk = tile_sizes(c, block, block)[0], tile_sizes(s // n, block, block)[1]

        def local(q, qi, k, v, ki):
            qg = group_queries(q, k.shape[heads_dim])
            state = tiles_forward(init_state(*qg.shape[:2], *qg.shape[2:]), qg, k, v, qi, ki, causal=True,
                                  block_q=bq, block_k=bk, kv_layout=order)
            if n > 1:  # log-sum-exp merge of the partial states across the sequence axis
                m = jax.lax.pmax(state.m, axis)
                m_safe = jnp.where(m == -jnp.inf, 0.0, m)
                scale = jnp.exp(state.m - m_safe)
                state = dataclasses.replace(state, m=m, l=jax.lax.psum(state.l * scale, axis),
                                            acc=jax.lax.psum(state.acc * scale[..., None], axis))
            return ungroup(normalized(state), q.dtype)

        return jax.shard_map(local, mesh=layout.mesh, in_specs=(q_spec, P(kv_spec[0], None), kv_spec, kv_spec,
                                                                 idx_spec),
                             out_specs=q_spec, check_vma=False)(q, q_index, k, v, k_index)

    return write, attend


def model_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: jax.Array,
               positions: jax.Array, slots: jax.Array, valid: jax.Array, *, layout: Layout,
               last_only: bool = True) -> tuple[jax.Array, KVCache]:
    """Runs tokens [B, C] at cache slots [C] (valid [B, C] False for left padding), writing their
    K/V; returns float32 logits ([B, V] with last_only, else [B, C, V]) and the new cache."""
    model = nnx.merge(graphdef, state)
    write, attend = cache_ops(layout, cache.order)
    q_index = jnp.where(valid, slots[None], -1)
    index = write(cache.index, jnp.where(valid, slots[None], PAD), slots)
    ks, vs = list(cache.k), list(cache.v)

    def attend_layer(i, q, k, v):
        ks[i], vs[i] = write(ks[i], k.astype(ks[i].dtype), slots), write(vs[i], v.astype(vs[i].dtype), slots)
        return attend(q, q_index, ks[i], vs[i], index)

    logits = model(tokens, positions, attend_layer, layout=layout, last_only=last_only).astype(jnp.float32)
    return (logits[:, -1] if last_only else logits), KVCache(tuple(ks), tuple(vs), index, cache.order)


# -- sampling ---------------------------------------------------------------------------------

def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]. temperature 0: greedy. top_k 0 / top_p 1: off.
    All parameters are traced scalars: changing them never recompiles."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        x = logits / temperature
        desc = -jnp.sort(-x, axis=-1)                                            # [B, V] descending
        v = x.shape[-1]
        kth = jnp.take(desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
        cut = jnp.where(top_k > 0, kth, -jnp.inf)
        desc = jnp.where(desc < cut, -jnp.inf, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                              # mass above each token
        kept = jnp.where(before < top_p, desc, jnp.inf).min(axis=-1, keepdims=True)  # smallest kept logit
        x = jnp.where((x < cut) | (x < kept), -jnp.inf, x)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, draw, None)


@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array      # [B, V] float32: the distribution of the next token
    tokens: jax.Array      # [B, N] int32: generated so far
    positions: jax.Array   # [B] int32: RoPE position of the next token
    step: jax.Array        # int32: tokens generated
    done: jax.Array        # [B] bool: produced a stop id


jax.tree_util.register_dataclass(DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)],
                                 meta_fields=[])


def decode_loop(graphdef, params, st: DecodeState, prompt_slots, stop_at, key, temperature, top_k, top_p,
                stop_ids, pad_id, *, layout: Layout) -> DecodeState:
    """Generates until `stop_at` tokens or every row has produced a stop id, all on device."""

    def cond(st):
        return (st.step < stop_at) & ~jnp.all(st.done)

    def body(st):
        token = sample(st.logits, jax.random.fold_in(key, st.step), temperature, top_k, top_p)
        token = jnp.where(st.done, pad_id, token)
        done = st.done | jnp.isin(token, stop_ids)
        slot = prompt_slots + st.step
        logits, cache = model_step(graphdef, params, st.cache, token[:, None], st.positions[:, None],
                                   slot[None], jnp.ones_like(token[:, None], bool), layout=layout)
        return DecodeState(cache=cache, logits=logits, tokens=st.tokens.at[:, st.step].set(token),
                           positions=st.positions + 1, step=st.step + 1, done=done)

    return jax.lax.while_loop(cond, body, st)


def cache_length(needed: int, devices: int, unit: int = 65536) -> int:
    """Cache-length bucket: the next power of two (at least 256) up to 64K, then multiples of 64K;
    rounded so each of the `sequence` devices holds whole stripes."""
    length = max(256, 1 << (needed - 1).bit_length()) if needed <= unit else -(-needed // unit) * unit
    grain = devices * (STRIPE if length // devices > STRIPE else 1)
    return -(-length // grain) * grain


class Generator:
    """Owns the compiled prefill and decode programs of one model on one layout."""

    def __init__(self, config: GLMConfig, graphdef, state, layout: Layout, *, prefill_chunk: int = 512):
        self.config, self.graphdef, self.state, self.layout = config, graphdef, state, layout
        self.prefill_chunk = prefill_chunk
        self.dtype = jax.tree.leaves(state)[0].dtype
        self._prefill = jax.jit(functools.partial(model_step, graphdef, layout=layout), donate_argnums=(1,))
        self._decode = jax.jit(functools.partial(decode_loop, graphdef, layout=layout), donate_argnums=(1,))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (),
                 pad_id: int = 0, on_token: Callable[[int, int], None] | None = None,
                 progress: bool = False) -> list[list[int]]:
        c = self.config
        lengths = [len(p) for p in prompts]
        batch = 1 << (len(prompts) - 1).bit_length()                    # batch bucket
        longest = max(lengths)
        chunk = min(self.prefill_chunk, 1 << (longest - 1).bit_length())
        prompt_len = -(-longest // chunk) * chunk                         # slots of the prompt
        length = cache_length(prompt_len + max_new_tokens, self.layout.size("sequence"))
        tokens = np.zeros((batch, prompt_len), np.int32)
        valid = np.zeros((batch, prompt_len), bool)
        for row in range(batch):
            p = prompts[row] if row < len(prompts) else prompts[0]       # filler rows repeat row 0
            tokens[row, prompt_len - len(p):] = p
            valid[row, prompt_len - len(p):] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        cache = init_cache(c, self.layout, batch, length, self.dtype)
        with Progress("prefill", prompt_len, unit="tok", scale=1, enabled=progress) as bar:
            for start in range(0, prompt_len, chunk):
                part = slice(start, start + chunk)
                logits, cache = self._prefill(self.state, cache, tokens[:, part], positions[:, part],
                                              np.arange(start, start + chunk, dtype=np.int32), valid[:, part])
                bar.update(chunk)
        stops = np.full(MAX_STOP_IDS, -1, np.int32)
        stops[:len(stop_ids)] = list(stop_ids)[:MAX_STOP_IDS]
        st = DecodeState(cache=cache, logits=logits, tokens=jnp.zeros((batch, length), jnp.int32),
                         positions=jnp.asarray(positions[:, -1] + 1), step=jnp.int32(0),
                         done=jnp.zeros(batch, bool))
        args = (jnp.int32(prompt_len), jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
                jnp.float32(top_p), jnp.asarray(stops), jnp.int32(pad_id))
        if on_token is None:
            st = self._decode(self.state, st, args[0], jnp.int32(max_new_tokens), *args[1:])
        else:  # stream: the same compiled loop, stopped after every token
            finished = np.zeros(len(prompts), bool)
            for step in range(max_new_tokens):
                st = self._decode(self.state, st, args[0], jnp.int32(step + 1), *args[1:])
                if int(to_host(st.step)) <= step:
                    break
                token = to_host(st.tokens[:, step])[: len(prompts)]      # one column, not the buffer
                for row in np.flatnonzero(~finished):
                    on_token(int(row), int(token[row]))
                finished |= np.isin(token, stops[stops >= 0])
        out = to_host(st.tokens)[:, : int(to_host(st.step))]
        return [_until_stop(out[row], stops) for row in range(len(prompts))]


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this process, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _until_stop(tokens: np.ndarray, stops: np.ndarray) -> list[int]:
    """Tokens up to and including the first stop id."""
    hits = np.flatnonzero(np.isin(tokens, stops[stops >= 0]))
    return tokens[: hits[0] + 1].tolist() if hits.size else tokens.tolist()
