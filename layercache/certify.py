"""One promise for the whole cache: with probability at least ``1 - delta`` over the logged traffic it saw, the cache
agrees with the backbone on at least ``1 - tolerance`` of traffic like it.

Thresholds and the subset of heads are chosen on one part of the logged rows (the validation split); the chosen
cascade is then *certified* on rows it never saw (the test split) with an exact one-sided binomial bound
(Clopper-Pearson) on its disagreement with the backbone. Several candidate cascades, from the most conservative to
the least, are tested in that fixed order and the testing stops at the first that fails (fixed-sequence testing,
as in Learn-then-Test and Pareto Testing): every cascade tested before the stop passed at level ``delta``, so no
multiplicity correction is needed and the last one that passed is the cache.

Pure math over arrays (scipy for the beta quantiles). Example::

    upper = clopper_pearson_upper(wrong=6, n=2100, delta=0.05)          # 0.0054
    chosen, tested = fixed_sequence([3, 7, 12, 30], n=2100, tolerance=0.01, delta=0.05)   # chosen == 2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from layercache.errors import ConfigError

__all__ = [
    "Certificate",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "excess_evidence",
    "fixed_sequence",
    "requests_needed",
    "rows_needed",
]


def _check(k: int, n: int, delta: float) -> None:
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ConfigError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta} must be in (0, 1), e.g. 0.05")


def clopper_pearson_upper(wrong: int, n: int, delta: float) -> float:
    """Exact one-sided ``1 - delta`` upper confidence bound on a binomial rate from ``wrong`` of ``n``.

    ``P(Binomial(n, u) <= wrong) = delta`` at the bound ``u``; 1.0 for ``n == 0`` or ``wrong == n``.
    """
    _check(wrong, n, delta)
    if n == 0 or wrong >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(1.0 - delta, wrong + 1, n - wrong))


def clopper_pearson_lower(wrong: int, n: int, delta: float) -> float:
    """Exact one-sided ``1 - delta`` lower confidence bound on a binomial rate; 0.0 for ``wrong == 0``."""
    _check(wrong, n, delta)
    if n == 0 or wrong == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(delta, wrong, n - wrong + 1))


def excess_evidence(wrong: int, n: int, bound: float) -> float:
    """Log e-value against "the rate is at most ``bound``" from ``wrong`` of ``n`` Bernoulli outcomes.

    The likelihood of the outcomes under a rate drawn uniformly from ``[bound, 1]``, over their likelihood at
    ``bound``. For every rate ``q >= bound`` that ratio, one outcome at a time, is a nonnegative supermartingale
    under any true rate ``p <= bound`` (its mean factor ``q p / bound + (1 - q)(1 - p) / (1 - bound)`` is at most
    1), and so is their mixture. By Ville's inequality, the chance that it *ever* reaches ``log(1 / alpha)``, looked
    at after every outcome, is at most ``alpha``: a test that may stop as soon as the evidence is in (3 wrong of 3
    at a bound of 2% already give ``log e = 10.3``), with no correction for how often it looks.
    ``-inf`` when ``bound >= 1`` (nothing exceeds it); ``inf`` for a wrong outcome at ``bound <= 0``.
    """
    _check(wrong, n, 0.5)
    if bound >= 1.0 or n == 0:
        return -math.inf if bound >= 1.0 else 0.0
    if bound <= 0.0:
        return math.inf if wrong else 0.0
    from scipy.special import betainc, betaln

    # integral over [bound, 1] of q^wrong (1 - q)^(n - wrong) dq = B(wrong + 1, n - wrong + 1) * I_{1-bound}(...)
    tail = float(betainc(n - wrong + 1, wrong + 1, 1.0 - bound))
    if tail <= 0.0:
        return -math.inf
    mixture = betaln(wrong + 1, n - wrong + 1) + math.log(tail) - math.log1p(-bound)
    null = wrong * math.log(bound) + (n - wrong) * math.log1p(-bound)
    return float(mixture - null)


def rows_needed(rate: float, tolerance: float, delta: float, limit: int = 10_000_000) -> int | None:
    """Fewest certification rows on which a cascade disagreeing on ``rate`` of them would be certified.

    With ``k = ceil(rate * n)`` disagreements among ``n`` rows, the smallest ``n`` whose upper bound is at most
    ``tolerance``; None when ``rate >= tolerance`` (no number of rows certifies it) or beyond ``limit``.
    """
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance={tolerance} must be in (0, 1)")
    if rate < 0 or rate >= tolerance:
        return None

    def ok(n: int) -> bool:
        return clopper_pearson_upper(min(n, math.ceil(rate * n - 1e-9)), n, delta) <= tolerance

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while lo + 1 < hi:  # ok(hi), not ok(lo): the first ok is in (lo, hi]
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def requests_needed(rate: float, tolerance: float, delta: float, certify_fraction: float) -> int | None:
    """Logged requests a build needs so that its certification split (``certify_fraction`` of them) is large
    enough for a cascade that disagrees on ``rate`` (see :func:`rows_needed`)."""
    n = rows_needed(rate, tolerance, delta)
    return None if n is None else math.ceil(n / certify_fraction)


def fixed_sequence(disagreements: Sequence[int], n: int, tolerance: float, delta: float) -> tuple[int | None, int]:
    """Test candidates in the given order (most conservative first); stop at the first whose upper bound on
    disagreement exceeds ``tolerance``.

    Args:
        disagreements: per candidate, rows of the ``n`` certification rows where it disagrees with the backbone.

    Returns:
        ``(index of the last candidate that passed or None, candidates tested)``.
    """
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance={tolerance} must be in (0, 1)")
    chosen = None
    tested = 0
    for i, k in enumerate(disagreements):
        tested += 1
        if clopper_pearson_upper(int(k), n, delta) > tolerance:
            break
        chosen = i
    return chosen, tested


@dataclass(frozen=True)
class Certificate:
    """The promise a build states and checked (written into the cache and the report).

    Attributes:
        rule: ``certified`` (this module) or ``per-head`` (each head's own Poisson bound, no cache-wide promise).
        tolerance, delta: the promise: agreement >= 1 - tolerance with probability >= 1 - delta.
        rows: certification rows (never used to train, calibrate or choose the cascade).
        disagreements: rows among them where the chosen cascade disagrees with the backbone.
        observed: ``disagreements / rows``.
        upper_bound: the one-sided ``1 - delta`` Clopper-Pearson bound on the disagreement.
        passed: whether ``upper_bound <= tolerance`` (False also when no cascade could be certified).
        candidates_tested: how many candidate cascades the fixed sequence tested.
        requests_needed: when no cascade passed, logged requests a build would need for the most conservative
            candidate to pass at its observed disagreement (None when no number would do).
    """

    rule: str
    tolerance: float
    delta: float
    rows: int
    disagreements: int
    observed: float
    upper_bound: float
    passed: bool
    candidates_tested: int = 0
    requests_needed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
