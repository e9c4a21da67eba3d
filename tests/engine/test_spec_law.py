"""The sampled law through the engine, for each proposer: the third output token of many
seeded requests (T=0.7, top-p 0.9), which a verify step emits after accepting the draft for the
second, follows the target's marginal computed by transformers (summed over the first two
tokens), by a chi-square test at ALPHA = 1e-4 (fixed seeds: deterministic).

test_spec_verify.py tests the verifier's law on fixed logits; test_speculative.py and
test_spec_draft.py that seeded tokens are identical with speculation on or off. This one
checks the whole path, engine and proposer included, against an implementation we did not
write.
"""

import numpy as np
import pytest

from tests.deps import need

need("torch")

import jax  # noqa: E402
import torch  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

from hyprjax.engine.config import EngineConfig  # noqa: E402
from hyprjax.engine.llm_engine import LLMEngine  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.sampling import SamplingParams  # noqa: E402
from tests.tiny_models import make_hf_model  # noqa: E402

pytestmark = pytest.mark.slow
ALPHA = 1e-4
N = 600
T, TOP_P = 0.7, 0.9
BASE = dict(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_seqs=4, page_size=8, max_model_len=64, block_q=8,
            num_pages=64, num_speculative_tokens=2, ngram_min=1, max_queue=1024)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec-law")
    hf = make_hf_model(d / "target", "qwen3", vocab_size=400, initializer_range=0.3)
    lm = load_model(d / "target", with_tokenizer=False, progress=False)
    draft = make_hf_model(d / "draft", "qwen3", vocab_size=400, initializer_range=0.3)
    with torch.no_grad():  # the target plus noise: it agrees with the target often, not always
        for p, q in zip(draft.parameters(), hf.parameters()):
            p.copy_(q + torch.randn_like(q) * 0.1 * q.std())
    draft.save_pretrained(d / "draft")
    with torch.no_grad():  # the prompt: the target's own greedy text, which loops, so n-grams predict it
        prompt = hf.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=21, do_sample=False)[0].tolist()
    return hf, lm, d / "draft", prompt


def _probs(hf, context: list[int]) -> np.ndarray:
    """The target's processed next-token distribution (temperature, then top-p), by transformers."""
    ids = torch.tensor([context])
    with torch.no_grad():
        scores = hf(ids).logits[:, -1].double()
    for w in (lp.TemperatureLogitsWarper(T), lp.TopPLogitsWarper(TOP_P)):
        scores = w(ids, scores)
    return torch.softmax(scores[0], -1).numpy()


def _third_token_law(hf, prompt) -> np.ndarray:
    """P(t3) = sum over t1, t2 of P(t1) P(t2 | t1) P(t3 | t1, t2)."""
    out = np.zeros(400)
    p1 = _probs(hf, prompt)
    for t1 in np.flatnonzero(p1):
        p2 = _probs(hf, prompt + [int(t1)])
        for t2 in np.flatnonzero(p2):
            out += p1[t1] * p2[t2] * _probs(hf, prompt + [int(t1), int(t2)])
    return out


def _pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=len(probs))
    if observed[probs == 0].any():
        return 0.0
    expected = probs * len(tokens)
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    obs = np.append(observed[big], observed[small].sum()) if small.any() else observed[big]
    exp = np.append(expected[big], expected[small].sum()) if small.any() else expected[big]
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(jax.scipy.special.gammaincc((len(obs) - 1) / 2, stat / 2))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_the_third_token_follows_the_target_law(models, method):
    hf, lm, draft, prompt = models
    spec = "ngram" if method == "ngram" else f"draft:{draft}"
    engine = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**BASE, speculative=spec), warmup=False, progress=False)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=T, top_p=TOP_P, seed=s,
                                                     ignore_eos=True)) for s in range(N)]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    third = np.array([out[i][2] for i in ids])
    stats = engine.stats()
    # third tokens drawn at a verify step's row 1, after its draft for the second was accepted:
    # many with the draft model; a few with n-gram lookup over a random model's sampled text
    assert stats["spec_accepted_tokens_total"] > (N // 10 if method == "draft" else 0)
    assert _pvalue(third, _third_token_law(hf, prompt)) > ALPHA
    wrong = _probs(hf, prompt)  # the check has power: the first token's law is not the third's
    assert _pvalue(third, wrong) < ALPHA
