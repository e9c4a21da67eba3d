"""Multi-LoRA overhead: output tokens/s at concurrency C with 0, 1, 8, 32 distinct adapters, vs the base model.

    python bench/lora.py                      # Qwen3-0.6B shape, C = 32, rank-16 adapters on all 7 modules
    python bench/lora.py --make tiny --adapters 0 1 4 --concurrency 4 --max-tokens 8 --prompt-len 16 32 \\
        --repeats 1 --out /tmp/lora.json      # a smoke run (1-2 minutes, mostly compiling)

Offline through one LLMEngine (no HTTP) with max_loras slots of rank --rank, all step buckets
compiled first (base and LoRA variant of each; compile time reported apart, never measured).
Adapters are random, built in memory, every layer's q/k/v/o/gate/up/down. A run adds C
requests at once (greedy, ignore_eos, --max-tokens each; request i uses adapter i mod n, n = 0 is
the base model) and steps the engine until all finish: output tokens / wall time. Prompt lengths
are the same in every run; the token ids are fresh per run, so the prefix cache never hits.
Configurations are interleaved (round r: n = 0, 1, 8, 32) and each is compared with the base run
of its own round, so drift hits all alike; the tables report medians over --repeats rounds.

Where the time goes: every engine.step() is timed and split into the runner's host packing,
the jitted step (dispatch, device, result copy) and the engine's host work (schedule, rows,
detokenize); steps are classed as full decode (C sequences, no prefill), partial decode, or
carrying prefill. After the runs, a microbenchmark times the decode bucket of C sequences
directly: base compile, LoRA compile with no pairs (the fixed cost), and k distinct adapters;
and the LoRA kernel alone per module. Writes --out (JSON), a markdown table (printed, and .md
beside it) and a PNG. See docs/bench_lora.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
DEFAULT_MODEL = HERE / "models" / "qwen3-0.6b-f16.gguf"
COMPILES: list[float] = []  # backend compile seconds, appended by a jax.monitoring listener


def log(msg: str) -> None:
    print(f"[lora bench] {msg}", file=sys.stderr, flush=True)


def med(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def watch_compiles() -> None:
    import jax.monitoring

    def on_event(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            COMPILES.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)


def random_adapter(cfg, name: str, rank: int, seed: int):
    """Rank-`rank` updates on all seven modules of every layer, of a trained adapter's size:
    a ~ N(0, 1/din) and b such that scale * x a b is ~10% of the base projection's output."""
    from hyprjax.adapters.lora import LoraAdapter, LoraModule, module_shapes

    rng, scale = np.random.default_rng(seed), 2.0  # scale = alpha / r with alpha = 2r
    b_std = np.float32(0.1 / (scale * rank ** 0.5))
    modules = {}
    for layer in range(cfg.num_layers):
        for m, (din, dout) in module_shapes(cfg).items():
            a = rng.standard_normal((din, rank), np.float32) * np.float32(din ** -0.5)
            modules[layer, m] = LoraModule(a, rng.standard_normal((rank, dout), np.float32) * b_std, scale)
    return LoraAdapter(name, f"random(seed={seed})", modules)


class StepClock:
    """Times the runner's `run` and the `pack` inside it (instance attributes shadow the methods)."""

    def __init__(self, runner):
        self.pack_s = self.run_s = 0.0
        pack, run = runner.pack, runner.run

        def timed_pack(*a, **k):
            t = time.perf_counter()
            out = pack(*a, **k)
            self.pack_s += time.perf_counter() - t
            return out

        def timed_run(*a, **k):
            t = time.perf_counter()
            out = run(*a, **k)
            self.run_s += time.perf_counter() - t
            return out

        runner.pack, runner.run = timed_pack, timed_run


def run_once(engine, clock: StepClock, prompts: list[list[int]], max_tokens: int, names: list[str],
             desc: str) -> dict:
    """Add every prompt at once (request i on adapter i mod len(names)), step until all finish."""
    from tqdm import tqdm

    from hyprjax import SamplingParams
    from hyprjax.adapters.registry import LoraRequest

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sched, c = engine.scheduler, len(prompts)
    before, bm0, n_compiles = engine.stats(), engine.block_manager.stats(), len(COMPILES)
    steps = []  # (step s, pack s, run s, decode tokens, prefill tokens)
    bar = tqdm(total=c * max_tokens, desc=desc, unit="tok", leave=False)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, params, lora=LoraRequest.make(names[i % len(names)]) if names else None)
    out_tokens = 0
    while engine.has_unfinished():
        s0, clock.pack_s, clock.run_s = sched.stats(), 0.0, 0.0
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        s1 = sched.stats()
        steps.append((dt, clock.pack_s, clock.run_s, s1["decode_tokens"] - s0["decode_tokens"],
                      s1["prefill_tokens"] - s0["prefill_tokens"]))
        n = sum(len(o.new_token_ids) for o in outs)
        out_tokens += n
        bar.update(n)
    wall = time.perf_counter() - t0
    bar.close()
    after, bm1 = engine.stats(), engine.block_manager.stats()
    assert out_tokens == c * max_tokens, f"{out_tokens} tokens, expected {c * max_tokens}"

    def group(sel) -> dict:
        g = [s for s in steps if sel(s)]
        ms = lambda i: 1000 * statistics.fmean(s[i] for s in g) if g else float("nan")  # noqa: E731
        return dict(count=len(g), total_s=sum(s[0] for s in g), mean_ms=ms(0), pack_ms=ms(1),
                    device_ms=(ms(2) - ms(1)), host_ms=(ms(0) - ms(2)))

    return dict(adapters=len(names), wall_s=wall, output_tokens=out_tokens, output_tok_s=out_tokens / wall,
                steps=len(steps), decode_full=group(lambda s: s[4] == 0 and s[3] == c),
                decode_partial=group(lambda s: s[4] == 0 and s[3] < c), with_prefill=group(lambda s: s[4] > 0),
                compiles=len(COMPILES) - n_compiles, prefix_hit_tokens=bm1["prefix_hits"] - bm0["prefix_hits"],
                preemptions=after["num_preemptions_total"] - before["num_preemptions_total"],
                evictions=after.get("lora_evictions_total", 0) - before.get("lora_evictions_total", 0))


def micro_step(engine, c: int, ctx: int, ks: list[int], iters: int) -> dict:
    """The decode bucket of c sequences at context ctx, timed directly: pack, then the jitted step."""
    import jax

    from hyprjax import SamplingParams
    from hyprjax.engine.runner import RowRequest, _pairs  # the runner's own pair packer: the same shapes
    from hyprjax.engine.paged import LoraStep
    from hyprjax.sampling import seed_key

    runner, ps = engine.runner, engine.ecfg.page_size
    npg, greedy = -(-ctx // ps), SamplingParams(temperature=0.0)

    def rows(k: int) -> list:  # k distinct adapters in slots 0..k-1 (0: the base model)
        return [RowRequest([1], ctx - 1, list(range(i * npg, (i + 1) * npg)), i, True, ctx // 2, greedy,
                           seed_key(i), False, ((i % k, 1.0),) if k else ()) for i in range(c)]

    variants = [("base model", 0, False), ("LoRA step, no adapter pairs", 0, True)]
    variants += [(f"{k} distinct adapter{'s' * (k > 1)}", k, False) for k in ks]
    times = {name: ([], []) for name, _, _ in variants}
    n_compiles = len(COMPILES)
    for it in range(iters + 1):  # interleaved; the first round is not timed
        for name, k, empty in variants:
            t0 = time.perf_counter()
            inp, sampling, lora, _ = runner.pack(rows(k), [])
            if empty:
                td = inp.meta.dec_block_seq.shape[0]
                lora = LoraStep(runner.lora_tables(), _pairs([], td * engine.ecfg.max_loras), _pairs([], 0))
            t1 = time.perf_counter()
            out = runner._step(runner.state, runner.cache, runner.counts, runner.seen, inp, sampling, lora)
            runner.cache, runner.counts, runner.seen = out[4:7]
            jax.block_until_ready(out[0])
            if it:
                times[name][0].append(t1 - t0)
                times[name][1].append(time.perf_counter() - t1)
    base = med(times["base model"][1])
    return dict(concurrency=c, context=ctx, iters=iters, compiles=len(COMPILES) - n_compiles,
                variants=[dict(name=n, adapters=k, pack_ms=1000 * med(times[n][0]), step_ms=1000 * med(times[n][1]),
                               vs_base=med(times[n][1]) / base) for n, k, _ in variants])


def micro_kernel(engine, c: int, iters: int) -> dict:
    """The LoRA delta of one module for c decode tokens, alone: no pairs, 1 adapter, c distinct."""
    import jax

    from hyprjax.adapters.lora import MODULES
    from hyprjax.engine.runner import _pairs
    from hyprjax.kernels.lora import lora_delta

    s = engine.ecfg.max_loras
    k = min(c, s)
    rng = np.random.default_rng(0)
    rows = []
    for m in MODULES:
        a, b = (t[0] for t in engine.lora.tables[m])  # layer 0's slot table: a [S, din, R], b [S, R, dout]
        xdt = np.float32 if a.dtype == np.uint16 else a.dtype  # uint16: bfloat16 bits (kernels/lora.py)
        x = jax.device_put(rng.standard_normal((c, a.shape[1]), np.float32).astype(xdt))
        row = dict(module=m, din=int(a.shape[1]), dout=int(b.shape[2]))
        for key, pairs in (("none", []), ("one", [(0, i, 1.0) for i in range(c)]),
                           ("distinct", [(i % k, i, 1.0) for i in range(c)])):
            p = _pairs(pairs, c * s)
            f = lambda: lora_delta(x, a, b, p, block=1, backend=engine.backend)  # noqa: E731
            jax.block_until_ready(f())  # compiles the module's shape once
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                jax.block_until_ready(f())
                ts.append(time.perf_counter() - t)
            row[f"{key}_us"] = 1e6 * med(ts)
        rows.append(row)
    per_layer = sum(r["distinct_us"] - r["none_us"] for r in rows)
    return dict(concurrency=c, distinct=k, modules=rows, layers=engine.cfg.num_layers,
                est_step_ms=engine.cfg.num_layers * per_layer / 1000)


def summarize(runs: list[dict], ns: list[int]) -> list[dict]:
    out = []
    for n in ns:
        rs = [r for r in runs if r["adapters"] == n]
        out.append(dict(adapters=n, output_tok_s=med(r["output_tok_s"] for r in rs),
                        ratio=med(r["ratio_to_base"] for r in rs), ratio_min=min(r["ratio_to_base"] for r in rs),
                        ratio_max=max(r["ratio_to_base"] for r in rs),
                        decode_step_ms=med(r["decode_full"]["mean_ms"] for r in rs),
                        decode_step_ratio=med(r["decode_step_ratio"] for r in rs),
                        pack_ms=med(r["decode_full"]["pack_ms"] for r in rs),
                        device_ms=med(r["decode_full"]["device_ms"] for r in rs),
                        host_ms=med(r["decode_full"]["host_ms"] for r in rs),
                        prefill_step_ms=med(r["with_prefill"]["mean_ms"] for r in rs),
                        prefill_steps=med(r["with_prefill"]["count"] for r in rs),
                        wall_s=med(r["wall_s"] for r in rs)))
    return out


def f2(x: float, fmt: str = ".2f") -> str:
    return "-" if x != x else format(x, fmt)


def tables(res: dict) -> str:
    s, c = res["settings"], res["settings"]["concurrency"]
    lines = [f"{Path(s['model']).name}, concurrency {c}, rank {s['rank']} on all 7 modules, prompts "
             f"{s['prompt_len'][0]}-{s['prompt_len'][1]} tokens, {s['max_tokens']} output tokens each, "
             f"{s['repeats']} rounds, {os.cpu_count()} CPU cores; medians, ratios against the base run of the "
             "same round.", "",
             f"| distinct adapters | output tok/s | vs base (min-max) | decode step ms ({c} seqs) | vs base "
             "| of which pack ms | jitted step ms | engine host ms | steps with prefill (mean ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["summary"]:
        lines.append(f"| {r['adapters']} | {f2(r['output_tok_s'])} | {f2(r['ratio'])} ({f2(r['ratio_min'])}-"
                     f"{f2(r['ratio_max'])}) | {f2(r['decode_step_ms'], '.1f')} | {f2(r['decode_step_ratio'])} | "
                     f"{f2(r['pack_ms'], '.2f')} | {f2(r['device_ms'], '.1f')} | {f2(r['host_ms'], '.1f')} | "
                     f"{r['prefill_steps']:.0f} ({f2(r['prefill_step_ms'], '.0f')}) |")
    bar = res["bar"]
    lines += ["", f"Bar: {bar['adapters']} distinct adapters at {bar['ratio']:.2f} of the base model's output "
              f"tok/s (needs >= {bar['threshold']}): {'pass' if bar['pass'] else 'FAIL'}."]
    m = res.get("micro_step")
    if m:
        lines += ["", f"Decode bucket of {m['concurrency']} sequences at context {m['context']}, timed directly "
                  f"(median of {m['iters']}):", "", "| step | jitted step ms | vs base | host pack ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {v['name']} | {v['step_ms']:.1f} | {v['vs_base']:.2f} | {v['pack_ms']:.2f} |"
                  for v in m["variants"]]
    k = res.get("micro_kernel")
    if k:
        lines += ["", f"LoRA delta alone, one module, {k['concurrency']} decode tokens (median us per call, "
                  "dispatch included):", "",
                  f"| module | din x dout | no pairs | 1 adapter | {k['distinct']} distinct |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['module']} | {r['din']} x {r['dout']} | {r['none_us']:.0f} | {r['one_us']:.0f} | "
                  f"{r['distinct_us']:.0f} |" for r in k["modules"]]
        lines += ["", f"{k['layers']} layers x (distinct - no pairs) summed over modules: ~{k['est_step_ms']:.1f} ms "
                  "of LoRA work per decode step."]
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    summ, runs = res["summary"], res["runs"]
    ns = [r["adapters"] for r in summ]
    xs = range(len(ns))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    ax1.bar(xs, [r["output_tok_s"] for r in summ], 0.6, color="C0", label="median")
    for i, n in enumerate(ns):
        ys = [r["output_tok_s"] for r in runs if r["adapters"] == n]
        ax1.plot([i] * len(ys), ys, "k.", label="rounds" if i == 0 else None)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput")
    ax2.plot(xs, [r["ratio"] for r in summ], "o-", label="output tok/s vs base")
    ax2.plot(xs, [1 / r["decode_step_ratio"] for r in summ], "s--", label="base / decode step time")
    ax2.axhline(res["bar"]["threshold"], color="red", lw=1, label=f"bar {res['bar']['threshold']}")
    ax2.set_ylim(0, 1.1)
    ax2.set_title("vs the base model, same round")
    bottom = np.zeros(len(ns))
    for key, label in (("device_ms", "jitted step"), ("pack_ms", "runner pack"), ("host_ms", "engine host")):
        ys = np.array([r[key] for r in summ])
        ax3.bar(xs, ys, 0.6, bottom=bottom, label=label)
        bottom += ys
    ax3.set_ylabel("ms")
    ax3.set_title(f"full decode step ({res['settings']['concurrency']} sequences)")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(list(xs), [str(n) for n in ns])
        ax.set_xlabel("distinct adapters in the batch")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    s = res["settings"]
    fig.suptitle(f"{Path(s['model']).name}: multi-LoRA (rank {s['rank']}, 7 modules), concurrency "
                 f"{s['concurrency']}, {os.cpu_count()} CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    log(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF file or HF directory (default %(default)s)")
    ap.add_argument("--make", metavar="SHAPE", help="use bench/models/SHAPE-f16.gguf, creating it (random weights) "
                    "if missing; e.g. qwen3-0.6b, tiny")
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8, 32], help="distinct adapters per config")
    ap.add_argument("--concurrency", type=int, default=32, help="requests at once = engine max_num_seqs")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (all configurations each)")
    ap.add_argument("--rank", type=int, default=16, help="adapter rank = engine max_lora_rank")
    ap.add_argument("--max-loras", type=int, default=None, help="engine slots (default max of --adapters)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=256, help="engine tokens per step")
    ap.add_argument("--dtype", default="float32", help="parameter dtype (float32 is fastest on CPU)")
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="slot tables' dtype (EngineConfig.adapter_dtype; auto: the model's)")
    ap.add_argument("--micro-iters", type=int, default=5, help="microbenchmark repeats (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "lora.json"), help="JSON; .md and .png go beside it")
    a = ap.parse_args(argv)
    ns = sorted(set(a.adapters) | {0})
    if min(ns) < 0 or max(ns) == 0 or a.concurrency < 1 or a.max_tokens < 1 or a.repeats < 1:
        ap.error("need --adapters >= 0 with one > 0, and positive --concurrency, --max-tokens, --repeats")
    if not 1 <= a.prompt_len[0] <= a.prompt_len[1]:
        ap.error(f"--prompt-len {a.prompt_len}: need 1 <= MIN <= MAX")
    if a.make:
        from make_model import make_model

        a.model = str(HERE / "models" / f"{a.make}-f16.gguf")
        if not Path(a.model).exists():
            log(f"creating {a.model} ...")
            make_model(a.make, "F16", a.model)
    if not Path(a.model).exists():
        ap.error(f"--model {a.model} does not exist; make it with `python bench/make_model.py --shape qwen3-0.6b "
                 f"--qtype F16 --out {DEFAULT_MODEL.relative_to(HERE.parent)}` or pass --make qwen3-0.6b")
    max_loras = a.max_loras or max(ns)
    if max_loras < max(ns):
        log(f"--max-loras {max_loras} < {max(ns)} adapters: slots will be evicted and rewritten during the runs")
    logging.basicConfig(level=logging.WARNING)
    watch_compiles()

    import jax

    from hyprjax.adapters.registry import LoraRequest
    from hyprjax.engine.config import EngineConfig
    from hyprjax.engine.llm_engine import LLMEngine
    from hyprjax.formats.load import load_model

    c, max_len = a.concurrency, a.prompt_len[1] + a.max_tokens
    t0 = time.perf_counter()
    loaded = load_model(a.model, dtype=a.dtype)
    load_s = time.perf_counter() - t0
    cfg = loaded.cfg
    log(f"loaded {a.model} in {load_s:.1f} s ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{jax.default_backend()})")
    ecfg = EngineConfig(max_num_seqs=c, max_num_batched_tokens=max(a.max_num_batched_tokens, c),
                        num_pages=c * -(-max_len // EngineConfig.page_size) + 1,  # no preemption
                        max_model_len=max_len, max_loras=max_loras,
                        max_lora_rank=a.rank, adapter_dtype=a.adapter_dtype)
    n0 = len(COMPILES)
    t0 = time.perf_counter()
    engine = LLMEngine(loaded.model, cfg, loaded.tokenizer, ecfg, warmup=True, progress=True)
    compile_s = time.perf_counter() - t0
    log(f"engine built in {compile_s:.1f} s: {engine.num_compiled} step buckets (base grid + LoRA grid), "
        f"{len(COMPILES) - n0} compiles taking {sum(COMPILES[n0:]):.1f} s")

    t0 = time.perf_counter()
    names = [f"lora{i}" for i in range(max(ns))]
    for i, name in enumerate(names):
        adapter = random_adapter(cfg, name, a.rank, a.seed + 1 + i)
        engine.add_adapter(adapter)
    build_s = time.perf_counter() - t0
    writes = []  # load each into a slot once (the first write compiles the slot writer)
    for name in names[:max_loras]:
        t = time.perf_counter()
        held = engine.lora.resolve(LoraRequest.make([name]))
        engine.lora.acquire([name])
        jax.block_until_ready(engine.lora.tables)
        writes.append(time.perf_counter() - t)
        engine.lora.release(held, pinned=True)
    log(f"{len(names)} random adapters built in {build_s:.1f} s ({engine.lora.nbytes / 2**20:.0f} MiB slot table); "
        f"slot write {1000 * med(writes[1:] or writes):.0f} ms each")

    if loaded.path.suffix == ".gguf":
        from loadgen import gguf_prompt_ids

        pool = gguf_prompt_ids(str(loaded.path))
    else:
        pool = np.setdiff1d(np.arange(cfg.vocab_size), cfg.eos_token_ids)
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(a.prompt_len[0], a.prompt_len[1] + 1, c)

    def prompts(r: int, n: int) -> list[list[int]]:  # same lengths always, fresh ids per (round, config)
        g = np.random.default_rng([a.seed, r + 1, n])
        return [g.choice(pool, int(k)).tolist() for k in lengths]

    clock = StepClock(engine.runner)
    log(f"warm-up round (max_tokens {min(4, a.max_tokens)}, not measured)")
    for n in ns:
        run_once(engine, clock, prompts(-1, n), min(4, a.max_tokens), names[:n], f"warm-up n={n}")
    from tqdm import tqdm

    runs = []
    todo = [(r, n) for r in range(a.repeats) for n in ns]
    for r, n in tqdm(todo, desc="runs", unit="run"):
        run = dict(round=r, **run_once(engine, clock, prompts(r, n), a.max_tokens, names[:n], f"round {r} n={n}"))
        runs.append(run)
        log(f"round {r}, {n} distinct adapters: {run['output_tok_s']:.2f} tok/s, decode step "
            f"{run['decode_full']['mean_ms']:.0f} ms ({run['decode_full']['count']} steps), {run['steps']} steps")
        if run["compiles"] or run["prefix_hit_tokens"] or run["preemptions"]:
            log(f"  warning: {run['compiles']} compiles, {run['prefix_hit_tokens']} prefix-cache hit tokens, "
                f"{run['preemptions']} preemptions during a measured run")
    for run in runs:
        base = next(b for b in runs if b["round"] == run["round"] and b["adapters"] == 0)
        run["ratio_to_base"] = run["output_tok_s"] / base["output_tok_s"]
        run["decode_step_ratio"] = run["decode_full"]["mean_ms"] / base["decode_full"]["mean_ms"]

    summary = summarize(runs, ns)
    top = summary[-1]
    res = dict(command=" ".join([Path(sys.executable).name] + sys.argv),
               started=time.strftime("%Y-%m-%d %H:%M:%S"), backend=jax.default_backend(), cpu_count=os.cpu_count(),
               settings=dict(model=str(a.model), adapter_dtype=a.adapter_dtype, adapters=ns, concurrency=c,
                             max_tokens=a.max_tokens, prompt_len=list(a.prompt_len), repeats=a.repeats, rank=a.rank,
                             max_loras=max_loras,
                             max_num_batched_tokens=ecfg.max_num_batched_tokens, dtype=a.dtype, seed=a.seed,
                             attention_backend=engine.backend),
               setup=dict(load_s=load_s, engine_build_s=compile_s, step_buckets=engine.num_compiled,
                          adapter_build_s=build_s, slot_write_ms=[1000 * w for w in writes],
                          slot_table_mib=engine.lora.nbytes / 2**20,
                          adapter_mib=adapter.nbytes / 2**20),
               bar=dict(adapters=top["adapters"], threshold=0.8, ratio=top["ratio"], **{"pass": top["ratio"] >= 0.8}),
               summary=summary, runs=runs)
    if a.micro_iters:
        ks = [k for k in ns if 0 < k <= max_loras]
        ctx = int(statistics.fmean(lengths)) + a.max_tokens // 2
        log(f"microbenchmark: decode bucket of {c} at context {ctx}, {a.micro_iters} rounds")
        res["micro_step"] = micro_step(engine, c, ctx, ks, a.micro_iters)
        res["micro_kernel"] = micro_kernel(engine, c, max(20, 10 * a.micro_iters))

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    md = tables(res)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
