"""Archive the demo's embedded classifier as a plain .mar, or train it anew on Fashion-MNIST first.

The result is the "archived classifier a user already has": eager model file + state_dict + its own handler.
The shipped weights (examples/fashion_cnn/fashion_cnn.pt, float16) come from --train with the defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

import numpy as np  # noqa: E402
import torch  # noqa: E402

from layercache.cli import run_command, setup_logging  # noqa: E402
from layercache.datasets import load_fashion_mnist  # noqa: E402
from layercache.loading import model_class_from_file  # noqa: E402
from layercache.testing.backbones import MEAN, STD, accuracy, archive_fashion_classifier, fit  # noqa: E402

logger = logging.getLogger("make_default_model")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_cnn"

EPILOG = """examples:
  python tools/make_default_model.py -o model-store/fashion.mar
  python tools/make_default_model.py -o /tmp/fresh.mar --train --train-samples 3000 --epochs 1 --force
"""


@dataclass(frozen=True)
class MakeArgs:
    """The parsed command line."""

    output: Path
    name: str
    version: str
    train: bool
    train_samples: int
    epochs: int
    seed: int
    force: bool


def _inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised (N, 1, 28, 28), what examples/fashion_cnn/fashion_handler.py serves."""
    return (torch.tensor(images, dtype=torch.float32).div(255).unsqueeze(1) - MEAN) / STD


def make(args: MakeArgs) -> None:
    """Train when asked (seeded; the weights are stored as float16), then archive."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = None
        if args.train:
            torch.manual_seed(args.seed)
            images, labels = load_fashion_mnist("train")
            x, y = (
                _inputs(images[: args.train_samples]),
                torch.from_numpy(labels[: args.train_samples].astype(np.int64)),
            )
            t0 = time.perf_counter()
            model = fit(model_class_from_file(EXAMPLE / "fashion_cnn.py")(), x, y, args.epochs, args.seed)
            test_images, test_labels = load_fashion_mnist("test")
            acc = accuracy(model, _inputs(test_images), test_labels)
            logger.info(
                "trained in %.0f s; accuracy on the 10,000 test images: %.2f%%", time.perf_counter() - t0, 100 * acc
            )
            weights = Path(tmp) / "fashion_cnn.pt"
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, weights)
        archive_fashion_classifier(
            EXAMPLE, args.output, weights=weights, name=args.name, version=args.version, force=args.force
        )
    logger.info("archived %s", args.output)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_default_model.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("model-store/fashion.mar"),
        help="archive to write (default: model-store/fashion.mar)",
    )
    p.add_argument("--name", default="fashion", help="model name (default: fashion)")
    p.add_argument("--version", default="1.0", help="archive version (default: 1.0)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train new weights instead of archiving the shipped ones (default: the shipped "
        "examples/fashion_cnn/fashion_cnn.pt, trained with the defaults below)",
    )
    p.add_argument("--train-samples", type=int, default=20000, help="training images used (default: 20000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.quiet)
    if ns.output.exists() and not ns.force:
        parser.error(f"{ns.output} exists; pass --force to overwrite it")
    args = MakeArgs(ns.output, ns.name, ns.version, ns.train, ns.train_samples, ns.epochs, ns.seed, ns.force)
    return run_command(lambda: make(args), logger)


if __name__ == "__main__":
    sys.exit(main())
