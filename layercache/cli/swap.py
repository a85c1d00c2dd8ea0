"""Swap the version of a model that TorchServe serves by default, without dropping requests; or roll back.

A swap registers the new archive next to the running version, waits until one of its workers is READY, and only
then moves the default (PUT /models/NAME/VERSION/set-default), so /predictions/NAME is answered by the old
version until the new one can answer. The old version stays registered with its workers (instant rollback)
unless --retire-old. Each swap writes the previous and new default to a state file that --rollback reads.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercache.cli import FAILED, setup_logging
from layercache.errors import ArchiveError, ConfigError, LayercacheError
from layercache.management import ManagementClient, mar_version
from layercache.swap import STATE_FILE, SwapRequest, rollback, swap_version

logger = logging.getLogger("layercache.swap")

EPILOG = """\
examples:
  # serve model-store/model_cached.mar as the default version of "resnet" (the old version keeps running)
  python tools/swap_version.py --model resnet --mar model-store/model_cached.mar

  # an archive outside the model store is registered by file:// URL (TorchServe copies it into its store)
  python tools/swap_version.py --model resnet --mar /tmp/build/resnet.mar --workers 2 --timeout 300

  # swap, then unregister the old version 5 s after the switch
  python tools/swap_version.py --model resnet --mar model-store/model_cached.mar --retire-old --drain 5

  # go back to the version that was the default before the last swap (read from .layercache-swap.json)
  python tools/swap_version.py --model resnet --rollback

  # make version 1.0 the default again
  python tools/swap_version.py --model resnet --rollback --to 1.0

state file: each swap or rollback records {"MODEL": {"previous": OLD, "current": NEW, ...}} in
.layercache-swap.json in the current directory (see --state-file); --rollback without --to sets "previous"
back as the default. Exit status: 0 done, 1 TorchServe refused or failed (message and hint logged),
2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swap_version.py",
        description=(
            "Register a new version of a TorchServe model, wait until a worker is READY, then make it\n"
            "the default version (no request is dropped); or roll back to the previous default."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="name the model is served under (required)")
    parser.add_argument(
        "--mar",
        type=Path,
        help="archive of the new version; its version comes from MAR-INF/MANIFEST.json "
        "(required unless --rollback; default: none)",
    )
    parser.add_argument(
        "--management", default="http://127.0.0.1:8081", help="TorchServe management address (default: %(default)s)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="management token from TorchServe's key_file.json, needed when token authorization is on (default: none)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="workers to start for the new version (default: %(default)s)"
    )
    old = parser.add_mutually_exclusive_group()
    old.add_argument(
        "--keep-old",
        dest="retire_old",
        action="store_false",
        help="keep the old version registered with its workers, so --rollback is instant (the default)",
    )
    old.add_argument(
        "--retire-old",
        dest="retire_old",
        action="store_true",
        help="unregister the old version --drain seconds after the switch; a later --rollback then needs the "
        "old archive registered again (default: off)",
    )
    parser.set_defaults(retire_old=False)
    parser.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="with --retire-old, seconds to let the old version finish requests it already took; its workers "
        "are killed on unregister (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for registration and for a READY worker (default: %(default)s)",
    )
    parser.add_argument(
        "--model-store",
        type=Path,
        default=Path("model-store"),
        help="the server's model_store directory: an archive directly inside it is registered by file name, "
        "any other by file:// URL, which TorchServe copies into its store (a file of the same name must not be "
        "there yet) and deletes on unregister (default: %(default)s)",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="set the previous default (from the state file, or --to) back as the default (default: off)",
    )
    parser.add_argument(
        "--to", default=None, help="with --rollback, the version to make the default (default: from the state file)"
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=Path(STATE_FILE),
        help="where swaps record the previous and new default per model "
        "(default: %(default)s in the current directory)",
    )
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only (default: off)")
    return parser


@dataclass(frozen=True)
class SwapArgs:
    """The parsed command line: where TorchServe is, and the swap or rollback to do there."""

    management: str
    token: str | None
    rollback: bool
    request: SwapRequest
    quiet: bool


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> SwapArgs:
    ns = parser.parse_args(argv)
    if ns.rollback and ns.mar is not None:
        parser.error("--rollback does not take --mar (use --to VERSION to pick the version)")
    if not ns.rollback and ns.mar is None:
        parser.error("--mar is required unless --rollback is given")
    if ns.to is not None and not ns.rollback:
        parser.error("--to only goes with --rollback")
    if not ns.management.startswith(("http://", "https://")):
        parser.error(f"--management must be an http(s) URL, got {ns.management!r}")
    if ns.mar is not None:
        try:
            mar_version(ns.mar)
        except ArchiveError as error:
            parser.error(str(error))
    try:
        request = SwapRequest(
            model=ns.model,
            mar=ns.mar,
            workers=ns.workers,
            retire_old=ns.retire_old,
            drain_s=ns.drain,
            timeout_s=ns.timeout,
            model_store=ns.model_store,
            to=ns.to,
            state_file=ns.state_file,
        )
    except ConfigError as error:
        parser.error(str(error))
    return SwapArgs(ns.management, ns.token, ns.rollback, request, ns.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit with 2 through ``parser.error``)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    setup_logging(args.quiet)
    client = ManagementClient(args.management, token=args.token, timeout_s=max(args.request.timeout_s, 10.0))
    try:
        if args.rollback:
            rollback(client, args.request)
        else:
            swap_version(client, args.request)
    except ConfigError as error:
        parser.error(str(error))
    except LayercacheError as error:
        logger.error("error: %s", error)
        return FAILED
    return 0
