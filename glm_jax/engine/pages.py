"""The host side of the paged KV cache: which pages each request holds, and prefix caching.

The device holds, per layer, K and V as [kv_heads, num_pages, page_size, head_dim] with the page
dim sharded over `shards` devices in contiguous blocks (shard d owns pages [d*per, (d+1)*per)).
Logical page j of any request lives on shard j % shards. A page is exactly one of: referenced
(refcount > 0, held by running requests), free (unreferenced, no digest), evictable (unreferenced,
holds the digest of a full page that later requests may share; dropped least recently used first).
No JAX here: pure Python, every operation O(1) or O(pages touched).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

DIGEST_SIZE = 16


class PoolExhausted(Exception):
    """No page is available on the shard asked for."""


def page_hashes(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained digests of each FULL page of `tokens`: digest_j = blake2b(digest_{j-1} + the int32
    little-endian bytes of page j's tokens), 16 bytes; digest_{-1} = parent. A partial last page
    gets no digest. Same tokens after the same prefix -> same digest; any difference before -> not."""
    if page_size < 1:
        raise ValueError(f"page_size must be positive, got {page_size}")
    data = np.asarray(tokens, dtype="<i4").tobytes()
    step = 4 * page_size
    digests, digest = [], parent
    for start in range(0, len(data) - step + 1, step):
        digest = hashlib.blake2b(digest + data[start:start + step], digest_size=DIGEST_SIZE).digest()
        digests.append(digest)
    return digests


class PagePool:
    """Page ids, reference counts and the prefix cache of a pool of `num_pages` pages of
    `page_size` tokens, striped over `shards` devices."""

    def __init__(self, num_pages: int, page_size: int, shards: int = 1):
        if shards < 1 or num_pages < 1 or num_pages % shards:
            raise ValueError(f"num_pages ({num_pages}) must be a positive multiple of shards ({shards})")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.num_pages, self.page_size, self.shards = num_pages, page_size, shards
        self.per_shard = num_pages // shards
        self._refs = [0] * num_pages
        self._used = 0                                   # pages with refcount > 0
        self._digest_of: dict[int, bytes] = {}           # page -> digest of the tokens it holds
        self._page_of: dict[bytes, int] = {}             # digest -> page
        self._free = [collections.deque(range(d * self.per_shard, (d + 1) * self.per_shard))
                      for d in range(shards)]
        self._evictable: list[collections.OrderedDict[int, None]] = [
            collections.OrderedDict() for _ in range(shards)]   # least recently used first
        self._queries = self._hits = self._evictions = 0

    def shard_of(self, page: int) -> int:
        """The shard that holds `page`."""
        self._check_page(page)
        return page // self.per_shard

    def available(self, shard: int) -> int:
        """Pages allocate() can hand out on `shard` now: free plus evictable."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} out of range [0, {self.shards})")
        return len(self._free[shard]) + len(self._evictable[shard])

    def can_allocate(self, logical: Iterable[int]) -> bool:
        """Whether pages for all these logical page numbers (each on shard j % shards) can be
        allocated now."""
        needed = collections.Counter(self._shard_for(j) for j in logical)
        return all(self.available(shard) >= count for shard, count in needed.items())

    def allocate(self, logical: int) -> int:
        """A page for logical page `logical` (on shard logical % shards) with refcount 1: a free
        page if there is one, else the least recently used evictable page (its digest dropped).
        Raises PoolExhausted when the shard has neither."""
        shard = self._shard_for(logical)
        if self._free[shard]:
            page = self._free[shard].popleft()
        elif self._evictable[shard]:
            page, _ = self._evictable[shard].popitem(last=False)
            del self._page_of[self._digest_of.pop(page)]
            self._evictions += 1
        else:
            raise PoolExhausted(f"no page available on shard {shard} of {self.shards}")
        self._refs[page] = 1
        self._used += 1
        return page

    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of `digests` (digest i on shard i % shards; stops
        at the first miss), taking one reference on each."""
        pages = []
        for i, digest in enumerate(digests):
            page = self._page_of.get(digest)
            if page is None or page // self.per_shard != i % self.shards:
                break
            self._take(page)
            pages.append(page)
        self._queries += len(digests)
        self._hits += len(pages)
        return pages

    def register(self, page: int, digest: bytes) -> None:
        """Record that the referenced `page` is full and holds the tokens `digest` names, so later
        lookups may share it; nothing changes if another page already holds that digest."""
        self._check_page(page)
        if not self._refs[page]:
            raise ValueError(f"page {page} is not referenced")
        held = self._digest_of.get(page)
        if held is not None and held != digest:
            raise ValueError(f"page {page} already holds another digest")
        if digest not in self._page_of:
            self._page_of[digest] = page
            self._digest_of[page] = digest

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference on each page of a page table (in logical order). At refcount 0 a
        cached page becomes evictable (tail first, so a chain's head stays more recently used), an
        uncached one free. Raises ValueError, changing nothing, if a page is not referenced that often."""
        for page, count in collections.Counter(pages).items():
            self._check_page(page)
            if self._refs[page] < count:
                raise ValueError(f"page {page} has {self._refs[page]} reference(s), fewer than the {count} released")
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            self._used -= 1
            shard = page // self.per_shard
            if page in self._digest_of:
                self._evictable[shard][page] = None
            else:
                self._free[shard].append(page)

    def forget(self) -> None:
        """Drop every digest: evictable pages become free, referenced pages stay referenced."""
        for shard in range(self.shards):
            self._free[shard].extend(self._evictable[shard])
            self._evictable[shard].clear()
        self._digest_of.clear()
        self._page_of.clear()

    def refcount(self, page: int) -> int:
        """The number of references on `page`."""
        self._check_page(page)
        return self._refs[page]

    def stats(self) -> dict:
        """Counts for /metrics: pages total / used (referenced) / cached (holding a digest) / free
        (available, all shards), pages looked up and found, evictions."""
        return {
            "pages_total": self.num_pages,
            "pages_used": self._used,
            "pages_cached": len(self._page_of),
            "pages_free": sum(map(self.available, range(self.shards))),
            "prefix_queries": self._queries,
            "prefix_hits": self._hits,
            "evictions": self._evictions,
        }

    def check(self) -> None:
        """Assert the internal invariants (O(num_pages); for tests)."""
        assert all(r >= 0 for r in self._refs)
        assert self._used == sum(r > 0 for r in self._refs)
        assert self._page_of == {d: p for p, d in self._digest_of.items()}
        assert len(self._page_of) == len(self._digest_of)
        for shard in range(self.shards):
            free, evictable = set(self._free[shard]), set(self._evictable[shard])
            assert len(free) == len(self._free[shard]) and not free & evictable
            owned = range(shard * self.per_shard, (shard + 1) * self.per_shard)
            assert free | evictable == {p for p in owned if not self._refs[p]}
            assert all(p not in self._digest_of for p in free)
            assert all(p in self._digest_of for p in evictable)

    def _take(self, page: int) -> None:
        """One more reference on a cached page (an evictable one leaves the evictable set)."""
        if not self._refs[page]:
            del self._evictable[page // self.per_shard][page]
            self._used += 1
        self._refs[page] += 1

    def _shard_for(self, logical: int) -> int:
        if logical < 0:
            raise ValueError(f"logical page must be >= 0, got {logical}")
        return logical % self.shards

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} out of range [0, {self.num_pages})")
