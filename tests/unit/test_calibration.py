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
