"""The LoRA adapter training differentiates: its leaves, PEFT's initialisation, and the model seam.

The trainable state is a plain pytree, `{module: {"a": f32[L, din, r], "b": f32[L, r, dout]}}`,
one stacked pair per targeted module, so the model's layer scan slices it like any per-layer
data and `jax.grad` sees nothing else: the base weights are arguments, never leaves of what is
differentiated, and no gradient or optimizer buffer exists for them. The leaves stay float32
(the master copy the optimizer updates); `TrainLora` casts them to the activations' dtype at
use, so a bfloat16 model computes in bfloat16 and the cast's transpose hands back float32
gradients. The sparse kinds add compact value leaves beside (or instead of) "a"/"b" and a
separate pytree of fixed indices (training/sparse.py); the same seam adds them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.lora import MODULES, AdapterError, LoraAdapter, LoraModule, module_shapes
from ..config import ModelConfig
from .sparse import add_sparse


def check_targets(targets) -> tuple[str, ...]:
    targets = tuple(dict.fromkeys(targets))
    bad = [t for t in targets if t not in MODULES]
    if bad or not targets:
        raise AdapterError(f"target modules {list(bad) or '[]'} are not among the supported {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in targets)


def init_lora(cfg: ModelConfig, rank: int, targets, key: jax.Array) -> dict:
    """PEFT's default initialisation: A ~ U(-1/sqrt(din), 1/sqrt(din)) (torch's kaiming_uniform
    with a=sqrt(5)), B = 0, so the adapted model starts exactly at the base model."""
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"LoRA rank must be a positive integer, got {rank!r}")
    shapes, params = module_shapes(cfg), {}
    for module, k in zip(check_targets(targets), jax.random.split(key, len(MODULES))):
        din, dout = shapes[module]
        bound = din ** -0.5
        params[module] = {"a": jax.random.uniform(k, (cfg.num_layers, din, rank), jnp.float32, -bound, bound),
                          "b": jnp.zeros((cfg.num_layers, rank, dout), jnp.float32)}
    return params


class TrainLora:
    """The model's adapter seam over trainable leaves: `y + scale * (x @ a) @ b` per module, plus
    the module's sparse parts (training/sparse.py) where its leaves hold them.

    `masks` (sparse kinds) are the sparse parts' int32 indices: merged into each module's
    per-layer slice beside the leaves, but never differentiated (they are not in `params`).
    """

    def __init__(self, params: dict, scale: float, masks: dict | None = None):
        if masks:
            params = {m: {**params.get(m, {}), **masks.get(m, {})} for m in {**params, **masks}}
        self.per_layer = params  # sliced per layer by the model into `layer.adapter`
        self.scale = scale

    def __call__(self, module, layer, x, y):
        p = layer.adapter.get(module)
        if p is None:
            return y
        # Rows flattened to [B*T, din]: the factor gradients then contract one dimension, a plain
        # GEMM; contracting (B, T) of a 3-D x took XLA:CPU's slow generic dot (measured: LoRA on six
        # more modules cost 0.57 s per Qwen3-0.6B layer and step at 4 x 512 tokens, against 0.04 s).
        x2 = x.reshape(-1, x.shape[-1])
        if "a" in p:
            a, b = p["a"].astype(x.dtype), p["b"].astype(x.dtype)
            delta = jnp.dot(jnp.dot(x2, a), b) * jnp.asarray(self.scale, x.dtype)
            y = y + delta.reshape(*y.shape[:-1], -1).astype(y.dtype)
        if len(p) > ("a" in p) + ("b" in p):
            y = add_sparse(p, x2, y)
        return y


def to_adapter(params: dict, scale: float, name: str, path: str = "") -> LoraAdapter:
    """The trained leaves as a host LoraAdapter (what the PEFT, GGUF and serving paths take)."""
    modules = {}
    for module, ab in params.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for layer in range(a.shape[0]):
            modules[(layer, module)] = LoraModule(np.ascontiguousarray(a[layer]), np.ascontiguousarray(b[layer]),
                                                  scale)
    return LoraAdapter(name, path, modules)


def from_adapter(adapter: LoraAdapter, cfg: ModelConfig) -> tuple[dict, float]:
    """A LoraAdapter's low-rank modules (every layer of a module, one rank and scale) as trainable
    leaves: continuing training from a saved adapter (sparse parts: sparse.from_modules)."""
    adapter.check_fits(cfg)
    scales = {m.scale for m in adapter.modules.values()}
    ranks = {m.rank for m in adapter.modules.values()}
    if len(scales) != 1 or len(ranks) != 1:
        raise AdapterError(f"adapter {adapter.name!r}: training continues only adapters with one rank and "
                           f"one scale for all modules (found ranks {sorted(ranks)}, scales {sorted(scales)})")
    params = {}
    for module in sorted({name for _, name in adapter.modules}, key=MODULES.index):
        layers = [adapter.modules.get((i, module)) for i in range(cfg.num_layers)]
        if any(m is None for m in layers):
            raise AdapterError(f"adapter {adapter.name!r}: {module} is adapted in some layers only")
        params[module] = {"a": jnp.asarray(np.stack([m.a for m in layers]), jnp.float32),
                          "b": jnp.asarray(np.stack([m.b for m in layers]), jnp.float32)}
    return params, scales.pop()
