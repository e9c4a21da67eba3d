"""Shared test fixtures (tiny model builders live in tests/tiny_models.py)."""

from __future__ import annotations

import gc
import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLM(...) and the CLI turn JAX's persistent compilation cache on. In this process it stays off
# (LLM's default keeps an earlier "off"): thousands of small test programs gain nothing from it.
# Subprocesses the tests start (the CLI, servers) use one temporary directory per test session,
# never ~/.cache.
os.environ.setdefault("HYPRJAX_CACHE_DIR", tempfile.mkdtemp(prefix="hyprjax-test-cache-"))

import numpy as np
import pytest

import tests.deps  # noqa: F401  (first: it keeps the repo's kernels/ from shadowing HF's `kernels`)

import jax  # noqa: E402

from hyprjax.compile_cache import enable_compile_cache  # noqa: E402
from tests.deps import STRICT, need  # noqa: E402

enable_compile_cache(False)

torch = need("torch")
transformers = need("transformers")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Forget every compiled program after each test module. XLA:CPU maps each executable's code
    into the process, and the suite compiles thousands: past vm.max_map_count (65530) the next
    compile aborts the whole run (seen: "Fatal Python error: Aborted" in a late engine test).
    Measured: test_qmatmul.py leaves 6,989 mappings, 804 after this."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _strict((yield))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _strict((yield))


def _strict(report):
    """Under HYPRJAX_STRICT=1, a skip from a bare pytest.importorskip (one that bypasses tests/deps.py)
    is a failure too."""
    if STRICT and report.skipped and "could not import" in str(report.longrepr):
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr  # (path, line, why)
        report.outcome, report.longrepr = "failed", f"HYPRJAX_STRICT=1 and a test dependency is missing: {why}"
    return report
