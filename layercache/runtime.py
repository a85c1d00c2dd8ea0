"""Cache-enabled inference (the paper's Algorithm 1) and the recording forward pass.

:class:`CachedModel` runs the backbone as a chain of segments. After a segment that has a cache head, rows whose
calibrated confidence reaches the head's threshold are answered from the head and leave the batch; the rest of
the batch goes on. Results come back in request order with the exit each row took.

:class:`RecordingModel` runs the same segments without heads and returns the pooled activation of every cut, so
the recording handler answers exactly like the original while logging what a later build needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layercache.config import CacheSpec
from layercache.errors import ConfigError
from layercache.graph import split
from layercache.heads import HeadSpec, build_head
from layercache.outputs import OutputSpec
from layercache.timing import interleaved

logger = logging.getLogger(__name__)

BACKBONE = "backbone"
BACKBONE_EXIT = -1
#: How :meth:`CachedModel.run` runs a batch: Algorithm 1, heads without shrinking, or the backbone alone.
RUN_MODES = ("shrink", "noshrink", "backbone", "graphs")


def validate_policy(policy: Mapping[str, str]) -> dict[str, str]:
    """Check a ``{"<min batch>": mode}`` policy; returns a plain dict."""
    out = {}
    for k, v in policy.items():
        if not str(k).isdigit() or int(k) < 1:
            raise ConfigError(f"policy key {k!r} must be a batch size >= 1 written as a string, e.g. '32'")
        if v not in RUN_MODES:
            raise ConfigError(f"policy mode {v!r} for batch {k} is not one of {RUN_MODES}")
        out[str(int(k))] = v
    return out


def pool_activation(t: torch.Tensor) -> torch.Tensor:
    """Global average pool an activation to ``(B, C)``: NCHW over H, W; tokens ``(B, L, D)`` over L."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    return t.flatten(1)


@dataclass(frozen=True)
class CachedOutput:
    """Output of :meth:`CachedModel.run` for one batch, in request order.

    Attributes:
        logits: ``(B, K)`` the answered class scores, in the backbone's own kind (:class:`OutputSpec`): the backbone's
            for rows that went all the way, a head's calibrated distribution for rows it answered (log-probabilities
            for a backbone of logits: ``softmax`` of either is the answered distribution).
        exit_index: ``(B,)`` long; position of the exit in ``CachedModel.nodes``, or ``-1`` for the backbone.
        batch_sizes: rows entering each segment (shows the shrinking), length ``len(nodes) + 1``.
        output: what the original ``postprocess`` gets: ``logits`` for a backbone returning a tensor, else an object
            of the backbone's own form (see :meth:`OutputSpec.assemble`).
        confidence: ``(B,)`` calibrated confidence of the head that answered, NaN for backbone rows.
        backbone_pred: ``(B,)`` long, the backbone's top-1 where it ran to the end for the row (every backbone row,
            and cache hits that were verified); ``-1`` elsewhere.
        verified: ``(B,)`` bool, rows answered by a head that also ran the rest of the backbone (online
            verification: their ``backbone_pred`` says whether the head agreed).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    batch_sizes: tuple[int, ...]
    output: Any = None
    confidence: torch.Tensor | None = None
    backbone_pred: torch.Tensor | None = None
    verified: torch.Tensor | None = None


class CachedModel(nn.Module):
    """Backbone segments with cache heads after some of them.

    Args:
        segments: ``len(heads) + 1`` modules; segment ``i`` ends at ``nodes[i]``, the last one gives the output.
        heads: one head per cut, returning logits.
        nodes: fx node names of the cuts (depth order).
        temperatures: temperature of each head (calibration).
        thresholds: confidence threshold of each head; ``inf`` disables a head.
        shrink: drop answered rows from the batch (Algorithm 1). Without shrinking, all rows go on through the
            backbone and answered rows only take the head's answer (useful where shrinking does not pay).
        policy: per batch size, the mode measured fastest on this device (see :func:`measure_policy`):
            ``{"<min batch>": "shrink" | "noshrink" | "backbone"}``; a batch uses the entry with the largest
            min batch <= its size; no entry means ``shrink`` (or ``noshrink`` when ``shrink`` is False).
        output: where the class scores are in the backbone's output and what they are (default: a logits tensor).

    Example:
        >>> model = CachedModel.from_spec(backbone, spec, heads_state)
        >>> out = model.run(batch)            # out.logits, out.exit_index
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        nodes: Sequence[str],
        temperatures: Sequence[float],
        thresholds: Sequence[float],
        *,
        shrink: bool = True,
        policy: Mapping[str, str] | None = None,
        output: OutputSpec | None = None,
    ) -> None:
        super().__init__()
        n = len(heads)
        if not (len(segments) == n + 1 and len(nodes) == n and len(temperatures) == n and len(thresholds) == n):
            raise ConfigError(
                f"CachedModel needs len(segments) == len(heads) + 1 and one node/temperature/threshold per head; got "
                f"{len(segments)} segments, {n} heads, {len(nodes)} nodes, {len(temperatures)} temperatures, "
                f"{len(thresholds)} thresholds"
            )
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.nodes = tuple(nodes)
        self.temperatures = tuple(float(t) for t in temperatures)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.shrink = shrink
        self.output = output or OutputSpec()
        self._policy = validate_policy(policy or {})
        # Sorted once here, not on every request.
        self._policy_steps = sorted((int(k), v) for k, v in self._policy.items())
        # An output of the backbone's form for batches a head answers entirely (set by from_spec / _like).
        self._template: Any = None
        # Segments and heads as CUDA graphs per batch bucket (enable_graphs); plain tuples, not ModuleLists, so
        # the state dict does not list the shared weights twice.
        self._graphed: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None
        self._warned_graphs = False

    @classmethod
    def from_spec(
        cls, backbone: nn.Module, spec: CacheSpec, heads_state: Mapping[str, torch.Tensor] | None = None
    ) -> CachedModel:
        """Split ``backbone`` at the spec's exits and attach the heads (weights from ``heads_state``).

        ``heads_state`` keys are ``"<exit position>.<parameter name>"`` as written by :func:`heads_state_dict`.
        """
        backbone.eval()
        segments = split(backbone, list(spec.nodes), leaf_modules=spec.leaf_modules) if spec.exits else [backbone]
        heads = [build_head(HeadSpec.from_dict(e.head), e.in_shape, spec.num_classes) for e in spec.exits]
        for i, head in enumerate(heads):
            if heads_state is not None:
                prefix = f"{i}."
                own = {k[len(prefix) :]: v for k, v in heads_state.items() if k.startswith(prefix)}
                missing = set(head.state_dict()) - set(own)
                if missing:
                    raise ConfigError(
                        f"head {i} ({spec.exits[i].node}) has no weights for {sorted(missing)[:3]} in the heads file; "
                        "Hint: rebuild the cache, the heads file does not match layercache_cache.json"
                    )
                try:
                    head.load_state_dict(own)
                except RuntimeError as exc:  # same keys, other shapes: the heads of another build
                    raise ConfigError(
                        f"head {i} ({spec.exits[i].node}) does not match its weights in the heads file: "
                        f"{str(exc).splitlines()[-1].strip()} Hint: rebuild the cache, the heads file does not match "
                        "layercache_cache.json"
                    ) from exc
            head.eval()
        model = cls(
            segments,
            heads,
            spec.nodes,
            [e.temperature for e in spec.exits],
            [e.threshold for e in spec.exits],
            shrink=spec.shrink,
            policy=spec.policy,
            output=OutputSpec.from_dict(spec.output),
        )
        if model.output.key is not None:
            # The backbone's form, for batches the heads answer entirely (no backbone output to copy then).
            with torch.inference_mode():
                example = torch.zeros((1, *spec.input_shape), device=next(backbone.parameters()).device)
                model._template = backbone(example)
        return model.eval()

    def _like(self, **changes: Any) -> CachedModel:
        kwargs: dict[str, Any] = {
            "thresholds": self.thresholds,
            "shrink": self.shrink,
            "policy": self.policy,
            "output": self.output,
        }
        kwargs.update(changes)
        thresholds = kwargs.pop("thresholds")
        same_modules = "segments" not in kwargs and "heads" not in kwargs
        segments = kwargs.pop("segments", list(self.segments))
        heads = kwargs.pop("heads", list(self.heads))
        model = CachedModel(segments, heads, self.nodes, self.temperatures, thresholds, **kwargs).train(self.training)
        model._template = self._template
        # The graphs replay the modules they captured: kept for other thresholds or policy, not for other modules.
        model._graphed = self._graphed if same_modules else None
        return model

    def enable_graphs(self, max_batch: int = 128, capture: Any = None) -> CachedModel:
        """Make ``graphs`` mode available: ``shrink`` with every segment and head replayed from a CUDA graph per
        batch-size bucket (:class:`~layercache.cudagraphs.BucketedGraph`, captured on first use), so a launch-bound
        GPU pays for the rows a head answered no kernel launches. ``capture`` replaces the CUDA capture (tests
        pass :func:`~layercache.cudagraphs.eager_capture`). Returns this model."""
        from layercache.cudagraphs import BucketedGraph

        self._graphed = (
            tuple(BucketedGraph(seg, max_batch, capture) for seg in self.segments),
            tuple(BucketedGraph(head, max_batch, capture) for head in self.heads),
        )
        return self

    @torch.inference_mode()
    def capture_graphs(self, example: torch.Tensor) -> int:
        """Capture every segment and head at every bucket up to the graphs' ``max_batch`` now, on rows of
        ``example`` (repeated as needed), so no request pays for a capture. Returns how many graphs exist."""
        if self._graphed is None:
            raise ConfigError("capture_graphs needs enable_graphs() first")
        from layercache.cudagraphs import bucket_for

        segments, heads = self._graphed
        max_batch = segments[0].max_batch
        buckets = sorted({bucket_for(n, max_batch) for n in range(1, max_batch + 1)} - {None})
        for b in buckets:
            idx = torch.arange(b, device=example.device) % example.shape[0]
            h = example.index_select(0, idx)
            for i, seg in enumerate(segments):
                h = seg(h)
                if i < len(heads):
                    heads[i](h)
        return sum(g.captures for g in (*segments, *heads))

    def disable_graphs(self) -> CachedModel:
        """Drop the graphs of :meth:`enable_graphs` (``graphs`` mode runs as ``shrink`` again). Returns this model."""
        self._graphed = None
        return self

    @property
    def graphs_enabled(self) -> bool:
        """Whether ``graphs`` mode replays graphs (:meth:`enable_graphs`); otherwise it runs as ``shrink``."""
        return self._graphed is not None

    def with_thresholds(self, thresholds: Sequence[float]) -> CachedModel:
        """The same segments and heads (shared, not copied) with other thresholds, e.g. ``[1.01] * n`` for heads
        that run but never fire (the price of the heads) or ``inf`` to skip them."""
        return self._like(thresholds=thresholds)

    def with_policy(self, policy: Mapping[str, str]) -> CachedModel:
        """The same segments, heads and thresholds with another per-batch-size policy."""
        return self._like(policy=policy)

    def with_modules(self, segments: Sequence[nn.Module], heads: Sequence[nn.Module]) -> CachedModel:
        """The same exits, thresholds and policy over other modules computing the same functions (e.g. the
        accelerated ones of :func:`layercache.accel.accelerate`). CUDA graphs of :meth:`enable_graphs` are not
        carried over: they replay the old modules."""
        if len(segments) != len(self.segments) or len(heads) != len(self.heads):
            raise ConfigError(
                f"with_modules needs {len(self.segments)} segments and {len(self.heads)} heads; got "
                f"{len(segments)} and {len(heads)}"
            )
        return self._like(segments=list(segments), heads=list(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The answered class scores in request order (see :class:`CachedOutput`)."""
        return self.run(x).logits

    @property
    def policy(self) -> dict[str, str]:
        """``{"<min batch>": mode}`` (see the class docstring); :meth:`with_policy` gives a model with another."""
        return dict(self._policy)

    def mode_for(self, batch: int) -> str:
        """The mode this model uses for a batch of ``batch`` rows (policy, else shrink / noshrink)."""
        mode = "shrink" if self.shrink else "noshrink"
        for min_batch, m in self._policy_steps:
            if batch < min_batch:
                break
            mode = m
        return mode

    def run(
        self,
        x: torch.Tensor,
        mode: str | None = None,
        *,
        verify: float | Sequence[float] = 0.0,
        generator: torch.Generator | None = None,
    ) -> CachedOutput:
        """Algorithm 1: segments in order; after each head answer the confident rows and shrink the batch.

        The request path syncs with the host once per head that runs (``nonzero``, to know how many rows go on) in
        ``shrink`` mode, never in ``noshrink`` mode; answers are scattered with ``index_copy`` and ``where``.

        Args:
            x: the batch.
            mode: ``shrink``, ``noshrink``, ``backbone`` (heads skipped) or ``graphs`` (``shrink`` replayed from
                CUDA graphs, see :meth:`enable_graphs`; plain ``shrink`` when they are not enabled); default
                :meth:`mode_for`.
            verify: share of cache hits that also run the rest of the backbone (online verification): they are
                answered by the head all the same, and ``backbone_pred`` says what the backbone would have answered;
                one share for every head, or one per head (:meth:`layercache.monitor.CacheMonitor.verify_shares`).
                In ``noshrink`` mode every row runs the backbone, so every hit is verified at no cost.
            generator: random source of the verification draws (seeded in tests), on ``x``'s device.
        """
        batch = x.shape[0]
        mode = mode or self.mode_for(batch)
        if mode not in RUN_MODES:
            raise ConfigError(f"mode {mode!r} is not one of {RUN_MODES}")
        shares = [float(verify)] * len(self.heads) if isinstance(verify, (int, float)) else [float(v) for v in verify]
        if len(shares) != len(self.heads) or not all(0.0 <= v <= 1.0 for v in shares):
            raise ConfigError(f"verify={verify} must be a fraction in [0, 1], or one per head ({len(self.heads)})")
        device = x.device
        no_row = torch.full((batch,), BACKBONE_EXIT, dtype=torch.long, device=device)
        segments: Sequence[Any] = self.segments
        heads: Sequence[Any] = self.heads
        if mode == "graphs":
            if self._graphed is not None:
                segments, heads = self._graphed
            elif not self._warned_graphs:
                self._warned_graphs = True
                logger.warning("mode 'graphs' without enable_graphs(): running as 'shrink'")
            mode = "shrink"
        if mode == "backbone":
            h = x
            for seg in self.segments:
                h = seg(h)
            scores = self.output.scores(h)
            return CachedOutput(
                scores,
                no_row,
                tuple([batch] * len(self.segments)),
                output=h,
                confidence=torch.full((batch,), math.nan, device=device),
                backbone_pred=scores.argmax(1),
                verified=torch.zeros(batch, dtype=torch.bool, device=device),
            )
        shrink = mode == "shrink"
        exit_index = no_row.clone()
        confidence = torch.full((batch,), math.nan, device=device)
        answered = torch.zeros(batch, dtype=torch.bool, device=device)
        backbone_pred = no_row.clone()
        remaining = torch.arange(batch, device=device)
        head_logp: torch.Tensor | None = None  # (batch, K): the answering head's log-probabilities
        sizes: list[int] = []
        h = x
        for i, head in enumerate(heads):
            sizes.append(int(h.shape[0]))
            h = segments[i](h)
            threshold = self.thresholds[i]
            if threshold == math.inf:
                continue
            logp = F.log_softmax(head(h) / self.temperatures[i], dim=1)
            conf = logp.amax(dim=1).exp()
            hit = (conf >= threshold) & ~answered.index_select(0, remaining)
            if head_logp is None:
                head_logp = logp.new_zeros((batch, logp.shape[1]))
            head_logp.index_copy_(0, remaining, torch.where(hit[:, None], logp, head_logp.index_select(0, remaining)))
            exit_index.index_copy_(0, remaining, torch.where(hit, i, exit_index.index_select(0, remaining)))
            confidence.index_copy_(
                0, remaining, torch.where(hit, conf.to(confidence.dtype), confidence.index_select(0, remaining))
            )
            answered.index_copy_(0, remaining, answered.index_select(0, remaining) | hit)
            if not shrink:
                continue
            go_on = ~hit
            if shares[i] > 0:
                go_on |= hit & (torch.rand(hit.shape, device=device, generator=generator) < shares[i])
            keep = go_on.nonzero().squeeze(1)  # the one host sync of this head
            if keep.shape[0] == h.shape[0]:
                continue
            remaining = remaining.index_select(0, keep)
            if keep.shape[0] == 0:
                break
            h = h.index_select(0, keep)
        if remaining.shape[0] > 0:
            sizes.append(int(h.shape[0]))
            for seg in segments[len(sizes) - 1 :]:
                h = seg(h)
            template = h
            scores = self.output.scores(h)
            backbone_pred.index_copy_(0, remaining, scores.argmax(1))
            if head_logp is None:
                final = scores  # no head ran: every row is the backbone's
            else:
                final = self.output.from_logp(head_logp).to(scores.dtype)
                mine = ~answered.index_select(0, remaining)
                final.index_copy_(0, remaining, torch.where(mine[:, None], scores, final.index_select(0, remaining)))
        else:
            template = self._template
            final = self.output.from_logp(head_logp) if head_logp is not None else x.new_zeros((batch, 0))
        sizes.extend([0] * (len(self.segments) - len(sizes)))
        output = final if self.output.key is None else self.output.assemble(template, remaining, final)
        verified = answered & (backbone_pred != BACKBONE_EXIT)
        return CachedOutput(final, exit_index, tuple(sizes), output, confidence, backbone_pred, verified)


class RecordingModel(nn.Module):
    """The backbone as segments cut at ``nodes``; returns the output and each cut's pooled activation.

    The segments reproduce the backbone exactly (fx split), so recording never changes an answer. ``leaf_modules``
    are the module classes the nodes were found with (``layercache.graph.trace``).
    """

    def __init__(self, backbone: nn.Module, nodes: Sequence[str], leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        backbone.eval()
        self.nodes = tuple(nodes)
        self.segments = nn.ModuleList(split(backbone, list(nodes), leaf_modules=leaf_modules) if nodes else [backbone])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acts: dict[str, torch.Tensor] = {}
        h = x
        for i, seg in enumerate(self.segments):
            h = seg(h)
            if i < len(self.nodes):
                acts[self.nodes[i]] = pool_activation(h)
        return h, acts


def heads_state_dict(heads: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Flat state dict of the selected heads, keys ``"<position>.<name>"`` (read by :meth:`CachedModel.from_spec`)."""
    return {f"{i}.{k}": v.detach().cpu().clone() for i, head in enumerate(heads) for k, v in head.state_dict().items()}


def exit_names(nodes: Sequence[str], exit_index: torch.Tensor) -> list[str]:
    """Node name per row (``backbone`` for -1), for headers and logs."""
    names = list(nodes) + [BACKBONE]
    return [names[i] for i in exit_index.tolist()]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (sorted keys, raw bytes), 16 hex chars: ties logs and caches to weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def measure_policy(
    model: CachedModel,
    inputs: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 8, 16, 32, 64, 128),
    repeats: int = 3,
    seed: int = 0,
    margin: float = 0.05,
) -> dict[str, str]:
    """Time ``shrink``, ``noshrink``, ``backbone`` (and ``graphs`` once :meth:`CachedModel.enable_graphs` made it
    available) on real inputs for each batch size, interleaved, and keep the
    fastest (median) per size: on the device it runs on, the model then knows where shrinking or the heads do not
    pay (e.g. a launch-bound GPU) instead of assuming that fewer FLOPs mean less time.

    Args:
        model: the cached model, on the device to measure.
        inputs: real (logged) inputs; batches are drawn from them with replacement.
        batch_sizes: sizes to time.
        repeats: timed runs per mode and size (median).
        seed: seed of the row draws.
        margin: the model's own mode (``shrink``, or ``noshrink`` for a no-shrink model) is kept unless another
            mode is faster by more than this fraction, so timing noise does not flip a size to another mode.

    Returns:
        A policy for :class:`CachedModel` / :class:`~layercache.config.CacheSpec` (``{"<batch>": mode}``).
    """
    if not 0 <= margin < 1:
        raise ConfigError(f"margin={margin} must be in [0, 1)")
    device = next(model.parameters()).device
    default = "shrink" if model.shrink else "noshrink"
    # graphs only where they replay: otherwise it is shrink timed twice
    modes = [m for m in RUN_MODES if m != "graphs" or model.graphs_enabled]
    gen = torch.Generator().manual_seed(seed)
    policy: dict[str, str] = {}
    for b in batch_sizes:
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            idx = torch.randint(0, inputs.shape[0], (b,), generator=gen)
            xb = inputs[idx].to(device=device, dtype=torch.float32).contiguous()
            calls = {m: (lambda m=m, xb=xb: model.run(xb, m)) for m in modes}
            for m, t in interleaved(calls, rounds=1, warmup=1, device=device).items():
                times[m].append(t[0])
        medians = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        best = min(medians, key=medians.get)
        policy[str(b)] = best if medians[best] < (1 - margin) * medians[default] else default
        logger.info(
            "batch %d: %s -> %s", b, ", ".join(f"{m} {1e3 * t:.2f} ms" for m, t in medians.items()), policy[str(b)]
        )
    return policy
