"""Record traffic offline: drive a recording .mar's handler over a folder of images.

Runs the same code path as a TorchServe worker (the archive's own handler with a real ``ts.context.Context``),
in batches. Any PIL-readable file is an image; an ImageFolder layout ``DIR/<class>/*.png`` adds a ``label``
column, used only for evaluation reports, never for training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layercache.cli import progress, setup_logging  # noqa: E402
from layercache.errors import LayercacheError  # noqa: E402
from layercache.torchserve_adapter import ServiceHandler, open_mar, run_offline  # noqa: E402

logger = logging.getLogger("record")

EPILOG = """examples:
  python tools/record.py --mar model-store/fashion_rec.mar --images data/traffic --log-dir logs/fashion
  python tools/record.py --mar model_rec.mar --images photos/ --log-dir logs/m --batch-size 16 --limit 1000
"""


def find_images(root: Path) -> tuple[list[Path], list[str | None]]:
    """Files under ``root`` in sorted order, with the ImageFolder class (first folder level) when there is one."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    labels: list[str | None] = []
    for p in files:
        rel = p.relative_to(root)
        labels.append(rel.parts[0] if len(rel.parts) == 2 else None)
    if labels and any(lbl is None for lbl in labels):
        labels = [None] * len(files)
    return files, labels


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    files, labels = find_images(args.images)
    if args.limit is not None:
        files, labels = files[: args.limit], labels[: args.limit]
    if not files:
        parser.error(f"no files under {args.images}")
    with tempfile.TemporaryDirectory(prefix="layercache-record-") as tmp:
        try:
            loaded = open_mar(
                args.mar, Path(tmp), as_served=True, handler_overrides={"log_dir": str(args.log_dir.resolve())}
            )
        except LayercacheError as exc:
            logger.error("%s", exc)
            return 1
        handler = loaded.handler
        if not isinstance(handler, ServiceHandler) or handler.service.config.mode != "record":
            logger.error("%s is not a recording archive. Hint: wrap it first with archiver/wrap_mar.py", args.mar)
            return 1
        ok = failed = 0
        starts = range(0, len(files), args.batch_size)
        for s in progress(starts, "record", total=len(starts)):
            rows = []
            for path, label in zip(files[s : s + args.batch_size], labels[s : s + args.batch_size]):
                row = {"data": path.read_bytes()}
                if label is not None:
                    row["label"] = label
                rows.append(row)
            answers, codes = run_offline(handler, loaded.context, rows)
            for path, code, answer in zip(files[s : s + args.batch_size], codes, answers):
                if code == 200:
                    ok += 1
                else:
                    failed += 1
                    logger.warning("%s: HTTP %d %s", path, code, answer)
        recorder = handler.service.recorder
        if recorder is not None:
            recorder.close()
            logger.info(
                "recorded %d rows to %s (%d failed to record, %d dropped by the cap)",
                recorder.written_rows,
                args.log_dir,
                recorder.failed_rows,
                recorder.dropped_rows,
            )
        logger.info("%d requests answered, %d rejected", ok, failed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
