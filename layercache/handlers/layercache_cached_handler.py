"""TorchServe handler: easy requests answered by cache heads (early exit with batch shrinking).

Settings: ``model-config.yaml`` section ``layercache:`` (mode ``cached``) and ``layercache_cache.json``.
Keeps recording traffic for the next build. The exit taken is in the ``X-Layercache-Exit`` response header.
"""

from __future__ import annotations

from layercache.torchserve_adapter import ServiceHandler


class LayercacheCachedHandler(ServiceHandler):
    """Cached handler: Algorithm 1 of Abedi et al. over the archive's original classifier."""
