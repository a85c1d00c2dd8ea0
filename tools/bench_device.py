"""Model-level benchmark on any torch device (the GPU tables of issue #3), from a bundle that needs no TorchServe.

``tools/bench.py --sections bundle`` writes the bundle (backbone weights and model file, the built cache, the
3,000 unseen evaluation inputs) to ``OUT/device-bundle``; this script loads it with torch and the core library
only, so it runs on a machine that has neither TorchServe nor ``../shared`` (e.g. the GPU device machine, whose
python has its own torch). On the device it measures, original and cached side by side, interleaved:

* answers: agreement of the cached model with the backbone on the unseen inputs, exits taken;
* latency per batch at batch 1..128 for each cached mode (shrink, noshrink, heads skipped, heads that never fire,
  and on a GPU ``graphs``: shrink with every segment and head replayed from a CUDA graph per batch bucket)
  and for the per-batch-size policy the cached worker would measure at startup (``layercache.policy``);
* the policy itself.

Results: ``OUT/device.json`` and ``OUT/DEVICE.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layercache.cli import run_command, setup_logging  # noqa: E402
from layercache.evaluation import Answers, model_answers, score  # noqa: E402
from layercache.runtime import CachedModel, measure_policy  # noqa: E402
from layercache.testing.backbones import machine  # noqa: E402
from layercache.testing.bundle import load_bundle  # noqa: E402
from layercache.timing import latency_rows  # noqa: E402

logger = logging.getLogger("bench_device")
BATCHES = (1, 8, 16, 32, 64, 128)

EPILOG = """examples:
  python tools/bench.py --out bench-out --sections bundle                     # here: write bench-out/device-bundle
  python tools/bench_device.py --bundle bench-out/device-bundle --device cpu --batches 1,8 --repeats 1 --out /tmp/d
  python tools/bench_device.py --bundle bench-out/device-bundle --device cuda --repeats 20 --out "$OUT"   # on a GPU
"""


def answers(backbone: nn.Module, cached: CachedModel, x: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
    """Agreement with the backbone, GT accuracy and exits of the cached model over ``x``."""
    reference, cached_answers = model_answers(backbone, cached, x)
    scored = score(cached_answers, reference=reference, labels=labels)
    return {
        "n": scored["n"],
        "agreement": scored["agreement"],
        "accuracy_original": score(Answers.of(reference), labels=labels)["accuracy"],
        "accuracy_cached": scored["accuracy"],
        "exits": scored["exit_rates"],
    }


@dataclass(frozen=True)
class DeviceArgs:
    """The parsed command line."""

    bundle: Path
    device: str
    out: Path
    repeats: int
    policy_repeats: int
    batches: tuple[int, ...]


def run(args: DeviceArgs) -> dict[str, Any]:
    """Answers, the policy measured here and latency per cached mode on ``args.device``."""
    device = torch.device(args.device)
    backbone, cached, x, labels = load_bundle(args.bundle, device)
    res: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(device),
        "device": str(device),
        "exits": list(cached.nodes),
        "answers": answers(backbone, cached, x, labels),
    }
    logger.info("answers on %s: %s", device, res["answers"])
    if device.type == "cuda":  # graphs mode: every segment and head replayed from a CUDA graph per batch bucket
        t0 = time.perf_counter()
        res["graphs_captured"] = cached.enable_graphs(max_batch=max(args.batches)).capture_graphs(x[:256])
        res["graphs_capture_s"] = round(time.perf_counter() - t0, 2)
    with torch.inference_mode():
        policy = measure_policy(cached, x, batch_sizes=args.batches, repeats=args.policy_repeats)
    res["policy"] = policy
    never = cached.with_thresholds([1.01] * len(cached.heads))
    with_policy = cached.with_policy(policy)
    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "shrink": lambda xb: cached.run(xb, "shrink"),
        "noshrink": lambda xb: cached.run(xb, "noshrink"),
        "heads skipped": lambda xb: cached.run(xb, "backbone"),
        "heads never fire": lambda xb: never.run(xb, "shrink"),
        "policy": lambda xb: with_policy.run(xb, None),
    }
    if cached.graphs_enabled:
        variants["graphs"] = lambda xb: cached.run(xb, "graphs")
    res["latency"] = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            logger.info("latency: %s", name)
            res["latency"][name] = latency_rows(backbone, fn, x, args.repeats, batches=args.batches)
    return res


def markdown(res: dict[str, Any], command: str) -> str:
    a = res["answers"]
    lines = [
        f"### Model on {res['device']} ({res['machine']}, {res['date']})",
        "",
        f"Command: `{command}`",
        "",
        f"Answers on {a['n']} unseen images: agreement {a['agreement']:.2%}, GT accuracy "
        f"{a['accuracy_original']:.2%} -> {a['accuracy_cached']:.2%}; exits "
        + ", ".join(f"`{k}` {v:.1%}" for k, v in a["exits"].items()),
        "",
        "Cached / original latency per batch (medians of interleaved runs; the original's median in ms):",
        "",
        "| batch | original ms | " + " | ".join(res["latency"]) + " |",
        "|---|---|" + "---|" * len(res["latency"]),
    ]
    batches = [r["batch"] for r in next(iter(res["latency"].values()))]
    for i, b in enumerate(batches):
        orig = statistics.median(rows[i]["original_ms"] for rows in res["latency"].values())
        cells = " | ".join(f"{rows[i]['ratio']:.3f}" for rows in res["latency"].values())
        lines.append(f"| {b} | {orig:.2f} | {cells} |")
    if "graphs_captured" in res:
        lines += ["", f"CUDA graphs: {res['graphs_captured']} captured in {res['graphs_capture_s']} s before timing."]
    lines += ["", "Policy measured on this device: " + ", ".join(f"{k}: {v}" for k, v in res["policy"].items()), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True, help="folder written by tools/bench.py --sections bundle")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", type=Path, required=True, help="folder for device.json and DEVICE.md")
    p.add_argument("--repeats", type=int, default=10, help="fresh batches per batch size, 3 timed rounds each")
    p.add_argument("--policy-repeats", type=int, default=5, help="timed runs per mode and size for the policy")
    p.add_argument(
        "--batches",
        type=lambda s: tuple(int(b) for b in s.split(",")),
        default=BATCHES,
        help="comma-separated batch sizes (default: 1,8,16,32,64,128)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.quiet, ns.verbose)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    args = DeviceArgs(ns.bundle, ns.device, ns.out, ns.repeats, ns.policy_repeats, ns.batches)

    def call() -> None:
        res = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python tools/bench_device.py " + " ".join(sys.argv[1:] if argv is None else argv)
        (args.out / "device.json").write_text(json.dumps(res, indent=2))
        md = markdown(res, command)
        (args.out / "DEVICE.md").write_text(md)
        sys.stdout.write(md + "\n")

    return run_command(call, logger)


if __name__ == "__main__":
    sys.exit(main())
