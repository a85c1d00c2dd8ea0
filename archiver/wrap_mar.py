"""Repackage an archived classifier with layercache's recording handler.

The wrapped archive answers exactly like the original (its handler's preprocess/postprocess run unchanged) and
records every request to Parquet for ``tools/build_cache.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layercache.archive import wrap_for_recording  # noqa: E402
from layercache.cli import setup_logging  # noqa: E402
from layercache.config import HandlerConfig  # noqa: E402
from layercache.errors import LayercacheError  # noqa: E402

logger = logging.getLogger("wrap_mar")

EPILOG = """examples:
  python archiver/wrap_mar.py model-store/fashion.mar -o model-store/fashion_rec.mar
  python archiver/wrap_mar.py model.mar -o model-store/model_rec.mar --log-dir /var/log/layercache/model \\
      --input-shape 3,32,32 --max-log-gb 5
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
        "(default: learnt from the first batch)",
    )
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated fx node names whose pooled activations are logged (default: automatic)",
    )
    p.add_argument("--no-activations", action="store_true", help="log inputs and outputs only (default: off)")
    p.add_argument(
        "--segment-mb", type=float, default=64.0, help="rotate a worker's log segment at this size (default: 64)"
    )
    p.add_argument("--max-log-gb", type=float, default=10.0, help="cap on the whole log dir (default: 10)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: info)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    try:
        cfg = HandlerConfig(
            log_dir=str(args.log_dir.resolve()) if args.log_dir else None,
            record_activations=not args.no_activations,
            candidates=tuple(args.candidates.split(",")) if args.candidates else None,
            segment_mb=args.segment_mb,
            max_log_gb=args.max_log_gb,
            input_shape=args.input_shape,
        )
        wrap_for_recording(args.mar, args.output, handler_config=cfg, force=args.force)
    except LayercacheError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("recording archive: %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
