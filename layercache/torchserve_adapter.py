"""The one module that touches TorchServe.

It wraps the archive's original handler by composition: the original ``preprocess`` and ``postprocess`` run
unchanged (per row for preprocess, so one bad input fails only its own request), the backbone runs split into
segments (recording) or with cache heads (cached), and every answered row is recorded before ``handle`` returns.

The handler files in ``handler/`` are thin classes over :class:`LayercacheService`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layercache.config import CACHE_SPEC_FILE, EXIT_HEADER, HEADS_FILE, SAMPLE_FILE, CacheSpec, HandlerConfig
from layercache.errors import ArchiveError, GraphError, InputError
from layercache.logs import encode_batch, make_schema
from layercache.recorder import Recorder, RecorderConfig
from layercache.runtime import (
    BACKBONE,
    CachedModel,
    RecordingModel,
    exit_names,
    measure_policy,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)

EXPLAIN_HEADER = "explain"
DESCRIBE_HEADER = "describe"
METRIC_EXITS = "LayercacheExits"
METRIC_ROWS = "LayercacheBatchRows"
METRIC_RECORD_FAILED = "LayercacheRecordFailed"
METRIC_RECORD_DROPPED = "LayercacheRecordDropped"


# ----------------------------------------------------------------------------------------------- inner handler
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
        assert spec is not None and spec.loader is not None
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
                "(image_classifier, image_segmenter, object_detector, text_classifier, base_handler)"
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


# ------------------------------------------------------------------------------------------------- the service
@dataclass
class _Batch:
    """Rows of one ``handle`` call after per-row preprocessing."""

    ok: list[int] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)


class LayercacheService:
    """Recording or cached serving of an archived classifier (``mode`` from ``model-config.yaml``)."""

    def __init__(self) -> None:
        self.config: HandlerConfig | None = None
        self.inner: Any = None
        self.backbone: nn.Module | None = None
        self.model: CachedModel | RecordingModel | None = None
        self.recorder: Recorder | None = None
        self.schema = None
        self.fingerprint = ""
        self.input_shape: tuple[int, ...] | None = None
        self.device = torch.device("cpu")
        self.model_name = ""
        self.model_version = ""
        self._reported = (0, 0)
        self._ig = None
        self.policy_source = ""

    # -- lifecycle
    def initialize(self, context: Any) -> None:
        """Load the original handler and backbone, then the recording or cached model."""
        self.config = HandlerConfig.from_yaml_config(getattr(context, "model_yaml_config", None))
        model_dir = Path(context.system_properties["model_dir"])
        if str(model_dir) not in sys.path:
            sys.path.insert(0, str(model_dir))
        self.inner = load_inner_handler(self.config.inner_handler, model_dir)
        self.inner.initialize(context)
        self.inner.context = context
        backbone = getattr(self.inner, "model", None)
        if not isinstance(backbone, nn.Module):
            raise ArchiveError(
                f"inner handler {self.config.inner_handler} did not load an eager nn.Module (got "
                f"{type(backbone).__name__}). Hint: archive the classifier with --model-file and a state_dict"
            )
        if type(self.inner).inference is not _base_inference():
            logger.warning("inner handler overrides inference(); layercache runs the backbone itself instead")
        self.backbone = backbone.eval()
        self.device = getattr(self.inner, "device", torch.device("cpu"))
        self.model_name = context.model_name
        self.model_version = str(context.manifest.get("model", {}).get("modelVersion", ""))
        self.fingerprint = weights_fingerprint(self.backbone)
        if self.config.mode == "cached":
            spec = CacheSpec.load(model_dir / CACHE_SPEC_FILE)
            heads_state = torch.load(model_dir / HEADS_FILE, map_location=self.device, weights_only=True)
            self.model = CachedModel.from_spec(self.backbone, spec, heads_state).to(self.device)
            self.input_shape = spec.input_shape
            if spec.weights_fingerprint and spec.weights_fingerprint != self.fingerprint:
                raise ArchiveError(
                    f"the cache was built for backbone weights {spec.weights_fingerprint}, this archive has "
                    f"{self.fingerprint}. Hint: rebuild the cache with tools/build_cache.py"
                )
            self._choose_policy(model_dir, context)
            self._open_recorder([])
        else:
            self.input_shape = self.config.input_shape
            if self.input_shape is not None:
                self._setup_recording(torch.zeros((1, *self.input_shape), device=self.device))
        logger.info(
            "layercache %s handler ready: model %s version %s, inner handler %s",
            self.config.mode,
            self.model_name,
            self.model_version,
            self.config.inner_handler,
        )

    def _choose_policy(self, model_dir: Path, context: Any) -> None:
        """Per-batch-size mode of the cached model: measured now on this worker's device, or the stored one."""
        assert self.config is not None and isinstance(self.model, CachedModel)
        self.policy_source = "build" if self.model.policy else "default"
        wanted = self.config.policy == "startup" or (self.config.policy == "auto" and self.device.type == "cuda")
        if not wanted or not self.model.heads:
            return
        sample_path = model_dir / SAMPLE_FILE
        if not sample_path.is_file():
            logger.warning(
                "layercache.policy=%s but the archive has no %s to time on; using the stored policy %s. "
                "Hint: rebuild the cache with this version of tools/build_cache.py",
                self.config.policy,
                SAMPLE_FILE,
                self.model.policy or "(shrink everywhere)",
            )
            return
        batch = max(1, int(context.system_properties.get("batch_size") or 1))
        sizes = sorted({b for b in (1, 8, 16, 32, 64, 128) if b <= batch} | {batch})
        t0 = time.perf_counter()
        try:
            sample = torch.load(sample_path, map_location=self.device, weights_only=True)
            policy = measure_policy(self.model, sample, batch_sizes=sizes)
        except Exception:  # noqa: BLE001 - a failed measurement must not keep the model from serving
            logger.exception("timing the policy at startup failed; using the stored policy %s", self.model.policy)
            return
        self.model.policy = policy
        self.policy_source = "startup"
        logger.info(
            "per-batch-size policy measured at startup on %s in %.1f s: %s",
            self.device,
            time.perf_counter() - t0,
            self.model.policy,
        )

    def _setup_recording(self, example: torch.Tensor) -> None:
        """Find candidate layers on the first real input shape and build the recording model."""
        assert self.config is not None and self.backbone is not None
        nodes: list[str] = []
        if self.config.record_activations:
            from layercache.graph import describe_nodes, find_candidates

            try:
                if self.config.candidates is not None:
                    nodes = [c.node for c in describe_nodes(self.backbone, example, self.config.candidates)]
                else:
                    nodes = [c.node for c in find_candidates(self.backbone, example)]
            except GraphError as exc:
                logger.warning("recording inputs and outputs only: %s", exc)
                nodes = []
        self.model = RecordingModel(self.backbone, nodes).to(self.device)
        self._open_recorder(nodes)

    def _open_recorder(self, nodes: Sequence[str]) -> None:
        assert self.config is not None
        self.schema = make_schema(list(nodes))
        if not self.config.record:
            return
        log_dir = self.config.resolved_log_dir(self.model_name)
        cap = None if self.config.max_log_gb is None else int(self.config.max_log_gb * 2**30)
        self.recorder = Recorder(
            RecorderConfig(log_dir=log_dir, segment_bytes=int(self.config.segment_mb * 2**20), max_total_bytes=cap),
            self.schema,
        )
        logger.info("recording traffic to %s", log_dir)

    # -- request path
    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """Answer every request of the batch; bad rows get HTTP 4xx, the others are answered and recorded."""
        assert self.config is not None
        self.inner.context = context
        n = len(data)
        results: list[Any] = [None] * n
        # The frontend sends "explain: False" with every prediction and "True" for /explanations.
        explain = [str(_header(context, i, EXPLAIN_HEADER) or "").lower() == "true" for i in range(n)]
        batch = self._preprocess(data, context)
        for idx, (code, msg) in batch.errors.items():
            results[idx] = msg
            context.set_response_status(code, msg, idx)
        if batch.ok:
            x = torch.cat(batch.tensors).to(self.device)
            if self.model is None:
                self._setup_recording(x[:1])
            pred_rows = [j for j, i in enumerate(batch.ok) if not explain[i]]
            expl_rows = [j for j, i in enumerate(batch.ok) if explain[i]]
            if pred_rows:
                self._predict(
                    x if len(pred_rows) == len(batch.ok) else x[pred_rows],
                    [batch.ok[j] for j in pred_rows],
                    data,
                    context,
                    results,
                )
            if expl_rows:
                self._explain(x[expl_rows], [batch.ok[j] for j in expl_rows], data, context, results)
        return results

    def _preprocess(self, data: list[Any], context: Any) -> _Batch:
        out = _Batch()
        for i, row in enumerate(data):
            try:
                t = self.inner.preprocess([row])
                if not isinstance(t, torch.Tensor):
                    raise InputError(f"the inner handler's preprocess returned {type(t).__name__}, not a tensor")
                if t.shape[0] != 1:
                    raise InputError(f"the inner handler's preprocess gave {t.shape[0]} rows for one request")
            except Exception as exc:  # noqa: BLE001 - any decode failure of one request is that request's 400
                msg = f"layercache: request {i} could not be preprocessed: {type(exc).__name__}: {exc}"
                out.errors[i] = (400, msg)
                logger.info(msg)
                continue
            shape = tuple(t.shape[1:])
            expected = self.input_shape or (tuple(out.tensors[0].shape[1:]) if out.tensors else None)
            if expected is not None and shape != tuple(expected):
                out.errors[i] = (
                    400,
                    f"layercache: request {i} has input shape {list(shape)}, the model expects {list(expected)}",
                )
                continue
            out.ok.append(i)
            out.tensors.append(t)
        return out

    def _predict(self, x: torch.Tensor, idxs: list[int], data: list[Any], context: Any, results: list[Any]) -> None:
        acts: dict[str, torch.Tensor] = {}
        exits: list[str]
        with torch.inference_mode():
            if isinstance(self.model, CachedModel):
                out = self.model.run(x)
                logits = out.logits
                exits = exit_names(self.model.nodes, out.exit_index)
                self._exit_metrics(context, exits, out.batch_sizes)
            else:
                assert self.model is not None
                logits, acts = self.model(x)
                exits = [BACKBONE] * len(idxs)
            try:
                answers = self.inner.postprocess(logits)
                if len(answers) != len(idxs):
                    raise InputError(f"postprocess returned {len(answers)} answers for {len(idxs)} rows")
            except Exception as exc:  # noqa: BLE001 - the original postprocess failed for this batch
                logger.exception("inner postprocess failed")
                for i in idxs:
                    results[i] = f"layercache: postprocess failed: {type(exc).__name__}: {exc}"
                    context.set_response_status(500, results[i], i)
                return
            for j, i in enumerate(idxs):
                results[i] = answers[j]
                context.set_response_header(i, EXIT_HEADER, exits[j])
            if self.recorder is not None:
                probs = F.softmax(logits.float(), dim=1)
                self._record(context, idxs, x, probs, exits, acts, data)

    def _record(
        self,
        context: Any,
        idxs: list[int],
        x: torch.Tensor,
        probs: torch.Tensor,
        exits: list[str],
        acts: Mapping[str, torch.Tensor],
        data: list[Any],
    ) -> None:
        assert self.recorder is not None and self.schema is not None
        try:
            ids = [str(context.get_request_id(i) or uuid.uuid4()) for i in idxs]
            labels = [_label(data[i]) for i in idxs]
            rb = encode_batch(
                self.schema,
                request_ids=ids,
                model_name=self.model_name,
                model_version=self.model_version,
                weights_fingerprint=self.fingerprint,
                inputs=x.detach().to("cpu", torch.float16).numpy(),
                probs=probs.cpu().numpy(),
                exits=exits,
                acts={k: v.detach().to("cpu", torch.float16).numpy() for k, v in acts.items()},
                labels=labels if any(lbl is not None for lbl in labels) else None,
            )
        except Exception:  # noqa: BLE001 - recording must never fail a request
            logger.exception("could not encode rows for recording")
            self.recorder.failed_rows += len(idxs)
        else:
            self.recorder.append(rb)
        failed, dropped = self.recorder.failed_rows, self.recorder.dropped_rows
        if (failed, dropped) != self._reported:
            _counter(context, METRIC_RECORD_FAILED, failed - self._reported[0], {})
            _counter(context, METRIC_RECORD_DROPPED, dropped - self._reported[1], {})
            self._reported = (failed, dropped)

    def _exit_metrics(self, context: Any, exits: list[str], sizes: Sequence[int]) -> None:
        names, counts = np.unique(np.asarray(exits), return_counts=True)
        for name, count in zip(names.tolist(), counts.tolist()):
            _counter(context, METRIC_EXITS, count, {"Exit": name})
        assert isinstance(self.model, CachedModel)
        for node, size in zip([*self.model.nodes, BACKBONE], sizes):
            _counter(context, METRIC_ROWS, size, {"Segment": node})

    def _explain(self, x: torch.Tensor, idxs: list[int], data: list[Any], context: Any, results: list[Any]) -> None:
        """Integrated gradients (captum) on the backbone; each row targets its own class."""
        from captum.attr import IntegratedGradients

        assert self.backbone is not None and self.config is not None
        if self._ig is None:
            self._ig = IntegratedGradients(self.backbone)
        with torch.no_grad():
            pred = self.backbone(x).argmax(dim=1)
        targets = []
        for j, i in enumerate(idxs):
            t = _target(data[i])
            targets.append(int(pred[j]) if t is None else t)
        try:
            attr = self._ig.attribute(x.clone().requires_grad_(True), target=targets, n_steps=self.config.explain_steps)
        except Exception as exc:  # noqa: BLE001 - e.g. a target out of range
            for i in idxs:
                results[i] = f"layercache: explanation failed: {type(exc).__name__}: {exc}"
                context.set_response_status(400, results[i], i)
            return
        for j, i in enumerate(idxs):
            results[i] = attr[j].tolist()

    def describe(self) -> str:
        """JSON for ``GET /models/<name>/<version>?customized=true``."""
        info: dict[str, Any] = {"mode": self.config.mode if self.config else None, "weights": self.fingerprint}
        if isinstance(self.model, CachedModel):
            info["exits"] = [{"node": n, "threshold": t} for n, t in zip(self.model.nodes, self.model.thresholds)]
            info["policy"] = {"modes": self.model.policy, "source": self.policy_source}
        elif isinstance(self.model, RecordingModel):
            info["candidates"] = list(self.model.nodes)
        if self.recorder is not None:
            info["recorded_rows"] = self.recorder.written_rows
        return json.dumps(info)


# ----------------------------------------------------------------------------------------------------- helpers
def _base_inference() -> Any:
    from ts.torch_handler.base_handler import BaseHandler

    return BaseHandler.inference


def _header(context: Any, idx: int, key: str) -> str | None:
    try:
        return context.get_request_header(idx, key)
    except (AttributeError, IndexError, TypeError):
        return None


def _counter(context: Any, name: str, value: float, dims: Mapping[str, str]) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None or value == 0:
        return
    from ts.metrics.dimension import Dimension

    try:
        metrics.add_counter(name, value, None, [Dimension(k, v) for k, v in dims.items()])
    except Exception:  # noqa: BLE001 - metrics are best effort
        logger.debug("metric %s not recorded", name, exc_info=True)


def _field(row: Any, key: str) -> Any:
    if not isinstance(row, Mapping):
        return None
    v = row.get(key)
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    return v


def _label(row: Any) -> str | None:
    v = _field(row, "label")
    return None if v is None else str(v)


def _target(row: Any) -> int | None:
    v = _field(row, "target")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def run_offline(service_handler: Any, context: Any, rows: list[dict[str, Any]]) -> tuple[list[Any], list[int]]:
    """Drive a handler's ``handle`` outside the frontend: returns answers and per-row HTTP codes."""
    set_requests(context, len(rows))
    t0 = time.perf_counter()
    answers = service_handler.handle(rows, context)
    logger.debug("offline batch of %d in %.1f ms", len(rows), (time.perf_counter() - t0) * 1e3)
    codes = [context.get_response_status(i)[0] or 200 for i in range(len(rows))]
    return answers, codes


class ServiceHandler:
    """Base of the handler classes in ``handler/``: TorchServe's handler contract over a :class:`LayercacheService`."""

    def __init__(self) -> None:
        self.service = LayercacheService()
        self.initialized = False

    def initialize(self, context: Any) -> None:
        self.service.initialize(context)
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        # GET /models/<name>/<version>?customized=true reaches the worker as a batch of its own with the header
        # "describe: True"; the stock BaseHandler.handle routes it to describe_handle, so must we.
        if str(_header(context, 0, DESCRIBE_HEADER) or "").lower() == "true":
            return [self.describe_handle()]
        return self.service.handle(data, context)

    def describe_handle(self) -> str:
        return self.service.describe()


@dataclass
class LoadedMar:
    """An archive unpacked and initialised in this process, as a TorchServe worker would."""

    info: Any
    model_dir: Path
    context: Any
    handler: Any

    @property
    def backbone(self) -> nn.Module:
        """The classifier: the handler's model, or the inner handler's for layercache archives."""
        h = self.handler.service.inner if isinstance(self.handler, ServiceHandler) else self.handler
        model = getattr(h, "model", None)
        if not isinstance(model, nn.Module):
            raise ArchiveError(f"{self.info.path} did not load an eager nn.Module (got {type(model).__name__})")
        return model.eval()


def open_mar(
    mar: Path,
    workdir: Path,
    *,
    as_served: bool = False,
    handler_overrides: Mapping[str, Any] | None = None,
) -> LoadedMar:
    """Unpack ``mar`` into ``workdir`` and initialise a handler with a real ``ts.context.Context``.

    Args:
        as_served: initialise the archive's own handler (the layercache handler of a wrapped archive); otherwise
            the original classifier's handler (what a build needs).
        handler_overrides: keys of the ``layercache:`` section to override (e.g. ``log_dir``).
    """
    from layercache.archive import extract_mar

    info = extract_mar(mar, workdir)
    manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
    yaml_config = dict(info.yaml_config)
    if handler_overrides:
        yaml_config["layercache"] = {**yaml_config.get("layercache", {}), **handler_overrides}
    # TorchServe puts the model dir first on sys.path; drop modules a previous archive loaded under these names.
    for name in (info.model_file, info.handler, info.inner_handler):
        if name:
            sys.modules.pop(Path(name).stem, None)
    sys.path.insert(0, str(workdir))
    context = make_context(workdir, manifest, yaml_config)
    handler = load_inner_handler(info.handler if as_served else info.inner_handler, workdir)
    handler.initialize(context)
    return LoadedMar(info=info, model_dir=workdir, context=context, handler=handler)
