"""Choosing the subset of cache heads (paper 4.4, Eq. 4) and simulating the cascade.

Pure math over recorded per-row predictions: no model is run. ``heads`` are always given in
depth order (shallowest node first); a subset is a tuple of indices into ``heads``.

Cost model (costs in FLOPs or seconds per row; ``B`` is the whole backbone's cost, ``C1`` a
head's own cost, ``C2`` the backbone's cost after the head's node):

* a row that exits at the k-th chosen head pays ``(B - C2_k) + sum(C1_1 .. C1_k)``;
* a row that no head takes pays ``B + sum of C1`` over all chosen heads.

With this model ``mean_cost = B - K(S) / N`` exactly, where ``K`` is :func:`subset_score`.

Example::

    selection = best_subset(head_evals)
    result = evaluate_cascade(head_evals, selection, backbone_pred, labels, backbone_cost)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layercache.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CascadeResult",
    "ExitStats",
    "HeadEval",
    "Selection",
    "best_subset",
    "evaluate_cascade",
    "hindsight_thresholds",
    "oracle_cost",
    "subset_score",
]

# Relative tolerance under which two subset scores count as tied.
_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class HeadEval:
    """Recorded behaviour of one trained, calibrated head on the evaluation split.

    Attributes:
        node: Candidate node name (torch.fx name).
        conf: ``(N,)`` calibrated confidence per row.
        pred: ``(N,)`` the head's predicted class per row.
        thresholds: ``(max_position,)`` threshold when the head is the n-th chosen one
            (from ``calibration.budget_thresholds``).
        cost_head: ``C1``, the head's own cost per row.
        cost_rest: ``C2``, the backbone's cost per row after this node.
    """

    node: str
    conf: np.ndarray
    pred: np.ndarray
    thresholds: np.ndarray
    cost_head: float
    cost_rest: float


@dataclass(frozen=True)
class Selection:
    """A chosen subset: head indices in depth order, its K score, and the threshold of each."""

    subset: tuple[int, ...]
    score: float
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class ExitStats:
    """One exit of a simulated cascade (paper Table 2).

    Attributes:
        node: The head's node.
        threshold: Threshold used at its position.
        hit_rate: Hits at this exit over all ``N`` rows.
        cache_accuracy: Fraction of its hits that agree with the backbone (NaN with no hits).
        gt_accuracy: Fraction of its labelled hits that match the label (None without labels,
            NaN with no labelled hits).
        accuracy_effect: Eq. 2 as a drop: ``(#hits backbone right & head wrong - #hits backbone
            wrong & head right) / N_labelled``; positive means accuracy lost. None without labels.
        hits: Number of rows that exit here.
    """

    node: str
    threshold: float
    hit_rate: float
    cache_accuracy: float
    gt_accuracy: float | None
    accuracy_effect: float | None
    hits: int


@dataclass(frozen=True)
class CascadeResult:
    """Outcome of :func:`evaluate_cascade`.

    Attributes:
        exits: Per chosen head, in order.
        exit_index: ``(N,)`` position in the subset where each row exited, -1 for the backbone.
        final_pred: ``(N,)`` the answered class.
        agreement: Fraction of rows whose answer equals the backbone's.
        mean_cost: Mean cost per row under the module's cost model.
        backbone_cost: Cost per row without caching.
        gt_accuracy_backbone: Backbone accuracy on labelled rows (None without labels).
        gt_accuracy_cached: Cascade accuracy on labelled rows (None without labels).
    """

    exits: tuple[ExitStats, ...]
    exit_index: np.ndarray
    final_pred: np.ndarray
    agreement: float
    mean_cost: float
    backbone_cost: float
    gt_accuracy_backbone: float | None
    gt_accuracy_cached: float | None


def _num_rows(heads: Sequence[HeadEval]) -> int:
    sizes = {np.asarray(h.conf).shape[0] for h in heads} | {np.asarray(h.pred).shape[0] for h in heads}
    if len(sizes) > 1:
        raise ConfigError(f"heads were evaluated on different numbers of rows: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def _ordered(heads: Sequence[HeadEval], subset: Sequence[int]) -> list[int]:
    order = sorted(int(i) for i in subset)
    if len(set(order)) != len(order) or (order and (order[0] < 0 or order[-1] >= len(heads))):
        raise ConfigError(f"subset {tuple(subset)} must hold distinct indices in [0, {len(heads)})")
    for pos, i in enumerate(order):
        if pos >= len(heads[i].thresholds):
            raise ConfigError(
                f"head {heads[i].node!r} is at position {pos + 1} but has only "
                f"{len(heads[i].thresholds)} thresholds; compute budget_thresholds with a larger max_position"
            )
    return order


def subset_score(heads: Sequence[HeadEval], subset: Sequence[int]) -> float:
    """K(S) of Eq. 4 for one subset.

    The subset is walked in depth order; the head at 1-based position ``n`` uses
    ``thresholds[n - 1]``. ``H`` are the rows still remaining with ``conf >= threshold`` and
    ``M`` the remaining rows below it; ``K += |H| * (C2 - C1) - |M| * C1``; hits leave.

    Returns:
        K in cost units times rows (the cost saved over the backbone alone, summed over rows).
    """
    _num_rows(heads)
    order = _ordered(heads, subset)
    if not order:
        return 0.0
    remaining = np.ones(np.asarray(heads[order[0]].conf).shape[0], dtype=bool)
    score = 0.0
    for pos, i in enumerate(order):
        head = heads[i]
        hit = remaining & (np.asarray(head.conf) >= head.thresholds[pos])
        n_hit = int(np.count_nonzero(hit))
        n_miss = int(np.count_nonzero(remaining)) - n_hit
        score += n_hit * (head.cost_rest - head.cost_head) - n_miss * head.cost_head
        remaining &= ~hit
    return float(score)


def _as_bits(mask: np.ndarray) -> int:
    """A boolean row mask as a Python int bitset (fast & and popcount)."""
    return int.from_bytes(np.packbits(mask, bitorder="little").tobytes(), "little")


def best_subset(heads: Sequence[HeadEval], max_exact: int = 12) -> Selection:
    """The subset with the highest K(S), by exact search over all ``2**n`` subsets.

    Subsets sharing a prefix share its work: a depth-first walk decides include/skip per head
    in depth order and carries the remaining rows as an int bitset, so 4096 subsets over a few
    thousand rows take milliseconds. The empty subset scores 0. Ties (relative 1e-9) go to
    fewer heads, then to the shallower subset (lexicographically smaller indices).

    Raises:
        ConfigError: if ``len(heads) > max_exact`` (pass fewer candidate heads, e.g. drop the
            ones with the lowest individual score) or the heads' arrays disagree in length.
    """
    n_heads = len(heads)
    if n_heads > max_exact:
        raise ConfigError(
            f"{n_heads} candidate heads exceed max_exact={max_exact} for the exact subset search; "
            "pass fewer candidates (e.g. keep the best-scoring single heads) or raise max_exact"
        )
    n_rows = _num_rows(heads)
    # hit_bits[i][pos]: rows head i would hit at 1-based position pos + 1.
    hit_bits = [[_as_bits(np.asarray(h.conf) >= t) for t in np.asarray(h.thresholds, dtype=np.float64)] for h in heads]
    gain = [h.cost_rest - h.cost_head for h in heads]
    loss = [h.cost_head for h in heads]
    results: list[tuple[float, tuple[int, ...]]] = []

    def walk(i: int, remaining: int, n_left: int, chosen: tuple[int, ...], score: float) -> None:
        if i == n_heads:
            results.append((score, chosen))
            return
        walk(i + 1, remaining, n_left, chosen, score)
        pos = len(chosen)
        if pos < len(hit_bits[i]):
            hits = remaining & hit_bits[i][pos]
            n_hit = hits.bit_count()
            new_score = score + n_hit * gain[i] - (n_left - n_hit) * loss[i]
            walk(i + 1, remaining & ~hits, n_left - n_hit, (*chosen, i), new_score)

    walk(0, (1 << n_rows) - 1, n_rows, (), 0.0)
    top = max(score for score, _ in results)
    tol = _TIE_RTOL * max(1.0, abs(top))
    score, subset = min(
        ((s, c) for s, c in results if s >= top - tol),
        key=lambda sc: (len(sc[1]), sc[1]),
    )
    thresholds = tuple(float(heads[i].thresholds[pos]) for pos, i in enumerate(subset))
    logger.debug(
        "best subset %s: K = %.6g over %d rows",
        [heads[i].node for i in subset],
        score,
        n_rows,
    )
    return Selection(subset=subset, score=float(score), thresholds=thresholds)


def _check_labels(labels: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n_rows:
        raise ConfigError(f"labels has {labels.shape[0]} rows but the predictions have {n_rows}")
    return labels


def evaluate_cascade(
    heads: Sequence[HeadEval],
    selection: Selection,
    backbone_pred: np.ndarray,
    labels: np.ndarray | None = None,
    backbone_cost: float | None = None,
) -> CascadeResult:
    """Simulate Algorithm 1 with the chosen heads over recorded predictions.

    Args:
        heads: All candidate heads in depth order.
        selection: Chosen subset and the threshold of each position.
        backbone_pred: ``(N,)`` the backbone's class per row.
        labels: Optional ``(N,)`` ground-truth class indices; negative entries mean "unknown"
            and are left out of every ground-truth statistic.
        backbone_cost: Cost per row of the whole backbone. If None, the largest ``cost_rest``
            among ``heads`` is used: the cost before the shallowest candidate is then left out,
            which shifts ``mean_cost`` and ``backbone_cost`` equally and keeps the saving exact.

    Returns:
        Per-exit statistics, per-row exits and answers, agreement and mean cost.

    Raises:
        ConfigError: on mismatched lengths or an invalid selection.
    """
    n_rows = _num_rows(heads)
    backbone_pred = np.asarray(backbone_pred).reshape(-1)
    if heads and backbone_pred.shape[0] != n_rows:
        raise ConfigError(f"backbone_pred has {backbone_pred.shape[0]} rows but the heads have {n_rows}")
    n_rows = backbone_pred.shape[0]
    labels = _check_labels(labels, n_rows)
    if len(selection.thresholds) != len(selection.subset):
        raise ConfigError(f"selection has {len(selection.subset)} heads but {len(selection.thresholds)} thresholds")
    order = list(selection.subset)
    if order != sorted(set(order)) or (order and (order[0] < 0 or order[-1] >= len(heads))):
        raise ConfigError(f"selection subset {selection.subset} must be increasing indices into heads")
    if backbone_cost is None:
        backbone_cost = max((h.cost_rest for h in heads), default=0.0)
    backbone_cost = float(backbone_cost)

    labelled = labels >= 0 if labels is not None else None
    n_labelled = int(np.count_nonzero(labelled)) if labelled is not None else 0
    bb_right = (backbone_pred == labels) & labelled if labels is not None else None

    remaining = np.ones(n_rows, dtype=bool)
    exit_index = np.full(n_rows, -1, dtype=np.int64)
    final_pred = backbone_pred.copy()
    cost = np.zeros(n_rows, dtype=np.float64)
    exits = []
    for pos, (i, threshold) in enumerate(zip(order, selection.thresholds, strict=True)):
        head = heads[i]
        conf, pred = np.asarray(head.conf), np.asarray(head.pred)
        cost[remaining] += head.cost_head
        hit = remaining & (conf >= threshold)
        n_hit = int(np.count_nonzero(hit))
        exit_index[hit] = pos
        final_pred[hit] = pred[hit]
        cost[hit] += backbone_cost - head.cost_rest
        remaining &= ~hit
        agree = pred == backbone_pred
        cache_accuracy = float(np.count_nonzero(agree & hit)) / n_hit if n_hit else math.nan
        gt_accuracy = effect = None
        if labels is not None:
            labelled_hit = hit & labelled
            head_right = pred == labels
            n_lh = int(np.count_nonzero(labelled_hit))
            gt_accuracy = float(np.count_nonzero(head_right & labelled_hit)) / n_lh if n_lh else math.nan
            worse = np.count_nonzero(labelled_hit & bb_right & ~head_right)
            better = np.count_nonzero(labelled_hit & ~bb_right & head_right)
            effect = float(worse - better) / n_labelled if n_labelled else math.nan
        exits.append(
            ExitStats(
                node=head.node,
                threshold=float(threshold),
                hit_rate=n_hit / n_rows if n_rows else 0.0,
                cache_accuracy=cache_accuracy,
                gt_accuracy=gt_accuracy,
                accuracy_effect=effect,
                hits=n_hit,
            )
        )
    cost[remaining] += backbone_cost

    gt_bb = gt_cached = None
    if labels is not None and n_labelled:
        gt_bb = float(np.count_nonzero(bb_right)) / n_labelled
        gt_cached = float(np.count_nonzero((final_pred == labels) & labelled)) / n_labelled
    return CascadeResult(
        exits=tuple(exits),
        exit_index=exit_index,
        final_pred=final_pred,
        agreement=float(np.mean(final_pred == backbone_pred)) if n_rows else 1.0,
        mean_cost=float(cost.mean()) if n_rows else backbone_cost,
        backbone_cost=backbone_cost,
        gt_accuracy_backbone=gt_bb,
        gt_accuracy_cached=gt_cached,
    )


def oracle_cost(heads: Sequence[HeadEval], backbone_pred: np.ndarray, backbone_cost: float) -> float:
    """Mean cost per row if every row left at the earliest of ``heads`` that agrees with the backbone.

    ``heads`` is a cascade in depth order, costed as in the module docstring: a row leaving at the k-th head pays
    ``(backbone_cost - C2_k) + C1_1 + ... + C1_k``; a row no head agrees on pays ``backbone_cost`` plus every
    head. This is the limit any thresholds on these heads can approach (the achieved cost of
    :func:`evaluate_cascade` with the same heads is never below it unless a head answers rows it disagrees on).
    """
    backbone_pred = np.asarray(backbone_pred).reshape(-1)
    n_rows = backbone_pred.shape[0]
    if heads and _num_rows(heads) != n_rows:
        raise ConfigError(f"backbone_pred has {n_rows} rows but the heads have {_num_rows(heads)}")
    if n_rows == 0 or not heads:
        return float(backbone_cost)
    agree = np.stack([np.asarray(h.pred) == backbone_pred for h in heads])  # (heads, N)
    heads_so_far = np.cumsum([h.cost_head for h in heads], dtype=np.float64)
    exit_cost = np.array([backbone_cost - h.cost_rest for h in heads], dtype=np.float64) + heads_so_far
    cost = np.where(agree.any(axis=0), exit_cost[agree.argmax(axis=0)], backbone_cost + heads_so_far[-1])
    return float(cost.mean())


def _levels(conf: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` candidate thresholds spread over ``conf``'s quantiles, plus one that takes no row."""
    return np.unique(np.r_[np.quantile(np.asarray(conf, dtype=np.float64), np.linspace(0.0, 1.0, count)), math.inf])


def hindsight_thresholds(
    heads: Sequence[HeadEval],
    backbone_pred: np.ndarray,
    backbone_cost: float,
    min_agreement: float,
    max_combinations: int = 20_000,
) -> tuple[tuple[float, ...], float, float]:
    """The cheapest thresholds for a cascade of ``heads`` *knowing* which rows each head gets right.

    A diagnostic, not a rule to serve with: the thresholds are chosen on the very rows they are scored on, so no
    threshold rule chosen without those answers does better on them. Read it beside :func:`oracle_cost` (no
    thresholds at all): the gap between the achieved cost and this one is what a better threshold rule could
    still win; the gap between this one and the oracle needs heads whose confidence separates agreement better.

    The last head's threshold is exact (every distinct confidence is tried); the earlier heads' thresholds come
    from a quantile grid of at most ``max_combinations`` combinations, as fine as the rows for a cascade of two
    heads on up to ``max_combinations`` rows (exact then), coarser beyond (then the cost returned can only be
    above the true best).

    Args:
        heads: The cascade in depth order (conf, pred and costs are used; ``thresholds`` is ignored).
        backbone_pred: ``(N,)`` the backbone's class per row.
        backbone_cost: Cost per row of the whole backbone.
        min_agreement: Smallest allowed fraction of rows answered as the backbone would, e.g. 0.99.

    Returns:
        ``(thresholds, mean_cost, agreement)`` of the cheapest feasible choice (``inf`` thresholds answer no row,
        which is always feasible).

    Raises:
        ConfigError: on mismatched lengths or ``min_agreement`` outside ``[0, 1]``.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be within [0, 1], got {min_agreement}")
    if max_combinations < 1:
        raise ConfigError(f"max_combinations must be >= 1, got {max_combinations}")
    backbone_pred = np.asarray(backbone_pred).reshape(-1)
    n_rows = backbone_pred.shape[0]
    none = tuple(math.inf for _ in heads)
    if not heads or n_rows == 0:
        return none, float(backbone_cost) + sum(h.cost_head for h in heads), 1.0
    if _num_rows(heads) != n_rows:
        raise ConfigError(f"backbone_pred has {n_rows} rows but the heads have {_num_rows(heads)}")
    allowed_wrong = math.floor((1.0 - min_agreement) * n_rows + 1e-9)
    wrong = [np.asarray(h.pred) != backbone_pred for h in heads]
    per_head = max(2, int(max_combinations ** (1.0 / max(1, len(heads) - 1))))
    grids = [_levels(h.conf, per_head) for h in heads[:-1]]
    last = heads[-1]
    last_conf = np.asarray(last.conf, dtype=np.float64)
    best: tuple[float, tuple[float, ...], int] = (math.inf, none, 0)
    for prefix in itertools.product(*grids):
        remaining = np.ones(n_rows, dtype=bool)
        cost = 0.0
        n_wrong = 0
        for h, w, threshold in zip(heads[:-1], wrong[:-1], prefix, strict=True):
            cost += h.cost_head * np.count_nonzero(remaining)
            hit = remaining & (np.asarray(h.conf) >= threshold)
            n_wrong += int(np.count_nonzero(hit & w))
            cost += (backbone_cost - h.cost_rest) * np.count_nonzero(hit)
            remaining &= ~hit
        if n_wrong > allowed_wrong:
            continue
        n_left = int(np.count_nonzero(remaining))
        cost += (backbone_cost + last.cost_head) * n_left  # every remaining row pays the last head, then the rest
        conf = last_conf[remaining]
        order = np.argsort(-conf, kind="stable")
        sorted_conf = conf[order]
        cum_wrong = np.r_[0, np.cumsum(wrong[-1][remaining][order])]
        ends = np.r_[0, np.nonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])[0] + 1] if n_left else np.r_[0]
        ok = ends[n_wrong + cum_wrong[ends] <= allowed_wrong]
        taken = int(ok.max())
        total = (cost - last.cost_rest * taken) / n_rows
        if math.isinf(best[0]) or total < best[0] - _TIE_RTOL * abs(best[0]):
            threshold = math.inf if taken == 0 else float(sorted_conf[taken - 1])
            best = (total, (*prefix, threshold), n_wrong + int(cum_wrong[taken]))
    return tuple(float(t) for t in best[1]), float(best[0]), 1.0 - best[2] / n_rows
