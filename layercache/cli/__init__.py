"""The command-line layer: one module per command, each argparse -> a frozen dataclass -> one library call.

``tools/*.py`` and ``archiver/wrap_mar.py`` run these modules from a checkout; the console scripts
(``layercache-build`` ...) run them from an installed package. Shared here: logging setup and the one way a
library error becomes a one-line message and an exit status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from layercache.errors import LayercacheError
from layercache.progress import set_quiet

__all__ = ["run_command", "setup_logging"]

#: Exit status of a command whose library call raised a LayercacheError (usage errors exit with 2).
FAILED = 1


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log to stderr: INFO by default, WARNING with ``--quiet`` (and no progress bars), DEBUG with ``--verbose``."""
    set_quiet(quiet)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("matplotlib", "PIL", "torch.fx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(call: Callable[[], int | None], logger: logging.Logger) -> int:
    """Run a command's library call: a :class:`LayercacheError` becomes one logged line and exit status 1."""
    try:
        return int(call() or 0)
    except LayercacheError as exc:
        logger.error("%s", exc)
        return FAILED
