"""Benchmarks: the paper's tables (section 5) for original vs cached, measured side by side in one run.

Workload (``--workload``): the benchmark ResNet-18 (CIFAR stem) trained on Fashion-MNIST in ``../shared/backbones``
(``resnet18``, the headline), or torchvision's stock MobileNetV2 trained here by ``tools/train_backbone.py`` on
first use (``mobilenet_v2``, same inputs and handler). The first 7,000 test images are the recorded traffic, the
last 3,000 are never seen by the build and are what every table is measured on. Sections (``--sections``):

* ``trunk``: TorchServe end to end on the 3,000 unseen images: agreement, GT accuracy, mean FLOPs from the exits.
* ``tables``: Table 2 (per exit), Table 3 (FLOPs, oracle), Table 4 (size, live tensor memory).
* ``latency``: Table 5/6, model latency per batch at batch 1..128 on this CPU, original and cached interleaved.
* ``overhead``: cached model whose heads never fire vs original (the price of the heads).
* ``policy``: the per-batch-size mode (shrink / noshrink / backbone) ``build_cache.py --policy`` would pick here.
* ``recording``: the recording handler vs the original handler in process, per batch (what recording costs).
* ``verification``: the cached model with online verification at ``verify_fraction`` 0.02 (each head's share as a
  worker gives it) vs without, in process per batch, and through TorchServe (what verification costs).
* ``serving``: closed-loop load through TorchServe, original vs cached vs recording, several concurrencies.
* ``tradeoff``: accuracy/FLOPs across tolerances (one search, thresholds and selection per tolerance).
* ``drift``: blurred, noised unseen images to the static, guarded and refreshed cache through TorchServe.
* ``soak``: ``--soak-seconds`` of load on the cached archive with recording and verification on, with a swap, a
  rollback and worker scaling meanwhile: errors, worker memory and fds, log dir size.
* ``certify``: the certified rule against the per-head rule at tolerances 0.005-0.05 over ``--seeds`` builds that
  resample the held-out rows: FLOPs and agreement on the unseen images, and how often each breaks its promise.
* ``photos224``: the 224-px workload (:mod:`layercache.testing.workload224`): EfficientNet-Lite0 with ImageNet
  weights from a registry package on JPEG crops of real photos, through TorchServe: log bytes per request against
  the bodies, recording overhead, build time and peak RSS, agreement, exits, FLOPs and served throughput.
* ``buildmem``: build time and peak RSS (a child process) on the workload's log grown to 10k, 50k and 200k rows
  (:mod:`layercache.testing.biglogs`): the build reads the newest ``--max-rows`` (20,000) whatever the log holds.
* ``alternatives``: the original and the cached model on eager PyTorch, ``torch.compile``, int8 (PT2E) and ONNX
  Runtime (:mod:`layercache.testing.alternatives`), interleaved at batch 1, 8, 32, 128 on 2 threads: latency,
  ratio to the fastest original, agreement with the eager backbone on the unseen images.
* ``bundle``: ``OUT/device-bundle``, what ``tools/bench_device.py`` needs to measure the model on another device
  (the GPU tables) with no TorchServe and no ``../shared`` there.

Results go to ``OUT/bench.json``, PNGs in OUT, and a Markdown section printed and written to ``OUT/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from layercache.archive import archive_classifier, wrap_for_recording  # noqa: E402
from layercache.build import BuildConfig  # noqa: E402
from layercache.cli import run_command, setup_logging  # noqa: E402
from layercache.config import HandlerConfig  # noqa: E402
from layercache.datasets import load_fashion_mnist, write_image_folder  # noqa: E402
from layercache.errors import LayercacheError  # noqa: E402
from layercache.evaluation import (  # noqa: E402
    Answers,
    exit_flops,
    exit_table,
    from_run,
    markdown_table,
    model_answers,
    name_to_index,
    pct,
    score,
    summarize_latency,
)
from layercache.loading import load_cached  # noqa: E402
from layercache.offline import open_mar, record_images, run_offline  # noqa: E402
from layercache.pipeline import BuildRequest, build_cached_archive  # noqa: E402
from layercache.progress import progress  # noqa: E402
from layercache.runtime import BACKBONE_EXIT, CachedModel  # noqa: E402
from layercache.testing.backbones import machine  # noqa: E402
from layercache.testing.bundle import write_bundle  # noqa: E402
from layercache.testing.load import Run, send_all  # noqa: E402
from layercache.timing import latency_rows  # noqa: E402

logger = logging.getLogger("bench")


class BenchError(LayercacheError):
    """A benchmark step cannot run (missing weights, data or a failed step): exit status 1."""


ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "resnet18_fmnist"
SHARED = ROOT.parent / "shared" / "backbones" / "resnet18_fmnist.fp16.pt"


@dataclass(frozen=True)
class Workload:
    """A benchmarked classifier: its TorchServe model file and class, handler and weights.

    ``weights`` None: trained by ``tools/train_backbone.py --arch <arch>`` into ``OUT/backbone.pt`` on first use.
    """

    arch: str
    name: str
    model_file: Path
    model_class: str
    handler: Path
    weights: Path | None


WORKLOADS = {
    "resnet18": Workload(
        "resnet18",
        "resnet18_fmnist",
        EXAMPLE / "resnet18_cifar.py",
        "ResNet18CIFAR",
        EXAMPLE / "fmnist_resnet_handler.py",
        SHARED,
    ),
    "mobilenet_v2": Workload(
        "mobilenet_v2",
        "mobilenet_v2_fmnist",
        ROOT / "examples" / "mobilenet_v2_fmnist" / "mobilenet_v2_fmnist.py",
        "MobileNetV2FMNIST",
        EXAMPLE / "fmnist_resnet_handler.py",  # the same 3x32x32 Fashion-MNIST preprocessing
        None,
    ),
}
SECTIONS = (
    "trunk", "tables", "latency", "overhead", "policy", "recording", "verification", "serving", "tradeoff",
    "certify", "bundle", "drift", "soak", "photos224", "buildmem", "alternatives",
)  # fmt: skip
#: The handler's default ``verify_fraction``, whose cost the ``verification`` section measures.
VERIFY_FRACTION = HandlerConfig.verify_fraction
#: Sections with a workload of their own: a run of only these does not record and build the headline model.
OWN_WORKLOAD = {"photos224"}
#: Sections that re-threshold one head search of the recorded logs: a run of only these records, and builds nothing.
SEARCH_ONLY = {"tradeoff", "certify"}
BUILDMEM_ROWS = (10_000, 50_000, 200_000)
BUILDMEM_ARGS = ("--trials", "1", "--epochs", "4")  # the memory is the point; fewer trials keep three builds short
CERTIFY_TOLERANCES = (0.005, 0.01, 0.02, 0.05)
BATCHES = (1, 8, 16, 32, 64, 128)
ALTERNATIVE_BATCHES = (1, 8, 32, 128)
TOLERANCES = (0.0025, 0.005, 0.01, 0.02, 0.05)

EPILOG = """examples:
  python tools/bench.py --out bench-out                      # everything (about 25 minutes on 2 cores)
  python tools/bench.py --out bench-out --sections latency,overhead --repeats 7
  python tools/bench.py --out bench-out --sections trunk --tolerance 0.01
  python tools/bench.py --workload mobilenet_v2 --out bench-out/mobilenet_v2 --sections tables,latency,tradeoff
"""


# --------------------------------------------------------------------------------------------------- workload
def prepare(out: Path, traffic: int, evaluate: int, workload: Workload = WORKLOADS["resnet18"]) -> dict[str, Path]:
    """Archive the workload's classifier as a plain .mar, wrap it, write traffic and evaluation images."""
    weights = workload.weights or out / "backbone.pt"
    if workload.weights is None and not weights.is_file():
        raise BenchError(
            f"{weights} not found: train it first with python tools/train_backbone.py --arch {workload.arch} "
            f"-o {weights}"
        )
    if not weights.is_file():
        raise BenchError(f"benchmark backbone {weights} not found (the benchmarks read ../shared/backbones)")
    store = out / "model-store"
    paths = {
        "weights": weights,
        "store": store,
        "mar": store / f"{workload.name}.mar",
        "rec": store / f"{workload.name}_rec.mar",
        "cached": store / f"{workload.name}_cached.mar",
        "logs": out / "logs",
        "report": out / "report",
        "traffic": out / "traffic",
        "eval": out / "eval",
    }
    if not paths["mar"].exists():
        archive_classifier(
            model_name=workload.name,
            version="1.0",
            model_file=workload.model_file,
            weights=weights,
            handler=workload.handler,
            output=paths["mar"],
            extra_files=[EXAMPLE / "index_to_name.json"],
            config={"batchSize": 8, "maxBatchDelay": 20},
        )
    if not paths["rec"].exists():
        wrap_for_recording(
            paths["mar"],
            paths["rec"],
            handler_config=HandlerConfig(log_dir=str(paths["logs"].resolve()), input_shape=(3, 32, 32)),
        )
    images, labels = load_fashion_mnist("test")
    if not paths["traffic"].exists():
        write_image_folder(images[:traffic], labels[:traffic], paths["traffic"])
    if not paths["eval"].exists():
        start = len(images) - evaluate
        write_image_folder(images[start:], labels[start:], paths["eval"], start=start)
    return paths


def record_only(paths: dict[str, Path]) -> None:
    """Record the traffic images offline (as ``tools/record.py`` does), unless they are logged already."""
    if not any(paths["logs"].glob("*.parquet")):
        record_images(paths["rec"], paths["traffic"], paths["logs"], batch_size=64)


def record_and_build(paths: dict[str, Path], tolerance: float, cost: str) -> dict[str, Any]:
    """Record the traffic images offline (as ``tools/record.py`` does), then build the cache from the logs."""
    record_only(paths)
    t0 = time.perf_counter()
    request = BuildRequest(
        mar=paths["mar"],
        logs=paths["logs"],
        output=paths["cached"],
        config=BuildConfig(tolerance=tolerance, cost=cost),
        report_dir=paths["report"],
        force=True,
    )
    report = build_cached_archive(request).report
    report["bench_build_wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def eval_images(folder: Path) -> tuple[list[bytes], np.ndarray]:
    files = sorted(folder.rglob("*.png"))
    return [p.read_bytes() for p in files], np.array([int(p.parent.name) for p in files])


# --------------------------------------------------------------------------------------------- model-level
class Models:
    """Backbone and cached model loaded from the archives (as a plain nn.Module, no TorchServe), plus the
    preprocessed evaluation set (the original handler's preprocess of each unseen PNG)."""

    def __init__(self, paths: dict[str, Path], tmp: Path) -> None:
        original = open_mar(paths["mar"], tmp / "original")
        self.backbone = original.backbone
        self._cached_mar, self._tmp = paths["cached"], tmp
        self._cached: CachedModel | None = None
        blobs, self.labels = eval_images(paths["eval"])
        self.x = original.preprocess([{"data": b} for b in blobs])

    @property
    def cached(self) -> CachedModel:
        """The built cache (loaded when first asked: the search-only sections never need one)."""
        if self._cached is None:
            self._cached = load_cached(self._cached_mar, self._tmp / "cached")
        return self._cached

    def never_fire(self) -> CachedModel:
        return self.cached.with_thresholds([1.01] * len(self.cached.heads))


@torch.inference_mode()
def tables(models: Models, report: dict[str, Any]) -> dict[str, Any]:
    """Table 2 (per exit, unseen images), Table 3 (FLOPs, oracle), Table 4 (size, live tensor memory)."""
    from layercache.calibration import confidences
    from layercache.selection import HeadEval, hindsight_thresholds, oracle_cost

    x, labels = models.x, models.labels
    reference, cached = model_answers(models.backbone, models.cached, x)
    costs = exit_flops(report)
    scored = score(cached, reference=reference, labels=labels, costs=costs)
    # Oracle: every row leaves at the earliest selected head that agrees with the backbone (no thresholds).
    heads, h = [], x
    for seg, head, t, e in zip(
        models.cached.segments, models.cached.heads, models.cached.temperatures, report["exits"], strict=False
    ):
        h = torch.cat([seg(h[i : i + 256]) for i in range(0, len(h), 256)])
        logits = torch.cat([head(h[i : i + 256]) for i in range(0, len(h), 256)])
        conf, pred = confidences(logits, t)
        heads.append(HeadEval(e["node"], conf, pred, np.zeros(1), e["head_flops"], e["flops_remaining"]))
    flops_oracle = oracle_cost(heads, reference, report["mean_flops_original"])
    # The same heads with the cheapest thresholds for these very images (chosen knowing the backbone's answers).
    _, flops_hindsight, _ = hindsight_thresholds(
        heads, reference, report["mean_flops_original"], 1 - report["tolerance"]
    )
    size_b = sum(t.numel() * t.element_size() for t in models.backbone.state_dict().values())
    size_h = sum(t.numel() * t.element_size() for t in models.cached.heads.state_dict().values())
    return {
        "n": len(x),
        "exits": exit_table(cached, models.cached.nodes, reference, labels),
        "accuracy_original": score(Answers.of(reference), labels=labels)["accuracy"],
        "accuracy_cached": scored["accuracy"],
        "agreement": scored["agreement"],
        "flops_original": report["mean_flops_original"],
        "flops_cached": scored["mean_flops"],
        "flops_oracle": flops_oracle,
        "achieved_over_oracle": scored["mean_flops"] / flops_oracle,
        "flops_hindsight": flops_hindsight,
        "tolerance": report["tolerance"],
        "size_backbone_mb": size_b / 2**20,
        "size_cached_mb": (size_b + size_h) / 2**20,
        "memory": live_memory(models),
    }


def live_memory(models: Models, batch: int = 32, batches: int = 8) -> dict[str, float]:
    """Memory allocated by tensors during inference (torch.profiler, profile_memory=True), MB per batch."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in (("original", models.backbone), ("cached", models.cached)):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(batches):
                fn(models.x[i * batch : (i + 1) * batch])
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        out[name] = allocated / batches / 2**20
    return out


@torch.inference_mode()
def latency(models: Models, repeats: int, seed: int = 0, cached: Any = None) -> list[dict[str, Any]]:
    """Per batch size: original and cached timed interleaved (A B A B) on the same real batches."""
    return latency_rows(models.backbone, cached or models.cached.run, models.x, repeats, seed=seed, batches=BATCHES)


def recording_cost(paths: dict[str, Path], repeats: int, batches: tuple[int, ...] = (1, 8, 32)) -> list[dict[str, Any]]:
    """Handler level, in process: the original handler's preprocess + inference + postprocess vs the recording
    handler's ``handle`` (the same, plus the split model's pooled activations and the Arrow write), on the same PNG
    batches, interleaved. What recording costs without the frontend's share of the two cores."""
    blobs, _ = eval_images(paths["eval"])
    with tempfile.TemporaryDirectory() as tmp:
        original = open_mar(paths["mar"], Path(tmp) / "original")
        rec = open_mar(
            paths["rec"], Path(tmp) / "rec", as_served=True, handler_overrides={"log_dir": str(Path(tmp) / "logs")}
        )
        h = original.handler

        def plain(rows: list[dict[str, bytes]]) -> Any:
            with torch.inference_mode():
                return h.postprocess(h.inference(h.preprocess(rows)))

        with rec:
            out = latency_rows(
                plain, lambda rows: run_offline(rec, rows), [{"data": b} for b in blobs], repeats, batches=batches
            )
    for r in out:  # the "cached" side of these rows is the recording handler
        r["recording_ms"], r["recording_range_ms"] = r.pop("cached_ms"), r.pop("cached_range_ms")
    return out


def verification_flops(report: dict[str, Any], hit_rates: list[float], shares: list[float]) -> dict[str, Any]:
    """What verification adds in FLOPs, from the build report's per-exit FLOPs: a verified hit of head k runs the
    layers after it (``flops_remaining``), so the extra work per request is the sum over heads of hit rate x share x
    those FLOPs. As a share of the cached model's mean FLOPs, with these ``shares`` and with ``VERIFY_FRACTION``
    of every head's hits."""
    cached = report["mean_flops_cached"]
    remaining = [float(e["flops_remaining"]) for e in report["exits"]]
    heads = [{"node": e["node"], "hit_rate": rate, "share": share,
              "remaining_of_original": rest / report["mean_flops_original"],
              "extra_of_cached": rate * share * rest / cached}
             for e, rate, share, rest in zip(report["exits"], hit_rates, shares, remaining, strict=True)]  # fmt: skip
    uniform = sum(rate * VERIFY_FRACTION * rest for rate, rest in zip(hit_rates, remaining, strict=True)) / cached
    return {
        "heads": heads,
        "extra_of_cached": sum(h["extra_of_cached"] for h in heads),
        "extra_of_cached_uniform": uniform,
        "cached_of_original": cached / report["mean_flops_original"],
    }


def verification_cost(
    models: Models,
    repeats: int,
    batches: tuple[int, ...] = (1, 8, 32, 128),
    rows: int = 1000,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """In process: the cached model verifying :data:`VERIFY_FRACTION` of its hits, with each head's share as a
    worker gives it (``CacheMonitor.verify_shares`` on the hit counts of the unseen images), against the same model
    verifying nothing. Per batch size, one pass is the first ``rows`` unseen images in batches of that size, timed
    whole: a throughput, so the rare batches where a verified row runs layers nothing else needed count at their
    full price (a median per batch would not see them). Passes with and without are interleaved, ``repeats`` each;
    ``ratio`` is the median of the paired ratios. With the build's ``report``, also what it adds in FLOPs
    (:func:`verification_flops`, on the unseen images' hit rates)."""
    from layercache.monitor import CacheMonitor, HeadMonitor
    from layercache.timing import interleaved

    model, x = models.cached, models.x
    with torch.inference_mode():
        exits = torch.cat([model.run(x[i : i + 256]).exit_index for i in range(0, len(x), 256)])
    heads = [HeadMonitor(node, 1.0, t, hits=int((exits == k).sum()))
             for k, (node, t) in enumerate(zip(model.nodes, model.thresholds, strict=True))]  # fmt: skip
    shares = CacheMonitor(model, heads, 0.0, "off").verify_shares(VERIFY_FRACTION)
    xs = x[:rows]
    counts = {"verified": 0, "hits": 0}

    def one_pass(b: int, verify: bool) -> None:
        with torch.inference_mode():
            for i in range(0, len(xs), b):
                out = model.run(xs[i : i + b], verify=shares if verify else 0.0)
                if verify:
                    counts["verified"] += int(out.verified.sum())
                    counts["hits"] += int((out.exit_index != BACKBONE_EXIT).sum())

    out_rows = []
    for b in progress(batches, "verification"):
        t = interleaved({"none": lambda b=b: one_pass(b, False), "verified": lambda b=b: one_pass(b, True)},
                        rounds=repeats)  # fmt: skip
        ratios = [v / n for v, n in zip(t["verified"], t["none"], strict=True)]
        out_rows.append({
            "batch": b,
            "unverified_ms": 1e3 * statistics.median(t["none"]) / len(xs),
            "verified_ms": 1e3 * statistics.median(t["verified"]) / len(xs),
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        })  # fmt: skip
    verified = counts["verified"] / max(1, counts["hits"])
    out = {"verify_fraction": VERIFY_FRACTION, "shares": shares, "verified_share_of_hits": verified,
           "rows_per_pass": len(xs), "rows": out_rows}  # fmt: skip
    if report is not None:
        out["flops"] = verification_flops(report, [h.hits / len(exits) for h in heads], shares)
    return out


def verification_served(
    paths: dict[str, Path], concurrencies: list[int], repeats: int, n_requests: int
) -> list[dict[str, Any]]:
    """Through TorchServe: two copies of the cached archive (``with_handler_config``), one verifying at
    :data:`VERIFY_FRACTION` and one not at all, registered side by side, runs interleaved per repeat; per
    concurrency the median req/s and the paired ratio (what verification costs the service's throughput)."""
    from layercache.archive import with_handler_config
    from layercache.testing.torchserve import TorchServeProcess

    blobs, _ = eval_images(paths["eval"])
    names = name_to_index(json.loads((EXAMPLE / "index_to_name.json").read_text()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        store, logs = Path(tmp) / "store", Path(tmp) / "serve-logs"
        store.mkdir()
        with_handler_config(paths["cached"], store / "verified.mar", verify_fraction=VERIFY_FRACTION)
        with_handler_config(paths["cached"], store / "unverified.mar", verify_fraction=0.0)
        with TorchServeProcess(model_store=store, env={"OMP_NUM_THREADS": "2", "LAYERCACHE_LOG_DIR": str(logs)}) as ts:
            client = ts.client()
            for name in ("verified", "unverified"):
                client.register(f"{name}.mar", f"m_{name}", initial_workers=1, batch_size=8, max_batch_delay_ms=20)
            base, token = ts.inference_url, ts.inference_token
            for name in ("verified", "unverified"):  # warm-up, not measured
                load(f"{base}/predictions/m_{name}", blobs[:100], 8, names, token)
            for c in concurrencies:
                per = interleaved_loads(base, token, names, blobs, ("verified", "unverified"), c, repeats, n_requests)
                ratios = [v["rps"] / u["rps"] for v, u in zip(per["verified"], per["unverified"], strict=True)]
                rows.append({
                    "concurrency": c,
                    "unverified_rps": statistics.median(x["rps"] for x in per["unverified"]),
                    "verified_rps": statistics.median(x["rps"] for x in per["verified"]),
                    "rps_ratio": statistics.median(ratios),
                    "rps_ratio_range": [min(ratios), max(ratios)],
                    "errors": sum(x["errors"] for x in per["verified"] + per["unverified"]),
                })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- serving
def load(
    url: str, blobs: list[bytes], concurrency: int, names: dict[str, int], token: str | None
) -> tuple[Run, dict[str, Any]]:
    """Closed loop: ``concurrency`` clients send ``blobs`` (each once) as fast as answers come back; ``token`` is
    the inference key (TorchServe runs with token authorization on)."""
    run = send_all(url, blobs, concurrency, names, desc=url.rsplit("/", 1)[-1], token=token)
    return run, {"concurrency": concurrency, **summarize_latency(from_run(run))}


def interleaved_loads(
    url: str,
    token: str | None,
    names: dict[str, int],
    blobs: list[bytes],
    models: tuple[str, ...],
    concurrency: int,
    repeats: int,
    n_requests: int,
) -> dict[str, list[dict[str, Any]]]:
    """Per repeat, one sample of ``n_requests`` bodies sent to every model in turn (``url``/predictions/m_NAME),
    the order reversed every other repeat: runs of one repeat are back to back, so a slow phase of the machine hits
    them alike. Returns each model's per-repeat load summaries."""
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for r in range(repeats):
        sample = [blobs[i] for i in np.random.default_rng(r).choice(len(blobs), n_requests, False)]
        for m in models if r % 2 == 0 else models[::-1]:
            per[m].append(load(f"{url}/predictions/m_{m}", sample, concurrency, names, token)[1])
    return per


def serve(
    paths: dict[str, Path], report: dict[str, Any], concurrencies: list[int], repeats: int, n_requests: int
) -> dict[str, Any]:
    """TorchServe end to end: original, cached and recording archives registered side by side, same config."""
    import shutil

    from layercache.testing.torchserve import TorchServeProcess

    blobs, labels = eval_images(paths["eval"])
    names = name_to_index(json.loads((EXAMPLE / "index_to_name.json").read_text()))
    out: dict[str, Any] = {"trunk": None, "load": []}
    with tempfile.TemporaryDirectory(prefix="bench-ts-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        for key in ("mar", "cached"):
            shutil.copy(paths[key], store / paths[key].name)
        logs = Path(tmp) / "serve-logs"
        # A recording archive of its own: serving traffic must not land in the build's traffic logs.
        wrap_for_recording(
            paths["mar"],
            store / paths["rec"].name,
            handler_config=HandlerConfig(log_dir=str(logs / "recording"), input_shape=(3, 32, 32)),
        )
        with TorchServeProcess(model_store=store, env={"OMP_NUM_THREADS": "2", "LAYERCACHE_LOG_DIR": str(logs)}) as ts:
            client = ts.client()
            models = {"original": paths["mar"].name, "cached": paths["cached"].name, "recording": paths["rec"].name}
            for name, mar in models.items():
                client.register(mar, f"m_{name}", initial_workers=1, batch_size=8, max_batch_delay_ms=20)
            base, token = ts.inference_url, ts.inference_token
            # Trunk check: every unseen image through both services.
            runs = {
                name: load(f"{base}/predictions/m_{name}", blobs, 8, names, token)[0] for name in ("original", "cached")
            }
            original, cached = from_run(runs["original"]), from_run(runs["cached"])
            scored = score(cached, reference=original.predicted, labels=labels, costs=exit_flops(report))
            out["trunk"] = {
                "n": len(blobs),
                "agreement": scored["agreement"],
                "accuracy_original": score(original, labels=labels)["accuracy"],
                "accuracy_cached": scored["accuracy"],
                "flops_original": report["mean_flops_original"],
                "flops_cached": scored["mean_flops"],
                "flops_ratio": scored["mean_flops"] / report["mean_flops_original"],
                "exit_rates": scored["exit_rates"],
                "errors": original.failed + cached.failed,
            }
            # Load: interleaved per repeat, medians.
            for c in concurrencies:
                per = interleaved_loads(base, token, names, blobs, tuple(models), c, repeats, n_requests)
                row = {"concurrency": c}
                for name, rs in per.items():
                    row[name] = {
                        k: statistics.median([x[k] for x in rs]) for k in ("rps", "p50_ms", "p90_ms", "p99_ms")
                    }
                    row[name]["errors"] = sum(x["errors"] for x in rs)
                    # Paired: each repeat's runs are back to back, so a slow phase of the machine hits them alike.
                    row[name]["rps_vs_original"] = statistics.median(
                        x["rps"] / o["rps"] for x, o in zip(rs, per["original"], strict=True)
                    )
                out["load"].append(row)
    return out


# ------------------------------------------------------------------------------------------------ tradeoff
def search_state(paths: dict[str, Path]) -> Any:
    """One head search on the workload's logs (what every build of these logs would train)."""
    from layercache.build import search
    from layercache.trafficlog import read_logs

    with tempfile.TemporaryDirectory() as tmp:
        loaded = open_mar(paths["mar"], Path(tmp) / "mar")
        mapping = json.loads((EXAMPLE / "index_to_name.json").read_text())
        return search(
            loaded.backbone,
            read_logs(paths["logs"]),
            BuildConfig(),
            preprocess=loaded.preprocess,
            index_to_name=mapping,
            progress=progress,
        )


def tradeoff(state: Any, tolerances: tuple[float, ...]) -> list[dict[str, Any]]:
    """Thresholds + subset selection per tolerance on one search, on the build's held-out test split."""
    from layercache.build import finalize

    rows = []
    for tol in tolerances:
        rep = finalize(state, tol).report
        rows.append(
            {
                "tolerance": tol,
                "flops_ratio": rep["flops_ratio"],
                "achieved_over_oracle": rep["achieved_over_oracle_selected"],
                "achieved_over_oracle_all": rep["achieved_over_oracle"],
                "hindsight_over_oracle": rep.get("hindsight_over_oracle_selected"),
                "agreement": rep["agreement"],
                "accuracy_original": rep["gt_accuracy_original"],
                "accuracy_cached": rep["gt_accuracy_cached"],
                "exits": [e["node"] for e in rep["exits"]],
            }
        )
    return rows


@torch.inference_mode()
def unseen_heads(models: Models, state: Any) -> tuple[list[Any], np.ndarray]:
    """Every trained head of ``state`` on the unseen images (calibrated confidence and answer, FLOPs costs), and
    the backbone's answers there: what any cascade of those heads would do on traffic the build never saw."""
    from layercache.calibration import confidences
    from layercache.graph import split
    from layercache.selection import HeadEval

    kept = state.kept
    segments = split(models.backbone, [r.candidate.node for r in kept])
    h, heads = models.x, []
    for seg, r in zip(segments, kept, strict=False):
        h = torch.cat([seg(h[i : i + 256]) for i in range(0, len(h), 256)])
        logits = torch.cat([r.head(h[i : i + 256]) for i in range(0, len(h), 256)])
        conf, pred = confidences(logits, r.temperature)
        heads.append(HeadEval(r.candidate.node, conf, pred, np.zeros(1), r.head_flops, r.candidate.flops_remaining))
    reference = torch.cat([models.backbone(models.x[i : i + 256]) for i in range(0, len(models.x), 256)]).argmax(1)
    return heads, reference.numpy()


def certify(
    state: Any, models: Models, tolerances: tuple[float, ...], seeds: int, delta: float = 0.05
) -> list[dict[str, Any]]:
    """The certified rule against the per-head rule: per tolerance, over ``seeds`` builds that draw their
    certification rows anew from the build's test rows and the unseen images together (``build.resample``), the
    FLOPs and agreement on the rows each build did not certify on, and how often the build's promise (agreement
    >= 1 - tolerance on traffic like the logged one) breaks there: below the line (a point estimate), and
    significantly below it (the 95% lower bound of the disagreement above the tolerance)."""
    import statistics

    from layercache.build import finalize, resample
    from layercache.certify import clopper_pearson_lower
    from layercache.selection import HeadEval, evaluate_cascade

    heads, reference = unseen_heads(models, state)
    unseen = [(h.conf, h.pred) for h in heads]
    total = state.total_flops
    rows = []
    for tol in tolerances:
        for rule in ("certified", "per-head"):
            flops, agreement, broken, significant, cached = [], [], 0, 0, 0
            for seed in progress(range(seeds), f"{rule} {tol}"):
                drawn, left, left_pred = resample(state, seed, unseen, reference)
                result = finalize(drawn, tol, rule=rule, delta=delta)
                if not result.selection.subset:
                    flops.append(1.0)
                    agreement.append(1.0)
                    continue
                cached += 1
                evals = [HeadEval(h.node, c, p, h.thresholds, h.cost_head, h.cost_rest)
                         for h, (c, p) in zip(heads, left, strict=True)]  # fmt: skip
                cascade = evaluate_cascade(evals, result.selection, left_pred, backbone_cost=total)
                flops.append(cascade.mean_cost / total)
                agreement.append(cascade.agreement)
                wrong = round((1.0 - cascade.agreement) * len(left_pred))
                broken += cascade.agreement < 1.0 - tol
                significant += clopper_pearson_lower(wrong, len(left_pred), 0.05) > tol
            rows.append(
                {
                    "tolerance": tol,
                    "rule": rule,
                    "builds": seeds,
                    "builds_with_exits": cached,
                    "evaluated_rows": len(reference),
                    "flops_ratio_median": statistics.median(flops),
                    "agreement_median": statistics.median(agreement),
                    "agreement_min": min(agreement),
                    "broken": broken,
                    "broken_rate": broken / seeds,
                    "broken_significantly": significant,
                }
            )
    return rows


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    drop = [100 * (r["accuracy_original"] - r["accuracy_cached"]) for r in rows]
    ax.plot([r["flops_ratio"] for r in rows], drop, "o-")
    for r, d in zip(rows, drop):
        ax.annotate(f"tol {r['tolerance']}", (r["flops_ratio"], d), fontsize=7)
    ax.set_xlabel("mean FLOPs, cached / original")
    ax.set_ylabel("GT accuracy drop (points)")
    ax.set_title(f"{title}: accuracy vs FLOPs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ markdown
def _md_build(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "build" in res:
        b = res["build"]
        lines += [
            f"Build (`tools/build_cache.py`, tolerance {b['tolerance']}, cost {b['cost']}): "
            f"{b['build_seconds_total']} s wall, peak RSS {b['peak_rss_mb']:.0f} MB; "
            f"{len(b['exits'])} exits: " + ", ".join(f"`{e['node']}` ({e['head']})" for e in b["exits"]),
            "",
        ]
    return lines


def _md_log_bytes_per_row(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("log_bytes_per_row"):
        lines += [
            f"Recorded traffic on disk (Parquet, zstd): {res['log_bytes_per_row'] / 1024:.2f} KB per request.",
            "",
        ]
    return lines


def _md_trunk(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("trunk"):
        t = res["trunk"]
        lines += [
            "### Served by TorchServe, 3,000 unseen test images (issue #2 acceptance)",
            "",
            "| metric | original | cached |",
            "|---|---|---|",
            f"| top-1 agreement with the backbone | 100% | {pct(t['agreement'])} |",
            f"| GT accuracy | {pct(t['accuracy_original'])} | {pct(t['accuracy_cached'])} |",
            f"| mean FLOPs per request | {t['flops_original'] / 1e6:.1f}M | {t['flops_cached'] / 1e6:.1f}M "
            f"({t['flops_ratio']:.3f}x) |",
            f"| failed requests | {t['errors']} | |",
            "",
            "Exits taken: " + ", ".join(f"`{k}` {pct(v)}" for k, v in t["exit_rates"].items()),
            "",
        ]
    return lines


def _md_tables(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("tables"):
        t = res["tables"]
        lines += [
            "### Table 2: exits on unseen images",
            "",
            "| exit | node | hit rate | cache accuracy | GT accuracy | accuracy effect |",
            "|---|---|---|---|---|---|",
        ]
        for e in t["exits"]:
            lines.append(
                f"| {e['exit']} | `{e['node']}` | {pct(e['hit_rate'])} | {pct(e['cache_accuracy'])} | "
                f"{pct(e['gt_accuracy'])} | {pct(e['effect'])} |"
            )
        lines += [
            "",
            f"Final GT accuracy: original {pct(t['accuracy_original'])}, cached {pct(t['accuracy_cached'])};"
            f" agreement {pct(t['agreement'])}.",
            "",
            "### Table 3: mean FLOPs per request (FlopCounterMode, FLOPs = 2 x MACs)",
            "",
            "| original | cached | ratio | oracle | achieved / oracle | hindsight thresholds | hindsight / oracle |",
            "|---|---|---|---|---|---|---|",
            f"| {t['flops_original'] / 1e6:.1f}M | {t['flops_cached'] / 1e6:.1f}M | "
            f"{t['flops_cached'] / t['flops_original']:.3f} | {t['flops_oracle'] / 1e6:.1f}M | "
            f"{t['achieved_over_oracle']:.3f} | {t['flops_hindsight'] / 1e6:.1f}M | "
            f"{t['flops_hindsight'] / t['flops_oracle']:.3f} |",
            "",
            "Oracle: every image leaves at the earliest selected head that agrees with the backbone. Hindsight "
            f"thresholds: the cheapest thresholds for the selected heads at agreement >= {pct(1 - t['tolerance'])} on "
            "these images, chosen knowing the backbone's answers on them (no threshold rule does better here; the "
            "rest of the gap to the oracle is the heads' confidence).",
            "",
            "### Table 4: model size and live tensor memory",
            "",
            "| | original | cached |",
            "|---|---|---|",
            f"| model size | {t['size_backbone_mb']:.2f} MB | {t['size_cached_mb']:.2f} MB "
            f"(+{100 * (t['size_cached_mb'] / t['size_backbone_mb'] - 1):.1f}%) |",
            f"| tensor memory allocated per batch of 32 | {t['memory']['original']:.1f} MB | "
            f"{t['memory']['cached']:.1f} MB |",
            "",
        ]
    return lines


def _md_latency_overhead(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, title in (
        ("latency", "### Table 5/6: CPU model latency per batch (median ms, min-max)"),
        ("overhead", "### Overhead: heads that never fire vs original (median ms)"),
    ):
        if res.get(key):
            lines += [
                title,
                "",
                "| batch | original | cached | cached / original (paired) | ratio of medians |",
                "|---|---|---|---|---|",
            ]
            for r in res[key]:
                lines.append(
                    f"| {r['batch']} | {r['original_ms']:.1f} ({r['original_range_ms'][0]:.1f}-"
                    f"{r['original_range_ms'][1]:.1f}) | {r['cached_ms']:.1f} ({r['cached_range_ms'][0]:.1f}"
                    f"-{r['cached_range_ms'][1]:.1f}) | {r['ratio']:.3f} | "
                    f"{r.get('ratio_of_medians', r['cached_ms'] / r['original_ms']):.3f} |"
                )
            lines += [
                "",
                "Paired: median over rounds of cached / original timed back to back in the same round.",
                "",
            ]
    return lines


def _md_recording(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("recording"):
        lines += [
            "### Recording handler vs original handler, in process (median ms per batch)",
            "",
            "| batch | original | recording | recording / original (paired) |",
            "|---|---|---|---|",
        ]
        for r in res["recording"]:
            lines.append(f"| {r['batch']} | {r['original_ms']:.1f} | {r['recording_ms']:.1f} | {r['ratio']:.3f} |")
        lines.append("")
    return lines


def _md_verification(res: dict[str, Any]) -> list[str]:
    v = res.get("verification")
    if not v:
        return []
    lines = [
        f"### Online verification at verify_fraction {v['verify_fraction']}, in process (ms per request, passes "
        f"of {v.get('rows_per_pass', '?')} unseen images timed whole, medians)",
        "",
        "| batch | no verification | verification | with / without (paired, min-max) |",
        "|---|---|---|---|",
    ]
    for r in v["rows"]:
        lo, hi = r.get("ratio_range", [r["ratio"], r["ratio"]])
        lines.append(f"| {r['batch']} | {r['unverified_ms']:.2f} | {r['verified_ms']:.2f} | {r['ratio']:.3f} "
                     f"({lo:.3f}-{hi:.3f}) |")  # fmt: skip
    shares = ", ".join(f"{s:.3f}" for s in v["shares"])
    lines += ["", f"Per-head shares (rare heads raised, the commonest lowered): {shares}; "
              f"{v['verified_share_of_hits']:.1%} of all hits verified.", ""]  # fmt: skip
    if v.get("flops"):
        f = v["flops"]
        lines += [
            "What the verified rows' remaining layers add (the build report's per-exit FLOPs, the unseen images' hit "
            "rates):",
            "",
            "| head | hit rate | share verified | FLOPs after it (of the original's) | adds (of the cached FLOPs) |",
            "|---|---|---|---|---|",
        ]
        for h in f["heads"]:
            lines.append(f"| `{h['node']}` | {pct(h['hit_rate'])} | {h['share']:.3f} | "
                         f"{h['remaining_of_original']:.3f} | {pct(h['extra_of_cached'])} |")  # fmt: skip
        lines += ["", f"In all {pct(f['extra_of_cached'])} of the cached model's FLOPs with these shares, "
                  f"{pct(f['extra_of_cached_uniform'])} with {v['verify_fraction']} of every head's hits (the cached "
                  f"model does {f['cached_of_original']:.3f} of the original's FLOPs).", ""]  # fmt: skip
    if v.get("served"):
        lines += [
            f"Through TorchServe (batchSize 8, the same cached archive with verify_fraction {v['verify_fraction']} "
            "and 0, interleaved runs, medians):",
            "",
            "| clients | req/s, no verification | req/s, verification | ratio (paired, min-max) | errors |",
            "|---|---|---|---|---|",
        ]
        for r in v["served"]:
            lo, hi = r["rps_ratio_range"]
            lines.append(f"| {r['concurrency']} | {r['unverified_rps']:.1f} | {r['verified_rps']:.1f} | "
                         f"{r['rps_ratio']:.3f} ({lo:.3f}-{hi:.3f}) | {r['errors']} |")  # fmt: skip
        lines.append("")
    return lines


def _md_alternatives(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    alt = res.get("alternatives")
    if alt:
        batches = [str(b) for b in alt["batches"]]
        lines += [
            f"### The cache against other accelerations (CPU, {alt['threads']} threads, median ms per batch)",
            "",
            "| variant | " + " | ".join(f"batch {b}" for b in batches) + " | agreement | engines | build s |",
            "|---|" + "---|" * (len(batches) + 3),
        ]
        for r in alt["rows"]:
            cells = [f"{r['ms'][b]:.1f} ({r['ratio'][b]:.2f}x)" for b in batches]
            lines.append(
                f"| {r['variant']} | " + " | ".join(cells) + f" | {pct(r['agreement'])} | {', '.join(r['engines'])} "
                f"| {r['build_s']:.0f} |"
            )
        best = alt["rows"][0]["best_original"]
        lines += [
            "",
            "In brackets: the median over rounds of the variant's time over the fastest original variant's in the "
            "same round (fastest original per batch: " + ", ".join(f"{b}: {best[b]}" for b in batches) + "). "
            f"Agreement: top-1 answers equal to the eager backbone's on the {alt['n']} unseen images. Build s: "
            "export, quantization, compile and warm-up up to the largest batch.",
            "",
        ]
        lines += [f"- {n}" for n in alt.get("notes", [])] + ([""] if alt.get("notes") else [])
    return lines


def _md_policy(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("policy"):
        lines += [
            "### Per-batch-size policy measured on this machine (`build_cache.py --policy`)",
            "",
            "| batch | " + " | ".join(res["policy"]) + " |",
            "|---|" + "---|" * len(res["policy"]),
            "| mode | " + " | ".join(res["policy"].values()) + " |",
            "",
        ]
    return lines


def _md_serving(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("serving"):
        lines += [
            "### TorchServe end to end (closed loop, medians)",
            "",
            "| clients | model | req/s | p50 ms | p90 ms | p99 ms | errors | req/s vs original (paired) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in res["serving"]:
            base = row["original"]["rps"]
            for name in ("original", "cached", "recording"):
                m = row[name]
                ratio = m.get("rps_vs_original", m["rps"] / base)
                lines.append(
                    f"| {row['concurrency']} | {name} | {m['rps']:.1f} | {m['p50_ms']:.0f} | "
                    f"{m['p90_ms']:.0f} | {m['p99_ms']:.0f} | {m['errors']} | {ratio:.2f}x |"
                )
        lines += ["", "Paired: median over repeats of the model's req/s over the original's in the same repeat.", ""]
    return lines


def _md_tradeoff(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res.get("tradeoff"):
        lines += [
            "### Accuracy / FLOPs trade-off across tolerances (build's held-out split)",
            "",
            "| tolerance | FLOPs ratio | achieved / oracle | hindsight / oracle | agreement | GT accuracy original "
            "| cached | exits |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["tradeoff"]:
            oracle, hindsight = r.get("achieved_over_oracle"), r.get("hindsight_over_oracle")
            lines.append(
                f"| {r['tolerance']} | {r['flops_ratio']:.3f} | {'' if oracle is None else f'{oracle:.2f}'} | "
                f"{'' if hindsight is None else f'{hindsight:.2f}'} | {pct(r['agreement'])} | "
                f"{pct(r['accuracy_original'])} | {pct(r['accuracy_cached'])} | {', '.join(r['exits'])} |"
            )
        lines += ["", "![trade-off](docs/bench/tradeoff.png)", ""]
    return lines


def _md_certify(res: dict[str, Any]) -> list[str]:
    if not res.get("certify"):
        return []
    rows = res["certify"]
    n_eval = rows[0].get("evaluated_rows", "the")
    lines = [
        f"### Certified rule vs per-head rule ({rows[0]['builds']} builds per row, each evaluated on {n_eval} rows it "
        "did not certify on)",
        "",
        "| tolerance | rule | FLOPs ratio (median) | agreement (median) | agreement (worst) | builds with exits "
        "| below 1 - tolerance | significantly below |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tolerance']} | {r['rule']} | {r['flops_ratio_median']:.3f} | {pct(r['agreement_median'])} | "
            f"{pct(r['agreement_min'])} | {r['builds_with_exits']} of {r['builds']} | {r['broken']} of "
            f"{r['builds']} ({r['broken_rate']:.0%}) | {r.get('broken_significantly', '')} of {r['builds']} |"
        )
    lines += [
        "",
        "Each build keeps the trained heads and the validation rows that set the thresholds, as a real build does, "
        "and draws its certification rows anew from the build's test rows and the unseen images together; it is "
        "evaluated on the rest of them. The certified rule promises that the true disagreement exceeds the "
        "tolerance in at most delta = 5% of builds. 'Below 1 - tolerance' compares a point estimate with the line: "
        "a cache whose true disagreement is right at its tolerance reads below it about half the time by chance "
        "alone. 'Significantly below': the 95% Clopper-Pearson lower bound of the measured disagreement is above "
        "the tolerance.",
        "",
    ]
    return lines


def _md_drift(res: dict[str, Any]) -> list[str]:
    d = res.get("drift")
    if not d:
        return []
    arms = [a for a in ("static", "guarded", "refreshed") if any(a in w for w in d["windows"])]
    header = ["shifted requests", *[f"{a}: disagreement" for a in arms], *[f"{a}: FLOPs" for a in arms]]
    rows = []
    for w in d["windows"]:
        cells = [str(w["requests_so_far"])]
        cells += [pct(w[a]["disagreement"]) if a in w else "" for a in arms]
        cells += [f"{w[a]['flops_ratio']:.3f}" if a in w else "" for a in arms]
        rows.append(cells)
    check, refresh = d.get("check", {}), d.get("refresh", {})
    lines = ["### Drift: built on clean traffic, served blurred and noised images", "", *markdown_table(header, rows)]
    lines += [
        "",
        f"After window {len([w for w in d['windows'] if 'refreshed' not in w])}: `--check` said "
        f"{'stale' if check.get('stale') else 'fresh'} ({'; '.join(check.get('reasons', [])) or 'no reason'}); "
        f"refresh: {refresh.get('reason', 'not run')}.",
        "",
        "![drift](docs/bench/drift.png)",
        "",
    ]
    heads = d.get("guard", {}).get("heads", [])
    if heads:
        lines += [
            "The guarded cache's heads at the end (its describe output): "
            + "; ".join(
                f"`{h['node']}` {h['state']} ({h['verified']} verified of {h['hits']} hits, agreement "
                f"{pct(h['agreement']) if h['verified'] else 'n/a'})"
                for h in heads
            )
            + ".",
            "",
        ]
    return lines


def _md_soak(res: dict[str, Any]) -> list[str]:
    s = res.get("soak")
    if not s:
        return []
    return [
        f"### Soak: {s['seconds']:.0f} s at 16 clients, recording and verification on",
        "",
        *markdown_table(
            [
                "requests",
                "req/s",
                "errors",
                "errors outside the scale-down",
                "worker RSS growth after warm-up",
                "fd growth",
                "log dir max / cap",
            ],
            [
                [
                    s["requests"],
                    s["rps"],
                    s["errors"],
                    s["errors_outside_scale_down"],
                    f"{100 * s['rss_growth']:.1f}%",
                    s["fd_growth"],
                    f"{s['max_log_mb']} MB / {s['log_cap_mb']:.0f} MB",
                ]
            ],
        ),  # fmt: skip
        "",
        "Actions under load: " + "; ".join(s["actions"]),
        "",
        "Each worker is watched from the end of its own warm-up (the soak's first "
        f"{s.get('warmup_s', 0):.0f} s, or that long after a scale-up started it); RSS when warm -> at its last "
        "sample (largest growth): "
        + "; ".join(
            f"{w['rss_mb_warm']:.0f} -> {w['rss_mb_last']:.0f} MB ({100 * w['growth']:+.1f}%, "
            f"{w['warm_at_s']:.0f}-{w['last_s']:.0f} s)"
            for w in s.get("workers", [])
        ),
        "",
    ]


def _md_photos224(res: dict[str, Any]) -> list[str]:
    from layercache.testing.workload224 import markdown as md

    return ["### 224-px workload: EfficientNet-Lite0 on real photos, through TorchServe", "", *md(res["photos224"]),
            ""] if res.get("photos224") else []  # fmt: skip


def _md_buildmem(res: dict[str, Any]) -> list[str]:
    rows = res.get("buildmem")
    if not rows:
        return []
    return [
        "### Build time and memory as the log grows (`--max-rows` 20,000, " + " ".join(BUILDMEM_ARGS) + ")",
        "",
        *markdown_table(
            ["logged rows", "rows built from", "build s", "peak RSS MB", "FLOPs ratio"],
            [
                [
                    f"{r['rows']:,}",
                    f"{r['rows_used'] or 0:,}",
                    f"{r['seconds']:.0f}",
                    f"{r['peak_rss_mb']:,.0f}",
                    f"{r['flops_ratio']:.3f}",
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        f"Command of each build: `{rows[0]['command']}` (paths of a temporary folder).",
        "",
    ]


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        f"Workload: `{res.get('workload', 'resnet18_fmnist')}`  ",
        f"Command: `{command}`  ",
        f"Machine: {res['machine']}  ",
        f"Date: {res['date']}",
        "",
    ]
    for section in (
        _md_build,
        _md_log_bytes_per_row,
        _md_trunk,
        _md_tables,
        _md_latency_overhead,
        _md_recording,
        _md_verification,
        _md_policy,
        _md_serving,
        _md_tradeoff,
        _md_certify,
        _md_drift,
        _md_soak,
        _md_photos224,
        _md_buildmem,
        _md_alternatives,
    ):
        lines += section(res)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="work and result dir (default: bench-out)")
    p.add_argument(
        "--workload", choices=sorted(WORKLOADS), default="resnet18", help="classifier benchmarked (default: resnet18)"
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated of {SECTIONS} (default: all)")
    p.add_argument("--tolerance", type=float, default=0.01, help="build tolerance (default: 0.01)")
    p.add_argument("--cost", choices=("flops", "latency"), default="flops", help="build's --cost (default: flops)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions for medians (default: 5)")
    p.add_argument("--concurrency", default="1,8,16", help="serving client counts (default: 1,8,16)")
    p.add_argument("--requests", type=int, default=400, help="requests per serving run (default: 400)")
    p.add_argument("--traffic", type=int, default=7000, help="recorded test images (default: 7000)")
    p.add_argument("--eval", type=int, default=3000, help="unseen evaluation images (default: 3000)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cache even if one exists (default: reuse)")
    p.add_argument(
        "--seeds", type=int, default=20, help="certify: resampled builds per tolerance and rule (default: 20)"
    )
    p.add_argument("--photos-traffic", type=int, default=3000, help="photos224: recorded requests (default: 3000)")
    p.add_argument("--photos-unseen", type=int, default=1000, help="photos224: unseen requests (default: 1000)")
    p.add_argument(
        "--soak-seconds", type=float, default=600.0, help="soak: seconds of load on the cached archive (default: 600)"
    )
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


@dataclass(frozen=True)
class BenchArgs:
    """The parsed command line."""

    out: Path
    workload: Workload
    sections: tuple[str, ...]
    tolerance: float
    cost: str
    repeats: int
    concurrency: tuple[int, ...]
    requests: int
    traffic: int
    eval: int
    rebuild: bool
    seeds: int
    soak_seconds: float
    photos_traffic: int = 3000
    photos_unseen: int = 1000


class Bench:
    """What the sections share: the workload's files, the build report, the results so far (saved after each
    section to ``OUT/bench.json``), and the models loaded once for the model-level sections."""

    def __init__(self, args: BenchArgs) -> None:
        self.args = args
        self.paths = prepare(args.out, args.traffic, args.eval, args.workload)
        self.res_path = args.out / "bench.json"
        self.res: dict[str, Any] = json.loads(self.res_path.read_text()) if self.res_path.exists() else {}
        self.res.update({"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d")})
        self.res["workload"] = args.workload.name
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-models-")
        self._models: Models | None = None
        self._state: Any = None

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.paths["report"] / "report.json").read_text())

    def models(self) -> Models:
        if self._models is None:
            self._models = Models(self.paths, Path(self._tmp.name))
        return self._models

    def state(self) -> Any:
        """One head search on the logs, shared by the sections that re-threshold it."""
        if self._state is None:
            self._state = search_state(self.paths)
        return self._state

    def save(self) -> None:
        self.res_path.write_text(json.dumps(self.res, indent=2, default=str))

    def close(self) -> None:
        self._tmp.cleanup()


def step_build(bench: Bench) -> None:
    """Record and build when asked (or when there is no cache yet); the log's bytes per request."""
    paths = bench.paths
    if bench.args.rebuild or not paths["cached"].exists():
        bench.res["build"] = record_and_build(paths, bench.args.tolerance, bench.args.cost)
    parts = sorted(paths["logs"].glob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    bench.res["log_bytes_per_row"] = sum(p.stat().st_size for p in parts) / rows if rows else None
    kept = {k: v for k, v in bench.res.get("build", {}).items() if k.startswith("bench_")}
    bench.res["build"] = {**bench.report, **kept}


def step_tables(bench: Bench) -> None:
    bench.res["tables"] = tables(bench.models(), bench.report)


def step_latency(bench: Bench) -> None:
    bench.res["latency"] = latency(bench.models(), bench.args.repeats)


def step_overhead(bench: Bench) -> None:
    rows = latency(bench.models(), bench.args.repeats, cached=bench.models().never_fire().run)
    bench.res["overhead"] = [r for r in rows if r["batch"] in (1, 8, 32, 128)]


def step_policy(bench: Bench) -> None:
    from layercache.runtime import measure_policy

    bench.res["policy"] = measure_policy(bench.models().cached, bench.models().x, repeats=bench.args.repeats)


def step_verification(bench: Bench) -> None:
    """In process per batch, then through TorchServe at the serving concurrencies."""
    result = verification_cost(bench.models(), bench.args.repeats, report=bench.report)
    result["served"] = verification_served(
        bench.paths, list(bench.args.concurrency), bench.args.repeats, bench.args.requests
    )
    bench.res["verification"] = result


def step_recording(bench: Bench) -> None:
    bench.res["recording"] = recording_cost(bench.paths, bench.args.repeats)


def step_bundle(bench: Bench) -> None:
    w, models = bench.args.workload, bench.models()
    dest = write_bundle(
        bench.args.out / "device-bundle",
        model_file=w.model_file,
        model_class=w.model_class,
        weights=bench.paths["weights"],
        cached_mar=bench.paths["cached"],
        x=models.x,
        labels=models.labels,
    )
    logger.info("device bundle written to %s", dest)


def step_serving(bench: Bench) -> None:
    """The trunk check (every unseen image through both archives), and the load table when asked."""
    conc = list(bench.args.concurrency) if "serving" in bench.args.sections else []
    served = serve(bench.paths, bench.report, conc, bench.args.repeats if conc else 0, bench.args.requests)
    bench.res["trunk"] = served["trunk"]
    if conc:
        bench.res["serving"] = served["load"]


def step_photos224(bench: Bench) -> None:
    from layercache.testing.workload224 import Setup224, run_224

    setup = Setup224(out=bench.args.out / "photos224", traffic=bench.args.photos_traffic,
                     unseen=bench.args.photos_unseen, tolerance=bench.args.tolerance)  # fmt: skip
    bench.res["photos224"] = run_224(setup, progress)


def step_buildmem(bench: Bench) -> None:
    import shutil

    from layercache.testing.biglogs import build_child, grow_log

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-buildmem-") as tmp:
        for n in BUILDMEM_ROWS:
            logs = Path(tmp) / f"logs-{n}"
            grow_log(bench.paths["logs"], logs, n)
            run = build_child(bench.paths["rec"], logs, Path(tmp) / "cached.mar", Path(tmp) / f"report-{n}",
                              bench.args.tolerance, BUILDMEM_ARGS)  # fmt: skip
            report = json.loads((Path(tmp) / f"report-{n}" / "report.json").read_text())
            rows.append({"rows": n, **run, "rows_used": report["rows"]["total"], "flops_ratio": report["flops_ratio"]})
            shutil.rmtree(logs)
    bench.res["buildmem"] = rows


def step_tradeoff(bench: Bench) -> None:
    bench.res["tradeoff"] = tradeoff(bench.state(), TOLERANCES)
    plot_tradeoff(bench.res["tradeoff"], bench.args.out / "tradeoff.png", bench.args.workload.name)


def step_certify(bench: Bench) -> None:
    bench.res["certify"] = certify(bench.state(), bench.models(), CERTIFY_TOLERANCES, bench.args.seeds)


def step_drift(bench: Bench) -> None:
    """Blurred and noised unseen images to the static, guarded and refreshed cache (layercache.testing.drift)."""
    from layercache.testing.drift import DriftSetup, corrupt, plot, run_drift

    blobs, _ = eval_images(bench.paths["eval"])
    shifted = [corrupt(b, seed=i) for i, b in enumerate(blobs)]
    models = bench.models()
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        x = open_mar(bench.paths["mar"], Path(tmp) / "mar").preprocess([{"data": b} for b in shifted])
        with torch.inference_mode():
            reference = torch.cat([models.backbone(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1).numpy()
        setup = DriftSetup(
            cached_mar=bench.paths["cached"],
            report=bench.report,
            logs=bench.paths["logs"],
            bodies=shifted,
            reference=reference,
            index_to_name=json.loads((EXAMPLE / "index_to_name.json").read_text()),
            workdir=Path(tmp),
        )
        result = run_drift(setup)
    bench.res["drift"] = {"windows": result.windows, "check": result.check, "refresh": result.refresh,
                          "guard": result.guard}  # fmt: skip
    plot(result, bench.args.out / "drift.png", float(bench.report["tolerance"]))


def step_soak(bench: Bench) -> None:
    """The cached archive with recording and verification on, under load for --soak-seconds, swapped, rolled back
    and scaled meanwhile (layercache.testing.soak)."""
    import shutil

    from layercache.archive import with_handler_config
    from layercache.testing.soak import soak
    from layercache.testing.torchserve import TorchServeProcess

    seconds = bench.args.soak_seconds
    blobs, _ = eval_images(bench.paths["eval"])
    names = name_to_index(json.loads((EXAMPLE / "index_to_name.json").read_text()))
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        store, logs = Path(tmp) / "store", Path(tmp) / "logs"
        store.mkdir()
        shutil.copytree(bench.paths["logs"], logs)
        cap_gb = 0.05
        for version in ("soak", "soak-b"):
            with_handler_config(bench.paths["cached"], store / f"{version}.mar", version=version, log_dir=str(logs),
                                verify_fraction=0.02, max_log_gb=cap_gb)  # fmt: skip
        with TorchServeProcess(store, workdir=Path(tmp) / "ts", env={"OMP_NUM_THREADS": "1"}) as server:
            client = server.client(timeout_s=300)
            for version in ("soak", "soak-b"):
                client.register(f"{version}.mar", "m", initial_workers=1, batch_size=8, max_batch_delay_ms=20)
                client.wait_ready("m", version, timeout_s=120)
            client.set_default("m", "soak")
            for version in ("soak", "soak-b"):  # each version's worker answers before it is watched
                soak(f"{server.inference_url}/predictions/m/{version}", blobs, names, seconds=15, concurrency=8,
                     pids=list, token=server.inference_token)  # fmt: skip
            actions = [
                (seconds * 0.3, "scale soak to 2 workers", lambda: client.scale("m", "soak", 2)),
                (seconds * 0.5, "swap to soak-b", lambda: client.set_default("m", "soak-b")),
                (seconds * 0.6, "roll back to soak", lambda: client.set_default("m", "soak")),
                (seconds * 0.8, "scale soak to 1 worker", lambda: client.scale("m", "soak", 1)),
            ]
            result = soak(
                f"{server.inference_url}/predictions/m", blobs, names, seconds=seconds, concurrency=16,
                pids=lambda: server.worker_pids("m", "all"), log_dir=logs, warmup_s=min(60.0, seconds / 5),
                actions=actions, token=server.inference_token,
            )  # fmt: skip
    (down,) = [t for t, name in result.actions if name.startswith("scale soak to 1")]
    bench.res["soak"] = {
        **result.summary(),
        "log_cap_mb": cap_gb * 1024,
        "warmup_s": result.warmup_s,
        "errors_outside_scale_down": result.errors - result.errors_between(down - 2, down + 32),
    }


def step_alternatives(bench: Bench) -> None:
    """The cache against torch.compile, int8 and ONNX Runtime on the original (layercache.testing.alternatives)."""
    import io
    import zipfile

    from layercache.config import SAMPLE_FILE
    from layercache.testing.alternatives import compare

    models = bench.models()
    with zipfile.ZipFile(bench.paths["cached"]) as z:  # the logged rows the archive's worker would build on
        sample = torch.load(io.BytesIO(z.read(SAMPLE_FILE)), map_location="cpu", weights_only=True).float()
    result = compare(models.backbone, models.cached, models.x, sample, batches=ALTERNATIVE_BATCHES,
                     repeats=bench.args.repeats, threads=2)  # fmt: skip
    bench.res["alternatives"] = result.to_dict()


#: Section -> its step, in the order they run (trunk and serving share one TorchServe).
STEPS = {
    "tables": step_tables,
    "latency": step_latency,
    "overhead": step_overhead,
    "policy": step_policy,
    "recording": step_recording,
    "verification": step_verification,
    "bundle": step_bundle,
    "trunk": step_serving,
    "serving": step_serving,
    "tradeoff": step_tradeoff,
    "certify": step_certify,
    "drift": step_drift,
    "soak": step_soak,
    "photos224": step_photos224,
    "buildmem": step_buildmem,
    "alternatives": step_alternatives,
}


def run_bench(args: BenchArgs, command: str) -> str:
    """Every asked section, in order; returns the Markdown (also written to ``OUT/BENCHMARKS.md``)."""
    bench = Bench(args)
    try:
        if set(args.sections) <= OWN_WORKLOAD | SEARCH_ONLY and not args.rebuild:
            record_only(bench.paths)
        elif not set(args.sections) <= OWN_WORKLOAD:  # those sections record and build their own model
            step_build(bench)
            bench.save()
        done = set()
        for section in (s for s in STEPS if s in args.sections):
            step = STEPS[section]
            if step in done:
                continue
            logger.info("== %s", section)
            step(bench)
            done.add(step)
            bench.save()
    finally:
        bench.close()
    md = markdown(bench.res, command)
    (args.out / "BENCHMARKS.md").write_text(md)
    return md


def parse_args(argv: list[str] | None = None) -> tuple[BenchArgs, bool]:
    """The command line as :class:`BenchArgs` (and ``--quiet``); usage errors exit 2 with the message."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    sections = tuple(s for s in ns.sections.split(",") if s)
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        parser.error(f"unknown sections {bad}; choose from {SECTIONS}")
    args = BenchArgs(
        out=ns.out,
        workload=WORKLOADS[ns.workload],
        sections=sections,
        tolerance=ns.tolerance,
        cost=ns.cost,
        repeats=ns.repeats,
        concurrency=tuple(int(c) for c in ns.concurrency.split(",")),
        requests=ns.requests,
        traffic=ns.traffic,
        eval=ns.eval,
        rebuild=ns.rebuild,
        seeds=ns.seeds,
        soak_seconds=ns.soak_seconds,
        photos_traffic=ns.photos_traffic,
        photos_unseen=ns.photos_unseen,
    )
    return args, ns.quiet


def main(argv: list[str] | None = None) -> int:
    args, quiet = parse_args(argv)
    setup_logging(quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    command = ("python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    def call() -> None:
        sys.stdout.write(run_bench(args, command) + "\n")

    return run_command(call, logger)


if __name__ == "__main__":
    sys.exit(main())
