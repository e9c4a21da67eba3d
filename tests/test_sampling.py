"""The on-device sampler against transformers' logits processors, and stop handling."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from hyprjax.errors import HyprjaxError
from hyprjax.sampling import SamplingArrays, SamplingParams, _filter, apply_penalties, sample

V = 64


def _arrays(params, seeds=None):
    return SamplingArrays.build(params, len(params), seeds or [0] * len(params))


def _hf_warp(logits, p: SamplingParams):
    scores = torch.tensor(logits)[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = lp.TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = lp.TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1:
        scores = lp.TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0:
        scores = lp.MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.6, min_p=0.05),
])
def test_filters_keep_the_same_tokens_as_transformers(params, rng):
    logits = rng.normal(size=(3, V)).astype(np.float32) * 3
    s = _arrays([params] * 3)
    ours = np.asarray(_filter(jnp.asarray(logits) / params.temperature, s))
    for row in range(3):
        ref = _hf_warp(logits[row], params)
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(ref))
        kept = np.isfinite(ref)
        np.testing.assert_allclose(ours[row][kept], ref[kept], rtol=1e-6)


def test_rows_with_different_filters_in_one_batch(rng):
    logits = rng.normal(size=(2, V)).astype(np.float32)
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.5)]
    ours = np.asarray(_filter(jnp.asarray(logits), _arrays(params)))
    for row, p in enumerate(params):
        assert np.array_equal(np.isfinite(ours[row]), np.isfinite(_hf_warp(logits[row], p)))


def test_repetition_penalty_matches_transformers(rng):
    logits = rng.normal(size=(1, V)).astype(np.float32)
    history = [3, 7, 7, 40]
    seen = np.zeros((1, V), bool)
    seen[0, history] = True
    ours = apply_penalties(jnp.asarray(logits), _arrays([SamplingParams(repetition_penalty=1.3)]),
                           jnp.zeros((1, V), jnp.int32), jnp.asarray(seen))
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.tensor(logits))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_presence_and_frequency_penalties_follow_openai(rng):
    logits = rng.normal(size=(1, V)).astype(np.float32)
    counts = np.zeros((1, V), np.int32)
    counts[0, [5, 9]] = [3, 1]
    s = _arrays([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)])
    ours = np.asarray(apply_penalties(jnp.asarray(logits), s, jnp.asarray(counts), jnp.zeros((1, V), bool)))
    expected = logits - 0.25 * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible(rng):
    logits = jnp.asarray(rng.normal(size=(4, V)).astype(np.float32))
    zeros, none = jnp.zeros((4, V), jnp.int32), jnp.zeros((4, V), bool)
    step = jnp.zeros((4,), jnp.int32)
    greedy = sample(logits, _arrays([SamplingParams(temperature=0.0)] * 4), zeros, none, step)
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), -1))
    hot = [SamplingParams(temperature=5.0)] * 4
    a = sample(logits, _arrays(hot, [1, 2, 3, 4]), zeros, none, step)
    b = sample(logits, _arrays(hot, [1, 2, 3, 4]), zeros, none, step)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Row 0's draw depends on its own seed only, not on its neighbours.
    c = sample(logits, _arrays(hot, [1, 9, 9, 9]), zeros, none, step)
    assert int(c[0]) == int(a[0])
    draws = {int(sample(logits[:1], _arrays(hot[:1], [s]), zeros[:1], none[:1], step[:1])[0]) for s in range(40)}
    assert len(draws) > 5


def test_sampled_frequencies_follow_the_softmax():
    n = 4000
    row = jnp.asarray(np.log(np.array([0.5, 0.25, 0.15, 0.1] + [1e-9] * 4, np.float32)))
    logits = jnp.broadcast_to(row, (n, 8))
    s = _arrays([SamplingParams(temperature=1.0)] * n, list(range(n)))
    got = np.asarray(sample(logits, s, jnp.zeros((n, 8), jnp.int32), jnp.zeros((n, 8), bool),
                            jnp.zeros((n,), jnp.int32)))
    freq = np.bincount(got, minlength=8) / n
    np.testing.assert_allclose(freq[:4], [0.5, 0.25, 0.15, 0.1], atol=0.03)
    s = _arrays([SamplingParams(temperature=1.0, top_k=2)] * n, list(range(n)))
    got = np.asarray(sample(logits, s, jnp.zeros((n, 8), jnp.int32), jnp.zeros((n, 8), bool),
                            jnp.zeros((n,), jnp.int32)))
    assert set(np.unique(got)) == {0, 1}


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", 1.5), ("min_p", 2.0), ("repetition_penalty", 0.0),
                                         ("presence_penalty", 3.0), ("top_k", -5)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(HyprjaxError, match=field):
        SamplingParams(**{field: value})
