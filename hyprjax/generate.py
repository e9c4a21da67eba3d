"""Batched generation over a contiguous KV cache: one bucketed prefill, then chunked decode.

Shapes are static inside jit: the batch pads to a power of two, the prompt to a power of two
(>= 16) and the cache to a power of two (>= 256 slots), so a new prompt inside a bucket
compiles nothing. Decode runs up to `decode_chunk` tokens per host call in a `lax.while_loop` that stops
early once every row is done (EOS, end-of-turn or max_tokens, all checked on device); the host
only reads the chunk's tokens, detokenizes, and checks stop strings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .errors import HyprjaxError, PromptTooLongError
from .model import init_cache
from .detok import NullDecoder, OutputTracker
from .sampling import SamplingArrays, SamplingParams, fresh_seed, record, sample

CACHE_ROUND = 256


@dataclass
class Completion:
    """One finished sequence."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, end-of-turn, stop string or token) | "length"
    prompt: str | None = None


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _prefill(graphdef, state, cache, tokens, lengths, sampling: SamplingArrays):
    """tokens i32[B, T] (right-padded), lengths i32[B] -> first tokens i32[B], cache, counts, seen."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    idx = jnp.arange(t)[None, :]
    valid = idx < lengths[:, None]
    positions = jnp.where(valid, idx, -1)
    # The cache is empty, so no query sees past slot t: attend over t slots, not the whole cache.
    logits, cache = model(tokens, positions, cache, logit_index=jnp.maximum(lengths - 1, 0), kv_len=t)
    v = logits.shape[-1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    seen = jnp.zeros((b, v), bool).at[rows, jnp.where(valid, tokens, v)].set(True, mode="drop")
    counts = jnp.zeros((b, v), jnp.int32)
    first = sample(logits, sampling, counts, seen, jnp.zeros((b,), jnp.int32))
    counts, seen = record(first, counts, seen, lengths > 0)
    return first, cache, counts, seen


def _decode(graphdef, state, cache, counts, seen, tok, pos, gen, done, max_new, eos, sampling, *, n_steps):
    """Up to n_steps tokens per row. tok/pos/gen/max_new i32[B], done bool[B], eos i32[B, E].

    Returns (out i32[B, n_steps] (-1 past the last step run), steps run, cache, counts, seen,
    tok, pos, gen, done).
    """
    model = nnx.merge(graphdef, state)
    b = tok.shape[0]
    out = jnp.full((b, n_steps), -1, jnp.int32)

    def cond(carry):
        i, done = carry[0], carry[-1]
        return (i < n_steps) & ~jnp.all(done)

    def body(carry):
        i, out, cache, counts, seen, tok, pos, gen, done = carry
        logits, cache = model(tok[:, None], pos[:, None], cache, logit_index=jnp.zeros((b,), jnp.int32))
        nxt = sample(logits, sampling, counts, seen, gen)
        counts, seen = record(nxt, counts, seen, ~done)
        out = out.at[:, i].set(nxt)
        gen = gen + 1
        done = done | jnp.any(nxt[:, None] == eos, axis=-1) | (gen >= max_new)
        return i + 1, out, cache, counts, seen, nxt, pos + 1, gen, done

    carry = (jnp.int32(0), out, cache, counts, seen, tok, pos, gen, done)
    steps, out, cache, counts, seen, tok, pos, gen, done = jax.lax.while_loop(cond, body, carry)
    return out, steps, cache, counts, seen, tok, pos, gen, done


class Generator:
    """Jitted prefill + decode over split NNX state (plain jax.jit; see STYLE.md item 5)."""

    def __init__(self, model, cfg: ModelConfig, tokenizer, *, max_model_len: int | None = None,
                 decode_chunk: int = 16, max_batch: int = 32):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.decode_chunk, self.max_batch = decode_chunk, max_batch
        self._prefill = jax.jit(partial(_prefill, self.graphdef), donate_argnums=(1,))
        self._decode = jax.jit(partial(_decode, self.graphdef), static_argnames=("n_steps",),
                               donate_argnums=(1, 2, 3))

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise HyprjaxError("the prompt is empty: give at least one token")
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens, but the context holds "
                                     f"{self.max_model_len} (prompt plus at least one generated token)")

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Generate for each prompt (token ids); `on_text(i, delta)` streams text as it comes."""
        for p in prompts:
            self.check_prompt(len(p))
        results = []
        for start in range(0, len(prompts), self.max_batch):
            seqs = self._make_seqs(prompts[start:start + self.max_batch], params[start:start + self.max_batch])
            for i, delta in self._run(seqs):
                if on_text is not None and delta:
                    on_text(start + i, delta)
            results.extend(Completion(s.prompt, s.tokens, s.text, s.finish_reason) for s in seqs)
        return results

    def _make_seqs(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[OutputTracker]:
        tok = self.tokenizer
        base_eos = frozenset(tok.eos_token_ids) if tok is not None else frozenset(self.cfg.eos_token_ids)
        seqs = []
        for ids, p in zip(prompts, params):
            if len(ids) + p.max_tokens > self.max_model_len:  # generation stops at the context's end
                p = dataclasses.replace(p, max_tokens=self.max_model_len - len(ids))
            eos = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else base_eos)
            seqs.append(OutputTracker(list(ids), p, eos, tok.stream_decoder() if tok is not None else NullDecoder()))
        return seqs

    def _run(self, seqs: list[OutputTracker]) -> Iterator[tuple[int, str]]:
        """Prefill and decode one batch; yields (row, new text) as tokens arrive."""
        n = len(seqs)
        prompts, params = [s.prompt for s in seqs], [s.params for s in seqs]
        b = _bucket(n)
        lengths = np.zeros(b, np.int32)
        lengths[:n] = [len(p) for p in prompts]
        t = _bucket(int(lengths.max()), 16)
        # Cache slots: a power of two (>= 256) covering prompt + max_tokens, so different lengths and
        # max_tokens inside one bucket reuse one compiled program.
        slots = min(self.max_model_len, _bucket(int(lengths.max()) + max(p.max_tokens for p in params), CACHE_ROUND))
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        sampling = SamplingArrays.build(params, b, [p.seed if p.seed is not None else fresh_seed() for p in params])
        cache = init_cache(self.cfg, b, slots, self.dtype)
        first, cache, counts, seen = self._prefill(self.state, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                                   sampling)
        first = np.asarray(first)
        for i, s in enumerate(seqs):
            s.push(int(first[i]))
            yield i, s.delta()
        e = _bucket(max(len(s.eos) for s in seqs), 8)  # fixed width: no recompile per eos count
        eos = np.full((b, e), -1, np.int32)
        for i, s in enumerate(seqs):
            eos[i, :len(s.eos)] = sorted(s.eos)
        max_new = np.zeros(b, np.int32)
        max_new[:n] = [p.max_tokens for p in params]
        done = np.ones(b, bool)
        done[:n] = [s.finish_reason is not None for s in seqs]
        state = (jnp.asarray(first), jnp.asarray(lengths), jnp.asarray((lengths > 0).astype(np.int32)))
        eos, max_new = jnp.asarray(eos), jnp.asarray(max_new)
        while not all(s.finish_reason for s in seqs):
            out, steps, cache, counts, seen, *state, done_dev = self._decode(
                self.state, cache, counts, seen, *state, jnp.asarray(done), max_new, eos, sampling,
                n_steps=self.decode_chunk)
            out, steps = np.asarray(out), int(steps)
            for i, s in enumerate(seqs):
                for j in range(steps):
                    if s.finish_reason:
                        break
                    s.push(int(out[i, j]))
                done[i] = s.finish_reason is not None
                yield i, s.delta()
