"""Weight-only quantization at run time: which mode, and the quantized matmul `qdot`.

Modes (`--quantization`, `hyprjax.LLM(..., quantization=)`):

  * `none`: float weights as loaded.
  * `int8`: every linear layer and the embedding quantized at load, symmetric, one float32 scale
    per output channel (per token for the embedding), as AQT/qwix do for weight-only int8.
  * `int4`: 4-bit codes with an f16 scale and minimum per group of 32 input weights (the
    embedding and LM head stay int8; qformat.py has the measurements behind both choices).
  * `keep`: a GGUF's own blocks stay packed on the device (Q8_0, Q4_0, Q4_K, Q6_K, ...), converted
    losslessly to the one layout of hyprjax/qformat.py; F16/BF16 tensors stay half floats.
  * `keep8`: `keep` with 4-bit codes widened to int8 codes (same scales, still exact).
  * `auto` (the default of LLM and the CLI): for a file of quantized blocks, `int8` on CPU (the
    fastest to decode there: docs/cpu.md, README) and `keep` on GPU/TPU; else `none`.

The layout (hyprjax/qformat.py): a quantized matrix is stored transposed, codes `[dout, din]`,
with per-group scales. The LM head of a tied model runs from the quantized embedding.

Why this is fast on CPU (docs/cpu.md has the numbers). Decoding one token is a matrix-vector
product: it reads every weight once and does almost no arithmetic, so time is bytes. XLA:CPU
emits `x @ dequantize(q).T` with one row of `x` as one loop that converts each int8 code (and
multiplies its group's scale) as it reads it, so the step reads ~1 byte per weight instead of 4:
a [3072, 1024] matrix takes 0.25 ms with int8 codes (per-channel or grouped) against 0.41-0.57 ms
in float32. 4-bit codes do not vectorize in that loop (1.5 ms: XLA emits the nibble unpack per
element), and K-quant sub-scales cost a multiply per weight, which is why `auto` picks int8 on
CPU. With a few rows (batched decode, verify steps) x is split into three int8 terms and the
product runs as one int32-accumulating GEMM on the codes (`_int8_dot`: float32 precision, about
half the scan below at 2-4 rows). With more rows (prefill) the expression `x @ dequantize(q).T`
would first convert the whole matrix, so `qdot` walks the output
channels in blocks of ~2M weights (a scan): each block is dequantized into a cache-sized tile and
multiplied by the library GEMM. For per-channel int8 on CPUs with AMX the tile is bfloat16
against x split into three bf16 terms (`bf16_gemm`): exact for int8 codes, float32 precision
for x, 1.5-2.5x faster than the float32 tile there.

On GPU/TPU `qdot` is `x @ dequantize(q).T` in x's dtype for XLA to fuse (and for GSPMD to
partition under tensor parallelism); `HYPRJAX_QMATMUL=pallas` runs the Pallas kernel of kernels/qmatmul.py instead
(the codes dequantized tile by tile in registers/VMEM). The kernel passes its interpret-mode and
lowering tests, but has not yet been timed on a GPU (bench/gpu_quant.py does that), so it is not
the default.
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

from .errors import ConfigError, HyprjaxError
from .qformat import QFormat, dequantize, quantize_rows

log = logging.getLogger("hyprjax")

MODES = ("auto", "none", "int8", "int4", "keep", "keep8")
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
BLOCK_WEIGHTS = 1 << 21  # weights converted per scan step when x has more than one row (~8 MB f32)


def check_mode(mode: str | None) -> str:
    mode = "none" if mode is None else mode
    if mode not in MODES:
        raise HyprjaxError(f"quantization={mode!r} is not supported: choose one of {', '.join(MODES)}")
    return mode


def resolve_mode(mode: str, weights) -> str:
    """`auto` -> the mode for this file here: when the file's matrices are quantized GGUF blocks
    (Q8_0, Q4_K, ...), "int8" on CPU (re-quantized per channel: the fastest to decode there, 1.5x
    `keep8` on Q4_K_M, README) and "keep" on GPU/TPU (the blocks themselves, exact); else "none".
    A quantized file stays quantized instead of growing to float32 (Gemma 3 270M Q4_K_M: 1,022 MiB
    as float32). Float files (F16/BF16/F32, SafeTensors) stay float: their numbers are kept exactly."""
    mode = check_mode(mode)
    if mode != "auto":
        return mode
    types = getattr(weights, "type_name", None)
    packed = set() if types is None else {types(n) for n in weights.names() if len(weights.shape(n)) == 2}
    packed -= FLOAT_TYPES
    if not packed:
        mode = "none"
    else:
        mode = "int8" if jax.default_backend() == "cpu" else "keep"
    log.info("quantization auto -> %s (%s weights on %s)", mode, "/".join(sorted(packed)) or "float",
             jax.default_backend())
    return mode


def qdot(x, fmt: QFormat, q: dict) -> jax.Array:
    """x f[..., din] @ the quantized matrix (fmt, q) of shape [dout, din] -> f32[..., dout]."""
    lead, din = x.shape[:-1], x.shape[-1]
    dout = q["codes"].shape[0]
    rows = int(np.prod(lead)) if lead else 1
    if jax.default_backend() != "cpu":
        return accelerator_qdot(x.reshape(rows, din), fmt, q).reshape(*lead, dout)
    x2 = x.reshape(rows, din).astype(jnp.float32)
    per_channel = _per_channel(fmt, q, din)
    if rows == 1:  # one fused dequantize-and-dot loop (module docstring)
        if per_channel:  # the scale after the dot: one multiply per output, not per weight
            y = (_materialized(x2) @ q["codes"].astype(jnp.float32).T) * q["scale"][:, 0]
        else:
            y = _materialized(x2) @ dequantize(fmt, q).T
        return y.reshape(*lead, dout)
    if per_channel and 1 < rows <= INT8_ROWS and rows * dout <= INT8_OUTPUTS:
        return _int8_dot(x2, q).reshape(*lead, dout)
    blk = _block_rows(dout, din)
    nb = dout // blk
    if per_channel and bf16_gemm():  # int8 -> bf16 is exact; x as three bf16 terms keeps float32 precision
        terms = _bf16_terms(x2)

        def body(_, qb):
            y = lax.dot_general(terms, qb["codes"].astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32).reshape(SPLIT_TERMS, rows, blk)
            return None, (y[2] + y[1] + y[0]) * qb["scale"][:, 0]
    else:
        def body(_, qb):
            return None, x2 @ dequantize(fmt, qb).T

    blocks = {k: v.reshape(nb, blk, *v.shape[1:]) for k, v in q.items() if v is not None}
    _, y = lax.scan(body, None, blocks)  # [nb, rows, blk]
    return jnp.moveaxis(y, 0, 1).reshape(*lead, dout)


def check_qmatmul_mesh(mesh, model) -> None:
    """ConfigError when HYPRJAX_QMATMUL=pallas meets a quantized model sharded over several
    devices: GSPMD cannot partition a Pallas call (on TPU lowering fails, "Mosaic kernels cannot
    be automatically partitioned"; on GPU every device would gather whole matrices)."""
    if os.environ.get("HYPRJAX_QMATMUL") != "pallas" or mesh is None or mesh.size <= 1 or not is_quantized(model):
        return
    raise ConfigError(f"HYPRJAX_QMATMUL=pallas runs the quantized matmul kernel on one device, and this model is "
                      f"sharded over {mesh.size}; unset it to use XLA's quantized matmul, which shards")


def accelerator_qdot(x2, fmt: QFormat, q: dict):
    """GPU/TPU: f32[rows, dout] = x2 @ dequantize(q).T, by XLA or the Pallas kernel.

    x2 keeps its dtype: a bfloat16 (or float16) x multiplies the matrix dequantized in float32
    and rounded once to x's dtype, as a float model of that dtype holds its weights, with float32
    accumulation, so the dot runs on the tensor cores/MXU and XLA can fuse the dequantize into it
    (not yet seen on a device: bench/gpu_quant.py's HLO check lowers this function). Per-channel
    int8 codes are exact in bfloat16, so there the codes go into the dot and the scale multiplies
    its output: the weights are not rounded at all. A float32 x keeps float32 weights.

    HYPRJAX_QMATMUL=pallas runs kernels/qmatmul.py instead, on one device only (the engine
    refuses it under tensor parallelism: a Pallas call cannot be partitioned by GSPMD); a shape
    the kernel does not take (an output size without 16 as a power-of-two factor, as odd
    vocabularies have) falls back to XLA, logged when the step is traced.
    """
    if os.environ.get("HYPRJAX_QMATMUL", "xla") == "pallas":
        from .kernels.qmatmul import qmatmul

        try:
            return qmatmul(x2, fmt, q)
        except NotImplementedError as e:
            log.warning("HYPRJAX_QMATMUL=pallas: %s; this [%d x %d] matrix runs through XLA", e,
                        q["codes"].shape[0], x2.shape[1])
    half = x2.dtype in (jnp.bfloat16, jnp.float16)
    x2 = x2 if half else x2.astype(jnp.float32)
    contract = (((1,), (1,)), ((), ()))
    if half and _per_channel(fmt, q, x2.shape[1]):  # int8 codes are exact in x's dtype: scale after the dot
        y = lax.dot_general(x2, q["codes"].astype(x2.dtype), contract, preferred_element_type=jnp.float32)
        return y * q["scale"][:, 0].astype(jnp.float32)
    w = dequantize(fmt, q)
    return lax.dot_general(x2, w.astype(x2.dtype) if half else w, contract, preferred_element_type=jnp.float32)


def _per_channel(fmt: QFormat, q: dict, din: int) -> bool:
    """One scale per output channel over 8-bit codes (the `int8` mode's matrices)."""
    return fmt.bits == 8 and fmt.group == din and q.get("sub") is None and q.get("min") is None


SPLIT_TERMS = 3
# a few rows (batched decode, verify steps) of a per-channel int8 matrix: `_int8_dot`;
# HYPRJAX_INT8_ROWS=0 turns it off (to measure side by side)
INT8_ROWS = int(os.environ.get("HYPRJAX_INT8_ROWS", "8"))
INT8_OUTPUTS = 1 << 17  # ... while rows * dout stays under this (measured crossover, `_int8_dot`)


def _int8_dot(x, q):
    """x f32[rows, din] @ per-channel int8 (codes, scale).T for a few rows, as integer GEMMs.

    x is split into three int8 terms with one scale per row each (each term quantizes the
    rounding error of the ones before: 3 x 7 bits, measured max error 9e-7 of the largest
    output, like float32 accumulation), and the [3 * rows, din] x [din, dout] int8 product
    accumulates exactly in int32. XLA:CPU runs it as one library GEMM that reads the codes once,
    where the block scan below converts every code to a float first. Measured on 2 cores (a
    SmolLM2-135M layer's seven matrices, per-channel int8): 2/4/8 rows 468/506/775 us against
    1000/991/1200 us for the scan, one row 375 us (the fused loop). It stops paying when
    3 * rows * dout grows: a [49152, 576] LM head gains at 2 rows (3.1 vs 4.5 ms), ties at 4 and
    loses at 8 (8.1 vs 4.9 ms), so `INT8_OUTPUTS` bounds rows * dout.

    Rounding has no derivative, so the backward pass (training on a quantized base) is the
    float product's: dx = (g * scale) @ codes.
    """
    return _int8_forward(x, q["codes"], q["scale"])


@jax.custom_vjp
def _int8_forward(x, codes, scale):
    rows = x.shape[0]
    terms, scales, rest = [], [], x
    for _ in range(SPLIT_TERMS):
        s = jnp.max(jnp.abs(rest), axis=1, keepdims=True) / 127.0
        s = jnp.where(s == 0, 1.0, s)  # an all-zero row; a NaN row keeps its NaN scale
        t = jnp.round(rest / s)
        terms.append(t.astype(jnp.int8))
        scales.append(s)
        rest = rest - t * s
    y = lax.dot_general(jnp.concatenate(terms), codes, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.int32)
    y = y.astype(jnp.float32) * jnp.concatenate(scales)
    return y.reshape(SPLIT_TERMS, rows, -1).sum(axis=0) * scale[:, 0]


def _int8_fwd(x, codes, scale):
    return _int8_forward(x, codes, scale), (codes, scale)


def _int8_bwd(res, g):
    codes, scale = res
    return (g * scale[:, 0]) @ codes.astype(jnp.float32), None, None


_int8_forward.defvjp(_int8_fwd, _int8_bwd)


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




def device_bytes(cfg, mode: str, dtype_bytes: int = 4, weights=None) -> int:
    """Parameter bytes on the device of a model of `cfg` with weights in `mode` (floats of
    `dtype_bytes`), from the name table and, for `keep`/`keep8`, one row of each GGUF matrix
    (`weights`): what `hyprjax info --memory` prints. With stacked layers (GPU/TPU) a GGUF that
    mixes block types within one module takes more (formats/load_packed.py: `common`)."""
    from .formats.load_packed import KEEP_MODES, PACKED_MODES, is_packed, matrix_mode
    from .formats.names import tensor_table
    from .qformat import int4_group

    if mode in KEEP_MODES and weights is None:
        raise HyprjaxError(f"device bytes for quantization={mode!r} need the GGUF file")
    total = 0
    for spec in tensor_table(cfg):
        n = int(np.prod(spec.shape))
        if mode not in PACKED_MODES or not is_packed(spec):
            total += n * dtype_bytes
            continue
        dout = spec.shape[0] if spec.path[-1] == "embedding" else spec.shape[1]
        din = n // dout
        if mode in KEEP_MODES:
            total += _kept_bytes(weights, spec.gguf, dout, din, mode, dtype_bytes)
        elif matrix_mode(spec, mode) == "int4" and int4_group(din):
            total += n // 2 + 4 * dout * (din // int4_group(din))  # f16 scale and min per group
        else:
            total += n + 4 * dout
    return total


def _kept_bytes(weights, name: str, dout: int, din: int, mode: str, dtype_bytes: int) -> int:
    from .formats.gguf_blocks import to_packed
    from .formats.load_packed import widen

    if weights.type_name(name) == "F32":
        return dout * din * dtype_bytes
    fmt, q = to_packed(weights.type_name(name), weights.raw(name, (0, 1)), (1, din))
    if mode == "keep8":
        fmt, q = widen(fmt, q)
    row = sum(np.asarray(v).nbytes for v in q.values() if v is not None)
    return dout * row


def is_quantized(model) -> bool:
    """Whether any matrix or the embedding of `model` sits quantized on the device (any mode but
    none: int8, int4, keep, keep8)."""
    return any(getattr(node, "qfmt", None) is not None for _, node in nnx.iter_graph(model))


def quantize_model(model, mode: str) -> None:
    """Quantize a float model already in memory, in place, to `mode` "int8" or "int4" (loading
    packs as it reads instead: formats/load_packed.py). Stacked [L, ...] kernels quantize as one
    array per module; each float matrix is dropped as soon as its codes exist."""
    from .model import Linear, set_quantized

    if mode not in ("int8", "int4"):
        raise HyprjaxError(f"quantize_model: mode {mode!r} (int8 or int4)")
    linears = [node for _, node in nnx.iter_graph(model) if isinstance(node, Linear) and node.qfmt is None]
    for module in linears:  # under int4 the LM head and embedding stay int8 (qformat.py)
        fmt, q = quantize_rows(jnp.swapaxes(module.kernel[...], -1, -2), "int8" if module is model.lm_head else mode)
        set_quantized(module, "kernel", fmt, q)
    fmt, q = quantize_rows(model.embed.embedding[...], "int8")
    set_quantized(model.embed, "embedding", fmt, q)
