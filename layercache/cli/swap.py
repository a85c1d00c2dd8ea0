"""Swap the version of a model that TorchServe serves by default, without dropping requests; or roll back.

A swap registers the new archive next to the running version, waits until one of its workers is READY, and only
then moves the default (PUT /models/NAME/VERSION/set-default), so /predictions/NAME is answered by the old
version until the new one can answer. The old version stays registered with its workers (instant rollback)
unless --retire-old. Each swap writes the previous and new default to a state file that --rollback reads.

With TorchServe's token authorization on, the management key comes from --key-file (TorchServe's key_file.json),
$LAYERCACHE_MANAGEMENT_TOKEN, or ./key_file.json; --token works too but puts the key where other users see it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercache.cli import FAILED, setup_logging
from layercache.errors import ArchiveError, ConfigError, LayercacheError, TokenError
from layercache.management import KEY_FILE, TOKEN_ENV, ManagementClient, mar_version, read_token
from layercache.swap import STATE_FILE, SwapRequest, rollback, swap_version

logger = logging.getLogger("layercache.swap")

EPILOG = """\
examples:
  # serve model-store/model_cached.mar as the default version of "resnet" (the old version keeps running);
  # the management key is read from ./key_file.json, which TorchServe writes into the directory it was started
  # from (the repository root with `torchserve --start --ts-config config.properties` there)
  python tools/swap_version.py --model resnet --mar model-store/model_cached.mar

  # TorchServe started from another directory: read its key file there
  python tools/swap_version.py --model resnet --mar model-store/model_cached.mar --key-file /srv/ts/key_file.json

  # or give the key in the environment (e.g. from a secret store; not shown by ps, unlike --token)
  LAYERCACHE_MANAGEMENT_TOKEN="$(cat /run/secrets/ts-management-key)" \\
    python tools/swap_version.py --model resnet --mar model-store/model_cached.mar

  # an archive outside the model store is registered by file:// URL (TorchServe copies it into its store), which
  # only works where allowed_urls accepts it (config.properties accepts no URL: copy the .mar into the store)
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
2 usage error (also a key file that is missing, unreadable or holds an expired key).
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
    add_key_arguments(parser)
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
    token_source: str
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
    try:
        token, token_source = management_token(ns.token, ns.key_file)
    except TokenError as error:
        parser.error(str(error))
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
    return SwapArgs(ns.management, token, token_source, ns.rollback, request, ns.quiet)


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    """``--key-file`` / ``--token``, one of them (read with :func:`management_token`)."""
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="TorchServe's key_file.json, which it writes into the directory it was started from when token "
        f"authorization is on; the management key is read from it (default: ${TOKEN_ENV} when set, else "
        f"{KEY_FILE} in the current directory when it exists, else no key)",
    )
    key.add_argument(
        "--token",
        default=None,
        help="the management key itself. Visible to other users of this machine (ps) and kept in shell history: "
        f"prefer --key-file or ${TOKEN_ENV} (default: none)",
    )


def management_token(token: str | None, key_file: Path | None) -> tuple[str | None, str]:
    """The management key and where it came from, first found of: ``--token``, ``--key-file``,
    ``$LAYERCACHE_MANAGEMENT_TOKEN``, ``./key_file.json``; ``(None, "none")`` when there is none.

    Raises:
        TokenError: the key file (given, or ``./key_file.json``) is unreadable or its key has expired.
    """
    if token:
        return token, "--token"
    if key_file is not None:
        return read_token(key_file), str(key_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    if Path(KEY_FILE).exists():
        return read_token(KEY_FILE), f"./{KEY_FILE}"
    return None, "none"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit with 2 through ``parser.error``)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    setup_logging(args.quiet)
    logger.debug("management key from %s", args.token_source)
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
