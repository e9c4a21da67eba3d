"""Open an adapter from a path, whichever format it is, and the rule for which paths may be opened."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ModelConfig
from .lora import AdapterError, LoraAdapter
from .peft import is_peft_dir, read_peft


class AdapterPathError(AdapterError):
    """A runtime load names a path outside the allowed places (HTTP 403)."""


def read_adapter(path: str | os.PathLike, name: str, cfg: ModelConfig, max_rank: int | None = None) -> LoraAdapter:
    """A PEFT directory or a llama.cpp LoRA GGUF -> LoraAdapter, checked against the model."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterError(f"adapter {name!r}: {p} does not exist")
    if p.is_dir():
        if not is_peft_dir(p):
            raise AdapterError(f"adapter {name!r}: {p} is a directory without adapter_config.json "
                               f"(expected a PEFT LoRA directory or a .gguf LoRA file)")
        adapter = read_peft(p, name, cfg)
    else:
        from .gguf_lora import read_gguf_lora

        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise AdapterError(f"adapter {name!r}: {p} is neither a PEFT directory nor a GGUF file")
        adapter = read_gguf_lora(p, name, cfg)
    adapter.check_fits(cfg, max_rank)
    return adapter


def check_allowed(path: str | os.PathLike, allowed: list[str | os.PathLike], lora_dir: str | os.PathLike | None) -> Path:
    """The resolved path if it is one given at start-up or lies inside `lora_dir`; else AdapterPathError.

    Paths are resolved (symlinks, `..`) before comparing, so a name inside `lora_dir` cannot
    point outside it.
    """
    p = Path(path).expanduser().resolve()
    if any(p == Path(a).expanduser().resolve() for a in allowed):
        return p
    if lora_dir is not None:
        root = Path(lora_dir).expanduser().resolve()
        if p == root or root in p.parents:
            return p
    where = f"inside --lora-dir {lora_dir}" if lora_dir is not None else "given with --lora at start-up"
    raise AdapterPathError(f"adapter path {path} is not allowed: runtime loads must name a path {where}")
