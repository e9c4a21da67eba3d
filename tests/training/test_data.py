"""Training data: chat/prompt/text lines -> targets, packing into rows, and the step -> batch order."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.make_model import build_tokenizer
from hyprjax.chat_template import render_chat_template
from hyprjax.training.data import DataError, Example, batch_at, pack, read_examples, steps_per_epoch
from hyprjax.tokenizer import Tokenizer

ROOT = Path(__file__).parents[2]
QWEN3 = (ROOT / "tests" / "data" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
CHATML = (ROOT / "hyprjax" / "templates" / "chatml.jinja").read_text(encoding="utf-8")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please"},
        {"role": "assistant", "content": "Green, then red."}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The same byte-level BPE vocabulary (ChatML specials, <|im_end|> = EOS) with three templates."""
    backend = build_tokenizer(512)
    out = {}
    for name, template in {"chatml": CHATML, "qwen3": QWEN3, "none": None}.items():
        d = tmp_path_factory.mktemp(name)
        backend.save(str(d / "tokenizer.json"))
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        if template is not None:
            config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = Tokenizer.from_hf_dir(d)
    return out


def _read(tmp_path, tokenizer, *objs):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return read_examples(path, tokenizer)


def _target_runs(tok, ex: Example) -> list[str]:
    """The text of each maximal run of target tokens."""
    runs, run = [], []
    for t, flag in zip(ex.ids + [None], ex.targets + [False]):
        if flag:
            run.append(t)
        elif run:
            runs, run = runs + [tok.decode(run, skip_special_tokens=False)], []
    return runs


# ---------------------------------------------------------------------------------------- reading
def test_chat_targets_are_the_assistant_turns_with_their_end_marker(tmp_path, tokenizers):
    tok = tokenizers["chatml"]
    [ex] = _read(tmp_path, tok, {"messages": CHAT})
    assert _target_runs(tok, ex) == ["Blue.<|im_end|>\n", "Green, then red.<|im_end|>\n"]
    # Piecewise tokenization agrees with encoding the whole render here (turns split at "\n").
    rendered = render_chat_template(CHATML, CHAT, add_generation_prompt=False)
    assert ex.ids == tok.encode(rendered, add_special_tokens=False)
    context = tok.decode([t for t, f in zip(ex.ids, ex.targets) if not f], skip_special_tokens=False)
    assert "You are terse." in context and "Another one, please" in context
    assert not ex.targets[0]


def test_qwen3_single_turn_trains_on_its_empty_think_block_too(tmp_path, tokenizers):
    tok = tokenizers["qwen3"]
    [ex] = _read(tmp_path, tok, {"messages": CHAT[:3]})
    assert _target_runs(tok, ex) == ["<think>\n\n</think>\n\nBlue.<|im_end|>\n"]
    assert ex.ids == tok.encode(render_chat_template(QWEN3, CHAT[:3], add_generation_prompt=False),
                                add_special_tokens=False)


def test_qwen3_multi_turn_becomes_one_example_per_assistant_turn(tmp_path, tokenizers):
    """Qwen3 drops the <think> block from earlier turns, so the full render does not hold the
    reply the model would generate for them: each turn is trained in its own inference context."""
    tok = tokenizers["qwen3"]
    first, second = _read(tmp_path, tok, {"messages": CHAT})
    for ex, upto, reply in ((first, 3, "Blue."), (second, 5, "Green, then red.")):
        assert _target_runs(tok, ex) == [f"<think>\n\n</think>\n\n{reply}<|im_end|>\n"]
        assert ex.ids == tok.encode(render_chat_template(QWEN3, CHAT[:upto], add_generation_prompt=False),
                                    add_special_tokens=False)


def test_prompt_completion_and_text(tmp_path, tokenizers):
    tok = tokenizers["none"]
    eos = tok.backend.token_to_id("<|endoftext|>")  # the smallest stop id
    assert eos == min(tok.eos_token_ids)
    pc, text = _read(tmp_path, tok, {"prompt": "2+2=", "completion": " 4"}, {"text": "Hello world"})
    prompt, completion = tok.encode("2+2="), tok.encode(" 4", add_special_tokens=False)
    assert pc.ids == prompt + completion + [eos]
    assert pc.targets == [False] * len(prompt) + [True] * (len(completion) + 1)
    assert text.ids == tok.encode("Hello world") + [eos]
    assert text.targets == [False] + [True] * (len(text.ids) - 1)


BAD_LINES = {
    "not valid JSON": '{"text": "a"',
    "expected a JSON object, got list": '["text"]',
    "found none": '{"id": 3}',
    "found ['prompt/completion', 'text']": '{"text": "a", "prompt": "b", "completion": "c"}',
    "'completion' is missing": '{"prompt": "a"}',
    "'prompt' must be a string, got int": '{"prompt": 1, "completion": "c"}',
    "'text' must be a string, got NoneType": '{"text": null}',
    "'text' is empty": '{"text": ""}',
    "'completion' is empty": '{"prompt": "a", "completion": ""}',
    "non-empty list": '{"messages": []}',
    "messages[1] must be an object, got str": '{"messages": [{"role": "user", "content": "a"}, "hi"]}',
    "messages[0].role must be a string, got int": '{"messages": [{"role": 1, "content": "a"}]}',
    "messages[1].content must be a string, got list":
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [1]}]}',
    "no assistant message": '{"messages": [{"role": "user", "content": "a"}]}',
    "starts with an assistant message": '{"messages": [{"role": "assistant", "content": "a"}]}',
    # Qwen3's template raises when no user turn exists: the template error names the line too.
    "No user query found": '{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}',
}


@pytest.mark.parametrize("message", BAD_LINES)
def test_a_bad_line_names_the_file_and_line(tmp_path, tokenizers, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + BAD_LINES[message] + "\n" + '{"text": "fine"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: .*{re.escape(message)}"):
        read_examples(path, tokenizers["qwen3"])


def test_file_errors(tmp_path, tokenizers):
    with pytest.raises(DataError, match=f"^{tmp_path / 'nope.jsonl'}: cannot read"):
        read_examples(tmp_path / "nope.jsonl", tokenizers["chatml"])
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty.jsonl'}: no examples"):
        read_examples(tmp_path / "empty.jsonl", tokenizers["chatml"])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"^{tmp_path / 'latin1.jsonl'}:2: not UTF-8"):
        read_examples(tmp_path / "latin1.jsonl", tokenizers["chatml"])
    with pytest.raises(DataError, match=r":1: this model has no chat template"):
        _read(tmp_path, tokenizers["none"], {"messages": CHAT})


# ---------------------------------------------------------------------------------------- packing
def _examples(lengths, start=1000):
    """Documents of distinct token ids (so each token can be traced), targets on the odd ones."""
    out = []
    for n in lengths:
        ids = list(range(start, start + n))
        out.append(Example(ids, [False] + [i % 2 == 1 for i in range(1, n)]))
        start += n
    return out


def test_pack_places_every_token_once_with_per_document_positions_labels_and_weights():
    examples = _examples([5, 3, 7, 2, 8, 4, 6, 1]) + [Example([1, 2, 3], [False] * 3)]
    p = pack(examples, seq_len=8, seed=0)
    kept = [ex for ex in examples[:-1] if len(ex.ids) >= 2]  # a 1-token and a no-target example are dropped
    real = p.segments > 0
    assert sorted(p.tokens[real]) == sorted(t for ex in kept for t in ex.ids)
    assert (p.tokens[~real] == 0).all() and (p.positions[~real] == -1).all() and (p.weights[~real] == 0).all()
    by_first = {ex.ids[0]: ex for ex in kept}
    docs = 0
    for n in range(p.num_rows):
        for seg in range(1, p.segments[n].max() + 1):
            cols = np.flatnonzero(p.segments[n] == seg)
            assert (np.diff(cols) == 1).all()  # a document is contiguous
            ex = by_first[int(p.tokens[n, cols[0]])]
            assert p.tokens[n, cols].tolist() == ex.ids
            assert p.positions[n, cols].tolist() == list(range(len(ex.ids)))
            assert p.labels[n, cols].tolist() == ex.ids[1:] + [0]  # the last token predicts nothing
            assert p.weights[n, cols].tolist() == [float(f) for f in ex.targets[1:]] + [0.0]
            docs += 1
    assert docs == len(kept)
    assert p.num_target_tokens == sum(sum(ex.targets) for ex in kept)


def test_pack_fills_rows_in_shuffled_order_and_splits_long_examples():
    [long] = _examples([19])
    p = pack([long], seq_len=8, seed=0)
    assert p.tokens.shape == (3, 8)
    assert p.positions.tolist() == [list(range(8)), list(range(8)), list(range(3)) + [-1] * 5]
    assert p.tokens[p.segments > 0].tolist() == long.ids
    assert p.labels[0, 7] == 0 and p.weights[0, 7] == 0  # pieces are separate documents
    # Greedy: with seq_len 8, lengths 5, 3, 4, 4 in this order fill exactly two rows.
    examples = _examples([5, 3, 4, 4])
    order = np.random.default_rng(1).permutation(4)
    lengths = [len(examples[i].ids) for i in order]
    p = pack(examples, seq_len=8, seed=1)
    rows, used = 0, 8
    for n in lengths:
        rows, used = (rows + 1, n) if used + n > 8 else (rows, used + n)
    assert p.num_rows == rows
    assert p.tokens[p.segments > 0].tolist() == [t for i in order for t in examples[i].ids]


def test_pack_is_deterministic_per_seed():
    examples = _examples(range(2, 30))
    a, b, c = pack(examples, 16, seed=3), pack(examples, 16, seed=3), pack(examples, 16, seed=4)
    assert all((getattr(a, f) == getattr(b, f)).all() for f in ("tokens", "positions", "segments", "labels", "weights"))
    assert a.tokens.shape != c.tokens.shape or (a.tokens != c.tokens).any()
    with pytest.raises(DataError, match="no example"):
        pack(_examples([1, 1]), 16, seed=0)


# ---------------------------------------------------------------------------------------- batches
def _packed(rows: int):
    examples = [Example([1000 + r, 7], [False, True]) for r in range(rows)]
    return pack(examples, seq_len=2, seed=0)  # one document per row, row identified by its first token


def test_one_epoch_visits_every_row_once_and_the_order_is_reproducible():
    p = _packed(12)
    assert steps_per_epoch(p, 4) == 3 and steps_per_epoch(p, 5) == 3
    seen = np.concatenate([batch_at(p, s, 4, seed=9)["tokens"][:, 0] for s in range(3)])
    assert sorted(seen) == sorted(p.tokens[:, 0])
    again = np.concatenate([batch_at(p, s, 4, seed=9)["tokens"][:, 0] for s in range(3)])
    other = np.concatenate([batch_at(p, s, 4, seed=10)["tokens"][:, 0] for s in range(3)])
    assert (seen == again).all() and (seen != other).any()
    batch = batch_at(p, 0, 4, seed=9)
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 2) for k in
                                                      ("tokens", "positions", "segments", "labels", "weights")}


@pytest.mark.parametrize("rows,batch_size", [(12, 5), (3, 8)])
def test_resuming_at_step_k_gives_the_sequential_runs_batch(rows, batch_size):
    """The stream is the concatenation of per-epoch permutations, even when a batch spans epochs."""
    p = _packed(rows)
    stream = np.concatenate([np.random.default_rng([9, e]).permutation(rows) for e in range(30)])
    sequential = [batch_at(p, s, batch_size, seed=9) for s in range(10)]
    for k in (0, 3, 7, 9):
        fresh = batch_at(p, k, batch_size, seed=9)
        assert all((fresh[f] == sequential[k][f]).all() for f in fresh)
        assert (fresh["tokens"] == p.tokens[stream[k * batch_size:(k + 1) * batch_size]]).all()
