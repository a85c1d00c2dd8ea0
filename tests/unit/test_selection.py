"""Tests for layercache.selection: K(S), the exact subset search, cascade simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from layercache.errors import ConfigError
from layercache.selection import (
    HeadEval,
    Selection,
    best_subset,
    evaluate_cascade,
    hindsight_thresholds,
    oracle_cost,
    subset_score,
)

BACKBONE = np.array([1, 1, 2, 0, 3, 1])
LABELS = np.array([1, 1, 2, 0, 2, 0])
BACKBONE_COST = 12.0


def _heads() -> list[HeadEval]:
    return [
        HeadEval(
            node="layer1",
            conf=np.array([0.9, 0.2, 0.8, 0.1, 0.95, 0.3]),
            pred=np.array([1, 0, 0, 0, 2, 0]),
            thresholds=np.array([0.85, 0.9, 0.99]),
            cost_head=1.0,
            cost_rest=10.0,
        ),
        HeadEval(
            node="layer2",
            conf=np.array([0.5, 0.9, 0.6, 0.7, 0.2, 0.1]),
            pred=np.array([0, 1, 2, 5, 0, 0]),
            thresholds=np.array([0.8, 0.65, 0.9]),
            cost_head=2.0,
            cost_rest=6.0,
        ),
        HeadEval(
            node="layer3",
            conf=np.array([0.99, 0.99, 0.99, 0.99, 0.99, 0.0]),
            pred=np.array([1, 1, 2, 0, 0, 1]),
            thresholds=np.array([0.5, 0.5, 0.5]),
            cost_head=1.0,
            cost_rest=2.0,
        ),
    ]


def test_subset_score_by_hand() -> None:
    heads = _heads()
    # layer1 at position 1 (t=.85) hits rows 0, 4: 2*(10-1) - 4*1 = 14
    # layer2 at position 2 (t=.65) sees rows 1, 2, 3, 5 and hits 1, 3: 2*(6-2) - 2*2 = 4
    assert subset_score(heads, (0, 1)) == 18.0
    assert subset_score(heads, (1, 0)) == 18.0  # walked in depth order whatever the input order
    # layer2 alone at position 1 (t=.8) hits row 1 only: 1*4 - 5*2
    assert subset_score(heads, (1,)) == -6.0
    # layer3 at position 3 sees rows 2, 5 and hits row 2: 1*(2-1) - 1*1 = 0
    assert subset_score(heads, (0, 1, 2)) == 18.0
    # layer3 at position 2 (t=.5) after layer1 sees rows 1,2,3,5, hits 1,2,3: 3*1 - 1*1
    assert subset_score(heads, (0, 2)) == 16.0
    assert subset_score(heads, ()) == 0.0


def test_subset_score_errors() -> None:
    heads = _heads()
    with pytest.raises(ConfigError, match="distinct"):
        subset_score(heads, (0, 0))
    with pytest.raises(ConfigError, match="distinct"):
        subset_score(heads, (3,))
    short = [HeadEval("a", h.conf, h.pred, h.thresholds[:1], 1.0, 2.0) for h in heads]
    with pytest.raises(ConfigError, match="max_position"):
        subset_score(short, (0, 1))


def test_best_subset_hand_example() -> None:
    selection = best_subset(_heads())
    # (0, 1) and (0, 1, 2) both score 18: fewer heads win.
    assert selection == Selection(subset=(0, 1), score=18.0, thresholds=(0.85, 0.65))


def _brute_force(heads: list[HeadEval]) -> tuple[float, tuple[int, ...]]:
    scored = [
        (subset_score(heads, s), s) for k in range(len(heads) + 1) for s in itertools.combinations(range(len(heads)), k)
    ]
    top = max(score for score, _ in scored)
    return min(
        ((sc, s) for sc, s in scored if sc >= top - 1e-9 * max(1.0, abs(top))),
        key=lambda x: (len(x[1]), x[1]),
    )


def _random_heads(rng: np.random.Generator, n_heads: int, n_rows: int) -> list[HeadEval]:
    heads = []
    rest = np.sort(rng.uniform(1.0, 20.0, n_heads))[::-1]
    for i in range(n_heads):
        conf = rng.random(n_rows)
        thresholds = np.sort(rng.uniform(0.3, 1.0, n_heads))
        thresholds[rng.random(n_heads) < 0.1] = math.inf
        heads.append(
            HeadEval(
                node=f"n{i}",
                conf=conf,
                pred=rng.integers(0, 3, n_rows),
                thresholds=thresholds,
                cost_head=float(rng.uniform(0.1, 3.0)),
                cost_rest=float(rest[i]),
            )
        )
    return heads


@pytest.mark.parametrize("seed", range(8))
def test_best_subset_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    heads = _random_heads(rng, n_heads=int(rng.integers(1, 8)), n_rows=300)
    selection = best_subset(heads)
    score, subset = _brute_force(heads)
    assert selection.subset == subset
    assert selection.score == pytest.approx(score)
    assert selection.score == pytest.approx(subset_score(heads, selection.subset))
    assert selection.thresholds == tuple(heads[i].thresholds[p] for p, i in enumerate(subset))


def test_best_subset_twelve_heads() -> None:
    rng = np.random.default_rng(42)
    heads = _random_heads(rng, n_heads=12, n_rows=1500)
    selection = best_subset(heads)
    assert selection.score == pytest.approx(subset_score(heads, selection.subset))
    assert selection.score >= max(subset_score(heads, (i,)) for i in range(12))
    with pytest.raises(ConfigError, match="fewer candidates"):
        best_subset(heads + heads[:1])


def test_best_subset_empty_and_ties() -> None:
    heads = _heads()
    useless = [HeadEval(h.node, h.conf, h.pred, h.thresholds, 5.0, 1.0) for h in heads]
    assert best_subset(useless) == Selection(subset=(), score=0.0, thresholds=())
    assert best_subset([]) == Selection(subset=(), score=0.0, thresholds=())
    twin = [heads[0], heads[0]]
    assert best_subset(twin).subset == (0,)  # same score: the shallower head


def test_evaluate_cascade_by_hand() -> None:
    heads = _heads()
    selection = best_subset(heads)
    result = evaluate_cascade(heads, selection, BACKBONE, LABELS, BACKBONE_COST)
    first, second = result.exits
    assert (first.node, first.threshold, first.hits) == ("layer1", 0.85, 2)
    assert first.hit_rate == pytest.approx(2 / 6)
    assert first.cache_accuracy == 0.5  # row 0 agrees, row 4 does not
    assert first.gt_accuracy == 1.0
    assert first.accuracy_effect == pytest.approx(-1 / 6)  # row 4: backbone wrong, head right
    assert (second.node, second.threshold, second.hits) == ("layer2", 0.65, 2)
    assert second.cache_accuracy == 0.5
    assert second.gt_accuracy == 0.5
    assert second.accuracy_effect == pytest.approx(1 / 6)  # row 3: backbone right, head wrong
    np.testing.assert_array_equal(result.exit_index, [0, 1, -1, 1, 0, -1])
    np.testing.assert_array_equal(result.final_pred, [1, 1, 2, 5, 2, 1])
    assert result.agreement == pytest.approx(4 / 6)
    assert result.gt_accuracy_backbone == pytest.approx(4 / 6)
    assert result.gt_accuracy_cached == pytest.approx(4 / 6)
    # exits at layer1 pay 2 + 1, at layer2 6 + 1 + 2, the rest 12 + 1 + 2
    assert result.mean_cost == pytest.approx((2 * 3 + 2 * 9 + 2 * 15) / 6)
    assert result.mean_cost == pytest.approx(BACKBONE_COST - selection.score / 6)
    assert result.backbone_cost == BACKBONE_COST


def test_evaluate_cascade_without_labels_or_cost() -> None:
    heads = _heads()
    result = evaluate_cascade(heads, Selection((), 0.0, ()), BACKBONE)
    assert result.exits == ()
    assert result.agreement == 1.0
    assert result.gt_accuracy_backbone is None and result.gt_accuracy_cached is None
    assert result.backbone_cost == 10.0  # largest cost_rest stands in for the backbone
    assert result.mean_cost == 10.0
    never = Selection((0,), 0.0, (math.inf,))
    exit_stats = evaluate_cascade(heads, never, BACKBONE).exits[0]
    assert exit_stats.hits == 0 and math.isnan(exit_stats.cache_accuracy)
    assert exit_stats.gt_accuracy is None and exit_stats.accuracy_effect is None


def test_evaluate_cascade_unknown_labels_are_skipped() -> None:
    heads = _heads()
    labels = LABELS.copy()
    labels[4] = -1
    result = evaluate_cascade(heads, best_subset(heads), BACKBONE, labels, BACKBONE_COST)
    assert result.gt_accuracy_backbone == pytest.approx(4 / 5)
    assert result.exits[0].accuracy_effect == 0.0
    with pytest.raises(ConfigError, match="labels"):
        evaluate_cascade(heads, best_subset(heads), BACKBONE, labels[:3])


def test_oracle_cost_by_hand() -> None:
    # earliest agreeing head per row: layer1, layer2, layer2, layer1, none, layer3; a row pays the backbone up to
    # its exit plus every head it passed: layer1 2 + 1, layer2 6 + 3, layer3 10 + 4, none 12 + 4
    expected = (3 + 9 + 9 + 3 + 16 + 14) / 6
    assert oracle_cost(_heads(), BACKBONE, BACKBONE_COST) == pytest.approx(expected)
    assert oracle_cost([], BACKBONE, BACKBONE_COST) == BACKBONE_COST


@pytest.mark.parametrize("seed", range(6))
def test_hindsight_thresholds_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_rows = 40
    heads = _random_heads(rng, 2, n_rows)
    backbone = rng.integers(0, 3, n_rows)
    for h in heads:  # heads that agree more often when surer, as trained heads do
        h.pred[h.conf > 0.5] = backbone[h.conf > 0.5]
    sel = Selection((0, 1), 0.0, (0.0, 0.0))
    best = math.inf
    levels = [np.r_[np.unique(h.conf), math.inf] for h in heads]
    for thr in itertools.product(*levels):
        r = evaluate_cascade(heads, Selection(sel.subset, 0.0, thr), backbone, None, BACKBONE_COST)
        if r.agreement >= 0.9:
            best = min(best, r.mean_cost)
    # a grid as fine as the rows makes the search exhaustive
    thresholds, cost, agreement = hindsight_thresholds(heads, backbone, BACKBONE_COST, 0.9, max_combinations=10_000)
    assert cost == pytest.approx(best)
    check = evaluate_cascade(heads, Selection((0, 1), 0.0, thresholds), backbone, None, BACKBONE_COST)
    assert check.mean_cost == pytest.approx(cost)
    assert check.agreement == pytest.approx(agreement)
    assert agreement >= 0.9


def test_hindsight_thresholds_reach_the_oracle_when_confidence_separates() -> None:
    # confidence 0.9 exactly where the head agrees with the backbone: thresholds at 0.9 are the oracle
    heads = [
        HeadEval(h.node, np.where(h.pred == BACKBONE, 0.9, 0.2), h.pred, h.thresholds, h.cost_head, h.cost_rest)
        for h in _heads()
    ]
    thresholds, cost, agreement = hindsight_thresholds(heads, BACKBONE, BACKBONE_COST, 1.0)
    assert agreement == 1.0
    assert cost == pytest.approx(oracle_cost(heads, BACKBONE, BACKBONE_COST))
    # no budget at all and a head that is surest where it is wrong: answering nothing is the only choice
    liar = [
        HeadEval("n", np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.1]), np.array([1, 1, 2, 0, 0, 1]), np.zeros(1), 1.0, 8.0)
    ]
    thresholds, cost, agreement = hindsight_thresholds(liar, BACKBONE, BACKBONE_COST, 1.0)
    assert thresholds == (math.inf,) and cost == BACKBONE_COST + 1.0 and agreement == 1.0
    thresholds, cost, agreement = hindsight_thresholds(liar, BACKBONE, BACKBONE_COST, 5 / 6)
    assert thresholds == (0.1,) and cost == pytest.approx(BACKBONE_COST - 8.0 + 1.0)
    assert agreement == pytest.approx(5 / 6)


def test_hindsight_thresholds_errors_and_empty() -> None:
    with pytest.raises(ConfigError, match="min_agreement"):
        hindsight_thresholds(_heads(), BACKBONE, BACKBONE_COST, 1.5)
    with pytest.raises(ConfigError, match="rows"):
        hindsight_thresholds(_heads(), BACKBONE[:3], BACKBONE_COST, 0.9)
    assert hindsight_thresholds([], BACKBONE, BACKBONE_COST, 0.9) == ((), BACKBONE_COST, 1.0)
