"""Train a benchmark backbone on Fashion-MNIST (a second workload for ``tools/bench.py``), seeded, on CPU or GPU.

The inputs are the benchmark ResNet-18's: 28x28 grayscale resized to 32x32 (bilinear), normalised with
(0.2860, 0.3530), repeated to three channels, exactly what ``examples/resnet18_fmnist/fmnist_resnet_handler.py``
serves. Writes the model's ``state_dict``; ``tools/bench.py --workload`` archives it with that handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

import numpy as np  # noqa: E402
import torch  # noqa: E402

from layercache.cli import run_command, setup_logging  # noqa: E402
from layercache.datasets import load_fashion_mnist  # noqa: E402
from layercache.errors import ConfigError  # noqa: E402
from layercache.loading import model_class_from_file  # noqa: E402
from layercache.testing.backbones import accuracy, fit, to_input_32  # noqa: E402

logger = logging.getLogger("train_backbone")
ROOT = Path(__file__).resolve().parents[1]
#: architecture -> (model file, class name)
ARCHS = {"mobilenet_v2": (ROOT / "examples" / "mobilenet_v2_fmnist" / "mobilenet_v2_fmnist.py", "MobileNetV2FMNIST")}

EPILOG = """examples:
  python tools/train_backbone.py --arch mobilenet_v2 -o bench-out/mobilenet_v2/backbone.pt
  python tools/train_backbone.py --arch mobilenet_v2 -o /tmp/m.pt --samples 2000 --epochs 1 --device cpu
"""


def load_model(arch: str) -> torch.nn.Module:
    """A fresh model of ``arch`` from its example model file.

    Raises:
        ConfigError: an unknown architecture.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose from {sorted(ARCHS)}")
    path, cls = ARCHS[arch]
    return model_class_from_file(path, cls)()


@dataclass(frozen=True)
class TrainArgs:
    """The parsed command line."""

    arch: str
    output: Path
    samples: int
    epochs: int
    seed: int
    device: str


def train(args: TrainArgs) -> float:
    """Train ``args.arch`` on the first ``args.samples`` training images, save its state_dict; test accuracy."""
    torch.manual_seed(args.seed)
    model = load_model(args.arch)
    images, labels = load_fashion_mnist("train")
    x, y = to_input_32(images[: args.samples]), torch.from_numpy(labels[: args.samples].astype(np.int64))
    t0 = time.perf_counter()
    fit(model, x, y, args.epochs, args.seed, device=args.device)
    test_images, test_labels = load_fashion_mnist("test")
    acc = accuracy(model, to_input_32(test_images), test_labels, args.device)
    logger.info(
        "%s trained in %.0f s on %s; top-1 on the 10,000 test images: %.2f%%",
        args.arch,
        time.perf_counter() - t0,
        args.device,
        100 * acc,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.output)
    logger.info("wrote %s", args.output)
    return acc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_backbone.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default="mobilenet_v2", help=f"one of {sorted(ARCHS)} (default: mobilenet_v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="state_dict file to write")
    p.add_argument("--samples", type=int, default=60000, help="training images used (default: all 60000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.quiet)
    if ns.output.exists() and not ns.force:
        parser.error(f"{ns.output} exists; pass --force to overwrite it")
    if ns.samples < 1 or ns.epochs < 1:
        parser.error(f"--samples and --epochs must be >= 1, got {ns.samples} and {ns.epochs}")
    if ns.arch not in ARCHS:
        parser.error(f"unknown --arch {ns.arch!r}; choose from {sorted(ARCHS)}")
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = TrainArgs(ns.arch, ns.output, ns.samples, ns.epochs, ns.seed, device)
    return run_command(lambda: train(args) < 0, logger)


if __name__ == "__main__":
    sys.exit(main())
