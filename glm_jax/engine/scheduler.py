"""The decode engine: continuous batching of requests over one paged KV cache, shared by
`generate`, `chat`, `needle` and the server.

Up to `max_batch` requests run at once, one a row; their K/V live in pages of one pool (`cache`),
handed out and shared by the `Planner` (planner.py: admission, prefix caching, preemption). A
prompt is prefilled chunk by chunk between decode bursts, so a long prompt holds the running
requests up by one chunk at a time; then its row joins the batch. A decode burst runs up to
`steps_per_call` tokens of the active rows only (gathered into a power-of-two bucket) on device,
one host round trip, with per-row sampling parameters, keys, stop ids and token budgets as
arrays: mixed requests share one compiled step. A burst right after an admission, or while prompts
wait for their prefill, runs one step, so a new request's first token comes back at once and the
next prefill chunks wait one step, not a whole burst.

With speculation (`speculate`: a drafter and k), a round whose rows find drafts runs one
verification step instead (speculative.py): each row's pending token and up to k drafts in one
model step, the agreeing drafts emitted at once.

Compiled programs per cache shape: one page-table update, one prefill per chunk size, one
admission, a decode burst per (row bucket, 1 or `steps_per_call` steps), and with speculation a
verification step per row bucket.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Callable, Sequence

import jax

from ..config import GLMConfig
from ..options import DEFAULT_KERNEL, NGRAM_MAX, NGRAM_MIN, NUM_SPECULATIVE_TOKENS, PAGE_SIZE, PREFILL_BUDGET, \
    PREFILL_CHUNK, SHUTDOWN_TIMEOUT, STEPS_PER_CALL
from ..progress import Progress
from ..sharding import Layout
from .buckets import cache_length, chunk_sizes, decode_buckets
from .cache import KVCache, cache_bytes_per_token, cache_dtype, cache_heads, init_cache, page_devices, pool_pages, \
    table_width
from .multihost import Plan, follow, share, to_host
from .pages import PagePool
from .paged_attention import resolve_kernel
from .planner import Planner
from .programs import Programs, Rows, programs_for, run_all, run_plan
from .requests import EngineClosed, QueueFull, Request, SamplingParams
from .speculative import make_drafter

def free_device_memory(devices) -> int | None:
    """Bytes the fullest of `devices` has left (its limit less what is in use: the weights, once
    loaded), or None when a device gives no memory statistics (CPUs)."""
    stats = [d.memory_stats() or {} for d in devices]
    if not all("bytes_limit" in s for s in stats):
        return None
    return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)


IDLE_WAIT = 0.5     # seconds an idle engine thread sleeps between rounds (others get an empty round)
DRAIN_POLL = 0.02   # seconds between checks of a draining engine


class Engine:
    """Continuous batching over one paged KV cache (see the module docstring).

    Host side: `submit` (thread-safe) queues a request; `step` runs one round (prefill up to
    `prefill_chunk` tokens of waiting requests, then one decode burst); `start` runs rounds on a
    thread, `shutdown` drains it. `generate` runs a batch to completion on the calling thread.
    serving: bursts of the active rows only, one step after an admission (latency; more programs:
    `warm_up` compiles them); False: every row, whole bursts (a batch's throughput, fewer programs).
    The pool: `kv_cache_tokens` slots, or `kv_cache_memory` (a fraction of the device memory left
    after the weights), else room for `max_batch` requests of `max_model_len` (see `reserve`), in
    pages of `page_size` slots. speculative: a draft method (options.SPECULATIVE) or None, with
    `num_speculative_tokens` drafts per verification step (see `speculate`)."""

    def __init__(self, config: GLMConfig, graphdef, state, layout: Layout, *, prefill_chunk: int = PREFILL_CHUNK,
                 kernel: str = DEFAULT_KERNEL, kv_cache_dtype: str | None = None,
                 steps_per_call: int = STEPS_PER_CALL, max_queue: int | None = None, serving: bool = True,
                 page_size: int = PAGE_SIZE, kv_cache_tokens: int | None = None,
                 kv_cache_memory: float | None = None, prefill_budget: int = PREFILL_BUDGET,
                 speculative: str | None = None, num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS,
                 ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two, got {page_size}")
        if kv_cache_tokens is not None and kv_cache_memory is not None:
            raise ValueError("give the KV cache's size as tokens or as a memory fraction, not both")
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise ValueError(f"--kv-cache-tokens must be >= 1, got {kv_cache_tokens}")
        if kv_cache_memory is not None and not 0 < kv_cache_memory <= 1:
            raise ValueError(f"--kv-cache-memory must lie in (0, 1], got {kv_cache_memory}")
        self.config, self.graphdef, self.state, self.layout = config, graphdef, state, layout
        self.prefill_chunk, self.steps_per_call, self.max_queue = prefill_chunk, steps_per_call, max_queue
        self.serving, self.page_size, self.prefill_budget = serving, page_size, prefill_budget
        self.kv_cache_tokens, self.kv_cache_memory = kv_cache_tokens, kv_cache_memory
        self.dtype = jax.tree.leaves(state)[0].dtype
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        self.kernel = resolve_kernel(kernel, layout.mesh.devices.flat[0].platform)
        self.cache: KVCache | None = None
        self.rows: Rows | None = None
        self.planner: Planner | None = None
        self._inbox: collections.deque[Request] = collections.deque()
        self._cancels: dict[int, tuple[Request, str]] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopping = False
        self.fixed = False
        self.max_model_len = 0                  # tokens a request may span (prompt + output)
        self.error: BaseException | None = None
        self.drafter, self.draft_tokens = None, 0
        self.speculated = {"proposed": 0, "accepted": 0}       # by the last `generate` call
        self.speculate(speculative, num_speculative_tokens, ngram_max, ngram_min)

    def speculate(self, kind: str | None, num_tokens: int = NUM_SPECULATIVE_TOKENS, ngram_max: int = NGRAM_MAX,
                  ngram_min: int = NGRAM_MIN) -> None:
        """Speculative decoding for the requests submitted from now on: drafts of method `kind`
        (None: off), at most `num_tokens` a verification step (a request's own number may be lower)."""
        if self.planner is not None and self.planner.running():
            raise RuntimeError("cannot change speculation while requests run")
        self.drafter = make_drafter(kind, num_tokens, ngram_max, ngram_min)
        self.draft_tokens = num_tokens if kind is not None else 0
        if self.planner is not None:
            self.planner.drafter, self.planner.draft_tokens = self.drafter, self.draft_tokens

    # -- compiled programs and the cache --------------------------------------------------------

    def _programs(self) -> Programs:
        return programs_for(self.config, self.graphdef, self.layout, self.kernel, *self.cache.pages.shape,
                            self.cache.num_pages, self.page_size, self.cache_dtype)

    def pool_tokens(self, max_batch: int, max_model_len: int) -> int:
        """Slots the pool gets: `kv_cache_tokens`, or `kv_cache_memory` of the memory the devices
        have left (their memory statistics: GPUs and TPUs), else max_batch * max_model_len."""
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        if self.kv_cache_memory is None:
            return max_batch * max_model_len
        free = free_device_memory(self.layout.mesh.devices.flat)
        if free is None:
            platform = self.layout.mesh.devices.flat[0].platform
            raise ValueError(f"--kv-cache-memory needs the devices' memory statistics, which {platform} devices do "
                             f"not give; size the pool with --kv-cache-tokens")
        heads = cache_heads(self.config, self.layout)
        head_shards = math.prod(self.layout.size(a) for a in self.layout.mesh_axes("kv_heads", heads))
        shards = page_devices(self.layout) * head_shards                  # devices sharing a token's K/V
        return int(self.kv_cache_memory * free * shards // cache_bytes_per_token(self.config, self.layout,
                                                                                 self.cache_dtype))

    def reserve(self, max_batch: int, max_model_len: int, *, fixed: bool = False) -> None:
        """Allocates the cache: a pool of `pool_tokens` slots and `max_batch` rows whose requests
        span at most `max_model_len` tokens. Keeps the current one, and the pages it caches, when
        its shape is the same. fixed: `generate` keeps this cache (and the prefixes it caches)
        instead of sizing one to each call."""
        n = page_devices(self.layout)
        width = table_width(max_model_len, self.page_size, n)
        tokens = self.pool_tokens(max_batch, width * self.page_size)
        pages = pool_pages(tokens, self.page_size, n)
        if pages < width:
            raise ValueError(f"the KV cache ({pages * self.page_size} tokens in pages of {self.page_size} over {n} "
                             f"devices) cannot hold one request of {max_model_len} tokens (the request length "
                             f"bound); raise --kv-cache-tokens")
        self.fixed, self.max_model_len = fixed, max_model_len
        if self.cache is not None and (self.cache.pages.shape, self.cache.num_pages) == ((max_batch, width), pages):
            return
        if self.planner is not None and self.planner.running():
            raise RuntimeError("cannot resize the cache while requests run")
        self.cache = self.rows = None                                     # free the old one first
        self.cache = init_cache(self.config, self.layout, max_batch, width, pages, self.page_size, self.cache_dtype)
        self.rows = self._programs().init_rows()
        waiting = self.planner.waiting if self.planner is not None else ()
        self.planner = Planner(max_batch, PagePool(pages, self.page_size, n), prefill_chunk=self.prefill_chunk,
                               steps_per_call=self.steps_per_call, serving=self.serving,
                               prefill_budget=self.prefill_budget, drafter=self.drafter,
                               draft_tokens=self.draft_tokens)
        self.planner.waiting.extend(waiting)

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
               on_tokens: Callable[[Request, list[int]], None] | None = None,
               draft_tokens: int | None = None) -> Request:
        """Queues a request (thread-safe). on_tokens(request, ids) is called on the engine's
        thread with each run of new tokens (a stop id included), and with [] when it ends.
        draft_tokens: its speculative drafts per step, 0 (off) to the engine's (the default).
        Raises ValueError for a bad request, QueueFull when `max_queue` requests wait,
        EngineClosed once `shutdown` began."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, params)
        if draft_tokens is not None and not 0 <= draft_tokens <= self.draft_tokens:
            raise ValueError(f"a request's speculative tokens must lie in [0, {self.draft_tokens}] (the server's "
                             f"--num-speculative-tokens, 0 without --speculative), got {draft_tokens}")
        request = Request(prompt, params, on_tokens, draft_tokens=self.draft_tokens if draft_tokens is None
                          else draft_tokens)
        with self._wake:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if self.max_queue is not None and len(self._inbox) + len(self.planner.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request, reason: str = "abort") -> None:
        """Ends a request (thread-safe); its row and pages free at the next step. reason: its finish_reason."""
        with self._wake:
            self._cancels[id(request)] = (request, reason)
            self._wake.notify()

    def forget(self) -> None:
        """Drops the cached prefixes: the next prompts are prefilled whole."""
        self.planner.pool.forget()

    def stats(self) -> dict:
        """Requests running and waiting, the pool's pages (total, used, cached, free), prefix-cache
        lookups and hits (pages) and their rate, preemptions, speculative drafts proposed and
        accepted and their rate."""
        pool = self.planner.pool.stats()
        queried = pool["prefix_queries"]
        return {"running": len(self.planner.running()), "waiting": len(self.planner.waiting) + len(self._inbox),
                "max_batch": self.planner.batch, "max_model_len": self.max_model_len, "page_size": self.page_size,
                "kv_cache_tokens": self.cache.num_pages * self.page_size, **pool,
                "prefix_hit_rate": pool["prefix_hits"] / queried if queried else 0.0,
                "preemptions": self.planner.preemptions, "speculative_proposed": self.planner.proposed,
                "speculative_accepted": self.planner.accepted,
                "speculative_acceptance_rate": self.planner.accepted / self.planner.proposed if self.planner.proposed
                else 0.0}

    # -- the scheduler --------------------------------------------------------------------------

    def step(self) -> bool:
        """One round: admissions and cancellations, prefill up to `prefill_budget` prompt tokens
        (in chunks of `prefill_chunk`), one decode burst. Returns whether requests remain. With several processes, every process
        runs the round process 0 planned (see `follow`)."""
        with self._wake:
            self.planner.waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = list(self._cancels.values()), {}
        plan = share(self.planner.plan(cancels, self._finish), self.planner.batch, self.prefill_chunk,
                     self.draft_tokens)
        tokens = self._execute(plan)
        self.planner.commit()
        if tokens is not None:
            self.planner.collect(plan.decode, tokens, time.perf_counter(), self._finish, plan.drafts)
        return bool(self.planner.waiting) or bool(self.planner.running())

    def _execute(self, plan: Plan):
        """Runs a plan's device programs (on every process alike); the round's tokens [b, steps + 1]."""
        self.cache, self.rows, tokens = run_plan(self._programs(), self.state, self.cache, self.rows, plan)
        return None if tokens is None else to_host(tokens)              # the round's one sync

    def follow(self) -> None:
        """On processes other than 0 of a multi-process server: runs every round process 0 plans
        (same programs, same order) until it shuts down. They take no requests themselves."""
        follow(self._execute, self.planner.batch, self.prefill_chunk, self.draft_tokens)

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.on_tokens is not None:
            request.on_tokens(request, [])
        request.done.set()

    def _outstanding(self) -> list[Request]:
        return self.planner.running() + list(self.planner.waiting) + list(self._inbox)

    # -- running ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compiles every program a request can need (each prefill chunk size, each decode bucket
        for one and for `steps_per_call` steps, and its verification step) by running them on
        nothing: no slot is written and no row changes. A server calls it before it listens (every
        process alike), so no request waits for a compile."""
        if self.planner.running():
            raise RuntimeError("warm_up() runs before any request")
        batch = self.planner.batch
        buckets = decode_buckets(batch) if self.serving else [batch]
        steps = sorted({1, self.steps_per_call}) if self.serving else [self.steps_per_call]
        self.cache, self.rows, tokens = run_all(self._programs(), self.state, self.cache,
                                                self.rows, chunk_sizes(self.prefill_chunk), buckets, steps,
                                                self.draft_tokens)
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
                share(Plan.stopping(self.planner.batch), self.planner.batch, self.prefill_chunk, self.draft_tokens)
        except BaseException as e:  # noqa: BLE001 - ends every request, then surfaces in `error`
            self.error = e
            for request in self._outstanding():
                if request.finish_reason is None:
                    self._finish(request, "abort")
            raise

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stops admitting; waits up to `timeout` s for queued and running requests, aborts the rest."""
        with self._wake:
            self._closing = True
        deadline = time.monotonic() + timeout
        while self._thread and self._thread.is_alive() and time.monotonic() < deadline:
            if not self._outstanding():
                break
            time.sleep(DRAIN_POLL)
        for request in self._outstanding():
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
        cache is sized to the call unless `reserve(fixed=True)` fixed it. `speculated` then holds the
        call's speculative drafts proposed and accepted."""
        if not self.fixed:
            self.reserve(1 << (len(prompts) - 1).bit_length(), cache_length(max(map(len, prompts)) + max_new_tokens))
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
        self.speculated = {"proposed": sum(r.proposed for r in requests), "accepted": sum(r.accepted for r in requests)}
        return [r.output for r in requests]
