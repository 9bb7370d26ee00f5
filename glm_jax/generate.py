"""Compiled generation: chunked prefill into a preallocated cache and an on-device decode loop.

Prompts are left-padded to a multiple of the prefill chunk; the prompt occupies slots [0, P) and
decoding continues at slot P. A prompt's RoPE positions start at 0 at its first real token.
Compiled programs: the prefill step once per (batch bucket, chunk, cache bucket), the decode loop
once per (batch bucket, cache bucket); the cache is donated between calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import GLMConfig
from .kvcache import STRIPE, KVCache, cache_dtype, init_cache, model_step, prefill_kernel
from .progress import Progress
from .sampling import MAX_STOP_IDS, sample
from .sharding import Layout


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
                stop_ids, pad_id, *, layout: Layout, kernel: str = "auto") -> DecodeState:
    """Generates until `stop_at` tokens or every row has produced a stop id, all on device."""

    def cond(st):
        return (st.step < stop_at) & ~jnp.all(st.done)

    def body(st):
        token = sample(st.logits, jax.random.fold_in(key, st.step), temperature, top_k, top_p)
        token = jnp.where(st.done, pad_id, token)
        done = st.done | jnp.isin(token, stop_ids)
        slot = prompt_slots + st.step
        logits, cache = model_step(graphdef, params, st.cache, token[:, None], st.positions[:, None],
                                   slot[None], jnp.ones_like(token[:, None], bool), layout=layout, kernel=kernel)
        return DecodeState(cache=cache, logits=logits, tokens=st.tokens.at[:, st.step].set(token),
                           positions=st.positions + 1, step=st.step + 1, done=done)

    return jax.lax.while_loop(cond, body, st)


def cache_length(needed: int, devices: int) -> int:
    """Cache-length bucket: at least 256 slots, then eight buckets per octave (a decode step reads
    the whole bucket, so at most 1/8 of what it reads is beyond the next power of two below);
    rounded so each of the `sequence` devices holds whole stripes."""
    step = 1 << max(0, (max(needed, 256) - 1).bit_length() - 4)
    length = -(-max(needed, 256) // step) * step
    grain = devices * (STRIPE if length // devices > STRIPE else 1)
    return -(-length // grain) * grain


def prefill_chunks(longest: int, chunk: int) -> list[int]:
    """Chunk sizes of a prefill of `longest` tokens (left-padded): whole `chunk`s, led by one
    power-of-two chunk for the rest, so padding stays under that rest (at most two compiled chunk
    shapes) instead of up to a whole chunk."""
    whole, rest = divmod(longest, chunk)
    head = [1 << (rest - 1).bit_length()] if rest else []
    return head + [chunk] * whole


class Generator:
    """Owns the compiled prefill and decode programs of one model on one layout."""

    def __init__(self, config: GLMConfig, graphdef, state, layout: Layout, *, prefill_chunk: int = 512,
                 kernel: str = "auto", kv_cache_dtype: str | None = None):
        self.config, self.graphdef, self.state, self.layout = config, graphdef, state, layout
        self.prefill_chunk = prefill_chunk
        self.dtype = jax.tree.leaves(state)[0].dtype
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        self.kernel = prefill_kernel(kernel, layout.mesh.devices.flat[0].platform)
        self._prefill = jax.jit(functools.partial(model_step, graphdef, layout=layout, kernel=kernel),
                                donate_argnums=(1,))
        self._decode = jax.jit(functools.partial(decode_loop, graphdef, layout=layout, kernel=kernel),
                               donate_argnums=(1,))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (),
                 pad_id: int = 0, on_token: Callable[[int, int], None] | None = None,
                 progress: bool = False) -> list[list[int]]:
        c = self.config
        lengths = [len(p) for p in prompts]
        batch = 1 << (len(prompts) - 1).bit_length()                    # batch bucket
        longest = max(lengths)
        chunks = prefill_chunks(longest, self.prefill_chunk)
        prompt_len = sum(chunks)                                          # slots of the prompt
        length = cache_length(prompt_len + max_new_tokens, self.layout.size("sequence"))
        tokens = np.zeros((batch, prompt_len), np.int32)
        valid = np.zeros((batch, prompt_len), bool)
        for row in range(batch):
            p = prompts[row] if row < len(prompts) else prompts[0]       # filler rows repeat row 0, start done
            tokens[row, prompt_len - len(p):] = p
            valid[row, prompt_len - len(p):] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        cache = init_cache(c, self.layout, batch, length, self.cache_dtype)
        with Progress("prefill", prompt_len, unit="tok", scale=1, enabled=progress) as bar:
            for start, chunk in zip(np.cumsum([0, *chunks[:-1]]), chunks):
                part = slice(start, start + chunk)
                logits, cache = self._prefill(self.state, cache, tokens[:, part], positions[:, part],
                                              np.arange(start, start + chunk, dtype=np.int32), valid[:, part])
                bar.update(chunk)
        stops = np.full(MAX_STOP_IDS, -1, np.int32)
        stops[:len(stop_ids)] = list(stop_ids)[:MAX_STOP_IDS]
        st = DecodeState(cache=cache, logits=logits, tokens=jnp.zeros((batch, length), jnp.int32),
                         positions=jnp.asarray(positions[:, -1] + 1), step=jnp.int32(0),
                         done=jnp.asarray(np.arange(batch) >= len(prompts)))
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
