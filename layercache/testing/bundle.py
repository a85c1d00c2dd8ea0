"""A device bundle: what the model-level benchmark needs on a machine with neither TorchServe nor ``../shared``.

``tools/bench.py --sections bundle`` writes one (backbone weights and model file, the built cache, the unseen
evaluation inputs); ``tools/bench_device.py`` loads it with torch and the core library only (e.g. on the GPU
machine, whose python has its own torch).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, CacheSpec
from layercache.errors import ArchiveError
from layercache.loading import model_class_from_file
from layercache.runtime import CachedModel

__all__ = ["BUNDLE_FILES", "load_bundle", "write_bundle"]

BUNDLE_FILES = ("bundle.json", "model.py", "backbone.pt", CACHE_SPEC_FILE, HEADS_FILE, "eval.pt")


def write_bundle(
    dest: Path,
    *,
    model_file: Path,
    model_class: str,
    weights: Path,
    cached_mar: Path,
    x: torch.Tensor,
    labels: np.ndarray,
) -> Path:
    """Write the bundle to ``dest`` (about 41 MB for the benchmark ResNet-18 and 3,000 inputs); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, dest / "model.py")
    shutil.copyfile(weights, dest / "backbone.pt")
    with zipfile.ZipFile(cached_mar) as z:
        for name in (CACHE_SPEC_FILE, HEADS_FILE):
            (dest / name).write_bytes(z.read(name))
    torch.save({"x": x.half(), "labels": torch.from_numpy(np.asarray(labels))}, dest / "eval.pt")
    (dest / "bundle.json").write_text(json.dumps({"model_class": model_class, "images": len(x)}))
    return dest


def load_bundle(bundle: Path, device: torch.device) -> tuple[nn.Module, CachedModel, torch.Tensor, np.ndarray]:
    """Backbone, cached model (both eval mode, on ``device``), the evaluation inputs on ``device`` and labels.

    Raises:
        ArchiveError: a bundle file is missing (the message says how to write one).
    """
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise ArchiveError(
            f"bundle {bundle} lacks {missing}; write it with: python tools/bench.py --out bench-out --sections bundle"
        )
    meta = json.loads((bundle / "bundle.json").read_text())
    backbone = model_class_from_file(bundle / "model.py", meta["model_class"])()
    state = torch.load(bundle / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    backbone = backbone.eval().to(device)
    spec = CacheSpec.load(bundle / CACHE_SPEC_FILE)
    heads_state = torch.load(bundle / HEADS_FILE, map_location=device, weights_only=True)
    cached = CachedModel.from_spec(backbone, spec, heads_state).to(device).eval()
    data = torch.load(bundle / "eval.pt", map_location="cpu", weights_only=True)
    return backbone, cached, data["x"].float().to(device), data["labels"].numpy()
