"""Which sequences run each step, and with how many tokens: policy only, no device code.

Continuous batching with chunked prefill and preemption by recompute, first come first served:

1. Running sequences in decode get one token each, oldest first. One that needs a page when
   none is free preempts the most recently admitted running sequence (itself, when it is the
   newest) until its page fits: the victim's pages are freed and it goes back to the front of
   the waiting queue, to be recomputed from its prompt and outputs so far.
2. Running sequences still prefilling (a long prompt mid-chunking) get the next chunk.
3. Waiting sequences are admitted in order while slots, token budget, prefill slots and pages
   last; the head of the queue blocks the rest. Nothing is admitted in a step that preempted:
   pages are short, and the victim would only be admitted back to be preempted again.

Decodes are planned before any prefill, and `max_num_batched_tokens >= max_num_seqs`, so a long
prompt never delays a decode. The oldest running sequence always makes progress, and `add`
refuses a request that could not fit the pool on its own, so the loop cannot deadlock.

The engine drives it: `schedule()` -> run the model -> `update(out)` -> append each sampled
token (`ScheduledSeq.samples`) -> `finish(seq, reason)` where a stop condition hits.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError, PromptTooLongError
from .block_manager import BlockManager
from .sequence import FINISH_REASONS, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step."""

    max_num_seqs: int = 32  # running sequences at most (rows of the runner's per-sequence tables)
    max_num_batched_tokens: int = 256  # per-step token budget (decodes + prefill chunks)
    max_prefill_seqs: int = 4  # sequences that may prefill (chunks) in one step

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SchedulerConfig.{name}={value!r} must be an integer >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"SchedulerConfig.max_num_batched_tokens={self.max_num_batched_tokens} must be "
                             f">= max_num_seqs={self.max_num_seqs}, so every running sequence can decode each step")


@dataclass
class ScheduledSeq:
    """One sequence in a step's plan."""

    seq: Sequence
    num_tokens: int  # tokens to feed this step, starting at seq.num_computed_tokens
    samples: bool = field(init=False)  # this chunk reaches the last token: the step samples one for it

    def __post_init__(self):
        self.samples = self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """A step's plan."""

    decodes: list[ScheduledSeq] = field(default_factory=list)  # num_tokens == 1 each
    prefills: list[ScheduledSeq] = field(default_factory=list)  # prompt (or recompute) chunks, >= 1 token
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step

    @property
    def is_empty(self) -> bool:
        """Nothing for the model to run."""
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decodes) + sum(s.num_tokens for s in self.prefills)


class Scheduler:
    """Plans each step over a waiting queue and the running set; owns slots, not pages."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 can_admit: Callable[[Sequence], bool] | None = None):
        self.config = config
        self.block_manager = block_manager
        # Last say on admitting the head of the queue (the engine pins its adapters in slots there;
        # False keeps it waiting, like a page shortage).
        self._can_admit = can_admit or (lambda seq: True)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self._by_id: dict[str, Sequence] = {}  # unfinished sequences
        self._free_slots = list(range(config.max_num_seqs))  # a heap: lowest slot first
        self._num_preemptions = 0
        self._num_steps = 0
        self._num_prefill_tokens = 0
        self._num_decode_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """Counters for metrics."""
        return dict(running=len(self.running), waiting=len(self.waiting), preemptions=self._num_preemptions,
                    steps=self._num_steps, prefill_tokens=self._num_prefill_tokens,
                    decode_tokens=self._num_decode_tokens, kv_usage=self.block_manager.usage)

    # ---- requests in and out

    def add(self, seq: Sequence) -> None:
        """Queue a new request (FCFS)."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id!r} is not a fresh sequence (status {seq.status.name})")
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id {seq.request_id!r} is already queued or running")
        bm = self.block_manager
        need = -(-(seq.num_tokens + seq.params.max_tokens) // bm.page_size)
        if need > bm.num_pages:
            raise PromptTooLongError(
                f"request {seq.request_id!r}: {seq.num_tokens} prompt tokens + max_tokens={seq.params.max_tokens} "
                f"need {need} KV pages of {bm.page_size} tokens, the pool has {bm.num_pages}")
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request wherever it is; None if it is unknown or already finished."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            del self._by_id[request_id]
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        else:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sequence (a stop condition hit): free its pages and slot."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} must be one of {FINISH_REASONS}")
        if seq.status is not SequenceStatus.RUNNING or self._by_id.get(seq.request_id) is not seq:
            raise RuntimeError(f"finish: request {seq.request_id!r} is not running (status {seq.status.name})")
        self.running.remove(seq)
        del self._by_id[seq.request_id]
        self._release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # an older victim, preempted later, lands in front of a newer one
        self._num_preemptions += 1
        out.preempted.append(seq)

    def requeue_running(self) -> list[Sequence]:
        """Preempt every running sequence (their K/V was lost): each frees its pages and slot and
        waits to be recomputed, oldest first, ahead of the requests that never ran."""
        out = SchedulerOutput()
        for seq in reversed(list(self.running)):  # newest first, so the oldest ends up in front
            self._preempt(seq, out)
        return out.preempted

    # ---- the step

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring for the policy)."""
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens

        # 1. Decodes, oldest first; victims are always newer, so never already planned.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not seq.in_decode:
                i += 1
                continue
            while not bm.can_append(seq, 1) and self.running[-1] is not seq:
                self._preempt(self.running[-1], out)
            if not bm.can_append(seq, 1):
                self._preempt(seq, out)
                break  # it was the newest: nothing after it left to plan
            bm.append(seq, 1)
            out.decodes.append(ScheduledSeq(seq, 1))
            budget -= 1
            i += 1

        # 2. Running sequences still prefilling get their next chunk (their pages are all allocated).
        for seq in self.running:
            if budget == 0 or len(out.prefills) >= cfg.max_prefill_seqs:
                break
            assert seq.num_uncomputed >= 1, f"request {seq.request_id!r} was not given its sampled token"
            if seq.in_decode:
                continue
            n = min(seq.num_uncomputed, budget)
            bm.append(seq, n)
            out.prefills.append(ScheduledSeq(seq, n))
            budget -= n

        # 3. Admit waiting sequences, strictly in order.
        while (self.waiting and not out.preempted and budget > 0 and len(self.running) < cfg.max_num_seqs
               and len(out.prefills) < cfg.max_prefill_seqs and bm.can_allocate(self.waiting[0])
               and self._can_admit(self.waiting[0])):
            seq = self.waiting.popleft()
            bm.allocate(seq)
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            out.prefills.append(ScheduledSeq(seq, n))
            budget -= n

        self._num_steps += 1
        self._num_decode_tokens += len(out.decodes)
        self._num_prefill_tokens += sum(s.num_tokens for s in out.prefills)
        return out

    def update(self, out: SchedulerOutput) -> None:
        """The model ran `out`: advance each planned sequence and register its new full pages."""
        for s in (*out.decodes, *out.prefills):
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed_tokens += s.num_tokens
            assert seq.num_computed_tokens <= seq.num_tokens, f"request {seq.request_id!r} computed past its tokens"
            self.block_manager.commit(seq)
