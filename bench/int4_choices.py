"""Which int4 scheme keeps the default model's perplexity: the measurement behind qformat's int4.

    python bench/int4_choices.py [MODEL] [--tokens 4096]

Fake-quantizes every linear weight of the model (float32 in memory, rounded to the scheme's grid
and back, round half to even) and scores perplexity as bench/perplexity.py does, for: symmetric
and asymmetric 4-bit codes, groups of 128 and 32, the embedding (= the tied LM head) int8 or int4.
Prints a table; writes bench/results/int4_choices.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from perplexity import english_text  # noqa: E402

from hyprjax.default_model import default_model_path  # noqa: E402
from hyprjax.formats.load import load_model  # noqa: E402
from hyprjax.model import Linear  # noqa: E402
from hyprjax.tokenizer import Tokenizer  # noqa: E402

SCHEMES = [("symmetric", 128, "int8"), ("asymmetric", 128, "int8"), ("symmetric", 32, "int8"),
           ("asymmetric", 32, "int8"), ("asymmetric", 32, "int4")]


def fake_quant(w: np.ndarray, kind: str, group: int) -> np.ndarray:
    """Rows of w [rows, din] on the scheme's grid; `kind` int8 is per row, symmetric."""
    rows, din = w.shape
    if kind == "int8":
        s = np.maximum(np.abs(w).max(-1, keepdims=True) / 127, 1e-30)
        return np.clip(np.round(w / s), -127, 127) * s
    if din % group:  # SmolLM2's 576: groups of 128 do not divide, use the largest multiple of 32 that does
        group = next(g for g in (96, 64, 32) if din % g == 0)
    g = w.reshape(rows, -1, group)
    if kind == "symmetric":
        s = np.maximum(np.abs(g).max(-1, keepdims=True) / 7, 1e-30)
        return (np.clip(np.round(g / s), -7, 7) * s).reshape(rows, din)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = np.maximum((hi - lo) / 15, 1e-30)
    return (np.clip(np.round((g - lo) / s), 0, 15) * s + lo).reshape(rows, din)


def perplexity(model, ids: list[int], window: int = 512) -> float:
    forward = jax.jit(lambda t, p: jax.nn.log_softmax(model(t, p)[0][0], axis=-1))
    positions = jnp.arange(window, dtype=jnp.int32)[None]
    nll, n = 0.0, 0
    for i in range(0, len(ids) - window + 1, window):
        w = ids[i:i + window]
        logp = np.asarray(forward(jnp.asarray([w], jnp.int32), positions))
        nll -= float(logp[np.arange(window - 1), w[1:]].sum())
        n += window - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(HERE / "results" / "int4_choices.json"))
    args = ap.parse_args(argv)
    path = str(args.model or default_model_path())
    ids = Tokenizer.from_gguf_file(path).encode(english_text())[:args.tokens]
    rows = [dict(scheme="float32 (the file's weights)", perplexity=perplexity(load_model(path, progress=False,
                                                                                            with_tokenizer=False).model, ids))]
    print(f"[int4_choices] {rows[0]}", file=sys.stderr, flush=True)
    for kind, group, embed in SCHEMES:
        model = load_model(path, progress=False, with_tokenizer=False).model
        for _, node in nnx.iter_graph(model):
            if isinstance(node, Linear):
                node.kernel = nnx.Param(jnp.asarray(fake_quant(np.asarray(node.kernel[...]).T, kind, group).T))
        emb = np.asarray(model.embed.embedding[...])
        model.embed.embedding = nnx.Param(jnp.asarray(fake_quant(emb, "int8" if embed == "int8" else kind, group)))
        rows.append(dict(scheme=f"{kind}, groups of {group}, embedding {embed}", perplexity=perplexity(model, ids)))
        print(f"[int4_choices] {rows[-1]}", file=sys.stderr, flush=True)
    base = rows[0]["perplexity"]
    print("| scheme | perplexity | change |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f}% |")
    Path(args.out).write_text(json.dumps(dict(command=" ".join(sys.argv), model=path, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
