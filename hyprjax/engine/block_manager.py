"""Host-side KV page allocator: free list, reference counts and prefix caching. No device code.

A page holds `page_size` tokens' K/V. Full, computed pages are registered under a chained hash,
hash(parent hash, the page's token ids), so one hash names the whole prefix up to the end of
that page and a later request with the same prefix reuses the page instead of recomputing it.
The digest is 128-bit blake2b, so a hit is trusted without comparing tokens.

A page whose last reference goes away keeps its hash and waits in an LRU of cached free pages:
it still counts as free, and is only overwritten (its hash dropped) when no never-hashed page is
left. Sequences free their pages tail first, so the deepest pages of a prefix are evicted
before the shallow ones every later hit needs.

Shared pages are never written: a hit only covers full pages strictly before the first token
the sequence still has to compute, and when every page of a prompt would hit, the last one is
recomputed into a fresh page so the model still has a token to produce logits from.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from .sequence import Sequence

_ROOT = b""  # parent "hash" of a sequence's first page


def _chain(parent: bytes, tokens: list[int]) -> bytes:
    """Hash of a page given its parent's hash: it identifies every token up to the page's end."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def _pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    """Pages for KV, shared between sequences through reference counts and a prefix cache."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be an integer >= 1")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be an integer >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages  # set only while registered
        self._hash_to_page: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_pages))  # ref 0, no hash
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        # Chain hashes of each allocated sequence's leading full, computed pages (registered or
        # not: a duplicate of a page someone else registered first still extends the chain).
        self._chains: dict[Sequence, list[bytes]] = {}
        self._prefix_hits = 0  # tokens served from the prefix cache
        self._prefix_queries = 0  # tokens looked up (all tokens of every admitted sequence)

    # ---- numbers

    @property
    def num_free_pages(self) -> int:
        """Pages allocatable now, cached free ones included."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of pages referenced by some sequence, 0..1."""
        return self.num_used_pages / self.num_pages

    def ref_count(self, page: int) -> int:
        """How many sequences hold `page`."""
        return self._ref[page]

    def stats(self) -> dict:
        """Counters for metrics; prefix_hits / prefix_queries is the token hit rate."""
        return dict(pages_total=self.num_pages, pages_used=self.num_used_pages,
                    pages_cached_free=len(self._cached_free), prefix_hits=self._prefix_hits,
                    prefix_queries=self._prefix_queries)

    # ---- admission

    def _lookup(self, tokens: list[int], root: bytes = _ROOT) -> tuple[list[int], list[bytes]]:
        """Pages (and their hashes) that already hold a prefix of `tokens`, leaving >= 1 token to compute.

        `root` is the sequence's cache salt: its adapter mix, since the same tokens under other
        adapters have other K/V.
        """
        if not self.enable_prefix_caching:
            return [], []
        ps = self.page_size
        pages, chain, h = [], [], root
        for i in range((len(tokens) - 1) // ps):  # full pages that end before the last token
            h = _chain(h, tokens[i * ps:(i + 1) * ps])
            page = self._hash_to_page.get(h)
            if page is None:
                break
            pages.append(page)
            chain.append(h)
        return pages, chain

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would find pages for every token that is not a prefix hit."""
        hits, _ = self._lookup(seq.all_token_ids, seq.cache_salt)
        revived = sum(1 for p in hits if self._ref[p] == 0)  # hits taken out of the cached free pool
        need = _pages_for(seq.num_tokens, self.page_size) - len(hits)
        return need <= self.num_free_pages - revived

    def allocate(self, seq: Sequence) -> None:
        """Give a newly admitted `seq` pages for all its tokens, reusing prefix hits."""
        if seq.block_table or seq in self._chains:
            raise RuntimeError(f"allocate: request {seq.request_id!r} already holds pages {seq.block_table}")
        if not self.can_allocate(seq):
            raise RuntimeError(f"allocate: not enough free pages for request {seq.request_id!r} "
                               f"({seq.num_tokens} tokens, {self.num_free_pages} pages free); "
                               "call can_allocate first")
        hits, chain = self._lookup(seq.all_token_ids, seq.cache_salt)
        for page in hits:
            if self._ref[page] == 0:
                del self._cached_free[page]
            self._ref[page] += 1
        fresh = [self._take() for _ in range(_pages_for(seq.num_tokens, self.page_size) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.page_size
        self._chains[seq] = chain
        self._prefix_hits += seq.num_cached_tokens
        self._prefix_queries += seq.num_tokens

    def _take(self) -> int:
        """A page for new data: a never-hashed one first, else the least recently freed cached one."""
        if self._free:
            page = self._free.popleft()
        elif self._cached_free:
            page, _ = self._cached_free.popitem(last=False)
            h = self._page_hash[page]
            assert h is not None and self._hash_to_page[h] == page
            del self._hash_to_page[h]
            self._page_hash[page] = None
        else:
            raise RuntimeError("out of KV pages; the scheduler should have checked can_allocate/can_append")
        assert self._ref[page] == 0
        self._ref[page] = 1
        return page

    # ---- growth

    def _missing(self, seq: Sequence, n: int) -> int:
        return max(0, _pages_for(seq.num_computed_tokens + n, self.page_size) - len(seq.block_table))

    def can_append(self, seq: Sequence, n: int) -> bool:
        """Whether the pages for `n` more computed tokens of `seq` can be found."""
        return self._missing(seq, n) <= self.num_free_pages

    def append(self, seq: Sequence, n: int) -> None:
        """Grow `seq.block_table` to cover `seq.num_computed_tokens + n` tokens."""
        if seq not in self._chains:
            raise RuntimeError(f"append: request {seq.request_id!r} holds no pages (not allocated, or freed)")
        missing = self._missing(seq, n)
        if missing > self.num_free_pages:
            raise RuntimeError(f"append: request {seq.request_id!r} needs {missing} pages, "
                               f"{self.num_free_pages} free; call can_append first")
        seq.block_table.extend(self._take() for _ in range(missing))

    def commit(self, seq: Sequence) -> None:
        """Register the pages of `seq` that became full and computed, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        chain = self._chains.get(seq)
        if chain is None:
            raise RuntimeError(f"commit: request {seq.request_id!r} holds no pages (not allocated, or freed)")
        ps = self.page_size
        full = seq.num_computed_tokens // ps
        assert full <= len(seq.block_table), "computed tokens beyond the block table"
        if len(chain) >= full:
            return
        tokens = seq.all_token_ids
        h = chain[-1] if chain else seq.cache_salt
        for i in range(len(chain), full):
            h = _chain(h, tokens[i * ps:(i + 1) * ps])
            chain.append(h)
            page = seq.block_table[i]
            # The first page registered under a hash keeps it: others may already share that page.
            if h not in self._hash_to_page and self._page_hash[page] is None:
                self._hash_to_page[h] = page
                self._page_hash[page] = h

    # ---- release

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; pages nobody holds become free (hashed ones stay hit-able)."""
        if seq not in self._chains:
            raise RuntimeError(f"free: request {seq.request_id!r} holds no pages (double free?)")
        del self._chains[seq]
        for page in reversed(seq.block_table):  # tail first: see the module docstring
            if self._ref[page] <= 0:
                raise RuntimeError(f"free: page {page} of request {seq.request_id!r} is not referenced")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if self._page_hash[page] is not None:
                    self._cached_free[page] = None
                else:
                    self._free.append(page)
        seq.block_table = []

    def reset(self) -> None:
        """Forget every page's contents (the KV pool was rebuilt): all pages free, the prefix cache empty.

        Every sequence must have freed its pages first; the hit counters are kept.
        """
        held = [p for p, r in enumerate(self._ref) if r]
        if held or self._chains:
            raise RuntimeError(f"reset: {len(held)} pages are still held by {len(self._chains)} sequences "
                               f"(first: {held[:8]}); free every sequence before a reset")
        self._page_hash = [None] * self.num_pages
        self._hash_to_page.clear()
        self._cached_free.clear()
        self._free = deque(range(self.num_pages))
