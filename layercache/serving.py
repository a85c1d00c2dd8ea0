"""The two serving objects behind the layercache handlers: :class:`RecordingService` and :class:`CachedService`.

Each is built complete by its ``create`` from the archive's original handler (already initialised) and the
``layercache:`` settings. A batch goes through three steps, each returning its value: :func:`decode` (size
limits, then the original ``preprocess`` row by row, so one bad body fails only its own request), the service's
``predict`` (the backbone for recording, Algorithm 1 with online verification for the cache) with the original
``postprocess``, and the replies in request order. Every answered row is recorded before ``handle`` returns.

What changes while a worker serves is explicit and small: the input shape fixed by the first request
(:class:`InputShape`), the traffic log's counters (:class:`Traffic`), and a cached worker's live model and head
statistics (:class:`~layercache.monitor.CacheMonitor`).

Nothing here imports TorchServe: :mod:`layercache.torchserve_adapter` turns TorchServe's batch into :class:`Row`
values and the :class:`Handled` result back into responses, headers and metrics. A client gets one sentence it
can act on; the details (exception types, batch positions) go to the worker log.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, SAMPLE_FILE, CacheSpec, HandlerConfig
from layercache.errors import ArchiveError, GraphError
from layercache.monitor import CacheMonitor
from layercache.outputs import OutputSpec, detect
from layercache.recorder import Recorder, RecorderConfig
from layercache.runtime import BACKBONE, CachedModel, RecordingModel, exit_names, measure_policy
from layercache.trafficlog import Body, encode_batch, make_schema

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
METRIC_VERIFIED = "LayercacheVerifiedHits"
METRIC_AGREED = "LayercacheVerifiedAgreed"
METRIC_AGREEMENT_LB = "LayercacheHeadAgreementLowerBound"
METRIC_HEAD_ACTIVE = "LayercacheHeadActive"
METRIC_DISAGREEMENT = "LayercacheEstimatedDisagreement"
# Fields a request's body may come in (TorchServe: the raw body is "body", a form field "data" by convention).
BODY_FIELDS = ("data", "body")


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
    """A TorchServe metric update: a ``counter`` increment or a ``gauge`` value, with its dimensions."""

    name: str
    value: float
    dims: tuple[tuple[str, str], ...] = ()
    kind: str = "counter"


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


class RequestError(Exception):
    """One request cannot be answered: ``status`` and one sentence for the client; ``detail`` for the log."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


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
    """The rows of a batch after the original ``preprocess``: positions, inputs and bodies of the good ones, and a
    reply for each bad one."""

    positions: tuple[int, ...]
    x: torch.Tensor | None
    bodies: tuple[Body | None, ...]
    errors: dict[int, Reply]


def _body_value(data: Any) -> Any:
    if isinstance(data, Mapping):
        for name in BODY_FIELDS:
            if data.get(name) is not None:
                return data[name]
        fields = ", ".join(sorted(str(k) for k in data)) or "none"
        raise RequestError(
            400,
            f"Send the input as the request body or as a form field named 'data' (this request has fields: {fields}).",
        )
    return data


def _check_size(value: Any, config: HandlerConfig) -> None:
    """413 for a body over ``max_body_mb`` or an image over ``max_pixels``, read from its header (no decoding)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return
    size = len(value)
    if size > config.max_body_mb * 2**20:
        raise RequestError(
            413, f"The request body is {size / 2**20:.1f} MB; this service accepts at most {config.max_body_mb:g} MB."
        )
    from PIL import Image

    try:
        with Image.open(io.BytesIO(value)) as img:  # reads the header only
            width, height = img.size
    except Exception:  # noqa: BLE001 - not an image PIL knows: preprocess decides what to do with it
        return
    if width * height > config.max_pixels:
        raise RequestError(
            413,
            f"The image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); this service accepts at "
            f"most {config.max_pixels / 1e6:g} megapixels.",
        )


def _preprocess_one(inner: Any, data: Any) -> torch.Tensor:
    try:
        t = inner.preprocess([data])
    except Exception as exc:  # noqa: BLE001 - any decode failure of one request is that request's 400
        raise RequestError(
            400,
            "The request body could not be read as an input for this model (an image classifier takes a PNG or "
            "JPEG image).",
            f"{type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(t, torch.Tensor):
        raise RequestError(
            400,
            f"This model's preprocess gives {type(t).__name__}, not one tensor, so layercache cannot serve it. Hint "
            "for the operator: check the archive with archiver/wrap_mar.py --sample",
            f"preprocess returned {type(t).__name__}",
        )
    if t.dim() == 0 or t.shape[0] != 1:
        raise RequestError(
            400,
            "This model's preprocess does not give one batched row per request, so layercache cannot serve it.",
            f"preprocess gave shape {tuple(t.shape)} for one request",
        )
    return t


def decode(inner: Any, rows: Sequence[Row], shape: InputShape, device: torch.device, config: HandlerConfig) -> Decoded:
    """Size limits, then the original ``preprocess`` per row; a bad row gets a reply of its own."""
    positions: list[int] = []
    tensors: list[torch.Tensor] = []
    bodies: list[Body | None] = []
    errors: dict[int, Reply] = {}
    limit = int(config.max_record_body_kb * 1024)
    for i, row in enumerate(rows):
        try:
            _check_size(_body_value(row.data), config)
            t = _preprocess_one(inner, row.data)
            got = tuple(t.shape[1:])
            if not shape.admit(got):
                raise RequestError(
                    400,
                    f"This model takes inputs of shape {list(shape.shape or ())} after preprocessing; this request "
                    f"gave {list(got)}.",
                )
        except RequestError as error:
            errors[i] = Reply(error.message, error.status)
            logger.info("request %s (batch position %d): HTTP %d %s %s", row.request_id, i, error.status,
                        error.message, error.detail)  # fmt: skip
            continue
        positions.append(i)
        tensors.append(t)
        bodies.append(Body.of(row.data, limit))
    x = torch.cat(tensors).to(device) if tensors else None
    return Decoded(tuple(positions), x, tuple(bodies), errors)


# ----------------------------------------------------------------------------------------- recording, explaining
@dataclass(frozen=True)
class Answered:
    """Rows a batch answered, as the traffic log records them."""

    rows: list[Row]
    x: torch.Tensor
    bodies: list[Body | None]
    probs: torch.Tensor
    exits: list[str]
    confidence: torch.Tensor | None = None
    backbone_pred: torch.Tensor | None = None
    acts: Mapping[str, torch.Tensor] | None = None


class Traffic:
    """Where answered rows go: encoded and appended to this worker's log segment, or nowhere (``record: false``).

    Draws the ``record_fraction`` share of rows, and keeps the record-failed / record-dropped counts already
    reported, so each batch reports only what is new.
    """

    def __init__(self, recorder: Recorder | None, schema: Any, identity: Identity, config: HandlerConfig) -> None:
        self._recorder = recorder
        self._schema = schema
        self._identity = identity
        self._config = config
        self._rng = np.random.default_rng()
        self._reported = (0, 0)

    @classmethod
    def open(cls, config: HandlerConfig, nodes: Sequence[str], identity: Identity) -> Traffic:
        schema = make_schema(list(nodes))
        if not config.record:
            return cls(None, schema, identity, config)
        log_dir = config.resolved_log_dir(identity.model_name)
        cap = None if config.max_log_gb is None else int(config.max_log_gb * 2**30)
        recorder = Recorder(
            RecorderConfig(
                log_dir=log_dir,
                segment_bytes=int(config.segment_mb * 2**20),
                max_total_bytes=cap,
                dir_mode=int(config.log_dir_mode, 8),
                file_mode=int(config.log_file_mode, 8),
            ),
            schema,
        )
        logger.info("recording traffic to %s", log_dir)
        return cls(recorder, schema, identity, config)

    def describe(self) -> dict[str, int]:
        """This worker's recorded, failed, dropped, lost and evicted rows (nothing when it does not record)."""
        if self._recorder is None:
            return {}
        r = self._recorder
        return {
            "recorded_rows": r.written_rows,
            "record_failed_rows": r.failed_rows,
            "record_dropped_rows": r.dropped_rows,
            "record_lost_rows": r.lost_rows,
            "record_evicted_rows": r.evicted_rows,
        }

    def record(self, a: Answered) -> tuple[Metric, ...]:
        """Append the answered rows (never raises); returns the failure counts that are new since last time."""
        if self._recorder is None:
            return ()
        keep = np.arange(len(a.rows))
        if self._config.record_fraction < 1.0:
            keep = keep[self._rng.random(len(keep)) < self._config.record_fraction]
            if not len(keep):
                return ()
        try:
            batch = self._encode(a, keep)
        except Exception:  # noqa: BLE001 - recording must never fail a request
            logger.exception("could not encode rows for recording")
            self._recorder.failed_rows += len(keep)
        else:
            self._recorder.append(batch)
        failed, dropped = self._recorder.failed_rows, self._recorder.dropped_rows
        new = (failed - self._reported[0], dropped - self._reported[1])
        self._reported = (failed, dropped)
        return tuple(
            Metric(name, value) for name, value in zip((METRIC_RECORD_FAILED, METRIC_RECORD_DROPPED), new) if value
        )

    def _encode(self, a: Answered, keep: np.ndarray) -> Any:
        config = self._config
        rows = [a.rows[i] for i in keep]
        labels = [_label(row.data) for row in rows] if config.record_labels else None
        bodies = [a.bodies[i] for i in keep]
        idx = torch.from_numpy(keep).to(a.x.device)
        keep_inputs = np.ones(len(keep), dtype=bool) if config.record_inputs else None
        return encode_batch(
            self._schema,
            request_ids=[row.request_id or str(uuid.uuid4()) for row in rows],
            model_name=self._identity.model_name,
            model_version=self._identity.model_version,
            weights_fingerprint=self._identity.fingerprint,
            input_shape=tuple(a.x.shape[1:]),
            probs=a.probs.index_select(0, idx).cpu().numpy(),
            exits=[a.exits[i] for i in keep],
            bodies=bodies,
            inputs=a.x.index_select(0, idx).detach().to("cpu", torch.float16).numpy(),
            keep_inputs=keep_inputs,
            confidence=None if a.confidence is None else a.confidence.index_select(0, idx).cpu().numpy(),
            backbone_prediction=None if a.backbone_pred is None else a.backbone_pred.index_select(0, idx).cpu().numpy(),
            acts={
                k: v.index_select(0, idx).detach().to("cpu", torch.float16).numpy() for k, v in (a.acts or {}).items()
            },
            labels=labels if labels and any(lbl is not None for lbl in labels) else None,
        )

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()


@dataclass(frozen=True)
class Explainer:
    """Integrated gradients (captum) on the backbone for ``/explanations``; each row targets its own class or the
    ``target`` it asks for."""

    backbone: nn.Module
    steps: int
    ig: Any
    scores: Callable[[Any], torch.Tensor]

    @classmethod
    def create(cls, backbone: nn.Module, steps: int, output: Callable[[], OutputSpec]) -> Explainer:
        from captum.attr import IntegratedGradients

        def forward(x: torch.Tensor) -> torch.Tensor:
            return output().scores(backbone(x))

        return cls(backbone, steps, IntegratedGradients(forward), forward)

    def explain(self, x: torch.Tensor, positions: Sequence[int], rows: Sequence[Row]) -> dict[int, Reply]:
        """One attribution per row; a bad target fails only its row, and so does an attribution that fails."""
        with torch.no_grad():
            scores = self.scores(x)
        classes = scores.shape[1]
        replies: dict[int, Reply] = {}
        good: list[tuple[int, int, int]] = []  # (row in x, batch position, target)
        for j, i in enumerate(positions):
            try:
                t = _target(rows[i].data, classes)
            except RequestError as error:
                replies[i] = Reply(error.message, error.status)
                continue
            good.append((j, i, int(scores[j].argmax()) if t is None else t))
        if not good:
            return replies
        try:
            replies.update(self._attribute(x, good))
        except Exception:  # noqa: BLE001 - retry row by row: only the row that fails gets the error
            logger.info("batched attribution failed; retrying row by row", exc_info=True)
            for one in good:
                try:
                    replies.update(self._attribute(x, [one]))
                except Exception as exc:  # noqa: BLE001
                    logger.info("attribution of batch position %d failed: %s: %s", one[1], type(exc).__name__, exc)
                    replies[one[1]] = Reply("The explanation for this request could not be computed.", 500)
        return replies

    def _attribute(self, x: torch.Tensor, rows: list[tuple[int, int, int]]) -> dict[int, Reply]:
        xs = x[[j for j, _, _ in rows]].clone().requires_grad_(True)
        attr = self.ig.attribute(xs, target=[t for _, _, t in rows], n_steps=self.steps)
        return {i: Reply(attr[k].tolist()) for k, (_, i, _) in enumerate(rows)}


def _postprocess(inner: Any, output: Any, positions: Sequence[int], exits: Sequence[str]) -> dict[int, Reply]:
    """The original ``postprocess`` on the answered output; a failure there fails these rows with 500."""
    try:
        answers = inner.postprocess(output)
        if len(answers) != len(positions):
            raise ValueError(f"postprocess returned {len(answers)} answers for {len(positions)} rows")
    except Exception:  # noqa: BLE001 - the original postprocess failed for this batch
        logger.exception("inner postprocess failed")
        return {i: Reply("The model could not format its answer to this request.", 500) for i in positions}
    return {i: Reply(answers[j], 200, exits[j]) for j, i in enumerate(positions)}


class OutputContract:
    """Where the class scores are in the backbone's output: from the settings, or found on the first batch and
    fixed for the worker's lifetime (as :class:`InputShape`)."""

    def __init__(self, config: HandlerConfig, spec: OutputSpec | None = None) -> None:
        self._key, self._kind = config.output_key, config.output_kind
        self._spec = spec

    def spec(self, out: Any = None) -> OutputSpec:
        if self._spec is None:
            if out is None:
                return OutputSpec(self._key, self._kind or "logits")
            self._spec = detect(out, self._key, self._kind)
        return self._spec


@dataclass(frozen=True)
class ServiceParts:
    """What both services share: the original handler, the backbone, where inputs go, how rows are logged."""

    config: HandlerConfig
    inner: Any
    backbone: nn.Module
    device: torch.device
    identity: Identity
    shape: InputShape
    output: OutputContract
    explainer: Explainer
    traffic: Traffic

    @classmethod
    def create(
        cls,
        config: HandlerConfig,
        inner: Any,
        backbone: nn.Module,
        identity: Identity,
        nodes: Sequence[str],
        *,
        input_shape: tuple[int, ...] | None = None,
        output: OutputSpec | None = None,
    ) -> ServiceParts:
        contract = OutputContract(config, output)
        return cls(
            config=config,
            inner=inner,
            backbone=backbone,
            device=getattr(inner, "device", torch.device("cpu")),
            identity=identity,
            shape=InputShape(input_shape or config.input_shape),
            output=contract,
            explainer=Explainer.create(backbone, config.explain_steps, contract.spec),
            traffic=Traffic.open(config, nodes, identity),
        )

    def handle(self, rows: Sequence[Row], predict: Callable[..., tuple[dict[int, Reply], list[Metric]]]) -> Handled:
        """decode -> predict (and explain) -> replies in request order."""
        decoded = decode(self.inner, rows, self.shape, self.device, self.config)
        replies: dict[int, Reply] = dict(decoded.errors)
        metrics: list[Metric] = []
        if decoded.x is not None:
            pred = [j for j, i in enumerate(decoded.positions) if not rows[i].explain]
            expl = [j for j, i in enumerate(decoded.positions) if rows[i].explain]
            if pred:
                x = decoded.x if len(pred) == len(decoded.positions) else decoded.x[pred]
                batch = [(decoded.positions[j], decoded.bodies[j]) for j in pred]
                answered, batch_metrics = predict(x, batch, rows)
                replies.update(answered)
                metrics += batch_metrics
            if expl:
                positions = [decoded.positions[j] for j in expl]
                replies.update(self.explainer.explain(decoded.x[expl], positions, rows))
        return Handled(tuple(replies[i] for i in range(len(rows))), tuple(metrics))


def _answered(replies: Mapping[int, Reply], batch: Sequence[tuple[int, Body | None]]) -> list[int]:
    return [j for j, (i, _) in enumerate(batch) if replies[i].status == 200]


# ---------------------------------------------------------------------------------------------------- recording
@dataclass(frozen=True)
class RecordingService:
    """Answers exactly like the original handler and records every answered request."""

    parts: ServiceParts
    model: RecordingModel

    @classmethod
    def create(cls, config: HandlerConfig, inner: Any, backbone: nn.Module, identity: Identity) -> RecordingService:
        """Find the candidate layers (when activations are recorded) and open the traffic log.

        Candidates are traced here, once, on the configured ``input_shape``; without one, activations are not
        recorded (nothing is traced on the request path).
        """
        device = getattr(inner, "device", torch.device("cpu"))
        nodes = _candidate_nodes(config, backbone, device)
        model = RecordingModel(backbone, nodes, config.leaf_modules).to(device)
        return cls(ServiceParts.create(config, inner, backbone, identity, nodes), model)

    def handle(self, rows: Sequence[Row]) -> Handled:
        return self.parts.handle(rows, self._predict)

    def _predict(
        self, x: torch.Tensor, batch: list[tuple[int, Body | None]], rows: Sequence[Row]
    ) -> tuple[dict[int, Reply], list[Metric]]:
        with torch.inference_mode():
            out, acts = self.model(x)
            scores = self.parts.output.spec(out).scores(out)
            exits = [BACKBONE] * len(batch)
            replies = _postprocess(self.parts.inner, out, [i for i, _ in batch], exits)
            ok = _answered(replies, batch)
            if not ok:
                return replies, []
            sel = torch.tensor(ok, device=x.device)
            answered = Answered(
                rows=[rows[batch[j][0]] for j in ok],
                x=x.index_select(0, sel),
                bodies=[batch[j][1] for j in ok],
                probs=self.parts.output.spec().probs(scores.index_select(0, sel)),
                exits=[exits[j] for j in ok],
                backbone_pred=scores.index_select(0, sel).argmax(1),
                acts={k: v.index_select(0, sel) for k, v in acts.items()},
            )
            return replies, list(self.parts.traffic.record(answered))

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
    leaves = config.leaf_modules
    try:
        if config.candidates is not None:
            return [c.node for c in describe_nodes(backbone, example, config.candidates, leaf_modules=leaves)]
        return [c.node for c in find_candidates(backbone, example, leaf_modules=leaves)]
    except GraphError as exc:
        logger.warning("recording inputs and outputs only: %s", exc)
        return []


# ------------------------------------------------------------------------------------------------------- cached
@dataclass(frozen=True)
class CachedService:
    """Answers easy requests from cache heads (Algorithm 1), verifies a share of them against the backbone, guards
    the heads, and keeps recording traffic for the next build.

    Attributes:
        monitor: the live model (the guard may disable or raise a head) and each head's verified agreement.
        policy_source: where the per-batch-size modes came from: ``startup`` (timed by this worker), ``build``
            (``build_cache.py --policy``) or ``default`` (shrink everywhere).
    """

    parts: ServiceParts
    monitor: CacheMonitor
    policy_source: str
    spec: CacheSpec

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
        model = accelerate_for_worker(model, spec.acceleration, model_dir / SAMPLE_FILE, batch_size)
        if spec.acceleration == "none":  # CUDA graphs capture eager modules, not another engine's
            model = _graphs(model, config, device, model_dir / SAMPLE_FILE, batch_size, spec.input_shape)
        model, source = _choose_policy(model, config, device, model_dir / SAMPLE_FILE, batch_size)
        parts = ServiceParts.create(
            config, inner, backbone, identity, [], input_shape=spec.input_shape, output=model.output
        )
        return cls(parts, CacheMonitor.create(model, spec, config.guard), source, spec)

    @property
    def model(self) -> CachedModel:
        """The model serving now (the guard may have swapped in one with a head disabled or raised)."""
        return self.monitor.model

    def handle(self, rows: Sequence[Row]) -> Handled:
        return self.parts.handle(rows, self._predict)

    def _predict(
        self, x: torch.Tensor, batch: list[tuple[int, Body | None]], rows: Sequence[Row]
    ) -> tuple[dict[int, Reply], list[Metric]]:
        model = self.monitor.model
        with torch.inference_mode():
            out = model.run(x, verify=self.monitor.verify_shares(self.parts.config.verify_fraction))
            exits = exit_names(model.nodes, out.exit_index)
            replies = _postprocess(self.parts.inner, out.output, [i for i, _ in batch], exits)
            ok = _answered(replies, batch)
            fired = self.monitor.observe(out)
            metrics = [*_exit_metrics(exits, model.nodes, out.batch_sizes), *self._verification_metrics(out, fired)]
            if ok:
                sel = torch.tensor(ok, device=x.device)
                answered = Answered(
                    rows=[rows[batch[j][0]] for j in ok],
                    x=x.index_select(0, sel),
                    bodies=[batch[j][1] for j in ok],
                    probs=model.output.probs(out.logits.index_select(0, sel)),
                    exits=[exits[j] for j in ok],
                    confidence=out.confidence.index_select(0, sel),
                    backbone_pred=out.backbone_pred.index_select(0, sel),
                )
                metrics += self.parts.traffic.record(answered)
        return replies, metrics

    def _verification_metrics(self, out: Any, fired: list[str]) -> list[Metric]:
        verified = out.verified.cpu().numpy()
        if not verified.any() and not fired:
            return []
        exits = out.exit_index.cpu().numpy()
        agreed = (out.backbone_pred == out.logits.argmax(1)).cpu().numpy()
        metrics = []
        for k, head in enumerate(self.monitor.heads):
            v = verified & (exits == k)
            dims = (("Exit", head.node),)
            if v.any():
                metrics.append(Metric(METRIC_VERIFIED, int(v.sum()), dims))
                metrics.append(Metric(METRIC_AGREED, int(agreed[v].sum()), dims))
            info = head.describe(self.monitor.rows)
            metrics.append(Metric(METRIC_AGREEMENT_LB, info["agreement_lower_bound"], dims, "gauge"))
            metrics.append(Metric(METRIC_HEAD_ACTIVE, float(head.state != "disabled"), dims, "gauge"))
        metrics.append(Metric(METRIC_DISAGREEMENT, self.monitor.estimated_disagreement(), (), "gauge"))
        return metrics

    def describe(self) -> dict[str, Any]:
        model = self.monitor.model
        info: dict[str, Any] = {"mode": "cached", "weights": self.parts.identity.fingerprint}
        info["exits"] = [{"node": n, "threshold": t} for n, t in zip(model.nodes, model.thresholds)]
        info["policy"] = {"modes": model.policy, "source": self.policy_source}
        info["promise"] = self.spec.certificate
        fraction = self.parts.config.verify_fraction
        info["verification"] = {"fraction": fraction, "shares": self.monitor.verify_shares(fraction),
                                **self.monitor.describe()}  # fmt: skip
        return {**info, **self.parts.traffic.describe()}

    def close(self) -> None:
        self.parts.traffic.close()


def _exit_metrics(exits: Sequence[str], nodes: Sequence[str], sizes: Sequence[int]) -> tuple[Metric, ...]:
    names, counts = np.unique(np.asarray(exits), return_counts=True)
    out = [Metric(METRIC_EXITS, count, (("Exit", name),)) for name, count in zip(names.tolist(), counts.tolist())]
    out += [Metric(METRIC_ROWS, size, (("Segment", node),)) for node, size in zip([*nodes, BACKBONE], sizes) if size]
    return tuple(out)


def accelerate_for_worker(model: CachedModel, kind: str, sample_path: Path, batch_size: int = 1) -> CachedModel:
    """The cached model on the spec's engine (:func:`layercache.accel.accelerate`), built on the archive's logged
    sample for batches up to the worker's ``batch_size``; the eager model, with a warning saying why, when the
    engine cannot be built here (its package missing, no sample, a CPU-only engine on a GPU, a failed build)."""
    if kind == "none":
        return model
    if not sample_path.is_file():
        logger.warning(
            "acceleration %r needs the archive's %s to build on and it has none; serving eager. Hint: rebuild the "
            "cache with this version of tools/build_cache.py",
            kind,
            sample_path.name,
        )
        return model
    t0 = time.perf_counter()
    try:
        from layercache.accel import accelerate, describe

        device = next(model.parameters()).device
        sample = torch.load(sample_path, map_location=device, weights_only=True).float()
        accelerated = accelerate(model, kind, sample, max_batch=max(1, int(batch_size or 1)))
    except Exception as exc:  # noqa: BLE001 - an engine is an optimisation: the eager model serves the same answers
        logger.warning("acceleration %r is not available here (%s); serving eager", kind, exc)
        return model
    logger.info("acceleration %s built in %.1f s: %s", kind, time.perf_counter() - t0, describe(accelerated))
    return accelerated


def _graphs(
    model: CachedModel,
    config: HandlerConfig,
    device: torch.device,
    sample_path: Path,
    batch_size: int,
    input_shape: Sequence[int],
) -> CachedModel:
    """On a GPU (``layercache.cuda_graphs``), the model with ``graphs`` mode: every segment and head captured now
    for each batch bucket up to the worker's batch size, so requests never pay for a capture."""
    if device.type != "cuda" or not config.cuda_graphs or not model.heads:
        return model
    t0 = time.perf_counter()
    try:
        if sample_path.is_file():
            example = torch.load(sample_path, map_location=device, weights_only=True).float()
        else:
            example = torch.zeros((1, *input_shape), device=device)
        model.enable_graphs(max_batch=max(1, int(batch_size or 1)))
        count = model.capture_graphs(example)
    except Exception:  # noqa: BLE001 - graphs are an optimisation: the model serves without them
        logger.exception("capturing CUDA graphs failed; serving without them (set layercache.cuda_graphs: false)")
        return model.disable_graphs()
    logger.info("captured %d CUDA graphs on %s in %.1f s", count, device, time.perf_counter() - t0)
    return model


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


def _target(data: Any, classes: int) -> int | None:
    """The class an explanation asks for (form field ``target``), or None for the predicted one."""
    v = _field(data, "target")
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        t = int(str(v).strip())
    except (TypeError, ValueError):
        raise RequestError(400, f"target must be a class index from 0 to {classes - 1}, got {str(v)[:40]!r}.") from None
    if not 0 <= t < classes:
        raise RequestError(400, f"target must be a class index from 0 to {classes - 1}, got {t}.")
    return t
