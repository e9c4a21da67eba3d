"""Pallas kernels for the batched multi-LoRA delta of `lora.py` (GPU via Triton, and TPU).

Both compute, like `ref_lora_delta`, f32[T, dout] = sum over the first `count` pairs of
weight * (x[start:start+block] @ a[slot]) @ b[slot]; they differ in how they avoid two
programs adding into the same output rows at once.

GPU (Triton), two launches, deterministic, no atomics:
  * shrink, grid (pair,): h[p] = weight * x[block of p] @ a[slot] as f32[P, block, R], looping
    over din in chunks of <= 64; each pair owns its h row. Pairs arrive sorted by slot, so
    neighbouring programs read the same adapter rows out of L2. Padding pairs store zeros.
  * expand, grid (token block, dout tile): each program owns its output tile and adds
    h[p] @ b[slot][:, tile] for the pairs of its block. The per-block pair lists come from one
    stable argsort of the pair starts in jnp (padding pairs sort past the last block), so a
    program walks exactly its own pairs [lo, hi), not all P. A block without pairs stores 0.
  Splitting at rank R keeps x @ a from being recomputed once per dout tile (the single-kernel
  alternative reloads a[slot] dout/tile times) and needs no atomics, so results are bitwise
  reproducible. Triton's dot needs every dim >= 16: smaller products (decode blocks of one
  token, ranks < 16) use a broadcast multiply and sum in f32, which is what those GEMV-shaped
  products cost anyway. f32 dots ask for full precision (IEEE, not TF32); bf16 dots run on the
  tensor cores with f32 accumulation. Triton tiles are powers of two: `block` and R must be;
  din and dout are cut into power-of-two chunks that divide them.

TPU (Mosaic), one launch, grid (dout tile "parallel", pair "arbitrary"):
  starts, slots, weights and count are scalar-prefetched into SMEM, so the BlockSpec pipeline
  DMAs exactly a[slot[p]], b[slot[p]] and the x rows of pair p (consecutive pairs of one slot
  repeat the block index and issue no DMA). The output tile f32[T, tn] stays in VMEM across
  the pair axis (constant index map): zeroed at p == 0, each real pair adds into its own rows,
  and steps p >= count are skipped by `pl.when` (their index maps park on the last real pair,
  so they issue no DMA either). Tiling: TPU blocks need whole sublane tiles (16 rows for
  bf16), so the x window and the output update are tm = max(block, 16) rows aligned to tm, and
  T is padded to a multiple of tm. When block < tm (decode) a row mask selects the pair's rows
  of the window: a select, so other rows never leak in even if they hold NaN, and the MXU pads
  to 8+ rows anyway, so the extra rows cost no time. dout is split only when the resident
  output would pass ~2 MiB per buffer (long prefills), at one more read of a[slot] per extra
  tile. a[slot]'s [din, R] block pads R to 128 lanes in VMEM (R = 16, din = 14336 in bf16 is
  ~3.5 MiB per buffer): fine under the default scoped VMEM limit, and why tn stays small.
  The Mosaic lowering is tested on CPU; the Mosaic compile itself (layouts) needs a TPU.

`pallas_lora_delta` picks TPU when `jax.default_backend() == "tpu"`, else the GPU kernel
(which is what `interpret=True` runs on CPU); tests call `_pallas_gpu` / `_pallas_tpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .lora import LoraPairs, _check

_SQ = pl.squeezed  # block dim of size 1, dropped from the kernel's ref
_HIGHEST = lax.Precision.HIGHEST
_TPU_OUT_BYTES = 2 << 20  # resident output tile budget per buffer (double-buffered)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    return min(n & -n, 1 << (cap.bit_length() - 1))


def _mm(u, v):
    """f32 [m, k] @ [k, n]: Triton's dot when every dim is >= 16, else multiply-and-sum."""
    (m, k), n = u.shape, v.shape[1]
    if min(m, k, n) >= 16:
        return lax.dot_general(u, v, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)
    return jnp.sum(u.astype(jnp.float32)[:, :, None] * v.astype(jnp.float32)[None], axis=1)


def _shrink_kernel(start_ref, slot_ref, w_ref, count_ref, x_ref, a_ref, h_ref, *, block, bk,
                   dtype):
    """Pair p: h[p] = w * x[start:start+block] @ a[slot], din walked in chunks of bk."""
    p = pl.program_id(0)
    valid = p < count_ref[0]
    rank = h_ref.shape[-1]

    @pl.when(valid)
    def _pair():
        start, slot = start_ref[0], slot_ref[0]
        if block > 1:
            start = pl.multiple_of(start, block)

        def body(k, acc):
            cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
            xs = x_ref[pl.ds(start, block), cols].astype(dtype)
            return acc + _mm(xs, a_ref[slot, cols, :].astype(dtype))

        acc = lax.fori_loop(0, x_ref.shape[1] // bk, body,
                            jnp.zeros((block, rank), jnp.float32))
        h_ref[...] = acc * w_ref[0]

    @pl.when(jnp.logical_not(valid))
    def _padding():
        h_ref[...] = jnp.zeros(h_ref.shape, jnp.float32)


def _expand_kernel(lo_ref, hi_ref, order_ref, slots_ref, h_ref, b_ref, o_ref):
    """Token block i, dout tile j: sum of h[p] @ b[slot][:, tile] over the block's pairs."""
    def body(i, acc):
        return acc + _mm(h_ref[order_ref[i]], b_ref[slots_ref[i]].astype(jnp.float32))

    o_ref[...] = lax.fori_loop(lo_ref[0], hi_ref[0], body,
                               jnp.zeros(o_ref.shape, jnp.float32))


def _pallas_gpu(x, a, b, pairs: LoraPairs, *, block: int, interpret: bool) -> jax.Array:
    """Shrink (grid over pairs) then expand (grid over token block x dout tile); see module doc."""
    t, din = x.shape
    s, _, rank = a.shape
    dout, np_ = b.shape[2], pairs.start.shape[0]
    for name, value in (("block", block), ("rank R", rank)):
        if value & (value - 1):
            raise NotImplementedError(f"lora_delta backend='pallas' (GPU): {name}={value} must "
                                      "be a power of two (Triton tiles)")
    if np_ == 0:
        return jnp.zeros((t, dout), jnp.float32)
    # Without a dot (block or R < 16) a product is a [block, chunk, n] f32 temporary held in
    # registers: keep it near 8K elements (64 per thread at 4 warps).
    cap = 1 << 30 if min(block, rank) >= 16 else max(1, 8192 // (block * rank))
    nb, bk, tn = t // block, _pow2_divisor(din, min(64, cap)), _pow2_divisor(dout, min(128, cap))
    count = jnp.clip(pairs.count, 0, np_).astype(jnp.int32)
    dtype = jnp.promote_types(x.dtype, a.dtype)
    params = None if interpret else _triton_params()

    one = pl.BlockSpec((1,), lambda p: (p,))
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, block=block, bk=bk, dtype=dtype),
        grid=(np_,),
        in_specs=[one, one, one, pl.BlockSpec((1,), lambda p: (0,)),
                  pl.BlockSpec((t, din), lambda p: (0, 0)),
                  pl.BlockSpec((s, din, rank), lambda p: (0, 0, 0))],
        out_specs=pl.BlockSpec((_SQ, block, rank), lambda p: (p, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((np_, block, rank), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="lora_shrink",
    )(pairs.start, pairs.slot, pairs.weight.astype(jnp.float32), count.reshape(1), x, a)

    # Pair lists per token block: padding pairs get key t, past every block start.
    key = jnp.where(jnp.arange(np_) < count, pairs.start, t)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    key = key[order]
    starts = jnp.arange(nb, dtype=key.dtype) * block
    lo = jnp.searchsorted(key, starts, side="left").astype(jnp.int32)
    hi = jnp.searchsorted(key, starts, side="right").astype(jnp.int32)

    blk = pl.BlockSpec((1,), lambda i, j: (i,))
    return pl.pallas_call(
        _expand_kernel,
        grid=(nb, dout // tn),
        in_specs=[blk, blk, pl.BlockSpec((np_,), lambda i, j: (0,)),
                  pl.BlockSpec((np_,), lambda i, j: (0,)),
                  pl.BlockSpec((np_, block, rank), lambda i, j: (0, 0, 0)),
                  pl.BlockSpec((s, rank, tn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((block, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, dout), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="lora_expand",
    )(lo, hi, order, pairs.slot[order], h, b)


def _tpu_kernel(start_ref, slot_ref, w_ref, count_ref, x_ref, a_ref, b_ref, o_ref, *, block,
                dtype):
    """Grid step (dout tile, pair p): add pair p's delta into its rows of the resident output."""
    p = pl.program_id(1)
    tm = x_ref.shape[0]

    @pl.when(p == 0)
    def _zero():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    @pl.when(p < count_ref[0])
    def _pair():
        start = start_ref[p]
        row0 = _tile_of(start, tm, o_ref.shape[0] // tm) * tm
        h = jnp.dot(x_ref[...].astype(dtype), a_ref[...].astype(dtype), precision=_HIGHEST,
                    preferred_element_type=jnp.float32)  # [tm, R]
        h = h * w_ref[p]
        if block < tm:  # keep the pair's rows of the window; a select, so other rows may be NaN
            off = start - row0
            rows = lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            h = jnp.where((rows >= off) & (rows < off + block), h, 0.0)
        d = jnp.dot(h, b_ref[...].astype(jnp.float32), precision=_HIGHEST,
                    preferred_element_type=jnp.float32)  # [tm, tn]
        rows = pl.ds(pl.multiple_of(row0, tm), tm)
        o_ref[rows, :] = o_ref[rows, :] + d


def _tile_of(start, tm, tiles):
    """The tm-row tile holding token `start`, clamped so no DMA or store leaves the array."""
    return jnp.clip(lax.div(start, tm), 0, tiles - 1)


def _pallas_tpu(x, a, b, pairs: LoraPairs, *, block: int, interpret: bool) -> jax.Array:
    """Grid (dout tile, pair) with pair tables in SMEM; see the module doc for the tiling."""
    from jax.experimental.pallas import tpu as pltpu

    t, din = x.shape
    s, _, rank = a.shape
    dout, np_ = b.shape[2], pairs.start.shape[0]
    if block % 16 and 16 % block:
        raise NotImplementedError(f"lora_delta backend='pallas' (TPU): block={block} must "
                                  "divide 16 or be a multiple of 16 (sublane tiles)")
    if np_ == 0:
        return jnp.zeros((t, dout), jnp.float32)
    tm = max(block, 16)
    tp = -(-t // tm) * tm
    tiles = tp // tm
    tn = dout
    if tp * dout * 4 > _TPU_OUT_BYTES and dout % 128 == 0:  # split lanes only in 128s
        fit = [c for c in range(128, dout, 128) if dout % c == 0 and tp * c * 4 <= _TPU_OUT_BYTES]
        tn = max(fit, default=128)
    xp = jnp.pad(x, ((0, tp - t), (0, 0))) if tp != t else x

    def pair(p, count):  # steps past count park on the last real pair: same blocks, no DMA
        return jnp.clip(jnp.minimum(p, count[0] - 1), 0, np_ - 1)

    def x_map(j, p, start, slot, w, count):
        return _tile_of(start[pair(p, count)], tm, tiles), 0

    def slot_of(p, slot, count):
        return jnp.clip(slot[pair(p, count)], 0, s - 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(dout // tn, np_),
        in_specs=[pl.BlockSpec((tm, din), x_map),
                  pl.BlockSpec((_SQ, din, rank),
                               lambda j, p, st, sl, w, c: (slot_of(p, sl, c), 0, 0)),
                  pl.BlockSpec((_SQ, rank, tn),
                               lambda j, p, st, sl, w, c: (slot_of(p, sl, c), 0, j))],
        out_specs=pl.BlockSpec((tp, tn), lambda j, p, *_: (0, j)))
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, block=block, dtype=jnp.promote_types(x.dtype, a.dtype)),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((tp, dout), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="lora_delta_tpu",
    )(pairs.start, pairs.slot, pairs.weight.astype(jnp.float32),
      pairs.count.astype(jnp.int32).reshape(1), xp, a, b)
    return out[:t]


def _triton_params():
    """Pin the Triton lowering (JAX 0.10's GPU default; deprecated, still present, in 0.11)."""
    from jax.experimental.pallas import triton as pltriton  # lazy: warns on JAX >= 0.11

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def pallas_lora_delta(x, a, b, pairs: LoraPairs, *, block: int,
                      interpret: bool = False) -> jax.Array:
    """f32[T, dout] LoRA delta by the TPU kernel on TPU, else the GPU (Triton) kernel.

    x f[T, din]; a f[S, din, R]; b f[S, R, dout]; pairs as in `lora.LoraPairs`. On CPU only
    `interpret=True` runs (the GPU kernel, interpreted).
    """
    _check(x, a, b, pairs, block)
    impl = _pallas_tpu if jax.default_backend() == "tpu" else _pallas_gpu
    return impl(x, a, b, pairs, block=block, interpret=interpret)
