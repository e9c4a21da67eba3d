"""Sparse adapter training: element-sparse (`shira`), `block-sparse`, and low-rank + sparse (`lora+sparse`, RoSA).

The trainable leaves are compact: per targeted module `{"values": f32[L, nnz]}` (element) or
`{"blocks": f32[L, nb, b, b]}` (block, each [b_in, b_out]), beside LoRA's `"a"`/`"b"` for
lora+sparse. Where they sit is a separate, never differentiated pytree of int32 indices, the
*masks*: `{"rows", "cols": i32[L, nnz]}` (output / input index of the torch weight [out, in]) or
`{"row_blk", "col_blk": i32[L, nb]}`, sorted by (row, col) and unique, as adapters/sparse.py
keeps them. So `jax.grad`, AdamW's moments and the checkpoints hold O(nnz) floats, never a dense
array under a mask. `TrainLora` (training/lora.py) adds each part's delta to `y = x @ W` in the
model's seam through `add_sparse` below.

How a part's delta is computed (measured on this CPU, one gate_proj-sized module 1024 x 3072 at
1% density, 2048 tokens, forward + backward):
  * element: the nnz values are scattered into a transient dense [din, dout] delta and multiplied
    (`_element`, a custom VJP: the value gradient is x^T g gathered at the mask). A gather +
    segment-sum over the entries instead materialises [tokens, nnz] (257 MiB here, saved for the
    backward pass) and ran 2.4-3.2 s against 0.34-0.40 s: one dense GEMM beats nnz scattered
    multiply-adds on XLA:CPU down to ~0.1% density. The custom VJP recomputes the dense delta in
    the backward pass, so what is saved for it is x (saved for the base matmul anyway) and the
    values: 8.4 MiB, against 20 MiB when autodiff keeps the delta.
  * block: gathered block matmuls (`_blocks`): x's b-wide column groups at the blocks' input
    indices, one batched [tokens, b] x [b, b] product per block, a segment-sum onto the output
    groups. 0.05 s against 0.33 s for the scattered dense delta.

Masks (`random_masks`, `fisher_masks`): PEFT SHiRA's default is a random mask; RoSA's rule keeps
the entries (or b x b blocks) with the largest sum of squared gradients of the module's dense
weight delta over a warm-up window of steps. That gradient comes from a zero *probe* added in the
seam (`_probe`: the forward adds nothing, the backward returns x^T g), so no gradient or optimizer
state ever exists for the base weights. The warm-up holds one dense f32 accumulator per targeted
module, donated to the step, and frees it once the masks are chosen: XLA's buffer assignment
accumulates the step's gradient into it (at Qwen3-0.6B's shape, 4 x 512 tokens, the warm-up
step's temporaries are 196 MiB above the LoRA step's, beside the 1680 MiB accumulator).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.lora import MODULES, AdapterError, module_shapes
from ..adapters.sparse import BlockSparseModule, SparseModule
from ..config import ModelConfig
from ..errors import ConfigError

SPARSE_KINDS = ("shira", "block-sparse", "lora+sparse")
MASKS = ("fisher", "random")
BLOCKS = (16, 32)
DEFAULT_DENSITY = 0.01  # block-sparse and lora+sparse without --density
MASK_KEYS = {"values": ("rows", "cols"), "blocks": ("row_blk", "col_blk")}


@dataclass(frozen=True)
class SparseLayout:
    """What a sparse run trains in each layer of each targeted module."""

    kind: str  # shira | block-sparse | lora+sparse
    sizes: dict[str, int] = field(default_factory=dict)  # module -> entries (element) or blocks (block) per layer
    block: int = 0  # b of the b x b blocks; 0: element-sparse
    shira_r: int | None = None  # PEFT's r when every module holds r * (in + out) entries, else None
    note: str = ""  # why no PEFT directory can hold the result ("" when one can)

    @property
    def key(self) -> str:
        """The trainable leaf's name: "values" or "blocks"."""
        return "blocks" if self.block else "values"


def make_layout(cfg: ModelConfig, targets, kind: str, *, rank: int, density: float | None,
                block: int | None) -> SparseLayout:
    """The per-module sizes of a sparse run (ConfigError naming what does not fit).

    shira: PEFT's sizing, r * (in + out) entries per module, with r = `rank` or, given
    `density`, the r whose entries over all targeted modules come nearest density x their
    weights (so --density maps to PEFT's r and the result stays a PEFT SHiRA directory).
    block-sparse: round(density x blocks) b x b blocks per module (at least one). lora+sparse:
    a rank-`rank` LoRA plus round(density x weights) entries per module, or blocks given `block`.
    """
    shapes = {m: module_shapes(cfg)[m] for m in targets}
    if kind == "shira":
        if block:
            raise ConfigError(f"--block {block}: shira is element-sparse (use --adapter block-sparse)")
        r = rank if density is None else max(1, round(density * sum(i * o for i, o in shapes.values())
                                                      / sum(i + o for i, o in shapes.values())))
        sizes = {m: min(r * (i + o), i * o) for m, (i, o) in shapes.items()}
        over = [m for m, (i, o) in shapes.items() if r * (i + o) > i * o]
        note = (f"PEFT's SHiRA needs r * (in + out) = {r} x (in + out) entries per module, more than "
                f"{', '.join(over)} hold{'s' if len(over) == 1 else ''}: only the .vdb is written") if over else ""
        return SparseLayout(kind, sizes, 0, None if over else r, note)
    density = DEFAULT_DENSITY if density is None else density
    b = block or (16 if kind == "block-sparse" else 0)
    if b:
        bad = [f"{m} [{o} x {i}]" for m, (i, o) in shapes.items() if i % b or o % b]
        if bad:
            raise ConfigError(f"--block {b} does not divide {', '.join(bad)} (out x in)")
        sizes = {m: max(1, round(density * (i // b) * (o // b))) for m, (i, o) in shapes.items()}
    else:
        sizes = {m: max(1, round(density * i * o)) for m, (i, o) in shapes.items()}
    why = "PEFT has no block-sparse format" if kind == "block-sparse" else \
        "PEFT has no low-rank + sparse format"
    return SparseLayout(kind, sizes, b, None, f"{why}: only the .vdb is written")


def init_values(cfg: ModelConfig, layout: SparseLayout) -> dict:
    """Zero sparse leaves (SHiRA's init_weights=True): training starts exactly at the base model."""
    L, b = cfg.num_layers, layout.block
    return {m: {layout.key: jnp.zeros((L, n, b, b) if b else (L, n), jnp.float32)} for m, n in layout.sizes.items()}


def mask_shapes(cfg: ModelConfig, layout: SparseLayout) -> dict:
    """Zero index arrays of the masks' shapes (what a checkpoint restores into)."""
    rows, cols = MASK_KEYS[layout.key]
    return {m: {rows: jnp.zeros((cfg.num_layers, n), jnp.int32), cols: jnp.zeros((cfg.num_layers, n), jnp.int32)}
            for m, n in layout.sizes.items()}


# ---------------------------------------------------------------- the seam's sparse parts

def add_sparse(p: dict, x2: jax.Array, y: jax.Array) -> jax.Array:
    """y f[B, T, dout] plus the sparse parts of one module's slice `p` for input x2 f[B*T, din]."""
    dout = y.shape[-1]
    delta = None
    if "values" in p:
        delta = _element(x2, p["values"], p["rows"], p["cols"], dout)
    if "blocks" in p:
        d = _blocks(x2, p["blocks"].astype(x2.dtype), p["row_blk"], p["col_blk"], dout)
        delta = d if delta is None else delta + d
    if delta is not None:
        y = y + delta.reshape(y.shape).astype(y.dtype)
    if "probe" in p:
        y = _probe(y, x2, p["probe"])
    return y


def _scatter(values, rows, cols, din: int, dout: int, dtype) -> jax.Array:
    """The dense [din, dout] delta of entries (row = out, col = in)."""
    return jnp.zeros((din, dout), dtype).at[cols, rows].add(values.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _element(x2, values, rows, cols, dout: int):
    """x2 f[M, din] @ (the dense delta of values f32[nnz] at (rows, cols) i32[nnz]) -> f[M, dout]."""
    return jnp.dot(x2, _scatter(values, rows, cols, x2.shape[1], dout, x2.dtype))


def _element_fwd(x2, values, rows, cols, dout):
    return _element(x2, values, rows, cols, dout), (x2, values, rows, cols)


def _element_bwd(dout, res, g):
    x2, values, rows, cols = res
    gx = jnp.dot(g, _scatter(values, rows, cols, x2.shape[1], dout, x2.dtype).T)
    gd = jnp.dot(x2.T, g, preferred_element_type=jnp.float32)  # [din, dout]: the dense delta's gradient
    return gx, gd[cols, rows].astype(values.dtype), None, None


_element.defvjp(_element_fwd, _element_bwd)


def _blocks(x2, blocks, row_blk, col_blk, dout: int):
    """x2 f[M, din] times b x b blocks f[nb, b_in, b_out] at (row_blk, col_blk) i32[nb] -> f[M, dout]."""
    m, din = x2.shape
    b = blocks.shape[-1]
    xb = x2.reshape(m, din // b, b).transpose(1, 0, 2)[col_blk]  # [nb, M, b]: batch dims leading (docs/training.md)
    out = jnp.einsum("nmi,nio->nmo", xb, blocks)
    y = jax.ops.segment_sum(out, row_blk, num_segments=dout // b, indices_are_sorted=True)  # [dout/b, M, b]
    return y.transpose(1, 0, 2).reshape(m, dout)


@jax.custom_vjp
def _probe(y, x2, probe):
    """y unchanged; the cotangent of probe f32[din, dout] is x2^T g, as if y + x2 @ probe at probe = 0."""
    return y


def _probe_fwd(y, x2, probe):
    return y, x2


def _probe_bwd(x2, g):
    return g, None, jnp.dot(x2.T, g.reshape(x2.shape[0], -1), preferred_element_type=jnp.float32)


_probe.defvjp(_probe_fwd, _probe_bwd)


def probe_shapes(cfg: ModelConfig, targets) -> dict[str, tuple[int, int, int]]:
    """[L, din, dout] of each targeted module's dense weight delta (the Fisher warm-up's probes)."""
    return {m: (cfg.num_layers, *module_shapes(cfg)[m]) for m in targets}


# ---------------------------------------------------------------- masks

def random_masks(cfg: ModelConfig, layout: SparseLayout, seed: int) -> dict:
    """Uniformly random positions (PEFT SHiRA's `random` mask), a function of `seed` alone."""
    rng = np.random.default_rng([seed, 0x5A])
    shapes, b = module_shapes(cfg), layout.block
    out = {}
    for m in sorted(layout.sizes, key=MODULES.index):
        din, dout = shapes[m]
        nin, nout = (din // b, dout // b) if b else (din, dout)
        keep = np.stack([np.sort(rng.choice(nin * nout, layout.sizes[m], replace=False))
                         for _ in range(cfg.num_layers)])
        out[m] = _indices(keep, nin, layout)
    return out


def fisher_masks(scores: dict, layout: SparseLayout) -> dict:
    """RoSA's rule: per layer, the entries (or b x b blocks, by summed score) with the largest
    accumulated squared gradient. `scores`: module -> f32[L, din, dout]."""
    out = {}
    for m, n in layout.sizes.items():
        s = np.asarray(scores[m], np.float32)
        L, din, dout = s.shape
        b = layout.block
        if b:
            s = s.astype(np.float64).reshape(L, din // b, b, dout // b, b).sum(axis=(2, 4))
            din, dout = din // b, dout // b
        flat = s.transpose(0, 2, 1).reshape(L, -1)  # row-major over (row = out, col = in)
        keep = np.sort(np.argpartition(-flat, n - 1, axis=1)[:, :n], axis=1) if n < flat.shape[1] \
            else np.tile(np.arange(flat.shape[1]), (L, 1))
        out[m] = _indices(keep, din, layout)
    return out


def _indices(keep: np.ndarray, nin: int, layout: SparseLayout) -> dict:
    """Flat row-major positions i64[L, n] over [out, in] (or block grid) -> the mask's index arrays."""
    rows, cols = MASK_KEYS[layout.key]
    return {rows: jnp.asarray(keep // nin, jnp.int32), cols: jnp.asarray(keep % nin, jnp.int32)}


# ---------------------------------------------------------------- to and from host adapters

def to_modules(params: dict, masks: dict, cfg: ModelConfig) -> dict:
    """The sparse leaves as host modules: (layer, module) -> SparseModule | BlockSparseModule."""
    shapes, out = module_shapes(cfg), {}
    for m, mask in masks.items():
        p = params[m]
        if "values" in p:
            rows, cols, vals = (np.asarray(x) for x in (mask["rows"], mask["cols"], p["values"]))
            for layer in range(vals.shape[0]):
                out[(layer, m)] = SparseModule(rows[layer].astype(np.int32), cols[layer].astype(np.int32),
                                               vals[layer].astype(np.float32), shapes[m])
        else:
            rows, cols, blocks = (np.asarray(x) for x in (mask["row_blk"], mask["col_blk"], p["blocks"]))
            for layer in range(blocks.shape[0]):
                out[(layer, m)] = BlockSparseModule(rows[layer].astype(np.int32), cols[layer].astype(np.int32),
                                                    np.ascontiguousarray(blocks[layer], np.float32), shapes[m])
    return out


def from_modules(sparse: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """An adapter's sparse modules (every layer of a module adapted, one size, scale folded) as
    (leaves, masks): continuing training from a saved adapter, and the parity tests."""
    params, masks = {}, {}
    for m in sorted({name for _, name in sparse}, key=MODULES.index):
        layers = [sparse.get((i, m)) for i in range(cfg.num_layers)]
        if any(x is None for x in layers) or len({(x.kind, x.params) for x in layers}) != 1:
            raise AdapterError(f"{m}: training continues sparse modules adapted in every layer with one form "
                               f"and size")
        if layers[0].kind == "sparse":
            layers = [x.folded() for x in layers]
            order = [np.lexsort((x.cols, x.rows)) for x in layers]
            params[m] = {"values": jnp.asarray(np.stack([x.values[o] for x, o in zip(layers, order)]), jnp.float32)}
            masks[m] = {"rows": jnp.asarray(np.stack([x.rows[o] for x, o in zip(layers, order)]), jnp.int32),
                        "cols": jnp.asarray(np.stack([x.cols[o] for x, o in zip(layers, order)]), jnp.int32)}
        else:
            layers = [x.split(x.block) for x in layers]  # folds the scale; keeps the sorted order
            params[m] = {"blocks": jnp.asarray(np.stack([x.blocks for x in layers]), jnp.float32)}
            masks[m] = {"row_blk": jnp.asarray(np.stack([x.row_blk for x in layers]), jnp.int32),
                        "col_blk": jnp.asarray(np.stack([x.col_blk for x in layers]), jnp.int32)}
    return params, masks


# ---------------------------------------------------------------- memory

def memory_report(cfg: ModelConfig, targets, *, lora_rank: int, layout: SparseLayout | None) -> dict:
    """Bytes of the trained state kept compact against dense weight-shaped arrays under a mask.

    compact: the trainable f32 values (LoRA factors, sparse values or blocks) and AdamW's two
    moments, plus the masks' int32 indices. dense_masked: the same state kept as dense arrays
    over each targeted weight (an f32 delta, its two moments and a bool mask), the LoRA factors
    of lora+sparse unchanged; for plain LoRA, a dense delta and its moments. fisher_warmup: the
    Fisher warm-up's dense f32 accumulator, held during the warm-up only.
    """
    shapes, L = module_shapes(cfg), cfg.num_layers
    dense = L * sum(shapes[m][0] * shapes[m][1] for m in targets)
    lora = L * lora_rank * sum(sum(shapes[m]) for m in targets)
    values = indices = 0
    if layout is not None:
        per = layout.block ** 2 if layout.block else 1
        values = L * per * sum(layout.sizes.values())
        indices = 2 * 4 * L * sum(layout.sizes.values())
    masked = 12 * dense if layout is None else 13 * dense + 12 * lora
    report = {"trainable_values": lora + values, "targeted_weights": dense,
              "compact_state_bytes": 12 * (lora + values) + indices, "dense_masked_state_bytes": masked}
    if layout is not None:
        report["fisher_warmup_bytes"] = 4 * dense
    report["ratio"] = round(report["dense_masked_state_bytes"] / max(report["compact_state_bytes"], 1), 1)
    return report


def check_options(kind: str, density, block, mask: str, mask_warmup) -> None:
    """ConfigError naming the first sparse option out of range."""
    if kind == "lora":
        if density is not None or block is not None:
            raise ConfigError("--density and --block apply to the sparse kinds (shira, block-sparse, lora+sparse)")
        return
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(f"--density must lie in (0, 1], got {density!r}")
    if block is not None and block not in BLOCKS:
        raise ConfigError(f"--block {block!r}: expected one of {', '.join(map(str, BLOCKS))}")
    if mask not in MASKS:
        raise ConfigError(f"--mask {mask!r}: expected one of {', '.join(MASKS)}")
    if not isinstance(mask_warmup, int) or isinstance(mask_warmup, bool) or mask_warmup < 1:
        raise ConfigError(f"--mask-warmup must be a positive integer, got {mask_warmup!r}")
