"""LoRA training speed and memory: hyprjax against PEFT + transformers (torch CPU), side by side.

    python bench/train.py [--shape qwen3-0.6b] [--seq-len 512] [--batch-size 4] [--rank 16] [--steps 2]
                          [--dtype float32|bfloat16]

Rank-16 LoRA on all seven linear modules of every layer of a random model of `--shape`, one
batch of `batch x seq` random tokens per step (every token a target), AdamW. `--dtype bfloat16`:
the base weights and the compute in bfloat16, the adapter and optimizer state float32 on both
sides (hyprjax's `--dtype bfloat16`; PEFT over a bfloat16 model keeps its adapter weights float32,
`autocast_adapter_dtype`). Four
configurations, each in its own process (so each peak RSS is its own): hyprjax and PEFT, each
without and with rematerialisation (`--remat layer`; transformers' gradient checkpointing, non
reentrant). Each runs one warm-up step (compilation for hyprjax) and then `--steps` timed steps.

Memory: peak RSS of the process, and RSS once the model is built (before any step); their
difference is what training adds (activations, gradients, optimizer state, workspace). For
hyprjax also XLA's own figure: the compiled step's temporary buffers (`memory_analysis`).
Writes bench/results/train.json, prints a table, and plots bench/results/train.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # on sys.path as the script's folder; the repository root is kept off
# it, or the repo's top-level kernels/ would shadow the `kernels` package transformers imports
CONFIGS = [("hyprjax", "none"), ("hyprjax", "layer"), ("peft", "none"), ("peft", "layer")]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_hyprjax(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hyprjax.config import PRESETS
    from hyprjax.model import Model
    from hyprjax.training.lora import init_lora
    from hyprjax.training.step import make_optimizer, make_train_step

    cfg = PRESETS[a.shape]
    model = Model(cfg, dtype=jnp.dtype(a.dtype), rngs=nnx.Rngs(0), scan_layers=True)
    graphdef, base = nnx.split(model)
    lora = init_lora(cfg, a.rank, MODULES, jax.random.key(0))
    opt = make_optimizer(1e-4, 100, warmup=0, weight_decay=0.0, clip=1.0)
    opt_state = opt.init(lora)
    step = make_train_step(graphdef, opt, scale=2.0, remat=1 if a.remat == "layer" else 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, a.batch_size, a.seq_len)).astype(np.int32)
    labels = np.roll(tokens, -1, axis=-1)
    weights = np.ones(tokens.shape, np.float32)
    weights[..., -1] = 0
    batch = dict(tokens=tokens, positions=np.broadcast_to(np.arange(a.seq_len, dtype=np.int32), tokens.shape).copy(),
                 segments=np.ones_like(tokens), labels=labels, weights=weights)
    rss_model = _rss_mib()
    compiled = step.lower(lora, opt_state, base, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    times = []
    for i in range(a.steps + 1):
        t = time.perf_counter()
        lora, opt_state, m = step(lora, opt_state, base, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
        print(f"  hyprjax remat={a.remat} step {i}: {times[-1]:.1f} s, loss {float(m['loss']):.3f}", file=sys.stderr)
    return dict(step_s=sorted(times[1:])[len(times[1:]) // 2], rss_model_mib=rss_model, peak_rss_mib=_peak_mib(),
                xla_temp_mib=temp)


def run_peft(a) -> dict:
    import peft
    import torch
    import transformers

    from make_model import hf_config
    from hyprjax.config import PRESETS

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf = {k: v for k, v in hf_config(PRESETS[a.shape], "float32").items() if k not in ("architectures", "model_type")}
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf)).to(getattr(torch, a.dtype))
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(MODULES),
                                                       lora_dropout=0.0))
    if a.remat == "layer":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, PRESETS[a.shape].vocab_size, (a.batch_size, a.seq_len))
    rss_model = _rss_mib()
    times = []
    for i in range(a.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        print(f"  peft remat={a.remat} step {i}: {times[-1]:.1f} s, loss {loss.item():.3f}", file=sys.stderr)
    return dict(step_s=sorted(times[1:])[len(times[1:]) // 2], rss_model_mib=rss_model, peak_rss_mib=_peak_mib(),
                torch=torch.__version__, peft=peft.__version__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="default bench/results/train.json (train_bf16.json for bfloat16)")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "REMAT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out = a.out or str(HERE / "results" / ("train.json" if a.dtype == "float32" else "train_bf16.json"))
    if a.worker:
        a.engine, a.remat = a.worker
        got = (run_hyprjax if a.engine == "hyprjax" else run_peft)(a)
        print(json.dumps(got))
        return 0

    rows = []
    for i, (engine, remat) in enumerate(CONFIGS, 1):
        print(f"[{i}/{len(CONFIGS)}] {engine}, remat {remat}", file=sys.stderr, flush=True)
        args = [sys.executable, __file__, "--worker", engine, remat, "--shape", a.shape, "--seq-len", str(a.seq_len),
                "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--steps", str(a.steps), "--dtype", a.dtype]
        proc = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        got.update(engine=engine, remat=remat, tokens_per_s=a.batch_size * a.seq_len / got["step_s"],
                   added_mib=got["peak_rss_mib"] - got["rss_model_mib"])
        rows.append(got)
    by = {(r["engine"], r["remat"]): r for r in rows}
    summary = {f"tokens_per_s_ratio_remat_{m}": by[("hyprjax", m)]["tokens_per_s"] / by[("peft", m)]["tokens_per_s"]
               for m in ("none", "layer")}
    for engine in ("hyprjax", "peft"):
        summary[f"{engine}_added_memory_ratio_none_over_layer"] = by[(engine, "none")]["added_mib"] / by[(engine, "layer")]["added_mib"]
    h = by[("hyprjax", "none")], by[("hyprjax", "layer")]
    summary["hyprjax_xla_temp_ratio_none_over_layer"] = h[0]["xla_temp_mib"] / h[1]["xla_temp_mib"]
    result = dict(shape=a.shape, dtype=a.dtype, seq_len=a.seq_len, batch_size=a.batch_size, rank=a.rank, steps=a.steps,
                  cpu=_cpu_name(), date=time.strftime("%Y-%m-%d"), rows=rows, summary=summary)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{a.shape}, rank {a.rank}, batch {a.batch_size} x {a.seq_len} tokens, {a.dtype}, {_cpu_name()}\n")
    print("| engine | remat | tokens/s | step s | RSS model MiB | peak RSS MiB | added MiB | XLA temp MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        temp = f"{r['xla_temp_mib']:.0f}" if "xla_temp_mib" in r else ""
        print(f"| {r['engine']} | {r['remat']} | {r['tokens_per_s']:.1f} | {r['step_s']:.1f} | {r['rss_model_mib']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r['added_mib']:.0f} | {temp} |")
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    _plot(rows, Path(a.out).with_suffix(".png"))
    return 0


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "?"


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['engine']}\nremat {r['remat']}" for r in rows]
    colors = ["tab:blue" if r["engine"] == "hyprjax" else "tab:orange" for r in rows]
    ax1.bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    ax1.set_ylabel("training tokens/s")
    ax2.bar(labels, [r["added_mib"] / 1024 for r in rows], color=colors)
    ax2.set_ylabel("memory added by training (GiB, peak RSS - model)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
