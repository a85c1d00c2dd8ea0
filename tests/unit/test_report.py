"""Tests for layercache.report: report.json, report.md and one PNG per candidate with a curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from layercache.report import markdown, write_report

NAN = float("nan")


def _curve(hit_rate: list[float], accuracy: list[float], gt: bool = False) -> dict[str, list[float]]:
    curve = {"threshold": [0.0, 0.5, 1.0], "hit_rate": hit_rate, "cache_accuracy": accuracy}
    if gt:
        curve["gt_accuracy"] = [0.8, 0.9, NAN]
    return curve


def make_report() -> dict[str, Any]:
    """A report as layercache.build makes it: two exits, one candidate discarded (no curve)."""
    exits = [
        {
            "node": "layer1.0.relu_1",
            "threshold": 0.9,
            "hit_rate": 0.4,
            "cache_accuracy": 0.99,
            "gt_accuracy": None,
            "accuracy_effect": None,
            "hits": 120,
            "head": "p1",
            "temperature": 1.3,
            "head_flops": 1290,
            "head_params": 650,
            "flops_remaining": 30_000_000,
        },
        {
            "node": "layer2.1.relu_1",
            "threshold": 0.75,
            "hit_rate": 0.25,
            "cache_accuracy": NAN,
            "gt_accuracy": 0.9125,
            "accuracy_effect": 0.001,
            "hits": 75,
            "head": "p4-c32k3s1",
            "temperature": 0.8,
            "head_flops": 80_000,
            "head_params": 5000,
            "flops_remaining": 12_000_000,
        },
    ]
    candidates = [
        {
            "node": "layer1.0.relu_1",
            "shape": [16, 28, 28],
            "flops_prefix": 15_000_000,
            "flops_remaining": 30_000_000,
            "head": "p1",
            "val_agreement": 0.95,
            "temperature": 1.3,
            "discarded": None,
            "trials": [],
            "selected": True,
            "curve": _curve([1.0, 0.6, 0.0], [0.9, 0.97, NAN], gt=True),
        },
        {
            "node": "layer2.1.relu_1",
            "shape": [32, 14, 14],
            "flops_prefix": 33_000_000,
            "flops_remaining": 12_000_000,
            "head": "p4-c32k3s1",
            "val_agreement": 0.97,
            "temperature": 0.8,
            "discarded": None,
            "trials": [],
            "selected": True,
            "curve": _curve([1.0, 0.7, 0.1], [0.93, 0.98, 1.0]),
        },
        {
            "node": "layer3.0.relu_1",
            "shape": [64, 7, 7],
            "flops_prefix": 40_000_000,
            "flops_remaining": 5_000_000,
            "head": None,
            "val_agreement": 0.0,
            "temperature": 1.0,
            "discarded": "no head beat chance (0.100)",
            "trials": [],
            "selected": False,
            "curve": {},
        },
    ]
    return {
        "tolerance": 0.01,
        "cost": "flops",
        "flops_counter": "FlopCounterMode",
        "rows": {"total": 1000, "train": 500, "val": 200, "test": 300},
        "mean_flops_original": 45_000_000.0,
        "mean_flops_cached": 30_000_000.0,
        "flops_ratio": 2 / 3,
        "oracle_flops": 20_000_000.0,
        "achieved_over_oracle": 1.5,
        "oracle_flops_selected": 24_000_000.0,
        "achieved_over_oracle_selected": 1.25,
        "hindsight_flops_selected": 27_000_000.0,
        "hindsight_over_oracle_selected": 1.125,
        "agreement": 0.995,
        "gt_accuracy_original": 0.91,
        "gt_accuracy_cached": 0.905,
        "selection_score": 0.3,
        "exits": exits,
        "candidates": candidates,
        "model_bytes": {"backbone": 2**20, "heads": 2**16, "growth": 0.0625},
        "replay": {"rows_same_weights": 1000, "rows_compared": 1000, "prediction_agreement": 1.0},
        "build_seconds": 12.5,
        "scores": np.array([0.5, 0.25]),
    }


def _strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("report") / "reports" / "fashion"  # parents are created
    return out, write_report(make_report(), out)


def test_write_report_files(written: tuple[Path, list[Path]]) -> None:
    out, paths = written
    assert [p.name for p in paths] == [
        "report.json",
        "report.md",
        "head_layer1_0_relu_1.png",
        "head_layer2_1_relu_1.png",
    ]
    assert all(p.is_file() and p.parent == out for p in paths)
    assert not (out / "head_layer3_0_relu_1.png").exists()  # discarded: no curve, no plot


def test_report_json_is_strict_json(written: tuple[Path, list[Path]]) -> None:
    data = _strict((written[0] / "report.json").read_text())  # NaN / Infinity are not JSON
    assert data["tolerance"] == 0.01 and data["mean_flops_cached"] == 30_000_000.0
    assert [e["node"] for e in data["exits"]] == ["layer1.0.relu_1", "layer2.1.relu_1"]
    assert data["exits"][1]["cache_accuracy"] == "nan"
    assert data["candidates"][0]["curve"]["cache_accuracy"] == [0.9, 0.97, "nan"]
    assert data["scores"] == [0.5, 0.25]  # numpy arrays become lists


def test_report_json_with_infinite_threshold_and_numpy_nan(tmp_path: Path) -> None:
    report = make_report()
    report["exits"][0]["threshold"] = math.inf
    report["scores"] = np.array([np.nan, 1.0])
    write_report(report, tmp_path)
    data = _strict((tmp_path / "report.json").read_text())
    assert data["exits"][0]["threshold"] == "inf" and data["scores"] == ["nan", 1.0]


def test_report_markdown_lists_exits_and_candidates(written: tuple[Path, list[Path]]) -> None:
    md = (written[0] / "report.md").read_text()
    assert md == markdown(make_report())
    assert "| 1 | `layer1.0.relu_1` | p1 | 0.9000 | 40.00% | 99.00% | n/a | n/a |" in md
    assert "| 2 | `layer2.1.relu_1` | p4-c32k3s1 | 0.7500 | 25.00% | n/a | 91.25% | 0.10% |" in md
    assert "| 45.0M | 30.0M | 0.667 | 24.0M | 1.250 | 20.0M | 1.500 |" in md
    assert "| `layer3.0.relu_1` | [64, 7, 7] | 5.0M | - | 0.00% |  | no head beat chance (0.100) |" in md
    assert "| `layer1.0.relu_1` | [16, 28, 28] | 30.0M | p1 | 95.00% | yes |  |" in md
    assert "Agreement with the backbone: 99.50%" in md
    assert "Hindsight thresholds: 27.0M (1.125 x the selected heads' oracle)" in md
    assert "agreement >= 99.00%" in md
    assert "Build time: 12.5 s." in md


def test_report_markdown_without_exits() -> None:
    report = make_report()
    report["exits"] = []
    report["achieved_over_oracle"] = None
    md = markdown(report)
    assert "| - | no head pays off at this tolerance | | | | | | |" in md
    assert "| nan |" in md
    del report["hindsight_flops_selected"]  # reports written before the hindsight figure existed
    assert "Hindsight" not in markdown(report)
    assert "can vouch for" not in md
    report["min_tolerance"] = 0.02
    assert "Tolerance 0.01 is below the 0.0200 that 200 validation rows can vouch for" in markdown(report)


@pytest.mark.parametrize("name", ["head_layer1_0_relu_1.png", "head_layer2_1_relu_1.png"])
def test_plots_draw_the_curves(written: tuple[Path, list[Path]], name: str) -> None:
    with Image.open(written[0] / name) as image:
        assert image.format == "PNG" and image.size == (500, 350)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # matplotlib's first two line colours: the hit-rate and cache-accuracy curves are drawn.
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (pixels == colour).all(axis=1).sum() > 50
