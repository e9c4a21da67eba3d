"""llama.cpp LoRA adapter GGUFs (as `convert_lora_to_gguf.py` writes them), read and written.

The format, as llama.cpp's `llama_adapter_lora_init` checks it (docs/lora_gguf.md):
  * KVs `general.type = "adapter"`, `adapter.type = "lora"`, `general.architecture` equal to the
    base model's, and one f32 `adapter.lora.alpha` for the whole file.
  * Per target weight `W` (GGUF name `blk.N.attn_q.weight`, ...) a pair `<name>.lora_a` and
    `<name>.lora_b`: lora_a is PEFT's `lora_A.weight` [r, in] and lora_b is `lora_B.weight`
    [out, r] (numpy order; ggml's ne lists them innermost first). llama.cpp computes
    `W x + scale * B (A x)`, so in our [in, out] layout `a = lora_a.T`, `b = lora_b.T`.
  * `scale = alpha / r` with r the rank of that pair (lora_b's last numpy axis), per pair; an alpha
    of 0 or no alpha key means scale 1 (llama.cpp's `get_scale`), never scale 0.
  * Tensors are F32, F16, BF16 or Q8_0 (the converter's --outtype choices).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import gguf
import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError
from ..formats.gguf_read import GGUFFile
from ..formats.gguf_write import QTYPES
from ..formats.names import tensor_table
from .lora import MODULES, AdapterError, LoraAdapter, LoraModule

log = logging.getLogger("hyprjax.adapters")

Q = gguf.GGMLQuantizationType
# write dtype -> (tensor type, general.file_type): the converter's --outtype choices
DTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {k: QTYPES[k] for k in ("F32", "F16", "BF16", "Q8_0")}
_LORA_NAME = re.compile(r"(.+)\.lora_([ab])")
_BLOCK = re.compile(r"blk\.(\d+)\.")
_F32_MAX = float(np.finfo(np.float32).max)
_REL = 1e-6  # scales this close are one scale: alpha is stored as f32 (relative step 6e-8)


def _targets(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """GGUF base name (e.g. 'blk.3.attn_q.weight') -> (layer, module name), from the one name table."""
    return {s.gguf: (s.layer, s.module) for s in tensor_table(cfg)
            if s.layer is not None and s.module in MODULES and s.path[-1] == "kernel"}


def file_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a rank-`rank` pair of a file with `adapter.lora.alpha` = alpha."""
    return float(alpha) / rank if alpha else 1.0


def read_gguf_lora(path: str | os.PathLike, name: str, cfg: ModelConfig) -> LoraAdapter:
    """Read a llama.cpp LoRA adapter GGUF for a base model of `cfg`; every fault is an AdapterError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such LoRA adapter file")
    try:
        f = GGUFFile(path)
    except ModelFileError as e:
        raise AdapterError(str(e)) from None
    meta = f.metadata
    kind = meta.get("general.type")
    if kind != "adapter":
        hint = ": this is a model, not an adapter" if kind in (None, "model") else ""
        raise AdapterError(f"{path}: general.type is {kind!r}, a LoRA adapter GGUF has 'adapter'{hint}")
    if meta.get("adapter.type") != "lora":
        raise AdapterError(f"{path}: adapter.type is {meta.get('adapter.type')!r}, only 'lora' adapters are supported")
    arch = meta.get("general.architecture")
    if arch != cfg.arch:
        raise AdapterError(f"{path}: adapter is for architecture {arch!r}, the model is {cfg.arch!r}")
    if "adapter.alora.invocation_tokens" in meta:
        raise AdapterError(f"{path}: activated LoRA (adapter.alora.invocation_tokens) is not supported")
    alpha = meta.get("adapter.lora.alpha", 0.0)  # llama.cpp reads a missing alpha as 0: scale 1
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number")

    targets = _targets(cfg)
    pairs: dict[str, dict[str, str]] = {}  # base name -> {"a": tensor name, "b": tensor name}
    for t in f.names():
        m = _LORA_NAME.fullmatch(t)
        if m is None and t.endswith("_norm.weight"):
            # mergekit-extract-lora adds norms; llama.cpp skips them too, so outputs still agree.
            log.warning("%s: ignoring norm tensor %r (llama.cpp ignores adapter norms as well)", path, t)
            continue
        if m is None:
            raise AdapterError(f"{path}: tensor {t!r} is not a LoRA tensor (<weight name>.lora_a / .lora_b)")
        base = m.group(1)
        if base not in targets:
            raise AdapterError(f"{path}: tensor {t!r}: {_why_not_a_target(base, cfg)}")
        pairs.setdefault(base, {})[m.group(2)] = t
    if not pairs:
        raise AdapterError(f"{path}: no LoRA tensors for any of {', '.join(MODULES)}")

    adapter = LoraAdapter(name=name, path=str(path))
    for base, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            have, miss = ("a", "b") if "a" in ab else ("b", "a")
            raise AdapterError(f"{path}: {base}.lora_{have} has no {base}.lora_{miss}")
        shapes = {k: f.shape(t) for k, t in ab.items()}
        if any(len(s) != 2 for s in shapes.values()):
            raise AdapterError(f"{path}: {base}: lora_a {shapes['a']} and lora_b {shapes['b']} must both be 2-D")
        try:
            lora_a, lora_b = f.get(ab["a"]), f.get(ab["b"])  # [r, in], [out, r]
        except ModelFileError as e:
            raise AdapterError(str(e)) from None
        rank = lora_b.shape[1]  # llama.cpp: b->ne[0]
        adapter.modules[targets[base]] = LoraModule(a=np.ascontiguousarray(lora_a.T), b=np.ascontiguousarray(lora_b.T),
                                                    scale=file_scale(alpha, rank))
    try:
        adapter.check_fits(cfg)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    return adapter


def _why_not_a_target(base: str, cfg: ModelConfig) -> str:
    m = _BLOCK.match(base)
    if m and int(m.group(1)) >= cfg.num_layers:
        return f"layer {m.group(1)}, but the model has only {cfg.num_layers} layers"
    return ("not a weight hyprjax applies LoRA to (blk.N.{attn_q,attn_k,attn_v,attn_output,"
            "ffn_gate,ffn_up,ffn_down}.weight)")


def write_gguf_lora(path: str | os.PathLike, adapter: LoraAdapter, cfg: ModelConfig, *,
                    alpha: float | None = None, dtype: str = "F32") -> None:
    """Write `adapter` as a llama.cpp LoRA adapter GGUF for a base model of `cfg`.

    The file has one alpha and llama.cpp scales each pair by alpha / rank, so by default every
    module must have the same scale * rank (an AdapterError says which do not). With an explicit
    `alpha` (0 means "scale 1", as llama.cpp reads it) any adapter can be written: each module's
    scale / (alpha / rank) is folded into its lora_b, so the applied delta is unchanged.
    `dtype` is F32, F16, BF16 or Q8_0 (rows that do not split into 32-blocks fall back to F16, as
    the converter does; a rank below 32 makes every lora_b such a row).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    adapter.check_fits(cfg)
    if alpha is None:
        alpha = _common_alpha(adapter)
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) <= _F32_MAX:
        raise ValueError(f"alpha must be a number finite in f32, got {alpha!r}")
    alpha = float(np.float32(alpha))  # what the file will hold, so the folding below is exact to f32
    names = {v: k for k, v in _targets(cfg).items()}
    qtype, ftype = DTYPES[dtype]

    w = gguf.GGUFWriter(os.fspath(path), cfg.arch)
    done = False
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(adapter.name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key in sorted(adapter.modules, key=lambda k: (k[0], MODULES.index(k[1]))):
            m = adapter.modules[key]
            fold = m.scale / file_scale(alpha, m.rank)
            # Within f32 rounding of alpha, keep b bit-exact; otherwise the file's scale needs the rest.
            b = m.b if math.isclose(fold, 1.0, rel_tol=_REL) else m.b.astype(np.float64) * fold
            for suffix, data in (("lora_a", m.a.T), ("lora_b", b.T)):  # [r, in], [out, r]
                data = np.ascontiguousarray(data, dtype=np.float32)
                qt = qtype if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16
                w.add_tensor(f"{names[key]}.{suffix}", gguf.quants.quantize(data, qt), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        done = True
    finally:
        w.close()
        if not done:  # never leave a half-written file that looks like an adapter
            Path(path).unlink(missing_ok=True)


def _common_alpha(adapter: LoraAdapter) -> float:
    """The one alpha with alpha / rank == scale for every module, or an AdapterError naming two that differ."""
    items = sorted(adapter.modules.items())
    (k0, m0), alpha = items[0], items[0][1].scale * items[0][1].rank
    for k, m in items[1:]:
        if not math.isclose(m.scale * m.rank, alpha, rel_tol=_REL):
            raise AdapterError(
                f"adapter {adapter.name!r}: layer {k0[0]} {k0[1]} (scale {m0.scale:g}, rank {m0.rank}) and layer "
                f"{k[0]} {k[1]} (scale {m.scale:g}, rank {m.rank}) need different alphas, and a llama.cpp "
                f"adapter GGUF has one; pass alpha= (e.g. 0) to fold the scales into lora_b")
    if alpha == 0:
        raise AdapterError(f"adapter {adapter.name!r}: scale 0 cannot be written (llama.cpp reads alpha 0 as "
                           f"scale 1); pass alpha= to fold it into lora_b")
    return alpha
