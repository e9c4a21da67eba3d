"""Batched sparse adapter deltas: element-sparse (SHiRA) and block-sparse, per token block.

Same pairs as the LoRA kernels (`lora.py`, `LoraPairs`): each pair ties `block` consecutive
tokens to a slot and a weight. Per module the slot tables hold

  * element-sparse: idx i32[L, S, N], val f[L, S, N]. idx is the flat position
    `in * dout + out` of an entry of the [din, dout] delta (the model's layout), sorted
    ascending, so a pair's gather of x reads its rows in order. Slots with fewer than N entries
    pad with the last real idx and value 0 (the array stays sorted; a padded entry adds 0).
        y[t, out] += w * sum_i x[t, in_i] * val_i
  * block-sparse: idx i32[L, S, NB], val f[L, S, NB, b, b]. idx is the flat block position
    `out_blk * (din // b) + in_blk`, sorted ascending (by output block row, then input block),
    padded the same way; val[j] is the [b_in, b_out] block of the delta.
        y[t, out_blk(j)] += w * x[t, in_blk(j)] @ val[j]

Why two kinds: an unstructured mask at 1-2% density leaves almost no 16 x 16 block empty
(P(empty) = 0.98^256 = 0.6%), so a block kernel would read ~100x the values it needs, while
element gathers and scatter-adds cannot use the matrix units. Measured on XLA:CPU (2 cores,
[1024 x 3072] module, 32 decode pairs at the parameter count of rank-16 LoRA): element-sparse
5.4 ms, block-sparse 16 x 16 1.1 ms, LoRA 0.8 ms, the dense base matmul 1.9 ms (block-sparse on
a quiet machine since the chunks of `_decode_chunks`: 0.41-0.59 ms, 0.21 ms from bfloat16
tables, against 0.45-0.81 and 0.76 ms as a loop over pairs). Element
gathers and scatters cost ~3.4 ns per entry there whatever the index order (sorted-by-output
segment sums were slower), so element-sparse serving is the expensive kind on CPU; block-sparse
is the one to serve many adapters with, and a single hot element-sparse adapter can be merged
into the base weights instead (`hyprjax/adapters/registry.py`).

Implementations:
  * `ref_sparse_add` / `ref_block_add`: `fori_loop`s over the real pairs, slicing one slot's
    table [layer, slot] inside the loop (`lora.table_reader`, as `lora.ref_lora_add` does, for
    the same reason; bfloat16 values travel as uint16 bits, kernels/lora.py says why), except
    block-sparse decode pairs, which go a chunk of pairs per iteration (`_decode_chunks`);
    the XLA path, used on CPU and for element-sparse everywhere.
  * `naive_sparse_delta` / `naive_block_delta`: dense deltas per pair; ground truth for tests.
  * `block_delta(..., backend="pallas")`: the Pallas block-sparse kernels (`sparse_pallas.py`):
    on TPU with the block indices scalar-prefetched into SMEM, so the pipeline DMAs exactly the
    blocks a slot holds; on GPU (Triton) reading them from global memory.

The engine's block tables use b = 16 or 32 (`EngineConfig.sparse_block`); adapters with larger
blocks (multiples of it) are split when their slot is written, so the kernels only meet powers
of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .lora import LoraPairs, is_table_values, table_reader, widen

_HI = lax.Precision.HIGHEST


def _pair_loop(acc, regions, delta):
    """acc f32[T, dout] plus `delta(xs, slot) * weight` at each real pair's rows."""
    for pairs, block, offset, xf in regions:
        if pairs.start.shape[0] == 0:
            continue

        def body(i, acc, pairs=pairs, block=block, offset=offset, xf=xf):
            start = pairs.start[i] + offset
            xs = lax.dynamic_slice_in_dim(xf, start, block, 0)
            d = delta(xs, pairs.slot[i]) * pairs.weight[i]
            return lax.dynamic_update_slice_in_dim(acc, lax.dynamic_slice_in_dim(acc, start, block, 0) + d, start, 0)

        acc = lax.fori_loop(0, jnp.minimum(pairs.count, pairs.start.shape[0]), body, acc)
    return acc


def _regions(x, regions):
    xf = x.astype(jnp.float32)
    return [(pairs, block, offset, xf) for pairs, block, offset in regions]


def ref_sparse_add(y, x, idx, val, regions, layer: int | None = None) -> jax.Array:
    """y f[T, dout] plus every region's element-sparse deltas (regions as in `lora.ref_lora_add`).

    Decode pairs (one token) gather x at the entries and scatter-add into the output: ~2N
    element operations per pair. Prefill pairs (blocks of `block_q` tokens) would pay that per
    token, 2N * block_q (measured: a 1-adapter prefill step of Qwen3-0.6B took ~9 s), so they
    scatter the slot's entries into a dense [din, dout] delta instead and multiply the block by
    it; the dense delta is carried through the loop and rebuilt only when the slot changes
    (pairs are sorted by slot, so a prompt's blocks share one build).
    """
    dout, din = y.shape[1], x.shape[1]
    idx_at, val_at = table_reader(idx, layer), table_reader(val, layer)

    def delta(xs, slot):
        ii, v = idx_at(slot), val_at(slot)
        g = jnp.take(xs, ii // dout, axis=1) * v  # [block, N]
        return jnp.zeros((xs.shape[0], dout), jnp.float32).at[:, ii % dout].add(g)

    def densify(slot):
        return jnp.zeros((din * dout,), jnp.float32).at[idx_at(slot)].add(val_at(slot)).reshape(
            din, dout)

    acc = y.astype(jnp.float32)
    for pairs, block, offset, xf in _regions(x, regions):
        if block == 1 or pairs.start.shape[0] == 0:
            acc = _pair_loop(acc, [(pairs, block, offset, xf)], delta)
            continue

        def body(i, carry, pairs=pairs, block=block, offset=offset, xf=xf):
            acc, last, dense = carry
            slot = pairs.slot[i]
            dense = lax.cond(slot == last, lambda: dense, lambda: densify(slot))
            start = pairs.start[i] + offset
            d = jnp.dot(lax.dynamic_slice_in_dim(xf, start, block, 0), dense, precision=_HI) * pairs.weight[i]
            acc = lax.dynamic_update_slice_in_dim(acc, lax.dynamic_slice_in_dim(acc, start, block, 0) + d, start, 0)
            return acc, slot, dense

        acc = lax.fori_loop(0, jnp.minimum(pairs.count, pairs.start.shape[0]), body,
                            (acc, jnp.int32(-1), jnp.zeros((din, dout), jnp.float32)))[0]
    return acc.astype(y.dtype)


DECODE_CHUNK = 16  # decode pairs per iteration of `ref_block_add`'s chunked loop (float32 tables)
DECODE_CHUNK_BF16 = 32  # ... with bfloat16 tables (`_decode_chunks`)


def ref_block_add(y, x, idx, val, regions, layer: int | None = None) -> jax.Array:
    """y f[T, dout] plus every region's block-sparse deltas.

    Decode pairs (one token each) run a chunk at a time (`_decode_chunks`); prefill
    pairs one at a time, each a [block_q, NB, b] x [NB, b, b] product that is work enough.
    """
    dout, din, b = y.shape[1], x.shape[1], val.shape[-1]
    nbi, nbo = din // b, dout // b
    idx_at, val_at = table_reader(idx, layer), table_reader(val, layer)

    def delta(xs, slot):
        ii, v = idx_at(slot), val_at(slot)
        xb = jnp.take(xs.reshape(xs.shape[0], nbi, b), ii % nbi, axis=1)  # [block, NB, b_in]
        d = jnp.einsum("qni,nio->qno", xb, v, precision=_HI)
        out = jnp.zeros((xs.shape[0], nbo, b), jnp.float32).at[:, ii // nbi].add(d)
        return out.reshape(xs.shape[0], dout)

    acc = y.astype(jnp.float32)
    for region in _regions(x, regions):
        if region[1] == 1:
            acc = _decode_chunks(acc, region, idx, val, layer)
        else:
            acc = _pair_loop(acc, [region], delta)
    return acc.astype(y.dtype)


def _decode_chunks(acc, region, idx, val, layer):
    """acc f32[T, dout] plus the block deltas of one-token pairs, `DECODE_CHUNK` pairs per
    iteration: their slots' tables gathered into [C, NB, b, b], one batched product, one
    scatter-add of the C rows (on CPU a token with several adapters gets them in pair order; a
    GPU's scatter-add of duplicate rows is atomic, so there their order, and the last bit, is not
    fixed).
    bfloat16 tables (uint16 bits) skip the gathered copy: the product is written as b
    multiply-adds over the block's input rows, so XLA fuses the gather and the widening of
    each value into it and reads every value once, at 2 bytes, `DECODE_CHUNK_BF16` pairs an
    iteration (float32 values did not fuse that way: no better than the einsum).

    Why chunks: a loop iteration per pair cost ~10 us of fixed work per pair and module on
    XLA:CPU (slices, a [1, NB, b] x [NB, b, b] product, a scatter into a fresh [nbo, b]); a whole
    bucket at once would gather every padding pair's table too (the decode capacity is
    tokens x max_loras pairs). Measured on 2 quiet cores, a [1024 x 3072] module, 32 decode pairs
    of 32 distinct rank-16-sized adapters (NB = 256), 28 layers' tables each read once per call
    (layer static or traced): float32 tables, per-pair loop 0.45-0.81 ms, chunks of 16 0.41-0.59;
    bfloat16 tables, loop 0.76-0.77 ms, chunks of 32 fused 0.21 ms (the einsum on chunks of 16
    of them: 0.40-0.59 ms).
    """
    pairs, _, offset, xf = region
    n = pairs.start.shape[0]
    if n == 0:
        return acc
    t, dout = acc.shape
    din, b = xf.shape[1], val.shape[-1]
    nbi, nbo = din // b, dout // b
    bits = val.dtype == jnp.uint16
    # at least 2 lanes: XLA:CPU rounds a 1-lane chunk's product differently in the last bit, so a
    # lone request (a 1-pair bucket) would not equal itself batched
    c = max(2, min(DECODE_CHUNK_BF16 if bits else DECODE_CHUNK, n))
    pad = (-n) % c
    start, slot, weight = (jnp.pad(a, (0, pad)) for a in (pairs.start, pairs.slot, pairs.weight))
    count = jnp.minimum(pairs.count, n)
    lanes = jnp.arange(c)

    def body(i, acc):
        first = i * c
        st, sl, w = (lax.dynamic_slice_in_dim(a, first, c) for a in (start, slot, weight))
        valid = first + lanes < count
        rows = jnp.where(valid, st + offset, t)  # padding lanes scatter out of bounds: dropped
        sl = jnp.where(valid, sl, 0)
        ii = idx[sl] if layer is None else idx[layer, sl]
        xb = jnp.take_along_axis(xf[jnp.minimum(rows, t - 1)].reshape(c, nbi, b), (ii % nbi)[:, :, None], axis=1)
        if bits:  # [C, NB, b_out] as b fused multiply-adds, each gathering its row of every block
            table = (lambda j: val[sl, :, j, :]) if layer is None else (lambda j: val[layer, sl, :, j, :])
            d = sum(xb[:, :, j, None] * widen(table(j)) for j in range(b))
        else:
            v = widen(val[sl] if layer is None else val[layer, sl])
            d = jnp.einsum("pni,pnio->pno", xb, v, precision=_HI)
        out = jnp.zeros((c, nbo, b), jnp.float32).at[lanes[:, None], ii // nbi].add(d).reshape(c, dout)
        return acc.at[rows].add(out * jnp.where(valid, w, 0.0)[:, None], mode="drop")

    return lax.fori_loop(0, (count + c - 1) // c, body, acc)


def dense_from_sparse(idx, val, din: int, dout: int) -> jax.Array:
    """One slot's element-sparse table as its dense f32[din, dout] delta."""
    return jnp.zeros((din * dout,), jnp.float32).at[idx].add(widen(val)).reshape(din, dout)


def dense_from_blocks(idx, val, din: int, dout: int) -> jax.Array:
    """One slot's block table as its dense f32[din, dout] delta."""
    b = val.shape[-1]
    nbi = din // b
    d = jnp.zeros((dout // b, nbi, b, b), jnp.float32).at[idx // nbi, idx % nbi].add(widen(val))
    return d.transpose(1, 2, 0, 3).reshape(din, dout)


def _naive(x, dense, pairs: LoraPairs, block: int, dout: int):
    t = x.shape[0]
    valid = jnp.arange(pairs.start.shape[0]) < pairs.count
    rows = pairs.start[:, None] + jnp.arange(block)[None]  # [P, block]
    d = jnp.einsum("pqd,pdo->pqo", x.astype(jnp.float32)[rows], dense[pairs.slot], precision=_HI)
    d = jnp.where(valid[:, None, None], d * pairs.weight[:, None, None], 0.0)
    rows = jnp.where(valid[:, None], rows, t)
    return jnp.zeros((t, dout), jnp.float32).at[rows.reshape(-1)].add(d.reshape(-1, dout), mode="drop")


def naive_sparse_delta(x, idx, val, pairs: LoraPairs, *, block: int, dout: int) -> jax.Array:
    """Ground truth for element-sparse tables idx/val [S, N]: densify every slot, then matmul."""
    dense = jax.vmap(lambda i, v: dense_from_sparse(i, v, x.shape[1], dout))(idx, val)
    return _naive(x, dense, pairs, block, dout)


def naive_block_delta(x, idx, val, pairs: LoraPairs, *, block: int, dout: int) -> jax.Array:
    """Ground truth for block tables idx [S, NB], val [S, NB, b, b]."""
    dense = jax.vmap(lambda i, v: dense_from_blocks(i, v, x.shape[1], dout))(idx, val)
    return _naive(x, dense, pairs, block, dout)


def check_block_table(x, idx, val, pairs: LoraPairs, block: int, dout: int) -> None:
    """ValueError naming the first argument of `block_delta` that does not fit."""
    def bad(name, value, want):
        raise ValueError(f"block_delta: {name}={value} {want}")

    if x.ndim != 2:
        bad("x.shape", x.shape, "must be [T, din]")
    if val.ndim != 4 or val.shape[2] != val.shape[3] or val.shape[:2] != idx.shape or idx.ndim != 2:
        bad("val.shape", val.shape, f"must be [S, NB, b, b] with idx [S, NB] (idx is {idx.shape})")
    b = val.shape[-1]
    if b < 16 or b & (b - 1) or x.shape[1] % b or dout % b:
        bad("block size", b, f"must be a power of two >= 16 dividing din={x.shape[1]} and dout={dout}")
    p = pairs.start.shape
    if len(p) != 1 or pairs.slot.shape != p or pairs.weight.shape != p or pairs.count.shape != ():
        bad("pairs", tuple(v.shape for v in pairs), "must be three [P] arrays and a scalar count")
    for name, v in (("x", x), ("pairs.weight", pairs.weight)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            bad(f"{name}.dtype", v.dtype, "must be floating")
    if not is_table_values(val):
        bad("val.dtype", val.dtype, "must be floating, or uint16 bfloat16 bits")
    if not isinstance(block, int) or block < 1 or x.shape[0] % block:
        bad("block", block, f"must be a positive int dividing T={x.shape[0]}")
    if idx.dtype != jnp.int32:
        bad("idx.dtype", idx.dtype, "must be int32")
    for name, v in (("pairs.start", pairs.start), ("pairs.slot", pairs.slot), ("pairs.count", pairs.count)):
        if v.dtype != jnp.int32:
            bad(f"{name}.dtype", v.dtype, "must be int32")


@functools.partial(jax.jit, static_argnames=("block", "dout", "backend", "interpret"))
def block_delta(x, idx, val, pairs: LoraPairs, *, block: int, dout: int, backend: str = "xla",
                interpret: bool = False) -> jax.Array:
    """f32[T, dout]: each pair's weighted block-sparse delta on its token block (module doc).

    idx i32[S, NB], val f[S, NB, b, b] are one layer's tables. backend "xla" runs
    `ref_block_add` onto zeros; "pallas" the GPU/TPU kernel (interpret=True on CPU).
    """
    check_block_table(x, idx, val, pairs, block, dout)
    if backend == "xla":
        return ref_block_add(jnp.zeros((x.shape[0], dout), jnp.float32), x, idx, val, ((pairs, block, 0),))
    if backend != "pallas":
        raise ValueError(f"block_delta: backend={backend!r} must be 'xla' or 'pallas'")
    if val.dtype == jnp.uint16:
        raise ValueError("block_delta: uint16 (bfloat16 bits) tables are the XLA path's; the Pallas kernel takes "
                         "bfloat16 tables")
    from .sparse_pallas import pallas_block_delta

    return pallas_block_delta(x, idx, val, pairs, block=block, dout=dout, interpret=interpret)


def sparse_apply(y, x, part: str, idx, val, dec: LoraPairs, pf: LoraPairs, *, layer: int, td: int, block_q: int,
                 backend: str = "xla", interpret: bool = False) -> jax.Array:
    """y [T, dout] + one sparse part's deltas over a paged step [Td decode | prefill blocks].

    part "sparse" (element) always runs the XLA path; part "block" runs the Pallas kernel when
    backend is "pallas". Tables are whole [L, S, ...]; `layer` picks the layer.
    """
    if part not in ("sparse", "block"):
        raise ValueError(f"sparse_apply: part={part!r} must be 'sparse' or 'block'")
    t = x.shape[0]
    regions = []
    if td:
        regions.append((dec, 1, 0))
    if t > td:
        regions.append((pf, block_q, td))
    if part == "sparse":
        return ref_sparse_add(y, x, idx, val, tuple(regions), layer)
    if backend == "xla":
        return ref_block_add(y, x, idx, val, tuple(regions), layer)
    idx, val = idx[layer], val[layer]
    parts = []
    if td:
        parts.append(block_delta(x[:td], idx, val, dec, block=1, dout=y.shape[1], backend=backend,
                                 interpret=interpret))
    if t > td:
        parts.append(block_delta(x[td:], idx, val, pf, block=block_q, dout=y.shape[1], backend=backend,
                                 interpret=interpret))
    delta = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y + delta.astype(y.dtype)
