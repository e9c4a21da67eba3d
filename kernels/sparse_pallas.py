"""Pallas kernels for the batched block-sparse adapter delta of `sparse.py` (GPU via Triton, TPU).

Both compute, like `naive_block_delta`, f32[T, dout] = sum over the first `count` pairs and over
the entries j of the pair's slot of weight * x[rows, in_blk(j)] @ val[slot, j] placed at
out_blk(j). Both walk a slot's entries of one output block range as a contiguous run of its
table: idx is sorted by output block row, so a CSR row pointer per (slot, output tile), one
vmapped searchsorted in jnp, gives the range. The same row pointer drops the trailing padding
(the table pads by repeating its last idx with zero values, and blocks are unique, so only the
first entry of the final run is real): without that, a slot at half the capacity NB would make
its last output row walk NB / 2 zero blocks, ~100x the work of the other rows at serving
sizes (NB = 256 over 192 output rows).

GPU (Triton), one launch, grid (token block, output block of b columns), no atomics
(deterministic):
  each program owns its [block, b] output tile and sums, over the pairs of its token block, the
  entries of the pair's slot whose out_blk is the tile (range [rp[slot, j], rp[slot, j + 1])).
  The per-block pair lists come from one stable argsort of the pair starts, as in lora_pallas's
  expand (padding pairs sort past the last block), so a program walks exactly its own pairs.
  Work is exactly the real (pair, entry) products; each reads one [block, b] slice of x and
  one [b, b] block of val, so the kernel is bound by reading val once per pair that uses it
  (blocks of one slot are contiguous in memory). No split of the reduction across programs is
  needed because an output row of a slot holds ~NB / (dout / b) entries (1-2 at serving
  sparsity). Token blocks under 16 (decode) have no Triton dot (every dim must be >= 16): the
  product is a broadcast multiply and sum in f32, a GEMV either way. f32 dots ask for full
  precision (IEEE, not TF32); bf16 dots use the tensor cores with f32 accumulation. Triton tiles
  are powers of two: `block` and b must be.

TPU (Mosaic), one launch, grid (token tile "parallel", dout tile "parallel", pair of the tile
"arbitrary", chunk of entries "arbitrary"), everything computed transposed, out^T = val^T @ x^T:
  b = 16 or 32 is far below the 128-lane width, so a [tm, b] slice of x or of the output would
  need a dynamic lane offset that is not a multiple of 128; transposed, the b-wide slices are
  sublane rows (x^T[ib*b : ib*b+b, :], out^T[ob*b : ob*b+b, :], offsets multiples of 16) and
  tokens run along lanes. Pair tables, the row pointer and the flat idx table are
  scalar-prefetched into SMEM (as in JAX's block-sparse guide), so the index maps DMA exactly
  the [kc, b, b] chunks of val[slot] that hold the pair's entries of this dout tile; steps past
  the tile's pairs or the slot's entries park on the last real chunk (same block index: no DMA)
  and are skipped by `pl.when`. One grid step per chunk of kc entries (the largest divisor of
  NB up to 16) rather than per block: a step costs ~0.35 us of pipeline overhead, far more than
  one b x b product. x^T's [din, tl] window stays resident across a tile's pairs (one DMA per
  token tile), so the entries' x slices are dynamic sublane reads, and the output tile
  f32[tn, tl] stays resident across the pair and chunk axes (zeroed at the first step, written
  back once). Token tiles are tl = T lanes when T <= max(128, block) (decode, short prefill),
  else 128 (or `block`) lanes with T padded; a pair whose block is narrower than the tile
  selects its own lanes (a select: other lanes never leak in, even as NaN). Costs: the MXU runs
  [b, b] @ [b, tl] products at a small fraction of its width (block sparsity on TPU buys skipped
  DMA, not MXU efficiency); val's [b, b] blocks pad b lanes to 128 in VMEM; x and the output
  make one transpose each in HBM; SMEM (1 MiB through v6e) holds the S * NB ints of idx
  (256 KiB at 32 slots of NB = 2048; larger tables would need a slot's idx row DMA'd per pair).
  dout is split only when the resident output would pass ~2 MiB per buffer, and the VMEM limit
  is raised only when x^T's window needs it (din 14336 in f32 at 128 lanes: 7 MiB per buffer).
  The Mosaic lowering is tested on CPU; the Mosaic compile itself (layouts) needs a TPU.

`pallas_block_delta` picks TPU when `jax.default_backend() == "tpu"`, else the GPU kernel (which
is what `interpret=True` runs on CPU); tests call `_pallas_gpu` / `_pallas_tpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .lora import LoraPairs
from .lora_pallas import _SQ, _mm, _triton_params
from .sparse import check_block_table

_HIGHEST = lax.Precision.HIGHEST
_TPU_OUT_BYTES = 2 << 20  # resident output tile budget per buffer (double-buffered)
_TPU_VMEM_DEFAULT = 16 << 20  # the smallest default scoped VMEM limit (v5e)
_TPU_CHUNK = 16  # most val blocks per TPU grid step


def _row_ptr(idx, nbi: int, per: int, tiles: int) -> jax.Array:
    """i32[S, tiles + 1]: slot s's entries with out_blk in tile j are [rp[s, j], rp[s, j + 1]).

    Tiles are `per` output blocks wide; every bound is clipped to one past the first entry of
    the slot's final run of equal idx, which drops the padding (module doc).
    """
    end = jax.vmap(lambda r: jnp.searchsorted(r, r[-1], side="left"))(idx) + 1
    bounds = jnp.arange(tiles + 1, dtype=jnp.int32) * (nbi * per)
    rp = jax.vmap(lambda r: jnp.searchsorted(r, bounds, side="left"))(idx)
    return jnp.minimum(rp, end[:, None]).astype(jnp.int32)


def _pair_lists(pairs: LoraPairs, tile: int, tiles: int, slots: int):
    """Real pairs grouped by the `tile`-token tile holding their start (stable, so each tile's
    pairs keep their slot order): (lo, hi) i32[tiles] ranges into the returned start, slot,
    weight arrays, reordered to match. Padding pairs sort past the last tile."""
    np_ = pairs.start.shape[0]
    count = jnp.clip(pairs.count, 0, np_)
    key = jnp.where(jnp.arange(np_) < count, lax.div(pairs.start, tile), tiles)
    order = jnp.argsort(key, stable=True)
    key = key[order]
    first = jnp.arange(tiles, dtype=key.dtype)
    lo = jnp.searchsorted(key, first, side="left").astype(jnp.int32)
    hi = jnp.searchsorted(key, first, side="right").astype(jnp.int32)
    slot = jnp.clip(pairs.slot[order], 0, slots - 1).astype(jnp.int32)
    return lo, hi, pairs.start[order].astype(jnp.int32), slot, pairs.weight[order].astype(jnp.float32)


def _gpu_kernel(lo_ref, hi_ref, slot_ref, w_ref, rp_ref, idx_ref, x_ref, v_ref, o_ref, *, block,
                nbi, nb, dtype):
    """Token block i, output block j: the block's pairs' entries whose out_blk is j."""
    i, j = pl.program_id(0), pl.program_id(1)
    b = o_ref.shape[1]
    ptrs = rp_ref.shape[0] // v_ref.shape[0]  # dout // b + 1 per slot
    row0 = i * block
    rows = pl.ds(pl.multiple_of(row0, block) if block > 1 else row0, block)

    def pair(q, acc):
        s = slot_ref[q]

        def entry(e, acc):
            col = pl.multiple_of(lax.rem(idx_ref[s * nb + e], nbi) * b, b)
            xs = x_ref[rows, pl.ds(col, b)].astype(dtype)
            return acc + _mm(xs, v_ref[s, e].astype(dtype))

        d = lax.fori_loop(rp_ref[s * ptrs + j], rp_ref[s * ptrs + j + 1], entry,
                          jnp.zeros(o_ref.shape, jnp.float32))
        return acc + d * w_ref[q]

    o_ref[...] = lax.fori_loop(lo_ref[0], hi_ref[0], pair, jnp.zeros(o_ref.shape, jnp.float32))


def _pallas_gpu(x, idx, val, pairs: LoraPairs, *, block: int, dout: int, interpret: bool) -> jax.Array:
    """Grid (token block, output block); see the module doc."""
    t, din = x.shape
    s, nb, b, _ = val.shape
    np_ = pairs.start.shape[0]
    for name, value in (("block", block), ("block size b", b)):
        if value & (value - 1):
            raise NotImplementedError(f"block_delta backend='pallas' (GPU): {name}={value} must "
                                      "be a power of two (Triton tiles)")
    if np_ == 0 or nb == 0 or s == 0:
        return jnp.zeros((t, dout), jnp.float32)
    nbi, nbo = din // b, dout // b
    lo, hi, _, slot, weight = _pair_lists(pairs, block, t // block, s)
    rp = _row_ptr(idx, nbi, 1, nbo)

    one = pl.BlockSpec((1,), lambda i, j: (i,))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_gpu_kernel, block=block, nbi=nbi, nb=nb,
                          dtype=jnp.promote_types(x.dtype, val.dtype)),
        grid=(t // block, nbo),
        in_specs=[one, one, whole((np_,)), whole((np_,)), whole((s * (nbo + 1),)),
                  whole((s * nb,)), whole((t, din)), whole((s, nb, b, b))],
        out_specs=pl.BlockSpec((block, b), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, dout), jnp.float32),
        compiler_params=None if interpret else _triton_params(),
        interpret=interpret,
        name="block_delta_gpu",
    )(lo, hi, slot, weight, rp.reshape(-1), idx.reshape(-1), x, val)


def _tpu_kernel(lo_ref, hi_ref, st_ref, sl_ref, w_ref, rp_ref, ix_ref, x_ref, v_ref, o_ref, *,
                block, nbi, nb, kc, ptrs, dtype):
    """Grid step (token tile i, dout tile j, pair q of the tile, chunk c): add the chunk's
    entries of the pair's slot that fall in tile j into the resident out^T tile."""
    i, j, q, c = (pl.program_id(a) for a in range(4))
    b = v_ref.shape[-1]
    tn, tl = o_ref.shape

    @pl.when((q == 0) & (c == 0))
    def _zero():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    n = lo_ref[i] + q

    @pl.when(n < hi_ref[i])
    def _pair():
        s = sl_ref[n]
        e_lo, e_hi = rp_ref[s * ptrs + j], rp_ref[s * ptrs + j + 1]
        base = (lax.div(e_lo, kc) + c) * kc
        w = w_ref[n]
        if block < tl:  # the pair's own lanes of the tile
            off = st_ref[n] - i * tl
            lanes = lax.broadcasted_iota(jnp.int32, (1, tl), 1)
            keep = (lanes >= off) & (lanes < off + block)

        @pl.when(base < e_hi)
        def _chunk():
            def entry(u, carry):
                e = base + u

                @pl.when((e >= e_lo) & (e < e_hi))
                def _entry():
                    blk = ix_ref[s * nb + e]
                    ib, ob = lax.rem(blk, nbi), lax.div(blk, nbi) - j * (tn // b)
                    xs = x_ref[pl.ds(pl.multiple_of(ib * b, b), b), :].astype(dtype)  # [b_in, tl]
                    d = lax.dot_general(v_ref[u].astype(dtype), xs, (((0,), (0,)), ((), ())),
                                        precision=_HIGHEST,
                                        preferred_element_type=jnp.float32) * w  # [b_out, tl]
                    if block < tl:
                        d = jnp.where(keep, d, 0.0)
                    rows = pl.ds(pl.multiple_of(ob * b, b), b)
                    o_ref[rows, :] = o_ref[rows, :] + d

                return carry

            lax.fori_loop(0, kc, entry, 0)


def _tpu_tiles(t: int, block: int) -> int:
    """Token tile width in lanes (module doc)."""
    if t <= max(128, block):
        return t
    if 128 % block == 0:
        return 128
    if block % 128 == 0:
        return block
    raise NotImplementedError(f"block_delta backend='pallas' (TPU): block={block} must divide 128 "
                              f"or be a multiple of 128 when T={t} > 128 (lane tiles)")


def _pallas_tpu(x, idx, val, pairs: LoraPairs, *, block: int, dout: int, interpret: bool) -> jax.Array:
    """Grid (token tile, dout tile, pair, entry chunk) over x^T and out^T; see the module doc."""
    from jax.experimental.pallas import tpu as pltpu

    t, din = x.shape
    s, nb, b, _ = val.shape
    np_ = pairs.start.shape[0]
    if b % 16:
        raise NotImplementedError(f"block_delta backend='pallas' (TPU): block size b={b} must be a "
                                  "multiple of 16 (sublane tiles)")
    if np_ == 0 or nb == 0 or s == 0:
        return jnp.zeros((t, dout), jnp.float32)
    nbi = din // b
    tl = _tpu_tiles(t, block)
    tp = -(-t // tl) * tl
    tiles, lanes = tp // tl, max(tl, 128)  # VMEM pads lanes to 128
    tn = dout
    if dout * lanes * 4 > _TPU_OUT_BYTES:
        fit = [m for m in range(b, dout, b) if dout % m == 0 and m * lanes * 4 <= _TPU_OUT_BYTES]
        tn = max(fit, default=b)
    nj = dout // tn
    kc = max(d for d in range(1, min(nb, _TPU_CHUNK) + 1) if nb % d == 0)
    chunks = nb // kc + (nj > 1)  # a tile's run of entries may start mid-chunk
    lo, hi, start, slot, weight = _pair_lists(pairs, tl, tiles, s)
    rp = _row_ptr(idx, nbi, tn // b, nj)
    xt = x.T if tp == t else jnp.pad(x.T, ((0, 0), (0, tp - t)))

    def chunk_of(i, j, q, c, lo, hi, sl, rp):
        """The val chunk of step (i, j, q, c); steps past the real ones park on the last one."""
        n = lo[i] + q
        valid = n < hi[i]
        s_ = sl[jnp.clip(jnp.where(valid, n, hi[i] - 1), 0, np_ - 1)]
        e_lo, e_hi = rp[s_ * (nj + 1) + j], rp[s_ * (nj + 1) + j + 1]
        last = lax.div(jnp.maximum(e_hi - 1, e_lo), kc)
        k = jnp.where(valid, jnp.minimum(lax.div(e_lo, kc) + c, last), last)
        return s_, jnp.clip(k, 0, nb // kc - 1)

    def v_map(i, j, q, c, lo, hi, st, sl, w, rp, ix):
        s_, k = chunk_of(i, j, q, c, lo, hi, sl, rp)
        return s_, k, 0, 0

    itemsize = jnp.dtype(x.dtype).itemsize
    vmem = 2 * (din * lanes * itemsize + kc * b * 128 * jnp.dtype(val.dtype).itemsize + tn * lanes * 4)
    params = dict(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"))
    if vmem > _TPU_VMEM_DEFAULT * 3 // 4:
        params["vmem_limit_bytes"] = vmem + (8 << 20)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(tiles, nj, np_, chunks),
        in_specs=[pl.BlockSpec((din, tl), lambda i, j, q, c, *_: (0, i)),
                  pl.BlockSpec((_SQ, kc, b, b), v_map)],
        out_specs=pl.BlockSpec((tn, tl), lambda i, j, q, c, *_: (j, i)))
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, block=block, nbi=nbi, nb=nb, kc=kc, ptrs=nj + 1,
                          dtype=jnp.promote_types(x.dtype, val.dtype)),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((dout, tp), jnp.float32),
        compiler_params=pltpu.CompilerParams(**params),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="block_delta_tpu",
    )(lo, hi, start, slot, weight, rp.reshape(-1), idx.reshape(-1), xt, val)
    return out[:, :t].T


def pallas_block_delta(x, idx, val, pairs: LoraPairs, *, block: int, dout: int,
                       interpret: bool = False) -> jax.Array:
    """f32[T, dout] block-sparse delta by the TPU kernel on TPU, else the GPU (Triton) kernel.

    x f[T, din]; idx i32[S, NB] sorted flat block positions; val f[S, NB, b, b]; pairs as in
    `lora.LoraPairs`. On CPU only `interpret=True` runs (the GPU kernel, interpreted).
    """
    check_block_table(x, idx, val, pairs, block, dout)
    impl = _pallas_tpu if jax.default_backend() == "tpu" else _pallas_gpu
    return impl(x, idx, val, pairs, block=block, dout=dout, interpret=interpret)
