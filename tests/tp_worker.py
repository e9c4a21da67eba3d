"""Tensor-parallel checks on forced host devices, run in a subprocess by tests/test_tensor_parallel.py.

`XLA_FLAGS=--xla_force_host_platform_device_count=4` must be set before JAX starts, so these
run in their own process (the rest of the suite keeps one device). Usage:

    python -m tests.tp_worker OUT.json CASE [CASE ...]

Each case builds a tiny transformers model and a PEFT adapter, then runs the same requests
(greedy, with logprobs; base and with the adapter) through an engine on one device and an engine
over a 4-device mesh, and the model forward (dense causal attention) with one-device and sharded
weights. It writes {case: results} as JSON; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyprjax.adapters.load import read_adapter
from hyprjax.adapters.registry import LoraRequest
from hyprjax.engine import paged
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams
from hyprjax.sharding import make_mesh, shard_params
from tests.adapters.peft_models import make_peft_adapter
from tests.tiny_models import make_hf_model

TP = 4
# arch, model overrides, attention backend (pallas: Pallas kernels in interpret mode under shard_map),
# warmup: compile every bucket first and count compiles while serving (must be none).
CASES = {
    "qwen3-kv4": dict(arch="qwen3", model=dict(num_key_value_heads=4), backend="xla", warmup=True),
    "qwen3-kv2": dict(arch="qwen3", model=dict(num_key_value_heads=2), backend="xla"),  # kv replicated
    "gemma3-kv4": dict(arch="gemma3", model=dict(num_key_value_heads=4), backend="xla"),
    "gemma3-kv1": dict(arch="gemma3", model=dict(num_key_value_heads=1), backend="xla"),  # kv replicated
    "qwen3-kv4-int8": dict(arch="qwen3", model=dict(num_key_value_heads=4), backend="xla", quantization="int8"),
    "qwen3-kv4-int4": dict(arch="qwen3", model=dict(num_key_value_heads=4, intermediate_size=128), backend="xla",
                           quantization="int4"),
    # a GGUF's Q8_0 blocks kept packed (codes + f16 scale per 32), loaded from a file written here
    "qwen3-kv4-keep": dict(arch="qwen3", model=dict(num_key_value_heads=4, intermediate_size=128), backend="xla",
                           quantization="keep", gguf="Q8_0"),
    "pallas-qwen3-kv4": dict(arch="qwen3", model=dict(num_key_value_heads=4, head_dim=32), backend="pallas"),
    "pallas-gemma3-kv2": dict(arch="gemma3", model=dict(num_key_value_heads=2), backend="pallas"),  # kv replicated
}
# a float32 KV cache in every case: the quantized ones would get bfloat16 under `auto`, where an
# all-reduce's last-bit difference in K/V can round to another bfloat16 value (TOL is 1e-5)
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, max_model_len=64,
              block_q=8, num_pages=24, max_loras=2, max_lora_rank=8, max_logprobs=4, kv_cache_dtype="float32")
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
VARIED = [GREEDY, SamplingParams(max_tokens=4, temperature=0.8, top_k=5, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=3, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                         seed=4, ignore_eos=True)]

_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _compiles.append(name) if name.endswith("backend_compile_duration") else None)

_traced: list[str] = []  # shard_map wrappers of the Pallas kernels met while tracing


def _counting(fn, what):
    def wrapped(*args, **kw):
        _traced.append(what)
        return fn(*args, **kw)
    return wrapped


paged._sharded_attention = _counting(paged._sharded_attention, "attention")
paged._sharded_lora = _counting(paged._sharded_lora, "lora")


def _serve(engine, prompts, params, loras):
    """Every request at once, stepped to the end: [(tokens, [chosen logprob, top logprobs...] per token)]."""
    ids = [engine.add_request(p, sp, logprobs=3, lora=lr) for p, sp, lr in zip(prompts, params, loras)]
    out = {rid: ([], []) for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend([lp.logprob] + [v for _, v in lp.top] for lp in o.logprobs)
    return [out[rid] for rid in ids]


def _forward_diff(model, cfg, mesh) -> float:
    """Max |logits| difference of the model forward (causal attention), sharded vs one device."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 11)), jnp.int32)
    positions = jnp.asarray(np.stack([np.arange(11), np.r_[np.arange(8), -1, -1, -1]]), jnp.int32)
    forward = jax.jit(lambda state, t, p: nnx.merge(graphdef, state)(t, p)[0])
    one = forward(state, tokens, positions)
    sharded = forward(shard_params(state, cfg, mesh), tokens, positions)
    return float(jnp.max(jnp.abs(one - sharded)))


def _layer0(state):
    """Layer 0's weights (the CPU layout's layer-wise step, engine/step.py), or the stacked layers."""
    return state.layer_state(0) if hasattr(state, "layer_state") else state["layers"]


def _matrix_spec(state, module: str) -> str:
    params = _layer0(state)["attn"][module]
    kernel = params["kernel"][...]
    spec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
    packed = params.get("qscale") is not None  # codes are stored [dout, din] (hyprjax/qformat.py)
    return str(spec[-2:][::-1] if packed else spec[-2:])


def _scale_spec(state, module: str) -> str | None:
    scale = _layer0(state)["attn"][module].get("qscale")
    if scale is None:
        return None
    spec = tuple(scale[...].sharding.spec) + (None,) * (scale[...].ndim - len(scale[...].sharding.spec))
    return str(spec[-2:])  # [dout, groups]


def _embed_scale_spec(state) -> str | None:
    scale = getattr(state, "shell", state)["embed"].get("qscale")
    return None if scale is None else str(scale[...].sharding.spec)


def run_case(name: str, tmp: str) -> dict:
    case = CASES[name]
    hf = make_hf_model(f"{tmp}/{name}", case["arch"], seed=0, **case["model"])
    make_peft_adapter(hf, f"{tmp}/{name}-lora", seed=1, r=8)
    source = f"{tmp}/{name}"
    if case.get("gguf"):
        from hyprjax.formats.gguf_write import write_gguf

        cfg = load_model(source, with_tokenizer=False, progress=False).cfg
        source = f"{tmp}/{name}.gguf"
        write_gguf(source, cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, qtype=case["gguf"])
    lm = load_model(source, with_tokenizer=False, progress=False, quantization=case.get("quantization", "none"))
    mesh = make_mesh(TP)
    ecfg = EngineConfig(attention_backend=case["backend"], **ENGINE)
    interpret = case["backend"] == "pallas"
    adapter = read_adapter(f"{tmp}/{name}-lora", "a", lm.cfg, ENGINE["max_lora_rank"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, lm.cfg.vocab_size, n).tolist() for n in (3, 13, 21)]
    lora = LoraRequest.make(["a"])
    loras = [None, lora, lora]  # one base request and two with the adapter, in one batch

    one = LLMEngine(lm.model, lm.cfg, None, ecfg, warmup=False, progress=False, interpret=interpret)
    one.add_adapter(adapter)
    expect = _serve(one, prompts, [GREEDY] * 3, loras)
    del one

    tp = LLMEngine(lm.model, lm.cfg, None, ecfg, warmup=case.get("warmup", False), progress=False,
                   interpret=interpret, mesh=mesh)
    tp.add_adapter(adapter)
    before = len(_compiles)
    _traced.clear()
    got = _serve(tp, prompts, [GREEDY] * 3, loras)
    if case.get("warmup"):  # a varied workload after warm-up: sampling, penalties, preemption-free
        _serve(tp, prompts[::-1], VARIED, [lora, None, lora])
        _serve(tp, prompts[:1], [VARIED[1]], [None])
    compiles = len(_compiles) - before

    runner = tp.runner
    a_q, b_q = tp.lora.tables["q_proj"]
    a_o, b_o = tp.lora.tables["o_proj"]
    return dict(
        tokens_equal=[g[0] == e[0] for g, e in zip(got, expect)],
        tokens=[g[0] for g in got],
        max_logprob_diff=max(float(np.max(np.abs(np.asarray(g[1]) - np.asarray(e[1])))) for g, e in zip(got, expect)),
        forward_max_diff=_forward_diff(lm.model, lm.cfg, mesh),
        compiles=compiles,  # while serving: none after a warm-up, some without one (the counter works)
        kv_spec=str(runner.cache.k.sharding.spec),
        penalty_spec=str(runner.counts.sharding.spec),
        # the [din, dout] dims of layer 0's kernels (stacked on GPU/TPU: [L, din, dout]; per layer on CPU)
        q_kernel_spec=_matrix_spec(runner.state, "q_proj"),
        k_kernel_spec=_matrix_spec(runner.state, "k_proj"),
        o_kernel_spec=_matrix_spec(runner.state, "o_proj"),
        q_scale_spec=_scale_spec(runner.state, "q_proj"),
        o_scale_spec=_scale_spec(runner.state, "o_proj"),
        embed_scale_spec=_embed_scale_spec(runner.state),
        embed_spec=str(getattr(runner.state, "shell", runner.state)["embed"]["embedding"][...].sharding.spec),
        lora_q_specs=[str(a_q.sharding.spec), str(b_q.sharding.spec)],
        lora_o_specs=[str(a_o.sharding.spec), str(b_o.sharding.spec)],
        shard_map_traced=sorted(set(_traced)),
        kernel_heads=None if runner._kernel_sharding is None else runner._kernel_sharding.heads,
        num_devices=len(jax.devices()),
    )


def main(out: str, names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in names:
            try:
                results[name] = run_case(name, tmp)
            except Exception as e:  # one case failing must not hide the others' results
                results[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
