"""Batched multi-LoRA: every token block adds the deltas of its own adapters, weighted.

    y[blk] += w * (x[blk] @ a[slot]) @ b[slot]      for each pair (blk, slot, w) of the step

`a` f[S, din, R] and `b` f[S, R, dout] are one module's slot table (ranks zero-padded to R; the
adapter's scale is folded into `b` when the slot is written). A *pair* ties a block of `block`
consecutive tokens starting at `start` to one slot with a weight: a decode token with a
two-adapter mix is two pairs of one token; a prefill chunk of 48 tokens with one adapter is
three pairs of 16. Only the first `count` pairs are real; the rest of the fixed-size arrays are
padding that is never read. Pairs are sorted by slot, so consecutive pairs reuse the same
adapter rows while they are in cache.

Why pairs rather than a dense [T, slots] weight matrix: the dense form multiplies every token by
every slot's adapter (T * S * R * (din + dout) flops: as much as the base model at S = 32), while
the pairs touch each token's own adapters only, and the trip count follows the real work, so a
step pays nothing for slots it does not use. Why not a gather of a[slot] per token: that
materialises one [din, R] copy per token in memory; the loop below slices one adapter at a time
into cache instead.

Implementations:
  * `ref_lora_delta`: a `fori_loop` over the `count` real pairs (dynamic trip count); the XLA
    path, and the CPU serving path.
  * `naive_lora_delta`: one dense gather per pair; ground truth for tests.
  * Pallas kernels for GPU and TPU in `lora_pallas.py` (interpret mode on CPU in tests).

bfloat16 slot tables on the XLA path are kept as their uint16 bits (`bf16_bits`) and widened to
float32 per slice (`widen`): XLA:CPU has no bfloat16 dynamic-slice, so slicing a bf16 table
became convert(whole table) -> f32, slice, and that whole-table conversion was hoisted out of
the pair loop, converting every layer's and slot's values each call (measured: a [28, 33, 256,
16, 16] block table, 32 decode pairs, 0.9 ms in float32 -> 35 ms in bf16). Integer slices are
native, and bf16 -> f32 is a 16-bit shift of the bits. Half the bytes of float32 per pair
(`EngineConfig.adapter_dtype`, docs/lora.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_BACKENDS = ("xla", "pallas")


def bf16_bits(values):
    """bfloat16 `values` (any float array, numpy or jax) as the uint16 bits the XLA path reads."""
    if isinstance(values, jax.Array):
        return lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return np.asarray(values).astype(jnp.bfloat16).view(np.uint16)


def widen(v) -> jax.Array:
    """float32 of a table slice: uint16 is bfloat16 bits (`bf16_bits`), floats convert, the
    rest (int32 indices) pass unchanged."""
    if v.dtype == jnp.uint16:
        return lax.bitcast_convert_type(v.astype(jnp.uint32) << 16, jnp.float32)
    return v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v


def table_reader(t, layer):
    """slot -> widen(t[layer, slot]) (t[slot] with layer None), sliced inside a pair loop."""
    if layer is None:
        return lambda slot: widen(lax.dynamic_index_in_dim(t, slot, 0, keepdims=False))
    return lambda slot: widen(lax.dynamic_slice(t, (layer, slot) + (0,) * (t.ndim - 2), (1, 1, *t.shape[2:]))[0, 0])


def is_table_values(v) -> bool:
    """Slot-table values: floats, or uint16 bfloat16 bits (`bf16_bits`)."""
    return jnp.issubdtype(v.dtype, jnp.floating) or v.dtype == jnp.uint16


class LoraPairs(NamedTuple):
    """The (token block, slot, weight) pairs of one region of a step (decode or prefill)."""

    start: jax.Array  # i32[P] first token of the pair's block (a multiple of `block`)
    slot: jax.Array  # i32[P] slot-table row
    weight: jax.Array  # f32[P] mix weight
    count: jax.Array  # i32[] pairs in use (the first `count`)


def _check(x, a, b, pairs: LoraPairs, block: int):
    def bad(name, value, want):
        raise ValueError(f"lora_delta: {name}={value} {want}")

    if x.ndim != 2:
        bad("x.shape", x.shape, "must be [T, din]")
    if a.ndim != 3 or a.shape[1] != x.shape[1]:
        bad("a.shape", a.shape, f"must be [S, din={x.shape[1]}, R]")
    if b.ndim != 3 or b.shape[:2] != (a.shape[0], a.shape[2]):
        bad("b.shape", b.shape, f"must be [S={a.shape[0]}, R={a.shape[2]}, dout]")
    if not isinstance(block, int) or block < 1 or x.shape[0] % block:
        bad("block", block, f"must be a positive int dividing T={x.shape[0]}")
    p = pairs.start.shape
    if len(p) != 1 or pairs.slot.shape != p or pairs.weight.shape != p or pairs.count.shape != ():
        bad("pairs", tuple(v.shape for v in pairs), "must be three [P] arrays and a scalar count")
    for name, v in (("x", x), ("pairs.weight", pairs.weight)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            bad(f"{name}.dtype", v.dtype, "must be floating")
    for name, v in (("a", a), ("b", b)):
        if not is_table_values(v):
            bad(f"{name}.dtype", v.dtype, "must be floating, or uint16 bfloat16 bits")
    for name, v in (("pairs.start", pairs.start), ("pairs.slot", pairs.slot), ("pairs.count", pairs.count)):
        if v.dtype != jnp.int32:
            bad(f"{name}.dtype", v.dtype, "must be int32")


def ref_lora_delta(x, a, b, pairs: LoraPairs, *, block: int) -> jax.Array:
    """The XLA path: f32[T, dout] delta, one cached adapter slice per pair (`ref_lora_add` onto 0).

    Products run in f32 at full precision (no TF32/bf16 passes on GPU/TPU). A start past
    T - block is clamped by dynamic_slice; the runner never packs one.
    """
    return ref_lora_add(jnp.zeros((x.shape[0], b.shape[2]), jnp.float32), x, a, b, ((pairs, block, 0),))


def naive_lora_delta(x, a, b, pairs: LoraPairs, *, block: int) -> jax.Array:
    """Ground truth: gather every pair's adapter, scatter-add its weighted delta."""
    t = x.shape[0]
    valid = jnp.arange(pairs.start.shape[0]) < pairs.count
    idx = pairs.start[:, None] + jnp.arange(block)[None]  # [P, block]
    xs = x.astype(jnp.float32)[idx]  # [P, block, din]
    d = jnp.einsum("pqd,pdr,pro->pqo", xs, widen(a[pairs.slot]), widen(b[pairs.slot]),
                   precision=lax.Precision.HIGHEST)
    d = jnp.where(valid[:, None, None], d * pairs.weight[:, None, None], 0.0)  # padding may hold anything
    idx = jnp.where(valid[:, None], idx, t)  # and point anywhere: scatter it out of bounds
    return jnp.zeros((t, b.shape[2]), jnp.float32).at[idx.reshape(-1)].add(d.reshape(-1, b.shape[2]), mode="drop")


def ref_lora_add(y, x, a, b, regions, layer: int | None = None) -> jax.Array:
    """y f[T, dout] plus every region's pairs, accumulated in place (XLA path of `lora_apply`).

    regions: ((pairs, block, offset), ...) with starts relative to `offset` in the T tokens.
    One buffer carries through every loop, so a step adds no [T, dout] temporaries per module.
    With `layer`, a and b are whole tables [L, S, ...] and each pair slices [layer, slot] inside
    the loop: slicing the layer outside (`a[layer]`) made XLA copy every layer's [S, din, R]
    table before its loop, ~1.2 GB per step at 32 slots (measured: +350 ms per decode step).
    """
    a_at, b_at = table_reader(a, layer), table_reader(b, layer)
    acc = y.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    for pairs, block, offset in regions:
        if pairs.start.shape[0] == 0:
            continue

        def body(i, acc, pairs=pairs, block=block, offset=offset):
            start, slot = pairs.start[i] + offset, pairs.slot[i]
            xs = lax.dynamic_slice_in_dim(xf, start, block, 0)
            ai, bi = a_at(slot), b_at(slot)
            d = jnp.dot(jnp.dot(xs, ai, precision=hi) * pairs.weight[i], bi, precision=hi)
            return lax.dynamic_update_slice_in_dim(acc, lax.dynamic_slice_in_dim(acc, start, block, 0) + d, start, 0)

        acc = lax.fori_loop(0, jnp.minimum(pairs.count, pairs.start.shape[0]), body, acc)
    return acc.astype(y.dtype)


def lora_apply(y, x, a, b, dec: LoraPairs, pf: LoraPairs, *, layer: int, td: int, block_q: int,
               backend: str = "xla", interpret: bool = False) -> jax.Array:
    """y [T, dout] + the LoRA deltas of a paged step laid out [Td decode tokens | prefill blocks].

    a f[L, S, din, R], b f[L, S, R, dout]: the module's whole slot table; `layer` picks the
    layer. Decode pairs are single tokens with starts in [0, td); prefill pairs are `block_q`
    blocks with starts counted from td. The XLA path adds in place; the kernels compute each
    region's delta and add it.
    """
    t = x.shape[0]
    if backend == "xla":
        regions = []
        if td:
            regions.append((dec, 1, 0))
        if t > td:
            regions.append((pf, block_q, td))
        return ref_lora_add(y, x, a, b, tuple(regions), layer)
    a, b = a[layer], b[layer]
    parts = []
    if td:
        parts.append(lora_delta(x[:td], a, b, dec, block=1, backend=backend, interpret=interpret))
    if t > td:
        parts.append(lora_delta(x[td:], a, b, pf, block=block_q, backend=backend, interpret=interpret))
    delta = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y + delta.astype(y.dtype)


@functools.partial(jax.jit, static_argnames=("block", "backend", "interpret"))
def lora_delta(x, a, b, pairs: LoraPairs, *, block: int, backend: str = "xla",
               interpret: bool = False) -> jax.Array:
    """Sum of the weighted LoRA deltas of each token block: f32[T, dout] (see the module doc).

    backend "xla" runs `ref_lora_delta`; "pallas" the GPU or TPU kernel (interpret=True on CPU).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"lora_delta: backend={backend!r} must be one of {_BACKENDS}")
    _check(x, a, b, pairs, block)
    if backend == "xla":
        return ref_lora_delta(x, a, b, pairs, block=block)
    if a.dtype == jnp.uint16 or b.dtype == jnp.uint16:
        raise ValueError("lora_delta: uint16 (bfloat16 bits) tables are the XLA path's; the Pallas kernels take "
                         "bfloat16 tables")
    from .lora_pallas import pallas_lora_delta

    return pallas_lora_delta(x, a, b, pairs, block=block, interpret=interpret)
