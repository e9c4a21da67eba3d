"""Shared test fixtures (tiny model builders live in tests/tiny_models.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
