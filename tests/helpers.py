"""Helpers shared by the test modules: the repository's command files as importable modules."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tool_module(rel: str) -> ModuleType:
    """A command file of the checkout, e.g. ``tools/build_cache.py``, imported as ``tools.build_cache``."""
    return importlib.import_module(".".join(Path(rel).with_suffix("").parts))


def tool(rel: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv) -> int`` of a command file: the same function its console script runs."""
    return tool_module(rel).main


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


def tiny_archive(
    out: Path,
    name: str = "tiny",
    *,
    handler: str = "custom",
    config: dict[str, Any] | None = None,
    extra_files: list[Path] | None = None,
    seed: int = 0,
    version: str = "1.0",
) -> Path:
    """Archive the tiny classifier (weights seeded by ``seed``) with the stock (``handler=<name>``) or the tiny
    custom handler."""
    import torch

    from layercache.archive import archive_classifier

    src = out / f"src-{name}"
    src.mkdir(parents=True, exist_ok=True)
    model_file = src / "tiny_model.py"
    model_file.write_text(TINY_MODEL)
    torch.manual_seed(seed)
    weights = src / "tiny_model.pt"
    torch.save(load_class(model_file, "TinyNet")().state_dict(), weights)
    if handler == "custom":
        handler_path: str | Path = src / "tiny_handler.py"
        Path(handler_path).write_text(TINY_HANDLER)
    else:
        handler_path = handler
    return archive_classifier(
        model_name=name,
        version=version,
        model_file=model_file,
        weights=weights,
        handler=handler_path,
        output=out / (f"{name}.mar" if (version, seed) == ("1.0", 0) else f"{name}-{version}-{seed}.mar"),
        config=config,
        extra_files=extra_files,
    )


SHAPE = (1, 28, 28)
EXIT_NODE = "block1.1"  # a candidate layer of the tiny classifier


def cached_archive(
    rec: Path,
    tmp_path: Path,
    backbone: Any,
    *,
    threshold: float,
    fingerprint: str,
    sample: Any = None,
    certified: dict | None = None,
    log_dir: Path | None = None,
    version: str = "1.0-cached",
    provenance: dict | None = None,
    tolerance: float = 0.01,
    handler: dict | None = None,
) -> Path:
    """A cached archive of the tiny classifier (``rec``: its recording archive) with one seeded, untrained head at
    ``block1.1`` (temperature 2): ``threshold`` 0 makes it answer every row, mostly wrongly."""
    import torch

    from layercache.archive import package_cached
    from layercache.config import CacheSpec, ExitSpec, HandlerConfig
    from layercache.heads import HeadSpec, build_head
    from layercache.runtime import heads_state_dict

    torch.manual_seed(1)
    sample_file = None
    if sample is not None:
        sample_file = tmp_path / "sample.pt"
        torch.save(sample, sample_file)
    head = build_head(HeadSpec(pool=1), (8, 14, 14), 10)
    heads = tmp_path / "heads.pt"
    torch.save(heads_state_dict([head]), heads)
    spec = CacheSpec(
        num_classes=10,
        input_shape=SHAPE,
        weights_fingerprint=fingerprint,
        tolerance=tolerance,
        provenance=provenance or {},
        exits=(
            ExitSpec(
                node=EXIT_NODE,
                head=HeadSpec(pool=1).to_dict(),
                in_shape=(8, 14, 14),
                temperature=2.0,
                threshold=threshold,
                certified=certified or {},
            ),
        ),
    )
    return package_cached(
        rec,
        tmp_path / f"cached-{threshold}-{fingerprint}-{version}.mar",
        spec_json=spec.to_json(),
        heads_file=heads,
        handler_config=HandlerConfig(log_dir=str(log_dir or tmp_path / "clogs"), **(handler or {})),
        version=version,
        sample_file=sample_file,
        force=True,
    )


WINNER_MODEL = '''"""A classifier whose answer does not depend on its input: the bias alone picks the top class."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))
'''


def winner_archive(work: Path, version: str, winner: int, export_dir: Path, name: str = "tiny") -> Path:
    """``export_dir/<name>.mar``: a stock ``image_classifier`` archive of a network whose output always ranks
    class ``winner`` first (zero weights, one-hot bias), so each answer tells which version served it."""
    import torch
    from model_archiver.model_archiver import ModelArchiver
    from model_archiver.model_archiver_config import ModelArchiverConfig

    model_file = work / "tiny_model.py"
    model_file.write_text(WINNER_MODEL, encoding="utf-8")
    bias = torch.zeros(10)
    bias[winner] = 10.0
    weights = work / f"tiny_{version}.pt"
    torch.save({"fc.weight": torch.zeros(10, 3), "fc.bias": bias}, weights)
    export_dir.mkdir(parents=True, exist_ok=True)
    ModelArchiver.generate_model_archive(
        ModelArchiverConfig(
            model_name=name,
            handler="image_classifier",
            version=version,
            serialized_file=str(weights),
            model_file=str(model_file),
            export_path=str(export_dir),
            force=True,
        )
    )
    return export_dir / f"{name}.mar"


def solid_png(size: int = 32) -> bytes:
    """One RGB PNG of a single colour."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_pngs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` seeded 28x28 grayscale PNGs of uniform noise (request bodies the tiny classifiers accept)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def read_properties(path: Path) -> dict[str, str]:
    """The entries of a TorchServe ``config.properties`` (Java Properties: ``#``/``!`` comments, ``key=value``,
    a backslash escapes the next character). Enough for the files this repository ships."""
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        key, _, value = line.partition("=")
        entries[key.strip()] = re.sub(r"\\(.)", r"\1", value.strip())
    return entries
