"""The page allocator and prefix cache (engine/pages.py): hand-worked cases, and random operation
sequences (hypothesis) checked against a simple reference model on 1 and 3 shards."""

import ast
import hashlib
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from glm_jax.engine.pages import PagePool, PoolExhausted, page_hashes


def cached(pool: PagePool, tokens: list[int]) -> list[int]:
    """Allocate, register and release pages for `tokens` from logical page 0; the page table."""
    table = [pool.allocate(j) for j in range(-(-len(tokens) // pool.page_size))]
    for page, digest in zip(table, page_hashes(tokens, pool.page_size)):
        pool.register(page, digest)
    pool.release(table)
    return table


# --- page_hashes -----------------------------------------------------------------------------------

def test_page_hashes_chain():
    a = page_hashes(list(range(10)), 4)
    assert len(a) == 2 and all(len(d) == 16 for d in a)   # the partial third page gets none
    assert a[0] == hashlib.blake2b(np.arange(4, dtype="<i4").tobytes(), digest_size=16).digest()
    assert a[1] == hashlib.blake2b(a[0] + np.arange(4, 8, dtype="<i4").tobytes(), digest_size=16).digest()
    assert page_hashes(list(range(12)), 4)[:2] == a                  # same prefix, same digests
    b = page_hashes([99] + list(range(1, 12)), 4)
    assert all(x != y for x, y in zip(b, page_hashes(list(range(12)), 4)))   # page 0 changes them all
    c = page_hashes(list(range(4)) + [99] + list(range(5, 8)), 4)
    assert c[0] == a[0] and c[1] != a[1]
    assert page_hashes([1, 2, 3], 4) == [] and page_hashes([], 4) == []
    assert page_hashes(list(range(8)), 4, parent=b"x")[0] != a[0]
    assert page_hashes(np.arange(8), 4) == page_hashes(list(range(8)), 4)


# --- hand-worked cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ((0, 4), "positive multiple"), ((7, 4, 3), "positive multiple"), ((6, 4, 0), "positive multiple"),
    ((6, 3), "power of two"), ((6, 0), "power of two"),
])
def test_bad_pool_arguments(args, message):
    with pytest.raises(ValueError, match=message) as error:
        PagePool(*args)
    assert "\n" not in str(error.value)


def test_bad_calls_raise_one_line_value_errors():
    pool = PagePool(4, 2, shards=2)
    page = pool.allocate(0)
    calls = [lambda: pool.release([page, page]), lambda: pool.release([4]), lambda: pool.refcount(-1),
             lambda: pool.allocate(-1), lambda: pool.available(2), lambda: pool.register(3, b"d"),
             lambda: pool.shard_of(4), lambda: page_hashes([1], 0)]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call()
        assert "\n" not in str(error.value)
    pool.register(page, b"d")
    with pytest.raises(ValueError, match="another digest"):
        pool.register(page, b"e")
    pool.release([page])
    with pytest.raises(ValueError, match="has 0 reference"):
        pool.release([page])
    assert pool.refcount(page) == 0
    pool.check()


def test_placement_and_exhaustion():
    pool = PagePool(6, 4, shards=3)
    assert pool.per_shard == 2 and [pool.shard_of(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    table = [pool.allocate(j) for j in range(6)]
    assert [pool.shard_of(p) for p in table] == [0, 1, 2, 0, 1, 2]
    assert sorted(table) == list(range(6)) and all(pool.refcount(p) == 1 for p in table)
    assert not pool.can_allocate([0]) and pool.can_allocate([])
    with pytest.raises(PoolExhausted):
        pool.allocate(3)
    pool.release(table[1:2])                         # a free page on shard 1 only
    assert pool.can_allocate([4]) and not pool.can_allocate([1, 4]) and not pool.can_allocate([0])
    with pytest.raises(PoolExhausted):
        pool.allocate(0)
    assert pool.allocate(7) == table[1]
    pool.check()


def test_shared_prefix_survives_one_release():
    pool = PagePool(8, 2)
    tokens = [1, 2, 3, 4, 5]
    digests = page_hashes(tokens, 2)
    first = [pool.allocate(j) for j in range(3)]
    for page, digest in zip(first, digests):
        pool.register(page, digest)
    assert pool.lookup(digests) == first[:2]         # a second user shares the two full pages
    second = first[:2] + [pool.allocate(2)]
    assert [pool.refcount(p) for p in first] == [2, 2, 1]
    pool.release(first)
    assert [pool.refcount(p) for p in second] == [1, 1, 1]
    assert pool.available(0) == 8 - 3 and pool.stats()["pages_used"] == 3
    for _ in range(pool.available(0)):               # the whole rest of the pool: the shared pages stay
        pool.allocate(0)
    assert pool.lookup(digests) == first[:2]
    pool.check()


def test_lookup_longest_prefix_and_stats():
    pool = PagePool(8, 2)
    table = cached(pool, [1, 2, 3, 4, 5, 6])
    assert pool.lookup(page_hashes([1, 2, 3, 4, 9, 9, 5, 6], 2)) == table[:2]   # stops at the miss
    assert pool.lookup(page_hashes([7, 7, 3, 4], 2)) == []   # page 1's tokens match, its prefix not
    assert pool.lookup([]) == []
    stats = pool.stats()
    assert stats["prefix_queries"] == 4 + 2 and stats["prefix_hits"] == 2
    assert stats["pages_cached"] == 3 and stats["pages_used"] == 2 and stats["pages_free"] == 6
    assert stats["pages_total"] == 8 and stats["evictions"] == 0


def test_lookup_skips_a_page_on_the_wrong_shard():
    pool = PagePool(4, 2, shards=2)
    page = pool.allocate(1)                          # on shard 1, given logical page 0's digest by mistake
    digest = page_hashes([5, 5], 2)[0]
    pool.register(page, digest)
    assert pool.lookup([digest]) == []               # logical page 0 must be on shard 0: not shared
    pool.check()


def test_lookup_stops_at_the_first_miss():
    pool = PagePool(4, 2)
    digests = page_hashes([1, 1, 2, 2], 2)
    first = pool.allocate(0)
    pool.register(first, digests[0])
    other = [pool.allocate(0), pool.allocate(1)]     # the same prompt at once: page 0 a private duplicate
    pool.register(other[0], digests[0])
    pool.register(other[1], digests[1])
    pool.release([first])
    pool.allocate(0)
    pool.allocate(0)                                 # evicts `first`: digest 0 is gone, digest 1 not
    assert pool.lookup(digests) == [] and pool.stats()["pages_cached"] == 1
    pool.check()


def test_prefers_free_pages_before_evicting():
    pool = PagePool(4, 2)
    table = cached(pool, [1, 2, 3, 4])               # two cached pages, two never used
    assert pool.available(0) == 4
    fresh = [pool.allocate(0), pool.allocate(1)]
    assert not set(fresh) & set(table) and pool.stats()["evictions"] == 0
    assert pool.lookup(page_hashes([1, 2, 3, 4], 2)) == table


def test_lru_eviction_order():
    pool = PagePool(4, 2)
    old = cached(pool, [1, 1, 2, 2])                 # released first
    new = cached(pool, [3, 3, 4, 4])
    assert pool.available(0) == 4 and pool.stats()["pages_free"] == 4
    # no free pages left: evict the older chain, tail before head, then the newer one likewise
    assert [pool.allocate(0) for _ in range(4)] == [old[1], old[0], new[1], new[0]]
    assert pool.stats()["evictions"] == 4 and pool.stats()["pages_cached"] == 0
    with pytest.raises(PoolExhausted):
        pool.allocate(0)
    pool.check()


def test_lookup_makes_a_chain_recently_used():
    pool = PagePool(4, 2)
    old = cached(pool, [1, 1, 2, 2])
    new = cached(pool, [3, 3, 4, 4])
    pool.release(pool.lookup(page_hashes([1, 1, 2, 2], 2)))   # reused: now the most recent
    assert [pool.allocate(0) for _ in range(2)] == [new[1], new[0]]
    assert pool.lookup(page_hashes([1, 1, 2, 2], 2)) == old


def test_duplicate_stays_private_and_forget():
    pool = PagePool(4, 2)
    digest = page_hashes([1, 2], 2)[0]
    a, b = pool.allocate(0), pool.allocate(0)
    pool.register(a, digest)
    pool.register(b, digest)                         # a already holds it: b stays private
    pool.check()
    pool.register(a, digest)                         # registering again changes nothing
    pool.release([b])
    assert pool.stats()["pages_cached"] == 1 and pool.lookup([digest]) == [a]
    c = cached(pool, [7, 7])[0]
    pool.forget()
    assert pool.lookup([digest]) == [] and pool.stats()["pages_cached"] == 0
    assert (a, b, c) == (0, 1, 2) and pool.refcount(a) == 2
    assert pool.available(0) == 3                    # c is a plain free page now, like b and page 3
    assert sorted(pool.allocate(0) for _ in range(3)) == [1, 2, 3] and pool.stats()["evictions"] == 0
    pool.release([a, a])
    assert pool.allocate(0) == a and pool.stats()["evictions"] == 0   # a was freed, not evictable
    pool.check()


def test_module_imports_no_jax():
    source = pathlib.Path(__file__).parents[1] / "glm_jax" / "engine" / "pages.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or ".").split(".")[0])
    assert imported <= {"__future__", "collections", "hashlib", "numpy"}, imported


# --- random operation sequences against a reference model ------------------------------------------

PAGE = 2
DOCS = [[0, 0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0, 0], [1] * 9]


class PoolMachine(RuleBasedStateMachine):
    """Requests (prefixes of a few DOCS, so that prefixes repeat) start with a prefix lookup,
    allocate the rest, register their full pages (at once or later) and finish; single pages too.
    The model keeps refcounts, digests and a release clock per page and predicts every choice."""

    shards = 1
    num_pages = 8

    def __init__(self):
        super().__init__()
        self.pool = PagePool(self.num_pages, PAGE, self.shards)
        self.refs = [0] * self.num_pages
        self.digest_of: dict[int, bytes] = {}
        self.released_at = [0] * self.num_pages      # when the page last became unreferenced
        self.clock = 0
        self.requests: list[tuple[list[int], list]] = []   # (page table, (page, digest) to register)
        self.queries = self.hits = self.evictions = 0

    def shard(self, page):
        return page // (self.num_pages // self.shards)

    def unreferenced(self, shard):
        return [p for p in range(self.num_pages) if self.shard(p) == shard and not self.refs[p]]

    def model_allocate(self, logical):
        """The model's allocate: check the pool's choice, or that it raises PoolExhausted."""
        candidates = self.unreferenced(logical % self.shards)
        if not candidates:
            with pytest.raises(PoolExhausted):
                self.pool.allocate(logical)
            return None
        page = self.pool.allocate(logical)
        free = [p for p in candidates if p not in self.digest_of]
        if free:
            assert page in free
        else:                                        # least recently released cached page
            assert page == min(candidates, key=lambda p: self.released_at[p])
            del self.digest_of[page]
            self.evictions += 1
        self.refs[page] = 1
        return page

    def model_release(self, table):
        self.pool.release(table)
        for page in reversed(table):
            self.refs[page] -= 1
            if not self.refs[page]:
                self.clock += 1
                self.released_at[page] = self.clock

    @precondition(lambda self: len(self.requests) < 3)   # so that pages also come back
    @rule(doc=st.integers(0, len(DOCS) - 1), length=st.integers(0, len(DOCS[0])), register_now=st.booleans())
    def start_request(self, doc, length, register_now):
        """A prompt (a prefix of one of DOCS): look up its prefix, allocate the rest; register the new
        full pages now or later (as the engine does once a page's prefill is done), so that
        concurrent duplicates arise too."""
        tokens = DOCS[doc][:length]
        digests = page_hashes(tokens, PAGE)
        page_of = {d: p for p, d in self.digest_of.items()}
        expected = []
        for digest in digests:
            if digest not in page_of:
                break
            expected.append(page_of[digest])
        hits = self.pool.lookup(digests)
        assert hits == expected
        self.queries += len(digests)
        self.hits += len(hits)
        for page in hits:
            self.refs[page] += 1
        rest = range(len(hits), -(-len(tokens) // PAGE))
        needed = [len([j for j in rest if j % self.shards == s]) for s in range(self.shards)]
        fits = all(n <= len(self.unreferenced(s)) for s, n in enumerate(needed))
        assert self.pool.can_allocate(rest) == fits
        table = list(hits)
        for j in rest:
            page = self.model_allocate(j)
            if page is None:                         # out of pages: give back what it took
                assert not fits
                self.model_release(table)
                return
            table.append(page)
        assert [self.shard(p) for p in table] == [j % self.shards for j in range(len(table))]
        request = (table, list(zip(table[len(hits):], digests[len(hits):])))
        self.requests.append(request)
        if register_now:
            self.model_register(request)

    def model_register(self, request):
        _, pending = request
        for page, digest in pending:
            self.pool.register(page, digest)
            if digest not in self.digest_of.values():   # else a duplicate: stays private
                self.digest_of[page] = digest
        pending.clear()

    @precondition(lambda self: any(pending for _, pending in self.requests))
    @rule(data=st.data())
    def register_later(self, data):
        self.model_register(data.draw(st.sampled_from([r for r in self.requests if r[1]])))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data):
        table, _ = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        self.model_release(table)

    @precondition(lambda self: len(self.requests) < 3)
    @rule(logical=st.integers(0, 5))
    def allocate_one(self, logical):
        page = self.model_allocate(logical)
        if page is not None:
            self.requests.append(([page], []))

    @rule(dice=st.integers(0, 9))
    def forget(self, dice):
        if dice == 9:                                # rarely: the cache would never fill otherwise
            self.pool.forget()
            self.digest_of.clear()

    @invariant()
    def agrees_with_model(self):
        self.pool.check()
        assert [self.pool.refcount(p) for p in range(self.num_pages)] == self.refs
        for shard in range(self.shards):
            assert self.pool.available(shard) == len(self.unreferenced(shard))
        assert self.pool.stats() == {
            "pages_total": self.num_pages, "pages_used": sum(r > 0 for r in self.refs),
            "pages_cached": len(self.digest_of), "pages_free": self.refs.count(0),
            "prefix_queries": self.queries, "prefix_hits": self.hits, "evictions": self.evictions}


class ThreeShardMachine(PoolMachine):
    shards = 3
    num_pages = 9


SETTINGS = settings(max_examples=80, stateful_step_count=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestPoolOneShard = PoolMachine.TestCase
TestPoolOneShard.settings = SETTINGS
TestPoolThreeShards = ThreeShardMachine.TestCase
TestPoolThreeShards.settings = SETTINGS
