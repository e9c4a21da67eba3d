"""Peak host memory while loading a model, against the bytes of its final parameters.

    python bench/load_memory.py bench/models/qwen3-0.6b-f16.gguf [more models] [--dtype float32]

Each model loads in a fresh subprocess; peak resident memory (ru_maxrss) minus the resident
memory just before loading (python + jax + numpy imported) is what loading cost. The bar:
under 1.5x the parameter bytes, i.e. no second full copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
from flax import nnx
from hyprjax.formats.load import load_model
import hyprjax.formats.gguf_read, hyprjax.tokenizer  # imports done before the baseline
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
base = rss()
t = time.perf_counter()
m = load_model(sys.argv[1], dtype=sys.argv[2], progress=False)
elapsed = time.perf_counter() - t
params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(m.model)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(baseline=base, peak=peak, params=params, load_s=elapsed)))
"""


def measure(path: str, dtype: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, path, dtype], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"loading {path} failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(model=Path(path).name, dtype=dtype, file_bytes=Path(path).stat().st_size,
             ratio=(r["peak"] - r["baseline"]) / r["params"])
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(HERE / "results" / "load_memory.json"))
    args = ap.parse_args(argv)
    rows = []
    for path in args.models:
        print(f"[load memory] {path} ...", file=sys.stderr, flush=True)
        rows.append(measure(path, args.dtype))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=2))
    print("| model | file MiB | params MiB | load peak - baseline MiB | ratio | load s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['file_bytes'] / 2**20:.0f} | {r['params'] / 2**20:.0f} | "
              f"{(r['peak'] - r['baseline']) / 2**20:.0f} | {r['ratio']:.2f} | {r['load_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
