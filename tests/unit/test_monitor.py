"""layercache.monitor: the guard's sequential test acts on few verified answers and keeps its false-trip promise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layercache import monitor
from layercache.certify import excess_evidence
from layercache.monitor import EPOCH, HeadMonitor


def _feed(head: HeadMonitor, wrong: np.ndarray, guard: str = "disable", batch: int = 8) -> int | None:
    """Feed verified answers (True = disagreed) in batches; the answer count at which the guard fired, or None."""
    for start in range(0, len(wrong), batch):
        w = wrong[start : start + batch]
        head.add(np.linspace(0.5, 1.0, len(w)).tolist(), (~w).tolist())
        if head.trip(guard) is not None:
            return start + len(w)
    return None


def test_a_head_whose_verified_answers_are_all_wrong_is_disabled_after_a_handful() -> None:
    # Certified for 2% disagreement: 3 wrong answers of 3 are already e^10 against it (the guard trips at 2000).
    head = HeadMonitor("layer1", bound=0.02, threshold=0.5)
    assert _feed(head, np.ones(100, dtype=bool), batch=1) == 3
    assert head.state == "disabled" and math.isinf(head.threshold)
    assert "3 of its 3 latest verified answers disagreed" in head.reason


def test_the_evidence_is_the_closed_form_mixture() -> None:
    # wrong == n: integral of q^n over [b, 1] is (1 - b^(n+1)) / (n + 1); divided by (1 - b) b^n.
    b, n = 0.05, 4
    expected = math.log((1 - b ** (n + 1)) / (n + 1) / (1 - b) / b**n)
    assert excess_evidence(n, n, b) == pytest.approx(expected, rel=1e-9)
    assert excess_evidence(0, 500, 0.05) < 0 < excess_evidence(60, 500, 0.05)
    assert excess_evidence(3, 10, 1.0) == -math.inf and excess_evidence(1, 10, 0.0) == math.inf


def test_a_head_within_its_bound_trips_at_most_guard_delta_of_the_time_however_often_it_is_looked_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At delta 0.1 (so the simulation can see it), heads exactly at their 3% bound, looked at after every batch of
    # 4 for 2,500 verified answers (3 epochs): the share that ever trips stays under 0.1 (plus 3 standard errors).
    monkeypatch.setattr(monitor, "GUARD_DELTA", 0.1)
    rng = np.random.default_rng(0)
    streams = 300
    tripped = sum(
        _feed(HeadMonitor("h", bound=0.03, threshold=0.5), rng.random(2500) < 0.03, batch=4) is not None
        for _ in range(streams)
    )
    assert tripped / streams <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / streams)


def test_a_head_three_times_over_its_bound_is_caught_and_one_that_goes_wrong_late_as_well() -> None:
    rng = np.random.default_rng(1)
    when = [_feed(HeadMonitor("h", bound=0.02, threshold=0.5), rng.random(EPOCH) < 0.06) for _ in range(40)]
    assert sum(w is not None for w in when) >= 36 and np.median([w for w in when if w]) < 600
    # Good for 5 epochs, then every other answer wrong: caught within 20 answers of the change.
    head = HeadMonitor("h", bound=0.02, threshold=0.5)
    assert _feed(head, np.zeros(5 * EPOCH, dtype=bool)) is None and head.epoch == 6
    late = _feed(head, np.arange(200) % 2 == 0)
    assert late is not None and late <= 24


def test_raise_chooses_a_threshold_on_enough_answers_and_disables_on_too_few() -> None:
    # Enough answers: the wrong ones are the least confident, so a threshold above them keeps the head.
    head = HeadMonitor("h", bound=0.05, threshold=0.1)
    conf = np.linspace(0.1, 1.0, 200)
    wrong = conf < 0.4
    head.add(conf.tolist(), (~wrong).tolist())
    assert head.trip("raise") is not None and head.state == "raised" and 0.3 < head.threshold < 1.0
    kept = conf > head.threshold  # what the raised head still answers: within half its bound on these answers
    assert wrong[kept].sum() <= 0.025 * kept.sum() and kept.sum() >= monitor.MIN_RAISE
    assert head.epoch == 2 and head.epoch_verified == 0  # the raised head is weighed afresh
    few = HeadMonitor("h", bound=0.05, threshold=0.1)
    assert _feed(few, np.ones(10, dtype=bool), guard="raise", batch=1) is not None and few.state == "disabled"


def test_guard_off_reports_once_and_keeps_answering() -> None:
    head = HeadMonitor("h", bound=0.02, threshold=0.5)
    assert _feed(head, np.ones(50, dtype=bool), guard="off") is None
    assert head.state == "active" and head.threshold == 0.5 and "disagreed" in head.reason


def test_a_rare_head_gets_a_larger_verification_share_within_the_base_budget() -> None:
    from layercache.monitor import CacheMonitor

    monitor = CacheMonitor(model=None, heads=[HeadMonitor(f"h{i}", 0.02, 0.5) for i in range(4)], tolerance=0.01,
                           guard="disable")  # fmt: skip
    assert monitor.verify_shares(0.1) == [0.1] * 4  # no hits yet
    for head in monitor.heads:
        head.hits = 250
    assert monitor.verify_shares(0.1) == pytest.approx([0.1] * 4)  # even hits: every head at the base
    hits = (900, 80, 15, 5)
    for head, n in zip(monitor.heads, hits, strict=True):
        head.hits = n
    shares = monitor.verify_shares(0.1)
    verified = [s * n for s, n in zip(shares, hits, strict=True)]
    # verify_fraction is the cost it says: at most 0.1 of the 1,000 hits are verified (the old rule verified 135).
    assert sum(verified) <= 0.1 * 1000 + 1e-9
    # The rare heads' shares are raised, the commonest head's is lowered, and every head gets at least half of
    # what an even split of the verified answers over the heads (25) or over the hits (0.1 of its own) gives it.
    assert shares[0] < 0.1 < shares[1] < shares[2] < shares[3] == 1.0
    for n, v in zip(hits, verified, strict=True):
        assert v >= min(n, 0.5 * 25) - 1e-9 and v >= 0.5 * 0.1 * n - 1e-9
    assert monitor.verify_shares(0.0) == [0.0] * 4  # verification off stays off


def test_a_disabled_head_leaves_the_verification_budget_to_the_heads_that_still_answer() -> None:
    from layercache.monitor import CacheMonitor

    monitor = CacheMonitor(model=None, heads=[HeadMonitor(f"h{i}", 0.02, 0.5) for i in range(2)], tolerance=0.01,
                           guard="disable")  # fmt: skip
    monitor.heads[0].hits, monitor.heads[1].hits = 300, 100
    monitor.heads[0].state = "disabled"
    # Every hit from now on is head 1's: it is verified at the base, not at 1.5x (the old rule counted head 0's
    # 300 past hits and its half of the split, and spent 0.15 of the hits at a budget of 0.1).
    assert monitor.verify_shares(0.1) == pytest.approx([0.0, 0.1])
    monitor.heads[0].hits, monitor.heads[1].hits = 100, 300
    assert monitor.verify_shares(0.1) == pytest.approx([0.0, 0.1])  # and not at 0.83x
    monitor.heads[1].state = "disabled"
    assert monitor.verify_shares(0.1) == [0.0, 0.0]
