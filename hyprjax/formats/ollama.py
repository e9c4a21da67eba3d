"""Models from Ollama's local store: `ollama:NAME[:TAG]` -> the GGUF blob its manifest names.

Ollama keeps pulled models as content-addressed blobs under `~/.ollama/models` (`OLLAMA_MODELS`
moves it), each model a registry-style manifest:

    manifests/registry.ollama.ai/library/qwen3/0.6b     JSON: {"layers": [{"mediaType", "digest", "size"}, ...]}
    blobs/sha256-<hex>                                  the layers; the model layer is a plain GGUF file

`NAME` is `qwen3` (namespace `library`), `user/model`, or `host/user/model` (e.g. `hf.co/org/repo`);
`TAG` defaults to `latest`. The layer of media type `application/vnd.ollama.image.model` is the
GGUF; hyprjax reads it in place (no copy). Ollama's own prompt template layer is a Go template,
so the chat template comes from the GGUF's metadata, as for any GGUF; adapter and projector
layers are not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelFileError

PREFIX = "ollama:"
DEFAULT_HOST = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def parse_ref(ref: str) -> tuple[str, str, str, str]:
    """'qwen3:0.6b' -> (host, namespace, name, tag); 'ollama:' prefix optional."""
    ref = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    base, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        base, tag = ref, "latest"
    parts = [p for p in base.split("/") if p]
    if not parts or not tag or any(p in (".", "..") for p in parts + [tag]):
        raise ModelFileError(f"{PREFIX}{ref}: not an Ollama model name (write ollama:NAME[:TAG], e.g. ollama:qwen3:0.6b)")
    if len(parts) == 1:
        return DEFAULT_HOST, "library", parts[0], tag
    if len(parts) == 2 and "." not in parts[0]:
        return DEFAULT_HOST, parts[0], parts[1], tag
    return parts[0], "/".join(parts[1:-1]), parts[-1], tag


def resolve_ollama(ref: str) -> Path:
    """The GGUF blob of `ref` in the local store, checked against its manifest (size, magic)."""
    root = ollama_dir()
    host, namespace, name, tag = parse_ref(ref)
    manifest = root / "manifests" / host / namespace / name / tag
    shown = f"{PREFIX}{_short(host, namespace, name, tag)}"
    if not manifest.is_file():
        have = ", ".join(list_ollama()) or "none"
        raise ModelFileError(f"{shown}: not in Ollama's store at {root} (no {manifest}); models there: {have}. "
                             f"Pull it with `ollama pull {name}:{tag}`, or pass a .gguf file or a HF model directory")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        layer = next(x for x in layers if x.get("mediaType") == MODEL_LAYER)
        digest, size = str(layer["digest"]), int(layer["size"])
    except (ValueError, KeyError, TypeError, StopIteration):
        raise ModelFileError(f"{shown}: manifest {manifest} names no model layer ({MODEL_LAYER})") from None
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not hexdigest.isalnum():
        raise ModelFileError(f"{shown}: manifest {manifest} has a malformed digest {digest!r}")
    blob = root / "blobs" / f"sha256-{hexdigest}"
    if not blob.is_file():
        raise ModelFileError(f"{shown}: blob {blob} named by its manifest is missing: re-pull it with Ollama")
    if blob.stat().st_size != size:
        raise ModelFileError(f"{shown}: blob {blob} has {blob.stat().st_size} bytes, its manifest says {size} "
                             "(an interrupted pull?): re-pull it with Ollama")
    with open(blob, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{shown}: blob {blob} is not a GGUF file")
    return blob


def list_ollama() -> list[str]:
    """`ollama:` references of every model in the local store, sorted."""
    base = ollama_dir() / "manifests"
    if not base.is_dir():
        return []
    out = []
    for manifest in base.rglob("*"):
        parts = manifest.relative_to(base).parts
        if manifest.is_file() and len(parts) >= 4:
            host, *namespace, name, tag = parts
            out.append(PREFIX + _short(host, "/".join(namespace), name, tag))
    return sorted(out)


def served_name(ref: str) -> str:
    """The name a server reports for `ref`: NAME:TAG as Ollama writes it."""
    host, namespace, name, tag = parse_ref(ref)
    return _short(host, namespace, name, tag)


def _short(host: str, namespace: str, name: str, tag: str) -> str:
    if host == DEFAULT_HOST:
        return f"{name}:{tag}" if namespace == "library" else f"{namespace}/{name}:{tag}"
    return f"{host}/{namespace}/{name}:{tag}" if namespace else f"{host}/{name}:{tag}"
