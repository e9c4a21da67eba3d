"""`write_gguf` against independent readers: the `gguf` package, transformers, and llama.cpp."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.deps import missing, need

torch = need("torch")
transformers = need("transformers")

from bench.llamacpp import available_backend, run_llamacpp  # noqa: E402
from bench.make_model import build_tokenizer  # noqa: E402
from hyprjax.config import ModelConfig  # noqa: E402
from hyprjax.formats.gguf_write import QTYPES, tensor_qtype, write_gguf  # noqa: E402
from hyprjax.formats.names import tensor_table  # noqa: E402

Q = gguf.GGMLQuantizationType
V = 512


def _hf_model(arch):
    """A random transformers model of `arch` (untied Qwen, so output.weight is written too)."""
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  initializer_range=0.1, bos_token_id=None, eos_token_id=V - 1)
    if arch == "gemma3":  # window 16 < the prompt, and a global layer that is not every 6th
        hf_cfg = transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=32, sliding_window=16,
                                               layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    elif arch == "llama":  # Llama 3.1 RoPE (a rope_freqs.weight tensor for llama.cpp), GQA, head_dim != D / N
        hf_cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        cls = transformers.LlamaForCausalLM
    else:
        cls_cfg = transformers.Qwen3Config if arch == "qwen3" else transformers.Qwen2Config
        if arch == "qwen2":  # llama.cpp's qwen2 graph needs num_heads * head_dim == hidden_size
            common["head_dim"] = 16
        hf_cfg = cls_cfg(**common, rope_theta=1e6, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM if arch == "qwen3" else transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:  # default 1 / 0: perturb so a lost one shows
                p.add_(0.2 * torch.randn_like(p))
            if "embed" in name and arch == "gemma3":  # Gemma scales embeddings by sqrt(D): tame them
                p.mul_(0.1)  # so the (tied) logits do not just echo the input token
    return model, hf_cfg


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per arch, built once: the transformers model, its configs, tensors, and a tokenizer dir."""
    d = tmp_path_factory.mktemp("tiny")
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    out = {}
    for arch in ("qwen3", "qwen2", "gemma3", "llama"):
        model, hf_cfg = _hf_model(arch)
        tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        out[arch] = dict(arch=arch, model=model, hf_cfg=hf_cfg, cfg=ModelConfig.from_hf(hf_cfg.to_dict()),
                         tensors=tensors, dir=d)
    return out


@pytest.fixture
def tiny(models):
    return models["qwen3"]


def _write(tiny, qtype):
    path = tiny["dir"] / f"{tiny['arch']}-{qtype}.gguf"
    if not path.exists():
        write_gguf(path, tiny["cfg"], tiny["tensors"], qtype=qtype, tokenizer_json=tiny["dir"] / "tokenizer.json")
    return path


def _meta(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_tensors_round_trip(tiny, qtype):
    reader = gguf.GGUFReader(_write(tiny, qtype))
    got = {t.name: t for t in reader.tensors}
    specs = tensor_table(tiny["cfg"])
    assert sorted(got) == sorted(s.gguf for s in specs)
    for s in specs:
        orig = tiny["tensors"][s.hf].astype(np.float32)
        t = got[s.gguf]
        want_type = tensor_qtype(s.gguf, orig.shape, qtype)
        assert t.tensor_type == want_type, s.gguf
        assert want_type == (Q.F32 if s.norm or orig.ndim == 1 else QTYPES[qtype][0]), s.gguf
        want = gguf.quants.dequantize(gguf.quants.quantize(orig, want_type), want_type)
        np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(orig.shape), want,
                                      err_msg=s.gguf)


def test_metadata(tiny):
    meta = _meta(gguf.GGUFReader(_write(tiny, "Q8_0")))
    assert meta["general.architecture"] == "qwen3"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.alignment"] == 32
    want = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 32,
            "attention.value_length": 32, "rope.freq_base": 1e6, "vocab_size": V}
    assert {k: meta[f"qwen3.{k}"] for k in want} == want
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "qwen3.rope.scaling.type" not in meta
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(meta["tokenizer.ggml.token_type"]) == V and tokens[V - 1] == "<|im_end|>"
    assert meta["tokenizer.ggml.eos_token_id"] == V - 1
    assert meta["tokenizer.ggml.token_type"][V - 1] == gguf.TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) > 0


def test_rope_scaling_keys(tmp_path):
    from hyprjax.config import RopeScaling

    cfg = _small_cfg("qwen3").replace(rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=128))
    path = tmp_path / "yarn.gguf"
    write_gguf(path, cfg, _random_tensors(cfg))
    meta = _meta(gguf.GGUFReader(path))
    assert meta["qwen3.rope.scaling.type"] == "yarn" and meta["qwen3.rope.scaling.factor"] == 4.0
    assert meta["qwen3.rope.scaling.original_context_length"] == 128


def _small_cfg(arch, f=128):
    extra = dict(embed_scale=True, sandwich_norm=True, activation="gelu_tanh", sliding_window=16,
                 layer_types=("sliding", "full"), rope_local_theta=10000.0) if arch == "gemma3" else {}
    return ModelConfig(arch=arch, vocab_size=V, hidden_size=64, intermediate_size=f, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32, max_position_embeddings=256, qkv_bias=arch == "qwen2",
                       qk_norm=arch != "qwen2", tie_word_embeddings=True, **extra)


def _random_tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {s.hf: rng.standard_normal(tuple(reversed(s.shape)) if s.transpose else s.shape).astype(np.float32)
            for s in tensor_table(cfg)}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_rows_off_the_block_size_fall_back_to_f16(tmp_path, qtype):
    cfg = _small_cfg("qwen3", f=80)  # ffn_down rows of 80 are not whole 32-element blocks
    path = tmp_path / "odd.gguf"
    write_gguf(path, cfg, _random_tensors(cfg), qtype=qtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == QTYPES[qtype][0]


def test_gemma3_norms_get_plus_one_and_swa_keys(tmp_path):
    cfg = _small_cfg("gemma3")
    tensors = _random_tensors(cfg)
    path = tmp_path / "gemma.gguf"
    write_gguf(path, cfg, tensors, qtype="F16")
    reader = gguf.GGUFReader(path)
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    for s in tensor_table(cfg):
        if s.norm:
            np.testing.assert_array_equal(got[s.gguf], tensors[s.hf] + 1.0, err_msg=s.gguf)
    meta = _meta(reader)
    assert meta["gemma3.attention.sliding_window"] == 16
    assert meta["gemma3.rope.freq_base_swa"] == 10000.0
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]  # not llama.cpp's every-6th


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(NotImplementedError, match="qwen2"):  # llama.cpp could not load it
        write_gguf(tmp_path / "x.gguf", _small_cfg("qwen2"), _random_tensors(_small_cfg("qwen2")))
    with pytest.raises(ValueError, match="qtype"):
        write_gguf(tmp_path / "x.gguf", tiny["cfg"], tiny["tensors"], qtype="Q3_K")
    with pytest.raises(ValueError, match="missing"):
        write_gguf(tmp_path / "x.gguf", tiny["cfg"], {})
    bad = dict(tiny["tensors"], **{"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        write_gguf(tmp_path / "x.gguf", tiny["cfg"], bad)
    assert not (tmp_path / "x.gguf").exists()  # no truncated file left behind


def test_tokenizer_meta_copies_ready_kvs(tmp_path, tiny):
    src = _meta(gguf.GGUFReader(_write(tiny, "F32")))
    tok = {k: v for k, v in src.items() if k.startswith("tokenizer.")}
    path = tmp_path / "copy.gguf"
    write_gguf(path, tiny["cfg"], tiny["tensors"], qtype="F16", tokenizer_meta=tok)
    reader = gguf.GGUFReader(path)
    assert {k: v for k, v in _meta(reader).items() if k.startswith("tokenizer.")} == tok
    assert reader.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32


PROMPT = [5, 77, 300, 12, 140, 141, 9, 500, 42, 260, 33, 7, 410, 220, 91, 18, 64, 350, 2, 128]  # > window 16


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "gemma3", "llama"])
def test_transformers_loads_f32_with_equal_logits(models, arch):
    need("accelerate", "transformers loads GGUF only with accelerate")
    tiny = models[arch]
    path = _write(tiny, "F32")
    # transformers' qwen3 GGUF reader ignores attention.key_length (head_dim falls back to 128),
    # so the config comes from the original; the weights (Gemma norms: -1 again) come from the file.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               config=tiny["hf_cfg"]).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want, got = tiny["model"](ids).logits, loaded(ids).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.convert_ids_to_tokens(V - 1) == "<|im_end|>"


def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "gemma3", "llama"])
def test_llamacpp_greedy_tokens_equal_transformers(models, arch):
    if available_backend() is None:  # xllamacpp's prebuilt wheel (the test extra) or llama-cpp-python
        missing("llama.cpp is not installed (pip install xllamacpp, in the test extra)")
    tiny = models[arch]
    path = _write(tiny, "F32")
    want = _greedy(tiny["model"], PROMPT, 8)
    assert len(set(want)) > 1, "the tiny model echoes one token: the comparison would be vacuous"
    r = run_llamacpp(str(path), n_gen=8, threads=2, repeats=1, prompt_tokens=PROMPT, kv_type="f32")
    assert r["tokens"] == want, r["backend"]
