"""The repository's command files (``tools/*.py``, ``archiver/*.py``) as importable modules.

One way to reach them everywhere: console scripts (``pip install -e .``), the demo, the benchmarks and the tests
all import ``tools.<name>`` / ``archiver.<name>`` (namespace packages under the repository root).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

_ROOT = Path(__file__).resolve().parents[1]


def tool_module(rel: str) -> ModuleType:
    """Import a command file by its path in the repository, e.g. ``tools/build_cache.py``.

    Raises:
        FileNotFoundError: the file is not there (the tools need the source tree or an editable install).
    """
    path = _ROOT / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the tools need the source tree (pip install -e .)")
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    return importlib.import_module(".".join(Path(rel).with_suffix("").parts))


def tool_main(rel: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv) -> int`` of a command file (see :func:`tool_module`)."""
    return tool_module(rel).main


def _run(rel: str) -> int:
    try:
        main = tool_main(rel)
    except FileNotFoundError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    return int(main(sys.argv[1:]))


def wrap_mar() -> int:
    return _run("archiver/wrap_mar.py")


def record() -> int:
    return _run("tools/record.py")


def build_cache() -> int:
    return _run("tools/build_cache.py")


def swap_version() -> int:
    return _run("tools/swap_version.py")
