"""Data- and tensor-parallel training on forced host devices, run in a subprocess by
tests/training/test_parallel.py (XLA_FLAGS must be set before JAX starts). Usage:

    python -m tests.training.dp_worker OUT.json

For a tiny Qwen3 and a tiny Gemma 3 (with a tokenizer), trains the same adapter on one device,
on a 4-way data-parallel mesh and on a 2 x 2 (data x tensor) mesh, and writes each run's
per-step losses and final adapter factors as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.make_model import build_tokenizer
from hyprjax import train
from hyprjax.adapters.load import read_adapter
from hyprjax.formats.load import load_model
from tests.tiny_models import make_hf_model

V = 512
MESHES = {"1": (1, 1), "dp4": (4, 1), "dp2-tp2": (2, 2)}


def main(out: str) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "zeta"]
        data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 30)))}) + "\n"
                                for _ in range(40)))
        for arch in ("qwen3", "gemma3"):
            model = tmp / arch
            make_hf_model(model, arch, vocab_size=V, eos_token_id=V - 1, initializer_range=0.3)
            build_tokenizer(V).save(str(model / "tokenizer.json"))
            cfg = load_model(model, progress=False, with_tokenizer=False).cfg
            for name, (dp, tp) in MESHES.items():
                run = tmp / f"{arch}-{name}"
                train(str(model), str(data), str(run), steps=4, rank=4, lr=1e-2, batch_size=4, seq_len=32,
                      warmup=1, progress=False, data_parallel=dp, tensor_parallel=tp)
                losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
                adapter = read_adapter(run / "adapter", name, cfg)
                results[f"{arch}/{name}"] = {"losses": losses, "factors": {
                    f"{k[0]}.{k[1]}": [m.a.tolist(), m.b.tolist()] for k, m in adapter.modules.items()}}
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
