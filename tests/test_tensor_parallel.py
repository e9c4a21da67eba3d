"""Tensor parallelism (hyprjax/sharding.py): the rules, and sharded runs equal to one device.

The rules are checked here against an abstract 4-device mesh. Sharded runs need several devices,
and `--xla_force_host_platform_device_count` works only before JAX starts, so they run in
subprocesses (tests/tp_worker.py: 4 host devices; tests/tp_multihost_worker.py: two processes of
2 devices joined by `jax.distributed.initialize`); the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from hyprjax.config import ModelConfig
from hyprjax.errors import HyprjaxError
from hyprjax.formats.names import lora_axes, param_axes, tensor_table
from hyprjax.sharding import KV_POOL_AXES, RULES, logical_spec, make_mesh

ROOT = Path(__file__).resolve().parent.parent
MESH4 = AbstractMesh((4,), ("tp",), axis_types=(AxisType.Auto,))
TOL = 1e-5


def _cfg(**kw):
    base = dict(arch="qwen3", vocab_size=320, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=24)
    return ModelConfig(**{**base, **kw})


def _specs(cfg, mesh=MESH4):
    shapes = {s.path: s.shape if s.layer is None else (cfg.num_layers, *s.shape) for s in tensor_table(cfg)}
    return {path: logical_spec(axes, shapes[path], cfg, mesh) for path, axes in param_axes(cfg).items()}


def test_every_logical_axis_has_a_rule():
    cfg = _cfg(qkv_bias=True, tie_word_embeddings=False)
    named = {a for axes in param_axes(cfg).values() for a in axes} | set(KV_POOL_AXES)
    named |= {a for pair in lora_axes(cfg).values() for axes in pair for a in axes}
    assert named - {None} <= set(RULES)


def test_column_row_and_vocab_parallel_specs():
    cfg = _cfg(num_kv_heads=4, qkv_bias=True, tie_word_embeddings=False)
    s = _specs(cfg)
    col, row = P(None, None, "tp"), P(None, "tp", None)
    for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/gate_proj", "mlp/up_proj"):
        assert s[("layers", *m.split("/"), "kernel")] == col, m
    assert s[("layers", "attn", "q_proj", "bias")] == P(None, "tp")
    assert s[("layers", "attn", "o_proj", "kernel")] == row
    assert s[("layers", "mlp", "down_proj", "kernel")] == row
    assert s[("embed", "embedding")] == P("tp", None)
    assert s[("lm_head", "kernel")] == P(None, "tp")
    for path, spec in s.items():  # norms replicated; the stacked layer axis never split
        if path[-1] == "scale":
            assert all(a is None for a in spec), path
        if path[0] == "layers":
            assert spec[0] is None, path
    assert logical_spec(KV_POOL_AXES, (2, 8, 16, 4, 24), cfg, MESH4) == P(None, None, None, "tp", None)


def test_too_few_kv_heads_replicate_kv_and_the_pool():
    cfg = _cfg(num_kv_heads=2)  # K*H = 48 divides 4, but 2 heads do not: never split a head
    s = _specs(cfg)
    assert s[("layers", "attn", "k_proj", "kernel")] == P(None, None, None)
    assert s[("layers", "attn", "q_proj", "kernel")] == P(None, None, "tp")
    assert logical_spec(KV_POOL_AXES, (2, 8, 16, 2, 24), cfg, MESH4) == P(None, None, None, None, None)
    assert _specs(cfg, AbstractMesh((2,), ("tp",), axis_types=(AxisType.Auto,)))[
        ("layers", "attn", "k_proj", "kernel")] == P(None, None, "tp")


def test_a_vocab_that_does_not_divide_is_replicated_and_logged_once(caplog):
    cfg = _cfg(vocab_size=322)
    with caplog.at_level(logging.INFO, logger="hyprjax.sharding"):
        assert _specs(cfg)[("embed", "embedding")] == P(None, None)
        _specs(cfg)
    assert sum("vocab (322) does not divide" in r.getMessage() for r in caplog.records) == 1


def test_bad_tensor_parallel_is_refused_before_loading():
    with pytest.raises(ValueError, match="tensor_parallel=0"):
        make_mesh(0)
    with pytest.raises(ValueError, match="exceeds"):
        make_mesh(10_000)
    import hyprjax

    with pytest.raises(HyprjaxError, match="tensor_parallel"):
        hyprjax.LLM("/no/such/model", tensor_parallel=0)
    with pytest.raises(HyprjaxError, match="exceeds"):
        hyprjax.LLM("/no/such/model", tensor_parallel=10_000)


def test_cli_flags():
    from hyprjax.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "m", "-p", "x"]).tensor_parallel == 1
    assert parser.parse_args(["generate", "m", "-p", "x", "--tensor-parallel", "4"]).tensor_parallel == 4
    assert parser.parse_args(["serve", "m", "--tensor-parallel", "2"]).tensor_parallel == 2


# ---- sharded runs on forced host devices ------------------------------------------------------------

XLA_CASES = ["qwen3-kv4", "qwen3-kv2", "gemma3-kv4", "gemma3-kv1", "qwen3-kv4-int8", "qwen3-kv4-int4", "qwen3-kv4-keep"]
PALLAS_CASES = ["pallas-qwen3-kv4", "pallas-gemma3-kv2"]
KV_SHARDED = {"qwen3-kv4", "gemma3-kv4", "pallas-qwen3-kv4", "qwen3-kv4-int8", "qwen3-kv4-int4", "qwen3-kv4-keep"}


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tests.tp_worker", str(out), *XLA_CASES, *PALLAS_CASES],
                          cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _ok(tp_results, case):
    r = tp_results[case]
    assert "error" not in r, r.get("traceback")
    assert r["num_devices"] == 4
    return r


@pytest.mark.slow
@pytest.mark.parametrize("case", XLA_CASES + PALLAS_CASES)
def test_sharded_engine_equals_one_device(tp_results, case):
    """Greedy tokens equal and logprobs (chosen and top 3) within 1e-5 over 4 devices, base and
    with a PEFT adapter in one batch; the dense forward's logits within 1e-5 too."""
    r = _ok(tp_results, case)
    assert all(r["tokens_equal"]), r["tokens"]
    assert r["max_logprob_diff"] <= TOL
    assert r["forward_max_diff"] <= TOL
    assert r["embed_spec"] == "P('tp', None)" and r["q_kernel_spec"] == "(None, 'tp')"
    assert r["o_kernel_spec"] == "('tp', None)" and r["penalty_spec"] == "P(None, 'tp')"
    assert r["lora_q_specs"][1].endswith("'tp')") and "'tp'" not in r["lora_q_specs"][0]
    assert "'tp'" in r["lora_o_specs"][0] and "'tp'" not in r["lora_o_specs"][1]
    if case in KV_SHARDED:
        assert "'tp'" in r["kv_spec"] and "'tp'" in r["k_kernel_spec"] and r["kernel_heads"] == "tp"
    else:  # fewer kv heads than devices: k/v and the pool replicated, the attention kernel run whole
        assert "'tp'" not in r["kv_spec"] and "'tp'" not in r["k_kernel_spec"] and r["kernel_heads"] is None
    if case.endswith(("int8", "int4", "keep")):  # codes [dout, din] on the device (reported as [din, dout] above),
        # scales [dout, groups] split with the output channels; one group per row (o_proj) stays whole
        assert r["q_scale_spec"] == "('tp', None)" and r["o_scale_spec"] == "(None, None)"
        assert r["embed_scale_spec"] in ("P('tp', None)", "P('tp',)")
    if case.startswith("pallas"):  # the Pallas kernels ran under shard_map (interpret mode on CPU)
        assert r["shard_map_traced"] == ["attention", "lora"]
    else:  # the XLA path is GSPMD's alone
        assert r["shard_map_traced"] == []


@pytest.mark.slow
def test_sharded_serving_compiles_nothing_after_warmup(tp_results):
    assert _ok(tp_results, "qwen3-kv4")["compiles"] == 0
    assert _ok(tp_results, "qwen3-kv2")["compiles"] > 0  # unwarmed: the counter does count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_through_jax_distributed(tmp_path):
    """Two processes x 2 host devices joined by jax.distributed.initialize: the sharded forward
    and the engine over the global 4-device mesh equal each process's one-device run."""
    from tests.tiny_models import make_hf_model

    make_hf_model(tmp_path / "model", "qwen3", num_key_value_heads=4)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_multihost_worker", str(tmp_path / "model"), str(port),
                               str(i), str(tmp_path / f"out{i}.json")], cwd=ROOT, env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, logs[i][-4000:]
        r = json.loads((tmp_path / f"out{i}.json").read_text())
        assert (r["process_index"], r["process_count"], r["global_devices"], r["local_devices"]) == (i, 2, 4, 2)
        assert r["fully_addressable"] is False  # the weights really span both processes
        assert r["forward_max_diff"] <= TOL
        assert "engine_error" not in r, r.get("engine_traceback")
        assert all(r["engine_tokens_equal"]) and r["engine_max_logprob_diff"] <= TOL
