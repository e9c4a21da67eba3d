"""Our model against transformers' Qwen3/Qwen2/Llama on tiny random checkpoints (float32, atol 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import hf_greedy, hf_logits, make_hf_model
from hyprjax.formats.load import load_model
from hyprjax.generate import Generator
from tests.paged_steps import new_pool, paged_step
from hyprjax.sampling import SamplingParams

ATOL = 1e-4

SHAPES = {
    # tied, head_dim (24) != hidden/heads (16), GQA ratio 1
    "qwen3-tied-mha": ("qwen3", dict(num_key_value_heads=4)),
    # untied, GQA ratio 4
    "qwen3-untied-gqa4": ("qwen3", dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2,
                                        head_dim=16)),
    "qwen3-yarn": ("qwen3", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    "qwen3-linear-rope": ("qwen3", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-tied-mha": ("qwen2", dict(num_key_value_heads=4)),
    "qwen2-untied-gqa4": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2)),
    # SmolLM2's shape in small: tied, GQA 3, no biases; and Llama 3.1's frequency-dependent RoPE
    "llama-tied-gqa3": ("llama", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96)),
    "llama3-rope-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
}

PROMPTS = [[5, 17, 33, 2, 250, 9, 11], [300, 4, 4, 4, 18, 99, 123, 7, 64, 31, 12, 8, 200, 150, 3, 90, 21],
           [42, 42]]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    arch, overrides = SHAPES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(d, arch, **overrides)
    ours = load_model(d, with_tokenizer=False, progress=False)
    return hf, ours


def _batch(prompts):
    t = max(map(len, prompts))
    tokens = np.zeros((len(prompts), t), np.int32)
    positions = np.full((len(prompts), t), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        positions[i, :len(p)] = np.arange(len(p))
    return jnp.asarray(tokens), jnp.asarray(positions)


def test_logits_match_transformers_on_a_ragged_batch(pair):
    hf, ours = pair
    tokens, positions = _batch(PROMPTS)
    logits, _ = ours.model(tokens, positions)
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(np.asarray(logits[i, :len(p)]), hf_logits(hf, p), atol=ATOL, rtol=0)


def test_paged_prefill_then_decode_equals_full_forward(pair):
    hf, ours = pair
    p = PROMPTS[1]
    full, _ = ours.model(*_batch([p]))
    split = 5
    pool = new_pool(ours.cfg, num_pages=8, page_size=4)
    logits, pool = paged_step(ours.model, pool, p[:split], 0, decode=False, block_q=4)
    np.testing.assert_allclose(logits, np.asarray(full[0, :split]), atol=ATOL, rtol=0)
    for pos in range(split, len(p)):
        step, pool = paged_step(ours.model, pool, [p[pos]], pos, decode=True)
        np.testing.assert_allclose(step[0], np.asarray(full[0, pos]), atol=ATOL, rtol=0)


def test_32_greedy_tokens_equal_transformers_generate(pair):
    hf, ours = pair
    gen = Generator(ours.model, ours.cfg, None, max_model_len=128)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    out = gen.generate(PROMPTS, [params] * len(PROMPTS))
    for p, c in zip(PROMPTS, out):
        assert c.token_ids == hf_greedy(hf, p, 32)
        assert c.finish_reason == "length"


def test_stacked_scanned_layers_equal_the_per_layer_loop(pair, tmp_path):
    """GPU/TPU stack the layers and scan them; CPU keeps one array per layer. Same numbers."""
    hf, ours = pair
    from hyprjax.formats.load import load_weights, read_config

    cfg, weights = read_config(ours.path)
    scanned = load_weights(cfg, weights, jnp.dtype(jnp.float32), progress=False, scan_layers=True)
    assert scanned.layers.attn.q_proj.kernel[...].shape[0] == cfg.num_layers
    tokens, positions = _batch(PROMPTS)
    want, _ = ours.model(tokens, positions)
    got, _ = scanned(tokens, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    p = PROMPTS[1]
    pool_a, pool_b = new_pool(cfg, num_pages=8, page_size=4), new_pool(cfg, num_pages=8, page_size=4)
    a, pool_a = paged_step(ours.model, pool_a, p[:6], 0, decode=False, block_q=4)
    b, pool_b = paged_step(scanned, pool_b, p[:6], 0, decode=False, block_q=4)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    a, _ = paged_step(ours.model, pool_a, [p[6]], 6, decode=True)
    b, _ = paged_step(scanned, pool_b, [p[6]], 6, decode=True)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
