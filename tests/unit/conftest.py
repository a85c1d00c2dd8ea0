"""Shared fixtures of the unit tests: one torch thread, and a clean import state after tests that load archives.

Loading a ``.mar`` in-process does what a TorchServe worker does: the unpacked archive goes first on
``sys.path`` and its model / handler files are imported as top-level modules. The fixture below undoes that
after each test, so one test's ``tiny_model`` never shadows another's; it also undoes the logging setup of the
tools run in-process.
"""

from __future__ import annotations

import importlib.util
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

from layercache.archive import archive_classifier


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


# ------------------------------------------------------------------------------------------- a tiny archive
TINY_MODEL = '''"""Tiny classifier for layercache tests: one class, as TorchServe's model loader requires."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))).mean(dim=(2, 3)))
'''

TINY_HANDLER = '''"""Tiny image handler for layercache tests: any image -> grayscale (1, H, W) tensor, no resizing."""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class TinyHandler(ImageClassifier):
    topk = 3
    image_processing = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor()])
'''


def load_class(path: Path, name: str) -> type:
    """The class ``name`` of a model file, imported under a private module name."""
    spec = importlib.util.spec_from_file_location(f"_layercache_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


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
        src = tmp_path / f"src-{name}"
        src.mkdir(exist_ok=True)
        model_file = src / "tiny_model.py"
        model_file.write_text(TINY_MODEL)
        torch.manual_seed(0)
        weights = src / "tiny_model.pt"
        torch.save(load_class(model_file, "TinyNet")().state_dict(), weights)
        if handler == "custom":
            handler_path: str | Path = src / "tiny_handler.py"
            Path(handler_path).write_text(TINY_HANDLER)
        else:
            handler_path = handler
        return archive_classifier(
            model_name=name,
            version="1.0",
            model_file=model_file,
            weights=weights,
            handler=handler_path,
            output=tmp_path / f"{name}.mar",
            config=config,
            extra_files=extra_files,
        )

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
