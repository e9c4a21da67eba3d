"""Loading matrices straight into their quantized form (`--quantization int8|int4|keep|keep8`).

Each linear weight and the embedding is read and packed one tensor (or row chunk) at a time, so
the float model never exists in memory: `keep` converts the GGUF's stored blocks losslessly
(formats/gguf_blocks.py), `int8`/`int4` quantize the float rows on the device (qformat.py).
Everything else (norms, biases, F32 matrices under `keep`) loads as floats, as before.

With stacked layers (GPU/TPU) one parameter holds every layer, so every layer's matrix must share
one format. Mixed GGUF files (Q4_K_M keeps some layers' attn_v and ffn_down in Q6_K) are then
brought to one common format per module (`common`): int8 codes with one float32 scale (and
offset) per group of the smallest group. Exact, but larger than either source type: only the
stacked (GPU/TPU) layout pays it; CPU keeps one array per layer and each its own type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..errors import HyprjaxError
from ..qformat import QFormat, group_scales, quantize_rows, values
from .gguf_blocks import to_packed
from .gguf_read import GGUFFile
from .names import TensorSpec

KEEP_MODES = ("keep", "keep8")
PACKED_MODES = ("int8", "int4", *KEEP_MODES)
CHUNK_WEIGHTS = 16 << 20  # weights read and packed per step of a large tensor (an embedding)


def is_packed(spec: TensorSpec) -> bool:
    """Whether `spec` is a matrix the quantized modes pack: linear kernels and the embedding."""
    return len(spec.shape) == 2 and spec.path[-1] in ("kernel", "embedding")


def matrix_mode(spec: TensorSpec, mode: str) -> str:
    """The mode a matrix is quantized to: under int4 the embedding and the LM head stay int8
    (qformat.py: the measurements behind it)."""
    if mode == "int4" and spec.path[0] in ("embed", "lm_head"):
        return "int8"
    return mode


def check_source(mode: str, weights) -> None:
    if mode in KEEP_MODES and not isinstance(weights, GGUFFile):
        raise HyprjaxError(f"quantization={mode!r} keeps a GGUF file's own blocks; this model is SafeTensors: "
                           f"use int8 or int4 (quantized at load), or --dtype bfloat16")


def read_packed(spec: TensorSpec, weights, cfg: ModelConfig, mode: str, read_float, permute) -> tuple | None:
    """(fmt, q) of the matrix `spec` in `mode`, q a dict of device arrays; None when `keep` finds
    an F32 tensor (it loads as floats). `read_float(rows)` reads float rows [dout, din] of the
    tensor in the file's row order; `permute(array)` reorders rows as the loader does (Llama q/k
    in GGUF)."""
    rows_total = spec.shape[0] if spec.path[-1] == "embedding" else spec.shape[1]
    din = spec.shape[1] if spec.path[-1] == "embedding" else spec.shape[0]
    step = max(1, CHUNK_WEIGHTS // din)
    if permute is not None and step < rows_total:
        step = max(cfg.head_dim, step - step % cfg.head_dim)
    kind = weights.type_name(spec.gguf) if mode in KEEP_MODES else None
    if kind == "F32":
        return None
    parts = []
    for r0 in range(0, rows_total, step):
        rows = (r0, min(rows_total, r0 + step))
        if kind is not None:  # F16/BF16 come with a unit scale: the marker of a transposed matrix
            fmt, q = to_packed(kind, weights.raw(spec.gguf, rows), (rows[1] - rows[0], din))
            if mode == "keep8":
                fmt, q = widen(fmt, q)
            q = {k: v for k, v in q.items() if v is not None}
            if permute is not None:
                q = {k: permute(v) for k, v in q.items()}
            q = {k: jax.device_put(v) for k, v in q.items()}
        else:
            fmt, q = quantize_rows(jax.device_put(read_float(rows)), matrix_mode(spec, mode))
        parts.append((fmt, q))
    fmt = parts[0][0]
    if any(f != fmt for f, _ in parts):
        raise HyprjaxError(f"{spec.gguf}: row chunks packed to different formats")
    q = {k: jnp.concatenate([p[k] for _, p in parts]) if len(parts) > 1 else parts[0][1][k] for k in parts[0][1]}
    return fmt, q


def widen(fmt: QFormat, q: dict) -> tuple[QFormat, dict]:
    """4-bit codes as int8 codes holding the same values (the zero folded in): `keep8`."""
    if fmt.bits != 4:
        return fmt, q
    wide = QFormat(bits=8, group=fmt.group, zero=0, ratio=fmt.ratio, name=fmt.name)
    return wide, {**q, "codes": np.asarray(values(fmt, np.asarray(q["codes"])), np.int8)}


def common(items: list[tuple[QFormat, dict]]) -> tuple[QFormat, list[dict]]:
    """One format for every layer of a stacked module (module docstring): the layers' own when
    they agree, else int8 codes with float32 scales (and offsets) per group of the smallest group."""
    fmts = {f for f, _ in items}
    if len(fmts) == 1:
        return items[0][0], [q for _, q in items]
    group = min(f.group for f in fmts)
    names = "/".join(sorted({f.name for f in fmts}))
    fmt = QFormat(bits=8, group=group, name=names)
    has_min = any(q.get("min") is not None for _, q in items)
    out = []
    for f, q in items:
        v = np.asarray(values(f, np.asarray(q["codes"])))
        if f.bits == 16 or np.abs(v).max(initial=0) > 127 or v.dtype.kind == "f":
            raise HyprjaxError(f"layers mix {names}, which share no exact int8 layout; load with a "
                               f"CPU layout (scan_layers=False) or --quantization int8")
        s, m = group_scales(f, {k: jnp.asarray(x) for k, x in q.items() if x is not None})
        rep = f.group // group
        s = np.repeat(np.asarray(s, np.float32), rep, axis=-1)
        new = {"codes": v.astype(np.int8), "scale": s}
        if has_min:
            new["min"] = np.zeros_like(s) if m is None else np.repeat(np.asarray(m, np.float32), rep, axis=-1)
        out.append(new)
    return fmt, out


def stack_layers(items: list[tuple[QFormat, dict]]) -> tuple[QFormat, dict]:
    """Per-layer (fmt, q) -> one (fmt, q) whose arrays carry a leading layer axis."""
    fmt, qs = common(items)
    return fmt, {k: jnp.stack([jnp.asarray(q[k]) for q in qs]) for k in qs[0] if qs[0][k] is not None}
