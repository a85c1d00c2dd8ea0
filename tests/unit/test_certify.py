"""layercache.certify: exact binomial bounds, fixed-sequence testing, and the promise holding at its stated rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from layercache.certify import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    fixed_sequence,
    requests_needed,
    rows_needed,
)
from layercache.errors import ConfigError


def test_zero_disagreements_have_the_closed_form_bound() -> None:
    # P(0 of n | u) = (1 - u)^n = delta.
    for n in (10, 299, 2100):
        assert clopper_pearson_upper(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    assert clopper_pearson_upper(0, 299, 0.05) < 0.01 < clopper_pearson_upper(0, 298, 0.05)


@pytest.mark.parametrize(("k", "n"), [(1, 50), (6, 2100), (40, 1000)])
def test_the_bounds_are_where_the_binomial_tail_is_delta(k: int, n: int) -> None:
    upper, lower = clopper_pearson_upper(k, n, 0.05), clopper_pearson_lower(k, n, 0.05)
    assert binom.cdf(k, n, upper) == pytest.approx(0.05, rel=1e-6)
    assert binom.sf(k - 1, n, lower) == pytest.approx(0.05, rel=1e-6)
    assert lower < k / n < upper


def test_edge_cases_and_errors() -> None:
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0 and clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(ConfigError, match="0 <= k <= n"):
        clopper_pearson_upper(6, 5, 0.05)
    with pytest.raises(ConfigError, match="delta"):
        clopper_pearson_upper(1, 5, 1.5)


def test_rows_needed_is_the_first_n_that_certifies() -> None:
    assert rows_needed(0.0, 0.01, 0.05) == 299
    n = rows_needed(0.005, 0.01, 0.05)
    assert clopper_pearson_upper(math.ceil(0.005 * n), n, 0.05) <= 0.01
    assert clopper_pearson_upper(math.ceil(0.005 * (n - 1)), n - 1, 0.05) > 0.01
    assert rows_needed(0.0025, 0.01, 0.05) < n < rows_needed(0.0075, 0.01, 0.05)
    assert rows_needed(0.01, 0.01, 0.05) is None  # no number of rows certifies the tolerance itself
    assert requests_needed(0.0, 0.01, 0.05, certify_fraction=0.3) == math.ceil(299 / 0.3)


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    n = 2000  # tolerance 0.01 at delta 0.05 passes up to 12 disagreements of 2000
    assert clopper_pearson_upper(12, n, 0.05) <= 0.01 < clopper_pearson_upper(13, n, 0.05)
    assert fixed_sequence([0, 5, 12, 13, 2], n, 0.01, 0.05) == (2, 4)  # the 2 after the failure is never tested
    assert fixed_sequence([20, 1], n, 0.01, 0.05) == (None, 1)
    assert fixed_sequence([], n, 0.01, 0.05) == (None, 0)


def test_the_promise_breaks_at_most_delta_of_the_time() -> None:
    """Simulated builds: nested candidate cascades of growing true disagreement (a looser threshold disagrees on
    every row a tighter one does, and more), certified on the same fresh rows; the cascade chosen has a true
    disagreement above the tolerance in at most delta of the builds."""
    rng = np.random.default_rng(0)
    tolerance, delta, n, builds = 0.01, 0.1, 1500, 3000
    true = np.linspace(0.002, 0.03, 60)  # the candidates, most conservative first
    broken = 0
    for _ in range(builds):
        u = rng.random(n)  # a row is a disagreement of candidate j when u < true[j]
        observed = (u[:, None] < true[None, :]).sum(axis=0)
        chosen, _ = fixed_sequence(observed.tolist(), n, tolerance, delta)
        broken += chosen is not None and true[chosen] > tolerance
    rate = broken / builds
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / builds), rate
    assert rate > delta / 4  # near the boundary the sequence does go past the tolerance now and then
