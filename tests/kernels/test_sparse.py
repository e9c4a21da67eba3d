"""Batched sparse adapters: the XLA paths and both block-sparse Pallas kernels (interpret mode)
vs the naive dense forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hyprjax.kernels import sparse
from hyprjax.kernels.lora import LoraPairs, bf16_bits
from hyprjax.kernels.sparse import block_delta, ref_block_add, ref_sparse_add, sparse_apply
from hyprjax.kernels.sparse_pallas import _pallas_gpu, _pallas_tpu, pallas_block_delta

# Jitted: one compile per shape (op-by-op, each case compiled dozens of small programs).
naive_block_delta = jax.jit(sparse.naive_block_delta, static_argnames=("block", "dout"))
naive_sparse_delta = jax.jit(sparse.naive_sparse_delta, static_argnames=("block", "dout"))

# bf16 inputs are exact in f32 and every implementation multiplies and accumulates in f32, so
# all differ from the naive form only by summation order.
TOL = dict(atol=3e-5, rtol=3e-5)


def make_pairs(rng, *, tokens, block, slots, pad, real=True):
    """Pairs for every token block but the first: one adapter or a weighted mix of two (weights
    of both signs), sorted by slot, then `pad` garbage padding pairs (NaN weights; the first
    points at the pair-less block and the unused last slot, the others out of range)."""
    pairs = []
    for blk in range(1, tokens // block) if real else ():
        for slot in rng.choice(slots - 1, size=rng.integers(1, 3), replace=False):
            pairs.append((blk * block, int(slot), rng.uniform(0.3, 1.5) * rng.choice([-1.0, 1.0])))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    pairs.sort(key=lambda p: p[1])
    garbage = [(0, slots - 1, np.nan), (-block, slots + 3, np.nan), (tokens + 5 * block, -1, np.nan)] * pad
    rows = pairs + garbage[:pad]
    dtypes = (jnp.int32, jnp.int32, jnp.float32)
    return LoraPairs(*(jnp.asarray([r[i] for r in rows], d) for i, d in enumerate(dtypes)), jnp.int32(len(pairs)))


def make_table(rng, *, slots, cap, positions, shape):
    """Sorted unique positions per slot, padded to `cap` by repeating the last one with zero
    values: idx i32[S, cap], val f32[S, cap, *shape]. Slot 0 is full,
    the others hold 1..cap entries; the last slot (used by no pair) is NaN."""
    idx = np.zeros((slots, cap), np.int32)
    val = rng.standard_normal((slots, cap, *shape)).astype(np.float32) / np.sqrt(shape[0] if shape else 1)
    n = np.concatenate([[cap], rng.integers(1, cap + 1, size=slots - 1)])
    for s in range(slots):
        pos = np.sort(rng.choice(positions, size=n[s], replace=False))
        idx[s, :n[s]], idx[s, n[s]:] = pos, pos[-1]
        val[s, n[s]:] = 0
    val[-1] = np.nan
    return idx, val


def make_case(rng, *, tokens, block, slots, nb, b, dtype, pad, val_dtype=None, din=64, dout=128, real=True):
    """A block-sparse step's ((x, idx, val, pairs), clean): `clean` has NaNs zeroed for the naive
    form (which densifies every slot and gathers padding pairs too, then multiplies them by 0).
    The rows of x in the pair-less first block are NaN."""
    pairs = make_pairs(rng, tokens=tokens, block=block, slots=slots, pad=pad, real=real)
    idx, val = make_table(rng, slots=slots, cap=nb, positions=(din // b) * (dout // b), shape=(b, b))
    x = rng.standard_normal((tokens, din)).astype(np.float32)
    x[:block] = np.nan
    x, val = jnp.asarray(x, dtype), jnp.asarray(val, val_dtype or dtype)
    return (x, jnp.asarray(idx), val, pairs), (jnp.nan_to_num(x), jnp.asarray(idx), jnp.nan_to_num(val), pairs)


# (block, tokens, slots, NB, b, x dtype, val dtype, padding pairs)
CASES = {
    "decode-f32": (1, 8, 4, 6, 16, jnp.float32, None, 3),
    "decode-bf16-b32": (1, 8, 4, 5, 32, jnp.bfloat16, None, 2),
    "block4-bf16x-f32val": (4, 16, 4, 6, 16, jnp.bfloat16, jnp.float32, 1),  # TPU lane masks at 4, 8, 12
    "prefill16-f32": (16, 48, 4, 8, 16, jnp.float32, None, 2),
    "prefill16-bf16-no-padding": (16, 48, 5, 6, 16, jnp.bfloat16, None, 0),  # count == P
    "prefill32-b32-tiles": (32, 192, 3, 6, 32, jnp.float32, None, 1),  # TPU: 2 tiles of 128, T padded
}


def _tpu_interpret(x, idx, val, pairs, *, block, dout):
    """The TPU kernel as compiled for TPU (interpret=False), run by TPU interpret mode."""
    with pltpu.force_tpu_interpret_mode():
        return jax.jit(functools.partial(_pallas_tpu, block=block, dout=dout, interpret=False))(x, idx, val, pairs)


IMPLS = {
    "xla": lambda *args, block, dout: block_delta(*args, block=block, dout=dout),
    "pallas-gpu": lambda *args, block, dout: block_delta(*args, block=block, dout=dout, backend="pallas",
                                                         interpret=True),
    "pallas-tpu": _tpu_interpret,
}


def _case(name, **kw):
    block, tokens, slots, nb, b, dtype, val_dtype, pad = CASES[name]
    return block, *make_case(np.random.default_rng(len(name)), tokens=tokens, block=block, slots=slots, nb=nb, b=b,
                             dtype=dtype, val_dtype=val_dtype, pad=pad, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_block_matches_naive(case, impl):
    block, args, clean = _case(case)
    got = IMPLS[impl](*args, block=block, dout=128)
    want = naive_block_delta(*clean, block=block, dout=128)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)
    got = np.asarray(got)
    assert not got[:block].any()  # the block without pairs is exactly 0 (its x rows are NaN)
    assert np.abs(got[block:]).sum(axis=1).min() > 0  # every other row got a delta


@pytest.mark.parametrize("impl", ["pallas-gpu", "pallas-tpu"])
@pytest.mark.parametrize("case", ["decode-f32", "prefill16-f32"])
def test_kernels_never_read_table_padding(case, impl):
    """The row pointer stops at the first entry of a slot's final run, so padding values are
    never multiplied: NaN there leaves the result equal to the zero-padded table's."""
    block, args, clean = _case(case)
    x, idx, val, pairs = args
    first = np.asarray(jax.vmap(lambda r: jnp.searchsorted(r, r[-1]))(idx))
    pad = np.arange(idx.shape[1])[None] > first[:, None]  # [S, NB]
    assert pad[:-1].any()  # some used slot has padding
    val = jnp.where(pad[:, :, None, None], jnp.nan, val)
    np.testing.assert_allclose(IMPLS[impl](x, idx, val, pairs, block=block, dout=128),
                               naive_block_delta(*clean, block=block, dout=128), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block, pad", [(1, 4), (16, 3), (16, 0)])
def test_no_real_pairs_gives_zeros(impl, block, pad):
    """count == 0 (every pair padding) and P == 0 (no pair arrays at all) give all zeros."""
    args, _ = make_case(np.random.default_rng(5), tokens=32, block=block, slots=3, nb=4, b=16, dtype=jnp.float32,
                        pad=pad, real=False)
    assert args[3].start.shape == (pad,) and int(args[3].count) == 0
    got = IMPLS[impl](*args, block=block, dout=128)
    assert got.shape == (32, 128) and not np.asarray(got).any()


@pytest.mark.parametrize("block", [1, 16])
def test_tpu_splits_dout_and_chunks_entries(block, monkeypatch):
    """A resident output past the VMEM budget is cut into dout tiles, whose runs of entries start
    mid-chunk; several chunks per pair (kc = 4 of NB = 8)."""
    import hyprjax.kernels.sparse_pallas as sp

    monkeypatch.setattr(sp, "_TPU_OUT_BYTES", 32 * 128 * 4)  # 32 of dout's 128 rows per tile
    monkeypatch.setattr(sp, "_TPU_CHUNK", 4)
    args, clean = make_case(np.random.default_rng(8), tokens=8 * block, block=block, slots=3, nb=8, b=16,
                            dtype=jnp.float32, pad=1)
    np.testing.assert_allclose(_tpu_interpret(*args, block=block, dout=128),
                               naive_block_delta(*clean, block=block, dout=128), **TOL)


def make_element_case(rng, *, tokens, block, slots, n, dtype, pad, din=32, dout=48):
    """An element-sparse step's ((x, idx, val, pairs), clean), as `make_case`."""
    pairs = make_pairs(rng, tokens=tokens, block=block, slots=slots, pad=pad)
    idx, val = make_table(rng, slots=slots, cap=n, positions=din * dout, shape=())
    x = rng.standard_normal((tokens, din)).astype(np.float32)
    x[:block] = np.nan
    x, val = jnp.asarray(x, dtype), jnp.asarray(val, dtype)
    return (x, jnp.asarray(idx), val, pairs), (jnp.nan_to_num(x), jnp.asarray(idx), jnp.nan_to_num(val), pairs)


@pytest.mark.parametrize("block, tokens, dtype, pad", [(1, 8, jnp.float32, 3), (16, 48, jnp.float32, 2),
                                                        (16, 32, jnp.bfloat16, 0)])
def test_element_sparse_matches_naive(block, tokens, dtype, pad):
    args, clean = make_element_case(np.random.default_rng(block + pad), tokens=tokens, block=block, slots=4, n=40,
                                    dtype=dtype, pad=pad)
    x = args[0]
    y = jnp.zeros((tokens, 48), jnp.float32)
    got = jax.jit(lambda y, x, i, v, p: ref_sparse_add(y, x, i, v, ((p, block, 0),)))(y, *args)
    np.testing.assert_allclose(got, naive_sparse_delta(*clean, block=block, dout=48), **TOL)
    assert not np.asarray(got[:block]).any()
    empty = LoraPairs(*args[3][:3], jnp.int32(0))
    assert not np.asarray(ref_sparse_add(y, x, *args[1:3], ((empty, block, 0),))).any()


def test_ref_block_add_adds_onto_y():
    """ref_block_add(y, ...) == y + the naive delta, in y's dtype."""
    block, args, clean = _case("prefill16-f32")
    y = jnp.asarray(np.random.default_rng(1).standard_normal((48, 128)), jnp.float32)
    got = ref_block_add(y, *args[:3], ((args[3], block, 0),))
    np.testing.assert_allclose(got, y + naive_block_delta(*clean, block=block, dout=128), **TOL)


@pytest.mark.parametrize("part, backend", [("sparse", "xla"), ("block", "xla"), ("block", "pallas")])
@pytest.mark.parametrize("td", [0, 4])
def test_sparse_apply_adds_both_regions_to_y(part, backend, td):
    """A paged step's [decode | prefill] layout with layer 1 of a 2-layer table:
    sparse_apply(y, ...) == y + each region's naive delta."""
    rng = np.random.default_rng(11 + td)
    bq, slots, din, dout = 16, 4, 64, 128
    dec = make_pairs(rng, tokens=td + 1, block=1, slots=slots, pad=2)  # token 0 is dropped below
    dec = dec._replace(start=dec.start - 1)
    pf = make_pairs(rng, tokens=4 * bq, block=bq, slots=slots, pad=2)
    pf = pf._replace(start=pf.start - bq)
    if part == "block":
        idx, val = make_table(rng, slots=slots, cap=6, positions=(din // 16) * (dout // 16), shape=(16, 16))
        naive = naive_block_delta
    else:
        idx, val = make_table(rng, slots=slots, cap=40, positions=din * dout, shape=())
        naive = naive_sparse_delta
    idx, val = jnp.asarray(idx), jnp.nan_to_num(jnp.asarray(val))
    x = jnp.asarray(rng.standard_normal((td + 3 * bq, din)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((x.shape[0], dout)), jnp.float32)
    want = y + jnp.concatenate(([naive(x[:td], idx, val, dec, block=1, dout=dout)] if td else [])
                               + [naive(x[td:], idx, val, pf, block=bq, dout=dout)])
    if not td:
        dec = LoraPairs(*(v[:0] for v in dec[:3]), jnp.int32(0))
    stack = lambda t, fill: jnp.stack([jnp.full_like(t, fill), t])  # noqa: E731
    got = sparse_apply(y, x, part, stack(idx, 0), stack(val, jnp.nan), dec, pf, layer=1, td=td, block_q=bq,
                       backend=backend, interpret=True)
    np.testing.assert_allclose(got, want, **TOL)


def test_bad_shapes_raise_named():
    block, (x, idx, val, pairs), _ = _case("decode-f32")
    with pytest.raises(ValueError, match="block=3"):
        pallas_block_delta(x, idx, val, pairs, block=3, dout=128, interpret=True)
    with pytest.raises(ValueError, match="idx.dtype"):
        pallas_block_delta(x, idx.astype(jnp.int16), val, pairs, block=1, dout=128, interpret=True)
    with pytest.raises(ValueError, match="val.shape"):
        pallas_block_delta(x, idx, val[:, :-1], pairs, block=1, dout=128, interpret=True)
    with pytest.raises(ValueError, match="block size"):
        pallas_block_delta(x, idx, val, pairs, block=1, dout=120, interpret=True)
    with pytest.raises(ValueError, match="x.shape"):
        pallas_block_delta(x[None], idx, val, pairs, block=1, dout=128, interpret=True)
    with pytest.raises(ValueError, match="backend='cuda'"):
        block_delta(x, idx, val, pairs, block=1, dout=128, backend="cuda")
    x96, v48 = jnp.zeros((8, 96), x.dtype), jnp.zeros((*idx.shape, 48, 48), x.dtype)
    with pytest.raises(NotImplementedError, match="block size b=48"):
        _pallas_gpu(x96, idx, v48, pairs, block=1, dout=96, interpret=True)
    with pytest.raises(NotImplementedError, match="block size b=24"):
        _pallas_tpu(x96, idx, v48[..., :24, :24], pairs, block=1, dout=96, interpret=True)
    with pytest.raises(NotImplementedError, match="block=48"):
        _pallas_tpu(jnp.zeros((192, 64), x.dtype), idx, val, pairs, block=48, dout=128, interpret=True)


def _abstract_args(dtype, b, t, din=256, dout=512, slots=5, nb=12, p=7, val_dtype=None):
    s = jax.ShapeDtypeStruct  # slots, NB and pairs need not be powers of two
    return (s((t, din), dtype), s((slots, nb), jnp.int32), s((slots, nb, b, b), val_dtype or dtype),
            LoraPairs(s((p,), jnp.int32), s((p,), jnp.int32), s((p,), jnp.float32), s((), jnp.int32)))


LOWER = {  # name: (block, b, T, din, dout, val dtype)
    "decode-b16": (1, 16, 8, 256, 512, None),
    "decode-b32": (1, 32, 200, 256, 512, None),  # TPU: 2 token tiles, T padded
    "prefill16-b16": (16, 16, 64, 256, 512, None),
    "prefill16-b32-f32val": (16, 32, 256, 256, 512, jnp.float32),
    "prefill-large": (16, 16, 512, 14336, 8192, None),  # TPU: dout split in 2, VMEM limit raised
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", LOWER)
def test_kernels_lower_for_gpu_and_tpu(dtype, case):
    """Lowering without a device runs the Triton and Mosaic TPU Pallas lowerings (not ptxas or
    libtpu), which catches unsupported ops, non-power-of-two Triton tiles and ref indexing."""
    block, b, t, din, dout, val_dtype = LOWER[case]
    args = _abstract_args(dtype, b, t, din, dout, val_dtype=val_dtype)
    for impl, platform, name in ((_pallas_gpu, "cuda", "block_delta_gpu"), (_pallas_tpu, "tpu", "block_delta_tpu")):
        lowered = jax.jit(functools.partial(impl, block=block, dout=dout, interpret=False)).trace(
            *args).lower(lowering_platforms=(platform,))
        assert name in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block, b", [(1, 16), (16, 16), (16, 32)])
def test_compiled_kernel_on_device(dtype, block, b):
    """The kernel compiled for the accelerator against the naive form there, in full f32."""
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU")
    args, clean = make_case(np.random.default_rng(7), tokens=128, block=block, slots=6, nb=24, b=b, dtype=dtype,
                            pad=5, din=512, dout=1024)
    got = block_delta(*args, block=block, dout=1024, backend="pallas")
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference
        want = naive_block_delta(*clean, block=block, dout=1024)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("part", ["sparse", "block"])
@pytest.mark.parametrize("td", [0, 4])
def test_bf16_bit_tables_equal_float_tables_of_the_same_values(part, td):
    """uint16 bfloat16 bits (the XLA path's bf16 slots, kernels/lora.py) give the deltas of float32
    tables holding the same rounded values, decode pairs and prefill blocks (element-sparse
    prefill densifies the slot from the bits): exactly, but for block-sparse decode pairs, whose
    bf16 form adds a block's products in another order (to float32 rounding); the Pallas block
    kernel refuses bits."""
    rng = np.random.default_rng(21 + td)
    bq, slots, din, dout = 16, 4, 64, 128
    dec = make_pairs(rng, tokens=td + 1, block=1, slots=slots, pad=2)
    dec = dec._replace(start=dec.start - 1)
    pf = make_pairs(rng, tokens=4 * bq, block=bq, slots=slots, pad=2)
    pf = pf._replace(start=pf.start - bq)
    if not td:
        dec = LoraPairs(*(v[:0] for v in dec[:3]), jnp.int32(0))
    if part == "block":
        idx, val = make_table(rng, slots=slots, cap=6, positions=(din // 16) * (dout // 16), shape=(16, 16))
    else:
        idx, val = make_table(rng, slots=slots, cap=40, positions=din * dout, shape=())
    stack = lambda t, fill: jnp.stack([jnp.full_like(t, fill), t])  # noqa: E731  layer 1 of 2
    idx, val = stack(jnp.asarray(idx), 0), stack(jnp.asarray(val), jnp.nan)
    rounded, bits = val.astype(jnp.bfloat16).astype(jnp.float32), bf16_bits(val)
    x = jnp.asarray(rng.standard_normal((td + 3 * bq, din)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((x.shape[0], dout)), jnp.float32)
    run = jax.jit(lambda y, x, v: sparse_apply(y, x, part, idx, v, dec, pf, layer=1, td=td, block_q=bq))
    got, want = run(y, x, bits), run(y, x, rounded)
    if part == "block" and td:  # bf16 decode chunks sum a block's b products in their own order
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and not np.allclose(got, y)
    if part == "block":
        with pytest.raises(ValueError, match="uint16"):
            block_delta(x[td:], idx[1], bits[1], pf, block=bq, dout=dout, backend="pallas", interpret=True)


@pytest.mark.parametrize("bits", [False, True])
@pytest.mark.parametrize("chunk", [2, 3])
def test_block_decode_over_several_chunks(chunk, bits, monkeypatch):
    """Decode pairs spread over several chunks (the cases above fit one): a last partial chunk,
    a token's mix split between two chunks, padding pairs (NaN weights, bad slots) in the last
    chunk, a traced layer index; float32 tables and bfloat16 bits against the naive form."""
    monkeypatch.setattr(sparse, "DECODE_CHUNK", chunk)
    monkeypatch.setattr(sparse, "DECODE_CHUNK_BF16", chunk)
    (x, idx, val, pairs), (_, _, clean_val, _) = make_case(np.random.default_rng(7), tokens=12, block=1, slots=5,
                                                           nb=6, b=16, dtype=jnp.float32, pad=3)
    assert int(pairs.count) > 2 * chunk
    if bits:
        clean_val = jnp.nan_to_num(val.astype(jnp.bfloat16).astype(jnp.float32))
        val = bf16_bits(val)
    stack = lambda t: jnp.stack([t, t])  # noqa: E731  two layers, the second one read
    y = jnp.asarray(np.random.default_rng(8).standard_normal((12, 128)), jnp.float32)
    run = jax.jit(lambda y, x, i, v, layer: ref_block_add(y, x, i, v, ((pairs, 1, 0),), layer))  # fresh: traced anew
    got = run(y, x, stack(idx), stack(val), jnp.int32(1))
    want = y + naive_block_delta(jnp.nan_to_num(x), idx, clean_val, pairs, block=1, dout=128)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.isfinite(np.asarray(got)).all()
