"""The engine's host decisions, round by round: which requests run (one per row), which pages of
the shared pool each holds, which prefill chunks and decode burst the device runs next, and
whom to preempt when pages run out. JAX-free: it plans, `programs.run_plan` executes.

A request's tokens (prompt, then what it emitted) sit at positions 0, 1, ...; logical page j holds
positions j*page .. j*page+page-1. When admitted, a request takes the longest cached prefix of
full pages any earlier request left (`PagePool.lookup`: chained digests of the tokens), then
prefills the rest chunk by chunk and decodes. A page is shared (registered under its digest) once
it is full and its K/V are on device (`commit`, after the round ran), and stays cached after its
requests end until the pool needs it (least recently used first).

Pages run out: a new request is admitted only when its whole prompt (and its first decoded token)
fits in what the pool can hand out; a running request that needs a page (the next prefill chunk,
the tokens of the next decode burst) takes one, shortening the burst to one step first, then
preempting the most recently admitted request (its pages released, back to the front of the
queue; it resumes later by prefilling its prompt and what it emitted, mostly from the cache, and
draws its next token with the same key). The oldest request always progresses: first come, first
served, nothing is cut or lost.

Speculation: with a drafter, a round whose decoding rows find drafts (speculative.py: looked up in
each request's tokens and its pending token, which every burst hands back) runs one verification
step instead of a burst, with pages for each row's pending token and drafts (positions held ..
held+k); `collect` counts only the tokens the step emitted in `held`. A row whose drafts were all
rejected m times in a row drafts nothing for the next 2**m rounds (at most 2**MAX_MISSES; plain
bursts when no other row drafts), so drafts that never match cost little.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..options import PREFILL_BUDGET
from .buckets import decode_bucket, prefill_chunks
from .multihost import Chunk, Plan
from .pages import PagePool, PoolExhausted, page_hashes
from .requests import Request

if TYPE_CHECKING:
    from .speculative import Drafter

Finish = Callable[[Request, str], None]
MAX_MISSES = 4     # a row whose drafts keep missing drafts again after at most 2**MAX_MISSES rounds


@dataclasses.dataclass(eq=False)
class Running:
    """A request on a row: its page table and progress."""
    request: Request
    target: int                 # tokens to prefill: its prompt and what it emitted before this admission
    held: int                   # tokens whose K/V are written (or planned this round): positions 0..held-1
    order: int                  # admission number (preemption takes the highest)
    pages: list[int] = dataclasses.field(default_factory=list)      # logical page -> pool page
    digests: list[bytes] = dataclasses.field(default_factory=list)  # of the full pages registered
    pending: int | None = None  # the drawn, not yet emitted token at position held (once a burst told it)
    misses: int = 0             # verifications in a row that kept no draft
    quiet: int = 0              # rounds left before it drafts again (2**misses after a miss)

    def token(self, a: int, b: int) -> list[int]:
        """Tokens at positions a..b-1 (prompt, then output)."""
        r, n = self.request, self.request.prompt_len
        return (r.prompt[a:min(b, n)] if a < n else []) + r.output[max(a - n, 0):max(b - n, 0)]


class Planner:
    def __init__(self, batch: int, pool: PagePool, *, prefill_chunk: int, steps_per_call: int, serving: bool,
                 prefill_budget: int = PREFILL_BUDGET, drafter: Drafter | None = None, draft_tokens: int = 0):
        self.pool, self.prefill_chunk, self.steps_per_call, self.serving = pool, prefill_chunk, steps_per_call, serving
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        self.drafter, self.draft_tokens = drafter, draft_tokens          # draft_tokens: a plan's drafts per row
        self.proposed = self.accepted = 0
        self.rows: list[Running | None] = [None] * batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.preemptions = 0
        self._order = itertools.count()
        self._freed: set[int] = set()
        self._prefill_left = False    # prompts to prefill after this round's, not held up by rows or pages

    @property
    def batch(self) -> int:
        return len(self.rows)

    def running(self) -> list[Request]:
        return [r.request for r in self.rows if r is not None]

    # -- a round ---------------------------------------------------------------------------------

    def plan(self, cancels: list[tuple[Request, str]], finish: Finish) -> Plan:
        """The round's plan: cancellations, page-table entries, prefill chunks (up to
        `prefill_budget` tokens in chunks of `prefill_chunk`, at least one chunk), a decode burst."""
        plan = Plan(cancel=np.zeros(self.batch, bool), chunks=[], decode=np.zeros(0, np.int32))
        self._freed = set()           # rows cancelled on device this round (after its admissions): not reused
        updates: list[tuple[int, int, int]] = []
        for request, reason in cancels:
            if request.finish_reason is not None:
                continue
            if request in self.waiting:
                self.waiting.remove(request)
            for i, run in enumerate(self.rows):
                if run is not None and run.request is request:
                    plan.cancel[i] = True
                    self._release(i)
            finish(request, reason)
        self._prefill(plan, updates)
        self._decode(plan, updates)
        plan.pages = np.array(updates, np.int32).reshape(-1, 3)
        return plan

    def _prefill(self, plan: Plan, updates) -> None:
        budget, stalled = self.prefill_budget, False
        while budget > 0 and len(plan.chunks) < self.batch:
            pending = sorted((r for r in self.rows if r is not None and r.held < r.target), key=lambda r: r.order)
            if pending:
                i = self.rows.index(pending[0])
            elif self.waiting and (i := self._admit(self.waiting[0], updates)) is not None:
                self.waiting.popleft()
            else:
                stalled = bool(self.waiting)           # no row or no pages for the next: running requests must end
                break
            chunk = self._next_chunk(i, updates)
            if chunk is None:                          # no pages: preempt a newer request, else wait
                if not self._preempt(plan, spare=i):
                    break
                continue
            plan.chunks.append(chunk)
            budget -= len(chunk.tokens)
        self._prefill_left = any(r is not None and r.held < r.target for r in self.rows) or (
            bool(self.waiting) and not stalled)

    def _decode(self, plan: Plan, updates) -> None:
        """The burst, or a verification step when rows have drafts: rows done prefilling; pages for
        the tokens it feeds (drafts dropped, a shorter burst, then preemptions, when they run short).
        Serving, a burst is one step while a request waits for its first token (admitted this
        round, or prompts still to prefill): the next round's prefill comes after one step, not
        `steps_per_call` (as vLLM's chunked prefill interleaves one decode step per chunk batch).
        Not while the waiting requests wait for rows or pages: only running requests ending frees
        those, so they decode whole bursts."""
        while True:
            decoding = sorted((r for r in self.rows if r is not None and r.held >= r.target), key=lambda r: r.order)
            fresh = any(not r.request.output for r in decoding)
            steps = 1 if (fresh or self._prefill_left) and self.serving else self.steps_per_call
            drafts = self._drafts(decoding)
            fed = lambda r: 1 + len(drafts.get(r.order, ())) if drafts else steps
            short = next((r for r in decoding if not self._room(r, fed(r), updates)), None)
            if short is None:
                break
            if (steps > 1 or drafts) and all(self._room(r, 1, updates) for r in decoding):
                steps, drafts = 1, {}
                break
            self._preempt(plan)
        if not decoding and not plan.cancel.any():
            return
        rows = [self.rows.index(r) for r in decoding]
        if self.serving:
            # the active rows only, in a power-of-two bucket; one token at first, so that a new
            # request's first token comes back after its prefill and a single step
            # (a full bucket takes every row in order: rows not decoding are inactive on device)
            bucket = decode_bucket(len(rows), self.batch)
            pad = [self.batch] * (bucket - len(rows))
            plan.decode = np.array(range(bucket) if bucket == self.batch else sorted(rows) + pad, np.int32)
        else:  # a batch: every row, whole bursts (fewer programs to compile)
            plan.decode = np.arange(self.batch, dtype=np.int32)
        plan.steps = 1 if drafts else steps
        if drafts:
            plan.drafts = np.full((len(plan.decode), self.draft_tokens), -1, np.int32)
            for j, i in enumerate(plan.decode):
                run = self.rows[i] if i < self.batch else None
                if run is not None and run.order in drafts:
                    plan.drafts[j, :len(drafts[run.order])] = drafts[run.order]

    def _drafts(self, decoding: list[Running]) -> dict[int, list[int]]:
        """Drafts of the rows that have some (by admission number): at most the request's and the
        plan's number, and two fewer than the draws it has left (every token the step feeds
        needs a slot; the last draw is never fed)."""
        out = {}
        if self.drafter is None or not self.draft_tokens:
            return out
        for run in decoding:
            r = run.request
            k = min(r.draft_tokens, self.draft_tokens, r.params.max_tokens - len(r.output) - 2)
            if k > 0 and run.pending is not None and run.pending not in r.params.stop_ids and not run.quiet:
                if drafts := self.drafter.propose(r.prompt + r.output + [run.pending], k)[:k]:
                    out[run.order] = drafts
        return out

    def _room(self, run: Running, steps: int, updates) -> bool:
        """Pages for the tokens a burst of `steps` may feed (positions held .. held+fed-1)."""
        left = run.request.params.max_tokens - len(run.request.output)      # draws still allowed
        fed = min(steps, left - 1)
        return fed <= 0 or self._reserve(self.rows.index(run), run.held + fed - 1, updates)

    def _admit(self, request: Request, updates) -> int | None:
        """A free row for the waiting request when the pool can hold it: its cached prefix shared,
        pages for the rest of its prompt (and its first decoded token) available."""
        free = [i for i, r in enumerate(self.rows) if r is None and i not in self._freed]
        if not free:
            return None
        page, target = self.pool.page_size, request.prompt_len + len(request.output)
        tokens = request.prompt + request.output
        digests = page_hashes(tokens[:(target - 1) // page * page], page)
        hits = self.pool.lookup(digests)
        if not self.pool.can_allocate(range(len(hits), target // page + 1)):
            self.pool.release(hits)
            return None
        i = free[0]
        run = Running(request, target, len(hits) * page, next(self._order), list(hits), digests[:len(hits)])
        if request.ttft is None:                        # its first admission: what usage reports
            request.cached = run.held
        request.prefilled = run.held
        updates += [(i, j, p) for j, p in enumerate(hits)]
        self.rows[i] = run
        return i

    def _reserve(self, i: int, position: int, updates) -> bool:
        """Pages for row i up to `position`; False when the pool has none left (what it got, it keeps)."""
        run = self.rows[i]
        try:
            while len(run.pages) <= position // self.pool.page_size:
                run.pages.append(self.pool.allocate(len(run.pages)))
                updates.append((i, len(run.pages) - 1, run.pages[-1]))
        except PoolExhausted:
            return False
        return True

    def _next_chunk(self, i: int, updates) -> Chunk | None:
        """Row i's next prefill chunk (with its pages; the admission after the last one, with the
        page of its first decoded token), or None when the pool cannot give its pages."""
        run = self.rows[i]
        start = run.held
        size = prefill_chunks(run.target - start, self.prefill_chunk)[0]
        n = min(size, run.target - start)                          # real tokens; the rest is left padding
        last = start + n == run.target
        if not self._reserve(i, start + n if last else start + n - 1, updates):
            return None
        tokens = np.zeros(size, np.int32)
        tokens[size - n:] = run.token(start, start + n)
        run.held = run.request.prefilled = start + n
        request = run.request
        return Chunk(i, tokens, start, n, request.params if last else None, len(request.output))

    def _preempt(self, plan: Plan, spare: int | None = None) -> bool:
        """Preempts the most recently admitted request (other than row `spare`): its chunks leave
        the plan, its pages go back to the pool, it goes back to the front of the queue."""
        runs = [r for i, r in enumerate(self.rows) if r is not None and i != spare]
        if not runs:
            return False
        victim = max(runs, key=lambda r: r.order)
        i = self.rows.index(victim)
        plan.chunks = [c for c in plan.chunks if c.row != i]
        plan.cancel[i] = True
        self._release(i)
        victim.request.prefilled = 0
        self.waiting.appendleft(victim.request)
        self.preemptions += 1
        return True

    def _release(self, i: int) -> None:
        self.pool.release(self.rows[i].pages)
        self.rows[i] = None
        self._freed.add(i)

    # -- after a round ---------------------------------------------------------------------------

    def commit(self) -> None:
        """After the round ran: every full page now on device becomes shareable."""
        for run in self.rows:
            if run is not None:
                self._register(run)

    def _register(self, run: Running) -> None:
        page = self.pool.page_size
        while len(run.digests) < run.held // page:
            j = len(run.digests)
            digest = page_hashes(run.token(j * page, (j + 1) * page), page, run.digests[-1] if j else b"")[0]
            self.pool.register(run.pages[j], digest)
            run.digests.append(digest)

    def collect(self, selected: np.ndarray, tokens: np.ndarray, now: float, finish: Finish,
                drafts: np.ndarray | None = None) -> None:
        """Hands a round's tokens [b, S+1] (emitted ones, then the pending token; -1: none) of rows
        `selected` [b] to their requests, counting the `drafts` [b, K] the step verified and kept;
        ends finished ones (their full pages registered, then released)."""
        for j, (i, row_tokens) in enumerate(zip(selected, tokens)):
            run = self.rows[i] if i < self.batch else None
            if run is None:
                continue
            run.pending = int(row_tokens[-1]) if row_tokens[-1] >= 0 else None
            new = [int(t) for t in row_tokens[:-1] if t >= 0]
            if not new:
                continue
            request = run.request
            proposed = 0 if drafts is None else int((drafts[j] >= 0).sum())
            if proposed:
                run.misses = run.misses + 1 if len(new) == 1 else 0
                run.quiet = 1 << min(run.misses, MAX_MISSES) if run.misses else 0
            else:
                run.quiet = max(run.quiet - 1, 0)
            if proposed:
                request.proposed += proposed
                request.accepted += len(new) - 1
                self.proposed += proposed
                self.accepted += len(new) - 1
            if request.ttft is None:
                request.ttft = now - request.submitted
            request.output += new
            stopped = new[-1] in request.params.stop_ids
            ended = stopped or len(request.output) >= request.params.max_tokens
            run.held += len(new) - 1 if ended else len(new)            # the final token is never fed
            if request.on_tokens is not None:
                request.on_tokens(request, new)
            if ended:
                self._register(run)
                self._release(i)
                finish(request, "stop" if stopped else "length")
