"""Start-up compile cost of the engine's step buckets on a model shape (random weights).

    python bench/compile_time.py --preset qwen3-0.6b [--layers 28] [--out bench/results/compile.json]

Builds the model with random weights (compile time does not depend on their values), then
compiles every step bucket the server compiles at start-up, timing each, and counts the
process's memory mappings after (XLA:CPU maps each compiled kernel; Linux refuses past
vm.max_map_count, 65530 by default). The persistent compilation cache is off here: this measures
compilation itself. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--label", default="")
    ap.add_argument("--layers-layout", choices=["auto", "scan", "loop"], default="auto",
                    help="stacked + lax.scan (GPU/TPU default) or one array per layer (CPU default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from hyprjax.config import PRESETS
    from hyprjax.engine.config import EngineConfig
    from hyprjax.engine.llm_engine import LLMEngine
    from hyprjax.model import Model

    jax.config.update("jax_enable_compilation_cache", False)
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    t0 = time.perf_counter()
    kw = {} if args.layers_layout == "auto" else dict(scan_layers=args.layers_layout == "scan")
    model = Model(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), **kw)  # auto: the platform's layout
    init_s = time.perf_counter() - t0
    ecfg = EngineConfig(max_num_seqs=args.max_num_seqs, num_pages=256, max_model_len=2048)
    engine = LLMEngine(model, cfg, None, ecfg, warmup=False, progress=False)
    runner = engine.runner
    maps0 = _maps()
    combos = (ecfg.step_buckets() if hasattr(ecfg, "step_buckets")  # this code; the old code paired every size
              else [(d, p) for d in runner._decode_buckets for p in runner._prefill_buckets if d or p])
    times = []
    from hyprjax.sampling import SamplingArrays
    from hyprjax.engine.runner import _GREEDY

    for d, p in tqdm(combos, desc="compiling step buckets", file=sys.stderr):
        inp = runner._padding_inputs(d, p)
        rows = inp.row_slot.shape[0]
        sampling = SamplingArrays.from_rows([_GREEDY] * rows, np.zeros((rows, 2), np.uint32))
        t = time.perf_counter()
        out = runner._step(runner.state, runner.cache, runner.counts, runner.seen, inp, sampling, None)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        *_, runner.cache, runner.counts, runner.seen = out
    res = dict(label=args.label, layout="layer-wise steps" if isinstance(model.layers, nnx.List) else "scan", preset=args.preset, layers=cfg.num_layers, buckets=len(combos),
               compile_s_per_bucket_median=statistics.median(times), compile_s_first=times[0],
               compile_s_total=sum(times), maps_per_bucket=(_maps() - maps0) / len(combos), init_s=init_s,
               jax=jax.__version__)
    print(f"| {args.label or '-'} | {cfg.num_layers} | {len(combos)} | {res['compile_s_per_bucket_median']:.2f} | "
          f"{res['compile_s_total']:.1f} | {res['maps_per_bucket']:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
