"""Adapters as OpenVDB files: one FloatGrid per module, voxels (row, col, layer).

Every kind saves to `.vdb` (vdb.py writes the format; OpenVDB's own library reads it):

  grid `q_proj`           the sparse part of q_proj over all layers: voxel (row, col, layer) =
                          (output index, input index, layer) of the torch weight [out, in], the
                          value the delta there (scale folded in). Element-sparse: one active
                          voxel per entry. Block-sparse: every voxel of every block active
                          (zeros inside a block included), metadata `block` = b.
  grids `q_proj.lora_A`,  low-rank factors as PEFT stores them: lora_A [r, in] at (rank, in,
        `q_proj.lora_B`   layer), lora_B [out, r] at (out, rank, layer); dense, so they gain
                          nothing from sparsity but travel in the same file.

Grid metadata: `hyprjax_part` (sparse | block | lora_A | lora_B), `shape` (out, in), `block`,
`scale` (1 for sparse parts; alpha / r for the low-rank factors when every layer shares one
scale, else 1 with each layer's scale folded into lora_B), `dtype` (float32, or float16 when
saved as half), `base_model` (the digest below). File metadata: `hyprjax_adapter` (format
version 1; 2 when quantized, below), `kind`, `name`, `base_model`, `num_layers`.

The base-model digest hashes the model's architecture: family and every dimension the adapter's
shapes depend on (vocabulary, widths, layers, heads), not float settings such as rms_norm_eps,
which a GGUF stores rounded to f32 while a HF config keeps them as written: the same model read
from either must accept the same adapters. An adapter made for another model shape is refused on
load with both digests named. It does not hash the weights: a different fine-tune of the same architecture passes (hashing gigabytes of weights
at every load would cost more than the load).

Why voxels are (row, col, layer) with all layers in one grid: OpenVDB's 8^3 leaves then group
8 consecutive layers of an 8 x 8 patch, so a mask that repeats across layers (typical of
extracted and structured adapters) shares leaves, and the tree's topology is the sparsity
pattern itself: an empty 4096 x 4096 x 4096 region costs one root entry. The price: every
occupied leaf stores its 512-bit value mask twice (topology and buffer, uncompressed), so an
element-sparse grid whose entries touch most leaves costs ~2 bits per weight *position*
whatever its density; see docs/sparse_compression.md for what that means measured.

Quantized files (`quantize="int8"` or `"int4"`, format version 2; unquantized files stay version
1, byte for byte as before). Every grid above keeps its active voxels, but each voxel holds an
integer code (|code| <= 127 or 7) saved as a half float, exact for integers up to 2048; zip then
entropy-codes these low-entropy bytes. Each code grid `G` gets a companion grid `G.qscale`:

  * groups: the code grid's active voxels of one layer, sorted by `quant_order` ("zxy": by row,
    then column, so a group runs along the input index of a torch weight row, or of a lora_A
    row; "zyx" for lora_B, so a group runs along its output index, one rank vector at a time),
    cut into runs of `quant_group` voxels (64 for int8, 32 for int4): one scale per run.
  * `G.qscale` holds, per layer z, slot n at voxel (n // 8, n % 8, z): slot 0 an integer e_z,
    slot i + 1 the scale of run i times 2**e_z. e_z is chosen per layer so that layer's largest
    scale lands in [2**13, 2**14), inside half's range, and multiplying by a power of two is
    exact: layers may differ by any factor. Each scale is rounded *up* to half before the codes
    are made, so codes never clip and a value's error is at most half its run's stored scale,
    which is within 2**-10 above the ideal absmax / qmax for runs down to 2**-27 of the layer's
    largest (below that, half's subnormals: coarser steps, at least 2**-38 of the largest).
  * metadata on `G`: `quantization` (int8 | int4), `quant_group`, `quant_order`; `G.qscale` has
    `hyprjax_part` "qscale" and `quant_of` = `G`. The file's metadata says `quantization` too.

Why not codes packed several to a voxel, or scales in metadata: OpenVDB itself (pyopenvdb,
vdb_print) still sees one active voxel per stored weight entry, with the same topology as the
unquantized file. Slots fill an 8 x 8 face per layer, so 8 layers of 64 scales fill one 8^3 leaf
(placing each scale at its run's first voxel instead would cost a leaf, ~140 bytes, per scale).
Each extra grid still costs OpenVDB's fixed ~9 KB of internal-node masks, which only matters for
tiny models.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .lora import MODULES, AdapterError, LoraAdapter, LoraModule, module_shapes
from .sparse import BlockSparseModule, SparseModule
from .vdb import VdbError, VdbGrid, read_vdb, write_vdb

FORMAT_VERSION = 2  # the newest this module reads; unquantized files are still written as 1
QUANTIZATIONS = {"int8": (127, 64), "int4": (7, 32)}  # mode -> (largest code, values per scale)
SCALE_TOP = 2.0 ** 14  # a layer's largest stored scale lands in [2**13, 2**14): half's max is 65504


def base_digest(cfg: ModelConfig) -> str:
    """16 hex digits naming the model's architecture (the fields the module docstring lists)."""
    shape = (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
             cfg.num_kv_heads, cfg.head_dim)
    return hashlib.blake2b(repr(shape).encode(), digest_size=8).hexdigest()


def _by_module(parts: dict) -> dict[str, list[tuple[int, object]]]:
    out: dict[str, list] = {}
    for (layer, name), m in sorted(parts.items(), key=lambda kv: (MODULES.index(kv[0][1]), kv[0][0])):
        out.setdefault(name, []).append((layer, m))
    return out


def check_quantize(quantize) -> str | None:
    """`quantize` if it is None or a mode of QUANTIZATIONS, else AdapterError naming the choices."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise AdapterError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZATIONS)} (or none)")
    return quantize


def adapter_grids(adapter: LoraAdapter, cfg: ModelConfig, *, half: bool = False,
                  quantize: str | None = None) -> tuple[list[VdbGrid], dict]:
    """(grids, file metadata) of `adapter` (module docstring); `quantize` int8 | int4 implies half."""
    adapter.check_fits(cfg)
    check_quantize(quantize)
    half = half or quantize is not None
    digest, dtype = base_digest(cfg), "float16" if half else "float32"
    grids = []
    for name, items in _by_module(adapter.sparse).items():
        coords, values, block = [], [], 0
        kinds = {m.kind for _, m in items}
        if len(kinds) > 1:
            raise AdapterError(f"adapter {adapter.name!r}: {name} mixes element- and block-sparse layers; "
                               f"one .vdb grid holds one form")
        for layer, m in items:
            if m.kind == "sparse":
                m = m.folded()
                coords.append(np.stack([m.rows, m.cols, np.full_like(m.rows, layer)], 1))
                values.append(m.values)
            else:
                m = m.split(m.block)  # folds the scale
                b = block = m.block
                i, o = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")  # blocks are [b_in, b_out]
                rows = (m.row_blk[:, None, None] * b + o[None]).reshape(-1)
                cols = (m.col_blk[:, None, None] * b + i[None]).reshape(-1)
                coords.append(np.stack([rows, cols, np.full_like(rows, layer)], 1))
                values.append(m.blocks.reshape(-1))
        din, dout = items[0][1].shape
        c = np.concatenate(coords).astype(np.int32)
        v = np.concatenate(values).astype(np.float32)
        if kinds == {"sparse"}:  # duplicates add (torch's sparse_coo); a voxel holds one value
            key = (c[:, 2].astype(np.int64) * dout + c[:, 0]) * din + c[:, 1]
            uniq, inv = np.unique(key, return_inverse=True)
            if uniq.size < key.size:
                v = np.bincount(inv, weights=v, minlength=uniq.size).astype(np.float32)
                c = np.stack([(uniq // din) % dout, uniq % din, uniq // (din * dout)], 1).astype(np.int32)
        meta = {"hyprjax_part": kinds.pop(), "shape": (dout, din), "block": block, "scale": 1.0, "dtype": dtype,
                "base_model": digest}
        grids.append(VdbGrid(name, c, v, meta))
    for name, items in _by_module(adapter.modules).items():
        scales = {float(m.scale) for _, m in items}
        shared = scales.pop() if len(scales) == 1 else None
        a_c, a_v, b_c, b_v = [], [], [], []
        for layer, m in items:
            a, b = np.asarray(m.a, np.float32), np.asarray(m.b, np.float32)  # [din, r], [r, dout]
            if shared is None:
                b = b * np.float32(m.scale)
            r_, c_ = np.meshgrid(np.arange(a.shape[1]), np.arange(a.shape[0]), indexing="ij")  # lora_A [r, in]
            a_c.append(np.stack([r_.ravel(), c_.ravel(), np.full(r_.size, layer)], 1))
            a_v.append(a.T.ravel())
            r_, c_ = np.meshgrid(np.arange(b.shape[1]), np.arange(b.shape[0]), indexing="ij")  # lora_B [out, r]
            b_c.append(np.stack([r_.ravel(), c_.ravel(), np.full(r_.size, layer)], 1))
            b_v.append(b.T.ravel())
        din, dout = module_shapes(cfg)[name]
        meta = {"shape": (dout, din), "block": 0, "scale": 1.0 if shared is None else shared, "dtype": dtype,
                "base_model": digest}
        for part, c, v in (("lora_A", a_c, a_v), ("lora_B", b_c, b_v)):
            grids.append(VdbGrid(f"{name}.{part}", np.concatenate(c).astype(np.int32),
                                 np.concatenate(v).astype(np.float32), {**meta, "hyprjax_part": part}))
    file_meta = {"hyprjax_adapter": 1, "kind": adapter.kind, "name": adapter.name,
                 "base_model": digest, "num_layers": cfg.num_layers}
    if quantize is not None:
        grids = [q for g in grids for q in quantize_grid(g, quantize)]
        file_meta.update(hyprjax_adapter=2, quantization=quantize)
    return grids, file_meta


def write_adapter_vdb(path, adapter: LoraAdapter, cfg: ModelConfig, *, compression: str = "zip",
                      half: bool = False, quantize: str | None = None) -> None:
    """Save `adapter` as a .vdb file (atomically). `half` stores values as float16; `quantize`
    ("int8" | "int4") stores integer codes and per-run scales (module docstring), as half."""
    grids, meta = adapter_grids(adapter, cfg, half=half, quantize=quantize)
    write_vdb(path, grids, compression=compression, half=half or quantize is not None, metadata=meta)


# ---------------------------------------------------------------- quantized grids

def _runs(coords: np.ndarray, order: str, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(permutation into run order, layer, run index within the layer) of each voxel in run order."""
    x, y, z = (coords[:, i].astype(np.int64) for i in range(3))
    perm = np.lexsort((y, x, z) if order == "zxy" else (x, y, z))
    z = z[perm]
    first = np.searchsorted(z, z)  # index of the layer's first voxel (z is sorted)
    return perm, z, (np.arange(z.size) - first) // group


def _scale_coords(layer: np.ndarray, slot: np.ndarray) -> np.ndarray:
    return np.stack([slot // 8, slot % 8, layer], 1).astype(np.int32)


def quantize_grid(grid: VdbGrid, mode: str) -> list[VdbGrid]:
    """[the grid of codes, its `.qscale` grid] (module docstring); codes are exact in half."""
    qmax, group = QUANTIZATIONS[mode]
    order = "zyx" if grid.metadata.get("hyprjax_part") == "lora_B" else "zxy"
    perm, layer, run = _runs(grid.coords, order, group)
    v = grid.values[perm].astype(np.float64)
    if not v.size:
        return [VdbGrid(grid.name, grid.coords, grid.values, {**grid.metadata, "quantization": mode,
                                                              "quant_group": group, "quant_order": order}),
                VdbGrid(f"{grid.name}.qscale", np.zeros((0, 3), np.int32), np.zeros(0, np.float32),
                        {"hyprjax_part": "qscale", "quant_of": grid.name})]
    key = layer * (int(run.max()) + 1) + run  # one key per run, increasing in run order
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    run_layer, run_index = layer[starts], run[starts]
    want = np.maximum.reduceat(np.abs(v), starts) / qmax  # f64 [runs]
    layers, first = np.unique(run_layer, return_index=True)
    top = np.maximum.reduceat(want, first)  # each layer's largest scale
    exp = np.where(top > 0, np.floor(np.log2(SCALE_TOP / np.where(top > 0, top, 1.0))), 0.0)
    shift = 2.0 ** exp[np.searchsorted(layers, run_layer)]
    stored = (want * shift).astype(np.float16)
    low = stored.astype(np.float64) < want * shift  # round up, so |v| / scale <= qmax: codes never clip
    stored[low] = np.nextafter(stored[low], np.float16(np.inf))
    per_voxel = np.repeat(stored.astype(np.float64) / shift, np.diff(np.r_[starts, v.size]))
    codes = np.zeros(v.size, np.float32)
    nz = per_voxel > 0
    codes[nz] = np.clip(np.rint(v[nz] / per_voxel[nz]), -qmax, qmax)
    out = np.empty_like(codes)
    out[perm] = codes
    meta = {**grid.metadata, "quantization": mode, "quant_group": group, "quant_order": order}
    coords = _scale_coords(np.r_[layers, run_layer], np.r_[np.zeros_like(layers), run_index + 1])
    scales = VdbGrid(f"{grid.name}.qscale", coords, np.r_[exp, stored.astype(np.float64)].astype(np.float32),
                     {"hyprjax_part": "qscale", "quant_of": grid.name})
    return [VdbGrid(grid.name, grid.coords, out, meta), scales]


def dequantize_grids(grids: list[VdbGrid], where: str) -> list[VdbGrid]:
    """The grids with quantized values turned back into floats and the `.qscale` grids dropped."""
    scales = {g.metadata.get("quant_of"): g for g in grids if g.metadata.get("hyprjax_part") == "qscale"}
    out = []
    for g in grids:
        if g.metadata.get("hyprjax_part") == "qscale":
            if g.metadata.get("quant_of") not in {h.name for h in grids}:
                raise AdapterError(f"{where} grid {g.name!r}: scales of a grid {g.metadata.get('quant_of')!r} "
                                   f"the file does not hold")
            continue
        mode = g.metadata.get("quantization")
        if mode is None:
            out.append(g)
            continue
        what = f"{where} grid {g.name!r}"
        if mode not in QUANTIZATIONS:
            raise AdapterError(f"{what}: unknown quantization {mode!r} (this hyprjax reads {', '.join(QUANTIZATIONS)})")
        if g.name not in scales:
            raise AdapterError(f"{what}: quantized ({mode}) but its scale grid {g.name + '.qscale'!r} is missing")
        qmax = QUANTIZATIONS[mode][0]
        group, order = int(g.metadata.get("quant_group", 0)), g.metadata.get("quant_order")
        if group < 1 or order not in ("zxy", "zyx"):
            raise AdapterError(f"{what}: quant_group {group} / quant_order {order!r} are not a valid run layout")
        codes = g.values.astype(np.float64)
        if np.any(np.abs(codes) > qmax) or np.any(codes != np.rint(codes)):
            raise AdapterError(f"{what}: values are not {mode} codes (integers within +-{qmax})")
        perm, layer, run = _runs(g.coords, order, group)
        s = scales[g.name]
        sx, sy, sz = (s.coords[:, i].astype(np.int64) for i in range(3))
        if s.coords.size and (sx.min() < 0 or sy.min() < 0 or sy.max() > 7):
            raise AdapterError(f"{what}: its scale grid has voxels outside the slot layout")
        width = int(max(run.max(initial=0) + 1, sx.max(initial=0) * 8 + 7)) + 1
        have = sz * width + sx * 8 + sy
        sort = np.argsort(have)
        have, svals = have[sort], s.values[sort].astype(np.float64)

        def lookup(keys: np.ndarray) -> np.ndarray:
            at = np.minimum(np.searchsorted(have, keys), max(have.size - 1, 0))
            if keys.size and (have.size == 0 or np.any(have[at] != keys)):
                raise AdapterError(f"{what}: its scale grid has no scale for some runs of {group} values")
            return svals[at] if keys.size else np.zeros(0)

        exp = lookup(layer * width)
        if np.any(exp != np.rint(exp)):
            raise AdapterError(f"{what}: its scale grid's layer exponents are not integers")
        scale = lookup(layer * width + run + 1) * 2.0 ** -exp
        values = np.empty(codes.size, np.float32)
        values[perm] = (codes[perm] * scale).astype(np.float32)
        meta = {k: v for k, v in g.metadata.items() if not k.startswith("quant")}
        out.append(VdbGrid(g.name, g.coords, values, meta, g.background, g.grid_class))
    return out


def is_vdb_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and int.from_bytes(head, "little") == 0x56444220


def _layers(coords: np.ndarray, values: np.ndarray):
    """(layer, coords, values) of each layer present, split by one stable O(n) sort on the layer
    (boolean masks per layer cost L passes over every voxel: ~2 s for a rank-16 LoRA of a
    28-layer model)."""
    order = np.argsort(coords[:, 2].astype(np.int16), kind="stable")  # a radix sort for int16 keys
    coords, values = coords[order], values[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(coords[:, 2])) + 1, len(coords)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo < hi:
            yield int(coords[lo, 2]), coords[lo:hi], values[lo:hi]


def read_adapter_vdb(path, name: str, cfg: ModelConfig) -> LoraAdapter:
    """A .vdb adapter file -> LoraAdapter checked against `cfg` (AdapterError naming what is wrong)."""
    p = Path(os.fspath(path))
    try:
        grids, fmeta = read_vdb(p)
    except VdbError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from None
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: {p} cannot be read ({e.strerror or e})") from None
    if fmeta.get("hyprjax_adapter") is None:
        raise AdapterError(f"adapter {name!r}: {p} is a VDB file but not a hyprjax adapter (no hyprjax_adapter "
                           f"metadata)")
    if fmeta["hyprjax_adapter"] > FORMAT_VERSION:
        raise AdapterError(f"adapter {name!r}: {p} has adapter format version {fmeta['hyprjax_adapter']}; this "
                           f"hyprjax reads up to {FORMAT_VERSION}")
    want = base_digest(cfg)
    if fmeta.get("base_model", want) != want:
        raise AdapterError(f"adapter {name!r}: {p} was made for base model {fmeta['base_model']}, the loaded "
                           f"model is {want} (architecture digests differ): not this base model")
    grids = dequantize_grids(grids, f"adapter {name!r}: {p}")
    shapes = module_shapes(cfg)
    sparse, factors = {}, {}
    for g in grids:
        module, _, part = g.name.partition(".")
        where = f"adapter {name!r}: {p} grid {g.name!r}"
        if module not in shapes:
            raise AdapterError(f"{where}: {module!r} is not a target module ({', '.join(MODULES)})")
        kind = g.metadata.get("hyprjax_part", part or "sparse")
        din, dout = shapes[module]
        if tuple(g.metadata.get("shape", (dout, din))) != (dout, din):
            raise AdapterError(f"{where}: made for a {list(g.metadata['shape'])} weight, the model's is "
                               f"[{dout}, {din}] (out, in): not this base model")
        c = g.coords.astype(np.int64)
        if c.size and (c.min() < 0 or c[:, 2].max() >= cfg.num_layers):
            raise AdapterError(f"{where}: a voxel lies outside layers 0..{cfg.num_layers - 1} or at a negative index")
        scale = float(g.metadata.get("scale", 1.0))
        if kind == "sparse":
            for layer, cl, vl in _layers(c, g.values):
                order = np.argsort(cl[:, 0] * din + cl[:, 1])  # by (row, col)
                sparse[(layer, module)] = SparseModule(cl[order, 0].astype(np.int32), cl[order, 1].astype(np.int32),
                                                       vl[order].astype(np.float32), (din, dout), scale)
        elif kind == "block":
            b = int(g.metadata.get("block", 0))
            if b < 16 or b % 16 or din % b or dout % b:
                raise AdapterError(f"{where}: block size {b} is not a multiple of 16 dividing the weight")
            for layer, cl, vals in _layers(c, g.values):
                rows, cols = cl[:, 0], cl[:, 1]
                key = (rows // b) * (din // b) + cols // b
                uniq, inv = np.unique(key, return_inverse=True)
                blocks = np.zeros((uniq.size, b, b), np.float32)
                blocks[inv, cols % b, rows % b] = vals
                if uniq.size * b * b != rows.size:
                    raise AdapterError(f"{where}: layer {layer} has partial {b} x {b} blocks")
                sparse[(layer, module)] = BlockSparseModule((uniq // (din // b)).astype(np.int32),
                                                                 (uniq % (din // b)).astype(np.int32), blocks,
                                                                 (din, dout), scale)
        elif kind in ("lora_A", "lora_B"):
            for layer, cl, vl in _layers(c, g.values):
                rows, cols = cl[:, 0], cl[:, 1]
                shape = (rows.max() + 1, cols.max() + 1)
                if rows.size != shape[0] * shape[1]:
                    raise AdapterError(f"{where}: layer {layer} is not a dense {kind} factor")
                dense = np.zeros(shape, np.float32)
                dense[rows, cols] = vl
                factors.setdefault((layer, module), {})[kind] = (dense, scale)
        else:
            raise AdapterError(f"{where}: unknown part {kind!r}")
    modules = {}
    for key, f in factors.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {name!r}: {p} layer {key[0]} {key[1]} has only {', '.join(f)}")
        (a, scale), (b, _) = f["lora_A"], f["lora_B"]  # [r, in], [out, r]
        if a.shape[0] != b.shape[1] or a.shape[1] != shapes[key[1]][0] or b.shape[0] != shapes[key[1]][1]:
            raise AdapterError(f"adapter {name!r}: {p} layer {key[0]} {key[1]}: lora_A {a.shape} and lora_B "
                               f"{b.shape} do not make a low-rank pair for this model")
        modules[key] = LoraModule(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), scale)
    adapter = LoraAdapter(name, str(p), modules, sparse=sparse)
    adapter.check_fits(cfg)
    return adapter
