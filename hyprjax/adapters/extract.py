"""A fully fine-tuned checkpoint -> an adapter: low-rank + sparse parts of tuned - base.

Per target module (the seven linear modules of every layer) the delta D = tuned - base [din, dout]
is split into

  * a low-rank part L of rank R: the truncated SVD of D, kept as a LoraModule with the singular
    values shared evenly (a = U sqrt(s), b = sqrt(s) V^T, scale 1), so both factors have the same
    magnitude and quantize alike;
  * a sparse part S: the largest-magnitude entries of the residual D - L, a fraction `density`
    of the module's weights (element-sparse, PEFT's SHiRA layout), or with `block` b the
    b x b blocks of largest norm (block-sparse, what kernels/sparse.py multiplies by).

With both parts, `refine` rounds of alternating projection (GoDec: L = SVD_R(D - S), then
S = top-k(D - L)) lower ||D - L - S|| further; each round is optimal for one part given the
other, so the error never grows, and a delta that *is* rank R plus k entries is recovered
exactly once the support is found. A round stops early when the residual shrinks by less than
`tol` (relative).

SVDs run in float64 on the host. A rank far below the module's smaller dimension uses a
randomized SVD (Halko, Martinsson, Tropp 2011: 10 extra columns, 4 power iterations), which is
exact for a matrix of that rank and within a hair of the exact truncation otherwise, at a small
fraction of the cost of a full SVD; larger ranks use LAPACK's full SVD.

`size_ratio` is the "target size" form: the adapter's values (rank * (din + dout) per low-rank
module plus the sparse values) are 1/size_ratio of the targeted weights; with a rank given the
sparse part takes what the low-rank part leaves. Bytes on disk also hold indices or masks and
depend on the format and quantization: `hyprjax adapters info` and bench/compression.py
measure them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from .lora import MODULE_BLOCK, MODULES, AdapterError, LoraAdapter, LoraModule, module_shapes
from .sparse import BlockSparseModule, SparseModule, blocks_from_dense, sparse_from_dense

# Config fields two checkpoints must share for one to be a fine-tune of the other.
SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim")


def model_kernels(model, cfg: ModelConfig, layers=None) -> Iterator[tuple[tuple[int, str], np.ndarray]]:
    """((layer, module), f32[din, dout] kernel) of every target module of an nnx Model, whether
    its layers are stacked ([L, din, dout], GPU/TPU) or one module per layer (CPU)."""
    import jax.numpy as jnp
    from flax import nnx

    stacked = not isinstance(model.layers, nnx.List)
    for layer in range(cfg.num_layers) if layers is None else layers:
        block = model.layers if stacked else model.layers[layer]
        for name in MODULES:
            owner = getattr(block.attn if MODULE_BLOCK[name] == "attn" else block.mlp, name)
            kernel = getattr(owner, "kernel", None)
            value = None if kernel is None else kernel[...]
            if value is None or value.ndim != 2 + stacked or not jnp.issubdtype(value.dtype, jnp.floating):
                raise AdapterError(f"layer {layer} {name}: the model's weights are quantized (packed); "
                                   f"load it with quantization='none' to extract an adapter")
            yield (layer, name), np.asarray(value[layer] if stacked else value, np.float32)


def check_same_shape(base: ModelConfig, tuned: ModelConfig) -> None:
    """AdapterError naming the first architecture field the two checkpoints differ in."""
    for f in SHAPE_FIELDS:
        if getattr(base, f) != getattr(tuned, f):
            raise AdapterError(f"the base and tuned checkpoints differ in {f} ({getattr(base, f)!r} vs "
                               f"{getattr(tuned, f)!r}): not a fine-tune of this base model")


def truncated_svd(m: np.ndarray, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u f64[din, r], s f64[r], vt f64[r, dout]) of the best rank-r approximation of m."""
    m = np.asarray(m, np.float64)
    rank = min(rank, *m.shape)
    k = rank + 10
    if k * 2 >= min(m.shape):
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], k)))
    for _ in range(4):  # power iterations sharpen a slowly decaying spectrum
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def split_delta(delta: np.ndarray, *, rank: int, nnz: int = 0, block: int | None = None, refine: int = 2,
                tol: float = 1e-4) -> tuple[LoraModule | None, SparseModule | BlockSparseModule | None]:
    """(low-rank part, sparse part) of one module's delta f[din, dout] (module docstring); `nnz`
    counts entries, or blocks when `block` is set."""
    d = np.asarray(delta, np.float64)
    sparse = np.zeros_like(d)
    low = np.zeros_like(d)
    lora = part = None
    err = np.inf
    for _ in range(1 + (refine if rank and nnz else 0)):
        if rank:
            u, s, vt = truncated_svd(d - sparse, rank)
            root = np.sqrt(s)
            lora = LoraModule((u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32), 1.0)
            low = lora.a.astype(np.float64) @ lora.b.astype(np.float64)  # what the adapter will hold
        if nnz:
            part = blocks_from_dense(d - low, nnz, block) if block else sparse_from_dense(d - low, nnz)
            sparse = part.delta()
        new = float(np.linalg.norm(d - low - sparse))
        if err - new <= tol * max(err if np.isfinite(err) else new, 1e-30):
            break
        err = new
    return lora, part


def extract_adapter(base, tuned, cfg: ModelConfig, *, rank: int, density: float, block: int | None = None,
                    name: str = "extracted", size_ratio: float | None = None, refine: int = 2,
                    modules: tuple[str, ...] = MODULES, progress: bool = True, path: str = "") -> LoraAdapter:
    """The adapter approximating `tuned - base` (module docstring).

    base, tuned: nnx Models (from `load_model(..., quantization="none")`) of one architecture, or
    mappings (layer, module) -> f[din, dout] kernel. rank: R of the low-rank part (0: none).
    density: the sparse part's entries (or blocks' values) over each module's weights (0: none).
    block: 16, 32, ... for block-sparse. size_ratio: if set, density is chosen so the adapter
    holds 1/size_ratio of the targeted weights' values (after the rank's share).
    """
    density = _check_args(rank, density, block, size_ratio, refine, modules, cfg)
    shapes = module_shapes(cfg)
    base_k, tuned_k = _kernels(base, cfg), _kernels(tuned, cfg)
    keys = [(layer, m) for layer in range(cfg.num_layers) for m in MODULES if m in modules]
    low, sparse = {}, {}
    for key in tqdm(keys, desc="extracting", unit="module", disable=not progress, leave=False):
        din, dout = shapes[key[1]]
        b, t = base_k(key), tuned_k(key)
        if b.shape != (din, dout) or t.shape != (din, dout):
            raise AdapterError(f"layer {key[0]} {key[1]}: kernels {b.shape} and {t.shape}, the config says "
                               f"{(din, dout)} (din, dout)")
        delta = t.astype(np.float64) - b.astype(np.float64)
        if not np.isfinite(delta).all():
            raise AdapterError(f"layer {key[0]} {key[1]}: the tuned or base weights are not finite")
        if not delta.any():
            continue  # an untouched module needs nothing
        if block:
            if din % block or dout % block:
                raise AdapterError(f"--block {block} does not divide layer {key[0]} {key[1]}'s [{dout} x {din}] "
                                   f"weight")
            nnz = int(round(density * (din // block) * (dout // block)))
        else:
            nnz = int(round(density * din * dout))
        lora, part = split_delta(delta, rank=min(rank, din, dout), nnz=nnz, block=block, refine=refine)
        if lora is not None:
            low[key] = lora
        if part is not None and part.params:
            sparse[key] = part
    adapter = LoraAdapter(name, path, low, sparse=sparse)
    if not low and not sparse:
        raise AdapterError("the tuned checkpoint's target modules equal the base model's: nothing to extract")
    return adapter


def density_for_ratio(cfg: ModelConfig, rank: int, size_ratio: float, modules=MODULES) -> float:
    """The sparse density that makes rank-`rank` factors plus sparse values 1/size_ratio of the weights."""
    shapes = module_shapes(cfg)
    total = sum(shapes[m][0] * shapes[m][1] for m in modules)
    lowrank = sum(min(rank, *shapes[m]) * (shapes[m][0] + shapes[m][1]) for m in modules)
    left = total / size_ratio - lowrank
    if left < 0:
        raise AdapterError(f"rank {rank} alone holds {lowrank / total:.4f} of the weights' values, more than "
                           f"1/size_ratio = {1 / size_ratio:.4f}: lower --rank or --size-ratio")
    return left / total


def _check_args(rank, density, block, size_ratio, refine, modules, cfg) -> float:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise AdapterError(f"rank {rank!r}: expected an integer >= 0 (0: no low-rank part)")
    if not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise AdapterError(f"density {density!r}: expected a fraction in [0, 1] (0: no sparse part)")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 16 or block % 16):
        raise AdapterError(f"block {block!r}: expected a multiple of 16 (16, 32, ...) or none")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise AdapterError(f"refine {refine!r}: expected an integer >= 0")
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        raise AdapterError(f"modules {list(modules)}: choose among {', '.join(MODULES)}")
    if size_ratio is not None:
        if not isinstance(size_ratio, (int, float)) or not size_ratio > 1:
            raise AdapterError(f"size ratio {size_ratio!r}: expected a number > 1 (10 = a tenth of the weights)")
        return density_for_ratio(cfg, rank, size_ratio, modules)
    if rank == 0 and density == 0:
        raise AdapterError("rank 0 and density 0 extract nothing: give --rank, --density or --size-ratio")
    return density


def _kernels(source, cfg: ModelConfig):
    """key -> f32[din, dout] for a Model (read lazily, one layer's modules at a time) or a mapping."""
    if hasattr(source, "layers"):
        cache: dict = {}

        def get(key):
            if key not in cache:
                cache.clear()
                cache.update(model_kernels(source, cfg, [key[0]]))
            return cache[key]

        return get
    return lambda key: np.asarray(source[key], np.float32)


def extract_from_paths(base: str, tuned: str, *, rank: int, density: float, block: int | None = None,
                       name: str = "extracted", size_ratio: float | None = None, refine: int = 2,
                       progress: bool = True) -> tuple[LoraAdapter, ModelConfig]:
    """Load both checkpoints (any format load_model reads) and extract (adapter, base config)."""
    from ..formats.load import load_model, read_config
    from ..formats.resolve import resolve_model

    check_same_shape(read_config(resolve_model(base))[0], read_config(resolve_model(tuned))[0])  # before any load
    kw = dict(with_tokenizer=False, progress=progress, quantization="none", scan_layers=False)
    b = load_model(base, **kw)
    t = load_model(tuned, **kw)
    adapter = extract_adapter(b.model, t.model, b.cfg, rank=rank, density=density, block=block, name=name,
                              size_ratio=size_ratio, refine=refine, progress=progress, path=str(tuned))
    return adapter, b.cfg
