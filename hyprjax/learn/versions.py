"""Adapter versions on disk: `ROOT/NAME/vN/`, written once and never changed.

A version directory holds `adapter/` (a PEFT LoRA directory: what `--lora`, PEFT and
transformers load, read back in milliseconds) and `version.json` (the adapter, N, its parent,
the base-model digest it was trained over, rank and alpha, and the round's numbers).

Writing is all or nothing: the files go into a hidden sibling `.vN.tmp-PID`, are fsynced, and
the directory is renamed to `vN` (a rename is atomic), then the parent directory is fsynced. A
process killed mid-write leaves only the hidden directory, which `sweep` removes at the next
start; the store's row (learn/store.py) is written after the rename, so a `vN` without a row, a
process killed between the two, is removed by `sweep` too. No reader ever sees half a version.

`HYPRJAX_LEARN_FAULT` (tests only) kills the process at a named point: `mid-write` (the adapter
files written, `version.json` not) or `before-commit` (renamed, no row yet).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from ..adapters.lora import LoraAdapter
from ..adapters.peft import write_peft
from ..adapters.vdb_adapter import base_digest
from ..config import ModelConfig
from .store import StoreError

FAULT_VAR = "HYPRJAX_LEARN_FAULT"
_VERSION = re.compile(r"^v(\d+)$")


def fault(point: str) -> None:
    """Kill this process now if the tests asked for a crash at `point` (SIGKILL: no cleanup runs)."""
    if os.environ.get(FAULT_VAR) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def version_dir(root: Path, adapter: str, version: int) -> Path:
    return Path(root) / adapter / f"v{version}"


def write_version(root: Path, adapter: LoraAdapter, name: str, version: int, cfg: ModelConfig, meta: dict) -> Path:
    """Write version `version` of adapter `name` all at once; its directory."""
    final = version_dir(root, name, version)
    if final.exists():
        raise FileExistsError(f"{final} already exists: versions are immutable")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_peft(tmp / "adapter", adapter, cfg, base_model=meta.get("base_model", ""))
    fault("mid-write")
    (tmp / "version.json").write_text(json.dumps({"adapter": name, "version": version, **meta}, indent=2) + "\n")
    for path in [*tmp.rglob("*")]:
        if path.is_file():
            _fsync(path)
    _fsync(tmp / "adapter")
    _fsync(tmp)
    os.rename(tmp, final)
    _fsync(final.parent)
    return final


def sweep(root: Path, adapter: str, known: set[int]) -> list[Path]:
    """Remove what a killed process left under ROOT/adapter: hidden temporaries and version
    directories the store has no row for. The paths removed."""
    folder = Path(root) / adapter
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        m = _VERSION.match(path.name)
        if path.name.startswith(".") or (m and int(m.group(1)) not in known):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions_root(db: Path) -> Path:
    """Where a learning database's versions live: beside it, named after it (DB.versions/), so two
    databases in one folder never touch each other's files."""
    return db.with_name(db.name + ".versions")


def lock_database(db: Path):
    """An exclusive lock on DB.lock for this process's life: two servers on one database would
    number and sweep each other's versions."""
    import fcntl

    f = open(db.with_name(db.name + ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreError(f"--learn-db {db}: another process is using this learning database") from None
    return f


def model_digest(model_path: str, cfg: ModelConfig) -> str:
    """The base model a database's versions were trained over: the architecture's digest plus a
    hash of the weight files' names, sizes and first MiB (an instruct and a base model of one
    architecture differ there). Cheap: no whole file is read."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    p = Path(model_path)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.gguf")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            with open(f, "rb") as fh:
                h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(1 << 20))
    return f"{base_digest(cfg)}-{h.hexdigest()}"
