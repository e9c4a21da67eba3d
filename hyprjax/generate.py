"""Offline generation: a batch of prompts in, completions out, through the paged engine.

There is one generation path. `LLM.generate`, `LLM.chat`, `hyprjax generate` and `hyprjax chat`
queue their prompts on an `LLMEngine` and step it until every request ends, so offline runs get
the server's continuous batching, prefix caching, adapters and sampling with no second
implementation. The engine compiles its step buckets as they are first met (no start-up warm-up
offline); the persistent compilation cache makes later runs skip even those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig
from .errors import HyprjaxError, PromptTooLongError
from .sampling import SamplingParams


@dataclass
class Completion:
    """One finished sequence."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, end-of-turn, stop string or token) | "length"
    prompt: str | None = None


class Generator:
    """Runs prompts to completion on an engine built over `model` (weights shared, not copied).

    `max_batch` sequences run at once (the engine's max_num_seqs); more prompts wait in its
    queue and join as others finish. With `max_loras` > 0 the engine serves adapters
    (`add_adapter`); it is built on first use and rebuilt by `enable_lora`. `mesh`: the device
    mesh of tensor parallelism (hyprjax.sharding.make_mesh), or None for one device.
    """

    def __init__(self, model, cfg: ModelConfig, tokenizer, *, max_model_len: int | None = None,
                 max_batch: int = 32, max_loras: int = 0, max_lora_rank: int = 16, engine_config=None, mesh=None,
                 enable_prefix_caching: bool = True, lora_quantization: str = "none", max_sparse_rank: int = 0,
                 max_block_rank: int = 0, speculation: dict | None = None, adapter_dtype: str = "auto",
                 kv_cache_dtype: str = "auto"):
        self.model, self.cfg, self.tokenizer, self.mesh = model, cfg, tokenizer, mesh
        self.enable_prefix_caching = enable_prefix_caching
        self._want_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch, self.max_loras, self.max_lora_rank = max_batch, max_loras, max_lora_rank
        self.lora_quantization, self.adapter_dtype = lora_quantization, adapter_dtype
        self.kv_cache_dtype = kv_cache_dtype
        self.sparse_limits = dict(max_sparse_rank=max_sparse_rank, max_block_rank=max_block_rank)
        self.speculation = speculation or {}  # EngineConfig's speculative fields
        self._config = engine_config
        self._engine = None

    @property
    def engine(self):
        """The LLMEngine (built on first use)."""
        if self._engine is None:
            from .engine.config import EngineConfig
            from .engine.llm_engine import LLMEngine

            config = self._config or EngineConfig(
                max_model_len=self._want_len, max_num_seqs=self.max_batch,
                max_num_batched_tokens=max(256, self.max_batch), max_loras=self.max_loras,
                max_lora_rank=self.max_lora_rank, lora_quantization=self.lora_quantization,
                adapter_dtype=self.adapter_dtype, kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                **self.sparse_limits, **self.speculation)
            self._engine = LLMEngine(self.model, self.cfg, self.tokenizer, config, warmup=False, progress=False,
                                     mesh=self.mesh)
        return self._engine

    def enable_lora(self, max_loras: int, max_lora_rank: int, lora_quantization: str = "none", *,
                    max_sparse_rank: int = 0, max_block_rank: int = 0) -> None:
        """Rebuild the engine with adapter slot tables (it holds no state between calls), unless
        it has tables at least this large already. Loaded adapters are carried into the new
        engine; growing is refused (HyprjaxError) while requests run or an adapter is merged."""
        sparse = dict(max_sparse_rank=max_sparse_rank, max_block_rank=max_block_rank)
        eng = self._engine
        carried = []  # adapters loaded in the engine being replaced, loaded again into the new one
        if eng is not None and eng.lora is not None:
            if all(getattr(eng.ecfg, k) >= v for k, v in sparse.items()):
                return
            carried = [eng.lora._adapters[n] for n in sorted(eng.lora.all_names())]
            short = ", ".join(f"{k}={v}" for k, v in sparse.items() if getattr(eng.ecfg, k) < v)
            why = ("requests are running" if eng.has_unfinished() else "an adapter is merged into the weights"
                   if eng.lora.merged_into else "loaded adapters are kept quantized"
                   if carried and eng.ecfg.lora_quantization != "none" else "")
            if why:
                raise HyprjaxError(f"this adapter needs {short}, more than the engine's slot tables hold, and "
                                   f"{why}; create the LLM with {short}")
            sparse = {k: max(v, getattr(eng.ecfg, k)) for k, v in sparse.items()}
        self.max_loras, self.max_lora_rank, self.lora_quantization = max_loras, max_lora_rank, lora_quantization
        self.sparse_limits = sparse
        self._config = None if self._config is None else dataclasses.replace(
            self._config, max_loras=max_loras, max_lora_rank=max_lora_rank, lora_quantization=lora_quantization,
            **sparse)
        self._engine = None
        for adapter in carried:  # grown tables: the adapters that were loaded stay loaded
            self.engine.add_adapter(adapter)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise HyprjaxError("the prompt is empty: give at least one token")
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens, but the context holds "
                                     f"{self.max_model_len} (prompt plus at least one generated token)")

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 on_text: Callable[[int, str], None] | None = None, loras: list | None = None) -> list[Completion]:
        """Generate for each prompt (token ids); `on_text(i, delta)` streams text as it comes;
        `loras` gives each prompt a LoraRequest or None."""
        for p in prompts:
            self.check_prompt(len(p))
        eng = self.engine
        limit = eng.max_model_len
        # Generation stops at the context's end ("length") rather than refusing the request.
        params = [sp if len(p) + sp.max_tokens <= limit else dataclasses.replace(sp, max_tokens=limit - len(p))
                  for p, sp in zip(prompts, params)]
        loras = loras or [None] * len(prompts)
        rids = []
        try:
            for p, sp, lr in zip(prompts, params, loras):
                rids.append(eng.add_request(p, sp, lora=lr))
            return self._run(eng, prompts, params, rids, on_text)
        finally:  # an error half-way must not leave requests queued for the next call
            for rid in rids:
                eng.abort(rid)

    def _run(self, eng, prompts, params, rids, on_text) -> list[Completion]:
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
        eos = eng._eos()
        out = []
        for p, sp, r in zip(prompts, params, rids):
            toks = tokens[r]
            ends = set(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else eos)
            if reasons[r] == "stop" and toks and toks[-1] in ends:
                toks = toks[:-1]  # the end token is not part of the output
            out.append(Completion(p, toks, "".join(texts[r]), reasons[r]))
        return out
