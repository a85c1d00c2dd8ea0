"""Tests for layercache.cudagraphs and the cached model's ``graphs`` mode.

The bucketing, static inputs, reuse and the mode's answers are tested on the CPU with ``eager_capture`` (a
capture that records nothing and calls the module on replay); the real ``torch.cuda.graph`` capture runs where a
GPU is (``tools/bench_device.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from layercache.config import HandlerConfig
from layercache.cudagraphs import BucketedGraph, bucket_for, eager_capture
from layercache.errors import ConfigError
from layercache.graph import split
from layercache.runtime import RUN_MODES, CachedModel, measure_policy, validate_policy


class _Counting(nn.Module):
    """``2 x`` that counts its calls and the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        return 2 * x


def test_bucket_is_the_next_power_of_two_up_to_max_batch() -> None:
    assert [bucket_for(n, 128) for n in (1, 2, 3, 5, 8, 9, 100, 128)] == [1, 2, 4, 8, 8, 16, 128, 128]
    assert bucket_for(0, 128) is None and bucket_for(129, 128) is None
    assert bucket_for(70, 100) == 100  # a max_batch that is no power of two is the last bucket


def test_each_bucket_is_captured_once_and_answers_only_its_rows() -> None:
    module = _Counting()
    graphed = BucketedGraph(module, max_batch=16, capture=eager_capture)
    x = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    assert torch.equal(graphed(x), 2 * x)
    assert graphed.captures == 1 and module.sizes == [8, 8]  # captured (and replayed) on the bucket of 8, padded
    assert torch.equal(graphed(x[:3]), 2 * x[:3])  # 3 rows: the bucket of 4
    assert graphed.captures == 2
    assert torch.equal(graphed(x[:4] + 1), 2 * (x[:4] + 1))  # replays the bucket of 4 with new rows
    assert graphed.captures == 2
    assert module.sizes == [8, 8, 4, 4, 4]
    out = graphed(x[:4])
    again = graphed(x[:4] * 0)
    assert torch.equal(out, 2 * x[:4]), "a returned answer must not be the static output the next replay overwrites"
    assert torch.equal(again, torch.zeros_like(again))


def test_a_batch_above_max_batch_or_another_shape_is_not_mixed_up() -> None:
    module = _Counting()
    graphed = BucketedGraph(module, max_batch=4, capture=eager_capture)
    big = torch.randn(9, 3)
    assert torch.equal(graphed(big), 2 * big) and graphed.captures == 0  # eager
    graphed(torch.randn(2, 3))
    graphed(torch.randn(2, 5))  # other row shape: its own graph
    assert graphed.captures == 2
    with pytest.raises(ConfigError, match="max_batch=0"):
        BucketedGraph(module, max_batch=0)


def _model(threshold: float = 0.6) -> CachedModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 3)
    ).eval()
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        head[1].weight.mul_(20)  # confident on some rows, not on others
    return CachedModel(split(backbone, ["1"]), [head], ["1"], [1.0], [threshold]).eval()


def test_graphs_mode_answers_exactly_like_shrink() -> None:
    model = _model().enable_graphs(max_batch=32, capture=eager_capture)
    x = torch.randn(24, 3, 4, 4)
    with torch.inference_mode():
        shrink = model.run(x, "shrink")
        graphs = model.run(x, "graphs")
    assert 0 < int((shrink.exit_index == 0).sum()) < 24, "the test needs rows on both paths"
    assert torch.equal(graphs.exit_index, shrink.exit_index)
    assert torch.allclose(graphs.logits, shrink.logits)
    assert graphs.batch_sizes == shrink.batch_sizes
    segments, heads = model._graphed  # the shrunk batch went through a graph of its own bucket
    assert segments[1].captures == 1 and segments[0].captures == 1 and heads[0].captures == 1


def test_capture_graphs_captures_every_bucket_before_traffic() -> None:
    model = _model().enable_graphs(max_batch=8, capture=eager_capture)
    count = model.capture_graphs(torch.randn(3, 3, 4, 4))
    assert count == 3 * 4  # two segments and a head, buckets 1, 2, 4, 8
    with torch.inference_mode():
        model.run(torch.randn(7, 3, 4, 4), "graphs")
    assert sum(g.captures for g in (*model._graphed[0], *model._graphed[1])) == count  # nothing new on requests
    with pytest.raises(ConfigError, match="enable_graphs"):
        _model().capture_graphs(torch.randn(1, 3, 4, 4))


def test_graphs_without_enable_runs_as_shrink_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    x = torch.randn(6, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="layercache.runtime"), torch.inference_mode():
        out = model.run(x, "graphs")
        model.run(x, "graphs")
        ref = model.run(x, "shrink")
    assert torch.equal(out.exit_index, ref.exit_index)
    assert caplog.text.count("without enable_graphs") == 1


def test_derived_models_keep_the_graphs_and_the_state_dict_does_not_list_them() -> None:
    model = _model()
    keys = set(model.state_dict())
    model.enable_graphs(max_batch=8, capture=eager_capture)
    assert set(model.state_dict()) == keys
    assert model.with_thresholds([0.9]).graphs_enabled and model.with_policy({"1": "graphs"}).graphs_enabled
    # Other modules (layercache.accel): the graphs would replay the old ones, so they are dropped.
    assert not model.with_modules(list(model.segments), list(model.heads)).graphs_enabled
    assert not model.disable_graphs().graphs_enabled


def test_policy_times_graphs_only_where_they_replay() -> None:
    assert "graphs" in RUN_MODES and validate_policy({"8": "graphs"}) == {"8": "graphs"}
    inputs = torch.randn(16, 3, 4, 4)
    timed: list[str] = []
    original = CachedModel.run

    def spy(self: CachedModel, x: torch.Tensor, mode: str | None = None, **kw: object) -> object:
        timed.append(mode or "")
        return original(self, x, mode, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CachedModel, "run", spy)
        plain = measure_policy(_model(), inputs, batch_sizes=(4,), repeats=1)
        assert "graphs" not in timed and plain["4"] in RUN_MODES
        timed.clear()
        graphed = _model().enable_graphs(max_batch=8, capture=eager_capture)
        measure_policy(graphed, inputs, batch_sizes=(4,), repeats=1)
        assert "graphs" in timed


def test_a_cpu_worker_never_captures(tmp_path: Path) -> None:
    from layercache.serving import _graphs

    model = _model()
    out = _graphs(model, HandlerConfig(mode="cached"), torch.device("cpu"), tmp_path / "none.pt", 8, (3, 4, 4))
    assert not out.graphs_enabled
    assert HandlerConfig.from_yaml_config({"layercache": {"cuda_graphs": False}}).cuda_graphs is False
