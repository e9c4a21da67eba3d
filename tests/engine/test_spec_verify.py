"""Speculative verification: greedy exactness, token identity with the plain sampler for n-gram
drafts, and chi-square tests that emitted tokens follow the target's processed distribution.

The chi-square checks use ALPHA = 1e-4. Seeds are fixed, so each check is deterministic; the
threshold bounds how likely a *correct* sampler would fail if the seeds changed (about 0.2% over
the 18 checks here; over 8 other seeds the smallest of 144 p-values was 1.5e-3), while the
deliberately wrong samplers below score p < 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from hyprjax.engine.spec_verify import record_emitted, verify
from hyprjax.sampling import SamplingArrays, SamplingParams, record, sample

V, K, N = 16, 2, 20000
ALPHA = 1e-4
CONFIGS = {
    "top_p": SamplingParams(temperature=0.7, top_p=0.9),
    "top_k_min_p": SamplingParams(temperature=0.7, top_k=6, min_p=0.05),
    "penalties": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3,
                                presence_penalty=0.5, frequency_penalty=0.3),
}
_verify = jax.jit(verify)

# Fixed target logits [K+1, V] and a history: prompt tokens (seen) and earlier outputs (counted).
_rng = np.random.default_rng(7)
LOGITS = (_rng.normal(size=(K + 1, V)) * 1.5).astype(np.float32)
C0 = int(np.argmax(LOGITS[0]))
LOGITS[1, C0] = LOGITS[1].max() + 0.5  # the token just emitted is likely again: penalties matter
COUNTS = np.zeros(V, np.int32)
COUNTS[[3, 5]] = 1, 2  # earlier outputs 3, 5, 5
SEEN = COUNTS > 0
SEEN[[C0, 9]] = True  # prompt tokens


def _arrays(p: SamplingParams, n: int, seed: int = 0) -> SamplingArrays:
    """n rows of p, each with its own key (the seeds of n different requests)."""
    def col(name, dtype):
        return jnp.full((n,), getattr(p, name), dtype)

    keys = jax.random.key_data(jax.random.split(jax.random.key(seed), n))
    return SamplingArrays(col("temperature", jnp.float32), col("top_k", jnp.int32), col("top_p", jnp.float32),
                          col("min_p", jnp.float32), col("repetition_penalty", jnp.float32),
                          col("presence_penalty", jnp.float32), col("frequency_penalty", jnp.float32),
                          keys.astype(jnp.uint32))


def _target(j: int, p: SamplingParams, extra=()) -> np.ndarray:
    """Reference p_j: penalties (HF repetition, OpenAI presence/frequency) over the history plus
    the drafts `extra`, then transformers' temperature / top-k / top-p / min-p warpers."""
    counts = COUNTS + np.bincount(np.asarray(extra, int), minlength=V)
    seen = SEEN | (counts > 0)
    ids = torch.tensor(np.flatnonzero(seen)[None])
    scores = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, torch.tensor(LOGITS[j])[None])
    scores = scores - torch.tensor(p.frequency_penalty * counts + p.presence_penalty * (counts > 0))
    warpers = [lp.TemperatureLogitsWarper(p.temperature)]
    warpers += [lp.TopKLogitsWarper(p.top_k)] if p.top_k > 0 else []
    warpers += [lp.TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    warpers += [lp.MinPLogitsWarper(p.min_p)] if p.min_p > 0 else []
    for w in warpers:
        scores = w(ids, scores)
    return torch.softmax(scores[0].double(), -1).numpy()


def _pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of `tokens` to `probs`; tokens outside the support fail outright.
    Categories expected fewer than 5 times are pooled, as the test's approximation needs."""
    observed = np.bincount(tokens, minlength=V)
    if observed[probs == 0].any():
        return 0.0
    expected = probs * len(tokens)
    small = (expected < 5) & (probs > 0)
    obs = np.append(observed[expected >= 5], observed[small].sum())
    exp = np.append(expected[expected >= 5], expected[small].sum())
    obs, exp = (obs, exp) if small.any() else (obs[:-1], exp[:-1])
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(jax.scipy.special.gammaincc((len(obs) - 1) / 2, stat / 2))


def _run(p: SamplingParams, drafts: np.ndarray, q=None, seed=0):
    n = drafts.shape[0]
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, K + 1, V))
    counts = jnp.broadcast_to(jnp.asarray(COUNTS), (n, V))
    seen = jnp.broadcast_to(jnp.asarray(SEEN), (n, V))
    step = jnp.arange(n, dtype=jnp.int32) % 97
    a, toks = _verify(logits, jnp.asarray(drafts, jnp.int32), jnp.full((n,), K, jnp.int32), _arrays(p, n, seed),
                      counts, seen, step, None if q is None else jnp.asarray(q))
    return np.asarray(a), np.asarray(toks)


def _draft_model(p: SamplingParams):
    """A draft model's q_j (random, overlapping p_j) and N drafts x_j ~ q_j (numpy's own draws)."""
    rng = np.random.default_rng(11)
    q = np.exp(0.6 * LOGITS[:K] + rng.normal(size=(K, V)))
    q /= q.sum(-1, keepdims=True)
    x = np.stack([rng.choice(V, size=N, p=q[j]) for j in range(K)], axis=1)
    return q, x


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ngram_drafts_emit_the_target_distribution(name):
    p = CONFIGS[name]
    p1 = _target(1, p, [C0])
    c1 = int(np.argsort(p1)[-2])  # a plausible but not certain second draft
    a, toks = _run(p, np.tile([C0, c1], (N, 1)))
    assert _pvalue(toks[:, 0], _target(0, p)) > ALPHA
    first_ok = a >= 1  # second token: conditioned on the first draft's acceptance
    assert first_ok.sum() > 2000 and _pvalue(toks[first_ok, 1], p1) > ALPHA
    both = a == 2  # third token: the bonus draw at position K
    assert both.sum() > 1000 and _pvalue(toks[both, 2], _target(2, p, [C0, c1])) > ALPHA
    if name == "penalties":  # the check sees a verifier that forgot the drafts in the penalty history
        assert _pvalue(toks[first_ok, 1], _target(1, p)) < 1e-12


@pytest.mark.parametrize("name", list(CONFIGS))
def test_draft_model_drafts_emit_the_target_distribution(name):
    p = CONFIGS[name]
    q, x = _draft_model(p)
    a, toks = _run(p, x, np.broadcast_to(q, (N, K, V)))
    p0 = _target(0, p)
    assert _pvalue(toks[:, 0], p0) > ALPHA
    c = int(np.argmax(np.minimum(p0, q[0])))  # the draft most often accepted first
    p1 = _target(1, p, [c])
    given = (a >= 1) & (x[:, 0] == c)
    assert given.sum() > 1500 and _pvalue(toks[given, 1], p1) > ALPHA
    c1 = int(np.argmax(np.minimum(p1, q[1])))
    given2 = given & (a == 2) & (x[:, 1] == c1)
    assert given2.sum() > 250 and _pvalue(toks[given2, 2], _target(2, p, [c, c1])) > ALPHA


def test_the_chi_square_check_rejects_wrong_samplers():
    p = CONFIGS["top_p"]
    q, x = _draft_model(p)
    a, toks = _run(p, x, np.broadcast_to(q, (N, K, V)))
    p0 = _target(0, p)
    assert _pvalue(x[:, 0], p0) < 1e-12  # accept always: the first token follows q_0, not p_0
    # Accept by min(1, p/q) but redraw from p instead of the residual after a rejection.
    redraw = np.random.default_rng(5).choice(V, size=N, p=p0)
    assert _pvalue(np.where(a >= 1, x[:, 0], redraw), p0) < 1e-12


def test_pvalue_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(V, 5.0))
    toks = rng.choice(V, size=2000, p=0.8 * probs + 0.2 / V)  # a little off, so p is not ~1
    ref = stats.chisquare(np.bincount(toks, minlength=V), probs * len(toks)).pvalue
    np.testing.assert_allclose(_pvalue(toks, probs), ref, rtol=1e-3)


@pytest.mark.parametrize("with_q", [False, True])
def test_same_tokens_as_the_plain_sampler(with_q, rng):
    """Rows whose drafts agree with the non-speculative tokens for m positions accept exactly m
    and emit those tokens plus the next: greedy rows always (argmax), and sampled rows too when
    the drafts are deterministic (n-gram), since each emitted token is the plain sampler's draw."""
    b, k, v = 8, 3, 32
    logits = jnp.asarray(rng.normal(size=(b, k + 1, v)).astype(np.float32) * 2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.5,
                                                              presence_penalty=1.0)] * 2
    params += [SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5)] * 4
    s = SamplingArrays.build(params, b, list(range(100, 100 + b)))
    counts = jnp.zeros((b, v), jnp.int32).at[:, 4].set(2)
    seen = (counts > 0).at[:, 7].set(True)
    step = jnp.asarray(rng.integers(0, 50, size=b), jnp.int32)
    plain, c, sn = [], counts, seen  # the non-speculative decode: one token per step
    for j in range(k + 1):
        plain.append(sample(logits[:, j], s, c, sn, step + j))
        c, sn = record(plain[-1], c, sn, jnp.ones((b,), bool))
    plain = np.stack([np.asarray(t) for t in plain], axis=1)
    agree = np.array([0, 1, 2, 3, 3, 1, 0, 2])  # drafts match the plain tokens this far
    num_draft = np.array([3, 3, 3, 3, 2, 0, 3, 1])
    drafts = plain[:, :k].copy()
    for row in range(b):
        drafts[row, agree[row]:] = (plain[row, agree[row]:k] + 1) % v
    q = jnp.asarray(rng.dirichlet(np.ones(v), size=(b, k)).astype(np.float32)) if with_q else None
    a, toks = _verify(logits, jnp.asarray(drafts), jnp.asarray(num_draft), s, counts, seen, step, q)
    a, toks = np.asarray(a), np.asarray(toks)
    # With a q, sampled rows judging drafts draw differently; row 5 judges none: its draw is the plain one.
    checked = range(b) if not with_q else [0, 1, 2, 3, 5]
    for row in checked:
        want = min(agree[row], num_draft[row])
        assert a[row] == want, row
        np.testing.assert_array_equal(toks[row, :want + 1], plain[row, :want + 1])
    for row in range(b):
        assert a[row] <= num_draft[row] and (toks[row, a[row] + 1:] == -1).all()
        np.testing.assert_array_equal(toks[row, :a[row]], drafts[row, :a[row]])


def test_record_emitted_counts_only_emitted_tokens():
    counts, seen = jnp.zeros((3, 6), jnp.int32), jnp.zeros((3, 6), bool)
    tokens = jnp.asarray([[1, 1, 4], [2, -1, -1], [5, 0, -1]], jnp.int32)
    counts, seen = record_emitted(tokens, counts, seen, jnp.asarray([True, True, False]), jnp.asarray([2, 0, 1]))
    want = np.zeros((3, 6), np.int32)
    want[2, [1, 4]] = 2, 1
    want[0, 2] = 1
    np.testing.assert_array_equal(np.asarray(counts), want)
    np.testing.assert_array_equal(np.asarray(seen), want > 0)


def test_shape_errors_name_the_arguments():
    s = _arrays(CONFIGS["top_p"], 2)
    z = jnp.zeros((2, V), jnp.int32)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(jnp.zeros((2, 3, V)), jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32), s, z, z > 0, z[:, 0])
    with pytest.raises(ValueError, match="draft_probs"):
        verify(jnp.zeros((2, 3, V)), jnp.zeros((2, 2), jnp.int32), jnp.zeros(2, jnp.int32), s, z, z > 0, z[:, 0],
               jnp.zeros((2, 3, V)))
