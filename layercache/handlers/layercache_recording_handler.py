"""TorchServe handler: answers exactly like the archive's original handler and records each request.

Settings: ``model-config.yaml`` section ``layercache:`` (mode ``record``). TorchServe's loader needs exactly one
class defined in this file; the work is in :mod:`layercache.torchserve_adapter`.
"""

from __future__ import annotations

from layercache.torchserve_adapter import ServiceHandler


class LayercacheRecordingHandler(ServiceHandler):
    """Recording handler: original answers, every request logged to Parquet."""
