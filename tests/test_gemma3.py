"""Gemma 3 (text) through the same model: tiny random checkpoints against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import hf_greedy, hf_logits, make_hf_model
from hyprjax.formats.load import load_model
from hyprjax.generate import Generator
from hyprjax.sampling import SamplingParams

ATOL = 1e-4
PROMPT = list(range(3, 40, 2)) + [7, 7, 300, 12]  # 23 tokens: longer than the sliding window of 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    hf = make_hf_model(d, "gemma3", num_hidden_layers=4,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    return hf, load_model(d, with_tokenizer=False, progress=False)


def test_config_reads_the_layer_pattern_and_both_rope_bases(pair):
    _, ours = pair
    cfg = ours.cfg
    assert cfg.layer_types == ("sliding", "sliding", "full", "sliding")
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.sliding_window) == (1_000_000.0, 10_000.0, 8)


def test_logits_match_transformers(pair):
    hf, ours = pair
    pos = jnp.arange(len(PROMPT))[None]
    logits, _ = ours.model(jnp.asarray([PROMPT]), pos)
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_greedy_tokens_equal_transformers(pair):
    hf, ours = pair
    gen = Generator(ours.model, ours.cfg, None, max_model_len=128)
    out = gen.generate([PROMPT], [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)])[0]
    assert out.token_ids == hf_greedy(hf, PROMPT, 24)
