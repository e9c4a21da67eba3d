"""`hyprjax train` end to end on a tiny model: the loss drops, the outputs load in PEFT +
transformers (same logits), in llama.cpp's GGUF reader and in our engine; a SIGKILLed run
resumes to the same adapter; bad input gets one-line errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from bench.make_model import build_tokenizer
from hyprjax import LLM, SamplingParams, train
from hyprjax.adapters.load import read_adapter
from hyprjax.cli import main
from hyprjax.formats.load import load_model
from hyprjax.training.lora import TrainLora, from_adapter
from tests.deps import need
from tests.tiny_models import make_hf_model

torch = need("torch")
peft = need("peft")
transformers = need("transformers")

ROOT = Path(__file__).parents[2]
V = 512
FACTS = [("Where does Alba keep the key?", "Under the blue stone."),
         ("What is Tomo's favourite number?", "Seventeen, always."),
         ("Which river runs past Velm?", "The quiet Ossa river.")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    # initializer_range 0.3: logits of a few units (the default 0.02 bounds them near uniform)
    hf = make_hf_model(d, "qwen3", vocab_size=V, eos_token_id=V - 1, initializer_range=0.3)
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    template = (ROOT / "hyprjax" / "templates" / "chatml.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}))
    return d, hf


def _data(tmp_path) -> tuple[Path, Path]:
    lines = []
    for q, a in FACTS:
        lines.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        lines.append({"prompt": q + " ", "completion": a})
    lines.append({"text": "A line of plain text, trained on every token."})
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_text("".join(json.dumps(x) + "\n" for x in lines * 2))
    eval_path.write_text("".join(json.dumps(x) + "\n" for x in lines[:3]))
    return train_path, eval_path


OPTS = dict(steps=40, rank=4, lr=2e-2, batch_size=2, seq_len=48, warmup=2, progress=False)


def test_training_lowers_the_loss_and_its_adapter_serves_everywhere(tmp_path, base):
    d, hf = base
    data, held = _data(tmp_path)
    out = tmp_path / "run"
    result = train(str(d), str(data), str(out), eval=str(held), save_every=20, **OPTS)
    assert result.steps == 40 and result.eval_loss < 0.5 * result.initial_eval_loss
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(41))
    assert metrics[-1]["loss"] < metrics[1]["loss"] and "eval_loss" in metrics[-1]
    assert all(m["tokens_per_s"] > 0 and m["peak_rss_mib"] > 0 for m in metrics[1:])

    # PEFT + transformers load the directory and give our logits.
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out / "adapter").eval()
    loaded = load_model(d, dtype="float32", progress=False, scan_layers=True)
    ids = loaded.tokenizer.encode("Where does Alba keep the key? ")
    adapter = read_adapter(out / "adapter", "t", loaded.cfg)
    params, scale = from_adapter(adapter, loaded.cfg)
    pos = np.arange(len(ids), dtype=np.int32)[None]
    ours = np.asarray(loaded.model(np.asarray([ids], np.int32), pos, adapter=TrainLora(params, scale))[0][0])
    with torch.no_grad():
        want = pm(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        plain = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(plain - want).max() > 0.1  # the adapter changes the model

    # The llama.cpp GGUF holds the same adapter.
    gguf = read_adapter(out / "adapter.gguf", "g", loaded.cfg)
    for key, m in adapter.modules.items():
        np.testing.assert_allclose(gguf.modules[key].delta(), m.delta(), rtol=0, atol=1e-6)

    # The engine serves it: greedy tokens equal PEFT's greedy generation.
    llm = LLM(d, dtype="float32", max_model_len=128, progress=False)
    llm.load_lora("taught", out / "adapter")
    got = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), lora="taught")[0]
    pm.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.token_ids == ref[0, len(ids):].tolist()


KILLED = textwrap.dedent("""
    import os, signal, sys
    import hyprjax
    def stop(step, record):
        if step == 7:
            os.kill(os.getpid(), signal.SIGKILL)
    hyprjax.train(sys.argv[1], sys.argv[2], sys.argv[3], save_every=5, callback=stop, steps=12, rank=4,
                  lr=2e-2, batch_size=2, seq_len=48, warmup=2, progress=False)
""")


def test_a_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path, base):
    d, _ = base
    data, _ = _data(tmp_path)
    opts = {**OPTS, "steps": 12}
    whole = train(str(d), str(data), str(tmp_path / "whole"), save_every=5, **opts)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(d), str(data), str(tmp_path / "killed")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 7
    with pytest.raises(Exception, match="already holds a training run"):
        train(str(d), str(data), str(tmp_path / "killed"), save_every=5, **opts)
    resumed = train(str(d), str(data), str(tmp_path / "killed"), save_every=5, resume=True, **opts)
    assert resumed.steps == whole.steps
    cfg = load_model(d, progress=False, with_tokenizer=False).cfg
    a = read_adapter(tmp_path / "whole" / "adapter", "a", cfg)
    b = read_adapter(tmp_path / "killed" / "adapter", "b", cfg)
    for key, m in a.modules.items():
        np.testing.assert_allclose(b.modules[key].a, m.a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b.modules[key].b, m.b, rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the rows past the checkpoint were rewritten, not duplicated


def test_cli_errors_name_what_is_wrong(tmp_path, base, capsys):
    d, _ = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3, "completion": "x"}\n')
    out = tmp_path / "o"
    assert main(["train", str(d), "--data", str(bad), "--out", str(out), "--steps", "2"]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    data, _ = _data(tmp_path)
    assert main(["train", str(d), "--data", str(data), "--out", str(out), "--steps", "2", "--remat", "every:3"]) == 2
    assert "every:3" in capsys.readouterr().err
    assert main(["train", str(d), "--data", str(data), "--out", str(out), "--steps", "2", "--rank", "2",
                 "--seq-len", "48"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(["train", str(d), "--data", str(data), "--out", str(out), "--steps", "3", "--rank", "4",
                 "--seq-len", "48", "--resume"]) == 2
    assert "rank" in capsys.readouterr().err
