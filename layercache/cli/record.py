"""Record traffic offline: drive a recording .mar's handler over a folder of images.

Runs the same code path as a TorchServe worker (the archive's own handler with a real ts.context.Context), in
batches. Any PIL-readable file is an image; an ImageFolder layout DIR/<class>/*.png adds a label column, used
only for evaluation reports, never for training. The archive's own Python code runs here, as in TorchServe:
record only archives you trust.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercache.cli import run_command, setup_logging
from layercache.offline import find_images, record_images
from layercache.progress import progress

logger = logging.getLogger("layercache.record")

EPILOG = """examples:
  python tools/record.py --mar model-store/fashion_rec.mar --images data/traffic --log-dir logs/fashion
  python tools/record.py --mar model_rec.mar --images photos/ --log-dir logs/m --batch-size 16 --limit 1000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="record.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mar", type=Path, required=True, help="a recording archive made by archiver/wrap_mar.py")
    p.add_argument("--images", type=Path, required=True, help="folder of images (ImageFolder layout adds labels)")
    p.add_argument("--log-dir", type=Path, required=True, help="where to record (overrides the archive's log dir)")
    p.add_argument("--batch-size", type=int, default=32, help="requests per handle() call (default: 32)")
    p.add_argument("--limit", type=int, default=None, help="record at most this many images (default: all)")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bar (default: off)")
    return p


@dataclass(frozen=True)
class RecordArgs:
    """The parsed command line."""

    mar: Path
    images: Path
    log_dir: Path
    batch_size: int
    limit: int | None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.quiet)
    if not ns.images.is_dir():
        parser.error(f"--images {ns.images} is not a folder")
    if ns.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not find_images(ns.images)[0]:
        parser.error(f"no files under {ns.images}")
    args = RecordArgs(ns.mar, ns.images, ns.log_dir, ns.batch_size, ns.limit)

    def call() -> int:
        result = record_images(
            args.mar, args.images, args.log_dir, batch_size=args.batch_size, limit=args.limit, progress=progress
        )
        logger.info("%d requests answered, %d rejected", result.answered, len(result.rejected))
        return 0 if result.answered else 1

    return run_command(call, logger)
