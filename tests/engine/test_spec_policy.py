"""When a sequence's drafts stop paying (engine/speculative.py): the measured cost of a verify
step in plain steps against the sequence's tokens per verify step."""

from __future__ import annotations

import pytest

from hyprjax.engine.config import EngineConfig
from hyprjax.engine.speculative import DEFAULT_COST_RATIO, PAUSE_STEPS, Speculator


def _spec(k=7):
    return Speculator(EngineConfig(speculative="ngram", num_speculative_tokens=k))


def _verify_until_paused(spec, accepted, num_seqs=1, limit=50) -> int | None:
    """Verify steps that accept `accepted` of K drafts each, until the request pauses; how many ran
    (None: it never paused)."""
    for n in range(1, limit + 1):
        spec.record("r", spec.k, accepted, num_seqs)
        if spec.wanted("r", room=100) == 0:
            return n
    return None


def test_the_cost_ratio_is_measured_and_the_first_run_of_each_kind_is_dropped():
    spec = _spec()
    assert spec.cost_ratio(1) == DEFAULT_COST_RATIO
    spec.observe("plain", 1, 5.0)  # a first run may have compiled: dropped
    spec.observe("verify", 1, 9.0)
    assert spec.cost_ratio(1) == DEFAULT_COST_RATIO
    spec.observe("plain", 1, 0.010)
    spec.observe("verify", 1, 0.030)
    assert spec.cost_ratio(1) == pytest.approx(3.0)
    spec.observe("plain", 1, 0.006)  # a running average: 0.75 * 0.010 + 0.25 * 0.006
    assert spec.cost_ratio(1) == pytest.approx(0.030 / 0.009)
    spec.observe("verify", 1, 3.0)  # a stall counts as 3x the average at most
    assert spec.cost_ratio(1) == pytest.approx((0.75 * 0.030 + 0.25 * 0.090) / 0.009)
    assert spec.cost_ratio(2) == DEFAULT_COST_RATIO  # each batch size has its own


@pytest.mark.parametrize("plain_s, verify_s, accepted, pauses", [
    (0.010, 0.015, 1, False),  # 2 tokens per verify step that costs 1.5 plain steps: pays
    (0.010, 0.030, 1, True),   # ... that costs 3: pauses
    (0.010, 0.030, 3, False),  # 4 tokens against 3
    (0.010, 0.050, 3, True),   # 4 tokens against 5
])
def test_a_sequence_pauses_when_its_tokens_per_verify_step_fall_below_the_ratio(plain_s, verify_s, accepted,
                                                                                 pauses):
    spec = _spec()
    for kind, seconds in (("plain", plain_s), ("verify", verify_s)):
        for _ in range(2):
            spec.observe(kind, 1, seconds)
    ran = _verify_until_paused(spec, accepted)
    assert (ran is not None) == pauses
    if pauses:
        assert 2 <= ran <= 5  # the average starts at 1 + K and halves its distance each step
        assert all(spec.wanted("r", room=100) == 0 for _ in range(PAUSE_STEPS - 1))
        assert spec.wanted("r", room=100) == spec.k  # then it tries again
        # from an even start: one more poor step does not pause it at once
        spec.record("r", spec.k, accepted)
        assert spec.wanted("r", room=100) == spec.k


def test_the_ratio_of_the_verify_steps_own_batch_size_decides():
    spec = _spec()
    for kind, size, seconds in (("plain", 1, 0.01), ("verify", 1, 0.04), ("plain", 2, 0.01), ("verify", 2, 0.015)):
        for _ in range(2):
            spec.observe(kind, size, seconds)
    assert _verify_until_paused(spec, 1, num_seqs=2) is None  # 2 tokens against 1.5 plain steps
    assert _verify_until_paused(spec, 1, num_seqs=1) is not None  # against 4


def test_no_drafts_proposed_changes_nothing():
    spec = _spec()
    spec.record("r", 0, 0)
    assert spec.wanted("r", room=100) == spec.k and spec.proposed_total == 0
    assert spec.wanted("r", room=3) == 3 and spec.wanted("r", room=-1) == 0
