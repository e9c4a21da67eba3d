"""Tokenizers rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, and a fast metadata reader.

A GGUF carries no tokenizer.json, only llama.cpp's description of the vocabulary. We rebuild the
`tokenizers` pipeline that transformers builds from the same keys (its `integrations.gguf`), so a
prompt encodes to the same ids whichever loader a user picks:

- `gpt2`: byte-level BPE with the file's merges, split by the regex `tokenizer.ggml.pre` names.
- `llama`: SentencePiece-style BPE with byte fallback; the merges are derived from token scores
  (the file stores none), "▁" stands for a space, and a leading one is added when
  `tokenizer.ggml.add_space_prefix` says so.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from .errors import HyprjaxError, ModelFileError

# llama.cpp token types (gguf.TokenType); UNUSED (5) tokens stay plain vocabulary entries.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A GGUF file's key/value metadata as python values (reads only the header)."""
    from .formats.gguf_read import GGUFFile

    return GGUFFile(path).metadata


# Pre-tokenizer regexes by `tokenizer.ggml.pre`, the ones llama.cpp's converter writes for the
# HF tokenizers it recognises. Qwen2's digits are split one by one; Llama 3's in runs of three.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
           "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT}
_GPT2_PRE = ("default", "gpt-2", "gpt2")
# SmolLM (llama.cpp's SMOLLM pre-type): every digit its own pre-token, then GPT-2's regex.
_DIGITS_THEN_GPT2 = ("smollm",)
# Llama 3's tokenizer.json and llama.cpp both take a pre-token whole when it is in the vocabulary.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"}
# Gemma files: whitespace-run tokens stored as real spaces, and merges ranked by vocabulary order.
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3n"}


def build_gguf_tokenizer(meta: dict[str, Any]) -> Backend:
    """The `tokenizers.Tokenizer` that GGUF metadata describes (no BOS/EOS post-processing)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelFileError("GGUF metadata has no tokenizer.ggml.model key, so it holds no tokenizer")
    tokens = _list(meta, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFileError("GGUF metadata has no tokenizer.ggml.tokens key")
    tokens = [str(t) for t in tokens]
    types = [int(t) for t in _list(meta, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)]
    if len(types) != len(tokens):
        raise ModelFileError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries, "
                             f"tokenizer.ggml.tokens {len(tokens)}")
    if kind == "gpt2":
        backend, in_vocab = _byte_level(meta, tokens, types)
    elif kind == "llama":
        backend, in_vocab = _sentencepiece(meta, tokens, types)
    else:
        raise HyprjaxError(f"GGUF tokenizer.ggml.model = {kind!r} is not supported (supported: 'gpt2', 'llama')")
    _add_whole_tokens(backend, tokens, types, in_vocab)
    return backend


def _byte_level(meta, tokens, types) -> tuple[Backend, list[bool]]:
    """Byte-level BPE, as transformers' GGUF converter builds it (`GPT2Tokenizer` + split regex)."""
    spell = _bytes_to_unicode()
    byte_chars = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        # A NORMAL token outside the byte alphabet is a raw-text spelling; BPE needs byte chars.
        if ty not in (CONTROL, USER_DEFINED, UNKNOWN) and not set(tok) <= byte_chars:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab[tok] = i  # a repeated token keeps its last id, as in llama.cpp and transformers
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS and pre not in _GPT2_PRE and pre not in _DIGITS_THEN_GPT2:
        raise HyprjaxError(f"GGUF tokenizer.ggml.pre = {pre!r} is not supported "
                           f"(supported: {sorted(_SPLITS) + list(_GPT2_PRE) + list(_DIGITS_THEN_GPT2)})")
    backend = Backend(_bpe(vocab, _merges(meta) or [], fuse_unk=False, byte_fallback=False,
                           ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _SPLITS.get(pre) is _QWEN2_SPLIT:
        # Qwen's own tokenizer NFC-normalizes; keeping it makes GGUF and HF loads agree on any input.
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend, [vocab.get(t) == i for i, t in enumerate(tokens)]


def _sentencepiece(meta, tokens, types) -> tuple[Backend, list[bool]]:
    """SentencePiece-style BPE with byte fallback (`LlamaTokenizer`/`GemmaTokenizer` in transformers)."""
    gemma = meta.get("general.architecture", "") in _GEMMA_ARCHS
    original = tokens
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta)  # files usually have none: derive them from the ranking of the pieces
    if not merges and gemma:  # Gemma's scores do not follow its merge order; its vocabulary order does
        merges = spm_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    elif not merges:
        scores = _list(meta, "tokenizer.ggml.scores")
        if scores is None:
            raise ModelFileError("GGUF llama tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
        merges = spm_merges(vocab, dict(zip(tokens, (float(s) for s in scores))))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(_bpe(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp's default; Gemma files set it false, and we treat a Gemma file without the key alike.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    # "first": only text at the very start gets the "▁", as transformers' non-legacy Llama does.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # A respelled whitespace token is left to the merges, as transformers does, not matched whole.
    return backend, [vocab.get(t) == i and t == original[i] for i, t in enumerate(tokens)]


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the whole piece's score (best first), then longer left part, then longer right part.

    Same order as transformers' `generate_merges`, so the two BPE models agree token for token.
    """
    ranked = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((score, len(a), len(b), a, b) for a, b in local)
    ranked.sort(key=lambda e: (e[0], e[1], e[2]), reverse=True)  # stable, as the reference's sort
    return [(a, b) for _, _, _, a, b in ranked]


def _merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    merges = _list(meta, "tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ModelFileError("GGUF tokenizer.ggml.merges holds an entry without a space between its two parts")
    return pairs


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> BPE:
    try:
        return BPE(vocab=vocab, merges=merges, **options)
    except Exception as e:  # tokenizers raises plain Exception for a merge naming an unknown token
        raise ModelFileError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None


def _list(meta: dict[str, Any], key: str) -> list | None:
    # Callers may hand in numpy arrays (GGUFReader) as well as lists; `x or []` fails on arrays.
    value = meta.get(key)
    return None if value is None else list(value)


def _add_whole_tokens(backend: Backend, tokens, types, in_vocab) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones (`<think>`)
    non-special added tokens: both are then matched whole in text, never cut into pieces, and
    only the special ones are dropped by `decode(skip_special_tokens=True)`, as in HF."""
    special, plain = [], []
    for tok, ty, ok in zip(tokens, types, in_vocab):
        # An added token must already be in the vocabulary, or tokenizers would give it a new id.
        if not ok or not tok:
            continue
        if ty in (CONTROL, UNKNOWN):
            special.append(AddedToken(tok, special=True, normalized=False))
        elif ty == USER_DEFINED:
            plain.append(AddedToken(tok, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
