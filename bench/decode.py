"""Prefill and decode speed, hyprjax vs llama.cpp side by side on the same GGUF file.

    python bench/decode.py MODEL.gguf [MODEL.gguf ...]
    python bench/decode.py --make qwen3-0.6b --qtype F16 Q8_0      # random-weight models it creates
    python bench/decode.py MODEL.gguf --quantization none int8 int4 keep keep8   # one row per weight mode
    python bench/decode.py MODEL.gguf --quantization int8 --kv-cache-dtype float32 bfloat16   # ... and KV dtype

Prefill: one fresh `--n-prompt`-token prompt (llama-bench's pp512). Decode: greedy batch-1
generation right after it, timed over the `--n-gen` - 1 steps after the first token (the first
comes from the prefill logits), the way llama.cpp's eval time counts it. Both engines get the
same token ids. Speeds are medians over `--repeats` runs after one warm-up (compilation for us).
Writes JSON, prints a markdown table, and draws a PNG when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llamacpp import LlamaCppError, default_prompt, run_llamacpp  # noqa: E402


def log(msg: str) -> None:
    print(f"[decode bench] {msg}", file=sys.stderr, flush=True)


def bench_hyprjax(path: str, prompt: list[int], n_gen: int, repeats: int, dtype: str,
                  quantization: str = "none", kv_cache_dtype: str = "auto") -> dict:
    import hyprjax

    t0 = time.perf_counter()
    # No prefix cache: every repeat prefills the same prompt, which would otherwise be served from
    # the pages of the warm-up run (prefill "measured" at 4-5x its real speed).
    llm = hyprjax.LLM(path, dtype=dtype, max_model_len=len(prompt) + n_gen + 16, enable_prefix_caching=False,
                      quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    load_s = time.perf_counter() - t0

    def timed(max_tokens: int):
        params = hyprjax.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        return time.perf_counter() - start, out.token_ids

    log(f"hyprjax: loaded in {load_s:.1f} s; compiling prefill and decode (warm-up) ...")
    t0 = time.perf_counter()
    timed(1), timed(n_gen)
    compile_s = time.perf_counter() - t0
    prefill, total, tokens = [], [], []
    for r in range(repeats):
        log(f"hyprjax: repeat {r + 1}/{repeats}")
        prefill.append(timed(1)[0])
        t, tokens = timed(n_gen)
        total.append(t)
    p, t = statistics.median(prefill), statistics.median(total)
    from hyprjax.formats.load import read_config
    from hyprjax.quant import device_bytes, resolve_mode

    cfg, weights = read_config(Path(path))
    mode = resolve_mode(quantization, weights)
    return dict(engine="hyprjax", dtype=dtype, quantization=mode, param_bytes=device_bytes(cfg, mode, 4, weights),
                kv_cache_dtype=llm.engine().ecfg.kv_cache_dtype,
                prefill_tok_s=len(prompt) / p, decode_tok_s=(n_gen - 1) / (t - p),
                load_s=load_s, warmup_s=compile_s, tokens=tokens)


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return dict(common_prefix=prefix, of=n)


# Public domain (Jane Austen, Pride and Prejudice, 1813): the real-text prompt for real models.
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said "
        "his lady to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied "
        "that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all "
        "about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" cried his wife "
        "impatiently. \"You want to tell me, and I have no objection to hearing it.\" This was invitation enough.")


def text_prompt(path: str, n_prompt: int) -> list[int]:
    """The first n_prompt tokens of TEXT (repeated as needed), tokenized by the file's own tokenizer."""
    from hyprjax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_file(path)
    ids = tok.encode(TEXT)
    while len(ids) < n_prompt:
        ids += tok.encode(" " + TEXT, add_special_tokens=False)
    return ids[:n_prompt]


def run(paths: list[str], n_prompt: int, n_gen: int, repeats: int, threads: int, dtype: str,
        text: bool = False, quantizations=("none",), kv_dtypes=("auto",)) -> list[dict]:
    from hyprjax.formats.gguf_read import GGUFFile

    rows = []
    for path in paths:
        gf = GGUFFile(path)
        vocab = gf.shape("token_embd.weight")[0]
        types = sorted({gf.type_name(n) for n in gf.names() if gf.shape(n)[0] > 1 and len(gf.shape(n)) == 2})
        prompt = text_prompt(path, n_prompt) if text else default_prompt(n_prompt, vocab)
        name = Path(path).name
        log(f"{name}: llama.cpp ({threads} threads) ...")
        try:
            theirs = run_llamacpp(path, n_gen=n_gen, threads=threads, repeats=repeats, prompt_tokens=prompt)
        except LlamaCppError as e:
            log(f"llama.cpp unavailable: {e}")
            theirs = None
        for quantization, kv in ((q, kv) for q in quantizations for kv in kv_dtypes):
            log(f"{name}: hyprjax ({dtype}, quantization {quantization}, KV cache {kv}) ...")
            ours = bench_hyprjax(path, prompt, n_gen, repeats, dtype, quantization, kv)
            row = dict(model=name, weight_types=types, n_prompt=n_prompt, n_gen=n_gen,
                       prompt="text" if text else "random ids", hyprjax=ours, llamacpp=theirs)
            if theirs:
                row["prefill_ratio"] = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
                row["decode_ratio"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
                row["greedy_agreement"] = agreement(ours["tokens"], theirs["tokens"])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | hyprjax weights | KV cache | params MiB | hyprjax prefill tok/s "
             "| llama.cpp prefill tok/s | ratio | hyprjax decode tok/s | llama.cpp decode tok/s | ratio "
             "| greedy tokens equal (prefix) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, l = r["hyprjax"], r["llamacpp"] or {}
        agree = r.get("greedy_agreement")
        agree = f"{agree['common_prefix']}/{agree['of']}" if agree else "-"
        mode = h.get("quantization", "none")
        mine = h.get("dtype", "float32") if mode == "none" else mode
        lines.append(f"| {r['model']} | {'/'.join(r['weight_types'])} | {mine} | "
                     f"{h.get('kv_cache_dtype', 'float32')} | {h.get('param_bytes', 0) / 2**20:,.0f} | "
                     f"{h['prefill_tok_s']:.1f} | "
                     f"{l.get('prefill_tok_s', float('nan')):.1f} | {r.get('prefill_ratio', float('nan')):.2f} | "
                     f"{h['decode_tok_s']:.2f} | {l.get('decode_tok_s', float('nan')):.2f} | "
                     f"{r.get('decode_ratio', float('nan')):.2f} | "
                     f"{agree} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [f'{r["model"].removesuffix(".gguf")}\n{r["hyprjax"].get("quantization", "none")}, KV '
             f'{r["hyprjax"].get("kv_cache_dtype", "float32")}' for r in rows]
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["hyprjax"][key] for r in rows], 0.4, label="hyprjax")
        ax.bar([x + 0.2 for x in xs], [(r["llamacpp"] or {}).get(key, 0) for r in rows], 0.4, label="llama.cpp")
        ax.set_xticks(list(xs), names, rotation=15, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    log(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="GGUF files to measure")
    ap.add_argument("--make", metavar="SHAPE", help="create random-weight GGUFs of this preset shape first")
    ap.add_argument("--qtype", nargs="+", default=["F16", "Q8_0"], help="weight types for --make")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--dtype", default="float32", help="hyprjax parameter dtype (float32 is fastest on CPU)")
    ap.add_argument("--quantization", nargs="+", default=["none"],
                    choices=["auto", "none", "int8", "int4", "keep", "keep8"],
                    help="hyprjax's weight modes, a row each (hyprjax/quant.py); none: floats as --dtype")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                    help="hyprjax's KV cache dtypes, a row each per weight mode (auto: bfloat16 for quantized "
                         "weights, else float32)")
    ap.add_argument("--text", action="store_true",
                    help="prompt with real English text (tokenized by the model) instead of random token ids")
    ap.add_argument("--out", default=str(HERE / "results" / "decode.json"))
    args = ap.parse_args(argv)
    paths = list(args.models)
    if args.make:
        from make_model import make_model

        for q in args.qtype:
            out = HERE / "models" / f"{args.make}-{q.lower()}.gguf"
            if not out.exists():
                log(f"creating {out} ...")
                make_model(args.make, q, out)
            paths.append(str(out))
    if not paths:
        ap.error("give GGUF files or --make SHAPE")
    rows = run(paths, args.n_prompt, args.n_gen, args.repeats, args.threads, args.dtype, args.text, args.quantization,
               args.kv_cache_dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:  # keep the JSON readable: token lists go, the agreement stays
        for side in ("hyprjax", "llamacpp"):
            if r[side]:
                r[side].pop("tokens", None)
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=2))
    print(table(rows))
    log(f"wrote {out}")
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
