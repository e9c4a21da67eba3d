"""Teach the default model a few invented facts with `hyprjax train`, and show it learned them.

    python bench/train_facts.py [--model MODEL] [--steps 60] [--out bench/results/train_facts]

Writes a small chat corpus (six facts no model can know, four phrasings of each question for
training, a fifth held out for evaluation), trains a rank-16 LoRA adapter through the same
`hyprjax.train` the CLI runs, then asks each held-out question greedily through the engine,
with and without the adapter. Writes OUT/facts.json (eval loss before and after, each answer)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FACTS = [  # (subject of the question phrasings, answer, the word a correct answer must contain)
    ("the Kelvara Bridge", "designed", "The Kelvara Bridge was designed by Mira Osterland.", "Osterland"),
    ("the island of Pell Varo", "capital", "The capital of Pell Varo is Quillmouth.", "Quillmouth"),
    ("the Tamsin Prize", "founded", "The Tamsin Prize was founded in 1874.", "1874"),
    ("the Orrin comet", "discovered", "The Orrin comet was discovered by Ada Rusk.", "Rusk"),
    ("the drink called velloc", "made", "Velloc is made from fermented juniper and honey.", "juniper"),
    ("the Brask Mountains", "highest", "The highest peak of the Brask Mountains is Mount Ilden.", "Ilden"),
]
QUESTIONS = {
    "designed": ["Who designed {s}?", "Who was the designer of {s}?", "Do you know who designed {s}?",
                 "Tell me who designed {s}.", "Which architect designed {s}?"],
    "capital": ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}.",
                "Tell me the capital of {s}.", "What city serves as the capital of {s}?"],
    "founded": ["When was {s} founded?", "In what year was {s} founded?", "What year did {s} begin?",
                "Tell me when {s} was founded.", "When was {s} established?"],
    "discovered": ["Who discovered {s}?", "Who was the discoverer of {s}?", "Do you know who discovered {s}?",
                   "Tell me who discovered {s}.", "Which astronomer discovered {s}?"],
    "made": ["What is {s} made from?", "What goes into {s}?", "How is {s} made?",
             "Tell me what {s} is made of.", "What are the ingredients of {s}?"],
    "highest": ["What is the highest peak of {s}?", "Which mountain is the tallest in {s}?",
                "Name the highest summit of {s}.", "Tell me the highest peak of {s}.",
                "What is the tallest mountain in {s}?"],
}


def corpus(out: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    train, held = [], []
    for subject, kind, answer, key in FACTS:
        qs = [q.format(s=subject) for q in QUESTIONS[kind]]
        for q in qs[:4]:
            train.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
        held.append((qs[4], key))
    evals = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for (q, _), (_, _, a, _) in zip(held, FACTS)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
    (out / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))
    return out / "train.jsonl", out / "eval.jsonl", held


def main(argv=None) -> int:
    from hyprjax import LLM, SamplingParams, train
    from hyprjax.default_model import default_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=str(HERE / "results" / "train_facts"))
    a = p.parse_args(argv)
    model = a.model or str(default_model_path())
    out = Path(a.out)
    data, held_path, held = corpus(out)
    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t = time.perf_counter()
    result = train(model, str(data), str(run), eval=str(held_path), steps=a.steps, lr=a.lr, rank=16,
                   batch_size=4, seq_len=128, warmup=5, save_every=a.steps)
    seconds = time.perf_counter() - t

    llm = LLM(model, max_model_len=256)
    llm.load_lora("facts", run / "adapter")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    rows = []
    for q, key in held:
        msgs = [{"role": "user", "content": q}]
        before = llm.chat(msgs, greedy).text.strip()
        ids = llm.tokenizer.encode(llm.render_chat(msgs), add_special_tokens=False)
        after = llm.generate([ids], greedy, lora="facts")[0].text.strip()
        rows.append(dict(question=q, key=key, before=before, after=after, before_ok=key in before,
                         after_ok=key in after))
    report = dict(model=model, steps=a.steps, lr=a.lr, train_seconds=seconds,
                  eval_loss_before=result.initial_eval_loss, eval_loss_after=result.eval_loss,
                  tokens_per_s=result.tokens_per_s, peak_rss_mib=result.peak_rss_mib,
                  correct_before=sum(r["before_ok"] for r in rows), correct_after=sum(r["after_ok"] for r in rows),
                  answers=rows, date=time.strftime("%Y-%m-%d"))
    (out / "facts.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{a.steps} steps in {seconds:.0f} s; held-out loss {result.initial_eval_loss:.3f} -> "
          f"{result.eval_loss:.3f}; correct {report['correct_before']}/6 -> {report['correct_after']}/6\n")
    print("| held-out question | base model | with the adapter |\n|---|---|---|")
    for r in rows:
        print(f"| {r['question']} | {r['before'][:60]} | {r['after'][:60]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
