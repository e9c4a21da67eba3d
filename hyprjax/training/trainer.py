"""`hyprjax train` / `hyprjax.train(...)`: the loop around the jitted step, with its files.

What a run writes under `out`:
  adapter/           a PEFT directory (`hyprjax serve --lora NAME=OUT/adapter`, PEFT,
                     transformers all load it): LoRA, and SHiRA for `shira` when every module
                     holds r * (in + out) entries (training/sparse.py `make_layout`)
  adapter.gguf       the same adapter as a llama.cpp LoRA GGUF (`lora` only)
  adapter.vdb        the adapter as a .vdb (adapters/vdb_adapter.py), every kind
  metrics.jsonl      one line per logged step: step, loss, lr, grad_norm, tokens, tokens_per_s,
                     peak_rss_mib, and eval_loss where it was measured
  train_config.json  the options that shape the run (a resume must match them), and under
                     "memory" the trained state's bytes, compact against dense-masked
  checkpoints/       orbax checkpoints (training/checkpoint.py); for the sparse kinds they hold
                     the masks beside the leaves, so a resume never re-runs the mask warm-up

The base model is loaded in floats (never quantized: its gradients flow through it) with
stacked layers, so one scanned layer program is compiled whatever the depth.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ..adapters.gguf_lora import write_gguf_lora
from ..adapters.lora import MODULES, LoraAdapter
from ..adapters.peft import write_peft
from ..adapters.vdb_adapter import write_adapter_vdb
from ..errors import ConfigError
from ..formats.load import load_model
from .checkpoint import Checkpoints
from .data import batch_at, pack, read_examples, steps_per_epoch
from .lora import check_targets, init_lora, to_adapter
from .parallel import place_base, place_batch, replicate, training_mesh
from .sparse import (SPARSE_KINDS, check_options, fisher_masks, init_values, make_layout, mask_shapes, memory_report,
                     probe_shapes, random_masks, to_modules)
from .step import (REMAT_POLICIES, make_eval_step, make_fisher_step, make_optimizer, make_train_step,
                   schedule_value)

ADAPTER_KINDS = ("lora", *SPARSE_KINDS)


@dataclass(frozen=True)
class TrainOptions:
    """What shapes a run; saved as train_config.json and checked on --resume."""

    adapter: str = "lora"  # lora | shira | block-sparse | lora+sparse
    rank: int = 16  # LoRA rank (lora, lora+sparse); PEFT's r for shira without density
    alpha: float | None = None  # None: 2 * rank (scale 2)
    density: float | None = None  # sparse kinds: fraction of each targeted weight (sparse.make_layout)
    block: int | None = None  # b x b blocks (16 | 32): block-sparse (default 16), or lora+sparse's sparse part
    mask: str = "fisher"  # sparse kinds: fisher (RoSA's accumulated grad^2) | random (PEFT SHiRA's default)
    mask_warmup: int = 8  # steps whose squared gradients choose the fisher mask
    target_modules: tuple[str, ...] = MODULES
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    warmup: int | None = None  # None: 3% of the steps
    weight_decay: float = 0.0
    clip: float = 1.0
    remat: str = "none"  # none | layer | every:N
    remat_policy: str = "nothing_saveable"
    dtype: str = "float32"
    seed: int = 0


@dataclass
class TrainResult:
    out: Path
    steps: int
    loss: float  # the last logged step's training loss
    eval_loss: float | None  # on the eval file after the last step; None without one
    initial_eval_loss: float | None  # before the first step (the base model plus the initial adapter)
    tokens_per_s: float
    peak_rss_mib: float
    files: tuple[Path, ...] = ()  # the adapter files written (PEFT dir, .gguf, .vdb)
    memory: dict | None = None  # sparse.memory_report: compact against dense-masked state bytes
    notes: tuple[str, ...] = ()  # why an output was not written (e.g. no PEFT format for the kind)


def remat_layers(remat: str, num_layers: int) -> int:
    """--remat none|layer|every:N -> layers per rematerialised group (0: none)."""
    if remat == "none":
        return 0
    if remat == "layer":
        return 1
    if remat.startswith("every:") and remat[6:].isdigit() and int(remat[6:]) >= 1:
        n = int(remat[6:])
        if num_layers % n:
            raise ConfigError(f"--remat {remat}: {n} does not divide the model's {num_layers} layers")
        return n
    raise ConfigError(f"--remat {remat!r}: expected none, layer or every:N")


def _check(o: TrainOptions) -> None:
    if o.adapter not in ADAPTER_KINDS:
        raise ConfigError(f"--adapter {o.adapter!r}: trainable kinds are {', '.join(ADAPTER_KINDS)}")
    if (o.steps is None) == (o.epochs is None):
        raise ConfigError("give exactly one of --steps and --epochs")
    for name in ("rank", "batch_size", "seq_len", "grad_accum"):
        if not isinstance(getattr(o, name), int) or getattr(o, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(o, name)!r}")
    if o.steps is not None and o.steps < 1 or o.epochs is not None and not o.epochs > 0:
        raise ConfigError("--steps / --epochs must be positive")
    if not o.lr > 0 or o.weight_decay < 0 or not o.clip > 0:
        raise ConfigError("--lr and --clip must be positive and --weight-decay non-negative")
    if o.seq_len < 2:
        raise ConfigError("--seq-len must be at least 2")
    if o.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {o.dtype!r}: expected float32 or bfloat16")
    if o.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"remat policy {o.remat_policy!r}: expected one of {', '.join(REMAT_POLICIES)}")
    check_targets(o.target_modules)
    check_options(o.adapter, o.density, o.block, o.mask, o.mask_warmup)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(model: str, data: str, out: str, *, eval: str | None = None, resume: bool = False,
          save_every: int = 100, eval_every: int | None = None, log_every: int = 1, progress: bool = True,
          name: str | None = None, callback=None, data_parallel: int = 1, tensor_parallel: int = 1,
          **options) -> TrainResult:
    """Train an adapter on `data` (JSONL, training/data.py) over the base `model`; files under `out`.

    `options` are TrainOptions' fields. `resume` continues from the last checkpoint in `out`
    (same options required) at the same step, data order and adapter. `callback(step, metrics)`
    runs after each optimizer step (tests, notebooks). `data_parallel` x `tensor_parallel`
    devices split the rows and the weights (training/parallel.py); neither changes the result
    beyond float rounding, so a run may resume with other values.
    """
    opts = TrainOptions(**{**options, "target_modules": tuple(options.get("target_modules", MODULES))})
    _check(opts)
    mesh = training_mesh(data_parallel, tensor_parallel, opts.batch_size)
    out = Path(out)
    config_path = out / "train_config.json"
    saved = json.loads(config_path.read_text()) if config_path.is_file() else None
    wanted = json.loads(json.dumps(asdict(opts)))
    if saved is not None:  # options added since the run began take their defaults; memory is a report
        saved = {**json.loads(json.dumps(asdict(TrainOptions()))), **saved}
        saved.pop("memory", None)
    if saved is not None and not resume:
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    if resume and saved is not None and saved != wanted:
        diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ConfigError(f"--resume: {config_path} was written with other options ({', '.join(diff)})")

    loaded = load_model(model, dtype=opts.dtype, progress=progress, scan_layers=True, quantization="none")
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{model}: has no tokenizer to encode the training data with")
    packed = pack(read_examples(data, tokenizer), opts.seq_len, opts.seed)
    packed_eval = pack(read_examples(eval, tokenizer), opts.seq_len, opts.seed) if eval else None
    rows = opts.batch_size * opts.grad_accum
    total = opts.steps or max(1, math.ceil(opts.epochs * steps_per_epoch(packed, rows)))
    warmup = opts.warmup if opts.warmup is not None else int(0.03 * total)
    remat = remat_layers(opts.remat, cfg.num_layers)
    alpha = opts.alpha if opts.alpha is not None else 2.0 * opts.rank
    scale = alpha / opts.rank
    targets = check_targets(opts.target_modules)
    layout = None if opts.adapter == "lora" else \
        make_layout(cfg, targets, opts.adapter, rank=opts.rank, density=opts.density, block=opts.block)
    low_rank = opts.adapter in ("lora", "lora+sparse")
    memory = memory_report(cfg, targets, lora_rank=opts.rank if low_rank else 0, layout=layout)

    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps({**wanted, "memory": memory}, indent=2) + "\n")
    graphdef, base = nnx.split(loaded.model)
    base = place_base(base, cfg, mesh)
    lora = init_lora(cfg, opts.rank, targets, jax.random.key(opts.seed)) if low_rank else {}
    if layout is not None:
        lora = {m: {**lora.get(m, {}), **v} for m, v in init_values(cfg, layout).items()}
    lora = replicate(lora, mesh)
    masks = None if layout is None else mask_shapes(cfg, layout)  # placeholders until chosen or restored
    optimizer = make_optimizer(opts.lr, total, warmup=warmup, weight_decay=opts.weight_decay, clip=opts.clip)
    opt_state = optimizer.init(lora)
    checkpoints = Checkpoints(out / "checkpoints", every=save_every)
    policy = REMAT_POLICIES[opts.remat_policy]
    start = 0
    if resume:
        got = checkpoints.restore(lora if masks is None else {"params": lora, "masks": masks}, opt_state)
        if got is not None:
            start, lora, opt_state = got
            if masks is not None:
                lora, masks = lora["params"], lora["masks"]
    if progress:
        mib = 2 ** 20
        print(f"adapter {opts.adapter}: {memory['trainable_values']:,} trained values; state "
              f"{memory['compact_state_bytes'] / mib:.1f} MiB compact, "
              f"{memory['dense_masked_state_bytes'] / mib:.1f} MiB as dense masked arrays", file=sys.stderr)
    if layout is not None and start == 0:
        if opts.mask == "random":
            masks = random_masks(cfg, layout, opts.seed)
        else:
            masks = _fisher_warmup(graphdef, base, lora, cfg, layout, packed, opts, scale, remat, mesh, progress)
    masks = replicate(masks, mesh)
    step_fn = make_train_step(graphdef, optimizer, scale=scale, remat=remat, remat_policy=policy)
    eval_fn = make_eval_step(graphdef, scale=scale)
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)

    def evaluate(lora) -> float | None:
        if packed_eval is None:
            return None
        loss_sum = count = 0.0
        n = len(packed_eval.tokens)
        for i in range(0, n, opts.batch_size):
            idx = np.arange(i, i + opts.batch_size) % n  # the last batch wraps; its repeats are dropped below
            batch = packed_eval.rows(idx)
            batch["weights"] = np.where((np.arange(i, i + opts.batch_size) < n)[:, None], batch["weights"], 0)
            s, c = eval_fn(lora, base, place_batch(batch, mesh, 0), masks)
            loss_sum, count = loss_sum + float(s), count + float(c)
        return loss_sum / max(count, 1.0)

    if progress:
        print(f"data: {packed.num_rows} rows of {opts.seq_len} tokens ({packed.num_target_tokens} targets); "
              f"{total} steps of {rows} rows" + (f", resuming after step {start}" if start else ""),
              file=sys.stderr)
    initial_eval = evaluate(lora) if start == 0 else None
    last = {"loss": float("nan"), "tokens_per_s": 0.0}
    bar = tqdm(total=total, initial=start, desc="training (compiling)", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, toks = time.perf_counter(), 0.0
    with metrics_path.open("a") as log:
        if initial_eval is not None:
            log.write(json.dumps({"step": 0, "eval_loss": initial_eval}) + "\n")
        for step in range(start, total):
            batch = batch_at(packed, step, rows, opts.seed)
            batch = {k: v.reshape(opts.grad_accum, opts.batch_size, *v.shape[1:]) for k, v in batch.items()}
            lora, opt_state, metrics = step_fn(lora, opt_state, base, place_batch(batch, mesh, 1), masks)
            toks += float((np.asarray(batch["positions"]) >= 0).sum())
            done = step + 1
            record = None
            if done % log_every == 0 or done == total:
                elapsed = time.perf_counter() - t0
                record = {"step": done, "loss": float(metrics["loss"]), "lr": schedule_value(opts.lr, total, warmup, step),
                          "grad_norm": float(metrics["grad_norm"]), "tokens": float(metrics["tokens"]),
                          "tokens_per_s": toks / elapsed, "peak_rss_mib": round(_peak_rss_mib(), 1)}
                if eval_every and done % eval_every == 0 or done == total:
                    ev = evaluate(lora)
                    if ev is not None:
                        record["eval_loss"] = ev
                log.write(json.dumps(record) + "\n")
                log.flush()
                last = record
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                rss=f"{record['peak_rss_mib'] / 1024:.1f}G")
            checkpoints.save(done, lora if masks is None else {"params": lora, "masks": masks}, opt_state,
                             force=done == total)
            bar.set_description("training")
            bar.update(1)
            if callback is not None:
                callback(done, record)
    bar.close()
    checkpoints.close()
    files, notes = _write_outputs(out, jax.device_get(lora), None if masks is None else jax.device_get(masks),
                                  scale, name or out.name, cfg, layout, str(model))
    for note in notes:
        if progress:
            print(note, file=sys.stderr)
    return TrainResult(out, total, last["loss"], last.get("eval_loss"), initial_eval, last["tokens_per_s"],
                       _peak_rss_mib(), files, memory, notes)


def _fisher_warmup(graphdef, base, lora, cfg, layout, packed, opts: TrainOptions, scale: float, remat: int, mesh,
                   progress: bool) -> dict:
    """RoSA's masks: squared gradients of each targeted module's dense delta, summed over the
    first `mask_warmup` steps' batches (those training then starts on) at the initial adapter."""
    rows = opts.batch_size * opts.grad_accum
    probes = probe_shapes(cfg, layout.sizes)
    step = make_fisher_step(graphdef, probes, scale=scale, remat=remat, remat_policy=REMAT_POLICIES[opts.remat_policy])
    scores = replicate({m: jnp.zeros(s, jnp.float32) for m, s in probes.items()}, mesh)
    low_rank = replicate({m: {k: v for k, v in p.items() if k in ("a", "b")} for m, p in jax.device_get(lora).items()
                          if "a" in p}, mesh)
    t0 = time.perf_counter()
    for s in range(opts.mask_warmup):
        batch = batch_at(packed, s, rows, opts.seed)
        batch = {k: v.reshape(opts.grad_accum, opts.batch_size, *v.shape[1:]) for k, v in batch.items()}
        scores = step(scores, low_rank, base, place_batch(batch, mesh, 1))
    masks = fisher_masks(jax.device_get(scores), layout)
    if progress:
        print(f"mask: the largest accumulated squared gradients over {opts.mask_warmup} steps "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return masks


def _write_outputs(out: Path, lora: dict, masks: dict | None, scale: float, name: str, cfg, layout, base_model: str):
    """Write the trained adapter in each format its kind has; ([paths written], [why one was not])."""
    low_rank = {m: {k: p[k] for k in ("a", "b")} for m, p in lora.items() if "a" in p}
    adapter = to_adapter(low_rank, scale, name, str(out / "adapter")) if low_rank else LoraAdapter(name, "")
    if masks is not None:
        adapter.sparse = to_modules(lora, masks, cfg)
    files, notes = [], []
    if layout is None or layout.shira_r is not None:  # lora, or shira sized r * (in + out)
        write_peft(out / "adapter", adapter, cfg, base_model=base_model)
        files.append(out / "adapter")
    else:
        notes.append(f"{layout.kind}: no PEFT directory: {layout.note}")
    if layout is None:
        write_gguf_lora(out / "adapter.gguf", adapter, cfg)
        files.append(out / "adapter.gguf")
    adapter.path = str(out / "adapter.vdb")
    write_adapter_vdb(out / "adapter.vdb", adapter, cfg)
    files.append(out / "adapter.vdb")
    return tuple(files), tuple(notes)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
