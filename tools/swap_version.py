"""Swap the version of a model that TorchServe serves by default, without dropping requests; or roll back.

A swap registers the new archive next to the running version, waits until one of its workers is READY, and only
then moves the default (``PUT /models/NAME/VERSION/set-default``), so ``/predictions/NAME`` is answered by the old
version until the new one can answer. The old version stays registered with its workers (instant rollback)
unless ``--retire-old``. Each swap writes the previous and new default to a state file that ``--rollback`` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Run as `python tools/swap_version.py` from a checkout (package not installed): make `layercache` importable.
if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

from layercache.errors import ArchiveError, LayercacheError
from layercache.management import (
    ManagementClient,
    ManagementError,
    archive_url,
    mar_version,
)

logger = logging.getLogger("layercache.swap_version")

STATE_FILE = ".layercache-swap.json"


class SwapError(LayercacheError):
    """The swap or rollback cannot go ahead with what the server holds (exit status 1)."""


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


@dataclass(frozen=True)
class SwapArgs:
    """The parsed command line."""

    model: str
    mar: Path | None
    management: str
    token: str | None
    workers: int
    retire_old: bool
    drain_s: float
    timeout_s: float
    model_store: Path
    rollback: bool
    to: str | None
    state_file: Path
    quiet: bool


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
        "--management",
        default="http://127.0.0.1:8081",
        help="TorchServe management address (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="management token from TorchServe's key_file.json, needed when token authorization is on (default: none)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers to start for the new version (default: %(default)s)",
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
        "--to",
        default=None,
        help="with --rollback, the version to make the default (default: from the state file)",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=Path(STATE_FILE),
        help="where swaps record the previous and new default per model (default: %(default)s in the "
        "current directory)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="log warnings and errors only (default: off)",
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> SwapArgs:
    ns = parser.parse_args(argv)
    if ns.rollback and ns.mar is not None:
        parser.error("--rollback does not take --mar (use --to VERSION to pick the version)")
    if not ns.rollback and ns.mar is None:
        parser.error("--mar is required unless --rollback is given")
    if ns.to is not None and not ns.rollback:
        parser.error("--to only goes with --rollback")
    if ns.workers < 1:
        parser.error(f"--workers must be >= 1, got {ns.workers}")
    if ns.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {ns.timeout}")
    if ns.drain < 0:
        parser.error(f"--drain must be >= 0, got {ns.drain}")
    if not ns.management.startswith(("http://", "https://")):
        parser.error(f"--management must be an http(s) URL, got {ns.management!r}")
    return SwapArgs(
        model=ns.model,
        mar=ns.mar,
        management=ns.management,
        token=ns.token,
        workers=ns.workers,
        retire_old=ns.retire_old,
        drain_s=ns.drain,
        timeout_s=ns.timeout,
        model_store=ns.model_store,
        rollback=ns.rollback,
        to=ns.to,
        state_file=ns.state_file,
        quiet=ns.quiet,
    )


# -- state file ------------------------------------------------------------------------------------------------
def read_state(path: Path) -> dict:
    """The whole state file (``{}`` when absent)."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"state file {str(path)!r} is not valid JSON ({error}): fix or delete it") from None
    if not isinstance(state, dict):
        raise TypeError(f"state file {str(path)!r} does not hold a JSON object: fix or delete it")
    return state


def write_state(path: Path, model: str, entry: dict) -> None:
    """Record ``entry`` for ``model``, keeping other models' entries (written to a temp name, then renamed)."""
    state = read_state(path)
    state[model] = entry
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _entry(args: SwapArgs, previous: str | None, current: str, previous_retired: bool) -> dict:
    return {
        "previous": previous,
        "current": current,
        "previous_retired": previous_retired,
        "management": args.management,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- actions ---------------------------------------------------------------------------------------------------
def swap(args: SwapArgs, client: ManagementClient, version: str) -> None:
    """Register ``args.mar`` (whose manifest says ``version``), wait for READY, make it the default."""
    if args.mar is None:
        raise ValueError("swap needs --mar")
    old = client.default_version(args.model)
    # Checked here rather than left to TorchServe's 409: a refused file:// registration would still leave its
    # copy in the model store, and the next try would then fail on that file.
    registered = {str(v.get("modelVersion")) for v in client.list_versions(args.model)} if old else set()
    if version == old:
        raise SwapError(
            f"version {version} is already the default of {args.model!r}: archive the new model with another --version"
        )
    if version in registered:
        raise SwapError(
            f"version {version} of {args.model!r} is already registered: make it the default with "
            f"--rollback --to {version}, or unregister it, or archive the new model with another --version"
        )
    url = archive_url(args.mar, args.model_store)
    logger.info(
        "registering %s version %s from %s (%d worker(s))",
        args.model,
        version,
        url,
        args.workers,
    )
    started = time.monotonic()
    client.register(url, args.model, initial_workers=args.workers)
    try:
        client.wait_ready(args.model, version, timeout_s=args.timeout_s)
        logger.info("version %s READY after %.1f s", version, time.monotonic() - started)
        client.ensure_workers(args.model, version, args.workers)
        client.set_default(args.model, version)
    except ManagementError:
        # Leave the server as it was: the new version never served the default route.
        logger.warning("swap failed; unregistering the new version %s again", version)
        try:
            client.unregister(args.model, version)
        except ManagementError as cleanup_error:
            logger.warning("could not unregister %s %s: %s", args.model, version, cleanup_error)
        raise
    logger.info("default version of %s: %s -> %s", args.model, old or "(none)", version)

    # Recorded before retiring, so a failed unregister still leaves the rollback target on record.
    write_state(args.state_file, args.model, _entry(args, old, version, False))
    if args.retire_old and old is not None:
        logger.info("retiring %s %s in %.1f s", args.model, old, args.drain_s)
        time.sleep(args.drain_s)
        client.unregister(args.model, old)
        write_state(args.state_file, args.model, _entry(args, old, version, True))
        logger.info("unregistered %s %s", args.model, old)


def rollback(args: SwapArgs, client: ManagementClient, parser: argparse.ArgumentParser) -> None:
    """Make ``--to`` or the state file's previous default the default again, starting workers if it has none."""
    target = args.to
    if target is None:
        try:
            entry = read_state(args.state_file).get(args.model)
        except (TypeError, ValueError) as error:
            parser.error(str(error))
        if not entry or not entry.get("previous"):
            parser.error(
                f"no previous default of {args.model!r} recorded in {str(args.state_file)!r}: pass --to VERSION"
            )
        if entry.get("previous_retired"):
            parser.error(
                f"version {entry['previous']} of {args.model!r} was unregistered by --retire-old: register its "
                "archive again with a swap"
            )
        target = str(entry["previous"])
    current = client.default_version(args.model)
    versions = {str(v.get("modelVersion")): v for v in client.list_versions(args.model)}
    if target not in versions:
        raise SwapError(
            f"version {target} of {args.model!r} is not registered (registered: {', '.join(sorted(versions))}): "
            "swap to its archive instead"
        )
    if target == current:
        logger.info("%s %s is already the default; nothing to do", args.model, target)
        return
    workers = versions[target].get("workers") or []
    if not any(w.get("status") == "READY" for w in workers):
        logger.info("version %s has no READY worker; starting %d", target, args.workers)
        client.scale(args.model, target, args.workers)
        client.wait_ready(args.model, target, timeout_s=args.timeout_s)
    client.set_default(args.model, target)
    logger.info(
        "default version of %s: %s -> %s (rollback)",
        args.model,
        current or "(none)",
        target,
    )
    write_state(args.state_file, args.model, _entry(args, current, target, False))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit with 2 through ``parser.error``).

    Example::

        main(["--model", "resnet", "--mar", "model-store/model_cached.mar"])
    """
    parser = build_parser()
    args = parse_args(parser, argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)

    client = ManagementClient(args.management, token=args.token, timeout_s=max(args.timeout_s, 10.0))
    try:
        if args.rollback:
            rollback(args, client, parser)
        else:
            try:
                name, version = mar_version(args.mar)
            except ArchiveError as error:
                parser.error(str(error))
            if name != args.model:
                logger.info("archive model name %r is served as %r", name, args.model)
            swap(args, client, version)
    except (ManagementError, SwapError) as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
