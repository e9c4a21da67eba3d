"""Speculative decoding in the paged engine: which steps verify, which drafts, what was accepted.

A verify step is a decode-only step in which every running sequence feeds its last token and
up to K drafts, K + 1 decode rows (runner.run_spec). On the XLA path the rows of a group attend
as one causal block (each row masked to its own position; the sequence's pages are gathered once
per layer), with the Pallas kernels as one block per row; either way the K/V of the rows before
row j were written by the same layer call before attention reads them, so row j sees exactly
the causal prefix a one-token step would. The head verifies each group on the device
(spec_verify.verify: exact, with penalties and filters applied as the plain sampler applies
them) and emits the accepted drafts plus one token.

Rollback needs no device work. A sequence's computed length advances by 1 + accepted, so K/V
written for rejected drafts lie past it: attention never reads them (it stops at each row's
context length) and the next step overwrites them. The prefix cache registers only full pages
of computed tokens, so a rejected draft never enters it. Pages allocated for drafts stay with
the sequence, which fills them as it grows.

When it runs (and so adapts to load):
- only in steps that run no prefill (a step that prefills is compute-bound already);
- only while the batch's sequences times K + 1 fit `spec_max_rows` decode rows. Verifying K more
  tokens costs about what one costs only while a step reads weights rather than computes;
- per sequence, while its n-gram index finds a draft and its request did not turn speculation
  off (`SamplingParams.speculative=False`). A step in which no sequence has a draft runs as a
  plain decode step;
- per sequence, while its drafts pay: a verify step of B sequences costs r(B) plain steps of B
  sequences and gives each sequence 1 + accepted tokens where a plain step gives 1, so drafts
  pay while a sequence's tokens per verify step stay above r. The engine times its decode-only
  steps (`observe`), and r(B) is the ratio of the two kinds' averaged times (`DEFAULT_COST_RATIO`
  until both have run; proposing is not timed). An exponential average of each sequence's tokens per verify step
  (weight 1/2 per step, starting at 1 + K) that falls below r pauses its proposals for
  `PAUSE_STEPS` steps, after which it tries again from an even start (the plain steps of the
  pause are timed too). Why measured and not fixed: the ratio moves with the machine and with
  everything that speeds up one kind of step. The fixed rule it replaced (pause below 30% of
  drafts accepted, i.e. 3.1 tokens per verify step at K = 7) was set when a verify step of the
  default model cost about 2-3 plain steps on CPU; with its bfloat16 KV cache the engine timed
  3.5-4 on a 2-core EPYC, and where a verify step costs about one plain step (a weight-bound
  accelerator) the old rule would pause drafts that still pay. On that EPYC bench/spec.py gave
  the same figures under both rules, within noise (README, speculative decoding).

Proposers:
- n-gram prompt lookup (spec_propose.py). Its index lives per request and grows with the
  request's tokens; it survives preemption (it depends on tokens only).
- a draft model (spec_draft.py): greedy drafts from a smaller model that shares the target's
  tokenizer, with its own KV pool addressed by the target's page ids.
"""

from __future__ import annotations

from .config import EngineConfig
from .spec_propose import NgramIndex, NgramProposer


PAUSE_STEPS = 16  # steps a sequence decodes without drafts once they stopped paying
# a verify step's cost in plain steps of the same sequences until both kinds have been timed
# (the default model on CPU, K = 7: ~2 on a Xeon with a float32 KV cache, 3.5-4 on an EPYC
# with a bfloat16 one; the module docstring)
DEFAULT_COST_RATIO = 2.5
COST_WEIGHT = 0.25  # weight of each new step time in its kind's running average
OUTLIER = 3.0  # a step time counts at most this many times its kind's running average


class Speculator:
    """Drafts and counters for one engine: n-gram lookup, or a draft model (spec_draft.py)."""

    def __init__(self, ecfg: EngineConfig, draft=None):
        self.method = "draft" if draft is not None else ecfg.speculative
        self.k = ecfg.num_speculative_tokens
        self.max_rows = ecfg.spec_max_rows
        self.draft = draft  # spec_draft.DraftModel, or None
        self.proposer = NgramProposer(ecfg.ngram_min, ecfg.ngram_max, self.k)
        self._index: dict[str, NgramIndex] = {}
        self._gain: dict[str, float] = {}  # request -> average tokens per verify step (1 + accepted)
        self._paused: dict[str, int] = {}  # request -> steps left without drafts
        self._cost: dict[tuple[str, int], float] = {}  # ("plain" | "verify", sequences) -> average seconds
        self._seen: set[tuple[str, int]] = set()  # kinds timed once (a first run may include compiling)
        self.proposed_total = 0
        self.accepted_total = 0
        self.steps_total = 0
        self.acceptance = [0] * (self.k + 1)  # verify groups by drafts accepted (0..K), groups with drafts only

    def fits(self, num_seqs: int, rows_limit: int) -> bool:
        """Whether a verify step of `num_seqs` groups fits the row budget (and a decode bucket)."""
        return num_seqs * (self.k + 1) <= min(self.max_rows, rows_limit)

    def wanted(self, request_id: str, room: int) -> int:
        """How many drafts to ask for this step: min(K, room), or 0 while the request is paused.
        The draft model needs pages for them before it runs; n-gram lookup is asked first."""
        if self._paused.get(request_id):
            self._paused[request_id] -= 1
            return 0
        return max(0, min(self.k, room))

    def drafts(self, request_id: str, prompt: list[int], output: list[int], room: int) -> list[int]:
        """Up to `room` n-gram drafts for the sequence prompt + output (so far). Only the output
        tokens the index has not seen are read: nothing is copied per step."""
        index = self._index.get(request_id)
        if index is None:
            index = self._index[request_id] = self.proposer.index(prompt + output)
        else:
            seen = len(index) - len(prompt)
            if seen < len(output):
                index.extend(output[seen:])
        return index.propose(room) if room > 0 else []

    def forget(self, request_id: str) -> None:
        for table in (self._index, self._gain, self._paused):
            table.pop(request_id, None)
        if self.draft is not None:
            self.draft.forget(request_id)

    def observe(self, kind: str, num_seqs: int, seconds: float) -> None:
        """Time of a decode-only step ("plain" or "verify") of `num_seqs` sequences. The first of
        each (kind, size) is dropped (it may have compiled its bucket), and a later one counts at
        most `OUTLIER` times the running average (a compile, a host stall)."""
        key = (kind, num_seqs)
        if key not in self._seen:
            self._seen.add(key)
            return
        old = self._cost.get(key)
        if old is not None:
            seconds = (1 - COST_WEIGHT) * old + COST_WEIGHT * min(seconds, OUTLIER * old)
        self._cost[key] = seconds

    def cost_ratio(self, num_seqs: int) -> float:
        """What a verify step of `num_seqs` sequences costs in plain steps of as many."""
        plain, verify = self._cost.get(("plain", num_seqs)), self._cost.get(("verify", num_seqs))
        return verify / plain if plain and verify else DEFAULT_COST_RATIO

    def record(self, request_id: str, proposed: int, accepted: int, num_seqs: int = 1) -> None:
        """A verify step of `num_seqs` sequences accepted `accepted` of this sequence's `proposed` drafts."""
        if self.draft is not None:
            self.draft.accepted(request_id, accepted)
        self.proposed_total += proposed
        self.accepted_total += accepted
        if not proposed:
            return
        self.acceptance[accepted] += 1
        gain = 0.5 * self._gain.get(request_id, 1.0 + self.k) + 0.5 * (1 + accepted)
        ratio = self.cost_ratio(num_seqs)
        if gain < ratio:  # its drafts cost more than they save: plain steps for a while
            self._paused[request_id], gain = PAUSE_STEPS, (ratio + 1 + self.k) / 2
        self._gain[request_id] = gain

    def stats(self) -> dict:
        draft = {} if self.draft is None else {"spec_draft_steps_total": self.draft.steps_total}
        return {"spec_method": self.method, "spec_proposed_tokens_total": self.proposed_total, **draft,
                "spec_accepted_tokens_total": self.accepted_total, "spec_verify_steps_total": self.steps_total,
                "spec_acceptance_lengths": list(self.acceptance)}
