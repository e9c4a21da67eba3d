"""Sparse adapters served batched: output tokens/s with 0, 1, 8, 32 distinct adapters of each kind.

    python bench/sparse.py                    # Qwen3-0.6B shape, C = 32, every kind at rank-16 parameter count
    python bench/sparse.py --make tiny --adapters 0 1 4 --concurrency 4 --max-tokens 8 --prompt-len 16 32 \\
        --repeats 1 --out /tmp/sparse.json    # a smoke run

One LLMEngine (offline, no HTTP) with slot tables for every kind: LoRA of rank R, element-sparse
(SHiRA) and block-sparse (16 x 16 blocks) at R * (din + dout) values per module, the parameter
count of a rank-R LoRA (PEFT's SHiRA parameterization). Adapters are random, in memory, on all
seven modules of every layer: SHiRA with a uniformly random mask (as PEFT's `random_mask`),
block-sparse with random distinct blocks. A run adds C requests at once (greedy, ignore_eos;
request i uses adapter i mod n of the kind; n = 0 is the base model) and steps the engine until
all finish: output tokens / wall time. Every configuration runs in every round, base first, and
is compared with the base run of its own round (medians over --repeats rounds), so drift hits all
alike. bench/lora.py's run loop and step clock are reused, so the numbers compare with its.

Also measured: adapter load time, file to slot (read the file, check it, register it, write its
slot on the device), for each kind from its natural files: PEFT dirs (LoRA, SHiRA) and .vdb.
Writes --out (JSON), a markdown table (printed, and .md beside it) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from lora import COMPILES, StepClock, med, random_adapter, run_once, watch_compiles  # noqa: E402

DEFAULT_MODEL = HERE / "models" / "qwen3-0.6b-f16.gguf"
KINDS = ("lora", "shira", "block")


def log(msg: str) -> None:
    print(f"[sparse bench] {msg}", file=sys.stderr, flush=True)


def random_sparse(cfg, name: str, kind: str, rank: int, seed: int, block: int = 16):
    """An adapter of `kind` ("shira" or "block") with rank * (din + dout) values per module."""
    from hyprjax.adapters.lora import LoraAdapter, module_shapes
    from hyprjax.adapters.sparse import BlockSparseModule, SparseModule

    rng = np.random.default_rng(seed)
    sparse = {}
    for layer in range(cfg.num_layers):
        for m, (din, dout) in module_shapes(cfg).items():
            n = rank * (din + dout)
            std = np.float32(0.1 / din ** 0.5)  # values of a trained adapter's size (speed does not depend on it)
            if kind == "shira":
                flat = np.sort(rng.choice(din * dout, n, replace=False))
                sparse[layer, m] = SparseModule((flat // din).astype(np.int32), (flat % din).astype(np.int32),
                                                rng.standard_normal(n, np.float32) * std, (din, dout))
            else:
                nbi, nb = din // block, -(-n // block ** 2)
                flat = np.sort(rng.choice((dout // block) * nbi, nb, replace=False))
                sparse[layer, m] = BlockSparseModule((flat // nbi).astype(np.int32), (flat % nbi).astype(np.int32),
                                                     rng.standard_normal((nb, block, block), np.float32) * std,
                                                     (din, dout))
    return LoraAdapter(name, f"random {kind}(seed={seed})", {}, sparse=sparse)


def make_adapter(cfg, kind: str, name: str, rank: int, seed: int):
    return random_adapter(cfg, name, rank, seed) if kind == "lora" else random_sparse(cfg, name, kind, rank, seed)


def load_times(engine, cfg, kinds, rank: int, seed: int, repeats: int = 3) -> list[dict]:
    """File-to-slot time of one adapter per (kind in `kinds`, file format): read + check + add + slot write."""
    import jax

    from hyprjax.adapters.load import read_adapter
    from hyprjax.adapters.peft import write_peft
    from hyprjax.adapters.registry import LoraRequest
    from hyprjax.adapters.vdb_adapter import write_adapter_vdb

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, fmt in (("lora", "peft"), ("lora", "vdb"), ("shira", "peft"), ("shira", "vdb"), ("block", "vdb")):
            if kind not in kinds:  # the engine has slot tables only for the kinds measured
                continue
            adapter = make_adapter(cfg, kind, "probe", rank, seed)
            path = Path(tmp) / f"{kind}.{fmt}"
            if fmt == "peft":
                write_peft(path, adapter, cfg)
            else:
                write_adapter_vdb(path, adapter, cfg)
            size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                a = read_adapter(path, "probe", cfg, engine.ecfg.max_lora_rank)
                t_read = time.perf_counter() - t
                engine.add_adapter(a)
                held = engine.lora.resolve(LoraRequest.make(["probe"]))
                assert engine.lora.acquire(["probe"])
                jax.block_until_ready((engine.lora.tables, engine.lora.sparse_tables))
                times.append((time.perf_counter() - t, t_read))
                engine.lora.release(held, pinned=True)
                engine.remove_adapter("probe")
            out.append(dict(kind=kind, format=fmt, file_mib=size / 2**20, load_ms=1000 * med(t for t, _ in times),
                            read_ms=1000 * med(r for _, r in times)))
            log(f"load {kind} from {fmt}: {out[-1]['load_ms']:.0f} ms ({out[-1]['file_mib']:.1f} MiB)")
    return out


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["kind"], r["adapters"]) for r in runs):
        rs = [r for r in runs if (r["kind"], r["adapters"]) == key]
        out.append(dict(kind=key[0], adapters=key[1], output_tok_s=med(r["output_tok_s"] for r in rs),
                        ratio=med(r["ratio_to_base"] for r in rs), ratio_min=min(r["ratio_to_base"] for r in rs),
                        ratio_max=max(r["ratio_to_base"] for r in rs),
                        decode_step_ms=med(r["decode_full"]["mean_ms"] for r in rs)))
    return out


def tables(res: dict) -> str:
    s = res["settings"]
    lines = [f"{Path(s['model']).name}, concurrency {s['concurrency']}, every kind at the parameter count of "
             f"rank-{s['rank']} LoRA on all 7 modules, prompts {s['prompt_len'][0]}-{s['prompt_len'][1]} tokens, "
             f"{s['max_tokens']} output tokens each, {s['repeats']} rounds, {os.cpu_count()} CPU cores; medians, "
             "ratios against the base run of the same round.", "",
             f"| kind | distinct adapters | output tok/s | vs base (min-max) | decode step ms ({s['concurrency']} seqs) |",
             "|---|---:|---:|---:|---:|"]
    for r in res["summary"]:
        lines.append(f"| {r['kind']} | {r['adapters']} | {r['output_tok_s']:.2f} | {r['ratio']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['decode_step_ms']:.1f} |")
    for bar in res["bars"]:
        lines.append(f"\nBar: {bar['adapters']} distinct {bar['kind']} adapters at {bar['ratio']:.2f} of the base "
                     f"model's output tok/s (needs >= {bar['threshold']}): {'pass' if bar['pass'] else 'FAIL'}.")
    lines += ["", "Adapter load time, file to slot (read, check, register, write the device slot; median of 3):", "",
              "| kind | file | file MiB | read ms | file to slot ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['format']} | {r['file_mib']:.1f} | {r['read_ms']:.0f} | {r['load_ms']:.0f} |"
              for r in res["load"]]
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = sorted({r["adapters"] for r in res["summary"] if r["adapters"]})
    width = 0.8 / len(res["settings"]["kinds"])
    for k, kind in enumerate(res["settings"]["kinds"]):
        rows = {r["adapters"]: r for r in res["summary"] if r["kind"] == kind}
        xs = [i + (k - (len(res["settings"]["kinds"]) - 1) / 2) * width for i in range(len(ns))]
        ys = [rows[n]["ratio"] if n in rows else np.nan for n in ns]
        err = [[rows[n]["ratio"] - rows[n]["ratio_min"] for n in ns], [rows[n]["ratio_max"] - rows[n]["ratio"]
                                                                         for n in ns]]
        ax1.bar(xs, ys, width, yerr=err, capsize=2, label=kind)
    ax1.axhline(res["bars"][0]["threshold"] if res["bars"] else 0.8, color="red", lw=1, label="bar")
    ax1.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax1.set_xlabel("distinct adapters in the batch")
    ax1.set_ylabel("output tok/s vs the base model (same round)")
    ax1.set_ylim(0, 1.1)
    ax1.legend(fontsize=8)
    ax1.grid(True, axis="y", alpha=0.3)
    labels = [f"{r['kind']}\n{r['format']}" for r in res["load"]]
    ax2.bar(range(len(labels)), [r["load_ms"] for r in res["load"]], 0.6, label="file to slot")
    ax2.bar(range(len(labels)), [r["read_ms"] for r in res["load"]], 0.6, label="of which reading the file")
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    ax2.set_ylabel("ms")
    ax2.set_title("adapter load time")
    ax2.legend(fontsize=8)
    s = res["settings"]
    fig.suptitle(f"{Path(s['model']).name}: adapters at rank-{s['rank']} LoRA's parameter count, concurrency "
                 f"{s['concurrency']}, {os.cpu_count()} CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    log(f"wrote {out}")


def code_files() -> dict:
    """Where hyprjax and its kernels were imported from (an editable install can map
    hyprjax.kernels to another checkout than PYTHONPATH's hyprjax: bench/decode_paths.py)."""
    import hyprjax
    import hyprjax.kernels

    return {"hyprjax": hyprjax.__file__, "kernels": hyprjax.kernels.__file__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF file or HF directory (default %(default)s)")
    ap.add_argument("--make", metavar="SHAPE", help="use bench/models/SHAPE-f16.gguf, creating it (random weights) "
                    "if missing; e.g. qwen3-0.6b, tiny")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8, 32], help="distinct adapters per config")
    ap.add_argument("--concurrency", type=int, default=32, help="requests at once = engine max_num_seqs")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--repeats", type=int, default=2, help="measured rounds (all configurations each)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, and the sparse kinds' parameter count")
    ap.add_argument("--max-num-batched-tokens", type=int, default=256, help="engine tokens per step")
    ap.add_argument("--dtype", default="float32", help="parameter dtype (float32 is fastest on CPU)")
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="slot tables' dtype (EngineConfig.adapter_dtype; auto: the model's)")
    ap.add_argument("--threshold", type=float, default=0.8, help="the bar for the largest count of sparse adapters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "sparse.json"), help="JSON; .md and .png go beside it")
    a = ap.parse_args(argv)
    ns = sorted(set(a.adapters) - {0})
    if not ns or min(ns) < 0 or a.concurrency < 1 or a.max_tokens < 1 or a.repeats < 1:
        ap.error("need --adapters with one > 0, and positive --concurrency, --max-tokens, --repeats")
    if a.make:
        from make_model import make_model

        a.model = str(HERE / "models" / f"{a.make}-f16.gguf")
        if not Path(a.model).exists():
            log(f"creating {a.model} ...")
            make_model(a.make, "F16", a.model)
    if not Path(a.model).exists():
        ap.error(f"--model {a.model} does not exist; pass --make qwen3-0.6b to create it")
    logging.basicConfig(level=logging.WARNING)
    watch_compiles()

    from tqdm import tqdm

    from hyprjax.engine.config import EngineConfig
    from hyprjax.engine.llm_engine import LLMEngine
    from hyprjax.formats.load import load_model

    c, max_len = a.concurrency, a.prompt_len[1] + a.max_tokens
    loaded = load_model(a.model, dtype=a.dtype)
    cfg = loaded.cfg
    ecfg = EngineConfig(max_num_seqs=c, max_num_batched_tokens=max(a.max_num_batched_tokens, c),
                        num_pages=c * -(-max_len // EngineConfig.page_size) + 1, max_model_len=max_len,
                        max_loras=max(ns), max_lora_rank=a.rank,
                        max_sparse_rank=a.rank if "shira" in a.kinds else 0,
                        max_block_rank=a.rank if "block" in a.kinds else 0, adapter_dtype=a.adapter_dtype)
    t0 = time.perf_counter()
    engine = LLMEngine(loaded.model, cfg, loaded.tokenizer, ecfg, warmup=True, progress=True)
    log(f"engine built in {time.perf_counter() - t0:.1f} s ({engine.num_compiled} step buckets; slot tables "
        f"{engine.lora.nbytes / 2**20:.0f} MiB)")
    load = load_times(engine, cfg, a.kinds, a.rank, a.seed + 999)

    names = {}
    for kind in a.kinds:
        names[kind] = [f"{kind}{i}" for i in range(max(ns))]
        for i, name in enumerate(tqdm(names[kind], desc=f"building {kind} adapters", leave=False)):
            engine.add_adapter(make_adapter(cfg, kind, name, a.rank, a.seed + 1 + i))

    if loaded.path.suffix == ".gguf":
        from loadgen import gguf_prompt_ids

        pool = gguf_prompt_ids(str(loaded.path))
    else:
        pool = np.setdiff1d(np.arange(cfg.vocab_size), cfg.eos_token_ids)
    lengths = np.random.default_rng(a.seed).integers(a.prompt_len[0], a.prompt_len[1] + 1, c)

    def prompts(r: int, key: int) -> list[list[int]]:  # same lengths always, fresh ids per (round, config)
        g = np.random.default_rng([a.seed, r + 1, key])
        return [g.choice(pool, int(k)).tolist() for k in lengths]

    configs = [("base", 0)] + [(kind, n) for kind in a.kinds for n in ns]
    clock = StepClock(engine.runner)
    log(f"warm-up round (max_tokens {min(4, a.max_tokens)}, not measured)")
    for j, (kind, n) in enumerate(configs):
        run_once(engine, clock, prompts(-1, j), min(4, a.max_tokens), names.get(kind, [])[:n], f"warm-up {kind} {n}")
    runs = []
    for r in range(a.repeats):
        base = None
        for j, (kind, n) in enumerate(configs):
            res = run_once(engine, clock, prompts(r, j), a.max_tokens, names.get(kind, [])[:n],
                           f"round {r + 1}/{a.repeats}: {kind} x{n}")
            res["kind"], res["round"] = kind, r
            base = base or res
            res["ratio_to_base"] = res["output_tok_s"] / base["output_tok_s"]
            runs.append(res)
            log(f"round {r + 1}: {kind} x{n}: {res['output_tok_s']:.2f} tok/s ({res['ratio_to_base']:.2f} of base)")
    summary = summarize(runs)
    top = max(ns)
    bars = [{"kind": s["kind"], "adapters": top, "ratio": s["ratio"], "threshold": a.threshold,
             "pass": s["ratio"] >= a.threshold} for s in summary if s["kind"] in ("shira", "block") and s["adapters"] == top]
    res = dict(settings=dict(model=a.model, kinds=a.kinds, adapters=ns, concurrency=c, max_tokens=a.max_tokens,
                             prompt_len=list(a.prompt_len), repeats=a.repeats, rank=a.rank, dtype=a.dtype,
                             adapter_dtype=a.adapter_dtype, cpu_count=os.cpu_count(), compiles_total=len(COMPILES),
                             code=code_files()),
               summary=summary, bars=bars, load=load, runs=runs)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    text = tables(res)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
