"""Small helpers shared by the command-line tools: logging setup and one progress-bar wrapper."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_QUIET = False


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log to stderr: INFO by default, WARNING with ``--quiet``, DEBUG with ``--verbose``."""
    global _QUIET
    _QUIET = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("matplotlib", "PIL", "torch.fx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """tqdm progress bar on stderr (off with ``--quiet``), the same look for every long loop."""
    if _QUIET:
        return it
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay readable).
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)
