"""Tests for layercache.build: splits, labels, trial picking, and a whole build on synthetic learnable traffic.

The backbone is a small conv net with hand-set weights: its first four channels pass the four input channels
through every conv, and its classifier reads their means (class = brightest input channel). The traffic makes one
channel brighter by a random amount, so the backbone's answer is a linear function of the pooled activation at
every cut: a pooled-linear head can learn it from a few hundred rows.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layercache.build import (
    BuildConfig,
    BuildResult,
    build_cache,
    finalize,
    labels_to_index,
    min_tolerance,
    pick_trials,
    resample,
    search,
    split_indices,
)
from layercache.certify import clopper_pearson_upper, requests_needed, rows_needed
from layercache.errors import ConfigError, LogError
from layercache.graph import count_flops
from layercache.heads import search_space
from layercache.runtime import CachedModel, heads_state_dict, weights_fingerprint
from layercache.trafficlog import decode_inputs, encode_batch, make_schema
from layercache.training import TrainConfig

ROWS = 600
CLASSES = 4
CONFIG = BuildConfig(tolerance=0.1, trials=1, train=TrainConfig(epochs=60, seed=0), seed=0)


def make_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(CLASSES, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )
    with torch.no_grad():
        for conv in (model[0], model[2], model[4]):
            for c in range(CLASSES):
                conv.weight[c].zero_()
                conv.weight[c, c, 1, 1] = 1.0
                conv.bias[c] = 0.0
        model[8].weight.zero_()
        model[8].weight[:, :CLASSES] = torch.eye(CLASSES)
        model[8].bias.zero_()
    return model.eval()


def make_table(n: int = ROWS, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Logged traffic as the recording handler writes it: inputs, the backbone's probs, labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 4, (n, CLASSES, 8, 8)).astype(np.float32)
    x[np.arange(n), labels] += rng.uniform(0, 4, n)[:, None, None]
    backbone = make_backbone()
    with torch.no_grad():
        probs = F.softmax(backbone(torch.from_numpy(x).half().float()), dim=1).numpy()
    batch = encode_batch(
        make_schema([]),
        request_ids=[f"r{i}" for i in range(n)],
        model_name="synthetic",
        model_version="1.0",
        weights_fingerprint=weights_fingerprint(backbone),
        inputs=x,
        probs=probs,
        exits=["backbone"] * n,
        labels=[str(v) for v in labels],
    )
    return pa.Table.from_batches([batch]), labels


@pytest.fixture(scope="module")
def traffic() -> tuple[pa.Table, np.ndarray]:
    return make_table()


@pytest.fixture(scope="module")
def built(traffic: tuple[pa.Table, np.ndarray]) -> BuildResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs outside conftest's per-test one-thread fixture
    try:
        return build_cache(make_backbone(), traffic[0], CONFIG)
    finally:
        torch.set_num_threads(threads)


def test_split_indices_are_deterministic_and_disjoint() -> None:
    tr, va, te = split_indices(100, (0.5, 0.2, 0.3), seed=3)
    assert (len(tr), len(va), len(te)) == (50, 20, 30)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    assert all(np.array_equal(np.sort(s), s) for s in (tr, va, te))
    again = split_indices(100, (0.5, 0.2, 0.3), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (tr, va, te), strict=True))
    other = split_indices(100, (0.5, 0.2, 0.3), seed=4)
    assert not np.array_equal(other[0], tr)
    assert sum(len(s) for s in split_indices(7, (0.5, 0.2, 0.3), seed=0)) == 7


def test_labels_to_index() -> None:
    names = {"0": "T-shirt/top", "1": "Trouser", "2": "Pullover"}
    assert labels_to_index(["2", "0", "11"], None).tolist() == [2, 0, 11]
    assert labels_to_index(["Trouser", "T-shirt/top", "2"], names).tolist() == [1, 0, 2]
    assert labels_to_index(["Trouser", "Sandal"], names) is None
    assert labels_to_index(["1", None], names) is None
    assert labels_to_index([], names) is None
    assert labels_to_index(["-1"], None) is None  # not a digit string, not a name


def test_policy_sample_is_a_few_distinct_logged_rows_within_the_byte_cap(traffic: tuple[pa.Table, np.ndarray]) -> None:
    from layercache.build import policy_sample
    from layercache.replay import LoggedInputs

    table = traffic[0]
    inputs = decode_inputs(table)
    logged_inputs = LoggedInputs(table)
    sample = policy_sample(logged_inputs, max_rows=4)
    assert sample.dtype == torch.float16 and sample.shape == (4, *inputs.shape[1:])
    # Every sampled row is a distinct logged input (float16 as logged).
    logged = {r.astype(np.float16).tobytes(): i for i, r in enumerate(inputs)}
    assert len({logged[r.numpy().tobytes()] for r in sample}) == 4
    row_bytes = 2 * int(np.prod(inputs.shape[1:]))
    assert policy_sample(logged_inputs, max_bytes=3 * row_bytes).shape[0] == 3
    assert policy_sample(logged_inputs, max_bytes=1).shape[0] == 1  # always at least one row
    with pytest.raises(LogError, match="no logged inputs"):
        policy_sample(LoggedInputs(table.slice(0, 0)))


def test_pick_trials_spreads_over_the_space_cheapest_first() -> None:
    space = search_space((8, 8, 8), CLASSES)
    assert len(space) > 10
    assert pick_trials(space, 1) == [space[0]]
    assert pick_trials(space, 2) == [space[0], space[-1]]
    mid = round((len(space) - 1) / 2)
    assert pick_trials(space, 3) == [space[0], space[mid], space[-1]]
    assert pick_trials(space, len(space) + 5) == space
    picked = pick_trials(space, 6)
    assert len(picked) == 6 and picked[0] == space[0]
    assert [space.index(s) for s in picked] == sorted(space.index(s) for s in picked)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tolerance": 0.0}, r"tolerance=0.0 must be in \(0, 1\)"),
        ({"tolerance": 1.5}, r"tolerance=1.5 must be in \(0, 1\)"),
        ({"splits": (0.5, 0.5)}, "must be three positive fractions summing to 1"),
        ({"splits": (0.6, 0.3, 0.3)}, "must be three positive fractions summing to 1"),
        ({"cost": "energy"}, r"cost='energy' must be one of \('flops', 'latency'\)"),
        ({"trials": 0}, "trials=0 must be >= 1"),
    ],
)
def test_build_config_validation(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BuildConfig(**change)


def test_build_cache_makes_a_working_cache(built: BuildResult, traffic: tuple[pa.Table, np.ndarray]) -> None:
    spec, report = built.spec, built.report
    backbone = make_backbone()
    assert spec.candidates == ("1", "3")  # the ReLUs of the first two convs (the last one leaves too little)
    assert spec.exits, "a pooled-linear head reproduces this backbone: the build must keep at least one exit"
    depth = [spec.candidates.index(n) for n in spec.nodes]
    assert depth == sorted(depth) and len(set(depth)) == len(depth)
    assert all(math.isfinite(e.threshold) and 0 < e.threshold <= 1 for e in spec.exits)
    assert all(e.temperature > 0 and e.in_shape == (8, 8, 8) for e in spec.exits)
    assert (spec.num_classes, spec.input_shape, spec.tolerance) == (CLASSES, (CLASSES, 8, 8), 0.1)
    assert spec.weights_fingerprint == weights_fingerprint(backbone)
    assert len(built.heads) == len(spec.exits)

    # The fixed interface of report.json.
    assert report["tolerance"] == 0.1
    assert report["rows"] == {"total": ROWS, "train": 300, "val": 120, "test": 180}
    assert report["mean_flops_original"] == count_flops(backbone, torch.zeros(1, CLASSES, 8, 8))
    assert 0 < report["mean_flops_cached"] <= report["mean_flops_original"]
    # Fewer heads to leave at can only raise the oracle; each ratio is achieved over its oracle.
    assert report["oracle_flops"] <= report["oracle_flops_selected"] <= report["mean_flops_original"]
    for key in ("", "_selected"):
        assert report[f"achieved_over_oracle{key}"] == pytest.approx(
            report["mean_flops_cached"] / report[f"oracle_flops{key}"]
        )
    # Thresholds chosen knowing the held-out answers lie between the oracle and the original.
    assert report["oracle_flops_selected"] <= report["hindsight_flops_selected"] <= report["mean_flops_original"]
    assert [e["node"] for e in report["exits"]] == list(spec.nodes)
    for e, exit_spec in zip(report["exits"], spec.exits, strict=True):
        assert {"node", "threshold", "hit_rate", "cache_accuracy"} <= set(e)
        assert e["threshold"] == exit_spec.threshold
        assert 0 < e["hit_rate"] <= 1 and 0 <= e["cache_accuracy"] <= 1
    assert [c["node"] for c in report["candidates"]] == ["1", "3"]
    assert [c["selected"] for c in report["candidates"]] == [c["node"] in spec.nodes for c in report["candidates"]]
    # The agreement lost stays within the tolerance; labels give GT accuracies.
    assert report["agreement"] >= 1 - 0.1
    te = split_indices(ROWS, CONFIG.splits, CONFIG.seed)[2]
    labels = traffic[1]
    with torch.no_grad():
        pred = make_backbone()(torch.from_numpy(decode_inputs(traffic[0])).float()).argmax(1).numpy()
    assert report["gt_accuracy_original"] == pytest.approx(float((pred[te] == labels[te]).mean()))
    assert report["replay"]["prediction_agreement"] == 1.0


def test_the_built_cache_serves_what_the_report_says(built: BuildResult, traffic: tuple[pa.Table, np.ndarray]) -> None:
    model = CachedModel.from_spec(make_backbone(), built.spec, heads_state_dict(built.heads))
    te = split_indices(ROWS, CONFIG.splits, CONFIG.seed)[2]
    x = torch.from_numpy(decode_inputs(traffic[0])[te]).float()
    with torch.no_grad():
        out = model.run(x)
        backbone_pred = make_backbone()(x).argmax(1)
    hits = [(out.exit_index == i).float().mean().item() for i in range(len(built.spec.exits))]
    # The report scores heads on float16 replayed activations; allow a row or two to sit on the threshold.
    for hit, e in zip(hits, built.report["exits"], strict=True):
        assert hit == pytest.approx(e["hit_rate"], abs=2.5 / len(te))
    agreement = (out.logits.argmax(1) == backbone_pred).float().mean().item()
    assert agreement == pytest.approx(built.report["agreement"], abs=2.5 / len(te))


def test_same_seed_same_cache(built: BuildResult, traffic: tuple[pa.Table, np.ndarray]) -> None:
    again = build_cache(make_backbone(), traffic[0], CONFIG)
    assert again.spec.to_json() == built.spec.to_json()
    first, second = heads_state_dict(built.heads), heads_state_dict(again.heads)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.report["exits"] == built.report["exits"]


def test_too_few_rows(traffic: tuple[pa.Table, np.ndarray]) -> None:
    with pytest.raises(LogError, match="only 49 logged requests; a build needs at least 50"):
        build_cache(make_backbone(), traffic[0].slice(0, 49), CONFIG)


def test_a_tolerance_below_what_the_validation_rows_can_vouch_for(
    traffic: tuple[pa.Table, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    assert min_tolerance(1400, 1.28) == pytest.approx(2 * 2.2999 / 1400, rel=1e-4)
    assert min_tolerance(1400, 0.0) == 0.0
    state = search(make_backbone(), traffic[0], CONFIG)
    n_val = len(state.idx[1])
    floor = min_tolerance(n_val, CONFIG.margin_z)
    with caplog.at_level(logging.WARNING, logger="layercache.build"):
        low = finalize(state, floor * 0.9, rule="per-head")
    assert low.spec.exits == () and low.report["min_tolerance"] == pytest.approx(floor)
    assert f"below what {n_val} validation rows can vouch for" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layercache.build"):
        finalize(state, 0.1, rule="per-head")
    assert "vouch for" not in caplog.text


def test_the_certified_rule_states_its_promise_and_keeps_it_on_the_test_split(
    traffic: tuple[pa.Table, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    state = search(make_backbone(), traffic[0], CONFIG)
    n_test = len(state.idx[2])
    result = finalize(state, 0.1)
    promise = result.report["promise"]
    assert promise["rule"] == "certified" and promise["rows"] == n_test and promise["delta"] == 0.05
    assert promise["passed"] and promise["upper_bound"] <= 0.1 and result.spec.exits
    assert result.spec.certificate == promise
    # The bound is the exact Clopper-Pearson one of what the chosen cascade does on the test split.
    assert promise["upper_bound"] == pytest.approx(clopper_pearson_upper(promise["disagreements"], n_test, 0.05))
    assert 1 - result.report["agreement"] == pytest.approx(promise["observed"])
    # Every exit carries what it was certified for (the online guard's bound).
    for exit_spec, row in zip(result.spec.exits, result.report["exits"], strict=True):
        assert exit_spec.certified["hits"] == row["hits"] and 0 < exit_spec.certified["bound"] <= 1
    # Below what the test rows can ever certify (zero disagreements), the plain model stays, and the build says
    # how many logged requests would do.
    floor = result.report["min_tolerance"]
    assert floor == pytest.approx(1 - 0.05 ** (1 / n_test))
    with caplog.at_level(logging.WARNING, logger="layercache.build"):
        low = finalize(state, floor * 0.9)
    assert low.spec.exits == () and not low.report["promise"]["passed"]
    assert low.report["promise"]["requests_needed"] > ROWS
    assert "no cascade could be certified" in caplog.text and "logged requests, so that its 30% certification" in (
        caplog.text
    )


def test_a_tiny_log_says_how_many_requests_a_cache_needs(caplog: pytest.LogCaptureFixture) -> None:
    """50 logged rows used to give a cache with no exits and no word of why."""
    table, _ = make_table(50, seed=3)
    with caplog.at_level(logging.WARNING, logger="layercache.build"):
        result = build_cache(make_backbone(), table, CONFIG)
    assert result.spec.exits == ()
    # 15 certification rows cannot vouch for any cache at tolerance 0.1: 97 requests are needed (29 certifying).
    assert rows_needed(0.0, 0.1, 0.05) == 29 and requests_needed(0.0, 0.1, 0.05, 0.3) == 97
    assert "the cache keeps the plain model; a cache at tolerance 0.1 (delta 0.05) needs at least 97 logged" in (
        caplog.text
    )


def test_affordable_space_costs_heads_in_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting the FLOPs of an 8x8 map's search space head by head cost seconds per candidate: no head is built."""
    from layercache import build, heads
    from layercache.graph import Candidate

    cand = Candidate(node="n", shape=(64, 32, 32), flops_prefix=0, flops_remaining=40_000_000)
    config = BuildConfig()
    cap = min(config.max_head_fraction * cand.flops_remaining, config.max_head_flops)
    with monkeypatch.context() as m:
        m.setattr(heads, "build_head", lambda *a, **k: pytest.fail("affordable_space built a head"))
        kept = build.affordable_space(cand, CLASSES, config)
    space = search_space(cand.shape, CLASSES, config.max_spatial)
    assert 1 < len(kept) < len(space)
    assert kept == [s for s in space if heads.head_flops(s, cand.shape, CLASSES) <= cap]
    # ... and the closed form is what the flop counter counts on the built heads, at the cap's edge too.
    edge = [s for s in space if 0.5 * cap < heads.head_flops(s, cand.shape, CLASSES) < 2 * cap]
    for spec in edge[:: max(1, len(edge) // 10)]:
        assert heads.head_flops(spec, cand.shape, CLASSES) == heads._counted_flops(spec, cand.shape, CLASSES)


def test_resample_draws_certification_rows_from_the_test_rows_and_unseen_ones(
    traffic: tuple[pa.Table, np.ndarray],
) -> None:
    state = search(make_backbone(), traffic[0], CONFIG)
    tr, va, te = state.idx
    kept = state.kept
    # "Unseen" rows for the experiment: 40 made-up rows per head (any scores will do for the bookkeeping).
    rng = np.random.default_rng(3)
    unseen = [(rng.uniform(0.1, 1.0, 40), rng.integers(0, CLASSES, 40)) for _ in kept]
    unseen_pred = rng.integers(0, CLASSES, 40)
    drawn, left, left_pred = resample(state, 7, unseen, unseen_pred)
    assert np.array_equal(drawn.idx[0], tr) and np.array_equal(drawn.idx[1], va) and len(drawn.idx[2]) == len(te)
    assert len(left_pred) == 40 and drawn.labels is None
    # The certification rows and the left-over rows split the pool of test + unseen rows between them.
    pool_pred = np.concatenate([state.backbone_pred[te], unseen_pred])
    assert sorted(np.concatenate([drawn.backbone_pred[drawn.idx[2]], left_pred])) == sorted(pool_pred)
    for r, new, (conf_u, _), (conf_left, _) in zip(kept, drawn.kept, unseen, left, strict=True):
        assert np.array_equal(new.scores["val"][0], r.scores["val"][0])  # thresholds still come from validation
        pooled = np.concatenate([r.scores["test"][0], conf_u])
        assert sorted(np.concatenate([new.scores["test"][0], conf_left])) == sorted(pooled)
    again, _, _ = resample(state, 7, unseen, unseen_pred)
    other, _, _ = resample(state, 8, unseen, unseen_pred)
    assert np.array_equal(again.idx[2], drawn.idx[2]) and not np.array_equal(other.idx[2], drawn.idx[2])
    promise = finalize(drawn, 0.1).report["promise"]
    assert promise["rows"] == len(te)
    assert promise["upper_bound"] == pytest.approx(clopper_pearson_upper(promise["disagreements"], len(te), 0.05))
    with pytest.raises(ConfigError, match="unseen scores for 1 heads"):
        resample(state, 7, unseen[:1], unseen_pred)
