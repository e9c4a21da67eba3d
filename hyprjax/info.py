"""`hyprjax info`: what a model file holds, read from its headers without loading weights."""

from __future__ import annotations

import collections
from pathlib import Path

from .formats.gguf_read import GGUFFile
from .formats.load import read_config
from .formats.resolve import resolve_model
from .quant import device_bytes, resolve_mode


def model_info(source: str, memory: bool = False) -> dict:
    """Config, size, tensor types and tokenizer facts of a model, as a flat dict; with `memory`,
    also the parameter bytes on the device per weight mode and what `--quantization auto` picks."""
    path = resolve_model(source)
    cfg, weights = read_config(path)
    info = {"path": str(path), "format": "gguf" if isinstance(weights, GGUFFile) else "safetensors",
            "architecture": cfg.arch, "parameters": f"{cfg.num_params / 1e6:,.1f} M"}
    if isinstance(weights, GGUFFile):
        meta = weights.metadata
        info["name"] = meta.get("general.name", "")
        types = collections.Counter(weights.type_name(n) for n in weights.names())
        info["tensor types"] = ", ".join(f"{t} x{c}" for t, c in types.most_common())
        info["file size"] = f"{path.stat().st_size / 2**20:.1f} MiB"
        info["tokenizer"] = f"{meta.get('tokenizer.ggml.model', 'none')} / pre {meta.get('tokenizer.ggml.pre', '-')}"
        info["chat template"] = "yes" if "tokenizer.chat_template" in meta else "no"
    else:
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        info["file size"] = f"{size / 2**20:.1f} MiB"
        info["tokenizer"] = "tokenizer.json" if (path / "tokenizer.json").exists() else "none"
        has_template = (path / "chat_template.jinja").exists() or '"chat_template"' in _read(path / "tokenizer_config.json")
        info["chat template"] = "yes" if has_template else "no"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
                  "tie_word_embeddings", "qk_norm", "qkv_bias", "sliding_window"):
        info[field] = getattr(cfg, field)
    if memory:
        modes = [("float32", "none"), ("bfloat16", "none"), ("int8", "int8"), ("int4", "int4")]
        if isinstance(weights, GGUFFile):
            modes += [("keep", "keep"), ("keep8", "keep8")]
        for label, mode in modes:
            nbytes = 2 if label == "bfloat16" else 4
            info[f"device bytes {label}"] = f"{device_bytes(cfg, mode, nbytes, weights) / 2**20:,.1f} MiB"
        info["quantization auto"] = resolve_mode("auto", weights)
    return info


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
