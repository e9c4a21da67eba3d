"""Generation loop: stop strings and tokens, max tokens, batching, compile reuse, context limits."""

import jax
import pytest

from tests.tiny_models import hf_greedy, make_hf_model
from hyprjax.errors import HyprjaxError, PromptTooLongError
from hyprjax.formats.load import load_model
from hyprjax.generate import Generator
from hyprjax.sampling import SamplingParams


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26); token 2 is EOS. Enough to test text-level stops."""

    eos_token_ids = frozenset({2})

    class _Stream:
        def push(self, token):
            return chr(97 + token % 26)

        def flush(self):
            return ""

    def stream_decoder(self, skip_special_tokens=True):
        return self._Stream()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    hf = make_hf_model(d, "qwen3")
    loaded = load_model(d, with_tokenizer=False, progress=False)
    return hf, loaded


def _gen(loaded, **kw):
    return Generator(loaded.model, loaded.cfg, CharTokenizer(), **kw)


PROMPT = [5, 17, 33, 250, 9, 11]


def test_stop_string_truncates_and_finishes(tiny):
    hf, loaded = tiny
    g = _gen(loaded, max_model_len=128)
    ref = hf_greedy(hf, PROMPT, 24)
    text = "".join(chr(97 + t % 26) for t in ref)
    stop = text[7:9]
    out = g.generate([PROMPT], [SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,), ignore_eos=True)])[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]


def test_stop_token_and_eos_end_the_sequence(tiny):
    hf, loaded = tiny
    g = _gen(loaded, max_model_len=128)
    ref = hf_greedy(hf, PROMPT, 24)
    target = ref[10]
    out = g.generate([PROMPT], [SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(target,),
                                               ignore_eos=True)])[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[:ref.index(target)]
    long = g.generate([PROMPT], [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)])[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 24


def test_batched_rows_equal_rows_alone_with_per_row_params(tiny):
    _, loaded = tiny
    g = _gen(loaded, max_model_len=128)
    prompts = [PROMPT, [7, 8, 9], [100] * 20]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.8, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=4, seed=3, repetition_penalty=1.2,
                             ignore_eos=True)]
    together = g.generate(prompts, params)
    for p, sp, c in zip(prompts, params, together):
        alone = g.generate([p], [sp])[0]
        assert c.token_ids == alone.token_ids
        assert len(c.token_ids) == sp.max_tokens


def test_no_recompile_for_new_prompts_inside_a_bucket(tiny):
    _, loaded = tiny
    g = _gen(loaded, max_model_len=128)
    params = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, ignore_eos=True)
    g.generate([[1, 2, 3], [4, 5, 6, 7]], [params] * 2)  # warm-up: compiles the (2, 16) bucket
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    g.generate([[9, 9, 9, 9, 9, 9, 9, 9, 9], [11]], [params, SamplingParams(max_tokens=3, temperature=0.0)])
    g.generate([[20, 30]], [SamplingParams(max_tokens=6, seed=1, stop=("zz",))])  # batch bucket 1: compiles
    n_after_new_bucket = len(compiles)
    g.generate([[21, 31, 41]], [SamplingParams(max_tokens=5, min_p=0.2)])
    g.generate([[21, 31, 41, 51, 61]], [SamplingParams(max_tokens=100, temperature=0.0)])  # same cache bucket
    assert len(compiles) == n_after_new_bucket
    assert n_after_new_bucket <= 2  # only the new batch-1 prefill and decode


def test_prompt_longer_than_context_is_refused(tiny):
    _, loaded = tiny
    g = _gen(loaded, max_model_len=32)
    with pytest.raises(PromptTooLongError, match="40 tokens.*32"):
        g.generate([[3] * 40], [SamplingParams()])
    with pytest.raises(HyprjaxError, match="empty"):
        g.generate([[]], [SamplingParams()])
    # A prompt that fits stops at the context's end with finish_reason "length".
    out = g.generate([[3] * 28], [SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)])[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
