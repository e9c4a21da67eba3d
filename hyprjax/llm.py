"""`hyprjax.LLM`: load a model once, then generate or chat from Python."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import jax

from .errors import HyprjaxError
from .formats.load import load_model
from .generate import Completion, Generator
from .sampling import SamplingParams

log = logging.getLogger("hyprjax")


def resolve_dtype(dtype: str) -> str:
    """`auto` -> float32 on CPU (XLA:CPU streams only f32 weights at full speed), bfloat16 elsewhere."""
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        log.info("dtype auto -> %s on %s", dtype, jax.default_backend())
    if dtype not in ("float32", "bfloat16", "float16"):
        raise HyprjaxError(f"dtype {dtype!r} is not supported (auto, float32, bfloat16, float16)")
    return dtype


class LLM:
    """A loaded model with its tokenizer and a compiled generator.

    >>> llm = LLM("path/to/model", dtype="float32")
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0.0))
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str = "auto", max_model_len: int | None = None,
                 decode_chunk: int = 16, max_batch: int = 32, progress: bool = True, max_loras: int = 8,
                 max_lora_rank: int = 16):
        loaded = load_model(model, dtype=resolve_dtype(dtype), progress=progress)
        self.cfg, self.tokenizer, self.path, self.format = loaded.cfg, loaded.tokenizer, loaded.path, loaded.format
        self.model = loaded.model
        self.generator = Generator(loaded.model, loaded.cfg, loaded.tokenizer, max_model_len=max_model_len,
                                   decode_chunk=decode_chunk, max_batch=max_batch)
        self._engine = None
        self._lora_limits = (max_loras, max_lora_rank)

    @property
    def max_model_len(self) -> int:
        return self.generator.max_model_len

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise HyprjaxError(f"token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        return ids

    def engine(self, config=None, *, lora: bool = False):
        """The paged continuous-batching engine over this model's weights (built once, no copy).

        Offline use compiles buckets as they are first met rather than all at start-up. The LoRA
        slot table (`max_loras` x `max_lora_rank`) is allocated only once an adapter is loaded:
        `lora=True` rebuilds an engine made without one (it holds no state between calls).
        """
        if self._engine is None or (lora and self._engine.lora is None and config is None):
            from .engine.config import EngineConfig
            from .engine.llm_engine import LLMEngine

            max_loras, max_rank = self._lora_limits if lora else (0, 16)
            config = config or EngineConfig(max_model_len=self.max_model_len, max_loras=max_loras,
                                            max_lora_rank=max_rank)
            self._engine = LLMEngine(self.model, self.cfg, self.tokenizer, config, warmup=False)
        return self._engine

    def load_lora(self, name: str, path: str | os.PathLike) -> None:
        """Load a PEFT directory or llama.cpp LoRA GGUF under `name` for `generate(..., lora=...)`."""
        from .adapters.load import read_adapter

        eng = self.engine(lora=True)
        eng.add_adapter(read_adapter(path, name, self.cfg, eng.ecfg.max_lora_rank))

    def unload_lora(self, name: str) -> None:
        self.engine(lora=True).remove_adapter(name)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_text: Callable[[int, str], None] | None = None, use_engine: bool = False,
                 lora=None) -> list[Completion]:
        """Complete each prompt (text or token ids). `params` is one for all or one per prompt.

        `use_engine=True` runs them through the paged engine instead of the contiguous-cache
        generator: many prompts of mixed lengths then flow through continuous batching.
        `lora` (one for all, or a list with one per prompt) picks adapters loaded with
        `load_lora`: None (base model), a name, a {name: weight} mix, or a LoraRequest (for
        merge strategies); prompts with different adapters run in one batch on the engine.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        params = _per_prompt(params, len(ids))
        loras = _per_prompt_lora(lora, len(ids))
        if use_engine or any(r is not None for r in loras):
            out = self._generate_on_engine(ids, params, on_text, loras)
        else:
            out = self.generator.generate(ids, params, on_text=on_text)
        for c, p in zip(out, prompts):
            c.prompt = p if isinstance(p, str) else None
        return out

    def _generate_on_engine(self, ids, params, on_text, loras) -> list[Completion]:
        eng = self.engine(lora=any(r is not None for r in loras))
        for p in ids:
            self.generator.check_prompt(len(p))
        # As the generator does: generation stops at the context's end rather than refusing.
        params = [sp if len(p) + sp.max_tokens <= eng.max_model_len else
                  dataclasses.replace(sp, max_tokens=eng.max_model_len - len(p)) for p, sp in zip(ids, params)]
        rids = []
        try:
            for p, sp, lr in zip(ids, params, loras):
                rids.append(eng.add_request(p, sp, lora=lr))
            return self._run_engine(eng, ids, params, rids, on_text)
        finally:  # an error half-way must not leave requests queued for the next call
            for rid in rids:
                eng.abort(rid)

    def _run_engine(self, eng, ids, params, rids, on_text) -> list[Completion]:
        index = {rid: i for i, rid in enumerate(rids)}
        tokens = {rid: [] for rid in rids}
        texts = {rid: [] for rid in rids}
        reasons = {}
        while eng.has_unfinished():
            for o in eng.step():
                tokens[o.request_id] += o.new_token_ids
                texts[o.request_id].append(o.new_text)
                if on_text is not None and o.new_text:
                    on_text(index[o.request_id], o.new_text)
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
        eos = set(self.tokenizer.eos_token_ids if self.tokenizer else self.cfg.eos_token_ids)
        out = []
        for p, sp, r in zip(ids, params, rids):
            toks = tokens[r]
            if reasons[r] == "stop" and toks and toks[-1] in eos | set(sp.stop_token_ids):
                toks = toks[:-1]  # as the generator reports it: the end token is not part of the output
            out.append(Completion(p, toks, "".join(texts[r]), reasons[r]))
        return out

    def render_chat(self, messages: list[dict], *, enable_thinking: bool | None = None, **template_kw) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking, **template_kw)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, *,
             enable_thinking: bool | None = None, on_text: Callable[[int, str], None] | None = None,
             **template_kw) -> Completion | list[Completion]:
        """Reply to one conversation (a list of {"role", "content"}) or to several at once."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        texts = [self.render_chat(c, enable_thinking=enable_thinking, **template_kw) for c in convs]
        # The template already holds BOS where the model wants it.
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        out = self.generator.generate(ids, _per_prompt(params, len(ids)), on_text=on_text)
        for c, t in zip(out, texts):
            c.prompt = t
        return out[0] if single else out


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise HyprjaxError(f"got {len(params)} SamplingParams for {n} prompts")
    return params


def _lora_request(spec):
    from .adapters.registry import LoraRequest

    if spec is None or isinstance(spec, LoraRequest):
        return spec
    if isinstance(spec, str):
        return LoraRequest.make([spec])
    if isinstance(spec, dict):
        return LoraRequest.make(list(spec), spec)
    raise HyprjaxError(f"lora={spec!r}: give an adapter name, a {{name: weight}} dict or a LoraRequest")


def _per_prompt_lora(lora, n: int) -> list:
    """One LoraRequest (or None) per prompt from one spec for all or a list of n specs."""
    if isinstance(lora, (list, tuple)):
        if len(lora) != n:
            raise HyprjaxError(f"lora has {len(lora)} entries for {n} prompts: give one, or one per prompt")
        return [_lora_request(s) for s in lora]
    return [_lora_request(lora)] * n
