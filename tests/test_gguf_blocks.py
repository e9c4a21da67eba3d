"""GGUF blocks kept packed (hyprjax/formats/gguf_blocks.py): qformat.dequantize of the packed arrays
against the `gguf` package's own dequantizer, bit for bit, on random blocks of every type."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from hyprjax import qformat
from hyprjax.errors import ModelFileError
from hyprjax.formats.gguf_blocks import SUPPORTED_KEEP, to_packed

# Byte offsets of each block's f16 fields (d, and dmin or m), from llama.cpp's block_* structs.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
BLOCK_TYPES = tuple(F16_FIELDS)
SHAPES = [(8, 512), (3, 256)]


def _random_raw(type_name: str, shape, rng) -> np.ndarray:
    """Random valid blocks u8[rows, row_bytes]: every byte random but the f16 scales, which are
    sane (|x| in [1e-3, 1e-1], either sign) so that nothing is NaN or inf."""
    rows, cols = shape
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    b = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        x = rng.uniform(1e-3, 1e-1, size=b.shape[:-1]) * rng.choice([-1.0, 1.0], size=b.shape[:-1])
        b[..., at:at + 2] = x.astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(rows, -1)


def _ours(fmt, q) -> np.ndarray:
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(qformat.dequantize(fmt, {k: jnp.asarray(v) for k, v in q.items()}, jnp.float32))


def _check_layout(type_name, fmt, q, shape):
    """Shapes and dtypes as promised: codes per code_shape, f16 scale/min per super-block,
    integer sub/msub per group."""
    rows, cols = shape
    assert fmt.name == type_name
    assert q["codes"].shape == fmt.code_shape(rows, cols)
    assert q["codes"].dtype == {4: np.uint8, 8: np.int8}[fmt.bits]
    for k in ("scale", "min"):
        if k in q:
            assert q[k].dtype == np.float16 and q[k].shape == (rows, cols // fmt.group // fmt.ratio), k
    for k in ("sub", "msub"):
        if k in q:
            signed = type_name in ("Q3_K", "Q6_K") and k == "sub"
            assert q[k].dtype == (np.int8 if signed else np.uint8) and q[k].shape == (rows, cols // fmt.group), k
    assert ("sub" in q) == (fmt.ratio > 1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_random_blocks_match_gguf_exactly(type_name, shape, rng):
    raw = _random_raw(type_name, shape, rng)
    fmt, q = to_packed(type_name, raw.reshape(-1), shape)
    _check_layout(type_name, fmt, q, shape)
    want = gguf_dequantize(raw, GGMLQuantizationType[type_name])
    assert want.shape == shape and np.isfinite(want).all()
    np.testing.assert_array_equal(_ours(fmt, q), want)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_by_gguf_round_trip(type_name, rng):
    w = rng.normal(0, 0.05, size=(8, 512)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    raw = gguf_quantize(w, qtype)
    fmt, q = to_packed(type_name, raw, w.shape)
    want = gguf_dequantize(raw, qtype)
    np.testing.assert_array_equal(_ours(fmt, q), want)
    assert np.abs(want - w).max() < 0.03  # and it is w: 4-bit steps here are ~0.02, half of that the error


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_half_floats_kept_as_is(type_name, rng):
    w = rng.normal(0, 1, size=(3, 96)).astype(np.float32)
    dtype = np.float16 if type_name == "F16" else ml_dtypes.bfloat16
    raw = w.astype(dtype).view(np.uint8).reshape(3, -1)
    fmt, q = to_packed(type_name, raw, w.shape)
    assert fmt.bits == 16 and fmt.group == 96 and set(q) == {"codes", "scale"}
    np.testing.assert_array_equal(q["scale"], np.ones((3, 1), np.float32))
    assert q["codes"].dtype == dtype and q["codes"].shape == w.shape
    np.testing.assert_array_equal(_ours(fmt, q), gguf_dequantize(raw, GGMLQuantizationType[type_name]))


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(ModelFileError, match=r"IQ4_NL cannot be kept packed \(supported: F16, BF16, Q8_0"):
        to_packed("IQ4_NL", np.zeros(18 * 8, np.uint8), (1, 256))


def test_wrong_byte_count_is_refused(rng):
    raw = _random_raw("Q4_K", (2, 256), rng)
    with pytest.raises(ValueError, match="raw has 144 bytes; Q4_K \\(2, 256\\) needs 288"):
        to_packed("Q4_K", raw[:1], (2, 256))
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block of 256"):
        to_packed("Q4_K", raw, (3, 192))


@pytest.mark.parametrize("type_name, bits_per_weight", [("Q4_K", 4.625), ("Q6_K", 8.5625),
                                                        ("Q8_0", 8.5), ("Q4_0", 4.5)])
def test_device_bytes_match_the_file(type_name, bits_per_weight, rng):
    """The packed arrays take exactly the file's bytes per weight: the point of keeping them packed."""
    rows, cols = 4, 1024
    fmt, q = to_packed(type_name, _random_raw(type_name, (rows, cols), rng), (rows, cols))
    assert qformat.nbytes(q) * 8 / (rows * cols) == bits_per_weight


def test_supported_keep_covers_every_converter():
    assert set(SUPPORTED_KEEP) == set(BLOCK_TYPES) | {"F16", "BF16"}
