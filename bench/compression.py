"""Compression of a full fine-tune into adapters, measured: bytes on disk against fidelity.

    python bench/full_finetune.py        # once: the fully fine-tuned checkpoint (~15 min on 2 cores)
    python bench/compression.py          # ~25 min on 2 cores: every point below
    python bench/compression.py --quick  # 5 points, a smoke run

For each point (low-rank rank R, sparse density D, block b, storage) the adapter is extracted from
tuned - base (hyprjax/adapters/extract.py), written to disk, read back (a quantized .vdb is
dequantized by the reader, so its rounding is in what is scored), merged into the base weights and
scored on held-out text (bench/full_finetune.py's held-out topics of Python's docs) against
the exact fine-tuned model:

  * bytes: the file (a .vdb, or a PEFT directory for the low-rank-only float32 points) against
    the dense float32 delta of every targeted weight, and against the PEFT LoRA of equal
    fidelity: the smallest-rank low-rank-only PEFT directory (float32, as PEFT saves it) whose
    held-out perplexity is at least as close to the fine-tuned model's.
  * fidelity: held-out perplexity (and the share of the fine-tune's perplexity gain it keeps,
    (ppl_base - ppl) / (ppl_base - ppl_tuned)), max |logit - tuned logit| over the first
    --logit-windows windows and the whole vocabulary, and top-1 agreement with the tuned model.

Writes --out (JSON), a markdown table beside it (.md, also printed) and a PNG plot. The summary
says where 10x, 50x and 100x smaller than the dense delta are first reached and at what fidelity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
# SVDs of many mid-sized matrices: one BLAS thread each is several times faster on a busy 2-core box
# than OpenBLAS's threads fighting XLA's (measured: a 576 x 1536 SVD 0.29 s vs 2.0 s). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

DEFAULT_TUNED = HERE / "models" / "smollm2-135m-pydoc-ft"
DEFAULT_OUT = HERE / "results" / "compression.json"
EQUAL_PPL = 1e-3  # perplexities within 0.1% of the tuned model's count as equal fidelity


def log(msg: str) -> None:
    print(f"[compression] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Point:
    rank: int
    density: float = 0.0
    block: int | None = None
    storage: str = "vdb-int8"  # peft (float32 PEFT dir) | vdb-f32 | vdb-half | vdb-int8 | vdb-int4

    @property
    def label(self) -> str:
        parts = [f"r{self.rank}"] if self.rank else []
        if self.density:
            parts.append(f"{'b' + str(self.block) + ' ' if self.block else ''}{self.density:.0%}"
                         if self.density >= 0.01 else f"{self.density:.1%}")
        return " + ".join(parts) + f" {self.storage}"

    @property
    def family(self) -> str:
        if self.rank and self.density:
            return "low-rank + sparse"
        if self.rank:
            return "low-rank"
        return f"block-sparse b{self.block}" if self.block else "element-sparse"


# Ordered so points sharing an extraction are neighbours (each extraction is done once).
POINTS = (
    *(Point(r, storage=st) for r in (8, 16) for st in ("peft", "vdb-int8", "vdb-int4")),
    Point(32, storage="peft"), Point(32, storage="vdb-int4"),
    Point(64, storage="peft"), Point(64, storage="vdb-int8"), Point(64, storage="vdb-int4"),
    Point(128, storage="peft"), Point(256, storage="peft"), Point(256, storage="vdb-int8"),
    Point(0, 0.002), Point(0, 0.01), Point(0, 0.05), Point(0, 0.05, storage="vdb-half"),
    Point(0, 0.05, 16), Point(0, 0.2, 16),
    Point(8, 0.002, storage="vdb-int4"), Point(16, 0.01), Point(16, 0.01, storage="vdb-int4"), Point(64, 0.02),
    Point(64, 0.05, 16),
)
QUICK = (Point(8, storage="peft"), Point(16, storage="peft"), Point(16, storage="vdb-int8"), Point(0, 0.01),
         Point(16, 0.01))


class Kernels:
    """(layer, module) -> f32[din, dout] views of a model's stacked kernels."""

    def __init__(self, stacks: dict[str, np.ndarray]):
        self.stacks = stacks

    def __getitem__(self, key):
        return self.stacks[key[1]][key[0]]


def stacked_kernels(kernel_state) -> dict[str, np.ndarray]:
    import jax

    from hyprjax.adapters.lora import MODULES

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(kernel_state)[0]:
        name = next(m for m in MODULES if m in jax.tree_util.keystr(path))
        out[name] = np.asarray(x, np.float32)
    return out


def with_kernels(kernel_state, stacks: dict[str, np.ndarray]):
    """The kernel state with its arrays replaced by `stacks` (module -> f32[L, din, dout])."""
    import jax
    import jax.numpy as jnp

    from hyprjax.adapters.lora import MODULES

    def swap(path, x):
        name = next(m for m in MODULES if m in jax.tree_util.keystr(path))
        return jnp.asarray(stacks[name])

    return jax.tree_util.tree_map_with_path(swap, kernel_state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="the base model (default: the default model)")
    p.add_argument("--tuned", default=str(DEFAULT_TUNED), help="the fully fine-tuned model (bench/full_finetune.py)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--windows", type=int, default=24, help="held-out windows of --seq tokens for perplexity")
    p.add_argument("--logit-windows", type=int, default=4, help="windows whose logits are compared in full")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--refine", type=int, default=2, help="extract.py's alternating refinement rounds")
    p.add_argument("--quick", action="store_true", help="5 points only (a smoke run)")
    p.add_argument("--report", metavar="JSON", help="measure nothing: rewrite --out's table and plot from JSON")
    args = p.parse_args(argv)
    if args.report:
        return report(json.loads(Path(args.report).read_text()), Path(args.out))

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from full_finetune import heldout_ids
    from hyprjax.adapters.adapters_cli import path_bytes
    from hyprjax.adapters.extract import check_same_shape, extract_adapter
    from hyprjax.adapters.lora import MODULES, module_shapes
    from hyprjax.adapters.peft import write_peft
    from hyprjax.adapters.vdb_adapter import read_adapter_vdb, write_adapter_vdb
    from hyprjax.formats.load import load_model

    if not Path(args.tuned).exists():
        log(f"{args.tuned} does not exist: run bench/full_finetune.py first")
        return 2
    t_start = time.perf_counter()
    kw = dict(dtype="float32", quantization="none", scan_layers=True, progress=True)
    base = load_model(args.base, **kw)
    tuned = load_model(args.tuned, with_tokenizer=False, **kw)
    check_same_shape(base.cfg, tuned.cfg)
    cfg = base.cfg
    graphdef, base_k, rest = nnx.split(base.model, nnx.PathContains("kernel"), ...)
    _, tuned_k, _ = nnx.split(tuned.model, nnx.PathContains("kernel"), ...)
    del tuned
    base_stacks, tuned_stacks = stacked_kernels(base_k), stacked_kernels(tuned_k)
    shapes = module_shapes(cfg)
    dense_bytes = 4 * cfg.num_layers * sum(din * dout for din, dout in shapes.values())

    windows = heldout_ids(base.tokenizer, args.seq, args.windows)
    log(f"{len(windows)} held-out windows of {args.seq} tokens; dense f32 delta {dense_bytes / 1e6:.1f} MB")
    positions = jnp.arange(args.seq, dtype=jnp.int32)[None]

    @jax.jit
    def nll_and_logits(kernels, batch):
        logits, _ = nnx.merge(graphdef, kernels, rest)(batch[:, :-1], jnp.broadcast_to(positions, batch[:, :-1].shape))
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
        return nll.sum(), logits

    @jax.jit
    def compare(logits, ref):
        lp, lr = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(ref, -1)
        kl = (jnp.exp(lr) * (lr - lp)).sum()  # summed KL(tuned || this) over the positions
        return jnp.abs(logits - ref).max(), (logits.argmax(-1) == ref.argmax(-1)).sum(), kl

    ref_logits = []

    def score(kernels) -> dict:
        total, worst, agree, n_cmp, kl = 0.0, 0.0, 0, 0, 0.0
        for i in range(len(windows)):
            nll, logits = nll_and_logits(kernels, jnp.asarray(windows[i:i + 1]))
            total += float(nll)
            if i < args.logit_windows:
                if len(ref_logits) < args.logit_windows:  # the first call scores the tuned model
                    ref_logits.append(logits)
                d, a, k = compare(logits, ref_logits[i])
                worst, agree, n_cmp, kl = max(worst, float(d)), agree + int(a), n_cmp + logits.shape[1], kl + float(k)
        return dict(ppl=math.exp(total / (len(windows) * args.seq)), max_dlogit=worst, top1=agree / n_cmp,
                    kl=kl / n_cmp)

    log("scoring the tuned and the base model")
    ref = score(tuned_k)
    ref_base = score(base_k)
    log(f"held-out perplexity: base {ref_base['ppl']:.3f}, tuned {ref['ppl']:.3f}; base vs tuned max |dlogit| "
        f"{ref_base['max_dlogit']:.3f}, top-1 agreement {ref_base['top1']:.3f}")

    points = QUICK if args.quick else POINTS
    rows, cache = [], {}
    with tempfile.TemporaryDirectory(prefix="compression-") as tmp:
        for pt in tqdm(points, desc="points", unit="point"):
            t0 = time.perf_counter()
            key = (pt.rank, pt.density, pt.block)
            if key not in cache:
                cache.clear()  # points are ordered so each extraction is reused by its neighbours
                cache[key] = extract_adapter(Kernels(base_stacks), Kernels(tuned_stacks), cfg, rank=pt.rank,
                                             density=pt.density, block=pt.block, refine=args.refine,
                                             name="extracted")
            adapter = cache[key]
            t_extract = time.perf_counter() - t0
            path = Path(tmp) / ("peft" if pt.storage == "peft" else "a.vdb")
            if pt.storage == "peft":
                write_peft(path, adapter, cfg)
                stored = adapter  # PEFT float32 holds the factors exactly
            else:
                quant = pt.storage.removeprefix("vdb-")
                write_adapter_vdb(path, adapter, cfg, half=quant == "half",
                                  quantize=quant if quant in ("int8", "int4") else None)
                stored = read_adapter_vdb(path, "stored", cfg)
            nbytes = path_bytes(path)
            stacks = {m: base_stacks[m].copy() for m in MODULES}
            for (layer, m) in {*stored.modules, *stored.sparse}:
                stacks[m][layer] += stored.delta(layer, m).astype(np.float32)
            fid = score(with_kernels(base_k, stacks))
            del stacks
            gain = (ref_base["ppl"] - fid["ppl"]) / (ref_base["ppl"] - ref["ppl"])
            rows.append(dict(label=pt.label, family=pt.family, **asdict(pt), bytes=nbytes,
                             memory_bytes=adapter.nbytes, params=adapter.params, x_dense=dense_bytes / nbytes,
                             gain=gain, extract_s=t_extract, **fid))
            log(f"{pt.label}: {nbytes / 1e6:.2f} MB ({dense_bytes / nbytes:.1f}x), ppl {fid['ppl']:.3f} "
                f"(gain kept {gain:.1%}), max |dlogit| {fid['max_dlogit']:.3f}, KL {fid['kl']:.4f}, "
                f"top-1 {fid['top1']:.3f}")

    result = dict(base=str(base.path), tuned=str(args.tuned), cfg=dict(layers=cfg.num_layers, hidden=cfg.hidden_size,
                                                                      intermediate=cfg.intermediate_size),
                  dense_f32_bytes=dense_bytes, windows=len(windows), seq=args.seq, logit_windows=args.logit_windows,
                  refine=args.refine, tuned_ref=ref, base_ref=ref_base, points=rows,
                  seconds=time.perf_counter() - t_start, device=str(jax.devices()[0]))
    return report(result, Path(args.out))


def summarize(res: dict) -> dict:
    """Add each point's PEFT LoRA of equal fidelity and the 10x / 50x / 100x milestones.

    Equal fidelity: the smallest-rank float32 PEFT point whose held-out perplexity is as close to
    the tuned model's, within EQUAL_PPL of it (so quantization's ~0.01% perplexity noise does not
    count as a difference)."""
    ref, rows = res["tuned_ref"]["ppl"], res["points"]
    peft = sorted((r for r in rows if r["storage"] == "peft"), key=lambda r: r["rank"])
    for r in rows:
        gap = abs(r["ppl"] - ref)
        match = next((q for q in peft if abs(q["ppl"] - ref) <= gap + EQUAL_PPL * ref), None)
        r["peft_equal"] = None if match is None else dict(rank=match["rank"], bytes=match["bytes"])
        r["x_peft"] = None if match is None else match["bytes"] / r["bytes"]
    res["milestones"] = {}
    for x in (10, 50, 100):
        ok = [r for r in rows if r["x_dense"] >= x]
        best = min(ok, key=lambda r: abs(r["ppl"] - ref)) if ok else None
        res["milestones"][f"{x}x"] = None if best is None else {
            k: best[k] for k in ("label", "x_dense", "ppl", "gain", "max_dlogit", "kl", "top1")}
    return res


def report(result: dict, out: Path) -> int:
    """Write the JSON, the markdown table (printed too) and the PNG."""
    summarize(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} (measured in {result['seconds'] / 60:.1f} "
        f"min)")
    return 0


def table(res: dict) -> str:
    ref, base = res["tuned_ref"], res["base_ref"]
    lines = [f"Base {Path(res['base']).name}, tuned {Path(res['tuned']).name}: dense f32 delta "
             f"{res['dense_f32_bytes'] / 1e6:.1f} MB over {res['cfg']['layers']} layers x 7 modules. Held-out "
             f"perplexity ({res['windows']} x {res['seq']} tokens): base {base['ppl']:.3f}, tuned {ref['ppl']:.3f}. "
             f"Base vs tuned: max |dlogit| {base['max_dlogit']:.2f}, KL {base['kl']:.4f}, top-1 agreement "
             f"{base['top1']:.3f} "
             f"(logits over {res['logit_windows']} x {res['seq']} positions, full vocabulary).", "",
             f"PEFT LoRA of equal fidelity: the smallest-rank float32 PEFT point whose held-out perplexity is as close "
             f"to the tuned model's, within {EQUAL_PPL:.1%} of it.", "",
             "| point | family | storage | bytes | x smaller than dense f32 | x smaller than PEFT LoRA of equal "
             "fidelity | held-out ppl | fine-tune gain kept | max \\|dlogit\\| | KL(tuned \\|\\| this) | top-1 agree |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["points"]:
        eq = "none measured" if r["peft_equal"] is None else \
            f"{r['x_peft']:.2f} (vs r{r['peft_equal']['rank']}, {r['peft_equal']['bytes'] / 1e6:.1f} MB)"
        lines.append(f"| {r['label']} | {r['family']} | {r['storage']} | {r['bytes'] / 1e6:.2f} MB "
                     f"| {r['x_dense']:.1f} | {eq} | {r['ppl']:.3f} | {r['gain']:.1%} | {r['max_dlogit']:.3f} "
                     f"| {r['kl']:.4f} | {r['top1']:.3f} |")
    lines += ["", "Where each compression ratio is first reached (the most faithful point at least that much "
                  "smaller than the dense f32 delta):", ""]
    for x, m in res["milestones"].items():
        lines.append(f"- {x}: " + ("not reached by any point" if m is None else
                                   f"{m['label']} ({m['x_dense']:.1f}x): ppl {m['ppl']:.3f}, gain kept "
                                   f"{m['gain']:.1%}, max |dlogit| {m['max_dlogit']:.3f}, KL {m['kl']:.4f}, "
                                   f"top-1 {m['top1']:.3f}"))
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    families = sorted({r["family"] for r in res["points"]})
    markers = {"peft": "s", "vdb-f32": "o", "vdb-half": "D", "vdb-int8": "o", "vdb-int4": "^"}
    for i, fam in enumerate(families):
        for r in (r for r in res["points"] if r["family"] == fam):
            kw = dict(color=f"C{i}", marker=markers.get(r["storage"], "o"), s=45)
            ax1.scatter(r["x_dense"], 100 * r["gain"], **kw)
            ax2.scatter(r["x_dense"], r["kl"], **kw)
            ax1.annotate(r["label"], (r["x_dense"], 100 * r["gain"]), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")
        ax2.scatter([], [], color=f"C{i}", label=fam)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("x smaller than the dense f32 delta (file bytes)")
        for x in (10, 50, 100):
            ax.axvline(x, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    ax1.axhline(100, color="black", lw=0.6)
    ax1.set_ylabel("fine-tune perplexity gain kept (%)")
    ax2.set_yscale("log")
    ax2.set_ylabel("KL(tuned || adapted) per token (nats)")
    ax2.axhline(res["base_ref"]["kl"], color="black", lw=0.6, ls="--")
    ax2.annotate("base model", (ax2.get_xlim()[0], res["base_ref"]["kl"]), fontsize=7)
    ax2.legend(fontsize=7, loc="lower right", title="squares: PEFT f32; circles: .vdb int8; triangles: int4; diamond: half",
               title_fontsize=6)
    fig.suptitle("Full fine-tune -> adapter: bytes vs fidelity (held-out Python docs)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    sys.exit(main())
