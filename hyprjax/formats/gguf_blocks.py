"""GGUF block types kept packed: a tensor's stored bytes -> (QFormat, arrays), losslessly.

`qformat.dequantize(fmt, q)` equals `gguf.quants.dequantize` bit for bit in float32 for every type
here, no tolerance: each product either side forms (an f16 of 11 significant bits times an integer
sub-scale times a code) needs at most 23 bits, so is exact in float32, and the one rounding left is
the add of `min`, which gguf-py's `d * q - dm` makes too (an FMA cannot change it either).

| type | bits | codes                     | group | ratio | scale | sub            | min       | msub       |
|------|------|---------------------------|-------|-------|-------|----------------|-----------|------------|
| F16  | 16   | the f16 values            | din   | 1     | 1 f32 |                |           |            |
| BF16 | 16   | the bf16 values           | din   | 1     | 1 f32 |                |           |            |
| Q8_0 | 8    | qs (int8)                 | 32    | 1     | d f16 |                |           |            |
| Q4_0 | 4    | qs bytes as stored, zero 8| 32    | 1     | d f16 |                |           |            |
| Q4_1 | 4    | qs bytes as stored        | 32    | 1     | d f16 |                | m f16     |            |
| Q5_0 | 8    | q5 - 16 (int8)            | 32    | 1     | d f16 |                |           |            |
| Q5_1 | 8    | q5, 0..31 (int8)          | 32    | 1     | d f16 |                | m f16     |            |
| Q2_K | 4    | q2, 0..3                  | 16    | 16    | d f16 | u8 sc & 15     | -dmin f16 | u8 sc >> 4 |
| Q3_K | 4    | q3 + 8 (q3 -4..3), zero 8 | 16    | 16    | d f16 | i8 6-bit sc-32 |           |            |
| Q4_K | 4    | q4 repacked to our nibbles| 32    | 8     | d f16 | u8 6-bit sc    | -dmin f16 | u8 6-bit m |
| Q5_K | 8    | q5, 0..31 (int8)          | 32    | 8     | d f16 | u8 6-bit sc    | -dmin f16 | u8 6-bit m |
| Q6_K | 8    | q6 - 32 (int8)            | 16    | 16    | d f16 | i8 scales      |           |            |
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFileError
from ..qformat import QFormat, pack_nibbles

SUPPORTED_KEEP = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def to_packed(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> tuple[QFormat, dict[str, np.ndarray]]:
    """The stored bytes u8[...] of a GGUF tensor of numpy shape (rows, cols) -> (format, arrays):
    codes [fmt.code_shape(rows, cols)], scale/min [rows, cols // group // ratio], sub/msub
    [rows, cols // group], fields a type lacks left out."""
    if type_name not in SUPPORTED_KEEP:
        raise ModelFileError(f"GGUF tensor type {type_name} cannot be kept packed "
                             f"(supported: {', '.join(SUPPORTED_KEEP)})")
    rows, cols = shape
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if cols % block:
        raise ValueError(f"to_packed: shape {shape} has a row of {cols}, "
                         f"not a multiple of {type_name}'s block of {block}")
    raw = np.asarray(raw).view(np.uint8).reshape(-1)
    if raw.size != rows * cols // block * type_size:
        raise ValueError(f"to_packed: raw has {raw.size} bytes; {type_name} {shape} needs "
                         f"{rows * cols // block * type_size}")
    if type_name in ("F16", "BF16"):
        dtype = np.float16 if type_name == "F16" else ml_dtypes.bfloat16
        # The unit scale is qformat's marker of a matrix stored transposed (hyprjax/sharding.py).
        return (QFormat(bits=16, group=cols, name=type_name),
                dict(codes=raw.view(dtype).reshape(rows, cols), scale=np.ones((rows, 1), np.float32)))
    fmt, q = _CONVERT[type_name](raw.reshape(rows, cols // block, type_size))
    return fmt, {k: v.reshape(rows, -1) for k, v in q.items()}


# Each converter takes the blocks u8[R, nb, type_size] and returns arrays shaped [R, nb, ...];
# the byte offsets are the fields of llama.cpp's block_* structs (ggml-common.h).

def _f16(b, at: int) -> np.ndarray:
    """The f16 field at byte `at` of each block: f16[R, nb]."""
    return np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0]


def _nibbles(qs) -> np.ndarray:
    """Bytes u8[..., n] -> u8[..., 2, n]: the low nibbles, then the high ones."""
    return np.stack([qs & 0xF, qs >> 4], axis=-2)


def _bits(x, shifts, mask: int) -> np.ndarray:
    """u8[..., n] -> u8[..., len(shifts), n]: (x >> shift) & mask for each shift."""
    return (x[..., None, :] >> np.asarray(shifts, np.uint8)[:, None]) & np.uint8(mask)


def _q8_0(b):  # block_q8_0: d f16, qs i8[32]
    return QFormat(bits=8, group=32, name="Q8_0"), dict(codes=b[..., 2:].view(np.int8), scale=_f16(b, 0))


def _q4_0(b):  # block_q4_0: d f16, qs u8[16]; the nibble layout is already ours
    return QFormat(bits=4, group=32, zero=8, name="Q4_0"), dict(codes=b[..., 2:], scale=_f16(b, 0))


def _q4_1(b):  # block_q4_1: d f16, m f16, qs u8[16]
    return QFormat(bits=4, group=32, name="Q4_1"), dict(codes=b[..., 4:], scale=_f16(b, 0), min=_f16(b, 2))


def _q5(qh, qs) -> np.ndarray:
    """Q5_0/Q5_1's 5-bit values u8[R, nb, 32]: weight j's high bit is bit j of the u32 qh."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")
    return _nibbles(qs).reshape(*qs.shape[:-1], 32) | (high << 4)


def _q5_0(b):  # block_q5_0: d f16, qh u8[4], qs u8[16]
    codes = _q5(b[..., 2:6], b[..., 6:]).astype(np.int8) - np.int8(16)
    return QFormat(bits=8, group=32, name="Q5_0"), dict(codes=codes, scale=_f16(b, 0))


def _q5_1(b):  # block_q5_1: d f16, m f16, qh u8[4], qs u8[16]
    codes = _q5(b[..., 4:8], b[..., 8:]).astype(np.int8)
    return QFormat(bits=8, group=32, name="Q5_1"), dict(codes=codes, scale=_f16(b, 0), min=_f16(b, 2))


def _k_scales(scales):
    """Q4_K/Q5_K's twelve bytes of 6-bit (sc, m) pairs -> (sc u8[R, nb, 8], m u8[R, nb, 8])
    (get_scale_min_k4: entries 0-3 in the low 6 bits of bytes 0-7, 4-7 split across bytes 8-11)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(b):  # block_q4_K: d f16, dmin f16, scales u8[12], qs u8[128]
    # Each 32 bytes of qs hold 64 weights: low nibbles the first 32, high nibbles the next 32.
    # Ours pairs weight j with j + 16 in each 32, so byte j of the first 32-block takes the low
    # nibbles of qs[j] and qs[j + 16], and of the second their high nibbles: no unpacking needed.
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 2, 16)
    lo, hi = qs[..., 0, :], qs[..., 1, :]
    codes = np.stack([(lo & 0xF) | (hi << 4), (lo >> 4) | (hi & 0xF0)], axis=-2)
    sc, m = _k_scales(b[..., 4:16])
    return (QFormat(bits=4, group=32, ratio=8, name="Q4_K"),
            dict(codes=codes, scale=_f16(b, 0), sub=sc, min=-_f16(b, 2), msub=m))


def _q5_k(b):  # block_q5_K: d f16, dmin f16, scales u8[12], qh u8[32], qs u8[128]
    low = _nibbles(b[..., 48:].reshape(*b.shape[:-1], 4, 32))  # [R, nb, 4, 2, 32]: weight 64c + 32h + i
    high = _bits(b[..., 16:48], range(8), 1)  # [R, nb, 8, 32]: bit k of qh[i] is weight 32k + i's
    codes = (low.reshape(high.shape) | (high << 4)).astype(np.int8)
    sc, m = _k_scales(b[..., 4:16])
    return (QFormat(bits=8, group=32, ratio=8, name="Q5_K"),
            dict(codes=codes, scale=_f16(b, 0), sub=sc, min=-_f16(b, 2), msub=m))


def _q6_k(b):  # block_q6_K: ql u8[128], qh u8[64], scales i8[16], d f16
    lead = b.shape[:-1]
    low = _nibbles(b[..., :128].reshape(*lead, 2, 64))  # [R, nb, 2, 2, 64]: weight 128h + 64n + i
    high = _bits(b[..., 128:192].reshape(*lead, 2, 32), (0, 2, 4, 6), 3)  # [R, nb, 2, 4, 32]: 128h + 32k + i
    codes = (low.reshape(*lead, 256) | (high.reshape(*lead, 256) << 4)).astype(np.int8) - np.int8(32)
    return (QFormat(bits=8, group=16, ratio=16, name="Q6_K"),
            dict(codes=codes, scale=_f16(b, 208), sub=b[..., 192:208].view(np.int8)))


def _q3_k(b):  # block_q3_K: hmask u8[32], qs u8[64], scales u8[12], d f16
    lead = b.shape[:-1]
    low = _bits(b[..., 32:96].reshape(*lead, 2, 32), (0, 2, 4, 6), 3)  # [R, nb, 2, 4, 32]: 128h + 32k + i
    high = _bits(b[..., :32], range(8), 1)  # [R, nb, 8, 32]: weight 32k + i's bit; clear means -4
    codes = (low.reshape(*lead, 256) | (high.reshape(*lead, 256) << 2)) + np.uint8(4)  # value + 8
    # 6-bit scales: low nibbles of bytes 0-7 (0-7) then their high nibbles (8-15); 2-bit tops from bytes 8-11.
    sc = _nibbles(b[..., 96:104]).reshape(*lead, 16) | (_bits(b[..., 104:108], (0, 2, 4, 6), 3).reshape(*lead, 16) << 4)
    return (QFormat(bits=4, group=16, zero=8, ratio=16, name="Q3_K"),
            dict(codes=pack_nibbles(codes), scale=_f16(b, 108), sub=sc.astype(np.int8) - np.int8(32)))


def _q2_k(b):  # block_q2_K: scales u8[16] (sc | m << 4), qs u8[64], d f16, dmin f16
    lead = b.shape[:-1]
    q = _bits(b[..., 16:80].reshape(*lead, 2, 32), (0, 2, 4, 6), 3)  # [R, nb, 2, 4, 32]: 128h + 32k + i
    scales = b[..., :16]
    return (QFormat(bits=4, group=16, ratio=16, name="Q2_K"),
            dict(codes=pack_nibbles(q.reshape(*lead, 256)), scale=_f16(b, 80), sub=scales & 0xF,
                 min=-_f16(b, 82), msub=scales >> 4))


_CONVERT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
