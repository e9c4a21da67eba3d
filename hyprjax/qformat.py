"""How a quantized matrix is laid out on the device: one format for int8, int4 and GGUF's blocks.

A quantized linear layer stores its weight **transposed**, `[dout, din]`, so that each output
channel is one contiguous row (the same as an embedding's `[V, D]` rows, which a tied LM head
multiplies). Weight `w[o, k]` is rebuilt from up to five arrays:

    v[o, k]  = codes[o, k]                      bits 8: int8 codes
             = nibble(codes, o, k) - zero       bits 4: two 4-bit codes per byte (below)
    s[o, g]  = scale[o, g // ratio] * sub[o, g]    (sub absent: * 1)
    m[o, g]  = min[o, g // ratio] * msub[o, g]     (min absent: 0; msub absent: * 1)
    w[o, k]  = s[o, g] * v[o, k] + m[o, g]      with g = k // group

`QFormat` holds the static part (bits, group, zero, ratio). Every GGUF block type maps onto this
losslessly (hyprjax/formats/gguf_blocks.py): Q8_0 is int8 codes with an f16 scale per 32; Q4_0
4-bit codes, zero 8, an f16 scale per 32; Q4_K 4-bit codes with an f16 `scale` and `min` per
256-weight super-block (ratio 8) times 6-bit integer `sub`/`msub` per 32; Q6_K int8 codes with an
f16 scale per 256 times an int8 `sub` per 16; and so on. Keeping the super-block factorisation
(rather than one float per group) is what keeps Q4_K at 4.6 bits per weight on the device
instead of 6, and exact: an f16 times a small integer is exact in float32.

`--quantization int8` is bits 8 with one float32 scale per output channel (group = din);
`int4` is bits 4 with an f16 scale and minimum per group of 32 (below: why); `keep` of an
F16/BF16 GGUF tensor is bits 16: the half floats themselves, with a unit float32 scale per row
(so every quantized matrix has a `scale`: the one marker that its kernel is stored transposed,
hyprjax/sharding.py).

4-bit packing is GGML's own (Q4_0's): in each block of 32 weights, byte j holds weight j in its
low nibble and weight j + 16 in its high nibble. A Q4_0 row is therefore its own codes, and
unpacking is two shifts and one concatenation per 32 weights, no interleave.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NIBBLE_BLOCK = 32  # weights per packing block of 4-bit codes (16 bytes)
FIELDS = ("codes", "scale", "sub", "min", "msub")


@dataclass(frozen=True)
class QFormat:
    """The static half of a quantized matrix (module docstring)."""

    bits: int  # 8: int8 codes; 4: packed 4-bit codes; 16: f16/bf16 values (a unit scale)
    group: int  # weights along din per scale group
    zero: int = 0  # subtracted from each 4-bit code (8: a signed code)
    ratio: int = 1  # groups per `scale`/`min` entry (GGUF K-quants' super-blocks); sub/msub per group
    name: str = ""  # what it came from, for messages and `info` ("int8", "Q4_K", ...)

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise ValueError(f"QFormat bits={self.bits}: expected 4, 8 or 16")
        if self.bits == 4 and self.group % 16:
            raise ValueError(f"QFormat: 4-bit groups must be multiples of 16, got {self.group}")

    def code_shape(self, dout: int, din: int) -> tuple[int, int]:
        return (dout, din // 2) if self.bits == 4 else (dout, din)

    def din(self, codes_shape) -> int:
        """The matrix's input width from its codes' shape."""
        return codes_shape[-1] * 2 if self.bits == 4 else codes_shape[-1]


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """4-bit codes u8[..., din] (values 0..15, din % 32 == 0) -> bytes u8[..., din // 2]."""
    u = np.asarray(u, np.uint8)
    blocks = u.reshape(*u.shape[:-1], -1, 2, NIBBLE_BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*u.shape[:-1], -1)


def unpack_nibbles(b):
    """Bytes u8[..., din // 2] -> 4-bit codes u8[..., din] (jnp or numpy alike)."""
    xp = np if isinstance(b, np.ndarray) else jnp
    blocks = b.reshape(*b.shape[:-1], -1, NIBBLE_BLOCK // 2)
    both = xp.stack([blocks & 0xF, blocks >> 4], axis=-2)
    return both.reshape(*b.shape[:-1], -1)


def values(fmt: QFormat, codes):
    """The integer values v (int8 or the f16/bf16 floats for bits 16) of a codes array."""
    if fmt.bits == 4:
        u = unpack_nibbles(codes)
        xp = np if isinstance(codes, np.ndarray) else jnp
        return u.astype(xp.int8) - xp.int8(fmt.zero) if fmt.zero else u.astype(xp.int8)
    return codes


def group_scales(fmt: QFormat, q: dict, dtype=jnp.float32):
    """(s f[..., G], m f[..., G] or None): the per-group scale and offset of `q` (module docstring)."""
    s = q["scale"].astype(dtype)
    if fmt.ratio > 1:
        s = jnp.repeat(s, fmt.ratio, axis=-1)
    if q.get("sub") is not None:
        s = s * q["sub"].astype(dtype)
    m = q.get("min")
    if m is not None:
        m = m.astype(dtype)
        if fmt.ratio > 1:
            m = jnp.repeat(m, fmt.ratio, axis=-1)
        if q.get("msub") is not None:
            m = m * q["msub"].astype(dtype)
    return s, m


def dequantize(fmt: QFormat, q: dict, dtype=jnp.float32) -> jax.Array:
    """The matrix f[..., dout, din] that `q` (a dict of FIELDS) stands for: the reference every
    packed matmul is tested against, and the jnp path's dequantize-then-dot."""
    v = values(fmt, jnp.asarray(q["codes"])).astype(dtype)
    s, m = group_scales(fmt, q, dtype)
    lead, din = v.shape[:-1], v.shape[-1]
    vg = v.reshape(*lead, din // fmt.group, fmt.group)
    w = vg * s[..., None]
    if m is not None:
        w = w + m[..., None]
    return w.reshape(*lead, din)


def nbytes(q: dict) -> int:
    """Device bytes of a quantized matrix's arrays."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in q.values() if a is not None)


# ---------------------------------------------------------------------------------------------
# Quantizing float weights at load (`--quantization int8|int4`): weight-only.
#
# int8: symmetric, one float32 scale per row (max |w| / 127), as AQT/qwix do.
# int4: asymmetric, a group of 32 weights per f16 scale and f16 minimum (w = s * code + min,
# codes 0..15: GGML's Q4_0/Q4_1 block, and llama.cpp's legacy 4-bit layout). Why not qwix's
# symmetric group of 128: on the default model (SmolLM2-135M, whose file is Q4_1) perplexity rose
# +58-65% with groups of 128 (symmetric or not) and +0.15% with asymmetric groups of 32 (the
# embedding int8 in each case; measured with fake-quantized weights, 4,088 tokens). The embedding
# and the LM head stay int8 under int4, as llama.cpp's Q4_K_M keeps its output at Q6_K: an int4
# embedding cost another +5.8% there. 5 bits a weight on the device.

INT4_GROUP = 32


def int8_format(din: int) -> QFormat:
    return QFormat(bits=8, group=din, name="int8")


def int4_group(din: int) -> int | None:
    """32, or None when din is no multiple of 32 (the 4-bit packing's block): such a matrix stays int8."""
    return INT4_GROUP if din % INT4_GROUP == 0 else None


def int4_format(din: int) -> QFormat:
    return QFormat(bits=4, group=INT4_GROUP, name="int4")


@jax.jit
def _quantize_int8(w):
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(w / scale[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale[..., None].astype(jnp.float32)


@jax.jit
def _quantize_int4(w):
    lead, din = w.shape[:-1], w.shape[-1]
    wg = w.reshape(*lead, din // INT4_GROUP, INT4_GROUP)
    lo, hi = jnp.min(wg, axis=-1), jnp.max(wg, axis=-1)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(jnp.float16)  # stored f16: codes use it so
    low = lo.astype(jnp.float16)
    u = jnp.clip(jnp.round((wg - low[..., None].astype(jnp.float32)) / scale[..., None].astype(jnp.float32)), 0, 15)
    blocks = u.astype(jnp.uint8).reshape(*lead, din // NIBBLE_BLOCK, 2, NIBBLE_BLOCK // 2)
    codes = (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*lead, din // 2)
    return codes, scale, low


def quantize_rows(w, mode: str) -> tuple[QFormat, dict]:
    """Rows of a float matrix w[..., dout, din] (output channels, or embedding rows) quantized
    to `mode` "int8" or "int4" (above): (format, {"codes", "scale"[, "min"]})."""
    w = jnp.asarray(w, jnp.float32)
    din = w.shape[-1]
    if mode == "int4" and int4_group(din) is not None:
        codes, scale, low = _quantize_int4(w)
        return int4_format(din), dict(codes=codes, scale=scale, min=low)
    if mode in ("int8", "int4"):
        codes, scale = _quantize_int8(w)
        return int8_format(din), dict(codes=codes, scale=scale)
    raise ValueError(f"quantize_rows: mode {mode!r}")
