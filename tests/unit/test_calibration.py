"""Tests for layercache.calibration: temperature scaling and budget thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layercache.calibration import (
    budget_thresholds,
    confidences,
    fit_temperature,
    poisson_upper_bound,
    threshold_for_budget,
)
from layercache.errors import ConfigError

CONF = np.array([0.9, 0.8, 0.8, 0.7, 0.6])
CORRECT = np.array([True, True, False, True, False])


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (0.0, 0.9),  # the 0.8 group holds a wrong row
        (0.19, 0.9),  # 1 wrong / 5 = 0.2 > 0.19
        (0.2, 0.7),  # 1 wrong allowed: 0.8 group and 0.7 both fit
        (0.39, 0.7),
        (0.4, 0.6),  # 2 wrong allowed: every row
        (1.0, 0.6),
    ],
)
def test_threshold_for_budget_exact(budget: float, expected: float) -> None:
    assert threshold_for_budget(CONF, CORRECT, budget) == expected


def test_threshold_ties_are_hit_together() -> None:
    conf = np.array([0.9, 0.9, 0.5])
    correct = np.array([True, False, True])
    # The wrong row shares 0.9 with a right one: 1/3 > 0.2, so nothing can be hit.
    assert threshold_for_budget(conf, correct, 0.2) == math.inf
    assert threshold_for_budget(conf, correct, 0.34) == 0.5


def test_threshold_inf_when_most_confident_row_is_wrong() -> None:
    assert threshold_for_budget(np.array([0.95, 0.5]), np.array([False, True]), 0.1) == math.inf
    # An exactly met budget is allowed.
    assert threshold_for_budget(np.array([0.95, 0.5]), np.array([False, True]), 0.5) == 0.5


def test_threshold_order_independent() -> None:
    perm = np.array([3, 0, 4, 2, 1])
    assert threshold_for_budget(CONF[perm], CORRECT[perm], 0.2) == 0.7


def test_budget_thresholds_halve_the_budget() -> None:
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([True, True, True, False, True, False, True, False])
    # budgets 0.25, 0.125, 0.0625, 0.03125 of 8 rows: 2, 1, 0, 0 wrong rows allowed
    got = budget_thresholds(conf, correct, tolerance=0.5, max_position=4)
    np.testing.assert_array_equal(got, [0.3, 0.5, 0.7, 0.7])


def test_budget_thresholds_match_threshold_for_budget() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(500).round(2)  # rounding makes many ties
    correct = rng.random(500) < conf
    got = budget_thresholds(conf, correct, tolerance=0.05)
    assert got.shape == (12,)
    expected = [threshold_for_budget(conf, correct, 0.05 / 2**n) for n in range(1, 13)]
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.diff(got) >= 0)  # smaller budgets never lower the threshold


def test_threshold_errors() -> None:
    with pytest.raises(ConfigError, match="budget must be >= 0"):
        threshold_for_budget(CONF, CORRECT, -0.1)
    with pytest.raises(ConfigError, match="zero rows"):
        threshold_for_budget(np.array([]), np.array([], dtype=bool), 0.1)
    with pytest.raises(ConfigError, match="rows"):
        threshold_for_budget(CONF, CORRECT[:3], 0.1)


def test_fit_temperature_recovers_known_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(6000, 10, generator=gen) * 2.0
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen).squeeze(1)
    t = fit_temperature(true_logits * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.15)


def test_fit_temperature_stays_in_range() -> None:
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]] * 50)
    labels = logits.argmax(1)
    # Separable rows: sharpening always helps, until the gradient vanishes.
    assert 0.05 <= fit_temperature(logits, labels) < 1.0
    # Labels unrelated to the logits: flattening always helps, up to the clamp.
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 5, generator=gen) * 50
    t = fit_temperature(noise, torch.randint(0, 5, (2000,), generator=gen))
    assert 5.0 < t <= 20.0
    with pytest.raises(ConfigError, match="targets"):
        fit_temperature(logits, labels[:3])


def test_confidences() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])
    conf, pred = confidences(logits, 1.0)
    np.testing.assert_allclose(conf, [0.75, math.exp(2) / (1 + math.exp(2))])
    np.testing.assert_array_equal(pred, [1, 0])
    conf_hot, _ = confidences(logits, 0.5)
    assert conf_hot[0] == pytest.approx(0.9)  # 3**2 / (1 + 3**2)
    with pytest.raises(ConfigError, match="temperature"):
        confidences(logits, 0.0)


def _poisson_cdf(k: int, mean: float) -> float:
    return math.fsum(math.exp(i * math.log(mean) - mean - math.lgamma(i + 1)) for i in range(k + 1))


@pytest.mark.parametrize("z", [1.28, 1.645, 2.5])
def test_poisson_upper_bound_holds_its_level(z: float) -> None:
    counts = np.array([0, 1, 2, 3, 5, 10, 40, 300])
    bound = poisson_upper_bound(counts, z)
    alpha = 0.5 * math.erfc(z / math.sqrt(2))
    for k, u in zip(counts, bound, strict=True):
        assert _poisson_cdf(int(k), float(u)) == pytest.approx(alpha, rel=1e-6)
    assert (np.diff(bound) > 0).all()
    # the normal approximation is below the exact bound at the counts a validation split gives
    assert (bound[:5] > counts[:5] + z * np.sqrt(counts[:5] + 1.0)).all()
    assert poisson_upper_bound(np.array([0]), 1.28)[0] == pytest.approx(-math.log(0.5 * math.erfc(1.28 / math.sqrt(2))))


def test_poisson_upper_bound_errors() -> None:
    with pytest.raises(ConfigError, match="z must be > 0"):
        poisson_upper_bound(np.array([1]), 0.0)
    with pytest.raises(ConfigError, match=">= 0"):
        poisson_upper_bound(np.array([-1]), 1.28)


def test_threshold_margin_uses_the_exact_bound() -> None:
    # 1000 rows by falling confidence, wrong at ranks 10, 20 and 30; budget 0.005 = 5 wrong hits.
    conf = np.linspace(1.0, 0.0, 1000, endpoint=False)
    correct = np.ones(1000, dtype=bool)
    correct[[10, 20, 30]] = False
    assert threshold_for_budget(conf, correct, 0.005) == conf[-1]  # 3 wrong <= 5: every row
    # exact 90% bounds: 1 wrong -> 3.89 <= 5, 2 wrong -> 5.32 > 5 (the normal approximation, 4.22, would allow 2)
    assert threshold_for_budget(conf, correct, 0.005, z=1.28) == conf[19]
    assert threshold_for_budget(conf, correct, 0.0022, z=1.28) == math.inf  # even 0 wrong -> 2.30 > 2.2
    assert threshold_for_budget(conf, correct, 0.0023, z=1.28) == conf[9]
    assert budget_thresholds(conf, correct, 0.01, max_position=2, z=1.28).tolist() == [conf[19], conf[9]]
