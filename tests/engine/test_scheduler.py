"""Scheduler policy, driven by a fake model loop: no device, no JAX compute.

The fake model writes each fed token into a fake KV store (page -> offset -> token id) and, before
every step, checks that each planned sequence's computed context reads back as its own tokens: a
wrong prefix hit, a shared page overwritten or a bad recompute shows up as a mismatch.
"""

from __future__ import annotations

import collections
import random

import pytest

from hyprjax.engine.block_manager import BlockManager
from hyprjax.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from hyprjax.engine.sequence import Sequence, SequenceStatus
from hyprjax.sampling import SamplingParams


def token_for(seq: Sequence) -> int:
    """The fake model's next token: depends only on how many the request has, so recompute agrees."""
    return 10_000 + seq.num_output_tokens


class FakeEngine:
    def __init__(self, num_pages=64, page_size=4, prefix_caching=True, **config):
        self.bm = BlockManager(num_pages, page_size, prefix_caching)
        self.config = SchedulerConfig(**config)
        self.sched = Scheduler(self.config, self.bm)
        self.kv: dict[int, dict[int, int]] = {}
        self.seqs: dict[str, Sequence] = {}
        self.admitted: list[str] = []  # request ids in the order they were first planned
        self.num_steps = 0

    def add(self, rid, prompt, max_tokens=8):
        prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
        seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens))
        self.sched.add(seq)
        self.seqs[rid] = seq
        return seq

    def step(self, between=None) -> SchedulerOutput:
        """schedule -> (between) -> model -> update -> sample -> finish, checking invariants throughout."""
        decoding = {id(s) for s in self.sched.running if s.in_decode}
        out = self.sched.schedule()
        self.check_plan(out)
        # Every running sequence in decode gets its token (the budget always covers max_num_seqs).
        assert decoding <= {id(s.seq) for s in out.decodes} | {id(s) for s in out.preempted}
        if between:
            between(out)
        ps = self.bm.page_size
        for s in (*out.decodes, *out.prefills):
            seq = s.seq
            if seq.is_finished:
                continue
            tokens = seq.all_token_ids
            context = [self.kv[seq.block_table[p // ps]][p % ps] for p in range(seq.num_computed_tokens)]
            assert context == tokens[:seq.num_computed_tokens], f"{seq.request_id} reads a wrong context"
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + s.num_tokens):
                page = seq.block_table[p // ps]
                assert self.bm.ref_count(page) == 1, "a shared page is being written"
                self.kv.setdefault(page, {})[p % ps] = tokens[p]
        self.sched.update(out)
        for s in (*out.decodes, *out.prefills):
            if s.samples and not s.seq.is_finished:
                assert s.seq.num_uncomputed == 0
                s.seq.append_token(token_for(s.seq))
                if s.seq.num_output_tokens == s.seq.params.max_tokens:
                    self.sched.finish(s.seq, "length")
        self.check_state()
        self.num_steps += 1
        return out

    def run(self, max_steps=10_000, between=None):
        while self.sched.has_unfinished():
            self.step(between)
            assert self.num_steps < max_steps, "the scheduler stopped making progress"

    def check_plan(self, out: SchedulerOutput) -> None:
        cfg = self.config
        planned = [s.seq for s in (*out.decodes, *out.prefills)]
        assert len(planned) == len(set(map(id, planned))), "a sequence planned twice"
        assert all(s.num_tokens == 1 for s in out.decodes)
        assert all(s.num_tokens >= 1 for s in out.prefills)
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len(out.prefills) <= cfg.max_prefill_seqs
        assert not set(map(id, out.preempted)) & set(map(id, planned))
        for seq in planned:
            assert seq.status is SequenceStatus.RUNNING
            if seq.request_id not in self.admitted:
                self.admitted.append(seq.request_id)
        self.check_state()

    def check_state(self) -> None:
        running = self.sched.running
        assert len(running) <= self.config.max_num_seqs
        slots = [s.slot for s in running]
        assert None not in slots and len(set(slots)) == len(slots)
        assert all(0 <= s < self.config.max_num_seqs for s in slots)
        for seq in self.sched.waiting:
            assert seq.status is SequenceStatus.WAITING and seq.slot is None and not seq.block_table
            assert seq.num_computed_tokens == 0
        held = collections.Counter(p for s in running for p in s.block_table)
        assert all(self.bm.ref_count(p) == held[p] for p in range(self.bm.num_pages))
        assert self.bm.num_used_pages == len(held)

    def check_done(self) -> None:
        assert not self.sched.has_unfinished()
        assert self.bm.num_used_pages == 0 and self.bm.num_free_pages == self.bm.num_pages
        for seq in self.seqs.values():
            assert seq.is_finished and seq.slot is None and not seq.block_table
            if seq.finish_reason == "length":
                assert seq.output_token_ids == [10_000 + i for i in range(seq.params.max_tokens)]


def test_config_is_validated():
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs"):
        with pytest.raises(ValueError, match=name):
            SchedulerConfig(**{name: 0})
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be >= max_num_seqs=16"):
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8)


def test_add_rejects_what_can_never_fit():
    eng = FakeEngine(num_pages=4, page_size=4)
    need = r"10 prompt tokens \+ max_tokens=8 need 5 KV pages of 4 tokens, the pool has 4"
    with pytest.raises(ValueError, match=need):
        eng.add("big", 10, max_tokens=8)
    eng.add("ok", 8, max_tokens=8)
    with pytest.raises(ValueError, match="already queued"):
        eng.add("ok", 3)
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        Sequence("empty", [], SamplingParams())


def test_continuous_batching_joins_mid_way():
    eng = FakeEngine(max_num_seqs=4, max_num_batched_tokens=64)
    a, b = eng.add("a", 5, max_tokens=10), eng.add("b", 7, max_tokens=10)
    out = eng.step()
    assert [s.seq for s in out.prefills] == [a, b] and [s.num_tokens for s in out.prefills] == [5, 7]
    assert all(s.samples for s in out.prefills) and not out.decodes
    eng.step(), eng.step()
    c = eng.add("c", 6, max_tokens=10)  # arrives while a and b are decoding
    out = eng.step()
    assert [s.seq for s in out.decodes] == [a, b] and [s.seq for s in out.prefills] == [c]
    out = eng.step()
    assert [s.seq for s in out.decodes] == [a, b, c] and not out.prefills
    eng.run()
    eng.check_done()
    assert eng.num_steps == 3 + 10  # c joined at token granularity: it ends 3 steps after a and b


def test_chunked_prefill_runs_beside_decodes():
    eng = FakeEngine(num_pages=64, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2)
    a = eng.add("a", 3, max_tokens=40)
    eng.step()
    b = eng.add("b", 100, max_tokens=4)
    chunks = []
    while b.num_output_tokens == 0:
        out = eng.step()
        assert [s.seq for s in out.decodes] == [a], "the long prompt stalled a decode"
        (chunk,) = out.prefills
        assert chunk.seq is b and chunk.samples == (b.num_output_tokens == 1)
        chunks.append(chunk.num_tokens)
    assert chunks == [15] * 6 + [10]
    out = eng.step()
    assert [s.seq for s in out.decodes] == [a, b]
    eng.run()
    eng.check_done()


def test_max_prefill_seqs_and_budget_limit_admission():
    eng = FakeEngine(max_num_seqs=8, max_num_batched_tokens=20, max_prefill_seqs=2)
    for i in range(5):
        eng.add(f"r{i}", 6, max_tokens=3)
    out = eng.step()
    assert [s.seq.request_id for s in out.prefills] == ["r0", "r1"]
    out = eng.step()  # two decodes leave 18 tokens: r2, r3 prefill 6 each
    assert len(out.decodes) == 2 and [s.seq.request_id for s in out.prefills] == ["r2", "r3"]
    eng.run()
    eng.check_done()


def test_fcfs_admission_and_head_of_line_blocking():
    eng = FakeEngine(num_pages=8, page_size=4, max_num_seqs=2, max_num_batched_tokens=32)
    for i in range(6):
        eng.add(f"r{i}", 5 + i % 3, max_tokens=3 + i % 2)
    eng.run()
    eng.check_done()
    assert eng.admitted == [f"r{i}" for i in range(6)]

    eng = FakeEngine(num_pages=8, page_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    eng.add("small0", 14, max_tokens=8)  # 4 pages now, 6 by the end
    eng.step()
    big = eng.add("big", range(200, 220), max_tokens=4)  # needs 5 pages: 4 are free
    eng.add("small1", 2, max_tokens=2)  # would fit, but waits behind big
    while big.status is SequenceStatus.WAITING:
        assert eng.seqs["small1"].status is SequenceStatus.WAITING
        eng.step()
    assert eng.num_steps > 5  # big waited for small0's pages
    eng.run()
    eng.check_done()
    assert eng.admitted == ["small0", "big", "small1"]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_pool_completes_every_request(prefix_caching):
    eng = FakeEngine(num_pages=10, page_size=4, prefix_caching=prefix_caching, max_num_seqs=6,
                     max_num_batched_tokens=24, max_prefill_seqs=3)
    rng = random.Random(1)
    for i in range(8):
        eng.add(f"r{i}", [rng.randrange(50) for _ in range(rng.randint(5, 12))], max_tokens=rng.randint(6, 20))
    eng.run()
    eng.check_done()
    assert eng.sched.stats()["preemptions"] > 0
    assert sum(s.num_preemptions for s in eng.seqs.values()) == eng.sched.stats()["preemptions"]
    assert all(s.finish_reason == "length" for s in eng.seqs.values())


def test_preempted_sequence_recomputes_through_the_prefix_cache():
    eng = FakeEngine(num_pages=6, page_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    a, b = eng.add("a", 8, max_tokens=6), eng.add("b", range(300, 308), max_tokens=14)  # 4 and 6 pages at the end
    eng.step()
    first_page = b.block_table[0]
    while not b.num_preemptions:
        out = eng.step()
    assert out.preempted == [b] and eng.sched.waiting[0] is b
    while b.status is SequenceStatus.WAITING:
        eng.step()
    assert a.is_finished  # b came back only once a had finished
    assert b.num_cached_tokens == 8  # its own first pages were still cached free (a took its third)
    assert b.block_table[0] == first_page
    eng.run()
    eng.check_done()


def test_prefix_hits_shorten_the_first_chunk():
    eng = FakeEngine(max_num_batched_tokens=64)
    system = list(range(500, 516))
    eng.add("a", system + [1, 2], max_tokens=2)
    eng.run()
    b = eng.add("b", system + [3, 4, 5], max_tokens=2)
    out = eng.step()
    assert b.num_cached_tokens == 16 and [s.num_tokens for s in out.prefills] == [3]
    eng.run()
    eng.check_done()
    st = eng.bm.stats()
    assert st["prefix_hits"] == 16 and st["pages_used"] == 0


def test_abort_at_any_point_frees_everything():
    rng = random.Random(2)
    eng = FakeEngine(num_pages=16, page_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2)
    aborted = set()

    def abort(rid):
        seq = eng.sched.abort(rid)
        if seq is not None:
            assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
            assert seq.slot is None and not seq.block_table
            aborted.add(rid)
        assert eng.sched.abort(rid) is None  # a second abort is a no-op

    def between(out):  # while the "model" runs the step
        for s in (*out.decodes, *out.prefills):
            if rng.random() < 0.05:
                abort(s.seq.request_id)

    n = 0
    while n < 60 or eng.sched.has_unfinished():
        if n < 60 and rng.random() < 0.6:
            eng.add(f"r{n}", [rng.randrange(30) for _ in range(rng.randint(1, 20))], max_tokens=rng.randint(1, 12))
            n += 1
        if rng.random() < 0.1 and eng.seqs:  # waiting, running, mid-prefill, or already done
            abort(rng.choice(list(eng.seqs)))
        eng.step(between)
        assert eng.num_steps < 5000
    eng.check_done()
    assert eng.sched.abort("never-added") is None
    assert 5 < len(aborted) < 60
    assert {r for r, s in eng.seqs.items() if s.finish_reason == "abort"} == aborted
    st = eng.sched.stats()
    assert st["running"] == st["waiting"] == 0 and st["kv_usage"] == 0
