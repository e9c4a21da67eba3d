"""Quantized weights (hyprjax/quant.py, qformat.py): the packed matmul against its dequantized
reference, and quantized models against transformers running the same quantized values.

The reference quantizers (tests/quant_reference.py) are written independently in numpy: int8
symmetric with one scale per output channel, int4 asymmetric with an f16 scale and minimum per
32 input weights; under int4 the embedding and LM head stay int8. transformers then runs those
dequantized weights in float32, so our model
must give its logits within float rounding (atol 1e-4, as test_model.py) and greedy tokens
exactly. `keep` is checked against the dequantize-at-load path (`none`) on the same GGUF file,
whose dequantizer is the gguf package's.
"""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hyprjax import quant
from hyprjax.cli import build_parser
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.engine.paged import kv_storage_dtype
from hyprjax.errors import HyprjaxError
from hyprjax.formats.gguf_blocks import to_packed
from hyprjax.formats.load import load_model
from hyprjax.qformat import QFormat, int4_group, pack_nibbles, quantize_rows
from hyprjax.sampling import SamplingParams
from tests.quant_reference import fake_quant
from tests.tiny_models import hf_greedy, hf_logits, make_hf_model

ATOL = 1e-4
PROMPT = [5, 17, 33, 2, 250, 9, 11, 64, 31]


def _np_quantize(w: np.ndarray, mode: str = "int8") -> np.ndarray:
    """w [out, in] -> its quantized values dequantized (tests/quant_reference.py)."""
    return fake_quant(w, mode)


def random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random stored bytes of a [rows, cols] tensor of `type_name`, with sane f16 scales."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if type_name in ("F16", "BF16"):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, (rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    at = {"Q6_K": (size - 2,), "Q3_K": (size - 2,), "Q2_K": (size - 4, size - 2),
          "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(type_name, (0, 2) if type_name in ("Q4_1", "Q5_1") else (0,))
    for k, off in enumerate(at):
        raw[..., off:off + 2] = d if k == 0 else d[:, ::-1]
    return raw.reshape(rows, -1)


KEEP_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("bf16", [False, True], ids=["f32-gemm", "bf16x3-gemm"])
@pytest.mark.parametrize("rows", [1, 5, 12])
@pytest.mark.parametrize("kind", ["int8", "int4", *KEEP_TYPES])
def test_qdot_equals_the_dequantized_matmul(kind, rows, bf16, monkeypatch):
    """Every format: one row (the fused dequantize-and-dot), a few (for per-channel int8, the
    int8-terms GEMM) and more (the blocked scan; 384 rows make 4 blocks of 96 at the patched
    block size), with the GEMM in float32 or, for
    per-channel int8, as three bfloat16 terms (the AMX path; XLA computes bf16 dots on any CPU).
    The reference is float64 numpy over the gguf package's dequantized values (or our numpy
    quantizer's, for int8/int4): equal to float32 rounding."""
    monkeypatch.setattr(quant, "BLOCK_WEIGHTS", 96 * 256)
    monkeypatch.setattr(quant, "bf16_gemm", lambda: bf16)
    rng = np.random.default_rng(0)
    dout, din = 384, 256
    x = rng.standard_normal((rows, din)).astype(np.float32)
    if kind in ("int8", "int4"):
        w = rng.standard_normal((dout, din)).astype(np.float32)
        fmt, q = quantize_rows(jnp.asarray(w), kind)
        ref = _np_quantize(w, kind)
    else:
        raw = random_blocks(kind, dout, din, rng)
        fmt, q = to_packed(kind, raw, (dout, din))
        if fmt.bits == 16:
            q["scale"] = np.ones((dout, 1), np.float32)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(dout, din)
    want = x.astype(np.float64) @ ref.astype(np.float64).T
    got = np.asarray(quant.qdot(jnp.asarray(x), fmt, {k: None if v is None else jnp.asarray(v) for k, v in q.items()}))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_int8_terms_keep_float32_precision_with_outliers_and_differentiate(monkeypatch):
    """The few-rows int8 path splits x into three int8 terms with a scale per row: activations
    with outliers 60x the rest (as LLM hidden states have) keep float32-level precision, an
    all-zero row gives zeros and a NaN row NaN, and the gradient is the float product's."""
    calls = []
    monkeypatch.setattr(quant, "INT8_ROWS", 8)
    monkeypatch.setattr(quant, "_int8_dot", lambda x, q, f=quant._int8_dot: calls.append(x.shape) or f(x, q))
    rng = np.random.default_rng(4)
    w = rng.standard_normal((192, 160)).astype(np.float32)
    fmt, q = quantize_rows(jnp.asarray(w), "int8")
    ref = _np_quantize(w, "int8").astype(np.float64)
    x = rng.standard_normal((4, 160)).astype(np.float32)
    x[:, rng.random(160) < 0.03] *= 60
    x[2] = 0
    want = x.astype(np.float64) @ ref.T
    got = np.asarray(jax.jit(lambda x: quant.qdot(x, fmt, q))(jnp.asarray(x)))
    assert calls, "qdot did not take the int8-terms path"
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert not got[2].any()
    x[1, 7] = np.nan
    assert np.isnan(np.asarray(quant.qdot(jnp.asarray(x), fmt, q))[1]).all()
    x[1, 7] = 0
    g = np.asarray(jax.grad(lambda x: jnp.sum(quant.qdot(x, fmt, q) ** 2))(jnp.asarray(x)))
    want = x.astype(np.float64) @ ref.T
    np.testing.assert_allclose(g, 2 * want @ ref, rtol=0, atol=1e-5 * np.abs(2 * want @ ref).max())


def test_int4_packs_two_codes_a_byte_with_a_scale_and_min_per_32():
    w = np.random.default_rng(2).standard_normal((8, 512)).astype(np.float32)
    fmt, q = quantize_rows(jnp.asarray(w), "int4")
    assert (fmt.bits, fmt.group, fmt.zero) == (4, 32, 0)
    assert q["codes"].shape == (8, 256) and q["codes"].dtype == jnp.uint8
    assert q["scale"].shape == q["min"].shape == (8, 16) and q["scale"].dtype == jnp.float16
    assert int4_group(576) == 32 and int4_group(112) is None  # SmolLM2's width; a width int4 cannot pack
    assert quantize_rows(jnp.asarray(w[:, :112]), "int4")[0].bits == 8  # such a matrix stays int8
    codes = np.random.default_rng(3).integers(0, 16, (4, 64))
    packed = pack_nibbles(codes)
    assert packed[0, 0] == codes[0, 0] | codes[0, 16] << 4  # GGML's Q4_0 order: j and j + 16 share a byte


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


def test_an_unknown_mode_is_refused_by_name(tmp_path):
    with pytest.raises(HyprjaxError, match="quantization='int3'.*none, int8, int4, keep"):
        load_model("/nonexistent", quantization="int3")
    make_hf_model(tmp_path / "m", "qwen3")
    with pytest.raises(HyprjaxError, match="keeps a GGUF file's own blocks; this model is SafeTensors"):
        load_model(tmp_path / "m", quantization="keep", progress=False)
    assert build_parser().parse_args(["serve", "m", "--quantization", "int4"]).quantization == "int4"
    assert build_parser().parse_args(["generate", "m", "-p", "x"]).quantization == "auto"


def _fake_quantize(hf, mode: str) -> None:
    """Replace every linear weight and the embedding of a transformers model by its quantized
    values (the embedding and LM head int8 whatever the mode)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2:  # nn.Linear [out, in] and nn.Embedding [vocab, hidden]: rows are channels
                head = "embed_tokens" in name or "lm_head" in name
                p.copy_(torch.from_numpy(_np_quantize(p.numpy(), "int8" if head else mode)))


CASES = [("int8", "qwen3", {}), ("int8", "qwen3", dict(tie_word_embeddings=False)), ("int8", "gemma3", {}),
         ("int4", "qwen3", dict(intermediate_size=128, tie_word_embeddings=False)),
         ("int4", "gemma3", dict(intermediate_size=128))]


@pytest.fixture(scope="module", params=CASES, ids=["int8-qwen3-tied", "int8-qwen3-untied", "int8-gemma3",
                                                   "int4-qwen3", "int4-gemma3"])
def pair(request, tmp_path_factory):
    mode, arch, overrides = request.param
    d = tmp_path_factory.mktemp(arch)
    hf = make_hf_model(d, arch, **overrides)
    ours = load_model(d, with_tokenizer=False, progress=False, quantization=mode)
    _fake_quantize(hf, mode)
    return mode, hf, ours


def test_quantized_weights_stay_packed_on_the_device(pair):
    mode, _, ours = pair
    attn = ours.model.layers[0].attn
    cfg = ours.cfg
    codes = attn.q_proj.kernel[...]
    if mode == "int8":
        assert codes.dtype == jnp.int8 and codes.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        assert attn.q_proj.qscale[...].dtype == jnp.float32
    else:
        assert codes.dtype == jnp.uint8 and codes.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size // 2)
        assert attn.q_proj.qscale[...].dtype == attn.q_proj.qmin[...].dtype == jnp.float16
    assert ours.model.embed.qfmt.name == "int8"  # int8 under int4 too
    assert ours.model.compute_dtype == jnp.float32


def test_quantized_logits_match_transformers_on_the_same_values(pair):
    _, hf, ours = pair
    tokens = jnp.asarray([PROMPT], jnp.int32)
    logits, _ = ours.model(tokens, jnp.arange(len(PROMPT), dtype=jnp.int32)[None])
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_quantized_engine_greedy_tokens_equal_transformers(pair):
    """Through the paged engine (one decode row: the fused one-row matmul; the prefill: blocked)."""
    _, hf, ours = pair
    auto = LLMEngine(ours.model, ours.cfg, None, EngineConfig(max_model_len=64, max_num_seqs=4), warmup=False,
                     progress=False)
    # quantized weights: kv_cache_dtype auto keeps a bfloat16 cache (uint16 bits on the XLA path)
    assert auto.ecfg.kv_cache_dtype == "bfloat16"
    assert auto.runner.cache.k.dtype == kv_storage_dtype("bfloat16", auto.backend)
    # the weights' exactness is checked with a float32 cache, which follows the activations
    eng = LLMEngine(ours.model, ours.cfg, None,
                    EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_dtype="float32"), warmup=False,
                    progress=False)
    assert eng.runner.cache.k.dtype == jnp.float32
    eng.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    got = []
    while eng.has_unfinished():
        for out in eng.step():
            got += out.new_token_ids
    assert got == hf_greedy(hf, PROMPT, 12)


def test_device_bytes_from_the_name_table_equal_the_loaded_arrays(pair):
    """`hyprjax info --memory` counts from the name table alone; the loaded model's arrays (and
    the float32 model's, for `none`) must add up to the same bytes."""
    from flax import nnx

    from hyprjax.model import abstract_model

    mode, _, ours = pair
    loaded = sum(x.nbytes for x in jax.tree.leaves(nnx.state(ours.model)))
    assert quant.device_bytes(ours.cfg, mode) == loaded
    abstract = abstract_model(ours.cfg, jnp.float32)  # the float32 model's shapes, from the model code
    assert quant.device_bytes(ours.cfg, "none") == sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


def _gguf_of(tmp_path, qtype: str, blocks_type: str | None = None):
    """A tiny Qwen3 GGUF: `qtype` from gguf's quantizer, or every matrix as random `blocks_type` blocks."""
    from hyprjax.formats.gguf_write import write_gguf
    from hyprjax.formats.names import tensor_table

    hf = make_hf_model(tmp_path / "m", "qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                       head_dim=64, num_attention_heads=4)
    st = load_model(tmp_path / "m", with_tokenizer=False, progress=False)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    blocks = None
    if blocks_type is not None:
        rng = np.random.default_rng(5)
        blocks = {}
        for spec in tensor_table(st.cfg):
            if len(spec.shape) == 2:
                rows, cols = (spec.shape[1], spec.shape[0]) if spec.transpose else spec.shape
                blocks[spec.gguf] = (blocks_type, random_blocks(blocks_type, rows, cols, rng))
    path = tmp_path / f"{blocks_type or qtype}.gguf"
    write_gguf(path, st.cfg, tensors, qtype=qtype, blocks=blocks)
    return path


@pytest.mark.parametrize("qtype,blocks", [("Q8_0", None), ("Q4_0", None), ("Q5_1", None), ("F16", None),
                                          ("F32", "Q4_K"), ("F32", "Q6_K"), ("F32", "Q2_K"), ("F32", "Q3_K"),
                                          ("F32", "Q5_K")])
def test_keep_equals_dequantize_at_load(qtype, blocks, tmp_path):
    """`keep` (blocks packed on the device) and `keep8` (4-bit codes widened) give the logits of
    `none` (the gguf package's dequantizer at load) within float32 rounding."""
    path = _gguf_of(tmp_path, qtype, blocks)
    tokens = jnp.asarray([PROMPT], jnp.int32)
    positions = jnp.arange(len(PROMPT), dtype=jnp.int32)[None]
    want, _ = load_model(path, with_tokenizer=False, progress=False, quantization="none").model(tokens, positions)
    scale = float(jnp.abs(want).max())
    for mode in ("keep", "keep8"):
        model = load_model(path, with_tokenizer=False, progress=False, quantization=mode).model
        assert model.layers[0].mlp.up_proj.qfmt.name == (blocks or qtype)
        got, _ = model(tokens, positions)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("qtype,want", [("Q8_0", "int8"), ("Q4_0", "int8"), ("F16", "none")])
def test_auto_keeps_a_quantized_gguf_quantized_on_cpu(qtype, want, tmp_path):
    """`auto` (the default of LLM and the CLI): int8 for a file of quantized blocks on CPU (the
    fastest to decode there), float weights for a float file; `load_model`'s own default stays
    "none"."""
    path = _gguf_of(tmp_path, qtype)
    auto = load_model(path, with_tokenizer=False, progress=False, quantization="auto").model
    plain = load_model(path, with_tokenizer=False, progress=False).model
    assert getattr(auto.embed, "qfmt", None) == (QFormat(bits=8, group=256, name="int8") if want == "int8" else None)
    assert plain.embed.embedding[...].dtype == jnp.float32


def test_keep_device_bytes_match_the_loaded_arrays(tmp_path):
    from flax import nnx

    from hyprjax.formats.gguf_read import GGUFFile
    from hyprjax.formats.load import read_config

    path = _gguf_of(tmp_path, "F32", "Q4_K")
    cfg, weights = read_config(path)
    for mode in ("keep", "keep8"):
        model = load_model(path, with_tokenizer=False, progress=False, quantization=mode).model
        loaded = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        assert quant.device_bytes(cfg, mode, weights=GGUFFile(path)) == loaded
    per_weight = quant.device_bytes(cfg, "keep", weights=weights)
    assert per_weight < quant.device_bytes(cfg, "keep8", weights=weights) < quant.device_bytes(cfg, "none")
    half = _gguf_of(tmp_path / "f16", "F16")  # half floats and their unit scales, counted once
    model = load_model(half, with_tokenizer=False, progress=False, quantization="keep").model
    cfg, weights = read_config(half)
    assert quant.device_bytes(cfg, "keep", weights=weights) == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def test_info_memory_prints_each_mode(tmp_path, capsys):
    from hyprjax.cli import main

    make_hf_model(tmp_path / "m", "qwen3")
    assert main(["info", str(tmp_path / "m"), "--memory", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"device bytes float32", "device bytes bfloat16", "device bytes int8", "device bytes int4"} <= set(info)
    assert info["quantization auto"] == "none"  # a float (SafeTensors) model stays float


def _mixed_gguf(tmp_path):
    """A tiny Qwen3 GGUF of random K-quant blocks whose ffn_down is Q6_K in layer 0 and Q4_K in
    layer 1 (as Q4_K_M files mix them), the embedding Q6_K."""
    from hyprjax.formats.gguf_write import write_gguf
    from hyprjax.formats.names import tensor_table

    hf = make_hf_model(tmp_path / "m", "qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                       head_dim=64, num_attention_heads=4)
    st = load_model(tmp_path / "m", with_tokenizer=False, progress=False)
    rng = np.random.default_rng(6)
    blocks = {}
    for spec in tensor_table(st.cfg):
        if len(spec.shape) == 2:
            rows, cols = (spec.shape[1], spec.shape[0]) if spec.transpose else spec.shape
            kind = "Q6_K" if spec.gguf in ("blk.0.ffn_down.weight", "token_embd.weight") else "Q4_K"
            blocks[spec.gguf] = (kind, random_blocks(kind, rows, cols, rng))
    path = tmp_path / "mixed.gguf"
    write_gguf(path, st.cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, blocks=blocks)
    return path


def test_stacked_layers_mixing_block_types_share_one_exact_layout(tmp_path):
    """GPU/TPU stack every layer's matrix in one array: the mixed file loads under `keep` with
    stacked layers into one common layout per module, and still gives the logits of the
    dequantize-at-load path."""
    path = _mixed_gguf(tmp_path)
    tokens = jnp.asarray([PROMPT], jnp.int32)
    positions = jnp.arange(len(PROMPT), dtype=jnp.int32)[None]
    want, _ = load_model(path, with_tokenizer=False, progress=False).model(tokens, positions)
    model = load_model(path, with_tokenizer=False, progress=False, quantization="keep", scan_layers=True).model
    down = model.layers.mlp.down_proj
    assert down.qfmt.bits == 8 and down.qfmt.group == 16 and down.qfmt.name == "Q4_K/Q6_K"
    assert model.layers.mlp.up_proj.qfmt.name == "Q4_K"  # a module whose layers agree keeps its own layout
    got, _ = model(tokens, positions)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * max(scale, 1.0))


def test_engine_runs_layers_of_different_types(tmp_path):
    """The CPU engine runs one program per layer structure: on the mixed file, `keep` gives the
    greedy tokens of the float model (layer 0's ffn_down Q6_K, layer 1's Q4_K, each its own)."""
    path = _mixed_gguf(tmp_path)
    got = {}
    for mode in ("none", "keep"):
        lm = load_model(path, with_tokenizer=False, progress=False, quantization=mode)
        if mode == "keep":
            assert lm.model.layers[0].mlp.down_proj.qfmt.name == "Q6_K"
            assert lm.model.layers[1].mlp.down_proj.qfmt.name == "Q4_K"
        eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_model_len=64, max_num_seqs=4), warmup=False,
                        progress=False)
        eng.add_request(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        got[mode] = []
        while eng.has_unfinished():
            for out in eng.step():
                got[mode] += out.new_token_ids
    assert got["keep"] == got["none"]
