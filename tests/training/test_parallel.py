"""Training over 4 simulated CPU devices (data-parallel, and data x tensor parallel) gives the
one-device loss curve and adapter (tests/training/dp_worker.py runs them in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.training.dp_worker", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
@pytest.mark.parametrize("mesh", ["dp4", "dp2-tp2"])
def test_parallel_training_matches_one_device(runs, arch, mesh):
    one, many = runs[f"{arch}/1"], runs[f"{arch}/{mesh}"]
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0]
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=0, atol=1e-5)
    for key, (a, b) in one["factors"].items():
        np.testing.assert_allclose(many["factors"][key][0], a, rtol=0, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(many["factors"][key][1], b, rtol=0, atol=1e-5, err_msg=key)
