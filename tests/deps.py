"""Test dependencies: a missing one skips the test, or fails it under HYPRJAX_STRICT=1.

CI (.ci/run) sets HYPRJAX_STRICT=1, so it can never pass by skipping what the `test` extra should
have installed. Device-only tests ("needs a GPU or TPU") call pytest.skip directly: no CPU
machine can run them, strict or not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

STRICT = os.environ.get("HYPRJAX_STRICT", "") == "1"


def _import_past_the_repo(name: str) -> None:
    """Import the installed package `name` with the repository root off sys.path.

    transformers >= 5.2x imports Hugging Face's `kernels` package at import time, and the repo's
    top-level `kernels/` folder (installed as `hyprjax.kernels`, DESIGN.md's layout) would shadow
    it, since the tests and their worker processes run from the repository root. Imported first,
    the real one is the `sys.modules` entry every later `import kernels` gets; nothing of ours
    imports a top-level `kernels`. Every test module and worker imports this module before
    transformers.
    """
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # not installed (older transformers): nothing to shadow
    finally:
        sys.path[:] = saved


_import_past_the_repo("kernels")
INSTALL = 'pip install -e ".[test]"'


def missing(reason: str) -> None:
    """Skip the calling test or module for a missing dependency; fail instead under HYPRJAX_STRICT=1."""
    if STRICT:
        pytest.fail(f"HYPRJAX_STRICT=1 and a test dependency is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, reason: str = ""):
    """Import and return `module`; `missing(...)` if it, or a module it imports, is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        why = str(e)
    missing(f"{module}: {why} ({reason or INSTALL})")


def need_installed(module: str, reason: str = "") -> None:
    """Like `need`, without importing `module` (importing a native build for the wrong CPU may SIGILL)."""
    if importlib.util.find_spec(module) is None:
        missing(f"{module} is not installed ({reason or INSTALL})")
