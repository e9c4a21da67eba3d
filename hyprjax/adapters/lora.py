"""One LoRA adapter on the host, in the model's own layout, whatever file it came from.

A module's update is `y += scale * (x @ a) @ b` with `a` f32[din, r] and `b` f32[r, dout] (the
model keeps linear weights as [in, out], so PEFT's `lora_A.weight` [r, in] is stored here as
its transpose). `scale` is alpha / r, or alpha / sqrt(r) with rsLoRA, per module, so per-module
rank and alpha patterns need nothing special. Adapters never touch the base weights: the engine
copies them into its slot table (`registry.py`) and the model adds their deltas per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..errors import HyprjaxError

# The seven linear modules an adapter may target, with the block they live in.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_BLOCK = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class AdapterError(HyprjaxError):
    """An adapter that is missing, malformed, or does not fit the loaded model."""


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(din, dout) of each target module in this model."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, qd), "k_proj": (d, kd), "v_proj": (d, kd), "o_proj": (qd, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


@dataclass
class LoraModule:
    a: np.ndarray  # f32[din, r]
    b: np.ndarray  # f32[r, dout]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def delta(self) -> np.ndarray:
        """The dense weight update [din, dout] (tests and merges)."""
        return self.scale * (self.a.astype(np.float64) @ self.b.astype(np.float64))


@dataclass
class LoraAdapter:
    """An adapter: low-rank modules, sparse modules (sparse.py), or both (low-rank + sparse).

    `kind` names which: "lora", "shira" (element-sparse only), "block-sparse", "sparse" (both
    sparse forms) or "lora+sparse". Each part is an additive delta, so a module's update is the
    sum of its low-rank and sparse deltas.
    """

    name: str
    path: str  # where it was read from ("" for merged mixes)
    # (layer, module name) -> update: a LoraModule, or a QuantizedLoraModule (quantized.py)
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)
    parents: tuple[str, ...] = ()  # a merged mix: the adapters it was made from
    # (layer, module name) -> a SparseModule or BlockSparseModule (sparse.py)
    sparse: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        kinds = {m.kind for m in self.sparse.values()}
        sparse = "" if not kinds else "shira" if kinds == {"sparse"} else "block-sparse" if kinds == {"block"} \
            else "sparse"
        if self.modules:
            return "lora+sparse" if sparse else "lora"
        return sparse or "lora"

    @property
    def parts(self) -> frozenset:
        """Which slot tables the adapter writes: "lora", "sparse" (element) and/or "block"."""
        return frozenset(({"lora"} if self.modules else set()) | {m.kind for m in self.sparse.values()})

    @property
    def params(self) -> int:
        """Trained values: rank * (din + dout) per low-rank module plus the sparse values."""
        return sum(m.rank * (m.a.shape[0] + m.b.shape[1]) for m in self.modules.values()) + \
            sum(m.params for m in self.sparse.values())

    def density(self, cfg: ModelConfig) -> float:
        """params over the weights of the modules it targets (1.0 = as many values as those weights)."""
        shapes = module_shapes(cfg)
        total = sum(shapes[name][0] * shapes[name][1] for _, name in {*self.modules, *self.sparse})
        return self.params / total if total else 0.0

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in (*self.modules, *self.sparse)}, key=MODULES.index)

    @property
    def nbytes(self) -> int:
        """Host bytes as stored (packed codes and scales for a quantized adapter; indices included)."""
        return sum(m.nbytes for m in self.modules.values()) + sum(m.nbytes for m in self.sparse.values())

    def check_fits(self, cfg: ModelConfig, max_rank: int | None = None) -> None:
        """Raise AdapterError naming the first module whose layer, shape or rank does not fit."""
        if not self.modules and not self.sparse:
            raise AdapterError(f"adapter {self.name!r} ({self.path}) has no LoRA tensors for any of {MODULES}")
        shapes = module_shapes(cfg)
        for (layer, name), m in self.sparse.items():
            where = f"adapter {self.name!r}: layer {layer} {name} ({m.kind})"
            if name not in shapes:
                raise AdapterError(f"{where}: unknown target module (supported: {', '.join(MODULES)})")
            if not 0 <= layer < cfg.num_layers:
                raise AdapterError(f"{where}: the model has only {cfg.num_layers} layers")
            why = m.problem(*shapes[name])
            if why:
                raise AdapterError(f"{where}: {why}")
        for (layer, name), m in self.modules.items():
            where = f"adapter {self.name!r}: layer {layer} {name}"
            if name not in shapes:
                raise AdapterError(f"{where}: unknown target module (supported: {', '.join(MODULES)})")
            if not 0 <= layer < cfg.num_layers:
                raise AdapterError(f"{where}: the model has only {cfg.num_layers} layers")
            din, dout = shapes[name]
            if m.a.ndim != 2 or m.b.ndim != 2 or m.a.shape[1] != m.b.shape[0]:
                raise AdapterError(f"{where}: lora_A {m.a.shape[::-1]} and lora_B {m.b.shape[::-1]} "
                                   f"do not make a low-rank pair")
            if m.a.shape[0] != din or m.b.shape[1] != dout:
                raise AdapterError(f"{where}: adapter is for a [{m.b.shape[1]} x {m.a.shape[0]}] weight, "
                                   f"the model's is [{dout} x {din}] (out x in): not this base model")
            if max_rank is not None and m.rank > max_rank:
                raise AdapterError(f"{where}: rank {m.rank} exceeds --max-lora-rank {max_rank}")
            if not (np.isfinite(m.a).all() and np.isfinite(m.b).all() and np.isfinite(m.scale)):
                raise AdapterError(f"{where}: weights or scale are not finite")

    def delta(self, layer: int, name: str) -> np.ndarray | None:
        """The module's dense update [din, dout] (every part summed), or None if not targeted."""
        parts = [m.delta() for m in (self.modules.get((layer, name)), self.sparse.get((layer, name))) if m is not None]
        return None if not parts else sum(parts[1:], parts[0])


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with use_rslora."""
    return float(alpha) / (rank ** 0.5 if rslora else rank)
