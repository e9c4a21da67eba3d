"""The paged engine against the contiguous path and transformers, on a tiny random Qwen3."""

import jax
import numpy as np
import pytest

from tests.tiny_models import hf_greedy, hf_logits, make_hf_model
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.engine.paged import kv_storage_dtype
from hyprjax.formats.load import load_model
from hyprjax.generate import Generator
from hyprjax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BASE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, max_model_len=256,
            block_q=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    hf = make_hf_model(d, "qwen3", vocab_size=400)
    return hf, load_model(d, with_tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def engine(tiny):
    _, lm = tiny
    return LLMEngine(lm.model, lm.cfg, None, EngineConfig(num_pages=128, **BASE), progress=False)


def _prompts(n, seed=0, lo=3, hi=70):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 400, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _serve(engine, prompts, params, logprobs=None):
    """Add all requests at once, step until done; {index: (tokens, logprobs, text)}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp, logprobs=logprobs) for p, sp in zip(prompts, params)]
    out = {rid: ([], []) for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            if o.logprobs:
                out[o.request_id][1].extend(o.logprobs)
    return [out[rid] for rid in ids]


def test_paged_greedy_equals_transformers_and_the_contiguous_path(tiny, engine):
    hf, lm = tiny
    prompts = _prompts(3)
    gen = Generator(lm.model, lm.cfg, None, max_model_len=256)
    contiguous = gen.generate(prompts, [GREEDY] * 3)
    for p, (tokens, _), c in zip(prompts, _serve(engine, prompts, GREEDY), contiguous):
        assert tokens == c.token_ids == hf_greedy(hf, p, 12)


def test_logprobs_equal_transformers_through_chunked_prefill(tiny, engine):
    hf, _ = tiny
    prompt = _prompts(1, seed=1, lo=60, hi=61)[0]  # 60 tokens: two chunks under a 32-token budget
    [(tokens, lps)] = _serve(engine, [prompt], GREEDY, logprobs=3)
    ref = hf_logits(hf, prompt + tokens)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    for i, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == tokens[i] == int(row.argmax())
        np.testing.assert_allclose(lp.logprob, row[tokens[i]], atol=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-row)[:3].tolist()


def test_batching_does_not_change_results(engine):
    prompts = _prompts(20, seed=2)
    params = [SamplingParams(max_tokens=int(n), temperature=t, seed=i, top_p=0.9, ignore_eos=True)
              for i, (n, t) in enumerate(zip(np.random.default_rng(3).integers(1, 16, 20), [0.0, 0.8] * 10))]
    together = _serve(engine, prompts, params)
    for p, sp, (tokens, _) in zip(prompts, params, together):
        assert _serve(engine, [p], sp)[0][0] == tokens
        assert len(tokens) == sp.max_tokens
    assert engine.block_manager.num_used_pages == 0


def test_prefix_cached_requests_equal_uncached(engine):
    system = _prompts(1, seed=4, lo=40, hi=41)[0]
    prompts = [system + q for q in _prompts(4, seed=5, lo=3, hi=9)]
    first = _serve(engine, prompts[:1], GREEDY)
    hits_before = engine.block_manager.stats()["prefix_hits"]
    rest = _serve(engine, prompts[1:], GREEDY)
    assert engine.block_manager.stats()["prefix_hits"] > hits_before
    for p, (tokens, _) in zip(prompts, first + rest):
        engine.block_manager.enable_prefix_caching = False
        try:
            assert _serve(engine, [p], GREEDY)[0][0] == tokens
        finally:
            engine.block_manager.enable_prefix_caching = True


def test_no_compiles_after_warmup_for_a_varied_mix(engine):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    prompts = _prompts(11, seed=6, lo=1, hi=120)
    params = [SamplingParams(max_tokens=5, temperature=0.7, top_k=5, seed=1), GREEDY,
              SamplingParams(max_tokens=3, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
              SamplingParams(max_tokens=7, min_p=0.1, stop_token_ids=(7,))] * 3
    _serve(engine, prompts, params[:11], logprobs=2)
    _serve(engine, prompts[:1], params[0])
    assert compiles == []


def test_preemption_under_a_tiny_pool_completes_every_request(tiny, engine):
    _, lm = tiny
    small = LLMEngine(lm.model, lm.cfg, None, EngineConfig(num_pages=14, **BASE), progress=False)
    prompts = _prompts(6, seed=7, lo=20, hi=40)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = _serve(small, prompts, params)
    assert small.stats()["num_preemptions_total"] > 0
    for p, (tokens, _) in zip(prompts, results):
        assert tokens == _serve(engine, [p], params)[0][0]
    assert small.block_manager.num_used_pages == 0


def test_penalties_and_seeds_survive_preemption(tiny, engine):
    _, lm = tiny
    small = LLMEngine(lm.model, lm.cfg, None, EngineConfig(num_pages=14, **BASE), progress=False)
    prompts = _prompts(6, seed=9, lo=20, hi=40)
    params = [SamplingParams(max_tokens=24, temperature=0.9, seed=i, repetition_penalty=1.4, presence_penalty=0.6,
                             frequency_penalty=0.4, ignore_eos=True) for i in range(6)]
    results = _serve(small, prompts, params)
    assert small.stats()["num_preemptions_total"] > 0
    for p, sp, (tokens, _) in zip(prompts, params, results):
        assert tokens == _serve(engine, [p], sp)[0][0]


def test_abort_frees_pages_and_bad_requests_are_refused(engine):
    rid = engine.add_request(_prompts(1, seed=8, lo=50, hi=51)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished()
    with pytest.raises(ValueError, match="250 prompt tokens \\+ 10 max_tokens = 260"):
        engine.add_request([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([5, 999], SamplingParams())


def test_bfloat16_kv_cache_holds_twice_the_tokens_and_stays_near_transformers(tiny, engine):
    """kv_cache_dtype="bfloat16" under a float32 model: the XLA path stores the pool as uint16
    bits, a budget holds twice the pages, and the logprobs stay within bfloat16 rounding of
    transformers' (each chosen token within that of the best); a float32 model's "auto" keeps
    float32 (the tests above hold at 1e-4)."""
    hf, lm = tiny
    budget = dict(BASE, kv_cache_memory=2**20)
    f32 = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**budget), progress=False, warmup=False)
    bf16 = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**budget, kv_cache_dtype="bfloat16"), progress=False,
                     warmup=False)
    assert engine.runner.kv_dtype == engine.ecfg.kv_cache_dtype == f32.ecfg.kv_cache_dtype == "float32"
    assert engine.runner.cache.k.dtype == np.float32
    # uint16 bits on the XLA path (the CPU default), bfloat16 itself for the Pallas kernels
    assert bf16.ecfg.kv_cache_dtype == "bfloat16"
    assert bf16.runner.cache.k.dtype == kv_storage_dtype("bfloat16", bf16.backend)
    assert 2 * f32.runner.num_pages <= bf16.runner.num_pages <= 2 * f32.runner.num_pages + 1  # floor(budget / page)
    prompt = _prompts(1, seed=4, lo=40, hi=41)[0]
    [(tokens, lps)] = _serve(bf16, [prompt], GREEDY, logprobs=3)
    ref = hf_logits(hf, prompt + tokens)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    worst = 0.0
    for i, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == tokens[i] and row[tokens[i]] >= row.max() - 2e-2
        np.testing.assert_allclose(lp.logprob, row[tokens[i]], atol=2e-2)
        worst = max(worst, abs(lp.logprob - row[tokens[i]]))
    assert worst > 1e-6  # the bfloat16 rounding is really there
