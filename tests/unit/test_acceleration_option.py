"""``build_cache.py --acceleration``: the spec records the engine, a cached worker builds it at load on the
archive's logged sample, and serves eager with a warning when it cannot (package missing, no sample).

A tiny MLP cached model and ONNX Runtime (cheap to build); compile and int8 are covered by test_accel.py.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from layercache.cli.build import build_parser, parse_args
from layercache.config import ACCELERATIONS, CacheSpec
from layercache.errors import ConfigError
from layercache.graph import split
from layercache.runtime import CachedModel
from layercache.serving import accelerate_for_worker

NODE = "1"


def make_cached() -> CachedModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return CachedModel(split(backbone, [NODE]), [nn.Linear(16, 3).eval()], [NODE], [1.0], [0.39]).eval()


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "layercache_sample.pt"
    torch.save(torch.randn(16, 6, generator=torch.Generator().manual_seed(2)), path)
    return path


def test_spec_records_the_acceleration_and_refuses_an_unknown_one() -> None:
    spec = CacheSpec(num_classes=3, input_shape=(6,), exits=())
    assert spec.acceleration == "none"  # older specs (no key) load as eager
    onnx = dataclasses.replace(spec, acceleration="onnx")
    assert CacheSpec.from_json(onnx.to_json()).acceleration == "onnx"
    with pytest.raises(ConfigError, match="'tensorrt' is not one of .*--acceleration"):
        CacheSpec(num_classes=3, input_shape=(6,), exits=(), acceleration="tensorrt")
    assert {"compile", "int8", "onnx"} <= set(ACCELERATIONS)


def test_cli_flag_reaches_the_build_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--mar", "m.mar", "--logs", str(tmp_path), "-o", str(tmp_path / "c.mar")]
    args, _ = parse_args(build_parser(), [*base, "--acceleration", "onnx"])
    assert args.request is not None and args.request.acceleration == "onnx"
    assert parse_args(build_parser(), base)[0].request.acceleration == "none"
    with pytest.raises(SystemExit):
        parse_args(build_parser(), [*base, "--acceleration", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_worker_builds_the_engine_on_the_sample(sample_file: Path) -> None:
    eager = make_cached()
    model = accelerate_for_worker(eager, "onnx", sample_file, batch_size=8)
    assert [m.engine for m in [*model.segments, *model.heads]] == ["onnxruntime"] * 3
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want, got = eager.run(x), model.run(x)
    assert torch.equal(got.exit_index, want.exit_index) and 0 < int((want.exit_index == 0).sum()) < 20
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert accelerate_for_worker(eager, "none", sample_file) is eager


def test_worker_serves_eager_and_says_why_without_the_package(
    sample_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    eager = make_cached()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it gives
    with caplog.at_level(logging.WARNING, logger="layercache.serving"):
        assert accelerate_for_worker(eager, "onnx", sample_file) is eager
        assert accelerate_for_worker(eager, "onnx", sample_file.parent / "missing.pt") is eager
    assert "acceleration 'onnx' is not available here" in caplog.text and "'onnxruntime' package" in caplog.text
    assert "has none; serving eager" in caplog.text
