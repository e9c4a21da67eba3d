"""BlockManager: allocation, reference counts, prefix caching, LRU reuse, and no leaks."""

from __future__ import annotations

import collections
import random

import pytest

from hyprjax.engine.block_manager import BlockManager
from hyprjax.engine.sequence import Sequence
from hyprjax.sampling import SamplingParams

PS = 4


def make_seq(tokens, rid="r", max_tokens=8):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=max_tokens))


class FakeKV:
    """What a model would write: kv[page][offset] = token id, so tests can check every computed position."""

    def __init__(self, bm: BlockManager):
        self.bm, self.kv = bm, {}

    def compute(self, seq: Sequence, n: int) -> None:
        """Feed n tokens of seq (append pages, write them, advance, commit), as one engine step does."""
        self.bm.append(seq, n)
        tokens = seq.all_token_ids
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            page = seq.block_table[p // self.bm.page_size]
            assert self.bm.ref_count(page) == 1, "a shared page is being written"
            self.kv.setdefault(page, {})[p % self.bm.page_size] = tokens[p]
        seq.num_computed_tokens += n
        self.bm.commit(seq)

    def check(self, seq: Sequence) -> None:
        tokens, ps = seq.all_token_ids, self.bm.page_size
        got = [self.kv[seq.block_table[p // ps]][p % ps] for p in range(seq.num_computed_tokens)]
        assert got == tokens[:seq.num_computed_tokens]


def check_refs(bm: BlockManager, live) -> None:
    held = collections.Counter(p for s in live for p in s.block_table)
    assert all(bm.ref_count(p) == held[p] for p in range(bm.num_pages))
    assert bm.num_used_pages == len(held)
    assert bm.num_free_pages == bm.num_pages - len(held)
    for s in live:
        assert len(s.block_table) == len(set(s.block_table))
        assert len(s.block_table) * bm.page_size >= s.num_computed_tokens


def test_allocate_and_free():
    bm = BlockManager(10, PS)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert (bm.num_used_pages, bm.num_free_pages, bm.usage) == (3, 7, pytest.approx(0.3))
    check_refs(bm, [seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_used_pages == 0 and bm.num_free_pages == 10 and bm.usage == 0
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(seq)
    with pytest.raises(RuntimeError, match="holds no pages"):
        bm.commit(seq)


def test_allocate_refuses_when_full_and_misuse():
    bm = BlockManager(2, PS)
    big = make_seq(range(9))  # 3 pages
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="not enough free pages"):
        bm.allocate(big)
    seq = make_seq(range(8))
    bm.allocate(seq)
    with pytest.raises(RuntimeError, match="already holds pages"):
        bm.allocate(seq)
    seq.num_computed_tokens = 8  # the prompt ran; the next token needs a third page
    assert not bm.can_append(seq, 1)
    with pytest.raises(RuntimeError, match="call can_append"):
        bm.append(seq, 1)
    for bad in (dict(num_pages=0, page_size=4), dict(num_pages=4, page_size=0)):
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v == 0))):
            BlockManager(**bad)


def test_append_grows_across_page_boundaries():
    bm = BlockManager(10, PS)
    kv = FakeKV(bm)
    seq = make_seq(range(6))
    bm.allocate(seq)
    kv.compute(seq, 6)
    for t in range(7):  # decode: each step feeds the last sampled token
        seq.append_token(100 + t)
        assert bm.can_append(seq, 1)
        kv.compute(seq, 1)
        assert len(seq.block_table) == -(-seq.num_computed_tokens // PS)
    kv.check(seq)
    assert bm.num_used_pages == len(seq.block_table) == 4  # 13 tokens


def test_shared_system_prompt_hits_and_ref_counts():
    bm = BlockManager(16, PS)
    kv = FakeKV(bm)
    system = list(range(50, 58))  # two full pages
    a = make_seq(system + [1, 2, 3], "a")
    bm.allocate(a)
    kv.compute(a, a.num_tokens)
    b = make_seq(system + [7, 8, 9, 10, 11], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(p) for p in a.block_table] == [2, 2, 1]
    check_refs(bm, [a, b])
    kv.compute(b, b.num_uncomputed)
    kv.check(a), kv.check(b)
    st = bm.stats()
    assert st["prefix_hits"] == 8 and st["prefix_queries"] == a.num_tokens + b.num_tokens
    bm.free(a)  # b still holds the shared pages
    assert [bm.ref_count(p) for p in b.block_table[:2]] == [1, 1]
    check_refs(bm, [b])
    bm.free(b)
    assert bm.num_used_pages == 0


def test_hit_never_covers_the_whole_prompt():
    bm = BlockManager(16, PS)
    kv = FakeKV(bm)
    a = make_seq(range(12), "a")  # exactly three full pages
    bm.allocate(a)
    kv.compute(a, 12)
    b = make_seq(range(12), "b")
    bm.allocate(b)
    assert b.num_computed_tokens == 8 and b.num_uncomputed == 4  # the last page is recomputed...
    assert b.block_table[2] != a.block_table[2] and bm.ref_count(b.block_table[2]) == 1  # ...into its own page
    kv.compute(b, 4)
    kv.check(b)
    c = make_seq(range(13), "c")  # one token past the cached pages: all three hit
    bm.allocate(c)
    assert c.num_computed_tokens == 12 and c.num_uncomputed == 1
    assert c.block_table[:3] == a.block_table


def test_cached_free_pages_are_reused_then_evicted_lru():
    bm = BlockManager(6, PS)
    kv = FakeKV(bm)
    a = make_seq(range(9), "a")  # pages: 2 full (hashed) + 1 partial
    bm.allocate(a)
    kv.compute(a, 9)
    pages = list(a.block_table)
    bm.free(a)
    assert bm.num_free_pages == 6 and bm.stats()["pages_cached_free"] == 2
    again = make_seq(list(range(8)) + [99], "again")  # revives the two cached free pages
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.block_table[:2] == pages[:2] and again.num_cached_tokens == 8
    assert bm.stats()["pages_cached_free"] == 0 and bm.num_used_pages == 3
    kv.compute(again, 1)
    kv.check(again)
    bm.free(again)

    # Fill the pool with other data: never-hashed pages go first, then the cached ones, tail first.
    fill = make_seq(range(200, 216), "fill")  # 4 pages: the 4 never-hashed free ones
    bm.allocate(fill)
    assert bm.stats()["pages_cached_free"] == 2
    one = make_seq([300], "one")
    bm.allocate(one)  # evicts the least recently freed cached page: the second one (freed tail first)
    assert one.block_table == [pages[1]] and bm.stats()["pages_cached_free"] == 1
    bm.free(fill), bm.free(one)
    probe = make_seq(range(12), "probe")
    bm.allocate(probe)
    assert probe.num_cached_tokens == 4 and probe.block_table[0] == pages[0]  # page 2's hash is gone
    bm.free(probe)
    assert bm.num_used_pages == 0


def test_prefix_caching_off():
    bm = BlockManager(8, PS, enable_prefix_caching=False)
    kv = FakeKV(bm)
    a = make_seq(range(9), "a")
    bm.allocate(a)
    kv.compute(a, 9)
    b = make_seq(range(9), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    bm.free(a), bm.free(b)
    assert bm.stats()["pages_cached_free"] == 0 and bm.num_free_pages == 8


def test_no_leak_after_1000_random_lifecycles():
    rng = random.Random(0)
    bm = BlockManager(24, PS)  # small enough that admissions get refused and cached pages evicted
    kv = FakeKV(bm)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 14))] for _ in range(5)]
    live: list[Sequence] = []
    started = hits = 0
    while started < 1000 or live:
        if started < 1000 and rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 10))]
            seq = make_seq(prompt, f"r{started}")
            started += 1
            if bm.can_allocate(seq):
                bm.allocate(seq)
                hits += seq.num_cached_tokens > 0
                live.append(seq)
        for seq in list(live):
            r = rng.random()
            if r < 0.15:  # finished or aborted, at any point (mid-prefill included)
                live.remove(seq)
                bm.free(seq)
                continue
            n = rng.randint(1, seq.num_uncomputed)  # a prefill chunk, or a decode (n == 1)
            if bm.can_append(seq, n):
                kv.compute(seq, n)
                if seq.num_uncomputed == 0:  # the chunk reached the end: the model sampled a token
                    seq.append_token(rng.randrange(1000))
            kv.check(seq)
        check_refs(bm, live)
    assert hits > 100, "the shared prefixes should have hit"
    assert bm.num_used_pages == 0 and bm.num_free_pages == bm.num_pages and bm.usage == 0
    st = bm.stats()
    assert st["pages_used"] == 0 and 0 < st["prefix_hits"] < st["prefix_queries"]
