"""Confidence calibration and confidence thresholds from an accuracy-drop budget (paper 4.3).

Pure math over tensors and arrays. Calibration targets are the *backbone's* predicted classes,
never ground truth: a head is "correct" when it agrees with the backbone.

Example::

    t = fit_temperature(val_logits, backbone_pred)
    conf, pred = confidences(val_logits, t)
    thresholds = budget_thresholds(conf, pred == backbone_pred.numpy(), tolerance=0.01)
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from layercache.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "budget_thresholds",
    "confidences",
    "fit_temperature",
    "poisson_upper_bound",
    "threshold_for_budget",
]

#: Range the fitted temperature is clamped to.
T_MIN, T_MAX = 0.05, 20.0

# Budgets are compared as counts (#incorrect <= budget * N); this slack absorbs float rounding
# of budget * N (e.g. 0.07 * 100) without admitting a whole extra error.
_COUNT_SLACK = 1e-9


def fit_temperature(logits: Tensor, target: Tensor) -> float:
    """Temperature scaling (Guo et al. 2017) of a head's logits.

    Minimises the cross-entropy of ``logits / T`` against ``target`` (the backbone's predicted
    class per row) over ``log T`` with LBFGS, in float64.

    Args:
        logits: ``(N, num_classes)`` head logits on the validation split.
        target: ``(N,)`` backbone class indices.

    Returns:
        ``T`` clamped to ``[0.05, 20]``; 1.0 if the optimisation does not give a finite value.

    Raises:
        ConfigError: on empty or mismatched inputs.
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ConfigError(f"fit_temperature needs (N, num_classes) logits with N > 0, got {tuple(logits.shape)}")
    target = torch.as_tensor(target).long().reshape(-1)
    if target.shape[0] != logits.shape[0]:
        raise ConfigError(f"fit_temperature got {logits.shape[0]} logit rows but {target.shape[0]} targets")
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    lo, hi = math.log(T_MIN), math.log(T_MAX)

    def closure() -> Tensor:
        optimizer.zero_grad()
        # Clamping inside keeps the line search away from overflow at extreme temperatures.
        loss = F.cross_entropy(z / log_t.clamp(lo - 1.0, hi + 1.0).exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach())
    if not math.isfinite(value):
        logger.warning("temperature fit did not converge; using T = 1")
        return 1.0
    return float(min(max(math.exp(value), T_MIN), T_MAX))


def confidences(logits: Tensor, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated confidence and predicted class per row.

    Returns:
        ``(conf, pred)``: max of ``softmax(logits / temperature)`` as float64, and argmax as int64.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.detach().double() / temperature, dim=1)
    conf, pred = probs.max(dim=1)
    return conf.numpy().astype(np.float64), pred.numpy().astype(np.int64)


def _budget_curve(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct confidences (descending) and #incorrect among rows with conf >= each."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if conf.shape != correct.shape:
        raise ConfigError(f"conf has {conf.size} rows but correct has {correct.size}")
    if conf.size == 0:
        raise ConfigError("cannot choose a threshold from zero rows; the validation split is empty")
    if np.isnan(conf).any():
        raise ConfigError("conf contains NaN; check the head's logits")
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    cum_wrong = np.cumsum(~correct[order])
    # Ties are hit together: keep the last row of each group of equal confidence.
    last = np.r_[sorted_conf[1:] != sorted_conf[:-1], True]
    return sorted_conf[last], cum_wrong[last], conf.size


def poisson_upper_bound(counts: np.ndarray, z: float) -> np.ndarray:
    """Exact one-sided upper confidence bound on a Poisson mean from each observed count (Garwood 1936).

    The level is that of a standard normal ``z`` (1.28: 90%, 1.645: 95%): the bound ``u`` of count ``k`` solves
    ``P(X <= k | mean u) = 1 - Phi(z)``. Unlike the normal approximation ``k + z * sqrt(k + 1)``, it holds its level
    at the small counts a validation split gives (k = 0 at 90%: 2.30, not 1.28; k = 3: 6.68, not 5.56).

    Args:
        counts: non-negative integer counts, any shape.
        z: > 0.

    Returns:
        float64 bounds of the same shape, increasing in the count.
    """
    if not z > 0:
        raise ConfigError(f"confidence margin z must be > 0 for a bound, got {z}")
    k = np.asarray(counts, dtype=np.float64)
    if (k < 0).any():
        raise ConfigError("counts must be >= 0")
    alpha = 0.5 * math.erfc(z / math.sqrt(2.0))
    shape = torch.from_numpy(k + 1.0)
    lo = torch.from_numpy(k.copy())
    hi = lo + 2.0 * (z + 2.0) * torch.sqrt(lo + 1.0) + 2.0 * (z + 2.0) ** 2  # P(X <= k | hi) < alpha
    # P(X <= k | mean u) = Q(k + 1, u), the regularised upper incomplete gamma, falls as u grows: bisect.
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = torch.special.gammaincc(shape, mid) > alpha
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return hi.numpy()


def _wrong_bound(wrong: np.ndarray, z: float) -> np.ndarray:
    """The wrong-hit count per level as the thresholds count it: its upper confidence bound for ``z`` > 0.

    The threshold is chosen on a finite validation split, and unseen traffic should still stay within the budget.
    Exact, not k + z*sqrt(k + 1): at the handful of wrong hits a budget allows, the normal approximation let a head
    overrun its budget on unseen images (BENCHMARKS.md, Notes).
    """
    if z < 0:
        raise ConfigError(f"confidence margin z must be >= 0, got {z}")
    return poisson_upper_bound(wrong, z) if z > 0 else wrong


def _threshold(levels: np.ndarray, ucb: np.ndarray, n: int, budget: float) -> float:
    if budget < 0 or math.isnan(budget):
        raise ConfigError(f"accuracy-drop budget must be >= 0, got {budget}")
    # ucb is non-decreasing as the threshold falls, so the feasible levels are a prefix.
    feasible = int(np.searchsorted(ucb, budget * n + _COUNT_SLACK, side="right"))
    return math.inf if feasible == 0 else float(levels[feasible - 1])


def threshold_for_budget(conf: np.ndarray, correct: np.ndarray, budget: float, z: float = 0.0) -> float:
    """Smallest threshold whose expected accuracy drop (Eq. 3) stays within ``budget``.

    At threshold ``t`` the rows with ``conf >= t`` are hits, and the drop bound is
    ``HR(t) * (1 - CA(t)) = #(hits with correct == False) / N``. Candidates are the observed
    confidences; rows with equal confidence are hit together.

    Args:
        conf: ``(N,)`` calibrated confidences.
        correct: ``(N,)`` whether the head agrees with the backbone.
        budget: Allowed drop as a fraction of ``N`` (e.g. 0.005 for half a point).
        z: safety margin: the wrong-hit count ``w`` is replaced by its exact Poisson upper confidence bound at the
            level of a standard normal ``z`` (:func:`poisson_upper_bound`; 1.28 = 90%); 0 = Eq. 3 as is.

    Returns:
        The threshold, or ``math.inf`` if even the most confident group exceeds the budget.

    Raises:
        ConfigError: on empty/mismatched inputs or a negative budget.
    """
    levels, wrong, n = _budget_curve(conf, correct)
    return _threshold(levels, _wrong_bound(wrong, z), n, budget)


def budget_thresholds(
    conf: np.ndarray, correct: np.ndarray, tolerance: float, max_position: int = 12, z: float = 0.0
) -> np.ndarray:
    """Thresholds of one head for each cascade position (paper 4.3: budget ``T / 2**n``).

    Returns:
        ``(max_position,)`` float64 array; entry ``n - 1`` is
        ``threshold_for_budget(conf, correct, tolerance / 2**n)`` for 1-based position ``n``.
    """
    if max_position < 1:
        raise ConfigError(f"max_position must be >= 1, got {max_position}")
    levels, wrong, n = _budget_curve(conf, correct)
    ucb = _wrong_bound(wrong, z)  # once for every position
    return np.array(
        [_threshold(levels, ucb, n, tolerance / 2**pos) for pos in range(1, max_position + 1)],
        dtype=np.float64,
    )
