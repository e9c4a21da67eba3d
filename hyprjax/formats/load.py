"""Load a model (config, weights, tokenizer) from a HF SafeTensors directory or a GGUF file.

Both formats walk the same name table (`names.tensor_table`). Each tensor is read, checked,
converted to the target dtype and placed on the device one at a time, so peak host memory is
the final parameters plus one tensor in flight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ..config import ModelConfig, RopeScaling
from ..errors import ModelFileError
from ..model import Model, abstract_model, default_scan_layers, set_quantized
from ..quant import check_mode, resolve_mode
from .gguf_read import GGUFFile
from .load_packed import PACKED_MODES, check_source, is_packed, read_packed, stack_layers
from .names import TensorSpec, tensor_table
from .resolve import resolve_model
from .safetensors_io import SafeTensorsDir


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Model
    tokenizer: object  # hyprjax.tokenizer.Tokenizer, or None when the source has none
    path: Path
    format: str  # "safetensors" | "gguf"


def read_config(path: Path) -> tuple[ModelConfig, object]:
    """(config, opened weights source) for a resolved local path."""
    if path.is_dir():
        cfg_file = path / "config.json"
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{cfg_file}: invalid JSON ({e})") from None
        return ModelConfig.from_hf(raw), SafeTensorsDir(path)
    if path.suffix != ".gguf":
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{path}: not a model: expected a HF directory or a .gguf file")
    gf = GGUFFile(path)
    if "token_embd.weight" not in gf:
        raise ModelFileError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = gf.shape("token_embd.weight")[0]
    cfg = ModelConfig.from_gguf(gf.metadata, vocab_size=vocab, tied="output.weight" not in gf)
    if "rope_freqs.weight" in gf:  # Llama 3.x: llama.cpp's converter stores the scaling as divisors
        factors = tuple(float(f) for f in np.asarray(gf.get("rope_freqs.weight"), np.float64).ravel())
        cfg = cfg.replace(rope_scaling=RopeScaling(kind="factors", factor=1.0, freq_factors=factors))
    return cfg, gf


def gguf_permuted(spec: TensorSpec, cfg: ModelConfig) -> bool:
    """llama.cpp's converter reorders the rows of a Llama's q and k weights within each head
    (interleaved rotary pairs, its "normal" RoPE); the model keeps HF's rotate-half order."""
    return cfg.arch == "llama" and spec.module in ("q_proj", "k_proj")


def unpermute_rows(array: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows of whole heads from llama.cpp's order (pairs interleaved: [h, H/2, 2]) back to HF's
    ([h, 2, H/2]); `permute_rows` is its inverse."""
    rest = array.shape[1:]
    return array.reshape(-1, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(array.shape)


def permute_rows(array: np.ndarray, head_dim: int) -> np.ndarray:
    rest = array.shape[1:]
    return array.reshape(-1, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(array.shape)


def load_model(source: str | os.PathLike, *, dtype="float32", progress: bool = True,
               with_tokenizer: bool = True, scan_layers: bool | None = None,
               quantization: str = "none") -> LoadedModel:
    """Read a model from `source` (directory, .gguf file or hub id) with parameters in `dtype`;
    `scan_layers` None stacks the layers on GPU/TPU only (model.default_scan_layers);
    `quantization` packs the linear layers and embedding (hyprjax/quant.py: the modes; "auto"
    keeps a quantized GGUF's blocks)."""
    check_mode(quantization)  # a bad value fails before the load
    path = resolve_model(source)
    cfg, weights = read_config(path)
    quantization = resolve_mode(quantization, weights)
    check_source(quantization, weights)
    dtype = jnp.dtype(dtype)
    model = load_weights(cfg, weights, dtype, progress=progress, scan_layers=scan_layers, quantization=quantization)
    tokenizer = _load_tokenizer(path, weights) if with_tokenizer else None
    return LoadedModel(cfg, model, tokenizer, path, "gguf" if isinstance(weights, GGUFFile) else "safetensors")


def load_weights(cfg: ModelConfig, weights, dtype, *, progress: bool = True,
                 scan_layers: bool | None = None, quantization: str = "none") -> Model:
    """Fill the model's parameters from an opened SafeTensorsDir or GGUFFile.

    With stacked layers a per-layer tensor goes into its row of the [L, ...] parameter, written
    in place into a donated buffer allocated once, so loading holds no second copy of any stack.
    In a quantized mode the matrices are packed as they are read (formats/load_packed.py) and
    never exist as floats.
    """
    is_gguf = isinstance(weights, GGUFFile)
    if scan_layers is None:
        scan_layers = default_scan_layers()
    graphdef, state = nnx.split(abstract_model(cfg, dtype, scan_layers))
    pure = nnx.to_pure_dict(state)
    specs = tensor_table(cfg)
    total = sum(int(np.prod(s.shape)) for s in specs) * dtype.itemsize
    desc = f"loading {getattr(weights, 'path', '')}".strip()
    packed: dict[tuple, list] = {}  # parameter path -> [(fmt, q)] (one per layer when stacked)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
        for spec in specs:
            _check_tensor(spec, weights, is_gguf)
            stack, path = None, spec.path
            if spec.layer is not None and not scan_layers:
                path = (path[0], spec.layer, *path[1:])  # ("layers", i, "attn", ...): one array per layer
            if quantization in PACKED_MODES and is_packed(spec):
                got = _read_packed(spec, weights, cfg, is_gguf, quantization)
                if got is not None:
                    packed.setdefault(path, []).append(got)
                    _set(pure, path, jnp.zeros((0,), dtype))  # replaced by the codes below
                    bar.update(int(np.prod(spec.shape)) * dtype.itemsize)
                    continue
            if spec.layer is not None and scan_layers:
                stack = _get(pure, path)
                if not isinstance(stack, jax.Array):  # the abstract leaf: allocate the stack once
                    stack = jnp.zeros((cfg.num_layers, *spec.shape), dtype)
            _set(pure, path, _place(spec, weights, cfg, is_gguf, dtype, stack))
            bar.update(int(np.prod(spec.shape)) * dtype.itemsize)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    for path, items in packed.items():
        if scan_layers and path[0] == "layers":
            if len(items) != cfg.num_layers:
                raise ModelFileError(f"{getattr(weights, 'path', '')}: {'.'.join(path[1:])} is F32 in some layers "
                                     f"and packed in others; stacked layers need one layout (--quantization int8)")
            fmt, q = stack_layers(items)
        else:
            fmt, q = items[0]
        module = model
        for key in path[:-1]:
            module = module[key] if isinstance(key, int) else getattr(module, key)
        set_quantized(module, path[-1], fmt, q)
    return model


def _read_packed(spec: TensorSpec, weights, cfg: ModelConfig, is_gguf: bool, mode: str):
    """(fmt, q) of a matrix in `mode`, rows as the file stores them ([dout, din]), or None."""
    name = spec.gguf if is_gguf else spec.hf
    permuted = is_gguf and gguf_permuted(spec, cfg)

    def read_float(rows):
        array = weights.get(name, rows)
        return np.ascontiguousarray(unpermute_rows(array, cfg.head_dim) if permuted else array, np.float32)

    permute = (lambda a: unpermute_rows(np.asarray(a), cfg.head_dim)) if permuted else None
    return read_packed(spec, weights, cfg, mode, read_float, permute)


CHUNK_BYTES = 64 << 20  # tensors above this are read and placed in row chunks


def _place(spec: TensorSpec, weights, cfg: ModelConfig, is_gguf: bool, dtype, stack) -> jax.Array:
    """The tensor on the device: written into row `spec.layer` of `stack` (donated) for a
    per-layer tensor, else on its own. A large tensor (an embedding or LM head: 0.6 GB at
    Qwen3's 152k vocabulary, most of Gemma 3 270M) goes in row chunks written in place, so
    loading never holds a second full copy of it (the dequantizers' temporaries are several
    times the tensor)."""
    lead = () if stack is None else (np.int32(spec.layer),)
    nbytes = int(np.prod(spec.shape)) * max(dtype.itemsize, 4)
    if nbytes <= CHUNK_BYTES:
        tensor = jax.device_put(_read_tensor(spec, weights, cfg, is_gguf, dtype))
        if stack is None:
            return tensor
        return _write(stack, tensor[None], *lead, *(np.int32(0),) * len(spec.shape))
    out = jnp.zeros(spec.shape, dtype) if stack is None else stack
    rows = weights.shape(spec.gguf if is_gguf else spec.hf)[0]
    step = max(1, rows * CHUNK_BYTES // nbytes)
    if is_gguf and gguf_permuted(spec, cfg):  # rows are reordered within heads: chunk by whole heads
        step = max(cfg.head_dim, step - step % cfg.head_dim)
    for r0 in range(0, rows, step):
        chunk = jax.device_put(_read_tensor(spec, weights, cfg, is_gguf, dtype, (r0, min(rows, r0 + step))))
        at = (0, r0) if spec.transpose else (r0, 0)
        out = _write(out, chunk if stack is None else chunk[None], *lead, np.int32(at[0]), np.int32(at[1]))
    return out


@partial(jax.jit, donate_argnums=0)
def _write(out, chunk, *start):
    """`out` with `chunk` written at `start` (one index per dimension of out), in place."""
    return jax.lax.dynamic_update_slice(out, chunk, start)


def _check_tensor(spec: TensorSpec, weights, is_gguf: bool) -> None:
    name = spec.gguf if is_gguf else spec.hf
    where = weights.path if is_gguf else None
    if name not in weights:
        raise ModelFileError(f"{where or 'model directory'}: missing tensor {name!r}")
    file_shape = tuple(reversed(spec.shape)) if spec.transpose else spec.shape
    got = weights.shape(name)
    if got != file_shape:
        place = where or weights.where(name)
        raise ModelFileError(f"{place}: tensor {name!r} has shape {list(got)}, expected {list(file_shape)} "
                             f"for this config")


def _read_tensor(spec: TensorSpec, weights, cfg: ModelConfig, is_gguf: bool, dtype, rows=None) -> np.ndarray:
    array = weights.get(spec.gguf if is_gguf else spec.hf, rows)
    if not is_gguf and spec.norm and cfg.arch == "gemma3":
        array = array.astype(np.float32) + 1.0  # HF Gemma stores w - 1; GGUF folds the 1 in, so do we
    if is_gguf and gguf_permuted(spec, cfg):
        array = unpermute_rows(array, cfg.head_dim)
    if spec.transpose:
        array = array.T
    return np.ascontiguousarray(array, dtype=dtype)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _load_tokenizer(path: Path, weights):
    from ..tokenizer import Tokenizer

    if isinstance(weights, GGUFFile):
        return Tokenizer.from_gguf_metadata(weights.metadata)
    return Tokenizer.from_hf_dir(path)
