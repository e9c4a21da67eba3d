"""`hyprjax.LLM` end to end on a tiny model with a tokenizer: a batch equals its prompts run alone."""

import pytest

from bench.make_model import build_tokenizer
from hyprjax import LLM, SamplingParams
from tests.tiny_models import make_hf_model

V = 512


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    make_hf_model(d, "qwen3", vocab_size=V, eos_token_id=V - 1)
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    return LLM(d, dtype="float32", max_model_len=256, progress=False)


def test_a_batch_equals_each_prompt_alone_and_streams_its_text(llm):
    prompts = ["Once upon a time", "The weather", "a b c d e f g", "Hello"] * 3
    text = llm.generate("a b c d e f g", SamplingParams(max_tokens=12, temperature=0.0))[0].text
    assert len(text) > 4
    params = [SamplingParams(max_tokens=10, temperature=0.0),
              SamplingParams(max_tokens=7, temperature=0.9, seed=3, top_p=0.8),
              SamplingParams(max_tokens=12, temperature=0.0, stop=(text[2:4],)),
              SamplingParams(max_tokens=5, temperature=0.5, seed=11, frequency_penalty=0.5,
                             repetition_penalty=1.3)] * 3
    direct = [llm.generate(p, sp)[0] for p, sp in zip(prompts[:4], params[:4])] * 3
    streamed = {}
    paged = llm.generate(prompts, params,
                         on_text=lambda i, t: streamed.__setitem__(i, streamed.get(i, "") + t))
    for a, b, i in zip(direct, paged, range(len(prompts))):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert streamed.get(i, "") == b.text
    assert any(c.finish_reason == "stop" for c in direct)


def test_prefix_caching_can_be_turned_off(tmp_path):
    """A repeated prompt is served from its cached pages by default; with
    enable_prefix_caching=False every run prefills it again (what a prefill benchmark needs),
    and the tokens are the same either way."""
    make_hf_model(tmp_path, "qwen3", vocab_size=V, eos_token_id=V - 1)
    build_tokenizer(V).save(str(tmp_path / "tokenizer.json"))
    prompt = list(range(3, 3 + 40))  # two full 16-token pages and then some
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs = {}
    for caching in (True, False):
        llm = LLM(tmp_path, dtype="float32", max_model_len=128, progress=False, enable_prefix_caching=caching)
        tokens = [llm.generate([prompt], greedy)[0].token_ids for _ in range(2)]
        runs[caching] = (tokens, llm.generator.engine.block_manager.stats()["prefix_hits"])
    (cached_tokens, hits), (fresh_tokens, no_hits) = runs[True], runs[False]
    assert cached_tokens[0] == cached_tokens[1] == fresh_tokens[0] == fresh_tokens[1]
    assert hits >= 32 and no_hits == 0
