"""GGUF loading: every quant type dequantizes as the `gguf` package does, and GGUF models give the
same logits as their SafeTensors twin (F32) or as transformers reading the same file (quantized)."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import make_hf_model
from hyprjax.formats.gguf_read import SUPPORTED, GGUFFile
from hyprjax.formats.gguf_write import write_gguf
from hyprjax.formats.load import load_model
from tests.deps import need

torch = need("torch")
transformers = need("transformers")
from bench.make_model import build_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPTS = [[5, 17, 33, 2, 250, 9, 11, 40, 41, 42], [300, 4, 4, 4, 18, 99, 123, 7, 64, 31, 12, 8, 200, 150, 3]]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random K-quant scales may be NaN
@pytest.mark.parametrize("name", SUPPORTED)
def test_each_type_dequantizes_like_the_gguf_package(name, tmp_path, rng):
    qtype = Q[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * max(block, 32)
    values = rng.normal(size=(rows, cols)).astype(np.float32)
    try:
        data = gguf.quants.quantize(values, qtype)
    except NotImplementedError:  # K-quants: gguf has no quantizer, so use random blocks
        data = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_tensor("t", data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ref_tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "t")
    ref = gguf.quants.dequantize(ref_tensor.data, qtype).reshape(rows, cols)
    ours = GGUFFile(path)
    assert ours.type_name("t") == name and ours.shape("t") == (rows, cols)
    np.testing.assert_array_equal(ours.get("t"), ref)


_TWINS = {}


def _twin(arch, tmp_path_factory):
    """A tiny HF model directory and the same weights as an F32 GGUF (built once per arch)."""
    if arch not in _TWINS:
        _TWINS[arch] = _make_twin(arch, tmp_path_factory.mktemp(arch))
    return _TWINS[arch]


def _make_twin(arch, d):
    extra = dict(tie_word_embeddings=False) if arch != "gemma3" else dict(layer_types=["sliding_attention",
                                                                                       "full_attention"])
    if arch == "llama":  # Llama 3.1 RoPE: the GGUF carries it as a rope_freqs.weight tensor
        extra.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    hf = make_hf_model(d, arch, vocab_size=512, **extra)
    build_tokenizer(512).save(str(d / "tokenizer.json"))
    ours = load_model(d, with_tokenizer=False, progress=False)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    write_gguf(d / "f32.gguf", ours.cfg, tensors, qtype="F32", tokenizer_json=d / "tokenizer.json")
    return d, hf, ours, tensors


def _logits(loaded, ids):
    pos = jnp.arange(len(ids))[None]
    logits, _ = loaded.model(jnp.asarray([ids]), pos)
    return np.asarray(logits[0])


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "gemma3", "llama"])
def test_f32_gguf_equals_safetensors(arch, tmp_path_factory):
    d, _, st, _ = _twin(arch, tmp_path_factory)
    gg = load_model(d / "f32.gguf", progress=False)
    same = dict(eos_token_ids=(), bos_token_id=None, max_position_embeddings=1, rms_norm_eps=1e-6, rope_scaling=None)
    assert gg.cfg.replace(**same) == st.cfg.replace(**same)
    if arch == "llama":  # Llama 3.1 RoPE comes back as the per-frequency divisors the file stores
        from hyprjax.rope import llama3_factors

        assert gg.cfg.rope_scaling.kind == "factors" and st.cfg.rope_scaling.kind == "llama3"
        want = llama3_factors(st.cfg.head_dim, st.cfg.rope_theta, st.cfg.rope_scaling)
        np.testing.assert_allclose(gg.cfg.rope_scaling.freq_factors, want, rtol=1e-7)
    else:
        assert gg.cfg.rope_scaling == st.cfg.rope_scaling
    assert gg.cfg.rms_norm_eps == pytest.approx(st.cfg.rms_norm_eps)  # GGUF stores it as float32
    for ids in PROMPTS:
        np.testing.assert_allclose(_logits(gg, ids), _logits(st, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,qtype", [("qwen3", "F16"), ("qwen3", "Q8_0"), ("qwen3", "Q4_0"), ("qwen3", "Q5_1"),
                                        ("qwen2", "Q8_0"), ("qwen2", "Q4_1"), ("gemma3", "Q8_0"),
                                        ("llama", "Q4_1"), ("llama", "Q8_0")])
def test_quantized_gguf_equals_transformers_on_the_same_file(arch, qtype, tmp_path_factory):
    d, hf, st, tensors = _twin(arch, tmp_path_factory)
    path = d / f"{qtype}.gguf"
    write_gguf(path, st.cfg, tensors, qtype=qtype, tokenizer_json=d / "tokenizer.json")
    ours = load_model(path, progress=False)
    # transformers' GGUF config reader ignores key_length (head_dim), so hand it the config;
    # the weights still come from the file, dequantized by the gguf package.
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, config=hf.config,
                                                            dtype=torch.float32)
    for ids in PROMPTS:
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(_logits(ours, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_loading_large_tensors_in_row_chunks_changes_nothing(arch, tmp_path_factory, monkeypatch):
    from hyprjax.formats import load

    d, _, st, tensors = _twin(arch, tmp_path_factory)
    path = d / "Q8_0-chunks.gguf"
    write_gguf(path, st.cfg, tensors, qtype="Q8_0", tokenizer_json=d / "tokenizer.json")
    whole = load_model(path, progress=False)
    monkeypatch.setattr(load, "CHUNK_BYTES", 4096)  # every 2-D tensor goes in several chunks
    chunked, chunked_st = load_model(path, progress=False), load_model(d, with_tokenizer=False, progress=False)
    for ids in PROMPTS:
        np.testing.assert_array_equal(_logits(chunked, ids), _logits(whole, ids))
        np.testing.assert_array_equal(_logits(chunked_st, ids), _logits(st, ids))
