"""The learning store and version directories, without a model: what is held out, what a round
commits, what rollback does, and that a half-written version never shows."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hyprjax.adapters.lora import LoraAdapter, LoraModule
from hyprjax.adapters.peft import read_peft
from hyprjax.config import ModelConfig
from hyprjax.learn.store import Store
from hyprjax.learn.versions import FAULT_VAR, sweep, version_dir, write_version


def _store(tmp_path, n=0, kind="correction", value="Lutz.", prompts=None):
    store = Store(tmp_path / "learn.db")
    store.create_adapter("bot", "digest", str(tmp_path / "v0"), {})
    for i in range(n):
        q = f"q{i % prompts if prompts else i}"
        store.record(f"c{i}", "bot", 0, {"messages": [{"role": "user", "content": q}]}, [f"a{i}"])
        store.add_feedback(f"c{i}", 0, kind, value, heldout_every=5)
    return store


def test_the_store_is_sqlite_in_wal_mode_and_keeps_interactions(tmp_path):
    store = _store(tmp_path, 1)
    assert sqlite3.connect(tmp_path / "learn.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    got = store.interaction("c0")
    assert got == {"adapter": "bot", "version": 0, "request": {"messages": [{"role": "user", "content": "q0"}]},
                   "responses": ["a0"], "finish": ["stop"]}
    assert store.interaction("nope") is None


def test_one_prompt_in_five_is_held_out_from_the_third_and_negatives_never(tmp_path):
    store = _store(tmp_path, 12)  # 12 distinct prompts
    held = [f.heldout for f in store.feedback("bot")]
    assert held == [i % 5 == 2 for i in range(12)]
    store.record("neg", "bot", 0, {"prompt": "p"}, ["bad"])
    _, heldout = store.add_feedback("neg", 0, "label", False, heldout_every=5)
    assert not heldout
    # A second item about a prompt already held out stays held out: never trained and judged on.
    _, again = store.add_feedback("c2", 0, "label", True, heldout_every=5)
    assert again
    counts = store.feedback_counts("bot")
    assert counts["total"] == 14 and counts["heldout"] == 3 and counts["by_kind"] == {"correction": 12, "label": 2}
    assert counts["new"] == 10  # 12 corrections, 2 held out; the negative label trains nothing


def test_the_split_is_by_prompt_both_ways(tmp_path):
    # Five prompts asked four times each: the third prompt is held out whole, the rest trained whole,
    # whichever order the feedback comes in.
    store = _store(tmp_path, 20, prompts=5)
    by_prompt = {}
    for f in store.feedback("bot"):
        by_prompt.setdefault(f.request["messages"][0]["content"], set()).add(f.heldout)
    assert by_prompt == {"q0": {False}, "q1": {False}, "q2": {True}, "q3": {False}, "q4": {False}}


def test_scores_split_at_one_half(tmp_path):
    store = _store(tmp_path)
    store.record("a", "bot", 0, {"prompt": "p"}, ["x"])
    store.record("b", "bot", 0, {"prompt": "p"}, ["x"])
    store.add_feedback("a", 0, "score", 0.5, heldout_every=5)
    store.add_feedback("b", 0, "score", 0.49, heldout_every=5)
    assert store.feedback_counts("bot")["new"] == 1


def test_a_promoted_round_moves_the_alias_marks_what_it_learned_and_rollback_returns(tmp_path):
    store = _store(tmp_path, 6)
    train = [f.seq for f in store.feedback("bot") if not f.heldout]
    assert store.finish_round("bot", 1, 0, "p1", {"heldout_loss": 1.0}, promote=True, trained_seqs=train, seen_seq=6)
    state = store.adapter("bot")
    assert state["live"] == 1 and state["history"] == [0] and state["trained_seq"] == 6
    assert store.feedback_counts("bot")["new"] == 0 and store.feedback_counts("bot")["learned"] == 5
    store.finish_round("bot", 2, 1, "p2", {"heldout_loss": 2.0}, promote=False, trained_seqs=[], seen_seq=6)
    assert store.adapter("bot")["live"] == 1
    assert [(v.version, v.status) for v in store.versions("bot")] == [(0, "initial"), (1, "promoted"), (2, "rejected")]
    assert store.rollback("bot") == (1, 0)
    assert store.adapter("bot")["live"] == 0
    assert [v.status for v in store.versions("bot")][1] == "rolled_back"
    with pytest.raises(Exception, match="nothing to roll back to"):
        store.rollback("bot")
    # A round whose parent stopped being live while it trained is never promoted over the rollback.
    metrics = {}
    assert not store.finish_round("bot", 3, 1, "p3", metrics, promote=True, trained_seqs=[], seen_seq=6)
    assert store.adapter("bot")["live"] == 0 and "stopped being live" in metrics["reason"]


def test_version_numbers_are_never_handed_out_twice(tmp_path):
    store = _store(tmp_path)
    assert [store.next_version("bot") for _ in range(3)] == [1, 2, 3]
    assert Store(tmp_path / "learn.db").next_version("bot") == 4  # a restart goes on counting


def test_a_foreign_database_is_refused(tmp_path):
    db = tmp_path / "other.db"
    sqlite3.connect(db).execute("CREATE TABLE versions (x)")
    with pytest.raises(Exception, match="not a hyprjax learning database"):
        Store(db)


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = _store(tmp_path, 3)

    def half(cur):
        cur.execute("UPDATE adapters SET live=7 WHERE adapter='bot'")
        raise sqlite3.IntegrityError("fails after a write")

    with pytest.raises(sqlite3.IntegrityError):
        store._tx(half)
    assert store.adapter("bot")["live"] == 0


CFG = ModelConfig(arch="qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8)


def _adapter():
    rng = np.random.default_rng(0)
    mods = {(layer, "q_proj"): LoraModule(rng.standard_normal((16, 4), np.float32),
                                          rng.standard_normal((4, 16), np.float32), 2.0) for layer in range(2)}
    return LoraAdapter("bot", "", mods)


def test_a_version_is_written_whole_and_is_immutable(tmp_path):
    path = write_version(tmp_path, _adapter(), "bot", 1, CFG, {"parent": 0})
    assert path == version_dir(tmp_path, "bot", 1)
    assert json.loads((path / "version.json").read_text())["parent"] == 0
    back = read_peft(path / "adapter", "bot@v1", CFG)
    np.testing.assert_array_equal(back.modules[(1, "q_proj")].b, _adapter().modules[(1, "q_proj")].b)
    with pytest.raises(FileExistsError):
        write_version(tmp_path, _adapter(), "bot", 1, CFG, {})
    assert not [p for p in (tmp_path / "bot").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("point", ["mid-write"])
def test_a_process_killed_mid_write_leaves_no_visible_version_and_sweep_cleans_up(tmp_path, point):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.getcwd()!r})
        from tests.learn.test_store import _adapter, CFG
        from hyprjax.learn.versions import write_version
        write_version({str(tmp_path)!r}, _adapter(), "bot", 1, CFG, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, FAULT_VAR: point}, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = [p.name for p in (tmp_path / "bot").iterdir()]
    assert "v1" not in left and left and all(n.startswith(".v1.tmp-") for n in left)
    # An orphan vN (renamed, never committed) goes too; known versions stay.
    write_version(tmp_path, _adapter(), "bot", 2, CFG, {})
    write_version(tmp_path, _adapter(), "bot", 3, CFG, {})
    removed = sweep(tmp_path, "bot", known={2})
    assert sorted(p.name for p in removed) == sorted(left + ["v3"])
    assert [p.name for p in (tmp_path / "bot").iterdir()] == ["v2"]


def test_one_process_at_a_time_uses_a_database_and_versions_sit_beside_it(tmp_path):
    from hyprjax.learn.versions import lock_database, versions_root

    held = lock_database(tmp_path / "learn.db")
    with pytest.raises(Exception, match="another process is using this learning database"):
        lock_database(tmp_path / "learn.db")
    held.close()
    lock_database(tmp_path / "learn.db").close()
    assert versions_root(tmp_path / "a.db") != versions_root(tmp_path / "b.db")
