"""qmatmul (kernels/qmatmul.py): both Pallas kernels in interpret mode vs x @ dequantize(fmt, q).T.

Tolerance: max |got - want| <= tol * max |want| (the output's scale), tol = 1e-5 for f32 x: codes
and scales are exact in f32 and both sides accumulate in f32, so only summation order differs.
With bf16 x, path A (a din chunk inside one group, as per-channel int8) is exact in the same
sense, since integer codes are exact in bf16 and the scale is applied in f32 after the dot;
path B (groups inside a chunk) rounds the dequantized tile to bf16 for the dot: 1e-2.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from hyprjax.kernels.qmatmul import _qmatmul_gpu, _qmatmul_tpu, qmatmul, reference
from hyprjax.qformat import QFormat, pack_nibbles

TOL = 1e-5
TOL_BF16_TILE = 1e-2
f16, f32, u8, i8 = np.float16, np.float32, np.uint8, np.int8

# name -> (format for a din, dtypes of the factor arrays present; "codes" for bits 16)
FORMATS = {
    "int8": (lambda din: QFormat(8, din), dict(scale=f32)),
    "int4": (lambda din: QFormat(4, 128, zero=8), dict(scale=f32)),
    "Q4_K": (lambda din: QFormat(4, 32, ratio=8), dict(scale=f16, sub=u8, min=f16, msub=u8)),
    "Q6_K": (lambda din: QFormat(8, 16, ratio=16), dict(scale=f16, sub=i8)),
    "Q8_0": (lambda din: QFormat(8, 32), dict(scale=f16)),
    "f16": (lambda din: QFormat(16, din), dict(codes=f16, scale=f32)),
}
# Shapes the main list does not reach: 4-bit group 16 (nibbles of a byte in two groups), a
# min without sub-scales, group 64, bare bf16 codes, f16 scales on int4.
EXTRA = {
    "Q3_K": (lambda din: QFormat(4, 16, zero=4, ratio=16), dict(scale=f16, sub=i8)),
    "Q2_K": (lambda din: QFormat(4, 16, ratio=16), dict(scale=f16, sub=u8, min=f16, msub=u8)),
    "Q4_1": (lambda din: QFormat(4, 32), dict(scale=f16, min=f16)),
    "int4-g64": (lambda din: QFormat(4, 64, zero=8), dict(scale=f16)),
    "int8-g128-min": (lambda din: QFormat(8, 128, ratio=2), dict(scale=f32, sub=u8, min=f32)),
    "bf16-bare": (lambda din: QFormat(16, din), dict(codes=jnp.bfloat16)),
}


def make_q(rng, fmt: QFormat, dtypes: dict, dout: int, din: int) -> dict:
    """Random (never zero) arrays of a quantized [dout, din] matrix, as the device holds them."""
    g = din // fmt.group
    if fmt.bits == 4:
        q = dict(codes=pack_nibbles(rng.integers(0, 16, (dout, din))))
    elif fmt.bits == 8:
        lim = 32 if fmt.ratio > 1 else 128  # Q6_K's codes are 6-bit
        q = dict(codes=rng.integers(-lim, lim, (dout, din)).astype(i8))
    else:
        q = dict(codes=rng.standard_normal((dout, din)).astype(dtypes["codes"]))
    cols = {"scale": g // fmt.ratio, "min": g // fmt.ratio, "sub": g, "msub": g}
    for k, dt in dtypes.items():
        if k == "codes":
            continue
        shape = (dout, cols[k])
        if k == "scale":
            a = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape) / 64
        elif k == "min":
            a = rng.uniform(-1, 1, shape) / 8
        elif dt == i8:
            a = rng.choice(np.r_[-32:0, 1:32], shape)
        else:
            a = rng.integers(1, 64, shape)
        q[k] = a.astype(dt)
    return {k: jnp.asarray(v) for k, v in q.items()}


def case(name, m, din, dout, seed=0, x_dtype=jnp.float32):
    build, dtypes = {**FORMATS, **EXTRA}[name]
    rng = np.random.default_rng(seed)
    fmt = build(din)
    x = jnp.asarray(rng.standard_normal((m, din)), x_dtype)
    return x, fmt, make_q(rng, fmt, dtypes, dout, din)


def check(got, x, fmt, q, tol=TOL):
    want = np.asarray(reference(x, fmt, q))
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f"error {err:.2e} x the output's scale"


@pytest.mark.parametrize("din, dout", [(256, 384), (512, 128)])
@pytest.mark.parametrize("m", [1, 5, 32])
@pytest.mark.parametrize("name", FORMATS)
def test_gpu_kernel_interpret(name, m, din, dout):
    """The GPU (Triton) kernel body, interpreted: the default on CPU with interpret=True."""
    x, fmt, q = case(name, m, din, dout)
    check(qmatmul(x, fmt, q, interpret=True), x, fmt, q)


@pytest.mark.parametrize("name", [*FORMATS, *EXTRA])
def test_tpu_kernel_interpret(name):
    x, fmt, q = case(name, 5, 512, 384, seed=1)
    check(qmatmul(x, fmt, q, interpret=True, backend="tpu"), x, fmt, q)


@pytest.mark.parametrize("name", EXTRA)
def test_gpu_kernel_interpret_extra(name):
    x, fmt, q = case(name, 3, 512, 128, seed=2)
    check(qmatmul(x, fmt, q, interpret=True), x, fmt, q)


def test_group_96_din_576():
    """SmolLM2's int4: din 576, group 96 (path A in 16-byte chunks on GPU; whole din on TPU)."""
    rng = np.random.default_rng(3)
    fmt = QFormat(4, 96, zero=8)
    q = make_q(rng, fmt, dict(scale=f32), 128, 576)
    x = jnp.asarray(rng.standard_normal((2, 576)), jnp.float32)
    for backend in ("gpu", "tpu"):
        check(qmatmul(x, fmt, q, interpret=True, backend=backend), x, fmt, q)


@pytest.mark.parametrize("name, tol", [("int8", TOL), ("int4", TOL_BF16_TILE),
                                       ("Q4_K", TOL_BF16_TILE), ("Q6_K", TOL_BF16_TILE)])
def test_bf16_x(name, tol):
    x, fmt, q = case(name, 4, 512, 128, seed=4, x_dtype=jnp.bfloat16)
    for backend in ("gpu", "tpu"):
        check(qmatmul(x, fmt, q, interpret=True, backend=backend), x, fmt, q, tol)


@pytest.mark.parametrize("blocks", [dict(block_n=16, block_k=16, splits=4),
                                    dict(block_m=32, block_n=128, block_k=128, splits=1),
                                    dict(block_k=32, splits=8)])
@pytest.mark.parametrize("name", ["int8", "int4", "Q4_K", "Q3_K"])
def test_gpu_block_sizes(name, blocks):
    """Explicit tiles and split-K: several M blocks, and both paths for int4 (block_k 128 puts
    two 64-byte groups in a chunk; 16 and 32 cut one group into chunks)."""
    x, fmt, q = case(name, 40, 512, 128, seed=5)
    check(qmatmul(x, fmt, q, interpret=True, **blocks), x, fmt, q)


def test_bad_inputs_raise_named():
    x, fmt, q = case("int8", 2, 256, 128)
    with pytest.raises(ValueError, match=r"q\['codes'\]"):
        qmatmul(x, fmt, {**q, "codes": q["codes"].astype(jnp.int32)}, interpret=True)
    with pytest.raises(ValueError, match=r"q\['scale'\].shape"):
        qmatmul(x, fmt, {**q, "scale": q["scale"][:64]}, interpret=True)
    with pytest.raises(ValueError, match="interpret=False"):
        qmatmul(x, fmt, q)
    with pytest.raises(ValueError, match="splits=2"):
        qmatmul(x, fmt, q, interpret=True, backend="tpu", splits=2)
    with pytest.raises(ValueError, match="backend='cuda'"):
        qmatmul(x, fmt, q, interpret=True, backend="cuda")
    x, fmt, q = case("Q8_0", 2, 256, 128)
    q48 = {**q, "scale": jnp.ones((128, 256 // 48 + 1), jnp.float16)}
    with pytest.raises(ValueError, match="whole number of groups"):
        qmatmul(x, QFormat(8, 48), q48, interpret=True)
    x = jnp.ones((2, 192), jnp.float32)
    with pytest.raises(NotImplementedError, match="group=48"):
        qmatmul(x, QFormat(4, 48), dict(codes=jnp.zeros((128, 96), jnp.uint8),
                                         scale=jnp.ones((128, 4), jnp.float32)), interpret=True)



@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the kernel's refusal to run uncompiled off a device")
def test_engine_reaches_the_kernel(monkeypatch):
    """HYPRJAX_QMATMUL=pallas routes quant.qdot's accelerator path to this package's kernel (it
    once imported a top-level `kernels`: Hugging Face's package, which transformers installs, or
    nothing outside the repo root). Off a device the kernel itself refuses to run uncompiled."""
    from hyprjax import quant

    x, fmt, q = case("int8", 2, 256, 128)
    monkeypatch.setenv("HYPRJAX_QMATMUL", "pallas")
    with pytest.raises(ValueError, match="interpret=False needs a GPU or TPU"):
        quant.accelerator_qdot(x, fmt, q)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="float32 tolerances; a GPU's float32 dot may use TF32")
@pytest.mark.parametrize("name", ["int8", "Q8_0", "Q4_K", "Q6_K"])
def test_accelerator_xla_path(name):
    """quant.accelerator_qdot's XLA path (what GPU/TPU run by default; plain XLA, so it runs here):
    float32 x against the float32 reference; bfloat16 x against bf16 weights rounded once, with
    per-channel int8 exact (codes in the dot, the scale after it)."""
    from hyprjax import quant
    from hyprjax.qformat import dequantize

    x, fmt, q = case(name, 5, 256, 384)
    check(quant.accelerator_qdot(x, fmt, q), x, fmt, q)
    xb = x.astype(jnp.bfloat16)
    w = dequantize(fmt, q)
    if name != "int8":
        w = w.astype(jnp.bfloat16).astype(jnp.float32)
    want = np.asarray(xb.astype(jnp.float32), np.float64) @ np.asarray(w, np.float64).T  # numpy: no TF32
    got = np.asarray(quant.accelerator_qdot(xb, fmt, q))
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_pallas_falls_back_on_a_shape_it_does_not_take(monkeypatch, caplog):
    """HYPRJAX_QMATMUL=pallas: a matrix the kernel refuses (NotImplementedError, e.g. an odd
    vocabulary's output size on GPU) runs through XLA instead, with a warning naming it."""
    from hyprjax import quant
    from hyprjax.kernels import qmatmul as qm

    def refuse(*args, **kwargs):
        raise NotImplementedError("qmatmul (GPU): block_n=1 must be a power of two >= 16")

    x, fmt, q = case("Q8_0", 3, 256, 384)
    monkeypatch.setenv("HYPRJAX_QMATMUL", "pallas")
    monkeypatch.setattr(qm, "qmatmul", refuse)
    with caplog.at_level("WARNING", logger="hyprjax"):
        got = quant.accelerator_qdot(x, fmt, q)
    check(got, x, fmt, q)
    assert "block_n=1" in caplog.text and "[384 x 256] matrix runs through XLA" in caplog.text


def test_pallas_refused_on_a_sharded_quantized_model(monkeypatch):
    """The engine's start-up check: the Pallas matmul cannot be partitioned over a mesh."""
    from types import SimpleNamespace

    from hyprjax import quant
    from hyprjax.errors import ConfigError

    monkeypatch.setattr(quant, "is_quantized", lambda model: model == "quantized")
    two, one = SimpleNamespace(size=2), SimpleNamespace(size=1)
    monkeypatch.setenv("HYPRJAX_QMATMUL", "pallas")
    with pytest.raises(ConfigError, match="HYPRJAX_QMATMUL=pallas .* sharded over 2; unset it"):
        quant.check_qmatmul_mesh(two, "quantized")
    for mesh, model in ((one, "quantized"), (None, "quantized"), (two, "float")):
        quant.check_qmatmul_mesh(mesh, model)
    monkeypatch.setenv("HYPRJAX_QMATMUL", "xla")
    quant.check_qmatmul_mesh(two, "quantized")

# JAX >= 0.11 reads the target GPU's kind when lowering a Triton kernel; without a GPU it must
# be named through an abstract mesh (0.10 accepts the mesh too).
H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", None,
                                                                 "gpu"))


@pytest.mark.parametrize("name", [*FORMATS, *EXTRA])
def test_kernels_lower_for_gpu_and_tpu(name):
    """Lowering without a device runs the Triton and Mosaic Pallas lowerings (not ptxas or the
    TPU compiler): unsupported ops, non-power-of-two Triton tiles, ref indexing."""
    x, fmt, q = case(name, 1, 512, 384)
    for impl, platform, kernel, ctx in ((_qmatmul_gpu, "cuda", "qmatmul", use_abstract_mesh(H100)),
                                        (_qmatmul_tpu, "tpu", "qmatmul_tpu", nullcontext())):
        with ctx:
            lowered = jax.jit(functools.partial(impl, fmt=fmt)).trace(x, q=q).lower(
                lowering_platforms=(platform,))
        assert kernel in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40])
@pytest.mark.parametrize("name", [*FORMATS, *EXTRA])
def test_compiled_kernel_on_device(name, m):
    """The kernel compiled for the accelerator (not interpreted) vs the jnp reference there."""
    if jax.default_backend() == "cpu":
        pytest.skip("needs GPU/TPU; the same code path runs in interpret mode above")
    for x_dtype in (jnp.float32, jnp.bfloat16):
        x, fmt, q = case(name, m, 1024, 768, seed=6, x_dtype=x_dtype)
        check(qmatmul(x, fmt, q), x, fmt, q, TOL if x_dtype == jnp.float32 else TOL_BF16_TILE)
