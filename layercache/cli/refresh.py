"""Refresh a served cache from recent traffic (paper section 4.5): rebuild from the newest logged requests, compare
the candidate with the running cache on recent requests neither trained on, and swap it in through TorchServe's
management API only if it keeps its promise and costs no more; otherwise keep the running one and say why. The
previous version stays registered: swap_version.py --rollback goes back. The management key is found as
swap_version.py finds it: --key-file, $LAYERCACHE_MANAGEMENT_TOKEN, or ./key_file.json.

Exit status: 0 swapped, 4 kept the running cache (the reason is logged), 1 error, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercache.build import BuildConfig
from layercache.cli import run_command, setup_logging
from layercache.cli.swap import add_key_arguments, management_token
from layercache.errors import ConfigError, TokenError
from layercache.management import ManagementClient
from layercache.progress import progress
from layercache.refresh import RefreshRequest, refresh_cache

logger = logging.getLogger("layercache.refresh")
#: Exit status when the running cache was kept.
KEPT = 4

EPILOG = """examples:
  python tools/refresh.py --model fashion --mar model-store/fashion_cached.mar --logs logs/fashion
  python tools/refresh.py --model fashion --mar model-store/fashion_cached.mar --logs logs/fashion --dry-run
  python tools/build_cache.py --check --mar model-store/fashion_cached.mar --logs logs/fashion \\
      || python tools/refresh.py --model fashion --mar model-store/fashion_cached.mar --logs logs/fashion
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refresh.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="name the model is served under")
    p.add_argument("--mar", type=Path, required=True, help="the running cached archive")
    p.add_argument("--logs", type=Path, required=True, help="the log dir its workers record to")
    p.add_argument("--model-store", type=Path, default=Path("model-store"), help="the server's model store, where "
                   "the new archive is written (default: model-store)")  # fmt: skip
    p.add_argument("--management", default="http://127.0.0.1:8081", help="management address (default: %(default)s)")
    add_key_arguments(p)
    p.add_argument("--tolerance", type=float, default=0.01, help="the new cache's tolerance (default: 0.01)")
    p.add_argument(
        "--delta", type=float, default=0.05, help="the new cache's promise error probability (default: 0.05)"
    )
    p.add_argument("--max-rows", type=int, default=20_000, help="rebuild from the newest N rows (default: 20000)")
    p.add_argument("--workers", type=int, default=1, help="workers for the new version (default: 1)")
    p.add_argument("--version", default=None, help="the new version (default: <running>-r<UTC timestamp>)")
    p.add_argument("--state-file", type=Path, default=Path(".layercache-swap.json"), help="swap state file "
                   "(default: .layercache-swap.json)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="build and compare, do not swap (default: off)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


@dataclass(frozen=True)
class RefreshArgs:
    """The parsed command line."""

    management: str
    token: str | None
    request: RefreshRequest


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.quiet)
    try:
        request = RefreshRequest(
            model=ns.model,
            mar=ns.mar,
            logs=ns.logs,
            model_store=ns.model_store,
            config=BuildConfig(tolerance=ns.tolerance, delta=ns.delta),
            max_rows=ns.max_rows,
            version=ns.version,
            workers=ns.workers,
            state_file=ns.state_file,
            dry_run=ns.dry_run,
        )
        token = None if request.dry_run else management_token(ns.token, ns.key_file)[0]
    except (ConfigError, TokenError) as exc:
        parser.error(str(exc))
    args = RefreshArgs(ns.management, token, request)

    def call() -> int:
        client = None if args.request.dry_run else ManagementClient(args.management, token=args.token)
        outcome = refresh_cache(client, args.request, progress=progress)
        logger.info("%s", outcome.reason)
        summary = {"swapped": outcome.swapped, "reason": outcome.reason, "version": outcome.version}
        sys.stdout.write(json.dumps({**summary, **outcome.comparison}, default=str) + "\n")
        return 0 if outcome.swapped else KEPT

    return run_command(call, logger)
