"""The n-gram prompt-lookup proposer: exact proposals, preferences, incremental index."""

import numpy as np
import pytest

from hyprjax.engine.spec_propose import NgramProposer
from hyprjax.errors import ConfigError


def _brute(tokens, min_n, max_n, k):
    """Reference: scan every earlier position, latest first, longest n first."""
    size = len(tokens)
    for n in range(min(max_n, size), min_n - 1, -1):
        for end in range(size - 1, n - 1, -1):
            if tokens[end - n:end] == tokens[size - n:]:
                out = []
                for i in range(k):  # copy past the end from the draft itself (overlapping match)
                    out.append(tokens[end + i] if end + i < size else out[i - (size - end)])
                return out
    return []


@pytest.mark.parametrize("tokens,kw,want", [
    ([1, 2, 3, 4, 1, 2], dict(k=3), [3, 4, 1]),
    ([1, 2, 3], {}, []),  # nothing recurs
    ([], {}, []),
    ([9], {}, []),
    # longest match wins over a more recent shorter one: "5 1" -> 7 9 ..., "1" alone -> 8 ...
    ([5, 1, 7, 9, 1, 8, 5, 1], dict(k=3), [7, 9, 1]),
    ([5, 1, 7, 9, 1, 8, 5, 1], dict(max_n=1, k=3), [8, 5, 1]),
    ([5, 1, 7, 9, 1, 8, 5, 1], dict(min_n=3), []),  # no 3-gram recurs
    # the most recent of several occurrences of the same n-gram
    ([1, 2, 1, 3, 1], dict(k=2), [3, 1]),
    ([4, 0, 1, 2, 4, 0, 1, 3, 4, 0, 1], dict(k=1), [3]),
    # k truncates
    ([1, 2, 3, 4, 5, 6, 1], dict(k=2), [2, 3]),
    ([1, 2, 3, 4, 5, 6, 1], dict(k=5), [2, 3, 4, 5, 6]),
    # overlapping matches continue the period
    ([7, 7, 7], dict(k=4), [7, 7, 7, 7]),
    ([1, 2, 1, 2, 1, 2], dict(k=5), [1, 2, 1, 2, 1]),
    ([3, 1, 2, 3, 1, 2, 3], dict(k=4), [1, 2, 3, 1]),
])
def test_exact_proposals(tokens, kw, want):
    assert NgramProposer(**kw).propose(tokens) == want
    assert NgramProposer(**kw).propose(np.asarray(tokens, np.int32)) == want


def test_per_call_k_shortens_the_draft():
    idx = NgramProposer(k=4).index([1, 2, 3, 4, 5, 6, 1])
    assert idx.propose() == [2, 3, 4, 5]
    assert idx.propose(k=2) == [2, 3]


@pytest.mark.parametrize("min_n,max_n,k", [(1, 4, 4), (2, 3, 3), (1, 1, 2), (3, 5, 6)])
def test_incremental_index_equals_from_scratch(min_n, max_n, k):
    rng = np.random.default_rng(min_n * 10 + max_n)
    tokens = rng.integers(0, 5, size=300).tolist()  # small vocabulary: many repeats
    prop = NgramProposer(min_n, max_n, k)
    idx, at = prop.index(tokens[:3]), 3
    while at < len(tokens):
        step = int(rng.integers(1, 4))
        idx.extend(np.asarray(tokens[at:at + step]))
        at = min(at + step, len(tokens))
        assert len(idx) == at
        assert idx.propose() == _brute(tokens[:at], min_n, max_n, k) == prop.propose(tokens[:at])


def test_cheap_at_long_contexts():
    """Each decode step's extend + propose stays O(1) in the context length."""
    import time

    rng = np.random.default_rng(0)
    idx = NgramProposer().index(rng.integers(0, 1000, size=4096))
    t0 = time.perf_counter()
    for t in rng.integers(0, 1000, size=1000):
        idx.extend([int(t)])
        idx.propose()
    per_step = (time.perf_counter() - t0) / 1000
    assert per_step < 1e-3, f"{per_step * 1e6:.0f} us per step"  # measured ~3 us on the 2-core CPU


@pytest.mark.parametrize("kw,match", [
    (dict(min_n=0), "min_n=0"), (dict(max_n=0), "max_n=0"), (dict(k=0), "k=0"),
    (dict(min_n=3, max_n=2), "max_n=2 must be >= min_n=3"), (dict(k=2.0), "k=2.0"), (dict(max_n=True), "max_n=True"),
])
def test_bad_arguments_raise_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        NgramProposer(**kw)


def test_bad_per_call_k():
    with pytest.raises(ConfigError, match="k=0"):
        NgramProposer().index([1, 1]).propose(k=0)
