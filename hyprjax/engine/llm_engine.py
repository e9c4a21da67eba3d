"""LLMEngine: requests in, a step at a time, outputs out (continuous batching over a paged cache).

`add_request` validates and queues; `step` asks the Scheduler for a plan, has the ModelRunner
run it, then appends sampled tokens, detokenizes, checks stop conditions and returns one
`RequestOutput` per sequence that produced a token. The engine is single-owner: the async
front (`AsyncEngine`) drives it from one thread.

A step that raises fails only the requests it ran (`StepFailedError`): the engine aborts them,
and when the failure deleted device state it had donated (the KV pool, the penalty tables, the
LoRA slot tables) it rebuilds that state, forgets every cached page and sends the other running
requests back to the queue to be recomputed, since their K/V is gone. If that rebuild fails too,
the engine is dead (`dead_reason`), and every later call raises `EngineDeadError`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.lora import LoraAdapter
from ..adapters.registry import LoraRegistry, LoraRequest, PreparedMerge, ResolvedMix
from ..config import ModelConfig
from ..detok import NullDecoder, OutputTracker
from ..errors import HyprjaxError, PromptTooLongError
from ..quant import check_qmatmul_mesh, is_quantized
from ..sampling import SamplingParams, fresh_seed, seed_key
from ..sharding import kv_shards, lora_table_sharding
from .block_manager import BlockManager
from .config import EngineConfig, draft_source
from .memory import kv_pool_pages, page_bytes as kv_page_bytes, pool_devices
from .paged import resolve_kv_dtype
from .runner import ModelRunner, RowRequest
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from .sequence import Sequence
from .spec_draft import DraftModel, load_draft
from .speculative import Speculator

log = logging.getLogger("hyprjax.engine")


class QueueFullError(HyprjaxError):
    """The waiting queue is full; retry later (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed, not the request (HTTP 500); never a HyprjaxError, which means bad input."""


class StepFailedError(EngineError):
    """A step raised; the requests it ran were aborted and the engine serves on.

    `request_ids`: the requests that failed. `cause`: what the step raised. `outputs`: what the
    step still produced for the other requests; the caller must deliver them.
    """

    def __init__(self, request_ids: list[str], cause: BaseException, outputs: list[RequestOutput] = ()):
        self.request_ids, self.cause, self.outputs = list(request_ids), cause, list(outputs)
        super().__init__(f"the engine failed this request: its step raised {type(cause).__name__}: {cause} "
                         "(the engine recovered; a retry may succeed)")


class EngineDeadError(EngineError):
    """The engine could not rebuild its state after a failed step and serves nothing more; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the engine is down: {reason}")


class _AdmissionError(Exception):
    """Pinning the head of the queue's adapters raised: that request alone failed."""

    def __init__(self, request_id: str):
        super().__init__(f"admitting request {request_id!r} failed")
        self.request_id = request_id


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
                 warmup: bool = True, progress: bool = True, interpret: bool = False, mesh=None):
        self.cfg, self.tokenizer, self.ecfg = cfg, tokenizer, ecfg
        self.max_model_len = min(ecfg.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        check_qmatmul_mesh(mesh, model)
        dtype = model.compute_dtype  # of the adapter slots (weights may be int8)
        # the KV cache's dtype, resolved once here so the draft model's pool (if any) matches
        ecfg = replace(ecfg, kv_cache_dtype=resolve_kv_dtype(ecfg.kv_cache_dtype, dtype, is_quantized(model)))
        self.ecfg = ecfg
        dtype_bytes = jnp.dtype(ecfg.kv_cache_dtype).itemsize
        draft = load_draft(ecfg, tokenizer, cfg, dtype) if draft_source(ecfg.speculative) else None
        draft_page = 0 if draft is None else kv_page_bytes(draft.cfg, ecfg.page_size, dtype_bytes)
        num_pages, page_bytes = kv_pool_pages(cfg, ecfg, dtype_bytes, device=pool_devices(mesh),
                                              kv_shards=kv_shards(cfg, mesh),
                                              extra_page_bytes=draft_page)
        self.max_model_len = min(self.max_model_len, num_pages * ecfg.page_size)  # one request must fit the pool
        self.backend = resolve_backend(ecfg.attention_backend)
        self.block_manager = BlockManager(num_pages, ecfg.page_size, ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(ecfg.max_num_seqs, ecfg.max_num_batched_tokens,
                                                   ecfg.max_prefill_seqs), self.block_manager, self._admit_lora)
        self.lora = None
        if ecfg.max_loras:
            slot_dtype = dtype if ecfg.adapter_dtype == "auto" else jnp.dtype(ecfg.adapter_dtype)
            self.lora = LoraRegistry(cfg, max_loras=ecfg.max_loras, max_rank=ecfg.max_lora_rank, dtype=slot_dtype,
                                     sharding=lora_table_sharding(cfg, mesh), quantization=ecfg.lora_quantization,
                                     max_sparse_rank=ecfg.max_sparse_rank, max_block_rank=ecfg.max_block_rank,
                                     sparse_block=ecfg.sparse_block, bits16=self.backend == "xla")
            sparse = "".join(f", {part} capacity of rank {r}" for part, r in
                             (("element-sparse", ecfg.max_sparse_rank), ("block-sparse", ecfg.max_block_rank)) if r)
            log.info("adapter slot tables: %d slots of rank %d%s (%.1f MiB of %s); adapters kept on the host as %s",
                     ecfg.max_loras, ecfg.max_lora_rank, sparse, self.lora.nbytes / 2**20, jnp.dtype(slot_dtype).name,
                     "floats" if ecfg.lora_quantization == "none" else ecfg.lora_quantization)
        reg = self.lora
        self.runner = ModelRunner(model, cfg, ecfg, num_pages=num_pages, max_model_len=self.max_model_len,
                                  backend=self.backend, interpret=interpret, mesh=mesh,
                                  lora_tables=(lambda: reg.tables) if reg is not None else None,
                                  sparse_tables=(lambda: reg.sparse_tables) if reg is not None else None,
                                  slot_parts=reg.parts if reg is not None else None)
        log.info("KV pool: %d pages of %d tokens (%.1f MiB of %s%s); context %d tokens per request", num_pages,
                 ecfg.page_size, num_pages * page_bytes / 2**20, ecfg.kv_cache_dtype,
                 ", the draft model's included" if draft else "", self.max_model_len)
        self._draft_len = self.max_model_len  # drafts stop at the draft model's own context
        spec_draft = None
        if draft is not None:
            self._draft_len = min(self.max_model_len, draft.cfg.max_position_embeddings)
            spec_draft = DraftModel(draft.model, draft.cfg, ecfg, num_pages=num_pages, max_model_len=self._draft_len,
                                    backend=self.backend, interpret=interpret)
            log.info("draft model %s: %d layers, its KV pool %.1f MiB", draft.path, draft.cfg.num_layers,
                     num_pages * draft_page / 2**20)
        self.spec = Speculator(ecfg, spec_draft) if ecfg.speculative else None
        self.num_compiled = self.runner.warmup(self.max_model_len, progress) if warmup else 0
        if warmup and spec_draft is not None:
            self.num_compiled += spec_draft.warmup(progress)
        self._requests: dict[str, _Request] = {}
        self.dead_reason: str | None = None  # set once a failed step could not be recovered from
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
                    logprobs: int | None = None, lora: LoraRequest | None = None,
                    prepared: PreparedMerge | None = None) -> str:
        """Queue a request; returns its id. Raises QueueFullError when max_queue requests wait,
        AdapterNotFoundError / AdapterError for an unknown adapter or a bad mix, EngineDeadError
        once the engine is down. `prepared`: `self.lora.prepare(lora)` computed on another
        thread, so a merge strategy's merge does not run here."""
        self._check_alive()
        self.validate(prompt_token_ids, params, logprobs)
        resolved = None
        if lora is not None:
            if self.lora is None:
                raise HyprjaxError("this engine serves no adapters (start it with max_loras >= 1)")
            resolved = self.lora.resolve(lora, prepared)  # holds its adapters: released on any failure below
        elif self.lora is not None:
            resolved = self.lora.resolve_base()  # merged mode: the base model is the weights less the adapter
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

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def _eos(self) -> frozenset:
        return frozenset(self.tokenizer.eos_token_ids if self.tokenizer is not None else self.cfg.eos_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any point and free its pages; returns its final output, if it was live."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if self.dead_reason is None:  # a dead engine's pages and slots are never used again
            self.scheduler.abort(request_id)
            self._release_lora(req)
        if self.spec is not None:
            self.spec.forget(request_id)
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

    def merge_adapter(self, name: str) -> None:
        """Merged mode: add adapter `name` into the base weights (hyprjax/adapters/merged.py).

        Requests naming it alone then run the base model's step; every other request, the base
        model's included, adds it back out per token. Only while no request is unfinished (their
        mixes were resolved for the old weights); the prefix cache is dropped, since the pages
        it holds were computed under the old weights."""
        if self.lora is None:
            raise HyprjaxError("this engine serves no adapters (start it with max_loras >= 1)")
        if self.has_unfinished():
            raise HyprjaxError("an adapter can only be merged or unmerged while no request is running")
        self.lora.merge(name, self.runner.kernel_sites())
        self.block_manager.reset()

    def unmerge_adapter(self) -> str | None:
        """Leave merged mode: the base weights are restored exactly; returns the adapter's name."""
        if self.lora is None or self.lora.merged_into is None:
            return None
        if self.has_unfinished():
            raise HyprjaxError("an adapter can only be merged or unmerged while no request is running")
        name = self.lora.unmerge(self.runner.kernel_sites())
        self.block_manager.reset()
        return name

    def _admit_lora(self, seq: Sequence) -> bool:
        """Scheduler hook: pin the head of the queue's adapters in slots, or keep it waiting."""
        if not seq.lora:
            return True
        req = self._requests[seq.request_id]
        if not req.lora_pinned:
            try:
                req.lora_pinned = self.lora.acquire([n for n, _ in seq.lora])
            except Exception as e:  # e.g. a slot write out of device memory: this request fails, not the batch
                raise _AdmissionError(seq.request_id) from e
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
                                                         lora_evictions_total=self.lora.evictions)),
                    **({} if self.spec is None else self.spec.stats()))

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
        """Run one scheduled step; outputs of every sequence that got a token (or finished).

        Raises StepFailedError when the step failed (its requests are aborted, the engine serves
        on), EngineDeadError when the engine could not recover from that, and ever after.
        """
        self._check_alive()
        plan = None
        try:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                return []
            drafts = self._drafts(plan)
            if drafts is not None:
                return self._verify_step(plan, drafts)
            scheduled = plan.decodes + plan.prefills
            rows = [self._row(s) for s in scheduled]
            start = time.perf_counter()
            res = self.runner.run(rows[:len(plan.decodes)], rows[len(plan.decodes):])
            if self.spec is not None and not plan.prefills:  # what a verify step is weighed against
                self.spec.observe("plain", len(plan.decodes), time.perf_counter() - start)
            self.scheduler.update(plan)
        except Exception as e:
            raise self._recover(plan, e) from e
        outputs, failed, cause = [], [], None
        for i, s in enumerate(scheduled):
            if not s.samples:
                continue
            try:
                outputs.append(self._emit(s.seq, res, i))
            except Exception as e:  # this request's detokenizer or stop check: it fails alone
                log.exception("emitting a token for request %r failed; aborting it", s.seq.request_id)
                failed.append(s.seq.request_id)
                cause = e
        if failed:
            raise self._fail(failed, cause, outputs)
        return outputs

    def _emit(self, seq: Sequence, res, i: int) -> RequestOutput:
        return self._emit_tokens(seq, [int(res.tokens[i])], res.logprob[i:i + 1], res.top_ids[i:i + 1],
                                 res.top_logprobs[i:i + 1])

    def _emit_tokens(self, seq: Sequence, tokens: list[int], logprob, top_ids, top_logprobs) -> RequestOutput:
        """Append `tokens` in order until one finishes the request (the rest are dropped)."""
        req = self._requests[seq.request_id]
        lps = [] if req.logprobs is not None else None
        emitted, reason = [], None
        for j, token in enumerate(tokens):
            seq.output_token_ids.append(token)
            self.generation_tokens_total += 1
            req.tracker.push(token)
            emitted.append(token)
            if lps is not None:
                top = [(int(t), float(lp)) for t, lp in zip(top_ids[j, :req.logprobs], top_logprobs[j, :req.logprobs])]
                lps.append(TokenLogprob(token, float(logprob[j]), top))
            reason = req.tracker.finish_reason
            if reason is not None:
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
            self._release_lora(req)
            if self.spec is not None:
                self.spec.forget(seq.request_id)
        return self._output(req, emitted, lps, reason)

    # ---- speculative steps (engine/speculative.py) -----------------------------------------

    def _drafts(self, plan) -> list[list[int]] | None:
        """Each planned decode's drafts when this step should verify, else None (a plain step)."""
        spec = self.spec
        if spec is None or plan.prefills or not plan.decodes:
            return None
        if not spec.fits(len(plan.decodes), self.runner.spec_bucket(len(plan.decodes) * (spec.k + 1)) or 0):
            return None
        drafts: list[list[int]] = [[] for _ in plan.decodes]
        asks = []  # (index, sequence, k): the draft model's work, once pages for its drafts are held
        for i, s in enumerate(plan.decodes):
            seq = s.seq
            room = min(seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens - 1,
                       self._draft_len - seq.num_tokens - 1)
            k = spec.wanted(seq.request_id, room) if seq.params.speculative else 0
            if k and spec.draft is None:
                k = len(d := spec.drafts(seq.request_id, seq.prompt_token_ids, seq.output_token_ids, k))
            if not k or not self.block_manager.can_append(seq, 1 + k):
                continue  # no drafts, or no pages for their K/V: this sequence just decodes
            self.block_manager.append(seq, 1 + k)
            if spec.draft is None:
                drafts[i] = d
            else:
                asks.append((i, seq, k))
        if asks:
            for (i, _, _), d in zip(asks, spec.draft.propose([(seq, k) for _, seq, k in asks])):
                drafts[i] = d
        return drafts if any(drafts) else None

    def _verify_step(self, plan, drafts: list[list[int]]) -> list[RequestOutput]:
        """Run `plan`'s decodes as a verify step; each emits its accepted drafts and one more token."""
        try:
            rows = [self._row(s) for s in plan.decodes]
            start = time.perf_counter()  # the verify step alone, as step() times the plain one
            res = self.runner.run_spec(list(zip(rows, drafts)), self.spec.k)
        except Exception as e:
            raise self._recover(plan, e) from e
        n = len(plan.decodes)
        self.spec.observe("verify", n, time.perf_counter() - start)
        self.spec.steps_total += 1
        outputs, failed, cause = [], [], None
        for i, s in enumerate(plan.decodes):
            a = int(res.accepted[i])
            self.spec.record(s.seq.request_id, len(drafts[i]), a, n)
            s.num_tokens = 1 + a  # the last token and the accepted drafts now have their K/V
            try:
                outputs.append(self._emit_tokens(s.seq, [int(t) for t in res.tokens[i, :a + 1]], res.logprob[i],
                                                 res.top_ids[i], res.top_logprobs[i]))
            except Exception as e:  # as in step(): this request fails alone
                log.exception("emitting tokens for request %r failed; aborting it", s.seq.request_id)
                failed.append(s.seq.request_id)
                cause = e
        self.scheduler.update(plan)
        if failed:
            raise self._fail(failed, cause, outputs)
        return outputs

    # ---- failed steps ---------------------------------------------------------------------

    def _recover(self, plan, cause: Exception) -> EngineError:
        """A step raised: abort the requests it ran and rebuild what the failure deleted."""
        if isinstance(cause, _AdmissionError):
            failed, cause = [cause.request_id], cause.__cause__
        elif plan is None:  # schedule() raised elsewhere: it may have left any running sequence half-planned
            failed = [seq.request_id for seq in self.scheduler.running]
        else:
            failed = [s.seq.request_id for s in plan.decodes + plan.prefills]
        log.error("a step failed (%s: %s); aborting %d requests", type(cause).__name__, cause, len(failed),
                  exc_info=cause)
        return self._fail(failed, cause, [])

    def _fail(self, request_ids: list[str], cause: BaseException, outputs: list[RequestOutput]) -> EngineError:
        """Abort `request_ids` and rebuild lost device state: StepFailedError, or EngineDeadError if that fails."""
        try:
            for rid in request_ids:
                self.abort(rid)
            self._rebuild_lost_state()
        except Exception as e:
            self.dead_reason = (f"recovering from a failed step ({type(cause).__name__}: {cause}) failed: "
                                f"{type(e).__name__}: {e}")
            log.exception("the engine is down: %s", self.dead_reason)
            return EngineDeadError(self.dead_reason)
        return StepFailedError(request_ids, cause, outputs)

    @staticmethod
    def _kv_lost(runner) -> bool:
        """Is `runner`'s KV pool or a penalty table deleted (donated to the failed step) or
        poisoned (the failed computation's output, which raises when read)?"""
        if runner.state_lost():
            return True
        try:
            jax.block_until_ready((runner.cache, runner.counts, runner.seen))
        except Exception:
            return True
        return False

    def _rebuild_lost_state(self) -> None:
        draft = self.spec.draft if self.spec is not None else None
        if draft is not None and self._kv_lost(draft.runner):  # a failed draft step: only drafts are lost
            draft.runner.reset_state()
            draft.forget()
            log.warning("draft model KV pool rebuilt after a failed step")
        if self.lora is not None and self.lora.tables_lost():
            self.lora.reset_tables()
            log.warning("LoRA slot tables rebuilt after a failed step")
        if not self._kv_lost(self.runner):
            return
        requeued = self.scheduler.requeue_running()  # their K/V is gone: recompute them from their tokens
        self.block_manager.reset()  # no page holds valid K/V now, cached prefixes included
        self.runner.reset_state()
        if draft is not None:  # the draft's K/V lived in the same pages
            draft.forget()
        for req in self._requests.values():
            req.admitted = (None, -1)  # penalty rows are zeros again: refill them on (re)admission
        log.warning("KV pool rebuilt after a failed step; %d running requests will be recomputed", len(requeued))

    def _output(self, req: _Request, tokens: list[int], lps, reason: str | None) -> RequestOutput:
        seq = req.seq
        return RequestOutput(seq.request_id, tokens, req.tracker.delta() if reason != "abort" else "", lps,
                             reason is not None, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                             seq.num_cached_tokens)
