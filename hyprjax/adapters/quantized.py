"""LoRA adapters kept on the host in int8 or int4 (`lora_quantization`), dequantized when read.

Each module's factors are quantized as rows of rank vectors, the layout hyprjax/qformat.py
quantizes a weight's output channels in: `a` as its transpose a.T f[r, din] (PEFT's own
`lora_A.weight`) and `b` f[r, dout] as it is, so every rank vector has its own scale. int8 is
one scale per rank vector; int4 an f16 scale and minimum per group of 32 along it, and a width
that is no multiple of 32 stays int8 (qformat.int4_group). A QuantizedLoraModule answers `a`, `b`, `rank`,
`delta()` like a LoraModule, dequantizing on each read, so the slot writer (registry.py) and the
merges (merge.py) read it unchanged; only `nbytes` differs: the packed codes and scales.

Dequantizing runs in numpy: the adapters live on the host, and a slot write should not send
every factor to the accelerator and back. `dequantize_host` is qformat.dequantize's arithmetic
for the formats made here (no sub-scales), tested equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..qformat import QFormat, quantize_rows, values
from .lora import LoraAdapter, LoraModule

LORA_QUANTIZATIONS = ("none", "int8", "int4")


def check_lora_quantization(mode) -> str:
    """`mode` if it is one of LORA_QUANTIZATIONS, else ConfigError naming the choices."""
    if mode not in LORA_QUANTIZATIONS:
        raise ConfigError(f"lora_quantization {mode!r} is not one of {', '.join(LORA_QUANTIZATIONS)}")
    return mode


@dataclass(frozen=True)
class QuantizedRows:
    """A float matrix f[rows, width] as qformat codes and scales, in numpy on the host."""

    fmt: QFormat
    codes: np.ndarray  # i8[rows, width] (int8) or u8[rows, width // 2] (int4, packed)
    scale: np.ndarray  # [rows, width // fmt.group]: f32 (int8) or f16 (int4)
    low: np.ndarray | None = None  # f16[rows, width // 32]: int4's minimum per group

    @classmethod
    def quantize(cls, w: np.ndarray, mode: str) -> QuantizedRows:
        fmt, q = quantize_rows(w, mode)
        low = q.get("min")
        return cls(fmt, np.asarray(q["codes"]), np.asarray(q["scale"]), None if low is None else np.asarray(low))

    def dequantize(self) -> np.ndarray:
        return dequantize_host(self.fmt, self.codes, self.scale, self.low)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.fmt.din(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + (0 if self.low is None else self.low.nbytes)


def dequantize_host(fmt: QFormat, codes: np.ndarray, scale: np.ndarray, low: np.ndarray | None = None) -> np.ndarray:
    """f32[rows, width] from codes, a scale and (int4) a minimum per group (qformat.dequantize, in numpy)."""
    assert fmt.ratio == 1 and fmt.bits in (4, 8), f"not a format quantize_rows makes: {fmt}"
    v = values(fmt, codes).astype(np.float32)
    rows, width = v.shape
    w = v.reshape(rows, width // fmt.group, fmt.group) * scale.astype(np.float32)[..., None]
    if low is not None:
        w = w + low.astype(np.float32)[..., None]
    return w.reshape(rows, width)


@dataclass(frozen=True)
class QuantizedLoraModule:
    """A LoraModule whose factors are held quantized (module docstring); `a` and `b` dequantize."""

    a_t: QuantizedRows  # a.T: r rows over din
    b_q: QuantizedRows  # b: r rows over dout
    scale: float

    @classmethod
    def quantize(cls, m: LoraModule, mode: str) -> QuantizedLoraModule:
        return cls(QuantizedRows.quantize(m.a.T, mode), QuantizedRows.quantize(m.b, mode), m.scale)

    @property
    def a(self) -> np.ndarray:  # f32[din, r]
        return np.ascontiguousarray(self.a_t.dequantize().T)

    @property
    def b(self) -> np.ndarray:  # f32[r, dout]
        return self.b_q.dequantize()

    @property
    def rank(self) -> int:
        return self.a_t.shape[0]

    @property
    def nbytes(self) -> int:
        return self.a_t.nbytes + self.b_q.nbytes

    def delta(self) -> np.ndarray:
        """The dense weight update [din, dout] of the dequantized factors."""
        return LoraModule(self.a, self.b, self.scale).delta()


def quantize_adapter(adapter: LoraAdapter, mode: str) -> LoraAdapter:
    """A copy of `adapter` with every module quantized to `mode` ("none": the adapter itself)."""
    check_lora_quantization(mode)
    if mode == "none":
        return adapter
    modules = {key: QuantizedLoraModule.quantize(m, mode) for key, m in adapter.modules.items()}
    # Sparse parts stay float: their values are the few that matter, already compact.
    return LoraAdapter(adapter.name, adapter.path, modules, adapter.parents, sparse=adapter.sparse)
