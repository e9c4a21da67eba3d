"""Which layout of a quantized matrix multiplies fastest here: the numbers behind `auto` on CPU.

    python bench/quant_matmul.py --out bench/results/quant_matmul.json

For Qwen3-0.6B's two MLP shapes (din x dout = 1024 x 3072 and 3072 x 1024) and 1, 8 and 64 rows
of x, times `quant.qdot` (the engine's own matmul) for every layout: int8 codes per channel,
int8 codes per group (Q8_0; and 4-bit formats widened to int8, `keep8`), packed 4-bit codes
(int4, Q4_K: `keep`), half floats (F16 under `keep`), against float32 weights (`x @ w`) and against
dequantizing the whole matrix first and then multiplying (the "per-layer dequant" layout).
Medians of `--repeats` calls after a warm-up. Writes JSON and prints a table of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyprjax import quant  # noqa: E402
from hyprjax.formats.load_packed import widen  # noqa: E402
from hyprjax.qformat import QFormat, dequantize, quantize_rows  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def layouts(w: np.ndarray, rng) -> dict[str, tuple[QFormat, dict]]:
    dout, din = w.shape
    out = {}
    out["int8 per channel"] = quantize_rows(jnp.asarray(w), "int8")
    f4, q4 = quantize_rows(jnp.asarray(w), "int4")
    out["int4 (packed)"] = (f4, q4)
    out["int4 widened to int8"] = widen(f4, {k: np.asarray(v) for k, v in q4.items()})
    g = din // 32
    out["Q8_0"] = (QFormat(bits=8, group=32, name="Q8_0"),
                   dict(codes=rng.integers(-127, 128, (dout, din)).astype(np.int8),
                        scale=rng.uniform(1e-3, 1e-2, (dout, g)).astype(np.float16)))
    q4k = dict(codes=rng.integers(0, 256, (dout, din // 2)).astype(np.uint8),
               scale=rng.uniform(1e-3, 1e-2, (dout, g // 8)).astype(np.float16),
               sub=rng.integers(0, 64, (dout, g)).astype(np.uint8),
               min=rng.uniform(-1e-2, 0, (dout, g // 8)).astype(np.float16),
               msub=rng.integers(0, 64, (dout, g)).astype(np.uint8))
    out["Q4_K (packed, keep)"] = (QFormat(bits=4, group=32, ratio=8, name="Q4_K"), q4k)
    out["Q4_K widened (keep8)"] = widen(QFormat(bits=4, group=32, ratio=8, name="Q4_K"), q4k)
    out["Q6_K"] = (QFormat(bits=8, group=16, ratio=16, name="Q6_K"),
                   dict(codes=rng.integers(-32, 32, (dout, din)).astype(np.int8),
                        scale=rng.uniform(1e-3, 1e-2, (dout, din // 256)).astype(np.float16),
                        sub=rng.integers(-64, 64, (dout, din // 16)).astype(np.int8)))
    out["F16 (keep)"] = (QFormat(bits=16, group=din, name="F16"),
                         dict(codes=w.astype(np.float16), scale=np.ones((dout, 1), np.float32)))
    return {k: (f, {n: None if a is None else jnp.asarray(a) for n, a in q.items()}) for k, (f, q) in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/quant_matmul.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    for din, dout in ((1024, 3072), (3072, 1024)):
        w = (rng.standard_normal((dout, din)) / np.sqrt(din)).astype(np.float32)
        wt = jnp.asarray(w.T)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, din)).astype(np.float32))
            row = {"shape": f"{din}x{dout}", "rows": rows,
                   "float32": timed(jax.jit(lambda x, w: x @ w), x, wt, repeats=args.repeats)}
            for name, (fmt, q) in layouts(w, rng).items():
                row[name] = timed(jax.jit(lambda x, q, fmt=fmt: quant.qdot(x, fmt, q)), x, q, repeats=args.repeats)
            fmt, q = layouts(w, rng)["Q4_K (packed, keep)"]
            whole = jax.jit(lambda q, fmt=fmt: dequantize(fmt, q))
            row["Q4_K dequantize whole, then f32"] = timed(lambda x, q: x @ whole(q).T, x, q, repeats=args.repeats)
            results.append(row)
            print(f"[quant_matmul] {row['shape']} rows={rows}: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr, flush=True)
    cols = [k for k in results[0] if k not in ("shape", "rows")]
    print("| din x dout | rows | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for r in results:
        print(f"| {r['shape']} | {r['rows']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), unit="ms", bf16_gemm=quant.bf16_gemm(),
                                   results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
