"""bench/soak.py at CI size: a live server under 16 streaming clients for 20 s (random disconnects,
two adapters and their mixes, malformed requests), then its three counts must be 0."""

from bench.make_model import make_model
from bench.soak import run_soak, table


def test_a_short_soak_has_no_5xx_no_leaked_pages_and_no_solo_mismatches(tmp_path):
    model = make_model("tiny", "F32", tmp_path / "tiny.gguf", progress=False)
    r = run_soak(str(model), clients=16, duration=20, solo=60, max_num_seqs=8, num_pages=256, max_model_len=512)
    print(table(r))
    assert r["server_errors"] == 0, r["server_error_examples"]
    assert r["leaked_pages"] == 0 and r["running_after_drain"] == 0
    assert r["solo_mismatches"] == 0, r["mismatch_examples"]
    # the load really had each kind of traffic
    assert r["completed"] >= 10 and r["disconnects"] >= 3 and r["malformed_refused"] >= 3, r
    assert r["malformed_accepted"] == 0
