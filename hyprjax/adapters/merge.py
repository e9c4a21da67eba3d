"""Merge several LoRA adapters into one, as PEFT's `LoraModel.add_weighted_adapter` does.

Covers PEFT's combination types linear, ties, dare_linear and dare_ties (majority_sign_method
"total"). PEFT combines the low-rank factors, not the dense deltas: at each module, adapter i
with weight w_i and scaling s_i contributes `A_i * sign(w_i s_i) sqrt(|w_i s_i|)` to the merged A
and `B_i * sqrt(|w_i s_i|)` to the merged B, and the combination (weighted sum; or TIES/DARE
pruning, sign election and disjoint mean) runs on A and on B separately. The merged delta is
therefore not the weighted sum of the deltas (it has cross terms); PEFT calls linear "a very
rough approximation". The merged adapter has the sources' rank and scale 1 (PEFT sets
lora_alpha = r), since every source's scaling is already folded into its factors.

Sparse adapters (sparse.py) merge their deltas directly, which is where the math is exact:
element-sparse modules over the union of the sources' positions, block-sparse ones over the
union of their blocks (split to the smallest block size). linear is then the exact weighted
sum of the deltas; ties and dare prune, elect signs and average over those values as TIES and
DARE define them on task vectors. Merging a low-rank adapter with a sparse one, or element- with
block-sparse, is refused: the sum has no low-rank or single sparse form (serve such a mix with
weighted_sum, which adds each delta per token).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from .lora import MODULES, AdapterError, LoraAdapter, LoraModule

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
_FACTORS = ("a", "b")


def dare_rng(seed: int, layer: int, module: str, factor: str, index: int) -> np.random.Generator:
    """The generator DARE draws one factor's mask from: one per (seed, layer, module, factor, adapter index).

    `index` is the adapter's position in the list given to `merge_adapters`, so a module's masks
    do not depend on which other adapters are merged, on their order after it, or on other modules.
    """
    entropy = [seed, layer, MODULES.index(module), _FACTORS.index(factor), index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def dare_mask(shape: tuple[int, ...], density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE's keep-mask (bool[shape]): each entry kept with probability `density`.

    Drawn as `rng.random(shape) < density` in the model's layout (a is [din, r], b is [r, dout]),
    so for one generator a lower density keeps a subset of what a higher one keeps.
    """
    return rng.random(shape) < density


def merge_adapters(adapters: list[LoraAdapter], weights: list[float], strategy: str, *,
                   density: float | None = None, seed: int = 0, name: str) -> LoraAdapter:
    """One adapter mixing `adapters` with `weights` by `strategy` (one of STRATEGIES), as PEFT would.

    Matches `add_weighted_adapter(names, weights, name, combination_type=strategy,
    density=density, majority_sign_method="total")`:
    - all adapters must have the same rank (PEFT refuses otherwise); the result has that rank and
      scale 1.0 at every module. (PEFT <= 0.21 copies `use_rslora` from the first adapter into the
      merged config, which makes its merged scaling sqrt(r) instead of 1: a bug fixed upstream in
      huggingface/peft#3449, not reproduced here.)
    - the result targets every (layer, module) that any adapter targets. Where only some adapters
      target a module, the others are skipped there, exactly as PEFT skips adapters a layer does
      not hold; this equals giving them zero factors, because a zero entry adds nothing to a sum
      and never agrees with an elected sign, so it is not counted in TIES's disjoint mean.
    - with a single adapter PEFT falls back to linear, and so does this.
    - ties keeps the int(density * size) largest-magnitude entries of each factor; dare keeps each
      entry with probability `density` and divides the kept ones by it. density must lie in (0, 1]
      for those strategies; at 1 nothing is pruned. It must be None for linear.
    - DARE's masks come from `dare_mask(shape, density, dare_rng(seed, layer, module, factor, i))`
      for the i-th adapter (factor "a" or "b"), so a merge is a pure function of its arguments.

    Raises AdapterError on an unknown strategy, no adapters, weights that are not finite or not one
    per adapter, a bad density or seed, or adapters whose ranks or module shapes differ.
    """
    _check_arguments(adapters, weights, strategy, density, seed)
    if len(adapters) == 1:
        strategy = "linear"
    if any(a.sparse for a in adapters):
        return _merge_sparse(adapters, weights, strategy, density, seed, name)
    _check_ranks(adapters, strategy)
    keys = sorted({key for adapter in adapters for key in adapter.modules},
                  key=lambda key: (key[0], MODULES.index(key[1])))
    modules = {}
    for layer, module in keys:
        present = [(i, adapter.modules[(layer, module)]) for i, adapter in enumerate(adapters)
                   if (layer, module) in adapter.modules]
        _check_shapes(adapters, present, layer, module)
        # PEFT's split of weight * scaling over the two factors: the sign goes on A only, so a
        # negative weight flips the delta instead of cancelling out.
        mixes = [float(weights[i]) * m.scale for i, m in present]
        a_weights = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in mixes]
        b_weights = [math.sqrt(abs(x)) for x in mixes]
        factors = {}
        for factor, factor_weights in zip(_FACTORS, (a_weights, b_weights)):
            tensors = [getattr(m, factor) for _, m in present]
            rngs = [dare_rng(seed, layer, module, factor, i) for i, _ in present]
            factors[factor] = _combine(tensors, factor_weights, strategy, density, rngs).astype(np.float32)
        modules[(layer, module)] = LoraModule(a=factors["a"], b=factors["b"], scale=1.0)
    return LoraAdapter(name=name, path="", modules=modules)


def _combine(tensors: list[np.ndarray], weights: list[float], strategy: str, density: float | None,
             rngs: list[np.random.Generator]) -> np.ndarray:
    """PEFT's merge_utils.{task_arithmetic, ties, dare_linear, dare_ties} on one factor of one module."""
    x = np.stack([t.astype(np.float64) for t in tensors])  # [n, rows, cols]
    if strategy != "linear" and density < 1:  # PEFT's prune() returns the tensor as is at density >= 1
        if strategy == "ties":
            x = np.stack([_keep_largest(t, density) for t in x])
        else:
            x = np.stack([t * dare_mask(t.shape, density, rng) / density for t, rng in zip(x, rngs)])
    w = np.asarray(weights, dtype=np.float64)[:, None, None]
    if strategy in ("linear", "dare_linear"):
        return (w * x).sum(axis=0)
    # TIES: elect each entry's sign by the total of the pruned, unweighted tensors, then average
    # the weighted entries that agree with it.
    agree = np.sign(x) == np.where(x.sum(axis=0) >= 0, 1.0, -1.0)
    return (w * x * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def _keep_largest(t: np.ndarray, density: float) -> np.ndarray:
    """t with all but its int(density * t.size) largest-magnitude entries zeroed (PEFT's magnitude pruning)."""
    k = int(density * t.size)
    keep = np.zeros(t.size, dtype=bool)
    keep[np.argsort(-np.abs(t.ravel()), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def _check_arguments(adapters, weights, strategy, density, seed) -> None:
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown merge strategy {strategy!r} (supported: {', '.join(STRATEGIES)})")
    if not adapters:
        raise AdapterError("merge_adapters needs at least one adapter, got none")
    if len(weights) != len(adapters):
        raise AdapterError(f"merge_adapters needs one weight per adapter: got {len(weights)} weights "
                           f"for {len(adapters)} adapters ({', '.join(repr(a.name) for a in adapters)})")
    for adapter, w in zip(adapters, weights):
        if not isinstance(w, Real) or not math.isfinite(w):
            raise AdapterError(f"weight for adapter {adapter.name!r} must be a finite number, got {w!r}")
    if strategy == "linear":
        if density is not None:
            raise AdapterError(f"density={density!r} has no effect with merge strategy 'linear'; "
                               f"it applies to ties, dare_linear and dare_ties")
    elif not isinstance(density, Real) or not 0 < density <= 1:
        raise AdapterError(f"merge strategy {strategy!r} needs a density in (0, 1] (the fraction of "
                           f"entries kept), got density={density!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise AdapterError(f"merge seed must be a non-negative integer, got seed={seed!r}")


def _check_ranks(adapters: list[LoraAdapter], strategy: str) -> None:
    if len({adapter.rank for adapter in adapters}) > 1:
        ranks = ", ".join(f"{a.name!r} r={a.rank}" for a in adapters)
        raise AdapterError(f"merge strategy {strategy!r} needs adapters of equal rank, as PEFT's "
                           f"add_weighted_adapter does; got {ranks}")


def _check_shapes(adapters, present, layer, module) -> None:
    """Every adapter at this module must agree on rank and on the weight's shape."""
    shapes = {(m.a.shape, m.b.shape) for _, m in present}
    if len(shapes) > 1:
        found = ", ".join(f"{adapters[i].name!r} A {m.a.shape[::-1]} B {m.b.shape[::-1]}" for i, m in present)
        raise AdapterError(f"layer {layer} {module}: adapters disagree on rank or weight shape "
                           f"(lora_A/lora_B shapes as PEFT stores them): {found}")


def _merge_sparse(adapters: list[LoraAdapter], weights: list[float], strategy: str, density, seed: int,
                  name: str) -> LoraAdapter:
    """Merge purely sparse adapters of one form over the union of their supports (module docstring)."""
    from .sparse import BlockSparseModule, SparseModule

    kinds = {a.kind for a in adapters}
    if any(a.modules for a in adapters) or len(kinds) > 1 or kinds == {"sparse"}:
        found = ", ".join(f"{a.name!r} ({a.kind})" for a in adapters)
        raise AdapterError(f"merge strategy {strategy!r} cannot merge {found}: sparse adapters merge only with "
                           f"sparse adapters of the same form; serve the mix with weighted_sum instead")
    keys = sorted({k for a in adapters for k in a.sparse}, key=lambda key: (key[0], MODULES.index(key[1])))
    out = {}
    for layer, module in keys:
        present = [(i, a.sparse[(layer, module)]) for i, a in enumerate(adapters) if (layer, module) in a.sparse]
        shape = present[0][1].shape
        rngs = [dare_rng(seed, layer, module, "a", i) for i, _ in present]
        w = [float(weights[i]) for i, _ in present]
        if kinds == {"shira"}:
            mods = [m.folded() for _, m in present]
            keys_ = [m.rows.astype(np.int64) * shape[0] + m.cols for m in mods]
            union = np.unique(np.concatenate(keys_))
            vals = np.zeros((len(mods), 1, union.size))
            for j, (k, m) in enumerate(zip(keys_, mods)):
                np.add.at(vals[j, 0], np.searchsorted(union, k), m.values)
            merged = _combine(list(vals), w, strategy, density, rngs)[0]
            out[(layer, module)] = SparseModule((union // shape[0]).astype(np.int32),
                                                (union % shape[0]).astype(np.int32), merged.astype(np.float32),
                                                shape)
        else:
            b = min(m.block for _, m in present)
            mods = [m.split(b) for _, m in present]
            nbi = shape[0] // b
            keys_ = [m.row_blk.astype(np.int64) * nbi + m.col_blk for m in mods]
            union = np.unique(np.concatenate(keys_))
            vals = np.zeros((len(mods), union.size, b * b))
            for j, (k, m) in enumerate(zip(keys_, mods)):
                vals[j, np.searchsorted(union, k)] = m.blocks.reshape(-1, b * b)
            merged = _combine(list(vals), w, strategy, density, rngs)
            out[(layer, module)] = BlockSparseModule((union // nbi).astype(np.int32), (union % nbi).astype(np.int32),
                                                     merged.reshape(-1, b, b).astype(np.float32), shape)
    return LoraAdapter(name=name, path="", modules={}, sparse=out)
