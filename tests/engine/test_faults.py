"""Faults injected into the real engine on a tiny Qwen3: a failed step fails only its requests and
the engine serves on with correct output, an unrecoverable one is reported, inbox handlers never
kill the loop, and adapter merges never run on the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time

import jax
import numpy as np
import pytest

from tests.tiny_models import hf_greedy, make_hf_model
from hyprjax.adapters import merge as merge_module
from hyprjax.adapters.lora import LoraAdapter, LoraModule, module_shapes
from hyprjax.adapters.registry import LoraRegistry, LoraRequest
from hyprjax.engine.async_engine import AsyncEngine
from hyprjax.engine.block_manager import BlockManager
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import EngineDeadError, LLMEngine, StepFailedError
from hyprjax.engine.scheduler import Scheduler, SchedulerConfig
from hyprjax.engine.sequence import Sequence, SequenceStatus
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams

N = 8
GREEDY = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
BASE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, max_model_len=256,
            block_q=8, num_pages=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    hf = make_hf_model(d, "qwen3", vocab_size=400)
    return hf, load_model(d, with_tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def engine(tiny):
    _, lm = tiny
    return LLMEngine(lm.model, lm.cfg, None, EngineConfig(**BASE), warmup=False, progress=False)


@pytest.fixture(scope="module")
def prompts(tiny):
    hf, _ = tiny
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 400, 24).tolist()  # three full pages, so later prompts hit the prefix cache
    out = [shared + rng.integers(3, 400, int(n)).tolist() for n in (5, 9, 3)] + [rng.integers(3, 400, 13).tolist()]
    return [(p, hf_greedy(hf, p, N)) for p in out]


def _break_step(monkeypatch, runner, *, delete: bool, times: int = 1):
    """Make the runner's jitted step raise `times` times; with `delete`, after deleting the device
    state it was donated, as a step that fails on the device does."""
    real, left = runner._step, [times]

    def step(*args, **kwargs):
        if left[0] == 0:
            return real(*args, **kwargs)
        left[0] -= 1
        if delete:
            for x in jax.tree.leaves((runner.cache, runner.counts, runner.seen)):
                x.delete()
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(runner, "_step", step)


def _run(engine, jobs) -> dict[str, list[int]]:
    """Add (prompt, params) jobs, step until done; request id -> tokens."""
    ids = [engine.add_request(p, sp) for p, sp in jobs]
    out = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[rid] for rid in ids]


def _assert_clean(engine):
    assert not engine.has_unfinished() and engine.block_manager.num_used_pages == 0
    assert not engine.runner.state_lost() and engine.dead_reason is None


# ---- LLMEngine.step ---------------------------------------------------------------------------


def test_a_step_that_deletes_the_pool_fails_its_requests_and_the_engine_serves_on(engine, prompts, monkeypatch):
    assert _run(engine, [(prompts[0][0], GREEDY)]) == [prompts[0][1]]  # leaves its pages in the prefix cache
    assert engine.block_manager.stats()["pages_cached_free"] > 0
    a = engine.add_request(prompts[1][0], GREEDY)
    b = engine.add_request(prompts[3][0], GREEDY)
    engine.step()  # both prefill
    _break_step(monkeypatch, engine.runner, delete=True)
    with pytest.raises(StepFailedError, match="injected step failure") as e:
        engine.step()
    assert sorted(e.value.request_ids) == sorted([a, b]) and isinstance(e.value.cause, RuntimeError)
    _assert_clean(engine)
    assert engine.block_manager.stats()["pages_cached_free"] == 0  # no later request reuses lost K/V
    # The same prompts again (one shares the cached prefix that was lost): right tokens.
    assert _run(engine, [(p, GREEDY) for p, _ in prompts[:2]]) == [t for _, t in prompts[:2]]
    _assert_clean(engine)


def test_running_requests_outside_the_failed_step_are_recomputed(engine, prompts, monkeypatch):
    ids = [engine.add_request(p, GREEDY) for p, _ in prompts[1:4]]  # max_prefill_seqs=2: the third waits
    real_schedule, withheld = engine.scheduler.schedule, []

    def schedule():  # the plan leaves the second request out, so it runs without being in the step
        plan = real_schedule()
        withheld.extend(s.seq.request_id for s in plan.prefills[1:])
        plan.prefills = plan.prefills[:1]
        return plan

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    _break_step(monkeypatch, engine.runner, delete=True)
    with pytest.raises(StepFailedError) as e:
        engine.step()
    monkeypatch.setattr(engine.scheduler, "schedule", real_schedule)
    assert e.value.request_ids == ids[:1] and withheld == ids[1:2]
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 2  # requeued in front, waiting after
    out = {rid: [] for rid in ids[1:]}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    assert [out[rid] for rid in ids[1:]] == [t for _, t in prompts[2:4]]
    _assert_clean(engine)


def test_a_failure_that_deletes_nothing_keeps_the_pool_and_the_prefix_cache(engine, prompts, monkeypatch):
    _run(engine, [(prompts[0][0], GREEDY)])
    cached, cache = engine.block_manager.stats()["pages_cached_free"], engine.runner.cache
    engine.add_request(prompts[1][0], GREEDY)
    _break_step(monkeypatch, engine.runner, delete=False)
    with pytest.raises(StepFailedError):
        engine.step()
    assert engine.runner.cache is cache and engine.block_manager.stats()["pages_cached_free"] >= cached
    hits = engine.block_manager.stats()["prefix_hits"]
    assert _run(engine, [(prompts[1][0], GREEDY)]) == [prompts[1][1]]
    assert engine.block_manager.stats()["prefix_hits"] > hits
    _assert_clean(engine)


def test_a_failed_emit_fails_that_request_alone_and_hands_back_the_others(engine, prompts):
    a = engine.add_request(prompts[1][0], GREEDY)
    b = engine.add_request(prompts[3][0], GREEDY)

    def broken(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer failure")

    engine._requests[a].tracker.push = broken
    with pytest.raises(StepFailedError) as e:
        engine.step()
    assert e.value.request_ids == [a] and [o.request_id for o in e.value.outputs] == [b]
    tokens = e.value.outputs[0].new_token_ids
    while engine.has_unfinished():
        for o in engine.step():
            tokens += o.new_token_ids
    assert tokens == prompts[3][1]
    _assert_clean(engine)


def test_a_step_that_cannot_be_rebuilt_kills_the_engine_loudly(tiny, prompts, monkeypatch):
    _, lm = tiny
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**BASE), warmup=False, progress=False)
    eng.add_request(prompts[0][0], GREEDY)
    _break_step(monkeypatch, eng.runner, delete=True)

    def no_memory():
        raise RuntimeError("RESOURCE_EXHAUSTED: no memory for a new KV pool")

    monkeypatch.setattr(eng.runner, "reset_state", no_memory)
    with pytest.raises(EngineDeadError, match="RESOURCE_EXHAUSTED") as e:
        eng.step()
    assert "injected step failure" in eng.dead_reason and "RESOURCE_EXHAUSTED" in eng.dead_reason
    assert e.value.reason == eng.dead_reason
    with pytest.raises(EngineDeadError):
        eng.step()
    with pytest.raises(EngineDeadError):
        eng.add_request(prompts[1][0], GREEDY)


# ---- the pieces it rebuilds with -------------------------------------------------------------


def test_block_manager_reset_forgets_every_page_and_refuses_while_pages_are_held():
    bm = BlockManager(8, 4)
    seq = Sequence("a", list(range(10)), SamplingParams(max_tokens=2))
    bm.allocate(seq)
    seq.num_computed_tokens = 10
    bm.commit(seq)
    with pytest.raises(RuntimeError, match="still held"):
        bm.reset()
    bm.free(seq)
    assert bm.stats()["pages_cached_free"] == 2
    bm.reset()
    assert bm.num_free_pages == 8 and bm.stats()["pages_cached_free"] == 0
    again = Sequence("b", list(range(10)), SamplingParams(max_tokens=2))
    bm.allocate(again)
    assert again.num_cached_tokens == 0  # the old prefix is not hit


def test_requeue_running_sends_every_running_sequence_back_oldest_first():
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2), bm)
    seqs = [Sequence(str(i), list(range(3 + i)), SamplingParams(max_tokens=4)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.schedule()  # admits two; the third waits
    assert [s.request_id for s in sched.running] == ["0", "1"]
    assert [s.request_id for s in sched.requeue_running()] == ["1", "0"]
    assert [s.request_id for s in sched.waiting] == ["0", "1", "2"] and not sched.running
    assert all(s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0 for s in seqs)
    assert bm.num_used_pages == 0


# ---- AsyncEngine: the inbox ---------------------------------------------------------------------


async def _collect(stream) -> list[int]:
    tokens = []
    async for out in stream:
        tokens += out.new_token_ids
    return tokens


def test_inbox_handler_failures_go_to_their_sender_and_the_loop_serves_on(engine, prompts, monkeypatch):
    front = AsyncEngine(engine, "tiny")
    front.start()
    real_add, real_abort = engine.add_request, engine.abort

    def add_once(*args, **kwargs):
        monkeypatch.setattr(engine, "add_request", real_add)
        raise KeyError("injected add failure")

    def abort_once(rid):
        monkeypatch.setattr(engine, "abort", real_abort)
        raise RuntimeError("injected abort failure")

    async def scenario():
        with pytest.raises(ZeroDivisionError):
            await front._call(lambda: 1 / 0)
        monkeypatch.setattr(engine, "add_request", add_once)
        with pytest.raises(KeyError, match="injected add failure"):
            await _collect(front.generate(prompts[1][0], GREEDY))
        long = front.generate(prompts[3][0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                              request_id="long")
        await anext(long)
        monkeypatch.setattr(engine, "abort", abort_once)
        front.abort("long")
        with pytest.raises(RuntimeError, match="injected abort failure"):
            await _collect(long)
        assert await front._call(lambda: 41 + 1) == 42
        return await _collect(front.generate(prompts[1][0], GREEDY))

    try:
        assert asyncio.run(scenario()) == prompts[1][1]
        assert front.ready and front._thread.is_alive() and front.dead_reason is None
        deadline = time.monotonic() + 10
        while engine.has_unfinished() and time.monotonic() < deadline:  # the reader's own abort of "long"
            time.sleep(0.01)
    finally:
        front.shutdown()
    _assert_clean(engine)


def test_async_step_failure_fails_only_the_streams_it_ran(engine, prompts, monkeypatch):
    front = AsyncEngine(engine, "tiny")
    front.start()

    gate = threading.Event()

    async def scenario():
        # Hold the engine thread in a call, so both requests reach it before its next step.
        held = asyncio.ensure_future(front._call(gate.wait))
        await asyncio.sleep(0)
        streams = [front.generate(p, GREEDY) for p, _ in prompts[1:3]]
        _break_step(monkeypatch, engine.runner, delete=True)
        gate.set()
        await held
        for s in streams:
            with pytest.raises(StepFailedError, match="injected step failure"):
                await _collect(s)
        return await _collect(front.generate(prompts[3][0], GREEDY))

    try:
        assert asyncio.run(scenario()) == prompts[3][1]
        assert front.ready and front.dead_reason is None
    finally:
        front.shutdown()
    _assert_clean(engine)


def test_an_engine_that_cannot_recover_answers_every_stream_and_call(tiny, prompts, monkeypatch):
    _, lm = tiny
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**BASE), warmup=False, progress=False)
    front = AsyncEngine(eng, "tiny")
    front.start()
    _break_step(monkeypatch, eng.runner, delete=True)

    def no_pool():
        raise MemoryError("no pool")

    monkeypatch.setattr(eng.runner, "reset_state", no_pool)

    async def scenario():
        with pytest.raises(EngineDeadError, match="no pool"):
            await _collect(front.generate(prompts[0][0], GREEDY))
        assert not front.ready and "no pool" in front.dead_reason
        with pytest.raises(EngineDeadError, match="no pool"):
            front.generate(prompts[1][0], GREEDY)
        with pytest.raises(EngineDeadError):
            await front._call(lambda: None)

    try:
        asyncio.run(scenario())
        assert front._thread.is_alive()  # down, but still answering
    finally:
        front.shutdown()


# ---- adapters: merges off the engine thread, slot writes that fail -----------------------------


def _adapter(cfg, name: str, seed: int, rank: int = 4) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    shapes = module_shapes(cfg)
    modules = {(layer, m): LoraModule(rng.normal(0, 0.3, (shapes[m][0], rank)).astype(np.float32),
                                      rng.normal(0, 0.3, (rank, shapes[m][1])).astype(np.float32), 2.0)
               for layer in range(cfg.num_layers) for m in ("q_proj", "v_proj", "down_proj")}
    return LoraAdapter(name, f"/adapters/{name}", modules)


@pytest.fixture(scope="module")
def lora_engine(tiny):
    _, lm = tiny
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=2, max_lora_rank=8, **BASE), warmup=False,
                    progress=False)
    for i, name in enumerate("xy"):
        eng.add_adapter(_adapter(lm.cfg, name, seed=i))
    return eng


TIES = LoraRequest.make(["x", "y"], [0.7, 0.5], strategy="ties", density=0.5)


def _run_lora(engine, prompt, lora, prepared=None) -> list[int]:
    rid = engine.add_request(prompt, GREEDY, lora=lora, prepared=prepared)
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return out


def test_a_failed_slot_write_fails_that_request_and_rebuilds_the_slot_table(lora_engine, prompts, monkeypatch):
    eng, prompt = lora_engine, prompts[3][0]
    want = _run_lora(eng, prompt, LoraRequest.make(["x"]))
    assert want != prompts[3][1]  # the adapter matters
    evicted = eng.lora.remove("x")  # reload it, so the next request writes its slot again
    assert evicted
    eng.add_adapter(_adapter(eng.cfg, "x", seed=0))
    real = eng.lora._write_slot

    def write(slot, adapter):
        monkeypatch.setattr(eng.lora, "_write_slot", real)
        for t in jax.tree.leaves(eng.lora.tables):
            t.delete()
        raise RuntimeError("injected slot write failure")

    monkeypatch.setattr(eng.lora, "_write_slot", write)
    plain = eng.add_request(prompts[1][0], GREEDY)
    tokens = [t for o in eng.step() for t in o.new_token_ids]  # it runs when the adapter's one fails to be admitted
    bad = eng.add_request(prompt, GREEDY, lora=LoraRequest.make(["x"]))
    with pytest.raises(StepFailedError, match="injected slot write failure") as e:
        eng.step()
    assert e.value.request_ids == [bad] and not eng.lora.tables_lost()
    assert eng.lora.held("x") == 0 and eng.lora.pinned("x") == 0
    while eng.has_unfinished():
        tokens += [t for o in eng.step() if o.request_id == plain for t in o.new_token_ids]
    assert tokens == prompts[1][1]
    assert _run_lora(eng, prompt, LoraRequest.make(["x"])) == want
    _assert_clean(eng)


def test_prepare_merges_once_and_resolve_ignores_a_merge_of_reloaded_parents(tiny):
    _, lm = tiny
    reg = LoraRegistry(lm.cfg, max_loras=2, max_rank=8, dtype=np.float32)
    for i, name in enumerate("xy"):
        reg.add(_adapter(lm.cfg, name, seed=i))
    prepared = reg.prepare(TIES)
    assert reg.prepare(LoraRequest.make(["x"])) is None  # weighted_sum merges nothing
    resolved = reg.resolve(TIES, prepared)
    assert reg._get(resolved.mix[0][0]) is prepared.adapter  # registered as computed, not merged again
    assert reg.prepare(TIES).adapter is prepared.adapter  # the cache answers
    reg.release(resolved, pinned=False)
    stale = reg.prepare(TIES)
    reg.remove("x")
    reg.add(_adapter(lm.cfg, "x", seed=5))  # same name, other weights
    again = reg.resolve(TIES, stale)
    assert reg._get(again.mix[0][0]) is not stale.adapter and again.salt != resolved.salt


def test_a_merge_runs_on_a_worker_while_running_streams_keep_producing(lora_engine, prompts, monkeypatch):
    real_merge, merges = merge_module.merge_adapters, []

    def slow_merge(*args, **kwargs):
        start = time.monotonic()
        time.sleep(1.0)
        merges.append((threading.current_thread().name, start, time.monotonic()))
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_adapters", slow_merge)
    mix = LoraRequest.make(["x", "y"], [0.6, 0.4], strategy="ties", density=0.3)  # not cached by earlier tests
    front = AsyncEngine(lora_engine, "tiny")
    front.start()

    async def scenario():
        base = front.generate(prompts[0][0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        arrivals = []
        for _ in range(3):  # compiled and decoding before the merge starts
            await anext(base)

        async def read_base():
            async for _ in base:
                arrivals.append(time.monotonic())
                if merges:
                    return

        reader = asyncio.create_task(read_base())
        mixed = await asyncio.gather(*[_collect(front.generate(prompts[1][0], GREEDY, lora=mix)) for _ in range(2)])
        await reader
        await base.aclose()
        return arrivals, mixed

    try:
        arrivals, mixed = asyncio.run(scenario())
    finally:
        front.shutdown()
    [(thread, start, end)] = merges  # two requests of one mix: merged once
    assert thread != "hyprjax-engine"
    during = [t for t in arrivals if start < t < end]
    assert len(during) >= 5, f"the stream stalled during the merge ({len(during)} tokens in {end - start:.2f} s)"
    assert mixed[0] == mixed[1] and len(mixed[0]) == N
    monkeypatch.setattr(merge_module, "merge_adapters", real_merge)
    assert _run_lora(lora_engine, prompts[1][0], mix) == mixed[0]  # the merge registered is the one served
    _assert_clean(lora_engine)
