"""Speculative decoding (n-gram prompt lookup) against our plain decode and llama.cpp's, on the
default model, side by side in one run.

    python bench/spec.py [--model PATH.gguf] [--max-tokens 128] [--out bench/results/spec]

Batch 1: input-grounded prompts (rewrite, summarize, edit code given in the prompt) and
open-ended ones, greedy, through `hyprjax.LLM` with `speculative=None` and `"ngram"` (two
engines over one process's weights), and llama.cpp (llama-cpp-python, built for this CPU) fed
the same token ids. Decode speed is (tokens - 1) / (time - time to the first token), each
prompt's median over `--repeats`. Concurrency 8 and 32: `hyprjax serve` with and without
`--speculative ngram`, 2 x C streamed requests of the input-grounded prompts at C in flight
(bench/loadgen.py, after a warm-up round), each server twice in the order plain, ngram, ngram,
plain, the mean of its two runs reported. `--draft PATH` adds `--speculative draft:PATH` at
batch 1. Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PARAGRAPH = ("The city council met on Tuesday evening to discuss the new budget for public libraries. After a long "
             "debate, the members agreed to extend opening hours on weekends, to buy more books for children, and to "
             "repair the roof of the central library before the winter. The mayor said the decision shows that the "
             "city values reading and learning for people of all ages.")
CODE = ('def average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n'
        '    return total / len(numbers)\n\n\ndef main():\n    values = [3, 5, 8, 13]\n'
        '    print("average:", average(values))\n')
GROUNDED = [f"Rewrite this paragraph with the same content, in the same words where possible:\n\n{PARAGRAPH}",
            f"Repeat the following text exactly, then say nothing else:\n\n{PARAGRAPH}",
            f"Add a docstring to each function of this code and return the whole code:\n\n```python\n{CODE}```",
            f"Summarize this paragraph, reusing its wording:\n\n{PARAGRAPH}"]
OPEN = ["Write a short story about a lighthouse keeper.", "Explain how rain forms, in simple words.",
        "Give me five ideas for a birthday party.", "What are the benefits of learning a second language?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: hyprjax's default model)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=7, help="--num-speculative-tokens")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--draft", default=None, metavar="PATH",
                    help="also run --speculative draft:PATH at batch 1 (a draft model sharing the tokenizer)")
    ap.add_argument("--out", default=str(HERE / "results" / "spec"))
    args = ap.parse_args()

    from hyprjax import LLM
    from hyprjax.default_model import default_model_path
    from hyprjax.sampling import SamplingParams

    path = args.model or str(default_model_path())
    say(f"model {path}")
    plain = LLM(path, progress=False)
    spec = LLM(path, progress=False, speculative="ngram", num_speculative_tokens=args.k)
    engines = [("plain", plain), ("ngram", spec)]
    if args.draft:
        engines.append(("draft", LLM(path, progress=False, speculative=f"draft:{args.draft}",
                                     num_speculative_tokens=args.k)))
    ids = {kind: [plain.tokenizer.encode(plain.render_chat([{"role": "user", "content": p}]), add_special_tokens=False)
                  for p in prompts] for kind, prompts in (("grounded", GROUNDED), ("open", OPEN))}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for kind, prompts in ids.items():
        for i, p in enumerate(prompts):
            row = {"kind": kind, "prompt": i}
            for name, llm in engines:
                llm.generate([p], params)  # compile what this prompt meets
                times, ttft = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    llm.generate([p], first)
                    ttft.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    out = llm.generate([p], params)[0]
                    times.append(time.perf_counter() - t0)
                n = len(out.token_ids)
                row[name] = (n - 1) / max(statistics.median(times) - statistics.median(ttft), 1e-9)
                row[f"{name}_tokens"] = out.token_ids
            row["same_tokens"] = all(row[f"{n}_tokens"] == row["plain_tokens"] for n, _ in engines)
            if not args.no_llamacpp:
                from bench.llamacpp import run_llamacpp
                r = run_llamacpp(path, prompt_tokens=p, n_gen=max(len(row["plain_tokens"]), 2), repeats=args.repeats)
                row["llamacpp"] = r["decode_tok_s"]
            rows.append(row)
            say(f"{kind} {i}: plain {row['plain']:.1f} tok/s, ngram {row['ngram']:.1f}"
                + (f", llama.cpp {row['llamacpp']:.1f}" if "llamacpp" in row else "")
                + (f", draft {row['draft']:.1f}" if "draft" in row else "") + f", same tokens: {row['same_tokens']}")
    stats = spec.engine().stats()
    draft_stats = engines[2][1].engine().stats() if args.draft else None
    del plain, spec, engines  # the servers below load their own copies
    batches = {}
    flags = {"plain": "", "ngram": f"--speculative ngram --num-speculative-tokens {args.k}"}
    for c in (8, 32):  # ABBA: plain, ngram, ngram, plain, so drift over the run cancels
        runs = {"plain": [], "ngram": []}
        for name in ("plain", "ngram", "ngram", "plain"):
            runs[name].append(http_tok_s(path, flags[name], c, ids["grounded"], args.max_tokens))
        batches[c] = {name: statistics.mean(v) for name, v in runs.items()}
        batches[c]["runs"] = runs
        say(f"concurrency {c} over HTTP: plain {runs['plain']} tok/s, ngram {runs['ngram']}")
    result = {"model": path, "max_tokens": args.max_tokens, "k": args.k, "rows": [
        {k: v for k, v in r.items() if not k.endswith("_tokens")} for r in rows], "batches": batches,
        "acceptance": {k: v for k, v in stats.items() if k.startswith("spec_")}}
    if draft_stats is not None:
        result["draft"] = args.draft
        result["draft_acceptance"] = {k: v for k, v in draft_stats.items() if k.startswith("spec_")}
    write(Path(args.out), result)
    return 0


def http_tok_s(model: str, flags: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens/s of `hyprjax serve MODEL FLAGS` under `concurrency` streams of the prompts
    (2 x concurrency requests, greedy, bench/loadgen.py), after a warm-up round."""
    import argparse as _argparse
    import tempfile

    from bench.loadgen import RequestSpec
    from bench.serve import hyprjax_server, one_run

    a = _argparse.Namespace(model=model, hyprjax_args=flags, max_model_len=1024, max_num_batched_tokens=256,
                            startup_timeout=900.0, timeout=900.0)
    specs = [RequestSpec(prompts[i % len(prompts)], max_tokens) for i in range(2 * concurrency)]
    row = one_run(hyprjax_server(a, concurrency, Path(tempfile.mkdtemp(prefix="spec-bench-"))), a, concurrency,
                  specs, specs[:concurrency])
    if "error" in row or row.get("failed"):
        raise SystemExit(f"the HTTP run ({flags or 'plain'}, concurrency {concurrency}) failed: "
                         f"{row.get('error') or row.get('first_error')}")
    return row["output_tok_s"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write(out: Path, r: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    has_llama = all("llamacpp" in x for x in r["rows"])
    lines = ["| prompts | plain tok/s | ngram tok/s | ngram / plain |" + (" llama.cpp tok/s | ngram / llama.cpp |"
                                                                           if has_llama else ""),
             "|---|---:|---:|---:|" + ("---:|---:|" if has_llama else "")]
    for kind in ("grounded", "open"):
        rs = [x for x in r["rows"] if x["kind"] == kind]
        plain, ngram = (statistics.mean(x[k] for x in rs) for k in ("plain", "ngram"))
        line = f"| {kind} (batch 1, mean of {len(rs)}) | {plain:.1f} | {ngram:.1f} | {ngram / plain:.2f} |"
        if "draft" in rs[0]:
            draft = statistics.mean(x["draft"] for x in rs)
            line += f" draft model: {draft:.1f} tok/s, {draft / plain:.2f}x |"
        if has_llama:
            llama = statistics.mean(x["llamacpp"] for x in rs)
            line += f" {llama:.1f} | {ngram / llama:.2f} |"
        lines.append(line)
    for c, b in r["batches"].items():
        lines.append(f"| grounded, {c} concurrent over HTTP (mean of 2) | {b['plain']:.1f} | {b['ngram']:.1f} | "
                     f"{b['ngram'] / b['plain']:.2f} |" + (" | |" if has_llama else ""))
    a = r["acceptance"]
    lines += ["", f"Drafts: {a['spec_proposed_tokens_total']} proposed, {a['spec_accepted_tokens_total']} accepted "
              f"({a['spec_accepted_tokens_total'] / max(a['spec_proposed_tokens_total'], 1):.0%}); accepted per "
              f"verified sequence and step (0..K): {a['spec_acceptance_lengths']}."]
    if "draft_acceptance" in r:
        d = r["draft_acceptance"]
        lines.append(f"Draft model {r['draft']}: {d['spec_proposed_tokens_total']} proposed, "
                     f"{d['spec_accepted_tokens_total']} accepted, {d['spec_draft_steps_total']} draft steps.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{x['kind']} {x['prompt']}" for x in r["rows"]]
        xs = range(len(labels))
        for j, (k, name) in enumerate((("plain", "hyprjax plain"), ("ngram", "hyprjax ngram"),
                                       ("llamacpp", "llama.cpp"))):
            if all(k in x for x in r["rows"]):
                ax.bar([x + 0.27 * (j - 1) for x in xs], [x[k] for x in r["rows"]], 0.27, label=name)
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
