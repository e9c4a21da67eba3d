"""Weight-only int8 quantization: the weights stay int8 on the device, the math runs in float32.

`--quantization int8` (and `hyprjax.LLM(..., quantization="int8")`) quantizes every linear
layer and the embedding after loading: symmetric, one float32 scale per output channel
(`q = round(w / s)`, `s = max|w| / 127` over the input dimension), as AQT/qwix do for
weight-only int8. The LM head of a tied model runs from the quantized embedding.

Layout. A quantized kernel is stored **transposed**, `q i8[..., dout, din]` with `qscale
f32[..., dout]`, so every output channel's weights are one contiguous row, the same as the
embedding's `[V, D]` rows (which the tied head multiplies).

Why it is fast on CPU (docs/cpu.md has the numbers). Decoding one token is a matrix-vector
product: it reads every weight once and does almost no arithmetic, so time is bytes. XLA:CPU
emits `x @ convert(q).T` with one row of `x` and the contraction over q's minor dimension as
one loop that converts each int8 as it reads it, so the step reads 1 byte per weight instead
of 4: the 152k x 1024 head of Qwen3-0.6B takes 3.7 ms in int8 against 12.7 ms in float32 (2-core
EPYC). Written any other way (`dot_general` on `[din, dout]`, an explicit multiply-reduce)
XLA first converts the whole matrix or runs a slow reduction: 20-80x slower. With more than
one row (batched decode, prefill) `x @ convert(q).T` would again convert the whole matrix
first, so `qdot` walks the output channels in blocks of ~2M weights (a scan): each block is
converted into a cache-sized tile and multiplied by the library GEMM. The tile is float32, or,
on CPUs with AMX, bfloat16 against x split into three bf16 terms (`bf16_gemm`): exact for int8
weights, float32 precision for x, and 1.5-2.5x faster than the float32 tile there (docs/cpu.md).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from .errors import HyprjaxError

log = logging.getLogger("hyprjax")

MODES = ("auto", "none", "int8")
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
BLOCK_WEIGHTS = 1 << 21  # weights converted per scan step when x has more than one row (~8 MB f32)


def check_mode(mode: str | None) -> str:
    mode = "none" if mode is None else mode
    if mode not in MODES:
        raise HyprjaxError(f"quantization={mode!r} is not supported: choose one of {', '.join(MODES)}")
    return mode


def resolve_mode(mode: str, weights) -> str:
    """`auto` -> "int8" when the file's matrices are quantized GGUF blocks (Q8_0, Q4_K, ...) and
    the backend is CPU, else "none". A quantized file stays quantized instead of growing to
    float32 (Gemma 3 270M Q4_K_M: 1,022 MiB of float32 parameters, 4x less as int8), and on CPU
    int8 also decodes faster (docs/cpu.md). Float files (F16/BF16/F32, SafeTensors) stay float:
    their numbers are kept exactly. GPU/TPU keep float until the fused int8 matmul is verified
    there (issue 14)."""
    mode = check_mode(mode)
    if mode != "auto":
        return mode
    types = getattr(weights, "type_name", None)
    packed = set() if types is None else {types(n) for n in weights.names() if len(weights.shape(n)) == 2}
    packed -= FLOAT_TYPES
    mode = "int8" if packed and jax.default_backend() == "cpu" else "none"
    log.info("quantization auto -> %s (%s weights on %s)", mode, "/".join(sorted(packed)) or "float",
             jax.default_backend())
    return mode


@jax.jit
def quantize_rows(w) -> tuple[jax.Array, jax.Array]:
    """w f[..., rows, cols] -> (q i8[..., rows, cols], scale f32[..., rows]): one scale per row
    (an output channel of a transposed kernel, a token of the embedding)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


@jax.jit
def quantize_kernel(kernel) -> tuple[jax.Array, jax.Array]:
    """A Linear kernel f[..., din, dout] -> (q i8[..., dout, din], scale f32[..., dout]); one
    program, so loading never holds a transposed float copy of the kernel."""
    return quantize_rows(jnp.swapaxes(kernel, -1, -2))


def dequantize(q, scale) -> jax.Array:
    """f32 rows of a quantized matrix (reference and embedding lookup)."""
    return q.astype(jnp.float32) * scale[..., None]


def qdot(x, q, scale) -> jax.Array:
    """x f[..., din] @ the quantized matrix q i8[dout, din] (scale f32[dout]) -> f32[..., dout]."""
    lead, din = x.shape[:-1], x.shape[-1]
    dout = q.shape[0]
    rows = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(rows, din).astype(jnp.float32)
    if rows == 1:  # one fused convert-and-dot loop (module docstring)
        y = (_materialized(x2) @ q.astype(jnp.float32).T) * scale
        return y.reshape(*lead, dout)
    blk = _block_rows(dout, din)
    nb = dout // blk
    if bf16_gemm():  # int8 -> bf16 is exact; x as three bf16 terms keeps float32 precision
        terms = _bf16_terms(x2)

        def body(_, qs):
            qb, sb = qs
            y = lax.dot_general(terms, qb.astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32).reshape(SPLIT_TERMS, rows, blk)
            return None, (y[2] + y[1] + y[0]) * sb
    else:
        def body(_, qs):
            qb, sb = qs
            return None, (x2 @ qb.astype(jnp.float32).T) * sb

    _, y = lax.scan(body, None, (q.reshape(nb, blk, din), scale.reshape(nb, blk)))  # [nb, rows, blk]
    return jnp.moveaxis(y, 0, 1).reshape(*lead, dout)


SPLIT_TERMS = 3


@functools.cache
def bf16_gemm() -> bool:
    """Whether multi-row int8 dots run as bfloat16 GEMMs (x split into three bf16 terms) instead
    of float32 ones: on CPUs with AMX (`amx_bf16`), where XLA:CPU's bf16 GEMM is several times
    its float32 one (docs/cpu.md). `HYPRJAX_BF16_GEMM=1|0` forces it either way."""
    forced = os.environ.get("HYPRJAX_BF16_GEMM")
    if forced in ("0", "1"):
        return forced == "1"
    if jax.default_backend() != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def _bf16_terms(x):
    """x f32[rows, din] -> bf16[3 * rows, din], three terms whose sum is x to float32 precision
    (each takes the rounding error of the ones before: 8 + 8 + 8 significant bits >= float32's
    24). Against an int8 (or bf16) weight, exact in bfloat16, the three products summed in
    float32 equal the float32 product to rounding: measured max error 2-4e-7 of the largest
    output, vs 2e-3 with one bf16 term."""
    terms, rest = [], x
    for _ in range(SPLIT_TERMS):
        t = rest.astype(jnp.bfloat16)
        terms.append(t)
        rest = rest - t.astype(jnp.float32)
    return jnp.concatenate(terms, axis=0)


def _materialized(x):
    """x, computed into its own buffer before the dot.

    XLA fuses x's elementwise producers into the one-row dot's loop, which then recomputes them
    for every output row: the attention epilogue (a divide per element) before o_proj, SiLU * up
    before down_proj. Measured on a [1024, 2048] int8 o_proj: 577 us fused, 136 us with x
    materialized; a Qwen3-0.6B decode layer's o_proj + down went from ~1 ms to ~0.3 ms.
    `optimization_barrier` does not stop this (XLA:CPU drops it before fusing), nor do reshapes,
    `reduce_precision` or max(x, x); a sum over [x, 0] is a reduction, which ends a fusion.
    """
    return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0)


def _block_rows(dout: int, din: int) -> int:
    """The largest divisor of dout whose block holds at most BLOCK_WEIGHTS weights (at least 1 row)."""
    want = max(1, BLOCK_WEIGHTS // max(din, 1))
    if want >= dout:
        return dout
    for blk in range(want, 0, -1):
        if dout % blk == 0:
            return blk
    return 1


def device_bytes(cfg, mode: str, dtype_bytes: int = 4) -> int:
    """Parameter bytes on the device of a model of `cfg` with weights in `mode` ("none" or "int8";
    floats of `dtype_bytes`), from the name table alone: int8 matrices take a byte per weight plus
    a float32 scale per output channel (per token for the embedding)."""
    from .formats.names import tensor_table

    total = 0
    for spec in tensor_table(cfg):
        n = int(np.prod(spec.shape))
        packed = mode == "int8" and len(spec.shape) == 2 and spec.path[-1] in ("kernel", "embedding")
        if packed:
            channels = spec.shape[0] if spec.path[-1] == "embedding" else spec.shape[1]  # [V, D] / [din, dout]
            total += n + 4 * channels
        else:
            total += n * dtype_bytes
    return total


def quantize_model(model, mode: str) -> None:
    """Quantize `model`'s linear layers and embedding in place (`mode` "int8"); "none" does nothing.

    Each float kernel is replaced as soon as its int8 copy exists, so the float model is freed
    one matrix at a time and peak memory is the float model plus one int8 matrix.
    """
    from .model import Linear  # the model imports this module

    if check_mode(mode) == "none":
        return
    linears = [node for _, node in nnx.iter_graph(model) if isinstance(node, Linear) and node.qscale is None]
    for module in linears:
        module.quantize()
    model.quantize_embedding()
