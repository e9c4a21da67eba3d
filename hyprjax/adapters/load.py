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
    """A PEFT directory (LoRA or SHiRA), a llama.cpp LoRA GGUF or a .vdb adapter -> LoraAdapter,
    checked against the model."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterError(f"adapter {name!r}: {p} does not exist")
    if p.is_dir():
        if not is_peft_dir(p):
            raise AdapterError(f"adapter {name!r}: {p} is a directory without adapter_config.json "
                               f"(expected a PEFT LoRA or SHiRA directory, a .gguf LoRA file or a .vdb file)")
        adapter = read_peft(p, name, cfg)
    else:
        from .gguf_lora import read_gguf_lora

        from .vdb_adapter import is_vdb_file, read_adapter_vdb

        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            adapter = read_gguf_lora(p, name, cfg)
        elif is_vdb_file(p):
            adapter = read_adapter_vdb(p, name, cfg)
        else:
            raise AdapterError(f"adapter {name!r}: {p} is neither a PEFT directory, a GGUF file nor a VDB file")
    adapter.check_fits(cfg, max_rank)
    return adapter


def check_allowed(path: str | os.PathLike, allowed: list[str | os.PathLike], lora_dir: str | os.PathLike | None) -> Path:
    """The resolved path if it is one given at start-up or lies inside `lora_dir`; else AdapterPathError.

    Paths are resolved (symlinks, `..`) before comparing, so a name inside `lora_dir` cannot
    point outside it; for a PEFT directory the two files read from it are checked the same way,
    so a symlinked `adapter_model.safetensors` cannot reach outside either. (A file swapped
    between this check and the read is not caught: `--lora-dir` must not be writable by
    whoever may call the API.)
    """
    text = os.fspath(path)
    if "\0" in text:
        raise AdapterPathError(f"adapter path {text!r} holds a NUL byte")
    given = [Path(a).expanduser().resolve() for a in allowed]
    roots = given + ([Path(lora_dir).expanduser().resolve()] if lora_dir is not None else [])

    def inside(p: Path) -> bool:
        return any(p == r or r in p.parents for r in roots)

    p = Path(text).expanduser().resolve()
    ok = p in given or (lora_dir is not None and inside(p) and p != roots[-1])
    if ok and p.is_dir():
        ok = all(inside((p / f).resolve()) for f in ("adapter_config.json", "adapter_model.safetensors"))
    if not ok:
        where = f"inside --lora-dir {lora_dir}" if lora_dir is not None else "given with --lora at start-up"
        raise AdapterPathError(f"adapter path {path} is not allowed: runtime loads must name a path {where}")
    return p
