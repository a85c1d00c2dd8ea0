"""layercache.evaluation: one definition of every served metric, with hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layercache.evaluation import (
    BACKBONE,
    Answers,
    exit_flops,
    exit_table,
    from_run,
    markdown_table,
    name_to_index,
    pct,
    percentile,
    score,
    summarize_latency,
)
from layercache.testing.load import Answer, Run


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 8.0, 13.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert np.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q=101"):
        percentile(values, 101)


def test_a_run_scores_failed_requests_once_and_a_missing_exit_header_as_the_backbone() -> None:
    run = Run(
        [
            Answer(200, 0.010, None, 0),  # no exit header: answered by the whole backbone
            Answer(200, 0.030, "layer1", 1),
            Answer(503, 5.0, None, None),
            Answer(200, 0.020, "layer1", 2),
        ],
        seconds=1.0,
    )
    answers = from_run(run)
    assert answers.predicted.tolist() == [0, 1, -1, 2] and answers.exits == (BACKBONE, "layer1", None, "layer1")
    stats = summarize_latency(answers)
    assert stats["p50_ms"] == pytest.approx(20.0) and stats["errors"] == 1 and stats["rps"] == pytest.approx(4.0)
    costs = {"layer1": 10.0, BACKBONE: 100.0}
    scored = score(answers, reference=np.array([0, 1, 1, -1]), labels=np.array([0, 0, 2, 2]), costs=costs)
    assert scored["failed"] == 1 and scored["n"] == 4
    assert scored["accuracy"] == pytest.approx(2 / 3)  # of the three answered
    assert scored["agreement"] == pytest.approx(1.0)  # rows 0 and 1: both sides answered
    assert scored["exit_rates"] == {BACKBONE: pytest.approx(1 / 3), "layer1": pytest.approx(2 / 3)}
    assert scored["mean_flops"] == pytest.approx((100 + 10 + 10) / 3)


def test_exit_table_is_paper_table_2() -> None:
    answers = Answers.of([0, 1, 1, 2], ["a", "a", BACKBONE, "b"])
    rows = exit_table(answers, ["a", "b"], reference=np.array([0, 2, 1, 2]), labels=np.array([0, 2, 1, 1]))
    a, b = rows
    assert (a["hit_rate"], a["cache_accuracy"], a["gt_accuracy"]) == (0.5, 0.5, 0.5)
    # Row 1: the backbone was right (2), the head wrong (1): one point of four lost.
    assert a["effect"] == pytest.approx(0.25)
    assert (b["hit_rate"], b["cache_accuracy"], b["gt_accuracy"], b["effect"]) == (0.25, 1.0, 0.0, 0.0)
    assert math.isnan(exit_table(answers, ["c"], reference=np.zeros(4))[0]["cache_accuracy"])


def test_exit_flops_charges_the_prefix_and_every_head_on_the_way() -> None:
    report = {
        "mean_flops_original": 100.0,
        "exits": [
            {"node": "a", "threshold": 0.9, "head_flops": 2.0, "flops_remaining": 80.0},
            {"node": "off", "threshold": "inf", "head_flops": 50.0, "flops_remaining": 60.0},
            {"node": "b", "threshold": 0.8, "head_flops": 3.0, "flops_remaining": 40.0},
        ],
    }
    # a: 20 of backbone + head a; b: 60 of backbone + heads a and b; the disabled head costs nothing.
    assert exit_flops(report) == {"a": 22.0, "b": 65.0, "backbone": 105.0}


def test_formatting_helpers() -> None:
    assert pct(0.5) == "50.00%" and pct(None) == "n/a" and pct(float("nan")) == "n/a"
    assert name_to_index({"0": "cat", "1": "dog"}) == {"cat": 0, "dog": 1}
    assert markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
