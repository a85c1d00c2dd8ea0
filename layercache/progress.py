"""One progress-bar look for every long loop (tqdm on stderr), switched off by the command-line ``--quiet``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: The signature library functions take for their ``progress`` argument.
Progress = Callable[[Iterable[T], str], Iterable[T]]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Turn every :func:`progress` bar off (``True``) or on (``False``)."""
    global _QUIET
    _QUIET = quiet


def progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """tqdm progress bar on stderr (off when quiet), the same look for every long loop."""
    if _QUIET:
        return it
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay readable).
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def no_progress(it: Iterable[T], desc: str) -> Iterable[T]:
    """The ``progress`` argument that shows nothing."""
    return it
