"""Speculative decoding in the engine (n-gram prompt lookup): the same tokens as without it, for
greedy and for seeded sampled requests (penalties and filters included), on Qwen3 and Gemma 3,
with an adapter, under preemption; what it counts; the per-request switch.

The verifier's law is checked on its own in test_spec_verify.py (chi-square at T=0.7 with top-p,
top-k/min-p and penalties). Here the stronger engine-level property: with n-gram drafts each
emitted token is the very draw the plain sampler makes for that token index, so a seeded request
gives identical tokens with speculation on or off, which implies the same distribution.
"""

import numpy as np
import pytest

from tests.deps import need

need("torch")

from hyprjax.engine.config import EngineConfig  # noqa: E402
from hyprjax.engine.llm_engine import LLMEngine  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.sampling import SamplingParams  # noqa: E402
from tests.tiny_models import make_hf_model  # noqa: E402

pytestmark = pytest.mark.slow
BASE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, max_model_len=256, block_q=8)
SPEC = dict(speculative="ngram", num_speculative_tokens=3, ngram_min=1, ngram_max=3)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"spec-{request.param}")
    # A larger init makes the random model's distributions peaked, so sampled text repeats itself
    # and the n-gram proposer finds drafts for random rows too, not only for greedy ones.
    extra = dict(sliding_window=12) if request.param == "gemma3" else {}
    hf = make_hf_model(d, request.param, vocab_size=400, initializer_range=0.3, **extra)
    return hf, d, load_model(d, with_tokenizer=False, progress=False)


def _engine(lm, **settings):
    return LLMEngine(lm.model, lm.cfg, None, EngineConfig(**{**BASE, **settings}), warmup=False, progress=False)


def _serve(engine, prompts, params, logprobs=None, lora=None):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp, logprobs=logprobs, lora=lora) for p, sp in zip(prompts, params)]
    out = {i: ([], []) for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend([lp.logprob for lp in o.logprobs or []])
    return [out[i] for i in ids]


def _prompts(n, seed):
    """Prompts that repeat phrases, as input-grounded text does (plus one that does not)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        phrase = rng.integers(3, 400, int(rng.integers(3, 7))).tolist()
        out.append(phrase * int(rng.integers(3, 6)) if i % 4 else rng.integers(3, 400, 20).tolist())
    return out


def test_greedy_and_seeded_tokens_are_the_same_with_speculation(model):
    _, _, lm = model
    plain, spec = _engine(lm, num_pages=128), _engine(lm, num_pages=128, **SPEC)
    prompts = _prompts(4, seed=1)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    a, b = _serve(plain, prompts, greedy, logprobs=2), _serve(spec, prompts, greedy, logprobs=2)
    assert [t for t, _ in a] == [t for t, _ in b]
    np.testing.assert_allclose(np.concatenate([lp for _, lp in b]), np.concatenate([lp for _, lp in a]), atol=1e-4)
    stats = spec.stats()
    assert stats["spec_accepted_tokens_total"] > 0 and stats["spec_verify_steps_total"] > 0
    assert sum(stats["spec_acceptance_lengths"]) > 0
    sampled = [SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=s, ignore_eos=True) for s in range(4)]
    penalised = [SamplingParams(max_tokens=24, temperature=0.7, top_k=20, min_p=0.05, seed=s, presence_penalty=0.5,
                                repetition_penalty=1.2, frequency_penalty=0.3, ignore_eos=True) for s in range(4)]
    before = spec.stats()["spec_proposed_tokens_total"]
    for params in (sampled, penalised):
        assert [t for t, _ in _serve(spec, prompts, params)] == [t for t, _ in _serve(plain, prompts, params)]
    assert spec.stats()["spec_proposed_tokens_total"] > before  # the sampled rows were verified too


def test_an_adapter_on_the_target_and_preemption_keep_the_tokens(model, tmp_path):
    from tests.adapters.peft_models import make_peft_adapter
    from hyprjax.adapters.load import read_adapter

    hf, _, lm = model
    make_peft_adapter(hf, tmp_path / "a", seed=3, magnitude=0.2)
    adapter = read_adapter(tmp_path / "a", "a", lm.cfg)
    settings = dict(max_loras=2, max_lora_rank=8)
    plain, spec = _engine(lm, num_pages=128, **settings), _engine(lm, num_pages=14, **settings, **SPEC)
    for e in (plain, spec):
        e.add_adapter(adapter)
    from hyprjax.adapters.registry import LoraRequest

    prompts = _prompts(6, seed=2)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    mix = LoraRequest.make(["a"], [0.8])
    want = [t for t, _ in _serve(plain, prompts, params, lora=mix)]
    assert [t for t, _ in _serve(spec, prompts, params, lora=mix)] == want
    assert spec.stats()["num_preemptions_total"] > 0 and spec.stats()["spec_accepted_tokens_total"] > 0
    assert spec.block_manager.num_used_pages == 0


def test_a_request_can_turn_speculation_off(model):
    _, _, lm = model
    spec = _engine(lm, num_pages=128, **SPEC)
    prompts = _prompts(2, seed=3)
    off = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, speculative=False)
    _serve(spec, prompts, off)
    assert spec.stats()["spec_proposed_tokens_total"] == 0


def test_large_batches_do_not_speculate(model):
    """Past spec_max_rows the step is compute-bound: verify steps would cost more than they save."""
    _, _, lm = model
    spec = _engine(lm, num_pages=128, **{**SPEC, "spec_max_rows": 8})  # two groups of 4 rows at most
    prompts = [p for p in _prompts(9, seed=4) if len(set(p)) < len(p)][:6]  # all repeat: drafts exist
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    _serve(spec, prompts, params)
    assert spec.stats()["spec_verify_steps_total"] == 0  # six sequences decode together: 24 rows > 8
    _serve(spec, prompts[:2], params)
    assert spec.stats()["spec_verify_steps_total"] > 0
