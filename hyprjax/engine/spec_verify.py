"""Exact speculative verification on the device: rejection sampling over k + 1 target rows.

A row proposes n <= K draft tokens x_0..x_{n-1} (n varies per row; padding is ignored). The
target ran on the row's last token plus its drafts, giving logits at K + 1 positions: position j
predicts the token after x_{j-1}. `verify` returns how many drafts each row accepts (a) and the
a + 1 tokens it emits: x_0..x_{a-1}, then one token drawn at position a.

**The target distribution p_j is the non-speculative one.** Each position goes through
`hyprjax.sampling`'s processing: penalties, then temperature, then top-k/top-p/min-p (the filter
runs when some random row asks for it, as in `sample`). The penalty tables at position j are the
row's tables plus x_0..x_{j-1} (counted as outputs and marked seen). That is exact, not an
approximation: position j's outcome is used only if x_0..x_{j-1} were all accepted, and then the
history before position j *is* the prompt, the earlier outputs and x_0..x_{j-1}, which is what
the non-speculative sampler would have counted after emitting them. Greedy rows (temperature 0)
take the argmax of the penalised logits, as `sample` does.

**Acceptance** (Leviathan et al. 2023; Chen et al. 2023). Draft model, with x_j ~ q_j: accept
x_j when u * q_j(x_j) < p_j(x_j), u ~ U[0, 1) (probability min(1, p/q)); at the first rejection
emit a token from norm(max(0, p_j - q_j)). Then P(emit t) = min(p(t), q(t)) + (1 - sum_s
min(p(s), q(s))) * (p(t) - min(p(t), q(t))) / sum_s (p(s) - min(p(s), q(s))) = p(t), because both
sums equal 1 - sum_s min(p(s), q(s)); by induction over positions the emitted sequence has the
target's law. If all n drafts pass, position n's token is drawn from p_n itself (the bonus).

N-gram (no `draft_probs`): the proposal is deterministic, q_j is a point mass on x_j, so
acceptance has probability p_j(x_j) and the residual is p_j without x_j, renormalised. We realise
exactly that law by drawing y_j ~ p_j and accepting when y_j == x_j: P(accept) = p_j(x_j), and on
rejection y_j is distributed as p_j conditioned on y_j != x_j, which is the residual. Greedy rows
are this rule with p_j a point mass: accept iff x_j is the argmax, emit the argmax.

**Keys.** Every draw at position j uses k_j = fold_in(request key, step + j), the key `sample`
uses for output token step + j, so results depend only on the request's seed and the token
index, never on batch neighbours. y_j (n-gram rows, and the bonus draw everywhere) is
`categorical(k_j, processed logits)`, the very draw `sample` makes; the draft path's uniform uses
fold_in(k_j, 1) and its residual draw fold_in(k_j, 2). A draft model must draw x_j from keys
independent of these (`draft_key`).

**Same seed, speculation on or off.** Greedy: the same tokens. N-gram at temperature > 0: also
the same tokens, because y_j is the exact draw the non-speculative step would make for that
token, and each emitted token is some y_j (accepted drafts equal their y_j). Draft model at
temperature > 0: generally different tokens (same distribution): the emitted token depends on
u, q and the residual draw, which the plain sampler never makes. All three "same" claims hold
bit for bit only if the verify pass's logits equal the one-token decode's; a multi-token forward
can round differently in the last bits, which can flip a near-tie (an argmax, or a Gumbel-max
draw whose top two scores are closer than the rounding error). Likewise `sample`'s filter is
batch-wide: a row without top-k/top-p/min-p is still filtered when a neighbour asks, which drops
tail tokens once the float32 cumulative mass reads 1.0, so a different batch can, rarely, differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..sampling import SamplingArrays, _filter, apply_penalties

_UNIFORM, _RESIDUAL, _DRAFT = 1, 2, 3  # fold_in tags under k_j: distinct streams per position


def draft_key(key_data, index):
    """The key a draft model should use to draw its guess for output token `index` (u32[2] -> key)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), index), _DRAFT)


def _draw(key_data, index, logits, residual):
    """One position's draws -> (token i32, u f32), from k_j = fold_in(key, index) as `sample` makes it.

    The token is categorical(k_j, logits), `sample`'s own draw, unless `residual`: then the draw
    after a rejection, from fold_in(k_j, _RESIDUAL). u ~ U[0, 1) comes from fold_in(k_j, _UNIFORM).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), index)
    tagged = jax.random.key_data(jax.random.fold_in(key, _RESIDUAL))
    draw_key = jax.random.wrap_key_data(jnp.where(residual, tagged, jax.random.key_data(key)))
    token = jax.random.categorical(draw_key, logits).astype(jnp.int32)
    return token, jax.random.uniform(jax.random.fold_in(key, _UNIFORM))


def processed_logits(logits, s: SamplingArrays, counts, seen):
    """`sample`'s processing of logits f32[R, V] -> (scaled f32[R, V], greedy i32[R]).

    softmax(scaled) is the distribution a random row samples from; greedy is the argmax after
    penalties. Also the way a draft model should turn its logits into q (penalised by the same
    history), so that q is close to p and acceptance is high; exactness does not depend on it.
    """
    logits = apply_penalties(logits.astype(jnp.float32), s, counts, seen)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    random = s.temperature > 0
    scaled = logits / jnp.where(random, s.temperature, 1.0)[:, None]
    needs_filter = jnp.any(random & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0)))
    return jax.lax.cond(needs_filter, _filter, lambda x, _: x, scaled, s), greedy


def _histories(draft_tokens, num_draft, counts, seen):
    """Penalty tables at each position: i32[B, K+1, V] and bool[B, K+1, V] (drafts before j added)."""
    b, k = draft_tokens.shape
    valid = jnp.arange(k)[None, :] < num_draft[:, None]
    onehot = jax.nn.one_hot(jnp.where(valid, draft_tokens, -1), counts.shape[1], dtype=jnp.int32)
    before = jnp.concatenate([jnp.zeros_like(onehot[:, :1]), jnp.cumsum(onehot, axis=1)], axis=1)
    return counts[:, None] + before, seen[:, None] | (before > 0)


def verify(target_logits, draft_tokens, num_draft, s: SamplingArrays, counts, seen, step, draft_probs=None):
    """Accept or reject each row's drafts; returns (num_accepted i32[B], tokens i32[B, K+1]).

    target_logits f32[B, K+1, V]: row b position j scores the token after draft j-1.
    draft_tokens i32[B, K]; num_draft i32[B] (0..K) valid drafts per row, the rest is padding.
    s: SamplingArrays[B]; counts i32[B, V], seen bool[B, V]: each row's penalty tables before
    this step; step i32[B]: output index of the first token this step emits.
    draft_probs f32[B, K, V] or None: q_j, the distribution x_j was drawn from (draft model);
    None for deterministic (n-gram) drafts. A batch mixing both passes one_hot(x_j) as q_j for
    the n-gram rows (the same law, without the on/off token identity above).
    tokens[b, :a+1] are the emitted tokens (a = num_accepted[b] <= num_draft[b]), the rest -1.
    """
    b, k1, v = target_logits.shape
    k = k1 - 1
    if draft_tokens.shape != (b, k) or num_draft.shape != (b,) or step.shape != (b,):
        raise ValueError(f"verify: target_logits {target_logits.shape} needs draft_tokens ({b}, {k}) and "
                         f"num_draft, step ({b},); got {draft_tokens.shape}, {num_draft.shape}, {step.shape}")
    if draft_probs is not None and draft_probs.shape != (b, k, v):
        raise ValueError(f"verify: draft_probs {draft_probs.shape} must be ({b}, {k}, {v})")
    draft_tokens, num_draft = draft_tokens.astype(jnp.int32), jnp.clip(num_draft, 0, k)

    def flat(x):  # [B, K+1, ...] -> [B * (K+1), ...]: one row per (request, position)
        return x.reshape(b * k1, *x.shape[2:])

    hist_counts, hist_seen = _histories(draft_tokens, num_draft, counts, seen)
    rows = jax.tree.map(lambda a: jnp.repeat(a, k1, axis=0), s)  # SamplingArrays[B * (K+1)]
    scaled, greedy = processed_logits(flat(target_logits), rows, flat(hist_counts), flat(hist_seen))
    scaled, greedy = scaled.reshape(b, k1, v), greedy.reshape(b, k1)
    random = s.temperature > 0
    drafts = jnp.concatenate([draft_tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)  # x_K: never used
    in_draft = jnp.arange(k1)[None, :] < num_draft[:, None]  # bool[B, K+1] positions that judge a draft
    key_data, index = rows.keys, flat(step[:, None] + jnp.arange(k1))  # k_j = fold_in(key, step + j)

    def sampled(scaled):  # -> (accept bool[B, K+1], emit i32[B, K+1]) for the random rows
        if draft_probs is None:
            y, _ = jax.vmap(_draw)(key_data, index, flat(scaled), jnp.zeros((b * k1,), bool))
            y = y.reshape(b, k1)
            return y == drafts, y
        q = jnp.concatenate([draft_probs.astype(jnp.float32), jnp.zeros((b, 1, v), jnp.float32)], axis=1)
        p = jax.nn.softmax(scaled, axis=-1)
        px = jnp.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]
        qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        residual = jnp.maximum(p - q, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p)  # p == q: never rejects
        # One draw per position: from the residual where a draft is judged, else from p (the bonus).
        logits = jnp.where(in_draft[..., None], jnp.log(residual), scaled)
        emit, u = jax.vmap(_draw)(key_data, index, flat(logits), flat(in_draft))
        return u.reshape(b, k1) * qx < px, emit.reshape(b, k1)

    def greedy_only(_):
        return greedy == drafts, greedy

    # As in `sample`: a batch of greedy rows never pays for the random draws.
    accept, emit = jax.lax.cond(jnp.any(random), sampled, greedy_only, scaled)
    accept = jnp.where(random[:, None], accept, greedy == drafts) & in_draft
    emit = jnp.where(random[:, None], emit, greedy)
    num_accepted = jnp.sum(jnp.cumprod(accept[:, :k], axis=1), axis=1).astype(jnp.int32)
    pos = jnp.arange(k1)[None, :]
    tokens = jnp.where(pos < num_accepted[:, None], drafts,
                       jnp.where(pos == num_accepted[:, None], emit, -1))
    return num_accepted, tokens


def record_emitted(tokens, counts, seen, active, rows=None):
    """Count each row's emitted tokens i32[B, K+1] (-1 = none) into table rows `rows` (default b).

    The multi-token form of `sampling.record`: inactive rows and -1 entries write out of bounds
    and are dropped.
    """
    b, v = tokens.shape[0], counts.shape[1]
    rows = jnp.arange(b) if rows is None else rows
    rows = jnp.where(active, rows, counts.shape[0])[:, None]
    cols = jnp.where(tokens >= 0, tokens, v)
    return counts.at[rows, cols].add(1, mode="drop"), seen.at[rows, cols].set(True, mode="drop")
