"""The two serving objects behind the layercache handlers: :class:`RecordingService` and :class:`CachedService`.

Each is built complete by its ``create`` from the archive's original handler (already initialised) and the
``layercache:`` settings, and its fields never change afterwards. A batch goes through three steps, each returning
its value: :func:`decode` (the original ``preprocess``, row by row, so one bad body fails only its request), the
service's ``predict`` (the backbone split for recording, Algorithm 1 for the cache) with the original
``postprocess``, and the replies in request order. Every answered row is recorded before ``handle`` returns.

Nothing here imports TorchServe: :mod:`layercache.torchserve_adapter` turns TorchServe's batch into :class:`Row`
values and the :class:`Handled` result back into responses, headers and metrics.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, SAMPLE_FILE, CacheSpec, HandlerConfig
from layercache.errors import ArchiveError, GraphError, InputError
from layercache.recorder import Recorder, RecorderConfig
from layercache.runtime import BACKBONE, CachedModel, RecordingModel, exit_names, measure_policy
from layercache.trafficlog import encode_batch, make_schema

logger = logging.getLogger(__name__)

__all__ = [
    "CachedService",
    "Handled",
    "Identity",
    "Metric",
    "RecordingService",
    "Reply",
    "Row",
]

METRIC_EXITS = "LayercacheExits"
METRIC_ROWS = "LayercacheBatchRows"
METRIC_RECORD_FAILED = "LayercacheRecordFailed"
METRIC_RECORD_DROPPED = "LayercacheRecordDropped"


# ------------------------------------------------------------------------------------------------- batch values
@dataclass(frozen=True)
class Row:
    """One request of a batch: TorchServe's row (a mapping with ``data`` or ``body`` and form fields)."""

    data: Any
    explain: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class Reply:
    """The answer to one request: the body, its HTTP status and the exit that answered it (a prediction)."""

    body: Any
    status: int = 200
    exit: str | None = None


@dataclass(frozen=True)
class Metric:
    """A counter increment for TorchServe's metrics: name, value, dimensions."""

    name: str
    value: float
    dims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Handled:
    """What a batch gave: one reply per row, in request order, and the metrics to add."""

    replies: tuple[Reply, ...]
    metrics: tuple[Metric, ...] = ()


@dataclass(frozen=True)
class Identity:
    """What every recorded row says about the model that answered it."""

    model_name: str
    model_version: str
    fingerprint: str


# ---------------------------------------------------------------------------------------------------- decoding
class InputShape:
    """The per-request input shape: from the settings, or fixed by the first accepted request for the worker's
    lifetime (requests of another shape then get HTTP 400)."""

    def __init__(self, shape: tuple[int, ...] | None) -> None:
        self._shape = None if shape is None else tuple(int(s) for s in shape)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self._shape

    def admit(self, shape: tuple[int, ...]) -> bool:
        """Whether a request of ``shape`` is accepted (the first one fixes the shape when none was set)."""
        if self._shape is None:
            self._shape = tuple(shape)
        return tuple(shape) == self._shape


@dataclass(frozen=True)
class Decoded:
    """The rows of a batch after the original ``preprocess``: positions and inputs of the good ones, the errors."""

    positions: tuple[int, ...]
    x: torch.Tensor | None
    errors: dict[int, Reply]


def decode(inner: Any, rows: Sequence[Row], shape: InputShape, device: torch.device) -> Decoded:
    """Run the original ``preprocess`` per row; a failing or wrong-shape row gets a 400 reply of its own."""
    positions: list[int] = []
    tensors: list[torch.Tensor] = []
    errors: dict[int, Reply] = {}
    for i, row in enumerate(rows):
        try:
            t = inner.preprocess([row.data])
            if not isinstance(t, torch.Tensor):
                raise InputError(f"the inner handler's preprocess returned {type(t).__name__}, not a tensor")
            if t.shape[0] != 1:
                raise InputError(f"the inner handler's preprocess gave {t.shape[0]} rows for one request")
        except Exception as exc:  # noqa: BLE001 - any decode failure of one request is that request's 400
            msg = f"layercache: request {i} could not be preprocessed: {type(exc).__name__}: {exc}"
            errors[i] = Reply(msg, 400)
            logger.info(msg)
            continue
        got = tuple(t.shape[1:])
        if not shape.admit(got):
            errors[i] = Reply(
                f"layercache: request {i} has input shape {list(got)}, the model expects {list(shape.shape or ())}", 400
            )
            continue
        positions.append(i)
        tensors.append(t)
    x = torch.cat(tensors).to(device) if tensors else None
    return Decoded(tuple(positions), x, errors)


# ----------------------------------------------------------------------------------------- recording, explaining
class Traffic:
    """Where answered rows go: encoded and appended to this worker's log segment, or nowhere (``record: false``).

    Keeps the record-failed / record-dropped counts already reported, so each batch reports only what is new.
    """

    def __init__(self, recorder: Recorder | None, schema: Any, identity: Identity) -> None:
        self._recorder = recorder
        self._schema = schema
        self._identity = identity
        self._reported = (0, 0)

    @classmethod
    def open(cls, config: HandlerConfig, nodes: Sequence[str], identity: Identity) -> Traffic:
        schema = make_schema(list(nodes))
        if not config.record:
            return cls(None, schema, identity)
        log_dir = config.resolved_log_dir(identity.model_name)
        cap = None if config.max_log_gb is None else int(config.max_log_gb * 2**30)
        recorder = Recorder(
            RecorderConfig(log_dir=log_dir, segment_bytes=int(config.segment_mb * 2**20), max_total_bytes=cap), schema
        )
        logger.info("recording traffic to %s", log_dir)
        return cls(recorder, schema, identity)

    def describe(self) -> dict[str, int]:
        """This worker's recorded, failed and dropped rows (nothing when it does not record)."""
        if self._recorder is None:
            return {}
        r = self._recorder
        return {
            "recorded_rows": r.written_rows,
            "record_failed_rows": r.failed_rows,
            "record_dropped_rows": r.dropped_rows,
        }

    def record(
        self,
        rows: Sequence[Row],
        x: torch.Tensor,
        probs: torch.Tensor,
        exits: Sequence[str],
        acts: Mapping[str, torch.Tensor],
    ) -> tuple[Metric, ...]:
        """Append the answered ``rows`` (never raises); returns the failure counts that are new since last time."""
        if self._recorder is None:
            return ()
        try:
            labels = [_label(row.data) for row in rows]
            batch = encode_batch(
                self._schema,
                request_ids=[row.request_id or str(uuid.uuid4()) for row in rows],
                model_name=self._identity.model_name,
                model_version=self._identity.model_version,
                weights_fingerprint=self._identity.fingerprint,
                inputs=x.detach().to("cpu", torch.float16).numpy(),
                probs=probs.cpu().numpy(),
                exits=list(exits),
                acts={k: v.detach().to("cpu", torch.float16).numpy() for k, v in acts.items()},
                labels=labels if any(lbl is not None for lbl in labels) else None,
            )
        except Exception:  # noqa: BLE001 - recording must never fail a request
            logger.exception("could not encode rows for recording")
            self._recorder.failed_rows += len(rows)
        else:
            self._recorder.append(batch)
        failed, dropped = self._recorder.failed_rows, self._recorder.dropped_rows
        new = (failed - self._reported[0], dropped - self._reported[1])
        self._reported = (failed, dropped)
        return tuple(
            Metric(name, value) for name, value in zip((METRIC_RECORD_FAILED, METRIC_RECORD_DROPPED), new) if value
        )

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()


@dataclass(frozen=True)
class Explainer:
    """Integrated gradients (captum) on the backbone for ``/explanations``; each row targets its own class."""

    backbone: nn.Module
    steps: int
    ig: Any

    @classmethod
    def create(cls, backbone: nn.Module, steps: int) -> Explainer:
        from captum.attr import IntegratedGradients

        return cls(backbone, steps, IntegratedGradients(backbone))

    def explain(self, x: torch.Tensor, positions: Sequence[int], rows: Sequence[Row]) -> dict[int, Reply]:
        with torch.no_grad():
            pred = self.backbone(x).argmax(dim=1)
        targets = []
        for j, i in enumerate(positions):
            t = _target(rows[i].data)
            targets.append(int(pred[j]) if t is None else t)
        try:
            attr = self.ig.attribute(x.clone().requires_grad_(True), target=targets, n_steps=self.steps)
        except Exception as exc:  # noqa: BLE001 - e.g. a target out of range
            msg = f"layercache: explanation failed: {type(exc).__name__}: {exc}"
            return {i: Reply(msg, 400) for i in positions}
        return {i: Reply(attr[j].tolist()) for j, i in enumerate(positions)}


def _postprocess(inner: Any, scores: torch.Tensor, positions: Sequence[int], exits: Sequence[str]) -> dict[int, Reply]:
    """The original ``postprocess`` on the answered scores; a failure there fails these rows with 500."""
    try:
        answers = inner.postprocess(scores)
        if len(answers) != len(positions):
            raise InputError(f"postprocess returned {len(answers)} answers for {len(positions)} rows")
    except Exception as exc:  # noqa: BLE001 - the original postprocess failed for this batch
        logger.exception("inner postprocess failed")
        msg = f"layercache: postprocess failed: {type(exc).__name__}: {exc}"
        return {i: Reply(msg, 500) for i in positions}
    return {i: Reply(answers[j], 200, exits[j]) for j, i in enumerate(positions)}


@dataclass(frozen=True)
class _Parts:
    """What both services share: the original handler, the backbone, where inputs go, how rows are logged."""

    config: HandlerConfig
    inner: Any
    backbone: nn.Module
    device: torch.device
    identity: Identity
    shape: InputShape
    explainer: Explainer
    traffic: Traffic


def _handle(parts: _Parts, rows: Sequence[Row], predict: Any) -> Handled:
    """decode -> predict (and explain) -> replies in request order."""
    decoded = decode(parts.inner, rows, parts.shape, parts.device)
    replies: dict[int, Reply] = dict(decoded.errors)
    metrics: list[Metric] = []
    if decoded.x is not None:
        pred = [j for j, i in enumerate(decoded.positions) if not rows[i].explain]
        expl = [j for j, i in enumerate(decoded.positions) if rows[i].explain]
        if pred:
            x = decoded.x if len(pred) == len(decoded.positions) else decoded.x[pred]
            answered, batch_metrics = predict(x, [decoded.positions[j] for j in pred], rows)
            replies.update(answered)
            metrics += batch_metrics
        if expl:
            replies.update(parts.explainer.explain(decoded.x[expl], [decoded.positions[j] for j in expl], rows))
    return Handled(tuple(replies[i] for i in range(len(rows))), tuple(metrics))


def _answered(replies: Mapping[int, Reply], positions: Sequence[int]) -> list[int]:
    return [j for j, i in enumerate(positions) if replies[i].status == 200]


# ---------------------------------------------------------------------------------------------------- recording
@dataclass(frozen=True)
class RecordingService:
    """Answers exactly like the original handler and records every answered request."""

    parts: _Parts
    model: RecordingModel

    @classmethod
    def create(cls, config: HandlerConfig, inner: Any, backbone: nn.Module, identity: Identity) -> RecordingService:
        """Find the candidate layers (when activations are recorded) and open the traffic log.

        Candidates are traced here, once, on the configured ``input_shape``; without one, activations are not
        recorded (nothing is traced on the request path).
        """
        device = getattr(inner, "device", torch.device("cpu"))
        nodes = _candidate_nodes(config, backbone, device)
        model = RecordingModel(backbone, nodes).to(device)
        parts = _parts(config, inner, backbone, device, identity, nodes)
        return cls(parts, model)

    def handle(self, rows: Sequence[Row]) -> Handled:
        return _handle(self.parts, rows, self._predict)

    def _predict(self, x: torch.Tensor, positions: list[int], rows: Sequence[Row]) -> tuple[dict[int, Reply], list]:
        with torch.inference_mode():
            logits, acts = self.model(x)
            exits = [BACKBONE] * len(positions)
            replies = _postprocess(self.parts.inner, logits, positions, exits)
            ok = _answered(replies, positions)
            metrics: tuple[Metric, ...] = ()
            if ok:
                metrics = self.parts.traffic.record(
                    [rows[positions[j]] for j in ok],
                    x[ok] if len(ok) != len(positions) else x,
                    F.softmax(logits[ok].float(), dim=1),
                    [exits[j] for j in ok],
                    {k: v[ok] for k, v in acts.items()},
                )
        return replies, list(metrics)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"mode": "record", "weights": self.parts.identity.fingerprint}
        info["candidates"] = list(self.model.nodes)
        return {**info, **self.parts.traffic.describe()}

    def close(self) -> None:
        self.parts.traffic.close()


def _candidate_nodes(config: HandlerConfig, backbone: nn.Module, device: torch.device) -> list[str]:
    if not config.record_activations:
        return []
    if config.input_shape is None:
        logger.warning(
            "record_activations is on but input_shape is not set: recording inputs and outputs only. Hint: wrap "
            "the archive with --input-shape to record activations"
        )
        return []
    from layercache.graph import describe_nodes, find_candidates

    example = torch.zeros((1, *config.input_shape), device=device)
    try:
        if config.candidates is not None:
            return [c.node for c in describe_nodes(backbone, example, config.candidates)]
        return [c.node for c in find_candidates(backbone, example)]
    except GraphError as exc:
        logger.warning("recording inputs and outputs only: %s", exc)
        return []


def _parts(
    config: HandlerConfig,
    inner: Any,
    backbone: nn.Module,
    device: torch.device,
    identity: Identity,
    nodes: Sequence[str],
    input_shape: tuple[int, ...] | None = None,
) -> _Parts:
    return _Parts(
        config=config,
        inner=inner,
        backbone=backbone,
        device=device,
        identity=identity,
        shape=InputShape(input_shape or config.input_shape),
        explainer=Explainer.create(backbone, config.explain_steps),
        traffic=Traffic.open(config, nodes, identity),
    )


# ------------------------------------------------------------------------------------------------------- cached
@dataclass(frozen=True)
class CachedService:
    """Answers easy requests from cache heads (Algorithm 1) and keeps recording traffic for the next build.

    Attributes:
        policy_source: where the per-batch-size modes came from: ``startup`` (timed by this worker), ``build``
            (``build_cache.py --policy``) or ``default`` (shrink everywhere).
    """

    parts: _Parts
    model: CachedModel
    policy_source: str

    @classmethod
    def create(
        cls,
        config: HandlerConfig,
        inner: Any,
        backbone: nn.Module,
        identity: Identity,
        model_dir: Path,
        batch_size: int = 1,
    ) -> CachedService:
        """Load the cache of ``model_dir`` onto the backbone, time its policy if asked, open the traffic log.

        Raises:
            ArchiveError: the cache was built for other backbone weights.
        """
        device = getattr(inner, "device", torch.device("cpu"))
        spec = CacheSpec.load(model_dir / CACHE_SPEC_FILE)
        if spec.weights_fingerprint and spec.weights_fingerprint != identity.fingerprint:
            raise ArchiveError(
                f"the cache was built for backbone weights {spec.weights_fingerprint}, this archive has "
                f"{identity.fingerprint}. Hint: rebuild the cache with tools/build_cache.py"
            )
        heads_state = torch.load(model_dir / HEADS_FILE, map_location=device, weights_only=True)
        model = CachedModel.from_spec(backbone, spec, heads_state).to(device)
        model, source = _choose_policy(model, config, device, model_dir / SAMPLE_FILE, batch_size)
        parts = _parts(config, inner, backbone, device, identity, [], spec.input_shape)
        return cls(parts, model, source)

    def handle(self, rows: Sequence[Row]) -> Handled:
        return _handle(self.parts, rows, self._predict)

    def _predict(self, x: torch.Tensor, positions: list[int], rows: Sequence[Row]) -> tuple[dict[int, Reply], list]:
        with torch.inference_mode():
            out = self.model.run(x)
            exits = exit_names(self.model.nodes, out.exit_index)
            replies = _postprocess(self.parts.inner, out.logits, positions, exits)
            ok = _answered(replies, positions)
            metrics = _exit_metrics(exits, self.model.nodes, out.batch_sizes)
            if ok:
                metrics += self.parts.traffic.record(
                    [rows[positions[j]] for j in ok],
                    x[ok] if len(ok) != len(positions) else x,
                    F.softmax(out.logits[ok].float(), dim=1),
                    [exits[j] for j in ok],
                    {},
                )
        return replies, list(metrics)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"mode": "cached", "weights": self.parts.identity.fingerprint}
        info["exits"] = [{"node": n, "threshold": t} for n, t in zip(self.model.nodes, self.model.thresholds)]
        info["policy"] = {"modes": self.model.policy, "source": self.policy_source}
        return {**info, **self.parts.traffic.describe()}

    def close(self) -> None:
        self.parts.traffic.close()


def _exit_metrics(exits: Sequence[str], nodes: Sequence[str], sizes: Sequence[int]) -> tuple[Metric, ...]:
    names, counts = np.unique(np.asarray(exits), return_counts=True)
    out = [Metric(METRIC_EXITS, count, (("Exit", name),)) for name, count in zip(names.tolist(), counts.tolist())]
    out += [Metric(METRIC_ROWS, size, (("Segment", node),)) for node, size in zip([*nodes, BACKBONE], sizes) if size]
    return tuple(out)


def _choose_policy(
    model: CachedModel, config: HandlerConfig, device: torch.device, sample_path: Path, batch_size: int
) -> tuple[CachedModel, str]:
    """The cached model with its per-batch-size modes: timed now on this worker's device, or the stored ones."""
    source = "build" if model.policy else "default"
    wanted = config.policy_source == "startup" or (config.policy_source == "auto" and device.type == "cuda")
    if not wanted or not model.heads:
        return model, source
    if not sample_path.is_file():
        logger.warning(
            "layercache.policy_source=%s but the archive has no %s to time on; using the stored policy %s. "
            "Hint: rebuild the cache with this version of tools/build_cache.py",
            config.policy_source,
            SAMPLE_FILE,
            model.policy or "(shrink everywhere)",
        )
        return model, source
    batch = max(1, int(batch_size or 1))
    sizes = sorted({b for b in (1, 8, 16, 32, 64, 128) if b <= batch} | {batch})
    t0 = time.perf_counter()
    try:
        sample = torch.load(sample_path, map_location=device, weights_only=True)
        policy = measure_policy(model, sample, batch_sizes=sizes)
    except Exception:  # noqa: BLE001 - a failed measurement must not keep the model from serving
        logger.exception("timing the policy at startup failed; using the stored policy %s", model.policy)
        return model, source
    logger.info(
        "per-batch-size policy measured at startup on %s in %.1f s: %s", device, time.perf_counter() - t0, policy
    )
    return model.with_policy(policy), "startup"


# ------------------------------------------------------------------------------------------------------ helpers
def _field(data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        return None
    v = data.get(key)
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    return v


def _label(data: Any) -> str | None:
    v = _field(data, "label")
    return None if v is None else str(v)


def _target(data: Any) -> int | None:
    v = _field(data, "target")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
