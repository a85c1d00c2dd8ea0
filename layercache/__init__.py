"""layercache: layer caching (early-exit cache heads) for TorchServe image classifiers.

The core library. Only :mod:`layercache.torchserve_adapter` imports TorchServe.
"""

from __future__ import annotations

__version__ = "0.1.0"
