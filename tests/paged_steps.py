"""Drive the model through the engine's paged seams by hand: one sequence, one step at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hyprjax.engine.paged import LoraStep, PagedAttention, PagedLora, PagedMeta, init_kv_pool
from hyprjax.engine.runner import _pairs as runner_pairs


def new_pool(cfg, num_pages: int, page_size: int, dtype=jnp.float32):
    return init_kv_pool(cfg, num_pages, page_size, dtype)


def paged_step(model, pool, ids: list[int], start: int, *, decode: bool, block_q: int = 8,
               tables=None, mix=()):
    """Feed `ids` at positions start.. (pages 0, 1, 2, ... in order) as one decode token or one
    prefill chunk; returns (logits f32[len(ids), V] at every fed token, pool). `mix` is the
    ((slot, weight), ...) of adapters applied from `tables` (the registry's low-rank slot table, or
    the registry itself for every kind)."""
    n = len(ids)
    assert not decode or n == 1
    t = 1 if decode else -(-n // block_q) * block_q
    tokens = np.zeros(t, np.int32)
    tokens[:n] = ids
    positions = np.full(t, -1, np.int32)
    positions[:n] = np.arange(start, start + n)
    slots = positions.copy()  # page i holds positions [i * page_size, (i + 1) * page_size)
    table = np.arange(pool.k.shape[1], dtype=np.int32)[None]
    blocks = np.zeros((t // block_q,) if not decode else (0,), np.int32)
    meta = PagedMeta(jnp.asarray(slots), jnp.zeros((1,) if decode else (0,), jnp.int32), jnp.asarray(blocks),
                     jnp.asarray(table), jnp.asarray([start + n], jnp.int32), block_q=block_q)
    adapter = None
    if mix:
        block = 1 if decode else block_q
        sparse, parts = {}, (lambda slot: ("lora",))
        if hasattr(tables, "sparse_tables"):  # a LoraRegistry: every kind of table it holds
            tables, sparse, parts = tables.tables, tables.sparse_tables, tables.parts

        def pairs_of(part):
            rows = [(s, k * block, w) for s, w in mix if part in parts(s) for k in range(t // block)]
            pairs, empty = runner_pairs(rows, max(len(rows), 1)), runner_pairs([], 0)
            return (pairs, empty) if decode else (empty, pairs)

        step = LoraStep(tables, *pairs_of("lora"), sparse, {part: pairs_of(part) for part in sparse})
        adapter = PagedLora(step, meta)

    @jax.jit
    def run(model, pool):
        return model(jnp.asarray(tokens)[None], jnp.asarray(positions)[None], attention=PagedAttention(meta),
                     kv=pool, adapter=adapter, logit_index=jnp.arange(n, dtype=jnp.int32)[None])

    logits, pool = run(model, pool)
    return np.asarray(logits[0]), pool


def paged_logits(model, cfg, prompt: list[int], *, block_q: int = 8, tables=None, mix=()) -> np.ndarray:
    """Logits [T, V] over one prompt in a single paged prefill step."""
    pages = -(-len(prompt) // block_q) + 1
    pool = new_pool(cfg, pages, block_q)
    return paged_step(model, pool, prompt, 0, decode=False, block_q=block_q, tables=tables, mix=mix)[0]
