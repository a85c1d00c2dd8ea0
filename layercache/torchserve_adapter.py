"""The one module that touches TorchServe: the handler contract over a :mod:`layercache.serving` service.

:class:`ServiceHandler` is what the handler files shipped in ``.mar`` archives subclass (``layercache/handlers/``).
Its ``initialize`` loads the archive's original handler (by composition: the original ``preprocess`` and
``postprocess`` run unchanged) and builds one complete service for the archive's mode: a
:class:`~layercache.serving.RecordingService` or a :class:`~layercache.serving.CachedService`. ``handle`` turns
TorchServe's batch into rows, lets the service answer them, and writes each reply back with its own HTTP status,
the ``X-Layercache-Exit`` header and the custom metrics.

Also here, because they build TorchServe's own objects: :func:`make_context` and :func:`set_requests`, which let
the offline tools (:mod:`layercache.offline`) drive a handler outside the frontend.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from layercache.archive import verify_manifest
from layercache.config import EXIT_HEADER, HandlerConfig
from layercache.errors import ArchiveError
from layercache.runtime import weights_fingerprint
from layercache.serving import CachedService, Handled, Identity, Metric, RecordingService, Row

logger = logging.getLogger(__name__)

__all__ = ["EXIT_HEADER", "ServiceHandler", "load_inner_handler", "make_context", "set_requests"]

EXPLAIN_HEADER = "explain"
DESCRIBE_HEADER = "describe"
STOCK_HANDLERS = "image_classifier, image_segmenter, object_detector, text_classifier, base_handler"


def load_inner_handler(name: str, model_dir: Path) -> Any:
    """Instantiate the archive's original handler (not yet initialised).

    Args:
        name: a stock TorchServe handler (``image_classifier``) or a handler file in ``model_dir`` (``x.py``).
        model_dir: the unpacked archive.

    Raises:
        ArchiveError: the file is missing, or it does not define exactly one class (TorchServe's own rule).
    """
    if name.endswith(".py") or (Path(model_dir) / f"{name}.py").is_file():
        stem = name[:-3] if name.endswith(".py") else name
        path = Path(model_dir) / f"{stem}.py"
        if not path.is_file():
            raise ArchiveError(f"inner handler file {path.name} is not in the archive {model_dir}")
        spec = importlib.util.spec_from_file_location(stem, path)
        if spec is None or spec.loader is None:
            raise ArchiveError(f"inner handler file {path} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module
        spec.loader.exec_module(module)
    else:
        module_name = name.split(":")[0]
        try:
            module = importlib.import_module(f"ts.torch_handler.{module_name}")
        except ModuleNotFoundError as exc:
            raise ArchiveError(
                f"inner handler {name!r} is neither a file in the archive nor a stock TorchServe handler "
                f"({STOCK_HANDLERS})"
            ) from exc
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ArchiveError(
            f"handler module {module.__name__} must define exactly one class (TorchServe's rule), found "
            f"{[c.__name__ for c in classes]}"
        )
    return classes[0]()


def make_context(
    model_dir: Path, manifest: Mapping[str, Any], yaml_config: Mapping[str, Any] | None, *, batch_size: int = 1
) -> Any:
    """A real ``ts.context.Context`` for running a handler outside the frontend (offline tools, tests)."""
    from ts.context import Context

    return Context(
        manifest["model"]["modelName"],
        str(model_dir),
        dict(manifest),
        batch_size,
        None,
        "0.12.0",
        model_yaml_config=dict(yaml_config or {}),
    )


def set_requests(context: Any, n: int, headers: Sequence[Mapping[str, str]] | None = None) -> list[str]:
    """Give ``context`` request ids and per-request processors for a batch of ``n`` (offline driving)."""
    from ts.context import RequestProcessor

    ids = [str(uuid.uuid4()) for _ in range(n)]
    context.request_ids = dict(enumerate(ids))
    context.request_processor = [RequestProcessor(dict(headers[i]) if headers else {}) for i in range(n)]
    return ids


class ServiceHandler:
    """TorchServe's handler contract over a layercache service (the mode comes from ``model-config.yaml``)."""

    def __init__(self) -> None:
        # TorchServe constructs handlers without arguments; everything is built in initialize().
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the original handler and backbone, then build the service of the archive's mode."""
        config = HandlerConfig.from_yaml_config(getattr(context, "model_yaml_config", None))
        model_dir = Path(context.system_properties["model_dir"])
        if str(model_dir) not in sys.path:
            sys.path.insert(0, str(model_dir))
        if config.mode == "cached":
            verify_manifest(model_dir)  # before anything loads a file the build wrote
        inner = load_inner_handler(config.inner_handler, model_dir)
        inner.initialize(context)
        backbone = getattr(inner, "model", None)
        if not isinstance(backbone, nn.Module):
            raise ArchiveError(
                f"inner handler {config.inner_handler} did not load an eager nn.Module (got "
                f"{type(backbone).__name__}). Hint: archive the classifier with --model-file and a state_dict"
            )
        if type(inner).inference is not _base_inference():
            logger.warning("inner handler overrides inference(); layercache runs the backbone itself instead")
        backbone.eval()
        identity = Identity(
            model_name=context.model_name,
            model_version=str(context.manifest.get("model", {}).get("modelVersion", "")),
            fingerprint=weights_fingerprint(backbone),
        )
        if config.mode == "cached":
            batch_size = int(context.system_properties.get("batch_size") or 1)
            self.service: RecordingService | CachedService = CachedService.create(
                config, inner, backbone, identity, model_dir, batch_size
            )
        else:
            self.service = RecordingService.create(config, inner, backbone, identity)
        self._inner = inner
        self.initialized = True
        logger.info(
            "layercache %s handler ready: model %s version %s, inner handler %s",
            config.mode,
            identity.model_name,
            identity.model_version,
            config.inner_handler,
        )

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """Answer every request of the batch; bad rows get HTTP 4xx, the others are answered and recorded."""
        # GET /models/<name>/<version>?customized=true reaches the worker as a batch of its own with the header
        # "describe: True"; the stock BaseHandler.handle routes it to describe_handle, so must we.
        if str(_header(context, 0, DESCRIBE_HEADER) or "").lower() == "true":
            return [self.describe_handle()]
        self._inner.context = context  # the original postprocess may read it (e.g. class names)
        handled = self.service.handle(rows(data, context))
        return reply(handled, context)

    def describe_handle(self) -> str:
        return json.dumps(self.service.describe())

    def close(self) -> None:
        """Flush and close the traffic log (a TorchServe worker is SIGKILLed instead; nothing is lost then)."""
        self.service.close()


def rows(data: list[Any], context: Any) -> list[Row]:
    """TorchServe's batch as service rows: the frontend sends ``explain: True`` for ``/explanations``."""
    return [
        Row(
            data=row,
            explain=str(_header(context, i, EXPLAIN_HEADER) or "").lower() == "true",
            request_id=str(_request_id(context, i) or ""),
        )
        for i, row in enumerate(data)
    ]


def reply(handled: Handled, context: Any) -> list[Any]:
    """Write each reply's status and exit header into the context, add the metrics; the bodies in order."""
    bodies = []
    for i, r in enumerate(handled.replies):
        if r.status != 200:
            context.set_response_status(r.status, str(r.body), i)
        if r.exit is not None:
            context.set_response_header(i, EXIT_HEADER, r.exit)
        bodies.append(r.body)
    for metric in handled.metrics:
        _counter(context, metric)
    return bodies


def _base_inference() -> Any:
    from ts.torch_handler.base_handler import BaseHandler

    return BaseHandler.inference


def _header(context: Any, idx: int, key: str) -> str | None:
    try:
        return context.get_request_header(idx, key)
    except (AttributeError, IndexError, TypeError):
        return None


def _request_id(context: Any, idx: int) -> str | None:
    try:
        return context.get_request_id(idx)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _counter(context: Any, metric: Metric) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None or (metric.value == 0 and metric.kind == "counter"):
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    try:
        # A fresh dimensions list per call: TorchServe mutates a default one.
        dims = [Dimension(k, v) for k, v in metric.dims]
        if metric.kind == "gauge":
            metrics.add_metric(metric.name, metric.value, "", None, dims, metric_type=MetricTypes.GAUGE)
        else:
            metrics.add_counter(metric.name, metric.value, None, dims)
    except Exception:  # noqa: BLE001 - metrics are best effort
        logger.debug("metric %s not recorded", metric.name, exc_info=True)
