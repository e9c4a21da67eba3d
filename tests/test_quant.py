"""Weight-only int8 (hyprjax/quant.py): the packed matmul against its dequantized reference, and
the quantized model against transformers running the same int8 values (fake-quantized weights).

The reference quantizer here is written independently in numpy: symmetric, one scale per output
channel (max |w| / 127), round half to even. transformers then runs those dequantized weights in
float32, so our int8 model must give its logits within float rounding (atol 1e-4, as
test_model.py), and greedy tokens exactly.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hyprjax import quant
from hyprjax.cli import build_parser
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.errors import HyprjaxError
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams
from tests.tiny_models import hf_greedy, hf_logits, make_hf_model

ATOL = 1e-4
PROMPT = [5, 17, 33, 2, 250, 9, 11, 64, 31]


def _np_quantize(w: np.ndarray) -> np.ndarray:
    """w [out, in] -> its int8 values dequantized, one scale per row (the reference quantizer)."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32-gemm", "bf16x3-gemm"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dout", [96, 384])
def test_qdot_equals_the_dequantized_matmul(rows, dout, bf16, monkeypatch):
    """One row (the fused convert-and-dot) and several (the blocked scan; 384 rows of 64 make 4
    blocks of 96 at the patched block size), with the blocks' GEMM in float32 or as three
    bfloat16 terms (the AMX path; XLA computes bf16 dots on any CPU, so both run everywhere)."""
    monkeypatch.setattr(quant, "BLOCK_WEIGHTS", 96 * 64)
    monkeypatch.setattr(quant, "bf16_gemm", lambda: bf16)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((dout, 64)).astype(np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    q, scale = quant.quantize_rows(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(quant.dequantize(q, scale)), _np_quantize(w), rtol=1e-6)  # scales to 1 ulp
    want = x @ _np_quantize(w).T
    np.testing.assert_allclose(np.asarray(quant.qdot(jnp.asarray(x), q, scale)), want, rtol=1e-5, atol=1e-5)


def test_bf16_terms_sum_to_x():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 50)) * 1e3, jnp.float32)
    terms = quant._bf16_terms(x).astype(jnp.float32).reshape(quant.SPLIT_TERMS, 3, 50)
    np.testing.assert_allclose(np.asarray(terms[2] + terms[1] + terms[0]), np.asarray(x), rtol=2e-7)


def test_bf16_gemm_can_be_forced(monkeypatch):
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("HYPRJAX_BF16_GEMM", value)
        quant.bf16_gemm.cache_clear()
        assert quant.bf16_gemm() is want
    quant.bf16_gemm.cache_clear()


def test_block_rows_divide_the_output():
    assert quant._block_rows(151936, 1024) * 1024 <= quant.BLOCK_WEIGHTS
    assert 151936 % quant._block_rows(151936, 1024) == 0
    assert quant._block_rows(64, 64) == 64  # small matrices: one block


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(HyprjaxError, match="quantization='int4'.*none, int8"):
        load_model("/nonexistent", quantization="int4")
    assert build_parser().parse_args(["serve", "m", "--quantization", "int8"]).quantization == "int8"
    assert build_parser().parse_args(["generate", "m", "-p", "x"]).quantization == "auto"


def _fake_quantize(hf) -> None:
    """Replace every linear weight and the embedding of a transformers model by its int8 values."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2:  # nn.Linear [out, in] and nn.Embedding [vocab, hidden]: rows are channels
                p.copy_(torch.from_numpy(_np_quantize(p.numpy())))


@pytest.fixture(scope="module", params=[("qwen3", {}), ("qwen3", dict(tie_word_embeddings=False)), ("gemma3", {})],
                ids=["qwen3-tied", "qwen3-untied", "gemma3"])
def pair(request, tmp_path_factory):
    arch, overrides = request.param
    d = tmp_path_factory.mktemp(arch)
    hf = make_hf_model(d, arch, **overrides)
    ours = load_model(d, with_tokenizer=False, progress=False, quantization="int8")
    _fake_quantize(hf)
    return hf, ours


def test_int8_weights_are_int8_on_the_device(pair):
    _, ours = pair
    attn = ours.model.layers[0].attn
    assert attn.q_proj.kernel[...].dtype == jnp.int8 and attn.q_proj.qscale[...].dtype == jnp.float32
    assert attn.q_proj.kernel[...].shape == (ours.cfg.num_heads * ours.cfg.head_dim, ours.cfg.hidden_size)  # [dout, din]
    assert ours.model.embed.embedding[...].dtype == jnp.int8
    assert ours.model.compute_dtype == jnp.float32


def test_int8_logits_match_transformers_on_the_same_int8_values(pair):
    hf, ours = pair
    tokens = jnp.asarray([PROMPT], jnp.int32)
    logits, _ = ours.model(tokens, jnp.arange(len(PROMPT), dtype=jnp.int32)[None])
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_int8_engine_greedy_tokens_equal_transformers(pair):
    """Through the paged engine (one decode row: the fused one-row matmul; the prefill: blocked)."""
    hf, ours = pair
    eng = LLMEngine(ours.model, ours.cfg, None, EngineConfig(max_model_len=64, max_num_seqs=4), warmup=False,
                    progress=False)
    assert eng.runner.cache.k.dtype == jnp.float32  # the pool follows the activations, not the int8 weights
    eng.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    got = []
    while eng.has_unfinished():
        for out in eng.step():
            got += out.new_token_ids
    assert got == hf_greedy(hf, PROMPT, 12)


@pytest.mark.parametrize("qtype,want", [("Q8_0", "int8"), ("Q4_0", "int8"), ("F16", "none")])
def test_auto_keeps_a_quantized_gguf_quantized_on_cpu(qtype, want, tmp_path):
    """`auto` (the default of LLM and the CLI): int8 for a file of quantized blocks on CPU, float
    weights for a float file; `load_model`'s own default stays "none"."""
    from hyprjax.formats.gguf_write import write_gguf

    hf = make_hf_model(tmp_path / "m", "qwen3", vocab_size=512)
    st = load_model(tmp_path / "m", with_tokenizer=False, progress=False)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, st.cfg, tensors, qtype=qtype)
    auto = load_model(path, with_tokenizer=False, progress=False, quantization="auto").model
    plain = load_model(path, with_tokenizer=False, progress=False).model
    assert (auto.embed.embedding[...].dtype == jnp.int8) == (want == "int8")
    assert plain.embed.embedding[...].dtype == jnp.float32


def test_device_bytes_from_the_name_table_equal_the_loaded_arrays(pair):
    """`hyprjax info --memory` counts from the name table alone; the loaded int8 model's arrays
    (and the float32 model's, for `none`) must add up to the same bytes."""
    from flax import nnx

    from hyprjax.model import abstract_model

    _, ours = pair
    loaded = sum(x.nbytes for x in jax.tree.leaves(nnx.state(ours.model)))
    assert quant.device_bytes(ours.cfg, "int8") == loaded
    abstract = abstract_model(ours.cfg, jnp.float32)  # the float32 model's shapes, from the model code
    assert quant.device_bytes(ours.cfg, "none") == sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


def test_info_memory_prints_each_mode(tmp_path, capsys):
    from hyprjax.cli import main

    make_hf_model(tmp_path / "m", "qwen3")
    assert main(["info", str(tmp_path / "m"), "--memory", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"device bytes float32", "device bytes bfloat16", "device bytes int8"} <= set(info)
    assert info["quantization auto"] == "none"  # a float (SafeTensors) model stays float
