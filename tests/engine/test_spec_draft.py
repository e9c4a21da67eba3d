"""Speculative decoding with a draft model (`speculative="draft:PATH"`): the same tokens as
without it, greedy and seeded (penalties and filters included), on Qwen3 and Gemma 3, with an
adapter on the target, under preemption; a draft equal to the target has every greedy draft
accepted (which fails if the draft's own KV bookkeeping goes wrong: its drafts would drift);
a draft whose tokenizer differs is refused by name.

Each emitted token is the plain sampler's draw for that token index (drafts are verified by
draw-and-compare, spec_verify.py), so a seeded request gives identical tokens with speculation on
or off: the sampled distribution is the target's exactly, for any draft. The verifier's law on
its own is chi-square tested in test_spec_verify.py.
"""

import numpy as np
import pytest

from tests.deps import need

need("torch")

import torch  # noqa: E402

from hyprjax.engine.config import EngineConfig  # noqa: E402
from hyprjax.engine.llm_engine import LLMEngine  # noqa: E402
from hyprjax.errors import HyprjaxError  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.sampling import SamplingParams  # noqa: E402
from tests.tiny_models import make_hf_model  # noqa: E402

pytestmark = pytest.mark.slow
# Noise relative to each weight's spread: drafts accepted about half to two thirds of the time.
# Gemma 3 keeps the default init: with a larger one the tiny model repeats its last token, which
# any draft predicts.
NOISE, INIT = {"qwen3": 0.1, "gemma3": 0.05}, {"qwen3": dict(initializer_range=0.3), "gemma3": {}}
BASE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, max_model_len=256, block_q=8)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def models(request, tmp_path_factory):
    """The target, and a draft that is the target with noise on every weight: it agrees with the
    target often but not always, so verify steps accept some drafts and reject others."""
    d = tmp_path_factory.mktemp(f"draft-{request.param}")
    extra = dict(sliding_window=12) if request.param == "gemma3" else {}
    hf = make_hf_model(d / "target", request.param, vocab_size=400, **INIT[request.param], **extra)
    with torch.no_grad():
        torch.manual_seed(5)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * NOISE[request.param] * p.std())
    hf.save_pretrained(d / "draft")
    return d / "target", d / "draft", load_model(d / "target", with_tokenizer=False, progress=False)


def _engine(lm, **settings):
    return LLMEngine(lm.model, lm.cfg, None, EngineConfig(**{**BASE, **settings}), warmup=False, progress=False)


def _serve(engine, prompts, params, lora=None):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp, lora=lora) for p, sp in zip(prompts, params)]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[i] for i in ids]


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 400, int(rng.integers(5, 40))).tolist() for _ in range(n)]


def test_greedy_and_seeded_tokens_are_the_same_with_a_draft_model(models):
    _, draft, lm = models
    plain = _engine(lm, num_pages=128)
    spec = _engine(lm, num_pages=128, speculative=f"draft:{draft}", num_speculative_tokens=3)
    prompts = _prompts(4, seed=1)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert _serve(spec, prompts, greedy) == _serve(plain, prompts, greedy)
    stats = spec.stats()
    assert stats["spec_method"] == "draft" and stats["spec_draft_steps_total"] > 0
    assert 0 < stats["spec_accepted_tokens_total"] < stats["spec_proposed_tokens_total"]  # accepts and rejects
    sampled = [SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=s, ignore_eos=True) for s in range(4)]
    penalised = [SamplingParams(max_tokens=24, temperature=0.7, top_k=20, min_p=0.05, seed=s, presence_penalty=0.5,
                                repetition_penalty=1.2, frequency_penalty=0.3, ignore_eos=True) for s in range(4)]
    before = spec.stats()["spec_proposed_tokens_total"]
    for params in (sampled, penalised):
        assert _serve(spec, prompts, params) == _serve(plain, prompts, params)
    assert spec.stats()["spec_proposed_tokens_total"] > before


def test_incremental_drafts_equal_drafts_from_scratch(models):
    """The draft's K/V bookkeeping through partial acceptance (a noisy draft: some drafts of each
    step rejected): every proposal, made on the K/V kept from earlier steps, equals the proposal
    the draft makes after forgetting the request and feeding it every token again. A wrong
    valid length would feed stale K/V (different drafts) or too few tokens (caught the same way
    when the kept K/V is wrong); tokens alone could not tell, since any drafts give them."""
    _, draft, lm = models
    spec = _engine(lm, num_pages=128, speculative=f"draft:{draft}", num_speculative_tokens=3)
    # every step proposes: the pause rule (timed steps, engine/speculative.py) is not under test here
    spec.spec.cost_ratio = lambda num_seqs: 1.0
    model, seen = spec.spec.draft, []
    incremental = model.propose

    def checked(items):
        got = incremental(items)
        for seq, _ in items:
            model.forget(seq.request_id)
        scratch = incremental(items)
        seen.append((got, scratch))
        return scratch

    model.propose = checked
    _serve(spec, _prompts(3, seed=5), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    stats = spec.stats()
    assert 0 < stats["spec_accepted_tokens_total"] < stats["spec_proposed_tokens_total"]
    drafts = [(a, b) for got, scratch in seen for a, b in zip(got, scratch)]
    # equal but for a rare near tie that rounding may flip between a prefill chunk and a decode row
    assert len(drafts) > 10 and sum(a == b for a, b in drafts) >= 0.95 * len(drafts)


def test_a_draft_equal_to_the_target_has_its_greedy_drafts_accepted(models):
    """The draft's K/V follows the sequence through partial acceptance (K = 5, sequences of
    different lengths finishing at different steps): with the target itself as the draft nearly
    every greedy draft is accepted (float rounding between a one-row step and a verify row may
    flip a near tie, hence 0.95)."""
    target, _, lm = models
    spec = _engine(lm, num_pages=128, speculative=f"draft:{target}", num_speculative_tokens=5)
    prompts = _prompts(3, seed=2)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 23, 30)]
    want = _serve(_engine(lm, num_pages=128), prompts, params)
    assert _serve(spec, prompts, params) == want
    stats = spec.stats()
    assert stats["spec_accepted_tokens_total"] >= 0.95 * stats["spec_proposed_tokens_total"] > 0


def test_an_adapter_on_the_target_and_preemption_keep_the_tokens(models, tmp_path):
    """The draft is unadapted; the target applies the request's mix. A 14-page pool preempts
    sequences, whose pages (target and draft K/V alike) are freed: the draft starts over."""
    from hyprjax.adapters.load import read_adapter
    from hyprjax.adapters.registry import LoraRequest
    from tests.adapters.peft_models import make_peft_adapter
    from transformers import AutoModelForCausalLM

    target, draft, lm = models
    make_peft_adapter(AutoModelForCausalLM.from_pretrained(target), tmp_path / "a", seed=3, magnitude=0.03)
    adapter = read_adapter(tmp_path / "a", "a", lm.cfg)
    settings = dict(max_loras=2, max_lora_rank=8)
    plain = _engine(lm, num_pages=128, **settings)
    spec = _engine(lm, num_pages=14, **settings, speculative=f"draft:{draft}", num_speculative_tokens=3)
    for e in (plain, spec):
        e.add_adapter(adapter)
    prompts = _prompts(6, seed=4)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    mix = LoraRequest.make(["a"], [0.8])
    assert _serve(spec, prompts, params, lora=mix) == _serve(plain, prompts, params, lora=mix)
    stats = spec.stats()
    assert stats["num_preemptions_total"] > 0 and stats["spec_accepted_tokens_total"] > 0
    assert spec.block_manager.num_used_pages == 0


def test_a_draft_with_another_tokenizer_is_refused(models, tmp_path):
    _, _, lm = models
    make_hf_model(tmp_path / "other", "qwen3", vocab_size=300)
    with pytest.raises(HyprjaxError, match="tokenizer differs"):
        _engine(lm, num_pages=64, speculative=f"draft:{tmp_path / 'other'}")
    with pytest.raises(HyprjaxError, match="no such file"):
        _engine(lm, num_pages=64, speculative=f"draft:{tmp_path / 'nowhere'}")


def test_tokenizers_are_compared_by_their_vocabulary_and_encodings(tmp_path):
    """Real tokenizers: the same one passes; one with other merges (same size) or another size
    is refused, naming the draft."""
    from bench.make_model import build_tokenizer
    from hyprjax.engine.spec_draft import check_same_tokenizer
    from hyprjax.tokenizer import Tokenizer

    def tokenizer(name, vocab, merges):
        d = tmp_path / name
        d.mkdir()
        build_tokenizer(vocab, max_merges=merges).save(str(d / "tokenizer.json"))
        (d / "config.json").write_text("{}")
        return Tokenizer.from_hf_dir(d)

    a, same, fewer_merges, smaller = (tokenizer("a", 600, 200), tokenizer("b", 600, 200), tokenizer("c", 600, 20),
                                      tokenizer("d", 500, 200))
    check_same_tokenizer(a, same, 600, 600, "b")
    for other in (fewer_merges, smaller):
        with pytest.raises(HyprjaxError, match="draft model x: its tokenizer differs"):
            check_same_tokenizer(a, other, 600, 600, "x")
