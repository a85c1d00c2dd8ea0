"""Train the demo's embedded default classifier on Fashion-MNIST and archive it as a plain .mar.

The result is the "archived classifier a user already has": eager model file + state_dict + its own handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from layercache.archive import archive_classifier  # noqa: E402
from layercache.cli import setup_logging  # noqa: E402
from layercache.datasets import load_fashion_mnist  # noqa: E402
from layercache.entry import tool_module  # noqa: E402

logger = logging.getLogger("make_default_model")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_cnn"
MEAN, STD = 0.2860, 0.3530

EPILOG = """examples:
  python tools/make_default_model.py -o model-store/fashion.mar
  python tools/make_default_model.py -o /tmp/fresh.mar --train --train-samples 3000 --epochs 1 --force
"""


def train(samples: int, epochs: int, seed: int, batch: int = 128) -> torch.nn.Module:
    """Train :class:`FashionCNN` on the first ``samples`` training images (seeded; a few minutes at most)."""
    sys.path.insert(0, str(EXAMPLE))
    from fashion_cnn import FashionCNN

    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    x = (torch.from_numpy(images[:samples]).float().div(255).unsqueeze(1) - MEAN) / STD
    y = torch.from_numpy(labels[:samples].astype(np.int64))
    fit = tool_module("tools/train_backbone.py").fit
    return fit(FashionCNN(), x, y, epochs, seed, batch=batch)


def accuracy(model: torch.nn.Module, n: int = 2000) -> float:
    images, labels = load_fashion_mnist("test")
    x = (torch.from_numpy(images[-n:]).float().div(255).unsqueeze(1) - MEAN) / STD
    with torch.inference_mode():
        pred = model(x).argmax(1).numpy()
    return float((pred == labels[-n:]).mean())


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
        help="train new weights instead of archiving the shipped ones (default: shipped, "
        "examples/fashion_cnn/fashion_cnn.pt, trained with --train-samples 20000 --epochs 2)",
    )
    p.add_argument("--train-samples", type=int, default=20000, help="training images used (default: 20000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        weights = EXAMPLE / "fashion_cnn.pt"
        if args.train:
            t0 = time.perf_counter()
            model = train(args.train_samples, args.epochs, args.seed)
            logger.info(
                "trained in %.0f s; accuracy on the last 2000 test images: %.2f%%",
                time.perf_counter() - t0,
                100 * accuracy(model),
            )
            weights = Path(tmp) / "fashion_cnn.pt"
            torch.save(model.state_dict(), weights)
        archive_classifier(
            model_name=args.name,
            version=args.version,
            model_file=EXAMPLE / "fashion_cnn.py",
            weights=weights,
            handler=EXAMPLE / "fashion_handler.py",
            output=args.output,
            extra_files=[EXAMPLE / "index_to_name.json"],
            config={"batchSize": 8, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1},
            force=args.force,
        )
    logger.info("archived %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
