"""The engine's planner (engine/planner.py) against a fake device that keeps token ids in the page
pool's slots and "attends" by reading a row's context back through its page table: a wrong page,
a page shared too early or overwritten while shared changes the fake's output. Every request of a
random over-subscribed workload (shared prefixes, preemptions, cancellations) must finish whole
with the output it has alone; with random drafts (some true for a while, then wrong) verified in
steps that write every draft's slot, the same output."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glm_jax.engine.multihost import Plan
from glm_jax.engine.pages import PagePool
from glm_jax.engine.planner import Planner
from glm_jax.engine.requests import Request, SamplingParams

VOCAB, STOP = 40, 39


def next_token(context: list[int]) -> int:
    """The fake model: a token from the whole context (as greedy decoding is)."""
    return zlib.crc32(np.asarray(context, np.int32).tobytes()) % VOCAB


class FakeDevice:
    """Runs plans as the device programs would, on token ids instead of K/V."""

    def __init__(self, batch: int, pool: PagePool, width: int):
        self.page, self.slots = pool.page_size, {}
        self.table = np.zeros((batch, width), np.int64)
        self.active = np.zeros(batch, bool)
        self.pending, self.position, self.remaining = (np.zeros(batch, np.int64) for _ in range(3))
        self.stops = [()] * batch

    def slot(self, row: int, position: int) -> int:
        return int(self.table[row, position // self.page]) * self.page + position % self.page

    def context(self, row: int, end: int) -> list[int]:
        return [self.slots.get(self.slot(row, p), -1) for p in range(end)]

    def run(self, plan: Plan):
        for row, column, page in plan.pages:
            if row < len(self.table):
                self.table[row, column] = page
        for c in plan.chunks:
            real = c.tokens[len(c.tokens) - c.real:]
            for k, token in enumerate(real):
                self.slots[self.slot(c.row, c.start + k)] = int(token)
            if c.admit is not None:
                end = c.start + c.real
                self.active[c.row], self.position[c.row] = True, end
                self.pending[c.row] = next_token(self.context(c.row, end))
                self.remaining[c.row], self.stops[c.row] = c.admit.max_tokens - c.drawn, c.admit.stop_ids
        if not len(plan.decode):
            return None
        self.active &= ~plan.cancel
        if plan.drafts is not None:
            return self.verify(plan)
        out = np.full((len(plan.decode), plan.steps + 1), -1, np.int64)
        for i, row in enumerate(plan.decode):
            for step in range(plan.steps):
                if row >= len(self.table) or not self.active[row]:
                    break
                token = int(self.pending[row])
                out[i, step] = token
                self.remaining[row] -= 1
                if token in self.stops[row] or self.remaining[row] <= 0:
                    self.active[row] = False
                    break
                self.slots[self.slot(row, int(self.position[row]))] = token
                self.position[row] += 1
                self.pending[row] = next_token(self.context(row, int(self.position[row])))
        return self.with_pending(plan, out)

    def with_pending(self, plan: Plan, out):
        for i, row in enumerate(plan.decode):
            if row < len(self.table) and self.active[row]:
                out[i, -1] = self.pending[row]
        return out

    def verify(self, plan: Plan):
        """A verification step: the pending token and the drafts written at the next slots; the
        drafts the model agrees with kept (up to a stop id), the model's next token pending."""
        out = np.full((len(plan.decode), plan.drafts.shape[1] + 2), -1, np.int64)
        for i, row in enumerate(plan.decode):
            if row >= len(self.table) or not self.active[row]:
                continue
            token, pos = int(self.pending[row]), int(self.position[row])
            out[i, 0] = token
            if token in self.stops[row] or self.remaining[row] <= 1:
                self.active[row], self.remaining[row] = False, self.remaining[row] - 1
                continue
            drafts = [int(d) for d in plan.drafts[i] if d >= 0][:max(int(self.remaining[row]) - 2, 0)]
            for k, t in enumerate([token] + drafts):
                self.slots[self.slot(row, pos + k)] = t
            kept = 0
            while kept < len(drafts) and drafts[kept] == next_token(self.context(row, pos + 1 + kept)):
                kept += 1
                if drafts[kept - 1] in self.stops[row]:
                    break
            out[i, 1:1 + kept] = drafts[:kept]
            self.remaining[row] -= 1 + kept
            self.position[row] = pos + 1 + kept
            if kept and drafts[kept - 1] in self.stops[row]:
                self.active[row] = False
            else:
                self.pending[row] = next_token(self.context(row, pos + 1 + kept))
        return self.with_pending(plan, out)


class RandomDrafter:
    """Drafts the fake model's own continuation for a random number of tokens, then random ones."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def propose(self, context, k):
        context, out = list(context), []
        right = int(self.rng.integers(0, k + 1))
        for j in range(int(self.rng.integers(0, k + 1))):
            out.append(next_token(context) if j < right else int(self.rng.integers(0, VOCAB)))
            context.append(out[-1])
        return out


def alone(prompt: list[int], params: SamplingParams) -> list[int]:
    """What the fake model answers without any engine."""
    context, out = list(prompt), []
    while len(out) < params.max_tokens:
        out.append(next_token(context))
        if out[-1] in params.stop_ids:
            break
        context.append(out[-1])
    return out


class Harness:
    """A planner, its pool and the fake device; `run` plays rounds until every request finished."""

    def __init__(self, *, batch, pages, page, chunk, steps, serving=True, width=64, drafts=0, seed=0):
        self.pool = PagePool(pages, page)
        self.planner = Planner(batch, self.pool, prefill_chunk=chunk, steps_per_call=steps, serving=serving,
                               drafter=RandomDrafter(seed) if drafts else None, draft_tokens=drafts)
        self.device = FakeDevice(batch, self.pool, width)
        self.finished, self.rounds, self.most_used = [], 0, 0

    def submit(self, requests) -> list[Request]:
        reqs = [Request(list(p), s, draft_tokens=self.planner.draft_tokens) for p, s in requests]
        self.planner.waiting.extend(reqs)
        return reqs

    def run(self, cancel_after=None, max_rounds=5000) -> int:
        """Rounds until nothing runs or waits; returns the most requests running at once."""
        most = 0
        finish = lambda r, reason: (setattr(r, "finish_reason", reason), self.finished.append(r))
        while self.planner.waiting or self.planner.running():
            self.rounds += 1
            assert self.rounds < max_rounds, "the workload does not finish"
            cancels = [(r, "abort") for r in (cancel_after or {}).get(self.rounds, [])]
            plan = self.planner.plan(cancels, finish)
            tokens = self.device.run(plan)
            self.planner.commit()
            if tokens is not None:
                self.planner.collect(plan.decode, tokens, float(self.rounds), finish, plan.drafts)
            self.pool.check()
            most = max(most, len(self.planner.running()))
            self.most_used = max(self.most_used, self.pool.stats()["pages_used"])
        return most


def run_workload(requests, *, cancel=None, **kw):
    h = Harness(width=max(len(p) + s.max_tokens for p, s in requests) // kw["page"] + 3, **kw)
    reqs = h.submit(requests)
    cancel_after = {k: [reqs[i] for i in v] for k, v in (cancel or {}).items()}
    most = h.run(cancel_after)
    return reqs, h.planner, most, h.finished


def greedy(n, stops=(STOP,)):
    return SamplingParams(max_tokens=n, temperature=0.0, stop_ids=tuple(stops))


def test_shared_prefix_is_held_once_and_later_requests_prefill_only_the_rest():
    """A 32-token system prompt (4 pages of 8) cached by a first request: four users asking at once
    each take its 4 pages (held once: the pool never holds more than those plus each user's own),
    and prefill only their question."""
    system = list(range(1, 33))
    h = Harness(batch=4, pages=40, page=8, chunk=16, steps=2)
    first = h.submit([(system + [33, 34, 2], greedy(6, ()))])
    h.run()
    h.most_used = 0
    later = h.submit([(system + [30 + i, 31 + i, 2], greedy(6, ())) for i in range(4)])
    assert h.run() == 4
    assert all(r.cached == 32 for r in later) and first[0].cached == 0
    assert h.most_used <= 4 + 4 * 2                                          # shared 4 + at most 2 own each
    assert [r.output for r in later] == [alone(system + [30 + i, 31 + i, 2], greedy(6, ())) for i in range(4)]


@pytest.mark.parametrize("serving", [True, False])
def test_over_subscribed_pool_finishes_every_request_whole(serving):
    """Twelve requests, a pool with room for about two: admissions wait, running requests are
    preempted and resumed; every answer equals the request's answer alone; nothing is cut."""
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 39, 20).tolist()
    requests = []
    for i in range(12):
        prompt = (prefix if i % 3 == 0 else []) + rng.integers(0, 39, int(rng.integers(3, 40))).tolist()
        requests.append((prompt, greedy(int(rng.integers(1, 30)), (STOP,) if i % 2 else ())))
    reqs, planner, most, finished = run_workload(requests, batch=6, pages=16, page=8, chunk=16, steps=4,
                                                 serving=serving)
    for r, (prompt, params) in zip(reqs, requests):
        assert r.output == alone(prompt, params)
        assert r.finish_reason == ("stop" if r.output[-1] in params.stop_ids else "length")
    assert planner.preemptions > 0 and len(finished) == len(reqs)
    assert planner.pool.stats()["pages_used"] == 0


@pytest.mark.parametrize("serving", [True, False])
def test_verification_steps_with_random_drafts_keep_every_answer(serving):
    """The over-subscribed workload with up to 3 random drafts a step (the model's own tokens for a
    while, then wrong ones): accepted runs of every length, preemptions, and each answer as alone."""
    rng = np.random.default_rng(1)
    requests = [(rng.integers(0, 39, int(rng.integers(3, 30))).tolist(), greedy(int(rng.integers(5, 30)),
                                                                                  (STOP,) if i % 2 else ()))
                for i in range(10)]
    reqs, planner, _, _ = run_workload(requests, batch=4, pages=14, page=4, chunk=8, steps=4, serving=serving,
                                       drafts=3)
    assert [r.output for r in reqs] == [alone(p, s) for p, s in requests]
    assert planner.proposed > planner.accepted > 0 and planner.preemptions > 0
    assert sum(r.accepted for r in reqs) == planner.accepted and planner.pool.stats()["pages_used"] == 0


@pytest.mark.parametrize("serving", [True, False])
def test_serving_bursts_one_step_while_prompts_wait_for_prefill(serving):
    """Serving: while a prompt is still to prefill (a long one, one chunk a round), the running
    rows' bursts are one step, so its chunks come one step apart; then whole bursts. A batch
    (`generate`) always takes whole bursts. Answers as alone either way."""
    h = Harness(batch=2, pages=40, page=8, chunk=8, steps=4, serving=serving, width=16)
    long_prompt = list(range(9, 39)) + [1, 2]                       # 32 tokens, no page shared with the first
    h.planner.prefill_budget = 8                                    # one chunk a round
    first = h.submit([(list(range(1, 9)), greedy(30, ()))])          # one chunk: decodes from round 0
    finish = lambda r, reason: setattr(r, "finish_reason", reason)
    steps = []
    for round_ in range(8):
        if round_ == 2:
            second = h.submit([(long_prompt, greedy(4, ()))])           # 4 chunks: rounds 2-5
        plan = h.planner.plan([], finish)
        tokens = h.device.run(plan)
        h.planner.commit()
        if tokens is not None:
            h.planner.collect(plan.decode, tokens, float(round_), finish)
        steps.append(plan.steps)
    # serving: round 0 admits the first (one step), 1 is whole, 2-5 prefill the second (admitted in 5)
    assert steps == ([1, 4, 1, 1, 1, 1, 4, 4] if serving else [4] * 8)
    h.run()
    assert first[0].output == alone(list(range(1, 9)), greedy(30, ()))
    assert second[0].output == alone(long_prompt, greedy(4, ()))


def test_serving_bursts_stay_whole_while_the_queue_waits_for_pages():
    """A request waiting for pages (the pool holds one request) is not prefill work: the running
    request decodes whole bursts, ending sooner, which is what frees its pages."""
    h = Harness(batch=2, pages=5, page=8, chunk=8, steps=4, width=8)
    first, second = h.submit([(list(range(1, 9)), greedy(30, ())), (list(range(9, 33)), greedy(4, ()))])
    finish = lambda r, reason: setattr(r, "finish_reason", reason)
    steps = []
    for round_ in range(4):
        plan = h.planner.plan([], finish)
        tokens = h.device.run(plan)
        h.planner.commit()
        h.planner.collect(plan.decode, tokens, float(round_), finish)
        steps.append(plan.steps)
    assert steps == [1, 4, 4, 4] and h.planner.waiting[0] is second
    h.run()
    assert first.output == alone(list(range(1, 9)), greedy(30, ()))
    assert second.output == alone(list(range(9, 33)), greedy(4, ()))


def test_preemption_takes_the_newest_and_the_oldest_always_progresses():
    """Two long requests on a pool that holds one and a bit: the second is preempted, never the
    first; the first finishes first; then the second, whole."""
    requests = [(list(range(1, 20)), greedy(40, ())), (list(range(5, 30)), greedy(40, ()))]
    reqs, planner, _, finished = run_workload(requests, batch=2, pages=10, page=8, chunk=8, steps=4)
    assert finished == reqs and planner.preemptions >= 1
    assert [r.output for r in reqs] == [alone(p, s) for p, s in requests]


def test_a_cancelled_request_frees_its_pages_and_others_finish():
    requests = [(list(range(1, 30)), greedy(30, ())) for _ in range(3)]
    reqs, planner, _, finished = run_workload(requests, batch=3, pages=30, page=8, chunk=8, steps=2, cancel={6: [1]})
    assert reqs[1].finish_reason == "abort" and len(reqs[1].output) < 30
    assert reqs[0].output == reqs[2].output == alone(*requests[0])
    assert planner.pool.stats()["pages_used"] == 0


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_workloads_finish_whole_with_their_own_answers(data):
    """Random prompts (some sharing a document), budgets, stop ids, batch, page and pool sizes
    (down to one request's worth), prefill chunks, burst lengths, cancellations and speculative
    drafts: every request ends, with its answer alone (a cancelled one: a beginning of it), and no
    page stays used."""
    page = data.draw(st.sampled_from([2, 4, 8]))
    doc = data.draw(st.lists(st.integers(0, 38), min_size=0, max_size=30))
    n = data.draw(st.integers(1, 8))
    requests = []
    for _ in range(n):
        head = doc[:data.draw(st.integers(0, len(doc)))] if data.draw(st.booleans()) else []
        tail = data.draw(st.lists(st.integers(0, 38), min_size=1 if not head else 0, max_size=20))
        requests.append((head + tail, greedy(data.draw(st.integers(1, 25)), data.draw(st.sampled_from([(), (STOP,)])))))
    longest = max(len(p) + s.max_tokens for p, s in requests)
    pages = -(-longest // page) + 1 + data.draw(st.integers(0, 3 * n))
    cancel = data.draw(st.dictionaries(st.integers(1, 30), st.lists(st.integers(0, n - 1), max_size=2), max_size=2))
    reqs, planner, _, finished = run_workload(requests, batch=data.draw(st.integers(1, 5)), pages=pages, page=page,
                                              chunk=data.draw(st.sampled_from([4, 8, 16])),
                                              steps=data.draw(st.integers(1, 5)), serving=data.draw(st.booleans()),
                                              cancel=cancel, drafts=data.draw(st.sampled_from([0, 1, 3])),
                                              seed=data.draw(st.integers(0, 9)))
    for r, (prompt, params) in zip(reqs, requests):
        want = alone(prompt, params)
        assert r.output == want if r.finish_reason != "abort" else r.output == want[:len(r.output)]
    assert sorted(map(id, finished)) == sorted(map(id, reqs)) and planner.pool.stats()["pages_used"] == 0
