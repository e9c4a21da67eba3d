"""LLMEngine: requests in, a step at a time, outputs out (continuous batching over a paged cache).

`add_request` validates and queues; `step` asks the Scheduler for a plan, has the ModelRunner
run it, then appends sampled tokens, detokenizes, checks stop conditions and returns one
`RequestOutput` per sequence that produced a token. The engine is single-owner: the async
front (`AsyncEngine`) drives it from one thread.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from ..adapters.lora import LoraAdapter
from ..adapters.registry import LoraRegistry, LoraRequest, ResolvedMix
from ..config import ModelConfig
from ..detok import NullDecoder, OutputTracker
from ..errors import HyprjaxError, PromptTooLongError
from ..sampling import SamplingParams, fresh_seed, seed_key
from .block_manager import BlockManager
from .config import EngineConfig
from .runner import ModelRunner, RowRequest
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from .sequence import Sequence

log = logging.getLogger("hyprjax.engine")


class QueueFullError(HyprjaxError):
    """The waiting queue is full; retry later (HTTP 503)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """One increment of a request's output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass
class _Request:
    seq: Sequence
    tracker: OutputTracker
    key: np.ndarray  # u32[2]
    logprobs: int | None
    admitted: tuple = field(default=(None, -1))  # (slot, preemptions) the runner's penalty rows hold
    lora: ResolvedMix | None = None  # its adapters, held in the registry until it ends
    lora_pinned: bool = False  # its mix holds device slots (from admission to the end)


def resolve_backend(name: str) -> str:
    """`auto` -> pallas on GPU/TPU, xla on CPU (logged once)."""
    if name == "auto":
        name = "xla" if jax.default_backend() == "cpu" else "pallas"
        log.info("attention backend auto -> %s on %s", name, jax.default_backend())
    return name


class LLMEngine:
    """Continuous-batching engine over one model."""

    def __init__(self, model, cfg: ModelConfig, tokenizer, ecfg: EngineConfig = EngineConfig(), *,
                 warmup: bool = True, progress: bool = True, interpret: bool = False):
        self.cfg, self.tokenizer, self.ecfg = cfg, tokenizer, ecfg
        self.max_model_len = min(ecfg.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        dtype_bytes = jax.tree.leaves(nnx.state(model))[0].dtype.itemsize
        page_bytes = 2 * cfg.num_layers * ecfg.page_size * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
        num_pages = ecfg.num_pages or max(2, ecfg.kv_cache_memory // page_bytes)
        self.max_model_len = min(self.max_model_len, num_pages * ecfg.page_size)  # one request must fit the pool
        self.backend = resolve_backend(ecfg.attention_backend)
        self.block_manager = BlockManager(num_pages, ecfg.page_size, ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(ecfg.max_num_seqs, ecfg.max_num_batched_tokens,
                                                   ecfg.max_prefill_seqs), self.block_manager, self._admit_lora)
        dtype = jax.tree.leaves(nnx.state(model))[0].dtype
        self.lora = None
        if ecfg.max_loras:
            self.lora = LoraRegistry(cfg, max_loras=ecfg.max_loras, max_rank=ecfg.max_lora_rank, dtype=dtype)
            log.info("LoRA slot table: %d slots of rank %d (%.1f MiB)", ecfg.max_loras, ecfg.max_lora_rank,
                     self.lora.nbytes / 2**20)
        self.runner = ModelRunner(model, cfg, ecfg, num_pages=num_pages, max_model_len=self.max_model_len,
                                  backend=self.backend, interpret=interpret,
                                  lora_tables=(lambda: self.lora.tables) if self.lora is not None else None)
        log.info("KV pool: %d pages of %d tokens (%.1f MiB); context %d tokens per request", num_pages,
                 ecfg.page_size, num_pages * page_bytes / 2**20, self.max_model_len)
        self.num_compiled = self.runner.warmup(self.max_model_len, progress) if warmup else 0
        self._requests: dict[str, _Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests ------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> None:
        """Raise HyprjaxError naming what is wrong with a request (no state touched)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise HyprjaxError("the prompt is empty: give at least one token")
        if n + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"this model's context is {self.max_model_len} tokens, but the request has "
                                     f"{n} prompt tokens + {params.max_tokens} max_tokens = {n + params.max_tokens}")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise HyprjaxError(f"token id {bad} is outside the vocabulary of {self.cfg.vocab_size}")
        if logprobs is not None and not 0 <= logprobs <= self.ecfg.max_logprobs:
            raise HyprjaxError(f"logprobs={logprobs} must be between 0 and {self.ecfg.max_logprobs}")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                    logprobs: int | None = None, lora: LoraRequest | None = None) -> str:
        """Queue a request; returns its id. Raises QueueFullError when max_queue requests wait,
        AdapterNotFoundError / AdapterError for an unknown adapter or a bad mix."""
        self.validate(prompt_token_ids, params, logprobs)
        resolved = None
        if lora is not None:
            if self.lora is None:
                raise HyprjaxError("this engine serves no adapters (start it with max_loras >= 1)")
            resolved = self.lora.resolve(lora)  # holds its adapters: released on any failure below
        try:
            return self._add(prompt_token_ids, params, request_id, logprobs, resolved)
        except BaseException:
            if resolved is not None:
                self.lora.release(resolved, pinned=False)
            raise

    def _add(self, prompt_token_ids, params, request_id, logprobs, resolved: ResolvedMix | None) -> str:
        if self.scheduler.num_waiting >= self.ecfg.max_queue:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are waiting (max_queue="
                                 f"{self.ecfg.max_queue}); retry later")
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise HyprjaxError(f"request_id {rid!r} is already in use")
        # Build everything first and hand the sequence to the scheduler last: a failure leaves nothing.
        seq = Sequence(rid, list(prompt_token_ids), params, lora=resolved.mix if resolved else (),
                       cache_salt=resolved.salt if resolved else b"")
        eos = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos())
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else NullDecoder()
        seed = params.seed if params.seed is not None else fresh_seed()
        key = seed_key(seed)
        request = _Request(seq, OutputTracker(list(prompt_token_ids), params, eos, decoder), key, logprobs,
                           lora=resolved)
        self.scheduler.add(seq)
        self._requests[rid] = request
        self.prompt_tokens_total += len(prompt_token_ids)
        return rid

    def _eos(self) -> frozenset:
        return frozenset(self.tokenizer.eos_token_ids if self.tokenizer is not None else self.cfg.eos_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any point and free its pages; returns its final output, if it was live."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        self._release_lora(req)
        return self._output(req, [], None, "abort")

    # ---- adapters -------------------------------------------------------------------------

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Make a loaded adapter available to new requests (it reaches a slot when first used)."""
        if self.lora is None:
            raise HyprjaxError("this engine serves no adapters (start it with max_loras >= 1)")
        self.lora.add(adapter)

    def remove_adapter(self, name: str) -> bool:
        """Unload an adapter: True if gone now, False if it goes when the requests using it end."""
        if self.lora is None:
            raise HyprjaxError("this engine serves no adapters (start it with max_loras >= 1)")
        return self.lora.remove(name)

    def _admit_lora(self, seq: Sequence) -> bool:
        """Scheduler hook: pin the head of the queue's adapters in slots, or keep it waiting."""
        if not seq.lora:
            return True
        req = self._requests[seq.request_id]
        if not req.lora_pinned:
            req.lora_pinned = self.lora.acquire([n for n, _ in seq.lora])
        return req.lora_pinned

    def _release_lora(self, req: _Request) -> None:
        if req.lora is not None:
            self.lora.release(req.lora, req.lora_pinned)
            req.lora, req.lora_pinned = None, False

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        s = self.scheduler.stats()
        bm = self.block_manager.stats()
        queries = bm.get("prefix_queries", 0)
        return dict(num_running=s["running"], num_waiting=s["waiting"], kv_cache_usage=self.block_manager.usage,
                    num_preemptions_total=s["preemptions"], prompt_tokens_total=self.prompt_tokens_total,
                    generation_tokens_total=self.generation_tokens_total,
                    prefix_cache_hit_rate=(bm.get("prefix_hits", 0) / queries) if queries else 0.0,
                    **({} if self.lora is None else dict(lora_adapters_loaded=len(self.lora.names()),
                                                         lora_slots_in_use=self.lora.num_resident,
                                                         lora_evictions_total=self.lora.evictions)))

    # ---- the step ------------------------------------------------------------------------

    def _row(self, s: ScheduledSeq) -> RowRequest:
        seq = s.seq
        req = self._requests[seq.request_id]
        if req.admitted != (seq.slot, seq.num_preemptions):  # new, or back after a preemption
            self.runner.admit(seq.slot, seq.prompt_token_ids, seq.output_token_ids)
            req.admitted = (seq.slot, seq.num_preemptions)
        start = seq.num_computed_tokens
        lora = tuple((self.lora.slot(n), w) for n, w in seq.lora)
        return RowRequest(seq.all_token_ids[start:start + s.num_tokens], start, list(seq.block_table), seq.slot,
                          s.samples, seq.num_output_tokens, seq.params, req.key, req.logprobs is not None, lora)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs of every sequence that got a token (or finished)."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        scheduled = plan.decodes + plan.prefills
        rows = [self._row(s) for s in scheduled]
        res = self.runner.run(rows[:len(plan.decodes)], rows[len(plan.decodes):])
        self.scheduler.update(plan)
        outputs = []
        for i, s in enumerate(scheduled):
            if not s.samples:
                continue
            req = self._requests[s.seq.request_id]
            token = int(res.tokens[i])
            s.seq.output_token_ids.append(token)
            self.generation_tokens_total += 1
            req.tracker.push(token)
            lps = None
            if req.logprobs is not None:
                top = [(int(t), float(lp)) for t, lp in zip(res.top_ids[i, :req.logprobs],
                                                            res.top_logprobs[i, :req.logprobs])]
                lps = [TokenLogprob(token, float(res.logprob[i]), top)]
            reason = req.tracker.finish_reason
            if reason is not None:
                self.scheduler.finish(s.seq, reason)
                del self._requests[s.seq.request_id]
                self._release_lora(req)
            outputs.append(self._output(req, [token], lps, reason))
        return outputs

    def _output(self, req: _Request, tokens: list[int], lps, reason: str | None) -> RequestOutput:
        seq = req.seq
        return RequestOutput(seq.request_id, tokens, req.tracker.delta() if reason != "abort" else "", lps,
                             reason is not None, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                             seq.num_cached_tokens)
