"""Repackage an archived classifier with layercache's recording handler.

The wrapped archive answers exactly like the original (its handler's preprocess/postprocess run unchanged) and
records every request to Parquet for build_cache.py.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercache.archive import wrap_for_recording
from layercache.cli import run_command, setup_logging
from layercache.config import HandlerConfig

logger = logging.getLogger("layercache.wrap")

EPILOG = """examples:
  python archiver/wrap_mar.py model-store/fashion.mar -o model-store/fashion_rec.mar
  python archiver/wrap_mar.py model.mar -o model-store/model_rec.mar --log-dir /var/log/layercache/model \\
      --input-shape 3,32,32 --max-log-gb 5
  python archiver/wrap_mar.py model.mar -o model-store/model_rec.mar --sample cat.jpg
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r} must be comma-separated ints, e.g. 3,32,32") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wrap_mar.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mar", type=Path, help="the original classifier archive (.mar)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the recording archive to write (.mar)")
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where workers record traffic (default: $LAYERCACHE_LOG_DIR/<model> or ~/.layercache/logs/<model>)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="per-request input shape after preprocess, e.g. 3,32,32; other shapes get HTTP 400 "
        "(default: fixed by the first request a worker accepts)",
    )
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated fx node names whose pooled activations are logged (default: automatic)",
    )
    acts = p.add_mutually_exclusive_group()
    acts.add_argument(
        "--activations",
        action="store_true",
        help="also log pooled activations of the candidate layers (needs --input-shape; builds replay the "
        "request bodies and do not need them; default: off)",
    )
    acts.add_argument("--no-activations", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--sample",
        type=Path,
        default=None,
        help="a request body (e.g. one image) to test-run the archive's handler with before wrapping: refuses a "
        "preprocess that does not give one tensor per request, or an output without clear class scores",
    )
    p.add_argument(
        "--leaf-modules",
        default=None,
        help="comma-separated module class names torch.fx must not trace into when finding the layers to log, e.g. "
        "SamePadConv2d (default: only those found automatically where tracing fails)",
    )
    p.add_argument(
        "--segment-mb", type=float, default=64.0, help="rotate a worker's log segment at this size (default: 64)"
    )
    p.add_argument("--max-log-gb", type=float, default=10.0, help="cap on the whole log dir (default: 10)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: info)")
    return p


@dataclass(frozen=True)
class WrapArgs:
    """The parsed command line."""

    mar: Path
    output: Path
    handler_config: HandlerConfig
    sample: Path | None
    force: bool
    quiet: bool

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> WrapArgs:
        return cls(
            mar=ns.mar,
            output=ns.output,
            handler_config=HandlerConfig(
                log_dir=str(ns.log_dir.resolve()) if ns.log_dir else None,
                record_activations=ns.activations,
                candidates=tuple(ns.candidates.split(",")) if ns.candidates else None,
                leaf_modules=tuple(n.strip() for n in (ns.leaf_modules or "").split(",") if n.strip()),
                segment_mb=ns.segment_mb,
                max_log_gb=ns.max_log_gb,
                input_shape=ns.input_shape,
            ),
            sample=ns.sample,
            force=ns.force,
            quiet=ns.quiet,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.quiet)
    if ns.output.exists() and not ns.force:
        parser.error(f"{ns.output} exists; pass --force to overwrite it")
    try:
        args = WrapArgs.from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))

    if args.sample is not None and not args.sample.is_file():
        parser.error(f"--sample {args.sample} is not a file; pass one request body, e.g. an image the model answers")

    def call() -> None:
        sample = args.sample.read_bytes() if args.sample is not None else None
        wrap_for_recording(args.mar, args.output, handler_config=args.handler_config, force=args.force, sample=sample)
        logger.info("recording archive: %s", args.output)

    return run_command(call, logger)
