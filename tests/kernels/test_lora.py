"""Batched multi-LoRA: the XLA path and both Pallas kernels (interpret mode) vs the naive form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hyprjax.kernels.lora import LoraPairs, bf16_bits, lora_apply, lora_delta, naive_lora_delta, widen
from hyprjax.kernels.lora_pallas import _pallas_gpu, _pallas_tpu, pallas_lora_delta

# bf16 inputs are exact in f32 and every implementation multiplies and accumulates in f32, so
# both dtypes differ from the naive form only by summation order.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=1e-4, rtol=1e-4)}


def make_case(rng, *, tokens, block, slots, rank, dtype, pad, din=128, dout=256, real=True):
    """A step's ((x, a, b, pairs), clean): `clean` is the same with NaNs zeroed, for the naive
    form (which gathers padding pairs too, then multiplies them by 0).

    Every token block but the first gets one adapter or a weighted mix of two (weights of
    both signs); pairs are sorted by slot, so a mix's two pairs are not adjacent. Things the
    kernels must never read hold NaN or garbage: the last slot (no pair uses it), the rows of x
    in the pair-less first block, and the `pad` padding pairs (NaN weights; the first points
    at that block and that slot, the others at starts and slots out of range).
    """
    nb = tokens // block
    pairs = []
    for blk in range(1, nb) if real else ():
        mix = rng.choice(slots - 1, size=rng.integers(1, 3), replace=False)
        for slot in mix:
            w = rng.uniform(0.3, 1.5) * rng.choice([-1.0, 1.0])
            pairs.append((blk * block, int(slot), w))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    pairs.sort(key=lambda p: p[1])
    garbage = [(0, slots - 1, np.nan), (-block, slots + 3, np.nan),
               (tokens + 5 * block, -1, np.nan)] * pad
    rows = pairs + garbage[:pad]
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    x = rand(tokens, din)
    a = rand(slots, din, rank) / np.sqrt(din)
    b = rand(slots, rank, dout) / np.sqrt(rank)
    x[:block], a[-1], b[-1] = np.nan, np.nan, np.nan
    arrays = [jnp.asarray(v, dtype) for v in (x, a, b)]
    lp = LoraPairs(*(jnp.asarray([r[i] for r in rows], d)
                     for i, d in enumerate((jnp.int32, jnp.int32, jnp.float32))),
                   jnp.int32(len(pairs)))
    clean = [jnp.nan_to_num(v) for v in arrays]
    return (*arrays, lp), (*clean, lp)


# (block, tokens, slots, rank, dtype, padding pairs)
CASES = {
    "decode-f32": (1, 8, 4, 16, jnp.float32, 3),
    "decode-bf16-rank8": (1, 8, 4, 8, jnp.bfloat16, 2),
    "decode-f32-no-padding": (1, 8, 3, 16, jnp.float32, 0),  # count == P
    "block4-f32": (4, 16, 4, 16, jnp.float32, 1),  # TPU row masks at offsets 4, 8, 12
    "prefill16-f32": (16, 48, 4, 16, jnp.float32, 2),
    "prefill16-bf16": (16, 48, 5, 16, jnp.bfloat16, 1),
    "prefill16-f32-rank8": (16, 32, 3, 8, jnp.float32, 1),  # rank < 16: no Triton dot
}


def _tpu_interpret(x, a, b, pairs, *, block):
    """The TPU kernel as compiled for TPU (interpret=False), run by TPU interpret mode."""
    with pltpu.force_tpu_interpret_mode():
        return jax.jit(functools.partial(_pallas_tpu, block=block, interpret=False))(x, a, b,
                                                                                    pairs)


IMPLS = {
    "xla": lambda *args, block: lora_delta(*args, block=block),
    "pallas-gpu": lambda *args, block: lora_delta(*args, block=block, backend="pallas",
                                                  interpret=True),
    "pallas-tpu": _tpu_interpret,
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_naive(case, impl):
    block, tokens, slots, rank, dtype, pad = CASES[case]
    args, clean = make_case(np.random.default_rng(len(case)), tokens=tokens, block=block,
                            slots=slots, rank=rank, dtype=dtype, pad=pad)
    got = IMPLS[impl](*args, block=block)
    want = naive_lora_delta(*clean, block=block)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL[dtype])
    got = np.asarray(got)
    assert not got[:block].any()  # the block without pairs is exactly 0 (its x rows are NaN)
    assert np.abs(got[block:]).min() > 0  # every other block got a delta


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", [1, 16])
@pytest.mark.parametrize("pad", [4, 0])
def test_no_real_pairs_gives_zeros(impl, block, pad):
    """count == 0 (every pair padding) and P == 0 (no pair arrays at all) give all zeros."""
    args, _ = make_case(np.random.default_rng(5), tokens=32, block=block, slots=3, rank=16,
                        dtype=jnp.float32, pad=pad, real=False)
    assert args[3].start.shape == (pad,) and int(args[3].count) == 0
    got = IMPLS[impl](*args, block=block)
    assert got.shape == (32, 256) and not np.asarray(got).any()


@pytest.mark.parametrize("block", [1, 16])
def test_tpu_splits_dout_when_output_is_large(block, monkeypatch):
    """A resident output past the VMEM budget is cut into 128-lane dout tiles (grid axis 0)."""
    import hyprjax.kernels.lora_pallas as lp

    monkeypatch.setattr(lp, "_TPU_OUT_BYTES", 32 * 128 * 4)  # room for 128 lanes of 32 rows
    args, clean = make_case(np.random.default_rng(8), tokens=32, block=block, slots=3,
                            rank=16, dtype=jnp.float32, pad=1, dout=384)
    np.testing.assert_allclose(_tpu_interpret(*args, block=block),
                               naive_lora_delta(*clean, block=block), **TOL[jnp.float32])


def test_bad_shapes_raise_named():
    args, _ = make_case(np.random.default_rng(6), tokens=8, block=1, slots=3, rank=16,
                        dtype=jnp.float32, pad=1)
    with pytest.raises(ValueError, match="block=3"):
        pallas_lora_delta(*args, block=3, interpret=True)
    x, a, b, pairs = args
    with pytest.raises(NotImplementedError, match="rank R=12"):
        _pallas_gpu(x, a[..., :12], b[:, :12], pairs, block=1, interpret=True)
    x24 = jnp.zeros((48, x.shape[1]), x.dtype)
    with pytest.raises(NotImplementedError, match="block=24"):
        _pallas_tpu(x24, a, b, pairs, block=24, interpret=True)


def _abstract_args(dtype, rank, t=64, din=256, dout=512, slots=5, p=12):
    s = jax.ShapeDtypeStruct  # slots and pairs need not be powers of two
    return (s((t, din), dtype), s((slots, din, rank), dtype), s((slots, rank, dout), dtype),
            LoraPairs(s((p,), jnp.int32), s((p,), jnp.int32), s((p,), jnp.float32),
                      s((), jnp.int32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block, rank", [(1, 16), (4, 16), (16, 16), (16, 8)])
def test_kernels_lower_for_gpu_and_tpu(dtype, block, rank):
    """Lowering without a device runs the Triton and Mosaic TPU Pallas lowerings (not ptxas or
    libtpu), which catches unsupported ops, non-power-of-two Triton tiles and ref indexing."""
    for impl, platform, name in ((_pallas_gpu, "cuda", "lora_expand"),
                                 (_pallas_tpu, "tpu", "lora_delta_tpu")):
        lowered = jax.jit(functools.partial(impl, block=block, interpret=False)).trace(
            *_abstract_args(dtype, rank)).lower(lowering_platforms=(platform,))
        assert name in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [1, 16])
def test_compiled_kernel_on_device(dtype, block):
    """The kernel compiled for the accelerator against the naive form there, in full f32."""
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU")
    args, clean = make_case(np.random.default_rng(7), tokens=128, block=block, slots=6,
                            rank=16, dtype=dtype, pad=5, din=512, dout=1024)
    got = lora_delta(*args, block=block, backend="pallas")
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference
        want = naive_lora_delta(*clean, block=block)
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("td", [0, 4])
def test_lora_apply_adds_both_regions_to_y(backend, td):
    """A paged step's [decode | prefill] layout: lora_apply(y, ...) == y + each region's naive delta.
    The XLA path accumulates into y in place across both regions; the kernels add per region."""
    rng = np.random.default_rng(11)
    bq = 16
    (xd, a, b, dec), _ = make_case(rng, tokens=max(td, 1), block=1, slots=4, rank=16, dtype=jnp.float32, pad=2)
    (xp, _, _, pf), _ = make_case(rng, tokens=3 * bq, block=bq, slots=4, rank=16, dtype=jnp.float32, pad=2)
    a, b = jnp.nan_to_num(a), jnp.nan_to_num(b)  # the last slot is unused here
    xd, xp = jnp.nan_to_num(xd[:td]), jnp.nan_to_num(xp)
    x = jnp.concatenate([xd, xp])
    y = jnp.asarray(rng.standard_normal((x.shape[0], b.shape[2])), jnp.float32)
    want = y + jnp.concatenate(([naive_lora_delta(xd, a, b, dec, block=1)] if td else [])
                               + [naive_lora_delta(xp, a, b, pf, block=bq)])
    if not td:
        dec = LoraPairs(*(v[:0] for v in dec[:3]), jnp.int32(0))
    stack = lambda t: jnp.stack([jnp.full_like(t, jnp.nan), t])  # noqa: E731  layer 1 of a 2-layer table
    got = lora_apply(y, x, stack(a), stack(b), dec, pf, layer=1, td=td, block_q=bq, backend=backend, interpret=True)
    np.testing.assert_allclose(got, want, **TOL[jnp.float32])


@pytest.mark.parametrize("td", [0, 4])
def test_bf16_bit_tables_equal_float_tables_of_the_same_values(td):
    """bfloat16 slots on the XLA path are uint16 bits (kernels/lora.py): lora_apply over a stacked
    bit table gives exactly what float32 tables holding the same bf16-rounded values give, NaN
    layer and slot included (never read); widen() recovers the values; the Pallas path refuses bits."""
    rng = np.random.default_rng(5 + td)
    bq = 16
    (xd, a, b, dec), _ = make_case(rng, tokens=max(td, 1), block=1, slots=4, rank=16, dtype=jnp.float32, pad=2)
    (xp, _, _, pf), _ = make_case(rng, tokens=3 * bq, block=bq, slots=4, rank=16, dtype=jnp.float32, pad=2)
    x = jnp.nan_to_num(jnp.concatenate([xd[:td], xp]))
    if not td:
        dec = LoraPairs(*(v[:0] for v in dec[:3]), jnp.int32(0))
    stack = lambda t: jnp.stack([jnp.full_like(t, jnp.nan), t])  # noqa: E731  layer 1 of a 2-layer table
    a, b = stack(a), stack(b)
    rounded = [t.astype(jnp.bfloat16).astype(jnp.float32) for t in (a, b)]
    bits = [bf16_bits(t) for t in (a, b)]
    assert bits[0].dtype == jnp.uint16 and np.array_equal(bits[1], bf16_bits(np.asarray(b)))
    np.testing.assert_array_equal(widen(bits[0]), rounded[0])
    y = jnp.asarray(rng.standard_normal((x.shape[0], b.shape[-1])), jnp.float32)
    kw = dict(layer=1, td=td, block_q=bq)
    got = jax.jit(lambda y, x, a, b: lora_apply(y, x, a, b, dec, pf, **kw))(y, x, *bits)
    want = jax.jit(lambda y, x, a, b: lora_apply(y, x, a, b, dec, pf, **kw))(y, x, *rounded)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and not np.allclose(got, y)
    with pytest.raises(ValueError, match="uint16"):
        lora_delta(xp, bits[0][1], bits[1][1], pf, block=bq, backend="pallas", interpret=True)
