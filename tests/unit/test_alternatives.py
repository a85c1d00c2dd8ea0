"""Tests for layercache.testing.alternatives: every variant is built, timed at every batch size and scored.

A tiny MLP backbone split in two with a linear head: eager, ONNX Runtime and (original only) channels_last are
cheap to build, so the whole comparison runs in seconds; compile and int8 are covered by test_accel.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layercache.errors import ConfigError
from layercache.graph import split
from layercache.runtime import CachedModel
from layercache.testing.alternatives import compare

NODE = "1"


def make_models() -> tuple[nn.Module, CachedModel]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    head = nn.Linear(16, 3).eval()  # random: about half of the rows reach conf 0.39 and exit, some wrongly
    return backbone, CachedModel(split(backbone, [NODE]), [head], [NODE], [1.0], [0.39]).eval()


def test_compare_times_and_scores_every_variant() -> None:
    backbone, cached = make_models()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    sample = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    result = compare(
        backbone, cached, x, sample, kinds=("none", "onnx"), cached_kinds=("none", "onnx"), batches=(1, 4),
        repeats=2, rounds=1, threads=1,
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # restored
    names = [r["variant"] for r in result.rows]
    assert names == ["eager original", "ONNX Runtime original", "eager cached", "ONNX Runtime cached"]
    rows = {r["variant"]: r for r in result.rows}
    assert rows["eager original"]["agreement"] == 1.0  # the reference itself
    assert rows["ONNX Runtime original"]["engines"] == ["onnxruntime"]
    assert rows["ONNX Runtime original"]["agreement"] == 1.0  # fp32 engine, same answers
    # The cached model answers some rows from the head: it agrees less than fully, and ONNX does not change that.
    assert rows["eager cached"]["agreement"] == rows["ONNX Runtime cached"]["agreement"] < 1.0
    for r in result.rows:
        assert set(r["ms"]) == {"1", "4"} and all(v > 0 for v in r["ms"].values())
        assert r["best_original"]["1"] in ("eager original", "ONNX Runtime original")
    for b in ("1", "4"):
        best = rows[result.rows[0]["best_original"][b]]
        assert best["ratio"][b] == 1.0  # the best original over itself, round by round
    assert result.to_dict()["n"] == 40 and result.threads == 1


def test_compare_names_a_bad_kind() -> None:
    backbone, cached = make_models()
    with pytest.raises(ConfigError, match="'tensorrt' is not one of"):
        compare(backbone, cached, torch.randn(4, 6), torch.randn(4, 6), kinds=("tensorrt",))
