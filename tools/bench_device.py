"""Model-level benchmark on any torch device (the GPU tables of issue #3), from a bundle that needs no TorchServe.

``tools/bench.py --sections bundle`` writes the bundle (backbone weights and model file, the built cache, the
3,000 unseen evaluation inputs) to ``OUT/device-bundle``; this script loads it with torch and the core library
only, so it runs on a machine that has neither TorchServe nor ``../shared`` (e.g. the GPU device machine, whose
python has its own torch). On the device it measures, original and cached side by side, interleaved:

* answers: agreement of the cached model with the backbone on the unseen inputs, exits taken;
* latency per batch at batch 1..128 for each cached mode (shrink, noshrink, heads skipped, heads that never fire)
  and for the per-batch-size policy the cached worker would measure at startup (``layercache.policy``);
* the policy itself.

Results: ``OUT/device.json`` and ``OUT/DEVICE.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layercache.cli import progress, setup_logging  # noqa: E402
from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, CacheSpec  # noqa: E402
from layercache.runtime import CachedModel, measure_policy  # noqa: E402
from layercache.timing import interleaved  # noqa: E402

logger = logging.getLogger("bench_device")
BATCHES = (1, 8, 16, 32, 64, 128)
BUNDLE_FILES = ("bundle.json", "model.py", "backbone.pt", CACHE_SPEC_FILE, HEADS_FILE, "eval.pt")

EPILOG = """examples:
  python tools/bench.py --out bench-out --sections bundle                     # here: write bench-out/device-bundle
  python tools/bench_device.py --bundle bench-out/device-bundle --device cpu --batches 1,8 --repeats 1 --out /tmp/d
  python tools/bench_device.py --bundle bench-out/device-bundle --device cuda --repeats 20 --out "$OUT"   # on a GPU
"""


def latency_rows(
    original: Callable[[Any], Any],
    cached: Callable[[Any], Any],
    x: torch.Tensor | Sequence[Any],
    repeats: int,
    *,
    seed: int = 0,
    batches: Sequence[int] = BATCHES,
) -> list[dict[str, Any]]:
    """Original vs cached per batch size: ``repeats`` fresh real batches, each timed 3 rounds, interleaved.

    ``x`` is the pool batches are drawn from: a tensor (a batch is its rows, on its device) or a sequence of
    requests (a batch is a list of them).

    Returns one row per batch size: medians and min-max in ms; ``ratio`` is the median over rounds of
    cached / original timed back to back in that round (a paired estimate: a slow phase of a shared machine hits
    both calls of a round alike), ``ratio_of_medians`` the ratio of the two medians.
    """
    rng = np.random.default_rng(seed)
    device = x.device if isinstance(x, torch.Tensor) else None
    rows = []
    for b in progress(batches, "latency"):
        ta: list[float] = []
        tb: list[float] = []
        for _ in range(repeats):
            idx = rng.choice(len(x), size=b, replace=len(x) < b)
            if isinstance(x, torch.Tensor):
                xb: Any = x[torch.from_numpy(idx).to(x.device)].contiguous()
            else:
                xb = [x[i] for i in idx]
            calls = {"a": lambda xb=xb: original(xb), "b": lambda xb=xb: cached(xb)}
            t = interleaved(calls, rounds=3, device=device)
            ta += t["a"]
            tb += t["b"]
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append(
            {
                "batch": b,
                "original_ms": 1e3 * ma,
                "cached_ms": 1e3 * mb,
                "ratio": statistics.median(tb_i / ta_i for ta_i, tb_i in zip(ta, tb, strict=True)),
                "ratio_of_medians": mb / ma,
                "original_range_ms": [1e3 * min(ta), 1e3 * max(ta)],
                "cached_range_ms": [1e3 * min(tb), 1e3 * max(tb)],
            }
        )
    return rows


def load_model_class(path: Path, name: str) -> type[nn.Module]:
    """The classifier class ``name`` defined in the bundle's model file."""
    spec = importlib.util.spec_from_file_location("layercache_bench_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the model file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise SystemExit(f"{path} defines no nn.Module class {name!r}; check bundle.json")
    return cls


def load_bundle(bundle: Path, device: torch.device) -> tuple[nn.Module, CachedModel, torch.Tensor, np.ndarray]:
    """Backbone, cached model (both eval mode, on ``device``), the evaluation inputs on ``device`` and labels."""
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise SystemExit(
            f"bundle {bundle} lacks {missing}; write it with: python tools/bench.py --out bench-out --sections bundle"
        )
    meta = json.loads((bundle / "bundle.json").read_text())
    backbone = load_model_class(bundle / "model.py", meta["model_class"])()
    state = torch.load(bundle / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    backbone = backbone.eval().to(device)
    spec = CacheSpec.load(bundle / CACHE_SPEC_FILE)
    heads_state = torch.load(bundle / HEADS_FILE, map_location=device, weights_only=True)
    cached = CachedModel.from_spec(backbone, spec, heads_state).to(device).eval()
    data = torch.load(bundle / "eval.pt", map_location="cpu", weights_only=True)
    return backbone, cached, data["x"].float().to(device), data["labels"].numpy()


@torch.inference_mode()
def predictions(backbone: nn.Module, cached: CachedModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 of the backbone and of the cached model (Algorithm 1, batches of 32) over ``x``, and each row's exit
    (position in ``cached.nodes``, -1 for the backbone)."""
    pred_b = torch.cat([backbone(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1).cpu().numpy()
    outs = [cached.run(x[i : i + 32], "shrink") for i in range(0, len(x), 32)]
    pred_c = torch.cat([o.logits for o in outs]).argmax(1).cpu().numpy()
    return pred_b, pred_c, torch.cat([o.exit_index for o in outs]).cpu().numpy()


def answers(backbone: nn.Module, cached: CachedModel, x: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
    """Agreement with the backbone, GT accuracy and exits of the cached model over ``x``."""
    pred_b, pred_c, exit_index = predictions(backbone, cached, x)
    names = [*cached.nodes, "backbone"]
    taken = {names[k]: float((exit_index == (k if k < len(cached.nodes) else -1)).mean()) for k in range(len(names))}
    return {
        "n": len(x),
        "agreement": float((pred_b == pred_c).mean()),
        "accuracy_original": float((pred_b == labels).mean()),
        "accuracy_cached": float((pred_c == labels).mean()),
        "exits": taken,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(args: argparse.Namespace) -> dict[str, Any]:
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
    with torch.inference_mode():
        policy = measure_policy(cached, x, batch_sizes=args.batches, repeats=args.policy_repeats)
    res["policy"] = policy
    never = cached.with_thresholds([1.01] * len(cached.heads))
    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "shrink": lambda xb: cached.run(xb, "shrink"),
        "noshrink": lambda xb: cached.run(xb, "noshrink"),
        "heads skipped": lambda xb: cached.run(xb, "backbone"),
        "heads never fire": lambda xb: never.run(xb, "shrink"),
        "policy": lambda xb: cached.run(xb, None),
    }
    res["latency"] = {}
    with torch.inference_mode():
        cached.policy = policy
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
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    command = "python tools/bench_device.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "device.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, command)
    (args.out / "DEVICE.md").write_text(md)
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
