"""Perplexity of a model on English text, per weight mode (float32 against --quantization int8, int4, keep, ...).

    python bench/perplexity.py [MODEL] [--quantization none int8] [--kv-cache-dtype float32 bfloat16]
                               [--tokens 4096] [--window 512]

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


def score(path: str, quantization: str, ids: list[int], window: int, kv_cache_dtype: str = "float32") -> dict:
    """Perplexity of one weight mode. The whole window runs as one forward pass (no KV cache);
    kv_cache_dtype "bfloat16" rounds each layer's K and V to bfloat16 before attention, which is
    exactly what the engine's bfloat16 cache feeds attention (queries stay float32)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hyprjax.formats.load import load_model
    from hyprjax.model import causal_attention

    def attention(q, k, v, *a, **kw):
        if kv_cache_dtype == "bfloat16":
            k, v = (x.astype(jnp.bfloat16).astype(x.dtype) for x in (k, v))
        return causal_attention(q, k, v, *a, **kw)

    t0 = time.perf_counter()
    loaded = load_model(path, quantization=quantization, with_tokenizer=False, progress=False)
    model = loaded.model
    forward = jax.jit(lambda t, p: jax.nn.log_softmax(model(t, p, attention=attention)[0][0], axis=-1))
    positions = jnp.arange(window, dtype=jnp.int32)[None]
    nll, n = 0.0, 0
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    for k, w in enumerate(windows):
        logp = np.asarray(forward(jnp.asarray([w], jnp.int32), positions))
        nll -= float(np.sum(logp[np.arange(window - 1), w[1:]]))
        n += window - 1
        log(f"{quantization} (KV {kv_cache_dtype}): window {k + 1}/{len(windows)}, running perplexity "
            f"{math.exp(nll / n):.4f}")
    return dict(quantization=quantization, kv_cache_dtype=kv_cache_dtype, perplexity=math.exp(nll / n), tokens_scored=n,
                seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .gguf file or HF directory (default: the default model)")
    ap.add_argument("--quantization", nargs="+", default=["none", "int8"])
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="K/V precision attention reads, a row each per weight mode (the engine's --kv-cache-dtype)")
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
    rows = [score(path, q, ids, args.window, kv) for q in args.quantization for kv in args.kv_cache_dtype]
    base = rows[0]["perplexity"]
    for r in rows:
        r["change_vs_first"] = r["perplexity"] / base - 1.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), model=path, rows=rows), indent=2))
    first = f"{rows[0]['quantization']}, KV {rows[0]['kv_cache_dtype']}"
    print(f"| weights | KV cache | perplexity | change vs {first} | tokens scored |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quantization']} | {r['kv_cache_dtype']} | {r['perplexity']:.4f} | "
              f"{100 * r['change_vs_first']:+.2f}% | {r['tokens_scored']} |")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
