"""layercache: layer caching (early-exit cache heads) for TorchServe image classifiers.

The front door: the verbs of the whole story and the types they take. Wrap an archived classifier so that it
records its traffic, record images offline, build a cached archive from the logs, load a cached archive as a
plain ``nn.Module`` outside TorchServe, and swap versions in a running TorchServe::

    import layercache as lc

    lc.wrap_for_recording(Path("fashion.mar"), Path("fashion_rec.mar"))
    lc.record_images(Path("fashion_rec.mar"), Path("images/"), Path("logs/fashion"))
    outcome = lc.build_cached_archive(
        lc.BuildRequest(mar=Path("fashion_rec.mar"), logs=Path("logs/fashion"), output=Path("fashion_cached.mar"))
    )
    model = lc.load_cached(Path("fashion_cached.mar"))        # CachedModel: model(x) -> scores
    client = lc.ManagementClient("http://127.0.0.1:8081", token=lc.read_token("key_file.json"))  # TorchServe's keys
    lc.swap_version(client, lc.SwapRequest("fashion", outcome.output))
    if lc.check_cache(outcome.output, Path("logs/fashion")).stale:        # paper section 4.5: rebuild, swap if better
        request = lc.RefreshRequest("fashion", outcome.output, Path("logs/fashion"), model_store=Path("model-store"))
        lc.refresh_cache(client, request)

Everything else lives in the submodules (``layercache.graph``, ``layercache.selection``...). Only
:mod:`layercache.torchserve_adapter` imports TorchServe. Names are imported on first use, so ``import layercache``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "BuildConfig": "layercache.build",
    "BuildRequest": "layercache.pipeline",
    "CachedModel": "layercache.runtime",
    "HandlerConfig": "layercache.config",
    "LayercacheError": "layercache.errors",
    "ManagementClient": "layercache.management",
    "RefreshRequest": "layercache.refresh",
    "SwapRequest": "layercache.swap",
    "build_cached_archive": "layercache.pipeline",
    "check_cache": "layercache.refresh",
    "load_cached": "layercache.loading",
    "read_token": "layercache.management",
    "read_logs": "layercache.trafficlog",
    "record_images": "layercache.offline",
    "refresh_cache": "layercache.refresh",
    "rollback": "layercache.swap",
    "swap_version": "layercache.swap",
    "wrap_for_recording": "layercache.archive",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layercache' has no attribute {name!r}; the front door has {__all__}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
