"""Training data: JSONL lines -> token ids with loss targets -> packed rows -> the batch for a step.

- `read_examples` turns each line (a chat, a prompt/completion pair or plain text) into an
  `Example`: token ids plus a per-token flag saying whether the model is trained to predict it.
  Chats train on the assistant turns only, as rendered by the model's own chat template, so a
  fine-tuned model sees the exact text it will be prompted with at inference.
- `pack` shuffles the examples once and packs them into fixed-length rows. Every row has the same
  shape, so the train step compiles once; each document in a row gets its own segment id and
  positions from 0, so attention (masked by segment) and RoPE see it exactly as if it were alone.
- `batch_at` gives the rows of optimizer step `s` as a pure function of (packed, s, batch size,
  seed): a run resumed at step k trains on exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import HyprjaxError

_FORMS = {"messages": ("messages",), "prompt/completion": ("prompt", "completion"), "text": ("text",)}
_FIELDS = ("tokens", "positions", "segments", "labels", "weights")


class DataError(HyprjaxError):
    """A training data file that cannot be read; the message names the file and line."""


@dataclass
class Example:
    """One document: `targets[i]` says token i is a loss target (predicted from token i-1)."""

    ids: list[int]
    targets: list[bool]  # targets[0] is always False: the first token has nothing to be predicted from


# ---------------------------------------------------------------------------------------- reading
def read_examples(path: str | os.PathLike, tokenizer) -> list[Example]:
    """Every example in a JSONL file; blank lines are skipped. Each line is one JSON object:

    - `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template; the loss covers
      the assistant turns, each with the template's end-of-turn marker (so the model learns to stop).
      One example per line, or one per assistant turn where the template renders earlier turns
      differently (Qwen3's does; see `_chat_examples`).
    - `{"prompt": str, "completion": str}`: the loss covers the completion and an EOS.
    - `{"text": str}`: the loss covers every token but the first, then an EOS.

    Anything else raises `DataError("FILE:LINE: what is wrong")`.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the training data ({e.strerror})") from None
    examples = []
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
            obj = json.loads(line) if line.strip() else None
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if obj is not None:
            examples += line_examples(obj, tokenizer, where)
    if not examples:
        raise DataError(f"{path}: no examples (the file holds no JSON lines)")
    return examples


def line_examples(obj, tokenizer, where: str) -> list[Example]:
    """The examples of one parsed line (a form `read_examples` lists); errors name `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    forms = [name for name, keys in _FORMS.items() if any(k in obj for k in keys)]
    if len(forms) != 1:
        raise DataError(f"{where}: expected exactly one of the forms {{\"messages\"}}, {{\"prompt\", "
                        f"\"completion\"}} or {{\"text\"}}; found {forms or 'none'}")
    for key in _FORMS[forms[0]]:
        if key not in obj:
            raise DataError(f"{where}: {key!r} is missing")
    if forms[0] == "messages":
        return _chat_examples(_checked_messages(obj["messages"], where), tokenizer, where)
    for key in _FORMS[forms[0]]:
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    # Any stop id ends generation; the smallest is the end-of-text token in the vocabularies we know
    # (Qwen <|endoftext|>, Llama 3 <|end_of_text|>, Gemma <eos>), the right end for a plain document.
    eos = [min(tokenizer.eos_token_ids)] if tokenizer.eos_token_ids else []
    if forms[0] == "text":
        if not obj["text"]:
            raise DataError(f"{where}: 'text' is empty")
        ids = tokenizer.encode(obj["text"], add_special_tokens=True)
        if not set(ids[-1:]) & tokenizer.eos_token_ids:  # the tokenizer may add one itself
            ids += eos
        return [Example(ids, [False] + [True] * (len(ids) - 1))]
    if not obj["completion"]:
        raise DataError(f"{where}: 'completion' is empty")
    prompt = tokenizer.encode(obj["prompt"], add_special_tokens=True)
    completion = tokenizer.encode(obj["completion"], add_special_tokens=False) + eos
    return [_joined([(prompt, False), (completion, True)])]


def _checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(f"{where}: messages[{i}].{key} must be a string, got {type(m.get(key)).__name__}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn")
    if turns[0] == 0:
        raise DataError(f"{where}: the conversation starts with an assistant message; put a user turn first")
    return messages


def _chat_examples(messages: list[dict], tokenizer, where: str) -> list[Example]:
    """The chat as one example, or one per assistant turn where the template forbids that.

    Assistant turn i is found by rendering prefixes: P = the conversation before it plus the
    generation prompt (what the model is prompted with), Q = the conversation through it; the
    turn's text is Q[len(P):]. When the full render R starts with every Q, R is one example with
    those spans as targets. Some templates render a turn differently once more turns follow (Qwen3
    gives the last assistant turn an empty <think> block and strips it from earlier ones); the
    turn the model would generate is then not in R, so each turn becomes its own example, P
    then Q[len(P):], which is exactly what inference would show and produce.

    Each piece of text is tokenized on its own and the ids concatenated, so every target span
    starts on a token boundary, as a generated reply does after a separately encoded prompt.
    """
    if not tokenizer.has_chat_template:
        raise DataError(f"{where}: this model has no chat template to render 'messages'; "
                        "use {\"prompt\", \"completion\"} lines instead")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        turns = [(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True),
                  tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)) for i in assistant]
    except HyprjaxError as e:
        raise DataError(f"{where}: {e}") from None
    for i, (p, q) in zip(assistant, turns):
        if not q.startswith(p):
            raise DataError(f"{where}: the chat template renders the turns before messages[{i}] "
                            "differently once an assistant turn follows, so its reply cannot be found")

    def encode(text: str) -> list[int]:  # the template writes BOS itself
        return tokenizer.encode(text, add_special_tokens=False)

    cuts = [0, *(n for p, q in turns for n in (len(p), len(q))), len(full)]
    if all(full.startswith(q) for _, q in turns) and cuts == sorted(cuts):
        return [_joined([(encode(full[a:b]), k % 2 == 1) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))])]
    return [_joined([(encode(p), False), (encode(q[len(p):]), True)]) for p, q in turns]


def _joined(pieces: list[tuple[list[int], bool]]) -> Example:
    ids = [t for piece, _ in pieces for t in piece]
    targets = [flag for piece, flag in pieces for _ in piece]
    return Example(ids, [False] + targets[1:])


# ---------------------------------------------------------------------------------------- packing
@dataclass
class Packed:
    """Examples packed into N rows of S tokens, documents one after another, zero-padded at the end."""

    tokens: np.ndarray     # i32[N, S]  0 in padding
    positions: np.ndarray  # i32[N, S]  position within the document, from 0; -1 in padding
    segments: np.ndarray   # i32[N, S]  1, 2, ... per document within the row; 0 in padding
    labels: np.ndarray     # i32[N, S]  the document's next token (tokens[n, s + 1]); 0 where there is none
    weights: np.ndarray    # f32[N, S]  1.0 where labels[n, s] is a loss target, else 0.0

    def rows(self, index) -> dict[str, np.ndarray]:
        """The arrays' rows at `index`, by field name (a batch)."""
        return {name: getattr(self, name)[index] for name in _FIELDS}

    @property
    def num_rows(self) -> int:
        """N."""
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        """S."""
        return self.tokens.shape[1]

    @property
    def num_target_tokens(self) -> int:
        """Tokens the loss covers in one epoch."""
        return int(self.weights.sum())


def pack(examples: list[Example], seq_len: int, seed: int) -> Packed:
    """Shuffle the examples with `seed`, then pack them in that order into rows of `seq_len`.

    A row takes documents until the next one does not fit its rest (then a new row starts), which
    keeps the shuffled order. An example longer than `seq_len` is split into pieces of `seq_len`
    tokens, each its own document from position 0, never dropped: a long answer still trains,
    losing only the prediction of each piece's first token. Examples with fewer than two tokens
    or no target are dropped: they teach nothing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a row needs at least two tokens")
    rows: list[list[Example]] = []
    used = seq_len  # so the first document opens a row
    for i in np.random.default_rng(seed).permutation(len(examples)):
        ex = examples[i]
        if len(ex.ids) < 2 or not any(ex.targets[1:]):
            continue
        for start in range(0, len(ex.ids), seq_len):
            piece = Example(ex.ids[start:start + seq_len], ex.targets[start:start + seq_len])
            if used + len(piece.ids) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(piece)
            used += len(piece.ids)
    if not rows:
        raise DataError("no example has a token to train on (each needs two tokens and a target)")
    shape = (len(rows), seq_len)
    out = Packed(np.zeros(shape, np.int32), np.full(shape, -1, np.int32), np.zeros(shape, np.int32),
                 np.zeros(shape, np.int32), np.zeros(shape, np.float32))
    for n, docs in enumerate(rows):
        start = 0
        for segment, doc in enumerate(docs, 1):
            end = start + len(doc.ids)
            out.tokens[n, start:end] = doc.ids
            out.positions[n, start:end] = np.arange(len(doc.ids))
            out.segments[n, start:end] = segment
            # The last token of a document predicts nothing: its label stays 0 with weight 0.
            out.labels[n, start:end - 1] = doc.ids[1:]
            out.weights[n, start:end - 1] = doc.targets[1:]
            start = end
    return out


# ---------------------------------------------------------------------------------------- batches
def batch_at(packed: Packed, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The rows of optimizer step `step` (from 0): each `[batch_size, S]`, a pure function of the arguments.

    Epoch e visits the rows in the order `default_rng([seed, e]).permutation(N)`; the epochs'
    orders are concatenated and step s takes items [s * batch_size, (s + 1) * batch_size). Nothing
    depends on earlier steps, so resuming at step k reproduces the uninterrupted run's data exactly.
    """
    if step < 0 or batch_size < 1:
        raise ValueError(f"step={step}, batch_size={batch_size}: need step >= 0 and batch_size >= 1")
    n = packed.num_rows
    first, last = step * batch_size, (step + 1) * batch_size - 1
    stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n)
                             for e in range(first // n, last // n + 1)])
    offset = first - (first // n) * n
    rows = stream[offset:offset + batch_size]
    return packed.rows(rows)


def steps_per_epoch(packed: Packed, batch_size: int) -> int:
    """Steps that visit every row once (the last may run into the next epoch)."""
    return math.ceil(packed.num_rows / batch_size)
