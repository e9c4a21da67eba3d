"""Test dependencies: a missing one skips the test, or fails it under HYPRJAX_STRICT=1.

CI (.ci/run) sets HYPRJAX_STRICT=1, so it can never pass by skipping what the `test` extra should
have installed. Device-only tests ("needs a GPU or TPU") call pytest.skip directly: no CPU
machine can run them, strict or not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

STRICT = os.environ.get("HYPRJAX_STRICT", "") == "1"
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
