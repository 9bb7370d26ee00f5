"""The decode engine: continuous batching over a fixed set of cache rows, shared by `generate`,
`chat` and the server.

The cache has `max_batch` rows of `length` slots; a request owns one row while it runs. Its prompt
is prefilled into that row alone (`model_step(rows=...)`), chunk by chunk between decode bursts, so
a long prompt holds the running rows up by one chunk at a time; then the row joins the batch. A
decode burst runs up to `steps_per_call` tokens of the active rows only (gathered into a
power-of-two bucket) on device, one host round trip, with per-row sampling parameters, keys, stop
ids and token budgets as arrays: mixed requests share one compiled step. A burst right after an
admission runs one step, so the new request's first token comes back at once. A finished row
frees at once; its K/V stay, and a later prompt that extends what the row holds (the next chat
turn) prefills only the new tokens. Free rows are handed out by
longest shared prefix, else least recently used.

A token's slot is its position in its row (slot p holds position p). Stale slots past what a row
holds are never visible: a query at slot q sees only slots <= q, all written by its own request.
Compiled programs per cache shape: one prefill per chunk size, one admission, and a decode burst
per (row bucket, 1 or `steps_per_call` steps).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from ..config import GLMConfig
from ..options import DEFAULT_KERNEL, PREFILL_CHUNK, SHUTDOWN_TIMEOUT, STEPS_PER_CALL
from ..progress import Progress
from ..sharding import Layout
from .buckets import cache_length, chunk_sizes, decode_bucket, decode_buckets, prefill_chunks
from .cache import KVCache, cache_dtype, init_cache, resolve_kernel
from .multihost import Chunk, Plan, follow, share, to_host
from .programs import Programs, Rows, programs_for, run_all, run_plan
from .requests import EngineClosed, QueueFull, Request, SamplingParams

IDLE_WAIT = 0.5     # seconds an idle engine thread sleeps between rounds (others get an empty round)
DRAIN_POLL = 0.02   # seconds between checks of a draining engine


@dataclasses.dataclass
class _Row:
    request: Request | None = None
    held: list[int] = dataclasses.field(default_factory=list)   # tokens whose K/V slots 0.. hold
    used: float = 0.0                                            # last use, for LRU eviction


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

    def __init__(self, config: GLMConfig, graphdef, state, layout: Layout, *, prefill_chunk: int = PREFILL_CHUNK,
                 kernel: str = DEFAULT_KERNEL, kv_cache_dtype: str | None = None,
                 steps_per_call: int = STEPS_PER_CALL, max_queue: int | None = None, serving: bool = True):
        self.config, self.graphdef, self.state, self.layout = config, graphdef, state, layout
        self.prefill_chunk, self.steps_per_call, self.max_queue = prefill_chunk, steps_per_call, max_queue
        self.serving = serving
        self.dtype = jax.tree.leaves(state)[0].dtype
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        self.kernel = resolve_kernel(kernel, layout.mesh.devices.flat[0].platform)
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

    def _programs(self, batch: int, length: int) -> Programs:
        return programs_for(self.config, self.graphdef, self.layout, self.kernel, batch, length, self.cache_dtype)

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
        """Raises ValueError naming the problem with a request (before it is queued); the sampling
        parameters checked themselves (`SamplingParams`)."""
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
        plan = share(self._plan(), len(self._rows), self.prefill_chunk)
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
            bucket = decode_bucket(len(decoding), len(self._rows))
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
        """Runs a plan's device programs (on every process alike); the burst's tokens [b, steps]."""
        programs = self._programs(len(self._rows), self.cache.length)
        self.cache, self.rows, tokens = run_plan(programs, self.state, self.cache, self.rows, plan)
        return None if tokens is None else to_host(tokens)              # the round's one sync

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

    def follow(self) -> None:
        """On processes other than 0 of a multi-process server: runs every round process 0 plans
        (same programs, same order) until it shuts down. They take no requests themselves."""
        follow(self._execute, len(self._rows), self.prefill_chunk)

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
        if any(r.request for r in self._rows):
            raise RuntimeError("warm_up() runs before any request")
        batch = len(self._rows)
        buckets = decode_buckets(batch) if self.serving else [batch]
        steps = sorted({1, self.steps_per_call}) if self.serving else [self.steps_per_call]
        self.cache, self.rows, tokens = run_all(self._programs(batch, self.cache.length), self.state, self.cache,
                                                self.rows, chunk_sizes(self.prefill_chunk), buckets, steps)
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
                if not self.step():  # idle: wait for work (other processes get an empty round each IDLE_WAIT)
                    with self._wake:
                        if not self._inbox and not self._cancels and not self._stopping:
                            self._wake.wait(IDLE_WAIT)
            if jax.process_count() > 1:
                share(Plan.stopping(len(self._rows)), len(self._rows), self.prefill_chunk)
        except BaseException as e:  # noqa: BLE001 - ends every request, then surfaces in `error`
            self.error = e
            for request in [r.request for r in self._rows if r.request] + list(self._waiting) + list(self._inbox):
                if request.finish_reason is None:
                    self._finish(request, "abort")
            raise

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stops admitting; waits up to `timeout` s for queued and running requests, aborts the rest."""
        with self._wake:
            self._closing = True
        deadline = time.monotonic() + timeout
        while self._thread and self._thread.is_alive() and time.monotonic() < deadline:
            if not (self._inbox or self._waiting or any(r.request for r in self._rows)):
                break
            time.sleep(DRAIN_POLL)
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
