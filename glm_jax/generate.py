"""The decode engine: continuous batching over a fixed set of cache rows, shared by `generate`,
`chat` and the server.

The cache has `max_batch` rows of `length` slots; a request owns one row while it runs. Its prompt
is prefilled into that row alone (`model_step(rows=...)`), chunk by chunk between decode bursts, so
a long prompt holds the running rows up by one chunk at a time; then the row joins the batch. A
decode burst runs up to `steps_per_call` tokens of the active rows only (gathered into a
power-of-two bucket) on device, one host round trip, with per-row sampling parameters, keys, stop
ids and token budgets as arrays: mixed requests share one compiled step. A burst right after an
admission runs one step, so the new request's first token comes back at once. A finished row frees at once; its K/V stay, and a later prompt that extends
what the row holds (the next chat turn) prefills only the new tokens. Free rows are handed out by
longest shared prefix, else least recently used.

A token's slot is its position in its row (slot p holds position p). Stale slots past what a row
holds are never visible: a query at slot q sees only slots <= q, all written by its own request.
Compiled programs per cache shape: one prefill per chunk size, one admission, and a decode burst
per (row bucket, 1 or `steps_per_call` steps).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import GLMConfig
from .attention import PAD
from .kvcache import STRIPE, KVCache, cache_dtype, cache_shardings, init_cache, model_step, prefill_kernel
from .progress import Progress
from .sampling import MAX_STOP_IDS, sample
from .sharding import Layout


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


def admit(rows: Rows, row, logits, position, max_tokens, seed, temperature, top_k, top_p, stop_ids) -> Rows:
    """Rows with `row` starting to decode: its first token drawn from the prompt's last logits
    [1, V] (draw 0 of the row's key), and its parameters."""
    at = lambda x, value: x.at[row].set(value)
    key = jax.random.key(seed)
    token = sample(logits, jax.random.fold_in(key, 0)[None], temperature, top_k, top_p)[0]
    return Rows(token=at(rows.token, token), position=at(rows.position, position), active=at(rows.active, True),
                remaining=at(rows.remaining, max_tokens), count=at(rows.count, 0),
                key=at(rows.key, key), temperature=at(rows.temperature, temperature),
                top_k=at(rows.top_k, top_k), top_p=at(rows.top_p, top_p), stop_ids=at(rows.stop_ids, stop_ids))


def prefill_row(graphdef, params, cache: KVCache, row, tokens, positions, valid, *, layout: Layout,
                kernel: str = "auto") -> tuple[jax.Array, KVCache]:
    """One prefill chunk of row `row` (int32): tokens, positions, valid [1, C], written at slots =
    positions. Returns the last token's logits [1, V] and the cache. The row's slots from the
    chunk's first position on are emptied first: what an earlier request left there is never
    visible anyway, but the chunk's attention loop runs to the last filled slot."""
    start = jnp.where(valid, positions, PAD).min()
    mine = jnp.arange(cache.index.shape[0])[:, None] == row
    cache = dataclasses.replace(cache, index=jnp.where(mine & (cache.index >= start), PAD, cache.index))
    return model_step(graphdef, params, cache, tokens, positions, positions, valid, layout=layout, kernel=kernel,
                      rows=row[None])


def decode_burst(graphdef, params, cache: KVCache, rows: Rows, cancel, selected, *, steps: int, layout: Layout,
                 kernel: str = "auto") -> tuple[KVCache, Rows, jax.Array]:
    """Up to `steps` tokens for each active row among `selected` (int32 [b], cache rows; entries
    >= B pad the bucket; b = B means every row, in order), all on device; fewer once none is
    active. Only those b rows are computed. cancel [B] bool: rows to stop first. Returns the cache, the rows and tokens
    [b, steps] (-1 where a row drew nothing). A row stops after a stop id or its last allowed
    token; those final tokens are not fed back (their K/V are never needed). Each step emits the
    rows' drawn tokens, feeds them and draws the next from their logits: only tokens [b] carry
    over between steps and bursts, never the [b, V] logits."""
    batch = rows.active.shape[0]
    every = selected.shape[0] == batch     # then selected is 0..B-1 (see Engine._plan): no gathers
    rows = dataclasses.replace(rows, active=rows.active & ~cancel)
    sub = jax.tree.map(lambda x: x[jnp.minimum(selected, batch - 1)], rows)           # [b] of each field
    sub = dataclasses.replace(sub, active=sub.active & (selected < batch))
    out = jnp.full((selected.shape[0], steps), -1, jnp.int32)

    def cond(carry):
        i, _, sub, _ = carry
        return (i < steps) & jnp.any(sub.active)

    def body(carry):
        i, cache, sub, out = carry
        token, drawn = sub.token, sub.active                                             # [b] each
        stop = jnp.any(token[:, None] == sub.stop_ids, axis=-1) | (sub.remaining <= 1)
        feed = drawn & ~stop
        logits, cache = model_step(graphdef, params, cache, token[:, None], sub.position[:, None],
                                   sub.position[:, None], feed[:, None], layout=layout, kernel=kernel,
                                   rows=None if every else selected)
        count = sub.count + drawn
        keys = jax.vmap(jax.random.fold_in)(sub.key, count)
        following = sample(logits, keys, sub.temperature, sub.top_k, sub.top_p)           # [b]
        sub = dataclasses.replace(sub, token=jnp.where(feed, following, token), position=sub.position + feed,
                                  active=feed, count=count, remaining=sub.remaining - drawn)
        return i + 1, cache, sub, out.at[:, i].set(jnp.where(drawn, token, -1))

    _, cache, sub, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, sub, out))
    rows = jax.tree.map(lambda full, part: full.at[selected].set(part, mode="drop"), rows, sub)
    return cache, rows, out


def cache_length(needed: int, devices: int) -> int:
    """Cache-length bucket: at least 256 slots, then eight buckets per octave (a decode step reads
    the whole bucket, so at most 1/8 of what it reads is beyond the next power of two below);
    rounded so each of the `sequence` devices holds whole stripes."""
    step = 1 << max(0, (max(needed, 256) - 1).bit_length() - 4)
    length = -(-max(needed, 256) // step) * step
    grain = devices * (STRIPE if length // devices > STRIPE else 1)
    return -(-length // grain) * grain


MIN_CHUNK = 16  # the smallest prefill chunk (fewer shapes to compile; a few padded tokens cost little)


def prefill_chunks(tokens: int, chunk: int) -> list[int]:
    """Chunk sizes of a prefill of `tokens` tokens: whole `chunk`s, then one power-of-two chunk
    (at least MIN_CHUNK) for the rest (left-padded: its last token is the prompt's last), so
    padding stays under that rest and at most a few chunk shapes compile."""
    whole, rest = divmod(tokens, chunk)
    return [chunk] * whole + ([min(chunk, max(MIN_CHUNK, 1 << (rest - 1).bit_length()))] if rest else [])


def chunk_sizes(chunk: int) -> list[int]:
    """Every chunk size `prefill_chunks` can give."""
    return sorted({chunk} | {min(chunk, max(MIN_CHUNK, 1 << i)) for i in range(chunk.bit_length())})


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation parameters (temperature 0: greedy; top_k 0 / top_p 1: off)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()


class QueueFull(Exception):
    """The engine's queue of waiting requests is full: retry later."""


class EngineClosed(Exception):
    """The engine is shutting down: it takes no new requests."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_tokens: Callable[["Request", list[int]], None] | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    cached: int = 0                          # prompt tokens whose K/V were reused
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    ttft: float | None = None                # seconds from submit to the first token
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    prefilled: int = 0                       # prompt tokens in the row so far

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


@dataclasses.dataclass
class _Row:
    request: Request | None = None
    held: list[int] = dataclasses.field(default_factory=list)   # tokens whose K/V slots 0.. hold
    used: float = 0.0                                            # last use, for LRU eviction


@dataclasses.dataclass
class Chunk:
    """One prefill chunk of one row: tokens [size], left-padded; the real ones are the last `real`,
    at positions start, start+1, ...; `admit`: the row's parameters when this chunk ends its prompt."""
    row: int
    tokens: np.ndarray
    start: int
    real: int
    admit: SamplingParams | None


_CHUNK_HEAD = 10 + MAX_STOP_IDS   # row, size, start, real, admit?, max_tokens, seed, top_k, temperature, top_p, stops


@dataclasses.dataclass
class Plan:
    """One scheduler round, as every process runs it: rows to cancel [B], prefill chunks, then a
    burst of `steps` tokens for the rows in `decode` (cache rows [b], padded with B), if any."""
    cancel: np.ndarray
    chunks: list[Chunk]
    decode: np.ndarray
    steps: int = 0
    stop: bool = False

    @classmethod
    def stopping(cls, batch: int) -> "Plan":
        return cls(np.zeros(batch, bool), [], np.zeros(0, np.int32), stop=True)

    @staticmethod
    def encoded_size(batch: int, prefill_chunk: int) -> int:
        return 4 + 2 * batch + batch * (_CHUNK_HEAD + prefill_chunk)

    def encode(self, size: int) -> np.ndarray:
        out = np.zeros(size, np.int32)
        batch = len(self.cancel)
        out[:4] = self.stop, self.steps, len(self.chunks), len(self.decode)
        out[4:4 + batch] = self.cancel
        out[4 + batch:4 + batch + len(self.decode)] = self.decode
        at = 4 + 2 * batch
        as_int = lambda x: int(np.float32(x).view(np.int32))
        for c in self.chunks:
            p = c.admit or SamplingParams(0)
            stops = list(p.stop_ids) + [-1] * (MAX_STOP_IDS - len(p.stop_ids))
            head = [c.row, len(c.tokens), c.start, c.real, c.admit is not None, p.max_tokens,
                    int(np.uint32(p.seed % 2**32).view(np.int32)), p.top_k,
                    as_int(p.temperature), as_int(p.top_p), *stops]
            out[at:at + _CHUNK_HEAD] = head
            out[at + _CHUNK_HEAD:at + _CHUNK_HEAD + len(c.tokens)] = c.tokens
            at += _CHUNK_HEAD + len(c.tokens)
        return out

    @classmethod
    def decoded(cls, data: np.ndarray, batch: int) -> "Plan":
        as_float = lambda x: float(np.int32(x).view(np.float32))
        chunks, at = [], 4 + 2 * batch
        for _ in range(int(data[2])):
            row, size, start, real, admit, max_tokens, seed, top_k, temperature, top_p = map(int, data[at:at + 10])
            stops = tuple(int(t) for t in data[at + 10:at + _CHUNK_HEAD] if t >= 0)
            params = SamplingParams(max_tokens, as_float(temperature), as_float(top_p), top_k,
                                    int(np.int32(seed).view(np.uint32)), stops)
            chunks.append(Chunk(row, data[at + _CHUNK_HEAD:at + _CHUNK_HEAD + size].copy(), start, real,
                                params if admit else None))
            at += _CHUNK_HEAD + size
        decode = data[4 + batch:4 + batch + int(data[3])].copy()
        return cls(data[4:4 + batch].astype(bool), chunks, decode, steps=int(data[1]), stop=bool(data[0]))


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


class Engine:
    """Continuous batching over the rows of one sharded KV cache (see the module docstring).

    Host side: `submit` (thread-safe) queues a request; `step` runs one round (prefill up to
    `prefill_chunk` tokens of waiting requests, then one decode burst); `start` runs rounds on a
    thread, `shutdown` drains it. `generate` runs a batch to completion on the calling thread.
    serving: bursts of the active rows only, one step after an admission (latency; more programs:
    `warm_up` compiles them); False: every row, whole bursts (a batch's throughput, fewer programs)."""

    def __init__(self, config: GLMConfig, graphdef, state, layout: Layout, *, prefill_chunk: int = 512,
                 kernel: str = "auto", kv_cache_dtype: str | None = None, steps_per_call: int = 8,
                 max_queue: int | None = None, serving: bool = True):
        self.config, self.graphdef, self.state, self.layout = config, graphdef, state, layout
        self.prefill_chunk, self.steps_per_call, self.max_queue = prefill_chunk, steps_per_call, max_queue
        self.serving = serving
        self.dtype = jax.tree.leaves(state)[0].dtype
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        self.kernel = prefill_kernel(kernel, layout.mesh.devices.flat[0].platform)
        self.cache: KVCache | None = None
        self.rows: Rows | None = None
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._inbox: collections.deque[Request] = collections.deque()
        self._cancels: dict[int, tuple[Request, str]] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopping = False
        self.fixed = False
        self.max_model_len = 0                  # tokens a request may span (prompt + output)
        self.error: BaseException | None = None

    # -- compiled programs --------------------------------------------------------------------

    def _programs(self, batch: int, length: int):
        return _programs(self.config, self.graphdef, self.layout, self.kernel, batch, length, self.cache_dtype)

    def reserve(self, max_batch: int, max_model_len: int, *, fixed: bool = False) -> None:
        """Allocates the cache: `max_batch` rows of at least `max_model_len` slots (a bucket of
        `cache_length`). Keeps the current one, and the K/V it holds, when its shape is the same.
        fixed: `generate` keeps this cache (and the conversations it holds) instead of sizing one
        to each call."""
        self.fixed, self.max_model_len = fixed, max_model_len
        length = cache_length(max_model_len, self.layout.size("sequence"))
        if self.cache is not None and (len(self._rows), self.cache.length) == (max_batch, length):
            return
        if any(r.request for r in self._rows):
            raise RuntimeError("cannot resize the cache while requests run")
        self.cache = self.rows = None                                     # free the old one first
        self.cache = init_cache(self.config, self.layout, max_batch, length, self.cache_dtype)
        self.rows = self._programs(max_batch, length).init_rows()
        self._rows = [_Row() for _ in range(max_batch)]

    # -- requests -----------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the problem with a request (before it is queued)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the maximum model length {self.max_model_len}")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if len(params.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(params.stop_ids)}")

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_tokens: Callable[[Request, list[int]], None] | None = None) -> Request:
        """Queues a request (thread-safe). on_tokens(request, ids) is called on the engine's
        thread with each run of new tokens (a stop id included), and with [] when it ends.
        Raises ValueError for a bad request, QueueFull when `max_queue` requests wait,
        EngineClosed once `shutdown` began."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, params)
        request = Request(prompt, params, on_tokens)
        with self._wake:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if self.max_queue is not None and len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request, reason: str = "abort") -> None:
        """Ends a request (thread-safe); its row frees at the next step. reason: its finish_reason."""
        with self._wake:
            self._cancels[id(request)] = (request, reason)
            self._wake.notify()

    def forget(self) -> None:
        """Drops the K/V the free rows keep: the next prompts are prefilled whole."""
        for row in self._rows:
            if row.request is None:
                row.held = []

    def stats(self) -> dict:
        running = sum(r.request is not None for r in self._rows)
        return {"running": running, "waiting": len(self._waiting) + len(self._inbox), "max_batch": len(self._rows),
                "max_model_len": self.max_model_len}

    # -- the scheduler --------------------------------------------------------------------------

    def step(self) -> bool:
        """One round: admissions and cancellations, prefill up to `prefill_chunk` prompt tokens,
        one decode burst. Returns whether requests remain. With several processes, every process
        runs the round process 0 planned (see `follow`)."""
        plan = self._share(self._plan())
        tokens = self._execute(plan)
        if tokens is not None:
            self._collect(plan.decode, tokens)
        return bool(self._waiting) or any(r.request is not None for r in self._rows)

    def _plan(self) -> Plan:
        """The round's host decisions: rows to cancel, prefill chunks (the budget: `prefill_chunk`
        prompt tokens, at least one chunk), whether to decode."""
        with self._wake:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = list(self._cancels.values()), {}
        plan = Plan(cancel=np.zeros(len(self._rows), bool), chunks=[], decode=np.zeros(0, np.int32))
        for request, reason in cancels:
            if request.finish_reason is not None:
                continue
            if request in self._waiting:
                self._waiting.remove(request)
            for i, row in enumerate(self._rows):
                if row.request is request:
                    plan.cancel[i] = True
                    self._release(i)
            self._finish(request, reason)
        budget = self.prefill_chunk
        while budget > 0 and len(plan.chunks) < len(self._rows):
            pending = [i for i, r in enumerate(self._rows) if r.request is not None
                       and r.request.prefilled < r.request.prompt_len]
            if pending:
                i = pending[0]
            elif self._waiting and (i := self._assign(self._waiting[0])) is not None:
                self._waiting.popleft()
            else:
                break
            plan.chunks.append(self._next_chunk(i))
            budget -= len(plan.chunks[-1].tokens)
        decoding = [i for i, r in enumerate(self._rows) if r.request is not None
                    and r.request.prefilled == r.request.prompt_len]
        if (decoding or plan.cancel.any()) and self.serving:
            # the active rows only, in a power-of-two bucket; one token at first, so that a new
            # request's first token comes back after its prefill and a single step
            # (a full bucket takes every row in order: rows not decoding are inactive on device)
            bucket = min(1 << (max(len(decoding), 1) - 1).bit_length(), len(self._rows))
            pad = [len(self._rows)] * (bucket - len(decoding))
            plan.decode = np.array(range(bucket) if bucket == len(self._rows) else decoding + pad, np.int32)
            fresh = any(not self._rows[i].request.output for i in decoding)
            plan.steps = 1 if fresh else self.steps_per_call
        elif decoding or plan.cancel.any():  # a batch: every row, whole bursts (fewer programs to compile)
            plan.decode, plan.steps = np.arange(len(self._rows), dtype=np.int32), self.steps_per_call
        return plan

    def _assign(self, request: Request) -> int | None:
        """A free row for the request: the one holding the longest prefix of its prompt, else the
        least recently used; marks the reused prefix as prefilled."""
        free = [i for i, r in enumerate(self._rows) if r.request is None]
        if not free:
            return None
        shared = {i: min(_shared_prefix(self._rows[i].held, request.prompt), request.prompt_len - 1) for i in free}
        i = max(free, key=lambda i: (shared[i], -self._rows[i].used))
        row = self._rows[i]
        row.request, row.held = request, row.held[:shared[i]]
        request.cached = request.prefilled = shared[i]
        return i

    def _next_chunk(self, i: int) -> Chunk:
        """The next prefill chunk of row i's prompt; with the row's admission after the last one."""
        request = self._rows[i].request
        start = request.prefilled
        size = prefill_chunks(request.prompt_len - start, self.prefill_chunk)[0]
        n = min(size, request.prompt_len - start)                       # real tokens; the rest is left padding
        tokens = np.zeros(size, np.int32)
        tokens[size - n:] = request.prompt[start:start + n]
        request.prefilled = start + n
        self._rows[i].held += request.prompt[start:start + n]
        return Chunk(i, tokens, start, n, request.params if request.prefilled == request.prompt_len else None)

    def _execute(self, plan: Plan) -> np.ndarray | None:
        """Runs a plan's device programs (on every process alike); the burst's tokens [B, steps]."""
        programs = self._programs(len(self._rows), self.cache.length)
        for chunk in plan.chunks:
            size = len(chunk.tokens)
            valid = (np.arange(size) >= size - chunk.real)[None]
            positions = np.where(valid, chunk.start - (size - chunk.real) + np.arange(size), 0).astype(np.int32)
            logits, self.cache = programs.prefill(self.state, self.cache, jnp.int32(chunk.row), chunk.tokens[None],
                                                  positions, valid)
            if chunk.admit is not None:
                p = chunk.admit
                stops = np.full(MAX_STOP_IDS, -1, np.int32)
                stops[:len(p.stop_ids)] = p.stop_ids
                self.rows = programs.admit(self.rows, jnp.int32(chunk.row), logits, jnp.int32(chunk.start + chunk.real),
                                           jnp.int32(p.max_tokens), jnp.uint32(p.seed % 2**32),
                                           jnp.float32(p.temperature), jnp.int32(p.top_k), jnp.float32(p.top_p), stops)
        if not len(plan.decode):
            return None
        self.cache, self.rows, tokens = programs.decode(self.state, self.cache, self.rows, plan.cancel, plan.decode,
                                                        steps=plan.steps)
        return to_host(tokens)                                            # the round's one sync

    def _collect(self, selected: np.ndarray, tokens: np.ndarray) -> None:
        """Hands a burst's tokens [b, steps] (-1: none) of rows `selected` [b] to their requests;
        ends finished ones."""
        now = time.perf_counter()
        for i, row_tokens in zip(selected, tokens):
            row = self._rows[i] if i < len(self._rows) else None
            request = row and row.request
            if request is None:
                continue
            new = [int(t) for t in row_tokens if t >= 0]
            if not new:
                continue
            if request.ttft is None:
                request.ttft = now - request.submitted
            request.output += new
            stopped = new[-1] in request.params.stop_ids
            ended = stopped or len(request.output) >= request.params.max_tokens
            row.held += new[:-1] if ended else new                        # the final token is never fed
            if request.on_tokens is not None:
                request.on_tokens(request, new)
            if ended:
                self._release(i)
                self._finish(request, "stop" if stopped else "length")

    # -- several processes ----------------------------------------------------------------------

    def _share(self, plan: Plan | None) -> Plan:
        """Process 0's plan, on every process (a fixed-size int32 broadcast); `plan` itself when
        there is one process."""
        if jax.process_count() == 1:
            return plan
        from jax.experimental import multihost_utils

        size = Plan.encoded_size(len(self._rows), self.prefill_chunk)
        local = plan.encode(size) if plan is not None and jax.process_index() == 0 else np.zeros(size, np.int32)
        return Plan.decoded(np.asarray(multihost_utils.broadcast_one_to_all(local)), len(self._rows))

    def follow(self) -> None:
        """On processes other than 0 of a multi-process server: runs every round process 0 plans
        (same programs, same order) until it shuts down. They take no requests themselves."""
        while not (plan := self._share(None)).stop:
            self._execute(plan)

    def _release(self, i: int) -> None:
        self._rows[i].request, self._rows[i].used = None, time.perf_counter()

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.on_tokens is not None:
            request.on_tokens(request, [])
        request.done.set()

    # -- running ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compiles every program a request can need (each prefill chunk size, each decode bucket
        for one and for `steps_per_call` steps) by running them on nothing: no slot is written and
        no row changes. A server calls it before it listens (every process alike), so no request
        waits for a compile."""
        batch = len(self._rows)
        programs = self._programs(batch, self.cache.length)
        if any(r.request for r in self._rows):
            raise RuntimeError("warm_up() runs before any request")
        for size in chunk_sizes(self.prefill_chunk):
            zeros = np.zeros((1, size), np.int32)
            logits, self.cache = programs.prefill(self.state, self.cache, jnp.int32(batch), zeros, zeros,
                                                  np.zeros((1, size), bool))
        self.rows = programs.admit(self.rows, jnp.int32(batch), logits, jnp.int32(0), jnp.int32(0), jnp.uint32(0),
                                   jnp.float32(0), jnp.int32(0), jnp.float32(1), np.full(MAX_STOP_IDS, -1, np.int32))
        buckets = sorted({min(1 << i, batch) for i in range(batch.bit_length() + 1)}) if self.serving else [batch]
        for b in buckets:
            for steps in sorted({1, self.steps_per_call}) if self.serving else [self.steps_per_call]:
                selected = np.arange(b, dtype=np.int32) if b == batch else np.full(b, batch, np.int32)
                self.cache, self.rows, tokens = programs.decode(self.state, self.cache, self.rows,
                                                                np.zeros(batch, bool), selected, steps=steps)
        to_host(tokens)

    def start(self) -> None:
        """Runs rounds on a daemon thread until `shutdown`."""
        if self.cache is None:
            raise RuntimeError("reserve() the cache before start()")
        self._thread = threading.Thread(target=self._loop, name="glm-jax-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.step():  # idle: wait for work (other processes get an empty round each 0.5 s)
                    with self._wake:
                        if not self._inbox and not self._cancels and not self._stopping:
                            self._wake.wait(0.5)
            if jax.process_count() > 1:
                self._share(Plan.stopping(len(self._rows)))
        except BaseException as e:  # noqa: BLE001 - ends every request, then surfaces in `error`
            self.error = e
            for request in [r.request for r in self._rows if r.request] + list(self._waiting) + list(self._inbox):
                if request.finish_reason is None:
                    self._finish(request, "abort")
            raise

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops admitting; waits up to `timeout` s for queued and running requests, aborts the rest."""
        with self._wake:
            self._closing = True
        deadline = time.monotonic() + timeout
        while self._thread and self._thread.is_alive() and time.monotonic() < deadline:
            if not (self._inbox or self._waiting or any(r.request for r in self._rows)):
                break
            time.sleep(0.02)
        for request in [r.request for r in self._rows if r.request] + list(self._waiting) + list(self._inbox):
            self.cancel(request)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int, int], None] | None = None, progress: bool = False,
                 reuse: bool = True) -> list[list[int]]:
        """New tokens of each prompt (ending with the stop id when one was produced), run to
        completion here. Prompt i samples with seed `seed + i`. on_token(i, id) streams. reuse:
        False prefills every prompt whole (see `forget`; benchmarks of prefill want that). The
        cache is sized to the call unless `reserve(fixed=True)` fixed it."""
        if not self.fixed:
            self.reserve(1 << (len(prompts) - 1).bit_length(), max(map(len, prompts)) + max_new_tokens)
        if not reuse:
            self.forget()
        rows = {}
        emit = None if on_token is None else (lambda r, ids: [on_token(rows[id(r)], t) for t in ids])
        requests = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed + i, tuple(stop_ids))
            requests.append(self.submit(p, params, emit))
            rows[id(requests[-1])] = i
        total = sum(map(len, prompts))
        with Progress("prefill", total, unit="tok", scale=1, enabled=progress) as bar:
            while self.step():
                bar.update(sum(r.prefilled for r in requests) - bar.done)
        return [r.output for r in requests]


@dataclasses.dataclass(frozen=True)
class _Compiled:
    init_rows: Callable
    prefill: Callable
    admit: Callable
    decode: Callable


@functools.lru_cache(maxsize=16)
def _programs(config: GLMConfig, graphdef, layout: Layout, kernel: str, batch: int, length: int, dtype) -> _Compiled:
    """The engine's compiled programs for one cache shape; the cache and rows keep fixed shardings
    (replicated rows), so every call after the first reuses the same executable."""
    cache_sh = cache_shardings(config, layout, batch, length, jnp.dtype(dtype) == jnp.int8)
    rep = NamedSharding(layout.mesh, P())
    rows_sh = jax.tree.map(lambda _: rep, jax.eval_shape(lambda: init_rows(batch)))
    return _Compiled(
        init_rows=jax.jit(functools.partial(init_rows, batch), out_shardings=rows_sh),
        prefill=jax.jit(functools.partial(prefill_row, graphdef, layout=layout, kernel=kernel),
                        donate_argnums=(1,), out_shardings=(rep, cache_sh)),
        admit=jax.jit(admit, donate_argnums=(0,), out_shardings=rows_sh),
        decode=jax.jit(functools.partial(decode_burst, graphdef, layout=layout, kernel=kernel),
                       static_argnames=("steps",), donate_argnums=(1, 2), out_shardings=(cache_sh, rows_sh, rep)))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this process, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
