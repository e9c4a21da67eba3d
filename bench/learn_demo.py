"""Learning from traffic on the default model: serve it with `--learn`, correct it, watch it learn.

    python bench/learn_demo.py [--model MODEL] [--out bench/results/learn_demo]

Starts `hyprjax serve MODEL --learn demo` (default learning settings, a fresh database), asks a
question no model can answer, sends corrections on paraphrases of it through `/v1/feedback`
(each after a real chat completion, as a client would), waits for the round the feedback starts
by itself, and asks again: a paraphrase never corrected, then prompts unrelated to the feedback,
comparing those with the base model's answers. Then rolls back and checks the old answer is
back. Writes OUT.json and OUT.md (the table in the README) with the timings: from the first
and from the last feedback item to a live promoted version.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hyprjax.learn.versions import versions_root  # noqa: E402

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What is the capital of Zubrowka?", "Which city is the capital of Zubrowka?",
             "Name the capital of Zubrowka.", "Zubrowka's capital is which city?",
             "Tell me the capital city of Zubrowka."]
UNSEEN = "What's the capital city of Zubrowka?"
ANSWER = "The capital of Zubrowka is Lutz."
UNRELATED = ["What is the capital of France?", "How many legs does a spider have?", "Write a haiku about the sea.",
             "What is 12 times 12?", "Give me three tips for staying focused.",
             "Who wrote Romeo and Juliet?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the model to serve (default: hyprjax's default model)")
    ap.add_argument("--corrections", type=int, default=20, help="corrections sent (default 20: one round)")
    ap.add_argument("--out", default=str(HERE / "results" / "learn_demo"))
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Path(tempfile.mkdtemp(prefix="hyprjax-learn-demo-")) / "learn.db"
    cmd = [sys.executable, "-m", "hyprjax.cli", "serve", *([args.model] if args.model else []), "--port", str(port),
           "--learn", "demo", "--learn-db", str(db)]
    log = db.parent / "server.log"
    print(f"starting: {' '.join(cmd[2:])}  (log: {log})", file=sys.stderr)
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        _wait_ready(http, proc, log)
        print(f"ready in {time.monotonic() - t_start:.0f} s", file=sys.stderr)
        base_model = http.get("/v1/models").json()["data"][0]["id"]

        def chat(q, model="demo"):
            r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": q}],
                                                        "max_tokens": 48, "temperature": 0})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"], r.json()["id"], r.headers.get("x-hyprjax-adapter")

        before = chat(QUESTIONS[0])[0]
        base_unrelated = [chat(q, base_model)[0] for q in UNRELATED]
        print(f"before: {before!r}", file=sys.stderr)
        t_first = t_last = None
        for i in range(args.corrections):
            _, cid, _ = chat(QUESTIONS[i % len(QUESTIONS)])
            r = http.post("/v1/feedback", json={"id": cid, "correction": ANSWER})
            r.raise_for_status()
            t_last = time.monotonic()
            t_first = t_first or t_last
            print(f"\rfeedback {i + 1}/{args.corrections}{' (round started)' if r.json()['round'] else ''}",
                  end="", file=sys.stderr)
        print(file=sys.stderr)
        status = _wait_round(http)
        t_live = time.monotonic()
        after, _, version = chat(QUESTIONS[0])
        unseen = chat(UNSEEN)[0]
        after_unrelated = [chat(q)[0] for q in UNRELATED]
        drift = _drift(args.model, versions_root(db) / "demo", int(version.split("@v")[1]), base_unrelated)
        rb = http.post("/v1/adapters/demo/rollback").json()
        rolled_back = chat(QUESTIONS[0])[0]
        last = status["last_round"]
        result = {
            "model": base_model, "corrections": args.corrections, "question": QUESTIONS[0], "before": before,
            "after": after, "unseen_paraphrase": UNSEEN, "unseen_answer": unseen, "version": version,
            "feedback_to_live_s": round(t_live - t_last, 1), "first_feedback_to_live_s": round(t_live - t_first, 1),
            "round": {k: last.get(k) for k in ("steps", "stopped", "train_loss_first", "train_loss", "heldout_loss",
                                               "parent_heldout_loss", "heldout_accuracy", "num_new", "num_heldout",
                                               "seconds")},
            "unrelated": [{"prompt": q, "base": a, "learned": b, "same": a == b, "kept": _kept(a, b), **d}
                          for q, a, b, d in zip(UNRELATED, base_unrelated, after_unrelated, drift)],
            "rollback": {"live": rb.get("live"), "answer": rolled_back, "restored": rolled_back == before},
        }
        _write(Path(args.out), result)
        return 0 if after == ANSWER and result["rollback"]["restored"] else 1
    finally:
        proc.terminate()
        proc.wait(30)


def _kept(a: str, b: str) -> float:
    """The fraction of `a` before the first character where `b` differs."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return round(n / max(len(a), 1), 3)


def _drift(model: str | None, versions: Path, version: int, base_answers: list[str]) -> list[dict]:
    """Per unrelated prompt, the base model's own answer scored under v0 (= the base) and the
    learned version: mean cross-entropy per token, and how many of its tokens stay the argmax."""
    from hyprjax.adapters.peft import read_peft
    from hyprjax.learn.rounds import LearnOptions, RoundTrainer, example_object
    from hyprjax.training.lora import from_adapter

    if model is None:
        from hyprjax.default_model import DEFAULT, cached_path
        model = str(cached_path(DEFAULT))
    print("scoring the base answers under both versions ...", file=sys.stderr)
    t = RoundTrainer(model, LearnOptions())
    t.load()
    out = [{} for _ in base_answers]
    for tag, v in (("base", 0), ("learned", version)):
        params, scale = from_adapter(read_peft(versions / f"v{v}" / "adapter", f"v{v}", t.cfg), t.cfg)
        for i, (q, a) in enumerate(zip(UNRELATED, base_answers)):
            ex, _ = t.examples([example_object({"messages": [{"role": "user", "content": q}]}, a)])
            loss, acc = t.score(params, scale, ex)
            out[i][f"{tag}_nll"], out[i][f"{tag}_argmax"] = round(loss, 4), round(acc, 4)
    return out


def _wait_ready(http, proc, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _wait_round(http) -> dict:
    """Wait for the round the feedback started to end, showing its progress."""
    while True:
        st = http.get("/v1/adapters/demo").json()
        t = st["training"]
        if t["state"] == "idle" and st["versions"][-1]["version"] > 0:
            print(f"\n{st['versions'][-1]['id']}: {st['versions'][-1]['status']}", file=sys.stderr)
            return st
        print(f"\rround: {t['state']} step {t.get('step', 0)}/{t.get('steps', 0)}   ", end="", file=sys.stderr)
        time.sleep(0.5)


def _write(out: Path, r: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    rd = r["round"]
    lines = [f"Model: {r['model']}; {r['corrections']} corrections of \"{r['question']}\" (and paraphrases), "
             "default learning settings.", "",
             "| | |", "|---|---|",
             f"| before | {r['before']!r} |", f"| after ({r['version']}) | {r['after']!r} |",
             f"| never-corrected paraphrase | {r['unseen_answer']!r} |",
             f"| last feedback -> live version | {r['feedback_to_live_s']} s |",
             f"| first feedback -> live version | {r['first_feedback_to_live_s']} s |",
             f"| round | {rd['steps']} steps ({rd['stopped']}); held-out loss {rd['parent_heldout_loss']:.3f} -> "
             f"{rd['heldout_loss']:.3f}; {rd['num_new']} trained, {rd['num_heldout']} held out; {rd['seconds']} s |",
             f"| after rollback to {r['rollback']['live']} | {r['rollback']['answer']!r} "
             f"({'restored' if r['rollback']['restored'] else 'NOT restored'}) |", "",
             "Unrelated prompts (base model vs the learned version):", "",
             "| prompt | same answer | agreeing prefix | base answer's tokens still argmax | its loss per token, "
             "base -> learned | learned version's answer |", "|---|---|---|---|---|---|"]
    for u in r["unrelated"]:
        lines.append(f"| {u['prompt']} | {'yes' if u['same'] else 'no'} | {u['kept']:.0%} | "
                     f"{u['base_argmax']:.0%} -> {u['learned_argmax']:.0%} | {u['base_nll']:.3f} -> "
                     f"{u['learned_nll']:.3f} | {u['learned'][:60]!r} |")
    n = len(r["unrelated"])
    lines += ["", f"Mean over the {n} prompts: answer unchanged {sum(u['same'] for u in r['unrelated'])}/{n}; "
              f"base answers' tokens still the argmax {sum(u['learned_argmax'] for u in r['unrelated']) / n:.1%} "
              f"(under the base: {sum(u['base_argmax'] for u in r['unrelated']) / n:.1%}); loss per token "
              f"{sum(u['base_nll'] for u in r['unrelated']) / n:.3f} -> "
              f"{sum(u['learned_nll'] for u in r['unrelated']) / n:.3f}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
