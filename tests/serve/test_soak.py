"""bench/soak.py at CI size: a live server under 16 streaming clients for 20 s (random disconnects,
two adapters and their mixes, malformed requests), then its three counts must be 0.

The soak runs as its own process, as a user runs it, so its server, engine and client threads
never share the test process. Run in process, it was followed in two fresh-clone CI runs by a
segfault inside XLA's compiler in a later test (tests/test_sampling.py); not reproduced with
fewer tests in between, cause not found.
"""

import json
import subprocess
import sys
from pathlib import Path

from bench.make_model import make_model

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_has_no_5xx_no_leaked_pages_and_no_solo_mismatches(tmp_path):
    model = make_model("tiny", "F32", tmp_path / "tiny.gguf", progress=False)
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "bench/soak.py", "--model", str(model), "--clients", "16", "--duration",
                           "20", "--solo-checks", "60", "--max-num-seqs", "8", "--num-pages", "256",
                           "--max-model-len", "512", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    print(proc.stdout)
    assert r["server_errors"] == 0, r["server_error_examples"]
    assert r["leaked_pages"] == 0 and r["running_after_drain"] == 0
    assert r["solo_mismatches"] == 0, r["mismatch_examples"]
    # the load really had each kind of traffic
    assert r["completed"] >= 10 and r["disconnects"] >= 3 and r["malformed_refused"] >= 3, r
    assert r["malformed_accepted"] == 0
    assert proc.returncode == 0, proc.stderr[-3000:]
