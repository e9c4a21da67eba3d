"""Perplexity of a model on English text, per weight mode (float32 against --quantization int8, int4, keep, ...).

    python bench/perplexity.py [MODEL] [--quantization none int8] [--tokens 4096] [--window 512]

The text is the English prose of Python's own reference documentation (`pydoc_data.topics`,
installed with every CPython, so the measurement needs no download): its first `--tokens`
tokens, cut into independent windows of `--window` tokens, each scored by the model's full
forward (every token after a window's first is predicted from the window before it). MODEL
defaults to the default model (hyprjax/default_model.py). Writes JSON and prints a table with each
mode's perplexity and its change against the first mode.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[perplexity] {msg}", file=sys.stderr, flush=True)


def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def score(path: str, quantization: str, ids: list[int], window: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hyprjax.formats.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(path, quantization=quantization, with_tokenizer=False, progress=False)
    model = loaded.model
    forward = jax.jit(lambda t, p: jax.nn.log_softmax(model(t, p)[0][0], axis=-1))
    positions = jnp.arange(window, dtype=jnp.int32)[None]
    nll, n = 0.0, 0
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    for k, w in enumerate(windows):
        logp = np.asarray(forward(jnp.asarray([w], jnp.int32), positions))
        nll -= float(np.sum(logp[np.arange(window - 1), w[1:]]))
        n += window - 1
        log(f"{quantization}: window {k + 1}/{len(windows)}, running perplexity {math.exp(nll / n):.4f}")
    return dict(quantization=quantization, perplexity=math.exp(nll / n), tokens_scored=n,
                seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .gguf file or HF directory (default: the default model)")
    ap.add_argument("--quantization", nargs="+", default=["none", "int8"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results" / "perplexity.json"))
    args = ap.parse_args(argv)
    from hyprjax.default_model import default_model_path
    from hyprjax.tokenizer import Tokenizer

    path = str(args.model or default_model_path())
    tok = Tokenizer.from_gguf_file(path) if path.endswith(".gguf") else Tokenizer.from_hf_dir(Path(path))
    ids = tok.encode(english_text())[:args.tokens]
    if len(ids) < args.window:
        ap.error(f"the text has {len(ids)} tokens, fewer than --window {args.window}")
    rows = [score(path, q, ids, args.window) for q in args.quantization]
    base = rows[0]["perplexity"]
    for r in rows:
        r["change_vs_first"] = r["perplexity"] / base - 1.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), model=path, rows=rows), indent=2))
    print(f"| weights | perplexity | change vs {rows[0]['quantization']} | tokens scored |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quantization']} | {r['perplexity']:.4f} | {100 * r['change_vs_first']:+.2f}% | {r['tokens_scored']} |")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
