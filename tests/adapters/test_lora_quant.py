"""Quantized LoRA adapters (`lora_quantization` int8 / int4) against PEFT with fake-quantized factors."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from tests.adapters.peft_models import make_peft_adapter, paged_logits, peft_logits, torch
from tests.quant_reference import fake_quant
from tests.tiny_models import hf_greedy, make_hf_model
from hyprjax.adapters.load import read_adapter
from hyprjax.adapters.lora import LoraAdapter, LoraModule
from hyprjax.adapters.merge import merge_adapters
from hyprjax.adapters.quantized import QuantizedLoraModule, dequantize_host, quantize_adapter
from hyprjax.adapters.registry import LoraRegistry, LoraRequest
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.errors import ConfigError, HyprjaxError
from hyprjax.formats.load import load_model
from hyprjax.qformat import dequantize, quantize_rows
from hyprjax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_seqs=2, page_size=8, max_model_len=128,
              block_q=8, num_pages=64)


def ref_fake_quant(w: np.ndarray, mode: str) -> np.ndarray:
    """Each row of w quantized and back by the spec-only reference (tests/quant_reference.py)."""
    return fake_quant(w, mode)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Qwen3 (widths 64, 96, 48 and 112: int4 groups of 32 and the int8 fallback),
    one PEFT adapter on all seven modules, and our read of it."""
    d = tmp_path_factory.mktemp("qlora")
    hf = make_hf_model(d / "base", "qwen3", vocab_size=400)
    lm = load_model(d / "base", with_tokenizer=False, progress=False)
    pm = make_peft_adapter(hf, d / "q", seed=5, r=8, alpha=16, magnitude=0.15)
    return dict(dir=d, hf=hf, lm=lm, peft=pm, adapter=read_adapter(d / "q", "q", lm.cfg))


def _fake_quantized_peft(pm, mode: str):
    """A copy of the PeftModel with lora_A [r, din] and lora_B [dout, r] fake-quantized by rank vector."""
    pm = copy.deepcopy(pm)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.from_numpy(ref_fake_quant(p.numpy(), mode)))
            elif "lora_B" in name:
                p.copy_(torch.from_numpy(ref_fake_quant(p.numpy().T, mode).T.copy()))
    return pm


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_adapter_through_the_engine_equals_peft_with_fake_quantized_factors(world, mode, caplog):
    lm, adapter = world["lm"], world["adapter"]
    fq = _fake_quantized_peft(world["peft"], mode)
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=1, max_lora_rank=8, lora_quantization=mode,
                                                         **ENGINE), warmup=False, progress=False)
    with caplog.at_level(logging.INFO, logger="hyprjax.lora"):
        eng.add_adapter(adapter)
    assert f"kept as {mode}" in caplog.text and "MiB saved" in caplog.text
    assert isinstance(adapter.modules[(0, "q_proj")], LoraModule)  # the caller's adapter stays float

    # the host copy's factors are the reference's (to an ulp: XLA divides by 127 as a multiply)
    stored = eng.lora._get("q")
    for key, m in stored.modules.items():
        assert isinstance(m, QuantizedLoraModule)
        src = adapter.modules[key]
        np.testing.assert_allclose(m.a, ref_fake_quant(src.a.T, mode).T, rtol=1e-6, atol=0)
        np.testing.assert_allclose(m.b, ref_fake_quant(src.b, mode), rtol=1e-6, atol=0)

    prompt = list(range(7, 41))
    rid = eng.add_request(prompt, GREEDY, lora=LoraRequest.make(["q"]))
    tokens = []
    while eng.has_unfinished():
        tokens += [t for o in eng.step() if o.request_id == rid for t in o.new_token_ids]
    assert tokens == hf_greedy(fq, prompt, GREEDY.max_tokens)

    ours = paged_logits(lm, prompt, eng.lora.tables, ((eng.lora.slot("q"), 1.0),))
    ref = peft_logits(fq, prompt)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # and the quantization is visible: the float adapter's logits are further off than the tolerance
    assert np.abs(peft_logits(world["peft"], prompt) - ref).max() > 1e-2


def test_llm_lora_quantization_reaches_its_engine(world, tmp_path):
    """hyprjax.LLM(lora_quantization="int4"): load_lora keeps the adapter in int4, generate uses it."""
    import shutil

    from bench.make_model import build_tokenizer
    from hyprjax import LLM

    model_dir = tmp_path / "m"
    shutil.copytree(world["dir"] / "base", model_dir)
    build_tokenizer(400).save(str(model_dir / "tokenizer.json"))
    llm = LLM(str(model_dir), dtype="float32", progress=False, max_loras=1, max_lora_rank=8, lora_quantization="int4")
    llm.load_lora("q", world["dir"] / "q")
    assert llm.engine().ecfg.lora_quantization == "int4"
    assert isinstance(llm.engine().lora._get("q").modules[(1, "down_proj")], QuantizedLoraModule)
    prompt = list(range(11, 30))
    out = llm.generate([prompt], GREEDY, lora="q")[0].token_ids
    assert out == hf_greedy(_fake_quantized_peft(world["peft"], "int4"), prompt, GREEDY.max_tokens)


def test_merges_read_the_dequantized_factors(world):
    """A merge of quantized adapters equals the same merge of their dequantized factors as floats."""
    lm, adapter = world["lm"], world["adapter"]
    reg = LoraRegistry(lm.cfg, max_loras=1, max_rank=8, dtype=np.float32, quantization="int4")
    other = LoraAdapter("p", "", {k: LoraModule(m.a[:, ::-1].copy(), -m.b[::-1].copy(), m.scale * 0.5)
                                  for k, m in adapter.modules.items()})
    reg.add(adapter)
    reg.add(other)
    req = LoraRequest.make(["q", "p"], [0.7, 0.4], strategy="ties", density=0.5)
    merged = reg.prepare(req).adapter
    floats = [LoraAdapter(n, "", {k: LoraModule(m.a, m.b, m.scale) for k, m in reg._get(n).modules.items()})
              for n in ("q", "p")]
    want = merge_adapters(floats, [0.7, 0.4], "ties", density=0.5, name="w")
    assert set(merged.modules) == set(want.modules)
    for key, m in merged.modules.items():
        assert isinstance(m, LoraModule)  # a merged mix stays float
        np.testing.assert_array_equal(m.a, want.modules[key].a)
        np.testing.assert_array_equal(m.b, want.modules[key].b)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("width", [256, 96, 48])
def test_host_dequantize_equals_qformat_dequantize(mode, width):
    w = np.random.default_rng(width).normal(size=(8, width)).astype(np.float32)
    fmt, q = quantize_rows(w, mode)
    low = q.get("min")
    host = dequantize_host(fmt, np.asarray(q["codes"]), np.asarray(q["scale"]), None if low is None else np.asarray(low))
    np.testing.assert_array_equal(host, np.asarray(dequantize(fmt, q)))
    np.testing.assert_allclose(host, ref_fake_quant(w, mode), rtol=1e-6, atol=0)


def test_nbytes_are_the_packed_bytes():
    """int8: a quarter of float32 plus a scale per rank vector; int4: an eighth plus an f16 scale
    and minimum per 32."""
    rng = np.random.default_rng(0)
    r, din, dout, n = 8, 256, 512, 3
    adapter = LoraAdapter("x", "", {(i, "up_proj"): LoraModule(rng.normal(size=(din, r)).astype(np.float32),
                                                               rng.normal(size=(r, dout)).astype(np.float32), 2.0)
                                    for i in range(n)})
    floats = n * r * (din + dout) * 4
    assert adapter.nbytes == floats
    int8, int4 = quantize_adapter(adapter, "int8"), quantize_adapter(adapter, "int4")
    assert int8.nbytes == n * (r * (din + dout) + 2 * r * 4)
    assert int4.nbytes == n * (r * (din + dout) // 2 + r * (din + dout) // 32 * 4)
    assert 0.25 < int8.nbytes / floats < 0.26 and 0.125 < int4.nbytes / floats < 0.16
    assert quantize_adapter(adapter, "none") is adapter
    assert int4.rank == r and int4.target_modules == ["up_proj"]


def test_bad_lora_quantization_is_refused_by_name(monkeypatch, capsys, tmp_path):
    from hyprjax import LLM
    from hyprjax.cli import build_parser, main

    with pytest.raises(ConfigError, match=r"lora_quantization 'int3' is not one of none, int8, int4"):
        EngineConfig(lora_quantization="int3")
    with pytest.raises(ConfigError, match=r"lora_quantization 'fp8' is not one of none, int8, int4"):
        LoraRegistry(None, max_loras=1, max_rank=8, dtype=np.float32, quantization="fp8")
    with pytest.raises(ConfigError, match=r"lora_quantization 'int2'"):  # before the (missing) model loads
        LLM(tmp_path / "nowhere", lora_quantization="int2")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "m", "--lora-quantization", "int3"])
    assert e.value.code == 2
    assert "--lora-quantization: invalid choice: 'int3' (choose from 'none', 'int8', 'int4')" in capsys.readouterr().err

    # a good value reaches the engine's config
    import hyprjax.engine.config as engine_config

    seen = []

    def stop_at_config(**kw):
        seen.append(EngineConfig(**kw))
        raise HyprjaxError("stop here")

    monkeypatch.setattr("hyprjax.formats.load.load_model",
                        lambda *a, **k: SimpleNamespace(cfg=None, tokenizer=None, path=tmp_path))
    monkeypatch.setattr(engine_config, "EngineConfig", stop_at_config)
    assert main(["serve", str(tmp_path), "--lora-quantization", "int4"]) == 2
    assert seen[0].lora_quantization == "int4"


def test_adapter_dtype_is_refused_by_name_and_reaches_the_slot_tables(world, monkeypatch, capsys, tmp_path):
    """EngineConfig/LLM/serve adapter_dtype: a bad value is named before anything loads; bfloat16
    reaches the engine's slot tables (uint16 bits on the XLA path, kernels/lora.py)."""
    import shutil

    import jax.numpy as jnp

    from bench.make_model import build_tokenizer
    from hyprjax import LLM
    from hyprjax.cli import build_parser, main

    with pytest.raises(ConfigError, match=r"adapter_dtype='float16' is not one of auto, float32, bfloat16"):
        EngineConfig(adapter_dtype="float16")
    with pytest.raises(ConfigError, match=r"adapter_dtype='int8'"):  # before the (missing) model loads
        LLM(tmp_path / "nowhere", adapter_dtype="int8")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "m", "--adapter-dtype", "fp8"])
    assert e.value.code == 2 and "--adapter-dtype: invalid choice: 'fp8'" in capsys.readouterr().err

    import hyprjax.engine.config as engine_config

    seen = []

    def stop_at_config(**kw):
        seen.append(EngineConfig(**kw))
        raise HyprjaxError("stop here")

    with monkeypatch.context() as m:
        m.setattr("hyprjax.formats.load.load_model", lambda *a, **k: SimpleNamespace(cfg=None, tokenizer=None,
                                                                                     path=tmp_path))
        m.setattr(engine_config, "EngineConfig", stop_at_config)
        assert main(["serve", str(tmp_path), "--adapter-dtype", "bfloat16"]) == 2
    assert seen[0].adapter_dtype == "bfloat16"

    model_dir = tmp_path / "m"
    shutil.copytree(world["dir"] / "base", model_dir)
    build_tokenizer(400).save(str(model_dir / "tokenizer.json"))
    llm = LLM(str(model_dir), dtype="float32", progress=False, max_loras=1, max_lora_rank=8, adapter_dtype="bfloat16")
    llm.load_lora("q", world["dir"] / "q")
    assert llm.engine().lora.tables["down_proj"][1].dtype == jnp.uint16
    prompt = list(range(11, 30))
    assert llm.generate([prompt], GREEDY, lora="q")[0].token_ids != llm.generate([prompt], GREEDY)[0].token_ids
