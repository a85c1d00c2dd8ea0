"""The real command-line tools run in-process: make_default_model -> wrap_mar -> record -> build_cache -> serve.

``tools/`` and ``archiver/`` are folders of scripts, not packages: each is loaded from its path the way
``layercache.entry`` does, and its ``main(argv)`` is called.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from layercache.archive import CACHED_HANDLER, RECORDING_HANDLER, read_mar
from layercache.certify import clopper_pearson_upper
from layercache.config import CACHE_SPEC_FILE, EXIT_HEADER, SAMPLE_FILE, CacheSpec
from layercache.datasets import load_fashion_mnist, write_image_folder
from layercache.errors import ConfigError
from layercache.offline import open_mar, run_offline
from layercache.testing.backbones import to_input_32
from layercache.trafficlog import act_nodes_of, read_logs
from tests.helpers import tool, tool_module

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    "archiver/wrap_mar.py",
    "tools/record.py",
    "tools/build_cache.py",
    "tools/make_default_model.py",
    "tools/swap_version.py",
    "tools/bench_device.py",
    "tools/train_backbone.py",
]
IMAGES = 200


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Every artefact of one run of the tools on 200 Fashion-MNIST PNGs (ImageFolder layout)."""
    tmp = tmp_path_factory.mktemp("tools")
    path, root = list(sys.path), logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = load_fashion_mnist("test")
        write_image_folder(images[:IMAGES], labels[:IMAGES], tmp / "images")
        p = {
            "images": tmp / "images",
            "mar": tmp / "fashion.mar",
            "rec": tmp / "fashion_rec.mar",
            "logs": tmp / "logs",
            "cached": tmp / "fashion_cached.mar",
            "report": tmp / "report",
        }
        assert tool("tools/make_default_model.py")(["-o", str(p["mar"]), "--quiet"]) == 0
        wrap = [str(p["mar"]), "-o", str(p["rec"]), "--input-shape", "1,28,28", "--activations", "--quiet"]
        assert tool("archiver/wrap_mar.py")(wrap) == 0
        assert (
            tool("tools/record.py")(
                [
                    "--mar",
                    str(p["rec"]),
                    "--images",
                    str(p["images"]),
                    "--log-dir",
                    str(p["logs"]),
                    "--batch-size",
                    "50",
                    "--quiet",
                ]
            )
            == 0
        )
        assert (
            tool("tools/build_cache.py")(
                [
                    "--mar",
                    str(p["rec"]),
                    "--logs",
                    str(p["logs"]),
                    "-o",
                    str(p["cached"]),
                    "--report",
                    str(p["report"]),
                    "--trials",
                    "1",
                    "--epochs",
                    "30",
                    "--tolerance",
                    "0.2",
                    "--quiet",
                ]
            )
            == 0
        )
        yield p
    finally:
        sys.path[:] = path
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rel", TOOLS)
def test_help_ends_with_examples(rel: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        tool(rel)(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "python " in out.split("examples:")[1]


def test_archives_made_by_the_tools(pipeline: dict[str, Path]) -> None:
    plain, rec, cached = (read_mar(pipeline[k]) for k in ("mar", "rec", "cached"))
    assert (plain.model_name, plain.handler, plain.mode) == ("fashion", "fashion_handler.py", None)
    assert plain.yaml_config["batchSize"] == 8
    assert (rec.model_name, rec.handler, rec.mode, rec.inner_handler) == (
        "fashion",
        RECORDING_HANDLER,
        "record",
        "fashion_handler.py",
    )
    assert rec.yaml_config["batchSize"] == 8
    assert (cached.handler, cached.mode, cached.inner_handler, cached.version) == (
        CACHED_HANDLER,
        "cached",
        "fashion_handler.py",
        "1.0-cached",
    )
    assert {"fashion_handler.py", "index_to_name.json", CACHE_SPEC_FILE, SAMPLE_FILE} <= set(cached.names)
    assert RECORDING_HANDLER not in cached.names


def test_record_logs_every_image_with_its_folder_label(pipeline: dict[str, Path]) -> None:
    table = read_logs(pipeline["logs"])
    assert table.num_rows == IMAGES
    labels = load_fashion_mnist("test")[1][:IMAGES]
    # record.py reads the files in sorted order: <label>/<index>.png.
    expected = sorted((str(int(lbl)), f"{i:05d}") for i, lbl in enumerate(labels))
    assert table.column("label").to_pylist() == [lbl for lbl, _ in expected]
    assert set(table.column("exit").to_pylist()) == {"backbone"}
    assert act_nodes_of(table.schema)  # pooled activations of the automatically found candidates
    assert table.column("input_shape").to_pylist()[0] == [1, 28, 28]


def test_build_report_and_spec(pipeline: dict[str, Path]) -> None:
    report = json.loads((pipeline["report"] / "report.json").read_text())
    assert report["rows"]["total"] == IMAGES and report["tolerance"] == 0.2
    assert report["output"] == str(pipeline["cached"]) and report["version"] == "1.0-cached"
    assert report["mean_flops_cached"] <= report["mean_flops_original"]
    assert report["gt_accuracy_original"] is not None  # the folder labels reach the report
    assert (pipeline["report"] / "report.md").is_file()
    assert [c["node"] for c in report["candidates"]][:2] == ["layer1.0.relu_1", "layer1.1.relu_1"]
    assert len(list(pipeline["report"].glob("head_*.png"))) == sum(bool(c["curve"]) for c in report["candidates"])
    assert "policy" not in report  # only with --policy


def test_cached_archive_answers_every_image_with_an_exit_header(pipeline: dict[str, Path], tmp_path: Path) -> None:
    served = open_mar(
        pipeline["cached"], tmp_path / "cached", as_served=True, handler_overrides={"log_dir": str(tmp_path / "logs")}
    )
    spec = CacheSpec.load(tmp_path / "cached" / CACHE_SPEC_FILE)
    original = open_mar(pipeline["mar"], tmp_path / "original")
    files = sorted(p for p in pipeline["images"].rglob("*.png"))
    exits = []
    for start in range(0, len(files), 50):
        rows = [{"data": f.read_bytes()} for f in files[start : start + 50]]
        answers, codes = run_offline(served, rows)
        assert codes == [200] * len(rows)
        headers = [served.context.get_response_headers(i)[EXIT_HEADER] for i in range(len(rows))]
        exits += headers
        h = original.handler
        expected = h.postprocess(h.inference(h.preprocess(rows)))
        for answer, want, exit_ in zip(answers, expected, headers, strict=True):
            assert len(answer) == 3  # FashionHandler's top 3 class names
            assert set(answer) <= set(
                json.loads((ROOT / "examples/fashion_cnn/index_to_name.json").read_text()).values()
            )
            if exit_ == "backbone":
                assert list(answer) == list(want)
                assert np.allclose(list(answer.values()), list(want.values()), atol=1e-5)
    assert len(exits) == IMAGES
    assert set(exits) <= {"backbone", *spec.nodes}
    if spec.exits:
        assert set(exits) - {"backbone"}, "the cache has exits, some of the 200 images should take one"


def test_build_cache_refuses_to_overwrite(pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        tool("tools/build_cache.py")(
            ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "-o", str(pipeline["cached"])]
        )
    assert info.value.code == 2
    assert "fashion_cached.mar exists; pass --force to overwrite it" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "match"), [("empty", "no recorded rows in"), ("missing", "does not exist")])
def test_build_cache_without_logs(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str, match: str
) -> None:
    logs = tmp_path / "logs"
    if make == "empty":
        logs.mkdir()
    rc = tool("tools/build_cache.py")(
        ["--mar", str(pipeline["rec"]), "--logs", str(logs), "-o", str(tmp_path / "out.mar"), "--quiet"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "ERROR" in err and match in err and str(logs) in err
    assert not (tmp_path / "out.mar").exists()


def test_build_cache_list_layers(pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        tool("tools/build_cache.py")(
            ["--mar", str(pipeline["mar"]), "--logs", str(pipeline["logs"]), "--list-layers", "--quiet"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "candidate layers (fx node names):" in out
    assert "  layer1.0.relu_1  shape=[16, 28, 28]" in out
    assert "all layers with a single live value:" in out


def test_user_mistakes_are_parser_errors(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        ("archiver/wrap_mar.py", [str(pipeline["mar"]), "-o", str(pipeline["rec"])], "exists; pass --force"),
        (
            "archiver/wrap_mar.py",
            [str(pipeline["mar"]), "-o", str(tmp_path / "x.mar"), "--input-shape", "3x32"],
            "must be comma-separated ints",
        ),
        (
            "tools/record.py",
            ["--mar", str(pipeline["rec"]), "--images", str(tmp_path / "none"), "--log-dir", str(tmp_path / "l")],
            "is not a folder",
        ),
        (
            "tools/build_cache.py",
            ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"])],
            "-o/--output is required",
        ),
        (
            "tools/build_cache.py",
            [
                "--mar",
                str(pipeline["rec"]),
                "--logs",
                str(pipeline["logs"]),
                "-o",
                str(tmp_path / "y.mar"),
                "--tolerance",
                "1.5",
            ],
            "must be in \\(0, 1\\)",
        ),
        (
            "tools/build_cache.py",
            ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "-o", str(tmp_path / "z.mar")]
            + ["--confidence", "1.2"],
            "--confidence 1.2 must be in \\(0.5, 1\\)",
        ),
        ("tools/make_default_model.py", ["-o", str(pipeline["mar"])], "exists; pass --force"),
    ]
    for rel, argv, match in cases:
        with pytest.raises(SystemExit) as info:
            tool(rel)(argv)
        assert info.value.code == 2, rel
        err = capsys.readouterr().err
        assert re.search(match, err), (rel, err)


def test_record_refuses_an_archive_that_does_not_record(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = tool("tools/record.py")(
        [
            "--mar",
            str(pipeline["mar"]),
            "--images",
            str(pipeline["images"]),
            "--log-dir",
            str(tmp_path / "logs"),
            "--limit",
            "2",
            "--quiet",
        ]
    )
    assert rc == 1
    assert "is not a recording archive. Hint: wrap it first with archiver/wrap_mar.py" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_build_cache_policy_is_measured_and_shipped(pipeline: dict[str, Path], tmp_path: Path) -> None:
    # Its own build: a measured policy may pick "backbone" on a noisy machine, which the exit tests must not see.
    out, report_dir = tmp_path / "policy.mar", tmp_path / "report"
    argv = ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "-o", str(out), "--report", str(report_dir)]
    assert (
        tool("tools/build_cache.py")(
            [*argv, "--trials", "1", "--epochs", "30", "--tolerance", "0.2", "--policy", "--policy-source", "startup"]
            + ["--quiet"]
        )
        == 0
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["policy"]) == {"1", "8", "16", "32", "64", "128"}
    assert read_mar(out).yaml_config["layercache"]["policy_source"] == "startup"
    assert set(report["policy"].values()) <= {"shrink", "noshrink", "backbone"}
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("layercache_cache.json"))["policy"] == report["policy"]


def test_bench_device_measures_a_bundle_without_torchserve(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """The GPU benchmark's bundle format, run here on the CPU: answers, latency rows per variant, and a policy."""
    from layercache.config import HEADS_FILE
    from layercache.offline import open_mar
    from layercache.replay import LoggedInputs

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with zipfile.ZipFile(pipeline["cached"]) as zf:
        for name in (CACHE_SPEC_FILE, HEADS_FILE):
            (bundle / name).write_bytes(zf.read(name))
        (bundle / "model.py").write_bytes(zf.read("fashion_cnn.py"))
        (bundle / "backbone.pt").write_bytes(zf.read("fashion_cnn.pt"))
    table = read_logs(pipeline["logs"])
    labels = torch.tensor([int(v) for v in table.column("label").to_pylist()])
    original = open_mar(pipeline["mar"], tmp_path / "original")
    x = LoggedInputs(table, original.preprocess).batch(np.arange(table.num_rows))
    torch.save({"x": x.half(), "labels": labels}, bundle / "eval.pt")
    (bundle / "bundle.json").write_text(json.dumps({"model_class": "FashionCNN"}))
    out = tmp_path / "out"
    argv = ["--bundle", str(bundle), "--device", "cpu", "--batches", "1,4", "--repeats", "1", "--policy-repeats", "1"]
    assert tool("tools/bench_device.py")([*argv, "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "device.json").read_text())
    assert res["answers"]["n"] == IMAGES and 0.5 < res["answers"]["agreement"] <= 1.0
    assert abs(sum(res["answers"]["exits"].values()) - 1.0) < 1e-9
    assert set(res["latency"]) == {"shrink", "noshrink", "heads skipped", "heads never fire", "policy"}
    for rows in res["latency"].values():
        assert [r["batch"] for r in rows] == [1, 4] and all(r["original_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert set(res["policy"]) == {"1", "4"}
    assert "| 4 |" in (out / "DEVICE.md").read_text()

    (bundle / "eval.pt").unlink()
    assert tool("tools/bench_device.py")([*argv, "--out", str(out)]) == 1  # the message names the missing file


def test_train_backbone_inputs_are_the_served_ones_and_weights_load(tmp_path: Path) -> None:
    """The second benchmark workload: trained on what its handler serves, and archivable as a TorchServe model."""
    import importlib.util

    from PIL import Image

    train = tool_module("tools/train_backbone.py")
    spec = importlib.util.spec_from_file_location(
        "fmnist_resnet_handler", ROOT / "examples" / "resnet18_fmnist" / "fmnist_resnet_handler.py"
    )
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    images, _ = load_fashion_mnist("test")
    served = torch.stack([handler._to_input(Image.fromarray(im)) for im in images[:4]])
    assert torch.allclose(to_input_32(images[:4]), served, atol=1e-6)

    out = tmp_path / "m.pt"
    argv = ["--arch", "mobilenet_v2", "-o", str(out), "--samples", "64", "--epochs", "1", "--device", "cpu"]
    assert tool("tools/train_backbone.py")([*argv, "--quiet"]) == 0
    model = train.load_model("mobilenet_v2")
    model.load_state_dict(torch.load(out, weights_only=True))  # every key, every shape
    assert model(served).shape == (4, 10)
    with pytest.raises(SystemExit):
        tool("tools/train_backbone.py")(argv)  # exists, no --force
    with pytest.raises(ConfigError, match="unknown --arch"):
        train.load_model("vgg")


def test_build_cache_confidence_sets_the_margin(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """--confidence reaches the thresholds' bound: a surer build needs a larger tolerance floor."""
    from statistics import NormalDist

    from layercache.build import min_tolerance

    argv = ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "--trials", "1", "--epochs", "5"]
    argv += ["--tolerance", "0.2", "--rule", "per-head", "--confidence", "0.99", "-o", str(tmp_path / "c.mar")]
    argv += ["--report", str(tmp_path)]
    assert tool("tools/build_cache.py")([*argv, "--quiet"]) == 0
    sure = json.loads((tmp_path / "report.json").read_text())
    n_val = sure["rows"]["val"]
    assert sure["promise"]["rule"] == "per-head"
    assert sure["min_tolerance"] == pytest.approx(min_tolerance(n_val, NormalDist().inv_cdf(0.99)))
    assert sure["min_tolerance"] > min_tolerance(n_val, 1.28)


def test_build_cache_delta_sets_the_certified_promise(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """--delta reaches the certificate: the default report states the promise at 0.05, a surer one at 0.01."""
    default = json.loads((pipeline["report"] / "report.json").read_text())
    assert default["promise"]["rule"] == "certified" and default["promise"]["delta"] == 0.05
    argv = ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "--trials", "1", "--epochs", "5"]
    argv += ["--tolerance", "0.2", "--delta", "0.01", "-o", str(tmp_path / "d.mar"), "--report", str(tmp_path)]
    assert tool("tools/build_cache.py")([*argv, "--quiet"]) == 0
    sure = json.loads((tmp_path / "report.json").read_text())
    n = sure["promise"]["rows"]
    assert sure["promise"]["delta"] == 0.01 and sure["min_tolerance"] > default["min_tolerance"]
    assert sure["promise"]["upper_bound"] == pytest.approx(
        clopper_pearson_upper(sure["promise"]["disagreements"], n, 0.01)
    )


def test_bench_parses_soak_seconds(tmp_path: Path) -> None:
    """--soak-seconds has its flag again (BenchArgs read it without one, so every bench run failed at startup)."""
    bench = tool_module("tools/bench.py")
    args, quiet = bench.parse_args(["--out", str(tmp_path), "--soak-seconds", "30", "--sections", "soak"])
    assert args.soak_seconds == 30.0 and args.sections == ("soak",) and not quiet
    assert bench.parse_args([])[0].soak_seconds == 600.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "nope"])


def test_build_strict_refuses_an_unreadable_log_part_naming_it(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect (a corrupt part blocked every build): without --strict the part is skipped (tested in
    test_trafficlog); with --strict the build refuses and names the file, as the issue asks."""
    import shutil

    logs = tmp_path / "logs"
    shutil.copytree(pipeline["logs"], logs)
    part = sorted(logs.glob("part-*.parquet"))[0]
    with open(part, "r+b") as handle:
        handle.truncate(part.stat().st_size // 2)
    argv = ["--mar", str(pipeline["rec"]), "--logs", str(logs), "-o", str(tmp_path / "c.mar"), "--strict", "--quiet"]
    capsys.readouterr()
    assert tool("tools/build_cache.py")(argv) == 1
    assert str(part) in capsys.readouterr().err
    assert not (tmp_path / "c.mar").exists()


def test_build_since_and_sample_seed_choose_the_rows(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """--since / --sample-seed reach read_logs (issue #10 asked for them on the command line): a time after every
    logged row leaves none to build from, and a zone-less time reads as UTC."""
    from layercache.cli import build

    base = ["--mar", str(pipeline["rec"]), "--logs", str(pipeline["logs"]), "-o", str(tmp_path / "c.mar")]
    args, _ = build.parse_args(build.build_parser(), [*base, "--since", "2026-12-01T08:00", "--sample-seed", "3"])
    assert args.request.since.isoformat() == "2026-12-01T08:00:00+00:00" and args.request.sample_seed == 3
    assert tool("tools/build_cache.py")([*base, "--since", "2999-01-01T00:00Z", "--quiet"]) == 1
    assert not (tmp_path / "c.mar").exists()
    with pytest.raises(SystemExit):
        tool("tools/build_cache.py")([*base, "--since", "yesterday"])


def test_bench_alternatives_section_renders_the_comparison(tmp_path: Path) -> None:
    from layercache.testing.alternatives import compare
    from tests.unit.test_alternatives import make_models

    bench = tool_module("tools/bench.py")
    assert bench.parse_args(["--out", str(tmp_path), "--sections", "alternatives"])[0].sections == ("alternatives",)
    assert bench.STEPS["alternatives"] is bench.step_alternatives
    backbone, cached = make_models()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    result = compare(backbone, cached, x, x[:4], kinds=("none",), batches=(1, 4), repeats=1, rounds=1, threads=1)
    md = "\n".join(bench._md_alternatives({"alternatives": result.to_dict()}))
    assert "| eager original | " in md and "| eager cached | " in md and "(1.00x)" in md
    assert md.count("batch 1 |") == 1 and "batch 4" in md and "12 unseen images" in md


def test_bench_search_only_sections_record_but_build_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A certify (or tradeoff) run needs the recorded logs and one head search, not a built cache: it records and
    skips the build (a whole build's time on 2 cores); any other section still builds first."""
    bench = tool_module("tools/bench.py")
    calls: list[str] = []

    class FakeBench:
        def __init__(self, args) -> None:
            self.args, self.paths, self.res = args, {}, {"machine": "m", "date": "d"}

        def save(self) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr(bench, "Bench", FakeBench)
    monkeypatch.setattr(bench, "record_only", lambda paths: calls.append("record"))
    monkeypatch.setattr(bench, "step_build", lambda b: calls.append("build"))
    for name in ("certify", "tradeoff", "tables"):
        monkeypatch.setitem(bench.STEPS, name, lambda b, name=name: calls.append(name))
    bench.run_bench(bench.parse_args(["--out", str(tmp_path), "--sections", "certify,tradeoff"])[0], "cmd")
    assert calls == ["record", "tradeoff", "certify"]
    calls.clear()
    bench.run_bench(bench.parse_args(["--out", str(tmp_path), "--sections", "certify,tables"])[0], "cmd")
    assert calls == ["build", "tables", "certify"]


def test_bench_verification_section_times_the_workers_shares_and_renders(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tests.unit.test_alternatives import make_models

    bench = tool_module("tools/bench.py")
    assert bench.parse_args(["--out", str(tmp_path), "--sections", "verification"])[0].sections == ("verification",)
    _, cached = make_models()
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    result = bench.verification_cost(SimpleNamespace(cached=cached, x=x), repeats=2, batches=(1, 4), rows=400)
    # One head: its share is the base fraction, and about that share of the hits was verified in the timed passes.
    assert result["shares"] == [0.02] and 0.005 < result["verified_share_of_hits"] < 0.05
    assert [r["batch"] for r in result["rows"]] == [1, 4] and all(r["ratio"] > 0 for r in result["rows"])
    assert result["rows_per_pass"] == 400
    md = "\n".join(bench._md_verification({"verification": result}))
    assert "| batch | no verification | verification |" in md and "% of all hits verified" in md
    served = [{"concurrency": 8, "unverified_rps": 80.0, "verified_rps": 79.0, "rps_ratio": 0.9875,
               "rps_ratio_range": [0.97, 1.01], "errors": 0}]  # fmt: skip
    md = "\n".join(bench._md_verification({"verification": {**result, "served": served}}))
    assert "| 8 | 80.0 | 79.0 | 0.988 (0.970-1.010) | 0 |" in md


def test_bench_verification_flops_are_the_verified_rows_remaining_layers() -> None:
    bench = tool_module("tools/bench.py")
    report = {"mean_flops_original": 100.0, "mean_flops_cached": 40.0,
              "exits": [{"node": "a", "flops_remaining": 80.0}, {"node": "b", "flops_remaining": 20.0}]}  # fmt: skip
    f = bench.verification_flops(report, hit_rates=[0.5, 0.2], shares=[0.1, 0.5])
    # (0.5 x 0.1 x 80 + 0.2 x 0.5 x 20) / 40, and with 0.02 of every hit (0.5 x 0.02 x 80 + 0.2 x 0.02 x 20) / 40
    assert f["extra_of_cached"] == pytest.approx(0.15) and f["extra_of_cached_uniform"] == pytest.approx(0.022)
    assert [h["remaining_of_original"] for h in f["heads"]] == [0.8, 0.2] and f["cached_of_original"] == 0.4
    md = "\n".join(
        bench._md_verification(
            {
                "verification": {
                    "verify_fraction": 0.02,
                    "shares": [0.1, 0.5],
                    "verified_share_of_hits": 0.02,
                    "rows": [],
                    "flops": f,
                }
            }
        )
    )
    assert "| `a` | 50.00% | 0.100 | 0.800 | 10.00% |" in md and "In all 15.00% of the cached model's FLOPs" in md


def test_bench_interleaved_loads_send_one_sample_to_every_model_and_alternate_the_order(monkeypatch) -> None:
    bench = tool_module("tools/bench.py")
    calls = []

    def fake_load(url, sample, concurrency, names, token):
        calls.append((url.rsplit("_", 1)[1], tuple(sample), concurrency))
        return None, {"rps": float(len(calls))}

    monkeypatch.setattr(bench, "load", fake_load)
    blobs = [bytes([i]) for i in range(20)]
    per = bench.interleaved_loads("http://x", None, {}, blobs, ("a", "b"), 4, repeats=3, n_requests=5)
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "a", "b"]  # reversed every other repeat
    assert calls[0][1] == calls[1][1] != calls[2][1] == calls[3][1]  # one sample per repeat, for both models
    assert all(len(c[1]) == 5 and c[2] == 4 for c in calls)
    assert [x["rps"] for x in per["a"]] == [1.0, 4.0, 5.0] and len(per["b"]) == 3
