"""Shared fixtures of the unit tests: one torch thread, and a clean import state after tests that load archives.

Loading a ``.mar`` in-process does what a TorchServe worker does: the unpacked archive goes first on
``sys.path`` and its model / handler files are imported as top-level modules. The fixture below undoes that
after each test, so one test's ``tiny_model`` never shadows another's; it also undoes the logging setup of the
tools run in-process.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_archive


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: a second intra-op thread only adds spin-waiting on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_import_and_logging_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    path = list(sys.path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    sys.path[:] = path
    # The tools call logging.basicConfig(force=True); give pytest its handlers and level back.
    root.handlers[:] = handlers
    root.setLevel(level)
    base = str(tmp_path_factory.getbasetemp())
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if origin.startswith(base) or "/layercache-" in origin:
            del sys.modules[name]


@pytest.fixture
def tiny_mar(tmp_path: Path) -> Callable[..., Path]:
    """Factory: archive the tiny classifier (seeded weights) with the stock or the tiny custom handler."""

    def make(
        name: str = "tiny",
        *,
        handler: str = "custom",
        config: dict[str, Any] | None = None,
        extra_files: list[Path] | None = None,
    ) -> Path:
        return tiny_archive(tmp_path, name, handler=handler, config=config, extra_files=extra_files)

    return make


def png_bytes(shape: tuple[int, int] = (28, 28), seed: int = 0) -> bytes:
    """A seeded random grayscale PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    return png_bytes
