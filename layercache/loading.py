"""Load a cached ``.mar`` as a plain ``nn.Module``, without TorchServe: the cache travels to other servers.

An eager archive holds a model file (one ``nn.Module`` class), its ``state_dict`` and, for a cached archive, the
cache spec and the heads' weights. :func:`load_cached` puts them together the way TorchServe's ``BaseHandler``
loads an eager model (the one class defined in the model file, built without arguments, weights loaded with
``weights_only=True``) and returns the :class:`~layercache.runtime.CachedModel`: ``model(x)`` answers a batch of
preprocessed inputs, ``model.run(x)`` also says which exit answered each row.

Example::

    model = load_cached(Path("model-store/fashion_cached.mar"))
    probs = model(x).softmax(dim=1)
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from layercache.archive import read_mar
from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, CacheSpec
from layercache.errors import ArchiveError
from layercache.runtime import CachedModel, weights_fingerprint

__all__ = ["load_backbone", "load_cached", "model_class_from_file"]


def model_class_from_file(path: Path, name: str | None = None) -> type[nn.Module]:
    """The ``nn.Module`` class defined in a model file: the one named ``name``, or the only one (TorchServe's rule).

    Raises:
        ArchiveError: the file cannot be imported, or it defines no such class (or several, without ``name``).
    """
    path = Path(path)
    module_name = f"_layercache_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchiveError(f"cannot import the model file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - report any import failure with the file's name
        raise ArchiveError(f"importing the model file {path} failed: {type(exc).__name__}: {exc}") from exc
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, nn.Module) and c.__module__ == module.__name__ and (name is None or c.__name__ == name)
    ]
    if len(classes) != 1:
        wanted = f"a class {name!r}" if name else "exactly one nn.Module class"
        raise ArchiveError(f"{path} must define {wanted}; found {[c.__name__ for c in classes]}")
    return classes[0]


def load_backbone(mar: Path, workdir: Path) -> nn.Module:
    """The archive's eager classifier in eval mode, loaded as TorchServe's ``BaseHandler`` loads it.

    Raises:
        ArchiveError: the archive has no model file or no serialized weights (e.g. a TorchScript archive).
    """
    info = read_mar(mar)
    if not info.model_file or not info.serialized_file:
        raise ArchiveError(
            f"{mar} has no model file and state_dict (model file: {info.model_file}, weights: "
            f"{info.serialized_file}); only eager archives load without their handler"
        )
    with zipfile.ZipFile(mar) as z:
        z.extract(info.model_file, workdir)
        state = torch.load(io.BytesIO(z.read(info.serialized_file)), map_location="cpu", weights_only=True)
    model = model_class_from_file(Path(workdir) / info.model_file)()
    model.load_state_dict(state)
    return model.eval()


def load_cached(mar: Path, workdir: Path | None = None) -> CachedModel:
    """The cached archive ``mar`` as a :class:`~layercache.runtime.CachedModel` (eval mode, CPU).

    Args:
        mar: a cached archive written by ``tools/build_cache.py``.
        workdir: where to unpack the model file (a temporary folder when None).

    Raises:
        ArchiveError: not a cached archive, or its cache was built for other backbone weights.
    """
    import tempfile

    info = read_mar(mar)
    if CACHE_SPEC_FILE not in info.names or HEADS_FILE not in info.names:
        raise ArchiveError(f"{mar} is not a cached archive (no {CACHE_SPEC_FILE}). Hint: build it with build_cache.py")
    with tempfile.TemporaryDirectory(prefix="layercache-load-") as tmp:
        backbone = load_backbone(mar, Path(workdir or tmp))
    with zipfile.ZipFile(mar) as z:
        spec = CacheSpec.from_json(z.read(CACHE_SPEC_FILE).decode("utf-8"), where=f"{mar}:{CACHE_SPEC_FILE}")
        heads_state = torch.load(io.BytesIO(z.read(HEADS_FILE)), map_location="cpu", weights_only=True)
    if spec.weights_fingerprint and spec.weights_fingerprint != weights_fingerprint(backbone):
        raise ArchiveError(
            f"the cache in {mar} was built for backbone weights {spec.weights_fingerprint}, the archive holds "
            f"{weights_fingerprint(backbone)}. Hint: rebuild the cache"
        )
    return CachedModel.from_spec(backbone, spec, heads_state)
