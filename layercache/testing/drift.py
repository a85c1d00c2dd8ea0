"""The drift experiment: a cache built on one kind of traffic, served another, through a real TorchServe.

Three versions of one cached archive answer the same shifted traffic, window by window: the *static* cache (no
verification, no guard), the *guarded* one (verification on, ``guard: disable``), and, once ``--check`` finds the
cache stale, a *refreshed* one rebuilt from the recent logs and swapped in by ``refresh_cache``. Each window's
answers are compared with the backbone's own answers to the same images (computed offline), and costed by the
exits they took.

Example::

    shifted = [corrupt(png, seed=i) for i, png in enumerate(pngs)]
    result = run_drift(DriftSetup(...))
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layercache.archive import with_handler_config
from layercache.build import BuildConfig
from layercache.evaluation import exit_flops, from_run, name_to_index, score
from layercache.refresh import RefreshRequest, check_cache, refresh_cache
from layercache.testing.load import send_all
from layercache.testing.torchserve import TorchServeProcess

logger = logging.getLogger(__name__)

__all__ = ["DriftSetup", "corrupt", "run_drift"]

MODEL = "drift"


def corrupt(png: bytes, seed: int, blur: float = 1.2, noise: float = 0.25) -> bytes:
    """The same image, blurred (Gaussian, radius ``blur`` px) and with Gaussian pixel noise (``noise`` x 255): what
    a change of camera or compression does to traffic."""
    from PIL import Image, ImageFilter

    img = Image.open(io.BytesIO(png)).convert("L").filter(ImageFilter.GaussianBlur(blur))
    rng = np.random.default_rng(seed)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise * 255.0, (img.height, img.width))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class DriftSetup:
    """What the experiment needs: the cached archive and its build report, the logs it was built from, the shifted
    request bodies with the backbone's answers to them, and the windows."""

    cached_mar: Path
    report: dict[str, Any]
    logs: Path
    bodies: Sequence[bytes]
    reference: np.ndarray
    index_to_name: dict[str, str]
    workdir: Path
    window: int = 250
    refresh_after: int = 6
    verify_fraction: float = 0.1
    concurrency: int = 8


@dataclass
class DriftResult:
    windows: list[dict[str, Any]] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)
    refresh: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)


def run_drift(setup: DriftSetup) -> DriftResult:
    """Serve the shifted traffic to the static and guarded caches window by window; after ``refresh_after`` windows,
    check the guarded cache's logs and refresh it if stale; the refreshed cache answers the remaining windows too."""
    work = Path(setup.workdir)
    store, logs = work / "store", work / "logs"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copytree(setup.logs, logs, dirs_exist_ok=True)  # the guarded cache records here; the originals stay
    static = with_handler_config(
        setup.cached_mar, store / "drift_static.mar", version="static", force=True, guard="off",
        verify_fraction=0.0, log_dir=str(work / "static-logs"),
    )  # fmt: skip
    guarded = with_handler_config(
        setup.cached_mar, store / "drift_guarded.mar", version="guarded", force=True, guard="disable",
        verify_fraction=setup.verify_fraction, log_dir=str(logs),
    )  # fmt: skip
    names = name_to_index(setup.index_to_name)
    costs = {"static": exit_flops(setup.report), "guarded": exit_flops(setup.report)}
    total = float(setup.report["mean_flops_original"])
    result = DriftResult()
    with TorchServeProcess(store, workdir=work / "ts", env={"OMP_NUM_THREADS": "1"}) as server:
        client = server.client(timeout_s=300)
        for mar, version in ((static, "static"), (guarded, "guarded")):
            client.register(mar.name, MODEL, initial_workers=1, batch_size=8, max_batch_delay_ms=20)
            client.wait_ready(MODEL, version, timeout_s=120)
        arms = {"static": "static", "guarded": "guarded"}
        n_windows = len(setup.bodies) // setup.window
        for w in range(n_windows):
            rows = slice(w * setup.window, (w + 1) * setup.window)
            bodies, ref = list(setup.bodies[rows]), setup.reference[rows]
            entry: dict[str, Any] = {"window": w + 1, "requests_so_far": (w + 1) * setup.window}
            for arm, version in arms.items():
                url = f"{server.inference_url}/predictions/{MODEL}/{version}"
                answers = from_run(send_all(url, bodies, setup.concurrency, names, token=server.inference_token))
                s = score(answers, reference=ref, costs=costs[arm])
                entry[arm] = {"disagreement": 1.0 - s["agreement"], "flops_ratio": s["mean_flops"] / total,
                              "failed": s["failed"]}  # fmt: skip
            result.windows.append(entry)
            logger.info("drift window %d: %s", w + 1, entry)
            if w + 1 == setup.refresh_after:
                time.sleep(1.0)  # let the workers' last rows reach the log
                found = check_cache(guarded, logs)
                result.check = {"stale": found.stale, "reasons": found.reasons, **found.facts}
                if found.stale:
                    request = RefreshRequest(
                        model=MODEL, mar=guarded, logs=logs, model_store=store, version="refreshed",
                        config=BuildConfig(tolerance=float(setup.report["tolerance"])), min_eval_rows=100,
                        state_file=work / "swap.json",
                    )  # fmt: skip
                    outcome = refresh_cache(client, request)
                    result.refresh = {"swapped": outcome.swapped, "reason": outcome.reason, **outcome.comparison}
                    if outcome.swapped:
                        arms["refreshed"] = "refreshed"
                        costs["refreshed"] = exit_flops(outcome.report)
        info = _describe(server, "guarded")
        result.guard = info.get("verification", {})
    return result


def _describe(server: TorchServeProcess, version: str) -> dict[str, Any]:
    import json
    import urllib.request

    url = f"{server.management_url}/models/{MODEL}/{version}?customized=true"
    request = urllib.request.Request(url, headers=server.management_headers())
    with urllib.request.urlopen(request, timeout=60) as response:
        (description,) = json.loads(response.read())
    metadata = description.get("customizedMetadata", "{}")
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def plot(result: DriftResult, path: Path, tolerance: float) -> None:
    """Disagreement and FLOPs per window for each version (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for arm, style in (("static", "o-"), ("guarded", "s-"), ("refreshed", "^-")):
        xs = [e["requests_so_far"] for e in result.windows if arm in e]
        if not xs:
            continue
        top.plot(xs, [100 * e[arm]["disagreement"] for e in result.windows if arm in e], style, label=arm)
        bottom.plot(xs, [e[arm]["flops_ratio"] for e in result.windows if arm in e], style, label=arm)
    top.axhline(100 * tolerance, color="grey", linestyle="--", label="promise")
    top.set_ylabel("disagreement (%)")
    bottom.set_ylabel("FLOPs / original")
    bottom.set_xlabel("shifted requests served")
    top.legend(fontsize=7)
    top.set_title("Drift: blurred, noised traffic after a build on clean traffic", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
