"""One learning round: feedback -> SFT examples -> the next adapter version, judged on held-out items.

The round uses issue 8's trainer pieces (training/data.py, training/step.py) over a base model
loaded once per server in float32 with stacked layers, the way `hyprjax train` loads it, and
keeps its jitted step and loss across rounds: the optimizer has a constant learning rate (no
schedule depending on the round's length), so every round reuses the one compiled program.

Data (SFT on positives; no KTO):
- a correction trains the request followed by the corrected answer;
- a positive label (or a score >= 0.5) trains the request followed by the answer as served;
- negative labels and scores are recorded and counted, and trained on by nothing.
Each round trains on the feedback no promoted round has learned yet, plus a replay sample of the
items earlier promoted rounds of the live lineage learned (`replay` per new item), which limits
forgetting. Held-out items (store.py decides which, when they arrive) are never trained on: the
new version is promoted only if its mean loss per target token on all of them is below its
parent's.

How long a round trains: a number of passes over its data (between `min_steps` and `max_steps`),
stopped early once greedy decoding would reproduce every target of the round's new items
(teacher-forced argmax accuracy 1.0, checked every `check_every` steps). The held-out items
take no part in training or stopping: they only judge the finished version, so promotion is an
out-of-sample decision (held out by prompt, store.py). Training no further than that is what keeps
prompts unrelated to the feedback close to the parent: measured on the default model, 24 steps
at 1e-3 taught "Lutz" but also answered "Lutz" for France's capital, where stopping once the
answers came out right kept Paris (README, "Learning from traffic").
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..formats.load import load_model
from ..model import causal_attention
from ..training.data import DataError, Example, batch_at, line_examples, pack, steps_per_epoch
from ..training.lora import TrainLora
from ..training.step import make_train_step


@dataclass(frozen=True)
class LearnOptions:
    """How rounds train. The defaults teach a fact from a few dozen corrections in one or two
    rounds on the default model and on the tests' tiny one (tests/learn/test_learn_server.py)."""

    rank: int = 16  # of a fresh v0 (an adapter given with --lora keeps its own)
    alpha: float = 32.0
    lr: float = 3e-4  # constant: AdamW after global-norm clipping at 1.0
    epochs: float = 32.0  # passes over the round's data ...
    min_steps: int = 16  # ... but at least this many optimizer steps
    max_steps: int = 128  # ... and at most this many
    check_every: int = 2  # steps between checks of the new items' targets; 0: never stop early
    batch_size: int = 4
    seq_len: int = 256
    replay: float = 1.0  # earlier learned items replayed per new item
    heldout_every: int = 5  # one trainable feedback item in this many is kept aside to judge versions
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "min_steps", "max_steps", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"learning option {name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.epochs > 0 and self.replay >= 0 and self.heldout_every >= 2
                and self.check_every >= 0 and self.min_steps <= self.max_steps):
            raise ValueError("learning options: lr and epochs must be positive, replay and check_every >= 0, "
                             "heldout_every >= 2, min_steps <= max_steps")


def example_object(request: dict, answer: str) -> dict:
    """The training line (training/data.py's forms) for `request` answered with `answer`."""
    if "messages" in request:
        return {"messages": [*request["messages"], {"role": "assistant", "content": answer}]}
    return {"prompt": request["prompt"], "completion": answer}


def reply_example(obj: dict, tokenizer, seq_len: int) -> Example:
    """The example for one training line whose loss covers the final reply only.

    A chat is rendered as the server rendered it (the template with a generation prompt: P),
    then with the reply (Q); the target is Q[len(P):], the reply and the template's end-of-turn
    marker. Earlier assistant turns in the request are context, not targets: they are what a
    client sent, not what this adapter answered. An example longer than `seq_len` keeps its last
    `seq_len` tokens (the reply, and as much of the prompt as fits), never a reply cut from its
    context.
    """
    if "messages" not in obj:
        (ex,) = line_examples(obj, tokenizer, "the request")
    else:
        messages, reply = obj["messages"][:-1], obj["messages"][-1]["content"]
        if not tokenizer.has_chat_template:
            raise DataError("the model has no chat template to render the conversation")
        line_examples({"messages": obj["messages"]}, tokenizer, "the request")  # checks roles and content
        p = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        q = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                          add_generation_prompt=False)
        if not q.startswith(p):
            raise DataError("the chat template renders the conversation differently once the reply follows")
        prompt, answer = (tokenizer.encode(t, add_special_tokens=False) for t in (p, q[len(p):]))
        ex = Example(prompt + answer, [False] * len(prompt) + [True] * len(answer))
        ex.targets[0] = False
    if len(ex.ids) > seq_len:
        ex = Example(ex.ids[-seq_len:], [False] + ex.targets[-seq_len + 1:])
    return ex


class RoundTrainer:
    """The base model and compiled programs a server's rounds share; used from one thread."""

    def __init__(self, model_path: str, options: LearnOptions):
        self.model_path, self.options = model_path, options
        self.graphdef = self.base = self.cfg = self.tokenizer = None
        self._steps: dict[float, object] = {}
        self._evals: dict[float, object] = {}
        opts = options
        self.optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(opts.lr, weight_decay=0.0))

    def load(self) -> None:
        """Load the base model (float32, stacked layers) the first time a round needs it."""
        if self.base is None:
            loaded = load_model(self.model_path, dtype="float32", progress=False, scan_layers=True,
                                quantization="none")
            self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
            self.graphdef, self.base = nnx.split(loaded.model)

    def examples(self, objects: list[dict]) -> tuple[list[Example], list[str]]:
        """Tokenized examples for training lines (`reply_example`); (examples, why each unusable
        line was skipped)."""
        out, skipped = [], []
        for i, obj in enumerate(objects):
            try:
                out.append(reply_example(obj, self.tokenizer, self.options.seq_len))
            except (DataError, KeyError, TypeError) as e:
                skipped.append(f"item {i}: {e}")
        return out, skipped

    def score(self, params: dict, scale: float, examples: list[Example]) -> tuple[float, float]:
        """(mean cross-entropy per target token, teacher-forced argmax accuracy) of `examples`."""
        if scale not in self._evals:
            self._evals[scale] = jax.jit(functools.partial(_scores, graphdef=self.graphdef, scale=scale))
        fn, bs = self._evals[scale], self.options.batch_size
        packed = pack(examples, self.options.seq_len, self.options.seed)
        total = count = correct = 0.0
        n = packed.num_rows
        for i in range(0, n, bs):
            batch = packed.rows(np.arange(i, i + bs) % n)
            batch["weights"] = np.where((np.arange(i, i + bs) < n)[:, None], batch["weights"], 0)
            s, c, k = fn(params, self.base, batch)
            total, count, correct = total + float(s), count + float(c), correct + float(k)
        return total / max(count, 1.0), correct / max(count, 1.0)

    def fit(self, params: dict, scale: float, examples: list[Example], on_step=None, stop=None) -> tuple[dict, dict]:
        """Train `params` (copied; the caller's stay as they are) on `examples`, stopping early once
        greedy decoding reproduces every target of the round's new items (`stop`, examples); (new
        params, metrics). The held-out items play no part here: they judge the result."""
        opts = self.options
        if scale not in self._steps:
            self._steps[scale] = make_train_step(self.graphdef, self.optimizer, scale=scale)
        step_fn = self._steps[scale]
        packed = pack(examples, opts.seq_len, opts.seed)
        total = min(opts.max_steps, max(opts.min_steps, math.ceil(opts.epochs * steps_per_epoch(packed, opts.batch_size))))
        params = jax.tree.map(lambda x: x.copy(), params)
        opt_state = self.optimizer.init(params)
        losses, t0, stopped = [], time.perf_counter(), None
        for s in range(total):
            batch = batch_at(packed, s, opts.batch_size, opts.seed)
            batch = {k: v[None] for k, v in batch.items()}
            params, opt_state, metrics = step_fn(params, opt_state, self.base, batch)
            losses.append(float(metrics["loss"]))
            if on_step is not None:
                on_step(s + 1, total, losses[-1])
            if stop and opts.check_every and (s + 1) % opts.check_every == 0 and s + 1 < total:
                if self.score(params, scale, stop)[1] >= 1.0:
                    stopped = "the new items' targets are reproduced"
                    break
        return params, {"steps": len(losses), "step_budget": total, "stopped": stopped,
                        "train_loss_first": losses[0], "train_loss": losses[-1],
                        "train_seconds": round(time.perf_counter() - t0, 3), "train_rows": packed.num_rows}


def _scores(lora, base, batch, *, graphdef, scale):
    """(summed cross-entropy, target count, targets the argmax predicts) of one batch [B, S]."""
    model = nnx.merge(graphdef, base)
    attention = functools.partial(causal_attention, segments=batch["segments"])
    logits, _ = model(batch["tokens"], batch["positions"], attention=attention, adapter=TrainLora(lora, scale))
    labels = batch["labels"]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), jnp.sum((jnp.argmax(logits, -1) == labels) * w)
