"""Tests for the front door, layercache/__init__.py: every exported verb and type resolves, nothing else is
exported, importing it stays cheap, and the library never reaches back into the checkout's tools."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import layercache as lc

ROOT = Path(__file__).resolve().parents[2]


def test_every_exported_name_resolves_and_is_what_its_module_defines() -> None:
    import importlib

    for name in lc.__all__:
        value = getattr(lc, name)
        assert value is getattr(importlib.import_module(value.__module__), name)
    assert {"wrap_for_recording", "record_images", "build_cached_archive", "load_cached", "swap_version",
            "check_cache", "refresh_cache"} <= set(lc.__all__)  # fmt: skip


def test_an_unknown_name_lists_the_front_door() -> None:
    with pytest.raises(AttributeError, match="the front door has"):
        lc.build_cache  # noqa: B018 - a library function, not a front-door verb


def test_the_docstring_example_uses_only_the_front_door() -> None:
    used = set(re.findall(r"\blc\.(\w+)", lc.__doc__ or ""))
    assert used and used <= set(lc.__all__), sorted(used - set(lc.__all__))


def test_import_layercache_loads_neither_torch_nor_torchserve() -> None:
    code = "import sys, layercache; print(sorted(m for m in ('torch', 'ts') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_the_library_never_imports_tools_archiver_or_handler() -> None:
    """TorchServe puts a model's folder first on sys.path: a module named tools/archiver/handler in the library's
    imports would resolve to whatever the archive ships, and `pip install .` has no tools/ at all."""
    bad = []
    for path in (ROOT / "layercache").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            top = ("tools", "archiver", "handler")
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in top]
    assert bad == []
