"""One engine step on the device: the model over a packed step, then sampling.

Two ways to run it, chosen by the model's layer layout (`model.default_scan_layers`):

* **fused** (GPU/TPU: layers stacked and scanned): one program per step bucket (`_STEP`).
* **layer-wise** (CPU: one array per layer): per bucket, one program embeds the tokens, one
  program runs *a* decoder layer and is called once per layer with that layer's weights, KV
  pool and per-layer data as arguments, and one program applies the head and samples.

Why layer-wise on CPU: XLA:CPU compiles each kernel of a program into its own JIT object and
keeps it resident, so a fused step that unrolls L layers holds L copies of the layer's ~55
kernels. Measured (Qwen3-0.6B shape cut to 18 layers, 2-core EPYC, jax 0.10.2): ~40 MB resident
and ~3-6 s of compilation per fused bucket, ~1,000 kernels each; the 18 start-up buckets of the
default model held 2.6-3.1 GB. (The scan that would share the kernels copies every layer's
weights on XLA:CPU: docs/engine.md.) The layer program is the same for every layer, so a bucket
compiles one layer's kernels (one per distinct layer structure: quantized files may mix types). The price is L + 2 dispatches per step instead of one; XLA:CPU
runs them asynchronously, so Python enqueues layer i+1 while layer i computes, and the numbers
are in docs/engine.md.

Both paths run the same model code (`Model.embed_tokens`, `model.run_layer`, `Model.logits`)
and the same seams, and return the same tuple:
`(tokens, chosen_logprob, top_ids, top_logprobs, kv_pool, counts, seen)`; a speculative verify
step (`StepInputs.spec`, engine/speculative.py) adds each group's accepted-draft count before
the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..model import layer_data, run_layer
from ..sampling import SamplingArrays, record, sample
from .spec_verify import record_emitted, verify
from .paged import KVPool, LoraStep, PagedAttention, PagedLora, PagedMeta


@jax.tree_util.register_dataclass
@dataclass
class SpecInputs:
    """A speculative step's verify groups: decode rows g*K1 .. g*K1+K hold one sequence's last
    token and its K drafts (engine/speculative.py lays them out)."""

    num_draft: jax.Array  # i32[G] drafts of each group (0..K); the rest of its rows are padding
    group: int = field(default=1, metadata=dict(static=True))  # K1 = K + 1 rows per group


@jax.tree_util.register_dataclass
@dataclass
class StepInputs:
    tokens: jax.Array  # i32[T]
    positions: jax.Array  # i32[T], -1 = padding
    meta: PagedMeta
    logit_index: jax.Array  # i32[R] token index of each row's last token
    row_slot: jax.Array  # i32[R] persistent slot of each row's sequence
    row_step: jax.Array  # i32[R] index of the output token each row samples (seeds the key)
    row_active: jax.Array  # bool[R] rows that sample this step
    want_logprobs: jax.Array  # bool[] any row asked for logprobs
    spec: SpecInputs | None = None  # a speculative verify step (decode rows only), or None


def _finish(logits, counts, seen, inp: StepInputs, sampling: SamplingArrays, *, max_logprobs, shardings):
    """Sample each row from logits f32[R, V], record the tokens in the penalty tables, and the
    logprobs when a row asked for them. A speculative step verifies its groups instead and
    returns each row's emitted token (-1 past a group's accepted drafts and its one new token)
    and, as a fifth output, the drafts each group accepted."""
    if inp.spec is not None:
        return _verify_finish(logits, counts, seen, inp, sampling, max_logprobs=max_logprobs, shardings=shardings)
    rows_counts, rows_seen = counts[inp.row_slot], seen[inp.row_slot]
    tokens = sample(logits, sampling, rows_counts, rows_seen, inp.row_step)
    counts, seen = record(tokens, counts, seen, inp.row_active, inp.row_slot)  # into the slots' penalty rows
    return _logprobs(logits, tokens, counts, seen, inp, max_logprobs=max_logprobs, shardings=shardings)


def _verify_finish(logits, counts, seen, inp: StepInputs, sampling: SamplingArrays, *, max_logprobs, shardings):
    """Exact rejection sampling over each group's K1 rows (engine/spec_verify.py)."""
    k1, g = inp.spec.group, inp.spec.num_draft.shape[0]
    r, v = logits.shape
    first = jnp.arange(g) * k1  # each group's first row
    grouped = logits[:g * k1].reshape(g, k1, v)
    drafts = inp.tokens[:g * k1].reshape(g, k1)[:, 1:]
    slots = inp.row_slot[first]
    rows = jax.tree.map(lambda a: a[first], sampling)
    accepted, emitted = verify(grouped, drafts, inp.spec.num_draft, rows, counts[slots], seen[slots],
                               inp.row_step[first])
    counts, seen = record_emitted(emitted, counts, seen, inp.row_active[first], slots)
    tokens = jnp.full((r,), -1, jnp.int32).at[:g * k1].set(emitted.reshape(-1))
    _, chosen_lp, top_ids, top_lp, counts, seen = _logprobs(logits, jnp.maximum(tokens, 0), counts, seen, inp,
                                                            max_logprobs=max_logprobs, shardings=shardings)
    if shardings is not None:
        tokens, accepted = jax.lax.with_sharding_constraint((tokens, accepted), (shardings.replicated,) * 2)
    return tokens, chosen_lp, top_ids, top_lp, accepted, counts, seen


def _logprobs(logits, tokens, counts, seen, inp: StepInputs, *, max_logprobs, shardings):
    """(tokens, chosen logprob, top ids, top logprobs, counts, seen), placed for the next step."""

    def with_logprobs(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, max_logprobs)
        return jnp.take_along_axis(logp, tokens[:, None], axis=1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def without(logits):
        r = logits.shape[0]
        return (jnp.zeros((r,), jnp.float32), jnp.zeros((r, max_logprobs), jnp.int32),
                jnp.zeros((r, max_logprobs), jnp.float32))

    chosen_lp, top_ids, top_lp = jax.lax.cond(inp.want_logprobs, with_logprobs, without, logits)
    if shardings is not None:  # sharding.StepShardings: outputs placed as the next step's inputs
        pin = jax.lax.with_sharding_constraint
        counts, seen = pin((counts, seen), (shardings.penalties, shardings.penalties))
        tokens, chosen_lp, top_ids, top_lp = pin((tokens, chosen_lp, top_ids, top_lp), (shardings.replicated,) * 4)
    return tokens, chosen_lp, top_ids, top_lp, counts, seen


def _pin_pool(cache, shardings):
    if shardings is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, KVPool(shardings.kv, shardings.kv))


def _step(graphdef, state, cache, counts, seen, inp: StepInputs, sampling: SamplingArrays, lora: LoraStep | None,
          *, max_logprobs, shardings=None):
    model = nnx.merge(graphdef, state)
    adapter = None if lora is None else PagedLora(lora, inp.meta)
    logits, cache = model(inp.tokens[None], inp.positions[None], attention=PagedAttention(inp.meta), kv=cache,
                          adapter=adapter, logit_index=inp.logit_index[None])
    *out, counts, seen = _finish(logits[0], counts, seen, inp, sampling, max_logprobs=max_logprobs,
                                 shardings=shardings)
    return (*out, _pin_pool(cache, shardings), counts, seen)


# One jit per process, not per runner: the graphdef (hashable; equal for equal model structures)
# is a static argument, so engines over the same model shape (a rebuilt offline engine, the
# tests' many engines) share compiled steps instead of compiling every bucket again.
_STEP = jax.jit(_step, static_argnums=(0,), static_argnames=("max_logprobs", "shardings"), donate_argnums=(2, 3, 4))


def fused_step(graphdef, *, max_logprobs: int, shardings=None):
    """The step callable `(state, cache, counts, seen, inp, sampling, lora) -> 7-tuple` (fused; 8 for a
    verify step: the drafts each group accepted come before the pool)."""
    return partial(_STEP, graphdef, max_logprobs=max_logprobs, shardings=shardings)


# ---- layer-wise ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerwiseGraph:
    """The static half of a layer-wise model (hashable: equal models share compiled programs)."""

    shell: Any  # nnx.GraphDef of the model without its layers (embedding, final norm, LM head)
    # (nnx.GraphDef, PyTreeDef of its weights) of each distinct layer structure: one for a float
    # model; more when quantized layers differ (a Q4_K_M file keeps some layers' ffn_down in Q6_K)
    blocks: tuple
    kinds: tuple[int, ...]  # which of `blocks` each layer is
    cfg: ModelConfig


@jax.tree_util.register_dataclass
@dataclass
class LayerwiseState:
    """The arrays of a layer-wise model: shell weights, each layer's weights and per-layer data."""

    shell: Any  # nnx.State
    layers: list  # [L] each a list of the layer's weight arrays (in its treedef's order)
    data: list  # [L] each (index i32[], that layer's `layer_data` row)
    treedefs: tuple = field(default=(), metadata=dict(static=True))  # [L] each layer's nnx.State structure

    def layer_state(self, i: int):
        """Layer i's weights as an nnx.State (the arrays the step uses, not copies)."""
        return jax.tree.unflatten(self.treedefs[i], self.layers[i])


def split_layerwise(graphdef, state, cfg: ModelConfig, replicated=None) -> tuple[LayerwiseGraph, LayerwiseState]:
    """Split a model with one array per layer (`nnx.List` layers) into shell and layers; the
    arrays are shared, not copied. `replicated`: the mesh's replicated sharding, if any."""
    model = nnx.merge(graphdef, state)  # a new module tree over the same arrays
    layers, treedefs, kinds, blocks = [], [], [], []
    for block in model.layers:
        leaves, treedef = jax.tree.flatten(nnx.state(block))
        kind = (nnx.graphdef(block), treedef)
        if kind not in blocks:
            blocks.append(kind)
        layers.append(leaves)
        treedefs.append(treedef)
        kinds.append(blocks.index(kind))
    model.layers = nnx.List([])
    shell_def, shell = nnx.split(model)
    rows = layer_data(cfg)
    put = (lambda a: jax.device_put(a, replicated)) if replicated is not None else jax.device_put
    data = [(put(np.int32(i)), {k: put(v[i]) for k, v in rows.items()}) for i in range(cfg.num_layers)]
    return (LayerwiseGraph(shell_def, tuple(blocks), tuple(kinds), cfg),
            LayerwiseState(shell, layers, data, tuple(treedefs)))


@lru_cache(maxsize=None)
def _programs(graph: LayerwiseGraph, max_logprobs: int, shardings):
    """The jitted embed, layer and head programs of a model shape (closed over the static graph,
    so a call hashes no static argument: L + 2 calls per step stay on jit's fast path)."""
    replicated = None if shardings is None else shardings.replicated

    def pin_x(x):
        return x if replicated is None else jax.lax.with_sharding_constraint(x, replicated)

    def embed(shell, tokens):
        return pin_x(nnx.merge(graph.shell, shell).embed_tokens(tokens[None]))

    def layer(block_def, treedef, leaves, x, positions, data, cache, meta: PagedMeta, lora: LoraStep | None,
              logit_index):
        block = nnx.merge(block_def, jax.tree.unflatten(treedef, leaves))
        adapter = None if lora is None else PagedLora(lora, meta)
        index, row = data
        x, cache = run_layer(graph.cfg, block, x, positions[None], index, row, attention=PagedAttention(meta),
                             adapter=adapter, kv=cache)
        # Each layer also gathers the rows that sample (R x D, a trivial copy): the last layer's
        # are the head's input, so the head compiles once per row count, not once per bucket.
        rows = jnp.take_along_axis(x, logit_index[None, :, None], axis=1)
        return pin_x(x), pin_x(rows), _pin_pool(cache, shardings)

    def head(shell, rows, counts, seen, inp: StepInputs, sampling: SamplingArrays):
        logits = nnx.merge(graph.shell, shell).logits(rows)[0]
        return _finish(logits, counts, seen, inp, sampling, max_logprobs=max_logprobs, shardings=shardings)

    layers = tuple(jax.jit(partial(layer, *kind), donate_argnums=(1, 4)) for kind in graph.blocks)
    return jax.jit(embed), layers, jax.jit(head, donate_argnums=(2, 3))


def layerwise_step(graph: LayerwiseGraph, *, max_logprobs: int, shardings=None):
    """The step callable `(state, cache, counts, seen, inp, sampling, lora) -> 7-tuple` (8 for a verify
    step, as `fused_step`), run as
    embed, one layer program per layer, head (module docstring)."""
    embed, layer, head = _programs(graph, max_logprobs, shardings)

    def step(state: LayerwiseState, cache, counts, seen, inp: StepInputs, sampling, lora):
        x = embed(state.shell, inp.tokens)
        for kind, leaves, data in zip(graph.kinds, state.layers, state.data):
            x, rows, cache = layer[kind](leaves, x, inp.positions, data, cache, inp.meta, lora, inp.logit_index)
        *out, counts, seen = head(state.shell, rows, counts, seen, inp, sampling)
        return (*out, cache, counts, seen)

    return step
