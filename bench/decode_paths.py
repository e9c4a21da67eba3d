"""Batch-1 prefill and decode of two hyprjax checkouts side by side (e.g. before/after a change).

    python bench/decode_paths.py MODEL.gguf --old /path/to/old/checkout [--rounds 3]

Each round runs `bench/decode.py`'s hyprjax measurement once per checkout, each in a fresh
subprocess with that checkout first on PYTHONPATH, alternating old and new so drift on a shared
machine hits both alike. Prints medians and the new/old ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# An editable install maps hyprjax.kernels and hyprjax.serve to the installed checkout's kernels/
# and serve/ (pyproject's package-dir), so with only PYTHONPATH the other checkout would run this
# one's kernels: a finder placed first maps both to the checkout being measured.
SHIM = """
import importlib.abc, importlib.util, sys
class _Checkout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        sub = name.split(".")
        if len(sub) == 2 and sub[0] == "hyprjax" and sub[1] in ("kernels", "serve"):
            init = {root!r} + "/" + sub[1] + "/__init__.py"
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[init[:-12]])
        return None
sys.meta_path.insert(0, _Checkout())
"""
CODE = SHIM + """
import json, sys
sys.path.insert(0, {bench!r})
from decode import bench_hyprjax, default_prompt
from hyprjax.formats.gguf_read import GGUFFile
prompt = default_prompt({n_prompt}, GGUFFile({path!r}).shape("token_embd.weight")[0])
r = bench_hyprjax({path!r}, prompt, {n_gen}, {repeats}, "float32")
import hyprjax
import hyprjax.kernels
r["hyprjax_file"], r["kernels_file"] = hyprjax.__file__, hyprjax.kernels.__file__
print("RESULT " + json.dumps(r))
"""


def run_one(root: Path, path: str, n_prompt: int, n_gen: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), HYPRJAX_CACHE_DIR=os.environ.get("HYPRJAX_CACHE_DIR", ""))
    code = CODE.format(root=str(root), bench=str(root / "bench"), path=path, n_prompt=n_prompt, n_gen=n_gen,
                       repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{root}: no result\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--old", required=True, help="the other checkout's root")
    ap.add_argument("--new", default=str(HERE.parent), help="this checkout (default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "decode_paths.json"))
    args = ap.parse_args(argv)
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new"):
            print(f"[decode paths] round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_one(Path(getattr(args, name)), args.model, args.n_prompt, args.n_gen, args.repeats))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prefill_tok_s", "decode_tok_s", "warmup_s")}
           for k, v in runs.items()}
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["old"], runs["new"]))
    print("| checkout | prefill tok/s | decode tok/s | warm-up s |\n|---|---:|---:|---:|")
    for k in ("old", "new"):
        print(f"| {k} | {med[k]['prefill_tok_s']:.1f} | {med[k]['decode_tok_s']:.2f} | {med[k]['warmup_s']:.1f} |")
    ratio = {m: med["new"][m] / med["old"][m] for m in ("prefill_tok_s", "decode_tok_s")}
    print(f"new/old: prefill {ratio['prefill_tok_s']:.3f}, decode {ratio['decode_tok_s']:.3f}; "
          f"greedy tokens equal: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model=args.model, args=vars(args), runs=runs, medians=med,
                                              ratio=ratio, tokens_equal=same), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
