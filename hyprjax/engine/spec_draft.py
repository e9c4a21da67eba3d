"""Draft-model proposals for speculative decoding (`--speculative draft:PATH`).

A second, smaller model that shares the target's tokenizer proposes each sequence's next K
tokens, greedily; the target verifies them in one step (runner.run_spec) by drawing each
position's token from its own distribution with the plain sampler's key and accepting while the
draws equal the drafts. That is exact for any proposal (spec_verify.py), so greedy and seeded
requests give the tokens they give without speculation. llama.cpp's speculative decoding
verifies the same way (greedy drafts, target samples compared); the Leviathan/Chen rule
(accept with min(1, p/q)) accepts more drafts at high temperature but gives different tokens for
a seed, and would ship the draft's full distributions to the verify step.

**The draft's KV** lives in a pool of its own with as many pages as the target's, addressed by
the target's page tables: a sequence's draft K/V sits in the same page ids as its target K/V.
The block manager allocates, frees and preempts both at once, and no second allocator exists.
What the draft has computed is tracked per request (`_done`: tokens whose draft K/V is written,
and the sequence's preemption count then); a proposal first feeds the draft what it has not
seen (the whole prompt the first time, one or two tokens after a verify step, several after
steps without drafts), then runs K - 1 one-token steps. A preempted sequence (its pages were
freed) starts again from its first token, and so does a new one whose prompt hit the prefix
cache: the draft pool of a cached page may never have been written (a request that did not
speculate), so only pages a sequence's own draft wrote are trusted.

After a verify step that accepted a of k drafts, the draft K/V of the sequence's tokens is valid
through position n + min(a, k - 1) - 1, n being the sequence's length at the proposal: the
draft fed d_1..d_{k-1}, and the accepted ones are the sequence's tokens there.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from ..errors import HyprjaxError
from .config import EngineConfig, draft_source
from .runner import _GREEDY, ModelRunner, RowRequest

log = logging.getLogger("hyprjax.engine")

_PROBES = ("The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n",
           "Speculative decoding: naïve café, 東京, 🙂.")


def check_same_tokenizer(target, draft, target_vocab: int, draft_vocab: int, path: str) -> None:
    """HyprjaxError unless the draft tokenizes as the target does (its drafts would be nonsense)."""
    if target is None or draft is None:
        same = target_vocab == draft_vocab
    else:
        same = target.vocab_size == draft.vocab_size and all(target.encode(t, add_special_tokens=False)
                                                 == draft.encode(t, add_special_tokens=False) for t in _PROBES)
    if not same:
        raise HyprjaxError(f"draft model {path}: its tokenizer differs from the target model's; a draft model must "
                           "share the target's tokenizer (the same family, e.g. a smaller Qwen3 for a Qwen3)")


def load_draft(ecfg: EngineConfig, tokenizer, cfg, dtype):
    """Load `ecfg.speculative`'s draft model (GGUF or SafeTensors, quantized as `auto` would:
    int8 on CPU for a quantized GGUF) in the target's float dtype, and check its tokenizer."""
    import jax.numpy as jnp

    from ..formats.load import load_model

    path = draft_source(ecfg.speculative)
    log.info("loading draft model %s", path)
    loaded = load_model(path, dtype=jnp.dtype(dtype).name, progress=False, quantization="auto",
                        with_tokenizer=tokenizer is not None)  # token ids only: compare vocabularies
    check_same_tokenizer(tokenizer, loaded.tokenizer, cfg.vocab_size, loaded.cfg.vocab_size, path)
    return loaded


def _span(seq, start: int, stop: int) -> list[int]:
    """Tokens start..stop-1 of prompt + output, without copying the whole sequence each step."""
    p = seq.prompt_token_ids
    return (p[start:stop] + seq.output_token_ids[max(start - len(p), 0):max(stop - len(p), 0)])


class DraftModel:
    """A draft model's runner (own weights and KV pool, the target's page ids) and progress."""

    def __init__(self, model, cfg, ecfg: EngineConfig, *, num_pages: int, max_model_len: int, backend: str,
                 interpret: bool = False):
        self.k = ecfg.num_speculative_tokens
        groups = max(1, ecfg.spec_buckets()[-1] // (self.k + 1))  # sequences in a verify step, at most
        # Slots index only the draft runner's penalty tables, which greedy drafts never read: a
        # group's row number serves. Its buckets: up to `groups` decode rows and the target's
        # prefill chunks (the catch-up of a prompt).
        self.ecfg = replace(ecfg, speculative=None, max_loras=0, max_sparse_rank=0, max_block_rank=0,
                            max_num_seqs=groups, max_prefill_seqs=min(groups, ecfg.max_prefill_seqs),
                            num_pages=num_pages, enable_prefix_caching=False)
        self.cfg, self.max_model_len = cfg, max_model_len
        self.runner = ModelRunner(model, cfg, self.ecfg, num_pages=num_pages, max_model_len=max_model_len,
                                  backend=backend, interpret=interpret)
        self._done: dict[str, tuple[int, int]] = {}  # request -> (tokens with draft K/V, its preemptions then)
        self._out: dict[str, tuple[int, int]] = {}  # request -> (its length n, k) of the drafts out for verifying
        self.steps_total = 0  # draft model steps run

    def warmup(self, progress: bool) -> int:
        return self.runner.warmup(self.max_model_len, progress)

    def propose(self, items: list[tuple[object, int]]) -> list[list[int]]:
        """k greedy drafts for each (sequence, k), k >= 1; the sequence holds pages for 1 + k more
        tokens (the draft writes its K/V for d_1..d_{k-1} there). At most `groups` items."""
        seqs = [seq for seq, _ in items]
        lens = [seq.num_tokens for seq in seqs]
        done = []
        for seq in seqs:
            at, preemptions = self._done.get(seq.request_id, (0, seq.num_preemptions))
            done.append(at if preemptions == seq.num_preemptions else 0)
        drafts: list[list[int]] = [[] for _ in items]
        budget = self.ecfg.max_num_batched_tokens
        while True:  # catch up: feed each sequence what its draft has not seen; the last token samples d_1
            decodes, prefills, fed = [], [], []
            left = budget
            for i, seq in enumerate(seqs):
                n = lens[i]
                if done[i] == n - 1 and left > 0:
                    decodes.append(self._row(i, seq, _span(seq, n - 1, n), n - 1, True))
                    fed.append((i, 1))
                    left -= 1
            for i, seq in enumerate(seqs):
                n = lens[i]
                if n - done[i] > 1 and left > 0 and len(prefills) < self.ecfg.max_prefill_seqs:
                    m = min(n - done[i], left)
                    prefills.append(self._row(i, seq, _span(seq, done[i], done[i] + m), done[i], done[i] + m == n))
                    fed.append((i, m))
                    left -= m
            if not fed:
                break
            res = self.runner.run(decodes, prefills)
            self.steps_total += 1
            for row, (i, m) in enumerate(fed):
                done[i] += m
                if done[i] == lens[i]:
                    drafts[i].append(int(res.tokens[row]))
        for j in range(1, max(k for _, k in items)):  # d_{j+1} from d_j at position n + j - 1
            live = [i for i, (_, k) in enumerate(items) if k > j]
            rows = [self._row(i, seqs[i], [drafts[i][-1]], lens[i] + j - 1, True) for i in live]
            res = self.runner.run(rows, [])
            self.steps_total += 1
            for row, i in enumerate(live):
                drafts[i].append(int(res.tokens[row]))
        for i, (seq, k) in enumerate(items):
            n = lens[i]
            self._done[seq.request_id] = (n, seq.num_preemptions)
            self._out[seq.request_id] = (n, k)
        return drafts

    def _row(self, i: int, seq, token_ids: list[int], start: int, samples: bool) -> RowRequest:
        return RowRequest(list(token_ids), start, list(seq.block_table), i, samples, 0, _GREEDY,
                          np.zeros(2, np.uint32), False)

    def accepted(self, request_id: str, accepted: int) -> None:
        """The verify step accepted `accepted` of the request's drafts: the draft K/V of the ones it
        fed (d_1..d_{k-1}) that were accepted are the sequence's own now."""
        out = self._out.pop(request_id, None)
        entry = self._done.get(request_id)
        if out is None or entry is None:
            return
        n, k = out
        self._done[request_id] = (n + min(accepted, k - 1), entry[1])

    def forget(self, request_id: str | None = None) -> None:
        """Drop one request's progress, or every request's (None: the pool was rebuilt)."""
        if request_id is None:
            self._done.clear()
            self._out.clear()
        else:
            self._done.pop(request_id, None)
            self._out.pop(request_id, None)
