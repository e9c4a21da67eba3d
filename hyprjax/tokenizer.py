"""The tokenizer: text <-> ids, chat templates and streaming decode, from a HF directory or GGUF metadata.

Backed by the `tokenizers` library (the engine under transformers' fast tokenizers), so ids match
transformers for the same files; `hyprjax.gguf_vocab` rebuilds the pipeline a GGUF file describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from .chat_template import render_chat_template
from .errors import HyprjaxError, ModelFileError
from .gguf_vocab import build_gguf_tokenizer, read_gguf_metadata

# Tokens that end a turn in the chat formats we serve; generation stops on any present in the vocab.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and stop tokens.

    Build it with `from_hf_dir` or `from_gguf_metadata`; the constructor takes the parts those find.
    `add_bos`/`add_eos` None means "as the backend's post-processor says" (a tokenizer.json's own).
    """

    def __init__(self, backend: Backend, *, source: str, bos_token_id: int | None, eos_token_id: int | None,
                 eos_token_ids: frozenset[int], special_tokens: dict[str, str], chat_template: str | None,
                 template_source: str, add_bos: bool | None = None, add_eos: bool | None = None,
                 vocab_size: int | None = None):
        self.backend = backend
        self.source = source
        self._bos = bos_token_id
        self._eos_ids = eos_token_ids
        self._eos = eos_token_id
        self._special_tokens = special_tokens
        self._chat_template = chat_template
        self._template_source = template_source
        self._add_bos, self._add_eos = add_bos, add_eos
        self._vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise ModelFileError(f"{tj}: missing (a Hugging Face model directory needs tokenizer.json)")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # the Rust side raises plain Exception; name the file instead
            raise ModelFileError(f"{tj}: the tokenizers library cannot read it ({e})") from None
        config = _read_json(root / "tokenizer_config.json")
        fallback = _read_json(root / "special_tokens_map.json")  # older repos keep the names here
        special = {}
        for name in _SPECIAL_NAMES:
            value = config.get(name, fallback.get(name))
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        # Stop tokens: the EOS, generation_config's list (config.json's if there is none), end-of-turn ones.
        gen = _read_json(root / "generation_config.json") or _read_json(root / "config.json")
        eos_id = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
        gen_eos = gen.get("eos_token_id")
        eos = {eos_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        template, tsource = _hf_chat_template(root, config)
        # transformers (v5) lets tokenizer.json's post-processor decide BOS/EOS and drops the config's
        # add_bos_token; only a tokenizer.json without one falls back to the config here.
        add_bos = add_eos = None
        if backend.post_processor is None:
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        return cls(backend, source=str(root), bos_token_id=bos, eos_token_id=eos_id,
                   eos_token_ids=_stop_ids(backend, eos), special_tokens=special, chat_template=template,
                   template_source=tsource, add_bos=add_bos, add_eos=add_eos)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF file's metadata (`read_gguf_metadata(path)`, or any key -> value dict)."""
        backend = build_gguf_tokenizer(meta)
        tokens = meta["tokenizer.ggml.tokens"]

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        special = {name: str(tokens[i]) for name, key in _GGUF_SPECIAL_IDS.items() if (i := token_id(key)) is not None}
        eos = {token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")}
        # Without the key: sentencepiece vocabularies get a BOS (llama.cpp and transformers agree),
        # byte-level ones none (transformers; GGUF converters write the key for those anyway).
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
        template, tsource = meta.get("tokenizer.chat_template"), "GGUF tokenizer.chat_template"
        if template is None:  # as llama.cpp does: recognise the chat format by its turn tokens
            template, tsource = _builtin_chat_template(backend)
        return cls(backend, source="GGUF metadata", bos_token_id=token_id("bos_token_id"),
                   eos_token_id=token_id("eos_token_id"), eos_token_ids=_stop_ids(backend, eos),
                   special_tokens=special, chat_template=str(template) if template is not None else None,
                   template_source=tsource, add_bos=add_bos,
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)), vocab_size=len(tokens))

    @classmethod
    def from_gguf_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a .gguf file's metadata (the tensor data is never read)."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    # ------------------------------------------------------------------ properties
    @property
    def bos_token_id(self) -> int | None:
        """The model's BOS id (whether `encode` adds it is a separate setting), or None."""
        return self._bos

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus the end-of-turn tokens."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included)."""
        return self._vocab_size

    @property
    def has_chat_template(self) -> bool:
        """Whether `apply_chat_template` can be called."""
        return self._chat_template is not None

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, BOS/EOS where the model wants them."""
        if self._add_bos is None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos and self._bos is not None:
                ids = [self._bos, *ids]
            if self._add_eos and self._eos is not None:
                ids = [*ids, self._eos]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; special (control) tokens are dropped unless `skip_special_tokens=False`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder fed one id at a time that returns only completed text."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, tools: list[dict] | None = None,
                            **extra: Any) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(tokenize=False)` renders it.

        `enable_thinking=None` leaves the variable undefined, so the template's own default applies.
        Encode the result with `add_special_tokens=False`: the template writes BOS itself.
        """
        if self._chat_template is None:
            raise HyprjaxError(f"{self._template_source}: this model has no chat template; "
                               "pass a raw prompt instead")
        variables = {**self._special_tokens, **extra}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        return render_chat_template(self._chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, source=self._template_source, **variables)


class StreamDecoder:
    """Incremental decode: `push(id)` returns the text that id completed, `flush()` the rest.

    Each push decodes a short window of ids and returns what grew past the text already
    returned, minus a trailing run of U+FFFD: that is a UTF-8 character (byte-level bytes,
    byte-fallback `<0xNN>` tokens) whose remaining bytes are still to come. The window restarts
    at character boundaries, with the previous chunk kept as context, so decoder steps that look
    at neighbours (a stripped leading space) come out exactly as in `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids from a character boundary on
        self._emitted = 0  # characters of decode(window) already returned
        self._boundary = 0  # window index where the last complete decode ended

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(force=False)

    def flush(self) -> str:
        """End of stream: return whatever is held back, complete or not."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        text = self._tok.decode(self._ids, self._skip)
        stable = text if force else text.rstrip("\ufffd")
        out = stable[self._emitted:]
        self._emitted = max(self._emitted, len(stable))
        if stable == text:
            self._rebase()
        return out

    def _rebase(self) -> None:
        # The window's text is complete and returned. Restart it at the previous boundary; a token
        # that decodes to nothing (a skipped special) cannot lead a window, as a decoder that strips
        # the first leading space would then strip the following token's.
        k = self._boundary
        if 0 < k < len(self._ids) and self._tok.decode(self._ids[k:k + 1], self._skip):
            self._ids = self._ids[k:]
            self._emitted = len(self._tok.decode(self._ids, self._skip))
        self._boundary = len(self._ids)


def _stop_ids(backend: Backend, ids: set) -> frozenset[int]:
    found = {backend.token_to_id(t) for t in _END_OF_TURN}
    return frozenset(int(i) for i in ids | found if i is not None)


_BUILTIN_TEMPLATES = (("gemma.jinja", ("<start_of_turn>", "<end_of_turn>")),
                      ("chatml.jinja", ("<|im_start|>", "<|im_end|>")))


def _builtin_chat_template(backend: Backend) -> tuple[str | None, str]:
    """A chat template for a GGUF that ships none, chosen by the turn tokens in its vocabulary.

    Gemma 3's base GGUFs (the default model's included) carry no `tokenizer.chat_template`, yet
    the vocabulary has Gemma's turn tokens and llama.cpp applies its built-in Gemma format.
    """
    for name, tokens in _BUILTIN_TEMPLATES:
        if all(backend.token_to_id(t) is not None for t in tokens):
            text = (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")
            return text, f"built-in {name} (the file has no chat template)"
    return None, "GGUF metadata (no tokenizer.chat_template, no known turn tokens)"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_chat_template(root: Path, config: dict) -> tuple[str | None, str]:
    """The template text and where it came from; transformers v5 prefers chat_template.jinja."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    source = str(root / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the "default" one serves chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None, f"{source} (no chat_template there and no chat_template.jinja)"
    return str(template), source
