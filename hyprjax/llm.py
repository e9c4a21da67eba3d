"""`hyprjax.LLM`: load a model once, then generate or chat from Python."""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import jax

from .engine.config import EngineConfig
from .errors import HyprjaxError
from .formats.load import load_model
from .generate import Completion, Generator
from .sampling import SamplingParams
from .sharding import shard_model, tensor_parallel_mesh

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
    """A loaded model with its tokenizer, generating through the paged engine.

    >>> llm = LLM("path/to/model", dtype="float32")
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0.0))

    `tensor_parallel=N` splits the weights, KV pool and adapter slot tables over N devices
    (hyprjax/sharding.py has the rules); 1, the default, runs on one device with no mesh.
    `enable_prefix_caching=False` recomputes every prompt (benchmarks of prefill need it: a
    repeated prompt is otherwise served from the pages its first run left).
    `quantization` is how the linear layers and the embedding sit on the device (hyprjax/quant.py):
    "none" (floats), "int8", "int4" (quantized at load), "keep" (a GGUF's own blocks, exact),
    "keep8" (keep with 4-bit codes widened to int8); "auto" (the default) keeps a quantized GGUF
    quantized (int8 on CPU, the fastest there; keep on GPU/TPU) and floats as they are.
    `lora_quantization` "int8" or "int4" keeps adapters loaded with `load_lora` quantized on the
    host (a quarter or about an eighth of their float32 bytes; hyprjax/adapters/quantized.py),
    dequantized into their device slot; "none" (the default) keeps them as floats.
    `adapter_dtype` is the device slot tables' dtype: "auto" (the model's compute dtype),
    "float32" or "bfloat16" (half the bytes per adapter a decode step reads; docs/lora.md).
    `kv_cache_dtype` is the KV cache's: "float32", "bfloat16" (half the memory per cached token,
    and on CPU a faster decode at long contexts; docs/cpu.md), or "auto" (the default): bfloat16
    when the weights are quantized or computed in bfloat16, float32 for a float32 model.
    `speculative="ngram"` turns on speculative decoding with prompt-lookup drafts
    (`num_speculative_tokens` per step, n-grams of `ngram_min`..`ngram_max` tokens;
    hyprjax/engine/speculative.py), `speculative="draft:PATH"` with a smaller draft model that
    shares this model's tokenizer (engine/spec_draft.py): the same tokens for greedy and seeded
    requests, sooner.
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str = "auto", max_model_len: int | None = None,
                 max_batch: int = 32, progress: bool = True, max_loras: int = 8,
                 max_lora_rank: int = 16, compile_cache: str | bool | None = None, tensor_parallel: int = 1,
                 enable_prefix_caching: bool = True, quantization: str = "auto", lora_quantization: str = "none",
                 max_sparse_rank: int = 0, max_block_rank: int = 0, speculative: str | None = None,
                 num_speculative_tokens: int = 7, ngram_min: int = 2, ngram_max: int = 4,
                 adapter_dtype: str = "auto", kv_cache_dtype: str = "auto"):
        from .adapters.quantized import check_lora_quantization
        from .compile_cache import enable_compile_cache  # before anything compiles: a DIR, False (off), None

        mesh = tensor_parallel_mesh(tensor_parallel)  # a bad value fails before the load
        check_lora_quantization(lora_quantization)
        spec = dict(speculative=speculative, num_speculative_tokens=num_speculative_tokens, ngram_min=ngram_min,
                    ngram_max=ngram_max)
        EngineConfig(**spec, adapter_dtype=adapter_dtype, kv_cache_dtype=kv_cache_dtype)  # bad settings fail here
        enable_compile_cache(compile_cache)
        loaded = load_model(model, dtype=resolve_dtype(dtype), progress=progress, quantization=quantization)
        self.cfg, self.tokenizer, self.path, self.format = loaded.cfg, loaded.tokenizer, loaded.path, loaded.format
        self.model, self.mesh = loaded.model, mesh
        if mesh is not None:
            shard_model(loaded.model, loaded.cfg, mesh)
        self.generator = Generator(loaded.model, loaded.cfg, loaded.tokenizer, max_model_len=max_model_len,
                                   max_batch=max_batch, mesh=mesh, enable_prefix_caching=enable_prefix_caching,
                                   speculation=spec, adapter_dtype=adapter_dtype, kv_cache_dtype=kv_cache_dtype)
        self._lora_limits = (max_loras, max_lora_rank, lora_quantization)
        self._sparse_limits = dict(max_sparse_rank=max_sparse_rank, max_block_rank=max_block_rank)

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

    def engine(self, *, lora: bool = False):
        """The paged continuous-batching engine over this model's weights (built once, no copy).

        Offline use compiles buckets as they are first met rather than all at start-up. The LoRA
        slot table (`max_loras` x `max_lora_rank`) is allocated only once an adapter is loaded:
        `lora=True` rebuilds an engine made without one (it holds no state between calls).
        """
        if lora:
            self.generator.enable_lora(*self._lora_limits, **self._sparse_limits)
        return self.generator.engine

    def load_lora(self, name: str, path: str | os.PathLike) -> None:
        """Load an adapter under `name` for `generate(..., lora=...)`: a PEFT LoRA or SHiRA directory,
        a llama.cpp LoRA GGUF, or a .vdb of any kind. Sparse slot tables grow to fit it while no
        adapter is loaded (`max_sparse_rank` / `max_block_rank` are floors)."""
        from .adapters.load import read_adapter
        from .adapters.registry import sparse_capacity

        adapter = read_adapter(path, name, self.cfg, self._lora_limits[1])
        need = sparse_capacity([adapter], self.cfg)
        self.generator.enable_lora(*self._lora_limits, **{k: max(v, n) for (k, v), n in
                                                           zip(self._sparse_limits.items(), need)})
        self.generator.engine.add_adapter(adapter)

    def unload_lora(self, name: str) -> None:
        self.engine(lora=True).remove_adapter(name)

    def merge_lora(self, name: str) -> None:
        """Merged mode: add the loaded adapter `name` into the weights, so prompts using it alone run
        at the base model's speed; other prompts (the base model's too) take it back out per token.
        `unmerge_lora()` restores the weights bit for bit (hyprjax/adapters/merged.py)."""
        self.engine(lora=True).merge_adapter(name)

    def unmerge_lora(self) -> str | None:
        """Leave merged mode; returns the adapter that was merged (None if none was)."""
        return self.engine(lora=True).unmerge_adapter()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_text: Callable[[int, str], None] | None = None, lora=None) -> list[Completion]:
        """Complete each prompt (text or token ids). `params` is one for all or one per prompt.

        The prompts run together through the paged engine (continuous batching). `lora` (one
        for all, or a list with one per prompt) picks adapters loaded with `load_lora`: None
        (base model), a name, a {name: weight} mix, or a LoraRequest (for merge strategies);
        prompts with different adapters share the batch.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        params = _per_prompt(params, len(ids))
        loras = _per_prompt_lora(lora, len(ids))
        if any(r is not None for r in loras):
            self.engine(lora=True)
        out = self.generator.generate(ids, params, on_text=on_text, loras=loras)
        for c, p in zip(out, prompts):
            c.prompt = p if isinstance(p, str) else None
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
