"""Console-script entry points (``pip install -e .``): each runs the matching tool of the source tree."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _run(rel: str) -> int:
    path = _ROOT / rel
    if not path.is_file():
        sys.stderr.write(f"{path} not found: the console scripts need an editable install (pip install -e .)\n")
        return 2
    module = runpy.run_path(str(path), run_name="layercache_tool")
    return int(module["main"](sys.argv[1:]))


def wrap_mar() -> int:
    return _run("archiver/wrap_mar.py")


def record() -> int:
    return _run("tools/record.py")


def build_cache() -> int:
    return _run("tools/build_cache.py")


def swap_version() -> int:
    return _run("tools/swap_version.py")
