"""llama.cpp LoRA adapter GGUFs: round trips, the `gguf` package's reader, broken files, llama.cpp itself."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from hyprjax.adapters.gguf_lora import read_gguf_lora, write_gguf_lora
from hyprjax.adapters.lora import MODULES, AdapterError, LoraAdapter, LoraModule, module_shapes
from hyprjax.config import ModelConfig
from hyprjax.formats.names import tensor_table
from tests.deps import need_installed

V = 512
CFG = ModelConfig(arch="qwen3", vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# PEFT's usual shape: one alpha, ranks varying per module (rank_pattern), so scales differ per module.
MIXED_RANKS = {"q_proj": 4, "k_proj": 8, "v_proj": 8, "o_proj": 4, "gate_proj": 8, "up_proj": 16, "down_proj": 8}


def random_adapter(cfg=CFG, ranks=None, alpha=16.0, seed=0, scale=None) -> LoraAdapter:
    """Every module of every layer, never-zero a and b (std 1/sqrt(fan_in)), scale alpha / rank."""
    rng = np.random.default_rng(seed)
    ad = LoraAdapter(name="rand", path="")
    for layer in range(cfg.num_layers):
        for name, (din, dout) in module_shapes(cfg).items():
            r = (ranks or {}).get(name, 8)
            a = (rng.standard_normal((din, r)) * din ** -0.5).astype(np.float32)
            b = (rng.standard_normal((r, dout)) * r ** -0.5).astype(np.float32)
            ad.modules[(layer, name)] = LoraModule(a, b, alpha / r if scale is None else scale)
    return ad


def assert_same(got: LoraAdapter, want: LoraAdapter, tol: float = 0.0):
    """Same modules; a and b within tol * max|x| (0: bit-identical); same scale."""
    assert set(got.modules) == set(want.modules)
    for k, w in want.modules.items():
        g = got.modules[k]
        assert g.a.dtype == np.float32 and g.b.dtype == np.float32
        assert g.a.shape == w.a.shape and g.b.shape == w.b.shape, k
        for x, y in ((g.a, w.a), (g.b, w.b)):
            assert np.abs(x - y).max() <= tol * np.abs(y).max(), (k, np.abs(x - y).max())
        assert g.scale == pytest.approx(w.scale, rel=1e-7), k


# ---- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [None, MIXED_RANKS], ids=["rank8", "mixed-ranks"])
def test_f32_round_trip_is_exact(tmp_path, ranks):
    want = random_adapter(ranks=ranks)
    write_gguf_lora(tmp_path / "a.gguf", want, CFG)
    got = read_gguf_lora(tmp_path / "a.gguf", "mine", CFG)
    assert_same(got, want)
    assert got.name == "mine" and got.path == str(tmp_path / "a.gguf")
    assert {m.scale for m in got.modules.values()} == ({2.0} if ranks is None else {4.0, 2.0, 1.0})


# Relative error per dtype: F16 and BF16 round to 11 and 8 mantissa bits; Q8_0 to 1/254 of a
# 32-block's max (lora_a; lora_b rows of rank 8 do not split into blocks and fall back to F16).
LOSSY = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}


@pytest.mark.parametrize("dtype", list(LOSSY))
def test_lossy_round_trip(tmp_path, dtype):
    want = random_adapter()
    write_gguf_lora(tmp_path / "a.gguf", want, CFG, dtype=dtype)
    assert_same(read_gguf_lora(tmp_path / "a.gguf", "a", CFG), want, tol=LOSSY[dtype])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == dtype
    assert types["blk.0.attn_q.weight.lora_b"] == ("F16" if dtype == "Q8_0" else dtype)


def test_scale_that_is_not_a_power_of_two(tmp_path):
    want = random_adapter(scale=0.3)  # alpha 2.4 is not exact in the file's f32
    write_gguf_lora(tmp_path / "a.gguf", want, CFG)
    got = read_gguf_lora(tmp_path / "a.gguf", "a", CFG)
    for k, m in got.modules.items():
        assert m.scale == pytest.approx(0.3, rel=1e-7)
        np.testing.assert_array_equal(m.b, want.modules[k].b)  # nothing folded for f32 rounding


def test_different_alphas_need_an_explicit_alpha_which_folds_into_b(tmp_path):
    want = random_adapter()
    want.modules[(1, "down_proj")].scale = 0.5  # alpha 4, the rest have 16
    with pytest.raises(AdapterError, match=r"layer 1 down_proj .*need different alphas.*pass alpha="):
        write_gguf_lora(tmp_path / "a.gguf", want, CFG)
    assert not (tmp_path / "a.gguf").exists()
    for alpha, scale in ((0.0, 1.0), (8.0, 1.0)):  # alpha 0 is llama.cpp's "scale 1"
        write_gguf_lora(tmp_path / "a.gguf", want, CFG, alpha=alpha)
        got = read_gguf_lora(tmp_path / "a.gguf", "a", CFG)
        for k, m in got.modules.items():
            assert m.scale == scale
            np.testing.assert_allclose(m.delta(), want.modules[k].delta(), rtol=1e-6, atol=1e-7)


def test_write_rejects(tmp_path):
    with pytest.raises(ValueError, match="dtype 'Q4_0'"):
        write_gguf_lora(tmp_path / "a.gguf", random_adapter(), CFG, dtype="Q4_0")
    with pytest.raises(ValueError, match="alpha must be a number finite in f32"):
        write_gguf_lora(tmp_path / "a.gguf", random_adapter(), CFG, alpha=float("nan"))
    with pytest.raises(AdapterError, match="not this base model"):
        write_gguf_lora(tmp_path / "a.gguf", random_adapter(CFG.replace(hidden_size=96)), CFG)
    with pytest.raises(AdapterError, match="scale 0 cannot be written"):
        write_gguf_lora(tmp_path / "a.gguf", random_adapter(scale=0.0), CFG)
    with pytest.raises(AdapterError, match="no LoRA tensors"):
        write_gguf_lora(tmp_path / "a.gguf", LoraAdapter("empty", ""), CFG)
    assert not (tmp_path / "a.gguf").exists()


# ---- the file as the `gguf` package (and so llama.cpp's loader) sees it -----------------------

def test_gguf_reader_sees_the_llamacpp_layout(tmp_path):
    ad = random_adapter(ranks=MIXED_RANKS)
    write_gguf_lora(tmp_path / "a.gguf", ad, CFG)
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    f = r.fields
    assert f["general.type"].contents() == "adapter"
    assert f["adapter.type"].contents() == "lora"
    assert f["general.architecture"].contents() == "qwen3"
    # llama.cpp reads alpha with gguf_get_val_f32, which aborts on any other type.
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert f["adapter.lora.alpha"].contents() == 16.0
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {f"blk.{i}.{GGUF_NAME[m]}.weight.lora_{ab}"
                            for i in range(CFG.num_layers) for m in MODULES for ab in "ab"}
    base = {s.gguf: s for s in tensor_table(CFG)}
    for (layer, name), m in ad.modules.items():
        w = f"blk.{layer}.{GGUF_NAME[name]}.weight"
        ta, tb = tensors[w + ".lora_a"], tensors[w + ".lora_b"]
        n_in, n_out = base[w].shape  # the model's [in, out]; the base GGUF's ne is [in, out] too
        # llama.cpp's checks: W.ne[0] == a.ne[0], W.ne[1] == b.ne[1], a.ne[1] == b.ne[0] (= rank)
        assert list(ta.shape) == [n_in, m.rank] and list(tb.shape) == [m.rank, n_out]
        np.testing.assert_array_equal(ta.data, m.a.T)  # numpy order [r, in]: PEFT's lora_A.weight
        np.testing.assert_array_equal(tb.data, m.b.T)  # [out, r]: PEFT's lora_B.weight


# ---- broken files ----------------------------------------------------------------------------

def write_raw(path, arch="qwen3", kvs=None, tensors=None):
    """A GGUF with exactly these KVs and tensors (numpy order), for files write_gguf_lora never makes."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in ({"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 16.0} | (kvs or {})).items():
        if v is None:
            continue
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_string(k, v)
    for name, x in (tensors or {}).items():
        w.add_tensor(name, np.asarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def pair(name="blk.0.attn_q.weight", r=8, n_in=64, n_out=128):
    rng = np.random.default_rng(0)
    return {f"{name}.lora_a": rng.standard_normal((r, n_in)), f"{name}.lora_b": rng.standard_normal((n_out, r))}


def _truncated(p):
    write_gguf_lora(p, random_adapter(), CFG)
    p.write_bytes(p.read_bytes()[:-100])


def _cut_header(p):
    write_gguf_lora(p, random_adapter(), CFG)
    p.write_bytes(p.read_bytes()[:200])


BROKEN = {
    "missing": (lambda p: None, "no such LoRA adapter file"),
    "not-gguf": (lambda p: p.write_bytes(b'{"lora_alpha": 16}' * 10), "not a GGUF file"),
    "truncated-data": (_truncated, "truncated"),
    "truncated-header": (_cut_header, "truncated or corrupt GGUF header"),
    "a-model": (lambda p: write_raw(p, kvs={"general.type": None, "adapter.type": None}, tensors={"x.weight": [1.0]}),
                "general.type is None, a LoRA adapter GGUF has 'adapter': this is a model"),
    "control-vector": (lambda p: write_raw(p, kvs={"adapter.type": "control_vector"}, tensors=pair()),
                       "adapter.type is 'control_vector', only 'lora'"),
    "other-arch": (lambda p: write_raw(p, arch="llama", tensors=pair()), "architecture 'llama', the model is 'qwen3'"),
    "alpha-not-a-number": (lambda p: write_raw(p, kvs={"adapter.lora.alpha": "16"}, tensors=pair()),
                           "adapter.lora.alpha is '16', not a finite number"),
    "alora": (lambda p: write_raw(p, kvs={"adapter.alora.invocation_tokens": [1, 2]}, tensors=pair()),
              "activated LoRA"),
    "bad-suffix": (lambda p: write_raw(p, tensors={**pair(), "blk.0.attn_q.weight.lora_c": np.ones((8, 64))}),
                   "'blk.0.attn_q.weight.lora_c' is not a LoRA tensor"),
    "embedding": (lambda p: write_raw(p, tensors=pair("token_embd.weight", n_in=V, n_out=64)),
                  "'token_embd.weight.lora_a': not a weight hyprjax applies LoRA to"),
    "layer-out-of-range": (lambda p: write_raw(p, tensors=pair("blk.2.attn_q.weight")),
                           "layer 2, but the model has only 2 layers"),
    "a-without-b": (lambda p: write_raw(p, tensors={**pair(), **{k: v for k, v in pair("blk.1.ffn_up.weight", n_out=128)
                                                                 .items() if k.endswith("lora_a")}}),
                    r"blk.1.ffn_up.weight.lora_a has no blk.1.ffn_up.weight.lora_b"),
    "b-without-a": (lambda p: write_raw(p, tensors={"blk.0.attn_v.weight.lora_b": np.ones((64, 8))}),
                    r"blk.0.attn_v.weight.lora_b has no blk.0.attn_v.weight.lora_a"),
    "1-d": (lambda p: write_raw(p, tensors={"blk.0.attn_q.weight.lora_a": np.ones(64),
                                            "blk.0.attn_q.weight.lora_b": np.ones(128)}), "must both be 2-D"),
    "wrong-width": (lambda p: write_raw(p, tensors=pair(n_in=96)), r"layer 0 q_proj: .*not this base model"),
    "transposed": (lambda p: write_raw(p, tensors={"blk.0.attn_q.weight.lora_a": np.ones((64, 8)),
                                                   "blk.0.attn_q.weight.lora_b": np.ones((8, 128))}),
                   "do not make a low-rank pair"),
    "ranks-differ": (lambda p: write_raw(p, tensors={**pair(r=8), **{k: v for k, v in pair(r=4).items()
                                                                     if k.endswith("lora_b")}}),
                     "do not make a low-rank pair"),
    "no-tensors": (lambda p: write_raw(p), "no LoRA tensors for any of q_proj"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_are_one_line_adapter_errors(tmp_path, case):
    make, msg = BROKEN[case]
    path = tmp_path / f"{case}.gguf"
    make(path)
    with pytest.raises(AdapterError, match=msg) as e:
        read_gguf_lora(path, "a", CFG)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_norm_tensors_are_skipped_like_llamacpp(tmp_path, caplog):
    write_raw(tmp_path / "a.gguf", tensors={**pair(), "blk.0.attn_norm.weight": np.ones(64)})
    ad = read_gguf_lora(tmp_path / "a.gguf", "a", CFG)
    assert list(ad.modules) == [(0, "q_proj")] and ad.modules[0, "q_proj"].scale == 2.0
    assert "ignoring norm tensor 'blk.0.attn_norm.weight'" in caplog.text


@pytest.mark.parametrize("alpha", [0.0, None], ids=["alpha-0", "no-alpha"])
def test_alpha_zero_or_missing_means_scale_one(tmp_path, alpha):
    write_raw(tmp_path / "a.gguf", kvs={"adapter.lora.alpha": alpha}, tensors=pair(r=4))
    assert read_gguf_lora(tmp_path / "a.gguf", "a", CFG).modules[0, "q_proj"].scale == 1.0


# ---- llama.cpp -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llamacpp_base(tmp_path_factory):
    """A random tiny Qwen3 GGUF (F32, with a tokenizer) that llama.cpp loads, and its HF-named weights."""
    need_installed("xllamacpp", "llama.cpp's prebuilt wheel, in the test extra")  # not imported: it may SIGILL
    from bench.make_model import RandomWeights, build_tokenizer
    from hyprjax.formats.gguf_write import write_gguf

    d = tmp_path_factory.mktemp("llamacpp-lora")
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    weights = {k: np.array(v) for k, v in RandomWeights(CFG, seed=3).items()}
    write_gguf(d / "base.gguf", CFG, weights, tokenizer_json=d / "tokenizer.json")
    return d, weights


# Run in a child process, as bench/llamacpp.py does: a llama.cpp built for the wrong CPU dies of
# SIGILL (docs/llamacpp.md), which must fail this test, not kill the session. llama.cpp here is
# xllamacpp's prebuilt wheel, whose only interface is llama-server: its native /embedding endpoint
# with pooling "none" returns every prompt token's final hidden state (after the output norm, right
# before the tied output matrix), exact F32; the API offers no raw logits for prompt positions.
_LLAMACPP_CHILD = """
import json, sys, urllib.request
import numpy as np
import xllamacpp as xlc
a = json.loads(sys.stdin.read())
out = []
for model, lora in a["runs"]:
    p = xlc.CommonParams()
    p.model.path = model
    p.lora_adapters = [xlc.CommonAdapterLoraInfo(lora, 1.0)] if lora else []
    p.n_ctx = p.n_batch = p.n_ubatch = 64
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    f32 = xlc.ggml_type.GGML_TYPE_F32  # an f32 KV cache, so runs differ only by the weights and the adapter
    p.cache_type_k = p.cache_type_v = f32
    # Flash attention off: on CPU it rounds to F16 inside, and lifts the F32 difference to 2.3e-4.
    p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.embedding, p.pooling_type = True, xlc.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
    p.hostnames, p.port = ["127.0.0.1"], 0
    server = xlc.Server(p)
    req = urllib.request.Request(server.listening_address + "/embedding", json.dumps({"content": a["prompt"]}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as f:
        out.append(np.array(json.loads(f.read())[0]["embedding"], dtype=np.float32))
    del server
np.save(a["out"], np.stack(out))
"""


def llamacpp_logits(runs, prompt, tmp_path, embed_tokens) -> np.ndarray:
    """llama.cpp's logits [len(runs), T, V] for `prompt`, per (model, adapter file or None) run: its
    F32 hidden states [T, D] times the (tied, never adapted) embedding matrix [V, D], in float64."""
    out = tmp_path / "hidden.npy"
    args = dict(runs=[[str(m), None if a is None else str(a)] for m, a in runs], prompt=prompt, out=str(out))
    p = subprocess.run([sys.executable, "-c", _LLAMACPP_CHILD], input=json.dumps(args), text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, f"llama.cpp child exited with {p.returncode}:\n{p.stderr[-3000:]}"
    return np.load(out).astype(np.float64) @ embed_tokens.astype(np.float64).T


# Measured max |difference| over all 12 positions (xllamacpp 2026.10.11549; |logits| <= 0.62, the
# adapter moves them by 0.95): F32 4.6e-7. With 16-bit or Q8_0 adapter tensors llama.cpp also
# rounds the activations it multiplies them by (to F16 / BF16 / Q8_0), so those differ more:
# F16 6.1e-4, BF16 1.0e-2, Q8_0 1.3e-2 (the same as llama-cpp-python 0.3.36 measured before).
LLAMACPP_ATOL = {"F32": 1e-5, "F16": 5e-3, "BF16": 3e-2, "Q8_0": 5e-2}


@pytest.mark.parametrize("dtype,alpha", [("F32", None), ("F32", 0.0), ("F16", None), ("BF16", None), ("Q8_0", None)],
                         ids=["F32", "F32-alpha0-folded", "F16", "BF16", "Q8_0"])
def test_llamacpp_applies_our_file_as_the_merged_weights(tmp_path, llamacpp_base, dtype, alpha):
    """llama.cpp(base + our adapter file) == llama.cpp(base with W + scale * (a @ b).T merged in numpy)."""
    from hyprjax.formats.gguf_write import write_gguf

    d, weights = llamacpp_base
    # Mixed ranks under one alpha: llama.cpp must scale each pair by alpha / its own rank.
    ad = random_adapter(ranks=MIXED_RANKS, alpha=32.0, seed=1)
    write_gguf_lora(tmp_path / "lora.gguf", ad, CFG, alpha=alpha, dtype=dtype)
    stored = read_gguf_lora(tmp_path / "lora.gguf", "lora", CFG)  # what the file holds, after rounding
    hf_name = {(int(s.hf.split(".")[2]), s.hf.split(".")[-2]): s.hf for s in tensor_table(CFG)
               if s.hf.split(".")[-2] in MODULES}  # "model.layers.{i}.self_attn.q_proj.weight"
    merged = dict(weights)
    for k, m in stored.modules.items():  # HF layout [out, in]
        merged[hf_name[k]] = (weights[hf_name[k]].astype(np.float64) + m.delta().T).astype(np.float32)
    write_gguf(tmp_path / "merged.gguf", CFG, merged, tokenizer_json=d / "tokenizer.json")

    prompt = np.random.default_rng(0).integers(0, V, 12).tolist()
    got, want, base = llamacpp_logits([(d / "base.gguf", tmp_path / "lora.gguf"), (tmp_path / "merged.gguf", None),
                                       (d / "base.gguf", None)], prompt, tmp_path, weights["model.embed_tokens.weight"])
    assert np.abs(want - base).max() > 0.3, "the adapter barely moves the logits: the comparison would be vacuous"
    np.testing.assert_allclose(got, want, rtol=0, atol=LLAMACPP_ATOL[dtype])
