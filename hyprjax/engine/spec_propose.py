"""The n-gram (prompt-lookup) proposer for speculative decoding, on the host.

The draft for a request is what followed the last time the sequence's current ending occurred:
find the longest suffix n-gram (max_n down to min_n) of prompt + output that also occurs
earlier, take its most recent earlier occurrence, and propose the k tokens after it.

Cost: the engine asks every request for a draft every decode step, so `NgramIndex` keeps, per n,
a dict from n-gram to the end of its latest occurrence. `extend` costs O(max_n - min_n + 1)
dict writes per token and `propose` O(max_n - min_n + 1) lookups plus k copies, whatever the
context length (from scratch it would be O(length) per step). An n-gram enters its dict one token
late, when the token after it arrives, so the dicts never hold the current suffix itself and a
lookup finds an *earlier* occurrence only.

Overlap: the earlier occurrence may end inside the suffix (in `a b a b a b` the suffix `a b`
last occurred ending one period back). Then fewer than k tokens follow it, and the proposal
keeps copying from its own start, as an LZ77 copy does: the match says the sequence repeats
with period L - end, so the draft continues that period. A match therefore always yields k
tokens, and a repetitive run (where the most recent occurrence is the nearest one) gets a full
draft instead of one token.

Drafts are never written into the index: the engine extends it only with the tokens it emitted
(accepted drafts plus the corrected or bonus token), so a rejected draft needs no rollback here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import ConfigError


def _positive_int(name: str, value, least: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name}={value!r} must be an integer >= {least}")
    return int(value)


class NgramProposer:
    """Prompt-lookup proposer settings: match suffix n-grams of min_n..max_n tokens, draft k."""

    def __init__(self, min_n: int = 1, max_n: int = 4, k: int = 4):
        self.min_n = _positive_int("ngram min_n", min_n)
        self.max_n = _positive_int("ngram max_n", max_n)
        self.k = _positive_int("num_speculative_tokens k", k)
        if self.max_n < self.min_n:
            raise ConfigError(f"ngram max_n={max_n} must be >= min_n={min_n}")

    def index(self, token_ids: Iterable[int] | np.ndarray = ()) -> "NgramIndex":
        """A fresh per-request index over `token_ids` (the prompt), to `extend` as tokens arrive."""
        idx = NgramIndex(self)
        idx.extend(token_ids)
        return idx

    def propose(self, token_ids: Iterable[int] | np.ndarray) -> list[int]:
        """Up to k draft tokens for `token_ids` from scratch (O(length); the engine keeps an index)."""
        return self.index(token_ids).propose()


class NgramIndex:
    """One request's sequence and the latest occurrence of each of its n-grams."""

    def __init__(self, proposer: NgramProposer):
        self.proposer = proposer
        self.tokens: list[int] = []
        # ends[n - min_n][gram] = end index (exclusive) of gram's latest occurrence, suffix excluded
        self._ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(proposer.min_n, proposer.max_n + 1)]

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: Iterable[int] | np.ndarray) -> None:
        """Append tokens (prompt, or the tokens a step emitted)."""
        if isinstance(new_tokens, np.ndarray):
            new_tokens = new_tokens.ravel().tolist()
        toks, lo = self.tokens, self.proposer.min_n
        for t in new_tokens:
            end = len(toks)  # the n-grams ending here stop being the suffix once t arrives
            for n, ends in enumerate(self._ends, start=lo):
                if n > end:
                    break
                ends[tuple(toks[end - n:])] = end
            toks.append(int(t))

    def propose(self, k: int | None = None) -> list[int]:
        """Up to k (default: the proposer's k) draft tokens; [] when no suffix n-gram recurs."""
        k = self.proposer.k if k is None else _positive_int("k", k)
        toks, size, lo = self.tokens, len(self.tokens), self.proposer.min_n
        for n in range(min(self.proposer.max_n, size), lo - 1, -1):
            end = self._ends[n - lo].get(tuple(toks[size - n:]))
            if end is not None:
                period = size - end  # >= 1: the dicts hold no occurrence ending at `size`
                return [toks[end + i % period] for i in range(k)]
        return []
