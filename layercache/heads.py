"""Cache heads: the search space, building a head for one candidate activation, its FLOPs.

A cache head is a small classifier that reads the activation of one candidate node of the
frozen backbone and predicts the backbone's output distribution (paper section 4.2.1). Its
architecture is a :class:`HeadSpec`: an optional adaptive average pool, up to two convolutions,
a global average pool, and up to two linear layers (one optional hidden layer plus the output).

Heads are trained on *pre-pooled* activations (:func:`prepool` to :func:`prepool_size_for`) so the
build keeps small tensors in memory, and run at serving time on the *native* activation. Both
give the same logits because every 4D head starts with ``AdaptiveAvgPool2d(spec.pool)`` and
``spec.pool`` divides the pre-pool size: adaptive average pooling composes exactly when the
sizes divide (each output cell is the mean of equal-sized, aligned blocks).

Example::

    spec = search_space((64, 32, 32), num_classes=10)[0]
    head = build_head(spec, (64, 32, 32), 10)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from layercache.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "HeadSpec",
    "build_head",
    "head_flops",
    "head_num_params",
    "prepool",
    "prepool_size",
    "prepool_size_for",
    "search_space",
]

#: Output widths tried for head convolutions (capped relative to the input channels).
CONV_WIDTHS: tuple[int, ...] = (32, 64, 128)
#: Kernel sizes tried for head convolutions (padding is ``kernel // 2``).
CONV_KERNELS: tuple[int, ...] = (1, 3)
#: Strides tried for head convolutions.
CONV_STRIDES: tuple[int, ...] = (1, 2)
#: Hidden linear widths for conv heads and the pooled-linear heads of 4D inputs.
CONV_HIDDEN: tuple[tuple[int, ...], ...] = ((), (128,))
#: Hidden linear widths tried for 2D (channel vector) and 3D (token) inputs.
VECTOR_HIDDEN_WIDTHS: tuple[int, ...] = (64, 128, 256)

_MAX_CONVS = 2
_MAX_HIDDEN = 1


@dataclass(frozen=True)
class HeadSpec:
    """Architecture of one cache head.

    Attributes:
        pool: Side of the adaptive average pool applied first to 4D inputs; 0 means no pool
            (2D and 3D inputs must use 0).
        convs: Up to two convolutions as ``(out_channels, kernel, stride)``; each is
            ``Conv2d(padding=kernel // 2, bias=False) -> BatchNorm2d -> ReLU``.
        hidden: Up to one hidden linear width (``Linear -> ReLU``) before the output layer, so
            a head has at most two linear layers.
    """

    pool: int
    convs: tuple[tuple[int, int, int], ...] = ()
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Coerce lists (e.g. from JSON) to tuples so the spec stays hashable.
        try:
            pool = int(self.pool)
            convs = tuple(tuple(int(v) for v in c) for c in self.convs)
            hidden = tuple(int(h) for h in self.hidden)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid HeadSpec field in {self!r}: {exc}") from exc
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "convs", convs)
        object.__setattr__(self, "hidden", hidden)
        if pool < 0:
            raise ConfigError(f"HeadSpec.pool must be an int >= 0, got {self.pool!r}")
        if len(convs) > _MAX_CONVS:
            raise ConfigError(f"HeadSpec has {len(convs)} convs; at most {_MAX_CONVS} are supported")
        for conv in convs:
            if len(conv) != 3 or min(conv) < 1:
                raise ConfigError(f"HeadSpec conv {conv!r} must be (out_channels, kernel, stride) with positive values")
        if len(hidden) > _MAX_HIDDEN:
            raise ConfigError(
                f"HeadSpec has {len(hidden)} hidden layers; at most {_MAX_HIDDEN} is supported "
                "(two linear layers in all)"
            )
        if any(h < 1 for h in hidden):
            raise ConfigError(f"HeadSpec hidden widths must be positive, got {hidden!r}")

    def id(self) -> str:
        """Short stable text id, e.g. ``"p8-c64k3s2-h128"``."""
        parts = [f"p{self.pool}"]
        parts += [f"c{o}k{k}s{s}" for o, k, s in self.convs]
        parts += [f"h{h}" for h in self.hidden]
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "pool": self.pool,
            "convs": [list(c) for c in self.convs],
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            ConfigError: on unknown or missing keys or invalid values.
        """
        known = {"pool", "convs", "hidden"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown HeadSpec keys {unknown}; expected {sorted(known)}")
        if "pool" not in d:
            raise ConfigError("HeadSpec dict is missing 'pool'")
        return cls(pool=d["pool"], convs=d.get("convs", ()), hidden=d.get("hidden", ()))


def prepool_size(native: int, max_spatial: int = 8) -> int:
    """Largest divisor of ``native`` that is ``<= max_spatial`` (``native`` itself if small).

    Pooling to a divisor keeps every pooled cell an aligned block of the native map, which is
    what makes pre-pooled training equal native serving (see the module docstring). For a
    non-square map use :func:`prepool_size_for`.

    Raises:
        ConfigError: if ``native`` or ``max_spatial`` is < 1.
    """
    if native < 1 or max_spatial < 1:
        raise ConfigError(f"prepool_size needs native >= 1 and max_spatial >= 1, got {native}, {max_spatial}")
    if native <= max_spatial:
        return native
    return max(d for d in range(1, max_spatial + 1) if native % d == 0)


def prepool_size_for(in_shape: tuple[int, ...], max_spatial: int = 8) -> int:
    """Pre-pool size for a per-sample activation shape; 0 for non-4D (C,) / (L, D) shapes.

    For ``(C, H, W)`` it is ``prepool_size(gcd(H, W))``, which equals ``prepool_size(H)`` for
    square maps and divides both sides of non-square ones.
    """
    if len(in_shape) != 3:
        return 0
    return prepool_size(math.gcd(int(in_shape[1]), int(in_shape[2])), max_spatial)


def avg_pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pool NCHW ``x`` to ``size x size``: the same windows as adaptive pooling, but the plain (much
    faster on CPU) ``avg_pool2d`` kernel when the size divides H and W; global pooling is a mean."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == (size, size):
        return x
    if size == 1:
        return x.mean(dim=(2, 3), keepdim=True)
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return F.adaptive_avg_pool2d(x, size)


class AvgPoolTo(nn.Module):
    """``nn.AdaptiveAvgPool2d`` equivalent (no parameters) using :func:`avg_pool_to`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_to(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def prepool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pool an NCHW batch to ``size x size``; 2D/3D tensors pass unchanged."""
    if x.dim() != 4 or size <= 0:
        return x
    return avg_pool_to(x, size)


class _TokenMean(nn.Module):
    """Mean over the token dimension of an (N, L, D) batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _check_shape(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> None:
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if len(in_shape) not in (1, 2, 3) or any(int(s) < 1 for s in in_shape):
        raise ConfigError(
            f"in_shape {tuple(in_shape)} must be a per-sample (C,), (L, D) or (C, H, W) shape without the batch dim"
        )
    if len(in_shape) != 3 and (spec.pool or spec.convs):
        raise ConfigError(
            f"head {spec.id()} pools or convolves, which needs a (C, H, W) input; got in_shape {tuple(in_shape)}"
        )


def build_head(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the head module for one activation shape; it returns logits.

    Layouts by per-sample ``in_shape``:

    * ``(C, H, W)``: ``[AdaptiveAvgPool2d(pool)] -> convs -> AdaptiveAvgPool2d(1) -> Flatten
      -> [Linear -> ReLU] -> Linear(num_classes)``
    * ``(C,)``: ``[Linear -> ReLU] -> Linear``
    * ``(L, D)``: mean over tokens ``-> [Linear -> ReLU] -> Linear``

    Args:
        spec: The architecture.
        in_shape: Activation shape of one sample (no batch dim).
        num_classes: Width of the backbone's output distribution.

    Raises:
        ConfigError: if the spec does not fit the shape.
    """
    _check_shape(spec, in_shape, num_classes)
    layers: list[nn.Module] = []
    if len(in_shape) == 3:
        channels = int(in_shape[0])
        if spec.pool:
            layers.append(AvgPoolTo(spec.pool))
        for out_c, kernel, stride in spec.convs:
            layers += [
                nn.Conv2d(
                    channels,
                    out_c,
                    kernel,
                    stride=stride,
                    padding=kernel // 2,
                    bias=False,
                ),
                nn.BatchNorm2d(out_c),
                nn.ReLU(inplace=True),
            ]
            channels = out_c
        layers += [AvgPoolTo(1), nn.Flatten()]
        features = channels
    elif len(in_shape) == 2:
        layers.append(_TokenMean())
        features = int(in_shape[1])
    else:
        features = int(in_shape[0])
    for width in spec.hidden:
        layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _analytic_flops(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    """:func:`head_flops` without the shape checks."""
    flops = 0
    if len(in_shape) == 3:
        c, h, w = (int(s) for s in in_shape)
        if spec.pool:
            flops += c * h * w
            h = w = spec.pool
        for out_c, kernel, stride in spec.convs:
            h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
            flops += 2 * c * out_c * kernel * kernel * h * w
            c = out_c
        flops += c * h * w
        features = c
    elif len(in_shape) == 2:
        flops += int(in_shape[0]) * int(in_shape[1])
        features = int(in_shape[1])
    else:
        features = int(in_shape[0])
    for width in (*spec.hidden, num_classes):
        flops += 2 * features * width
        features = width
    return flops


def _counted_flops(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    """What FlopCounterMode counts on a built head plus the pooling reads: the reference :func:`head_flops` equals."""
    from torch.utils.flop_counter import FlopCounterMode

    head = build_head(spec, in_shape, num_classes).eval()
    x = torch.zeros((1, *in_shape))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        head(x)
    counted = int(counter.get_total_flops())
    # FlopCounterMode ignores pooling and means; count one add per element read.
    reads = 0
    if len(in_shape) == 3:
        c, h, w = (int(s) for s in in_shape)
        if spec.pool:
            reads += c * h * w
            h = w = spec.pool
        for out_c, kernel, stride in spec.convs:
            h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
            c = out_c
        reads += c * h * w
    elif len(in_shape) == 2:
        reads += int(in_shape[0]) * int(in_shape[1])
    return counted + reads


def head_flops(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    """FLOPs of one head for one sample fed its *native* activation, in closed form (no head is built, so the
    search can cost hundreds of candidate heads in microseconds).

    The count is what ``torch.utils.flop_counter.FlopCounterMode`` gives for the convolutions and linear layers
    (2 FLOPs per multiply-accumulate; the unit tests check the two agree on the search spaces) plus one FLOP per
    element each average pool (and the token mean of 3D inputs) reads, which that counter ignores. BatchNorm and
    ReLU are not counted (BatchNorm folds into the conv at inference).

    Raises:
        ConfigError: if the spec does not fit the shape.
    """
    in_shape = tuple(int(s) for s in in_shape)
    _check_shape(spec, in_shape, num_classes)
    return _analytic_flops(spec, in_shape, int(num_classes))


def head_num_params(module: nn.Module) -> int:
    """Number of trainable-parameter elements of a head (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def search_space(in_shape: tuple[int, ...], num_classes: int, max_spatial: int = 8) -> list[HeadSpec]:
    """All candidate head specs for one activation shape, cheapest (FLOPs) first.

    For ``(C, H, W)`` inputs, with ``s = prepool_size_for(in_shape, max_spatial)``:

    * pooled-linear heads: ``pool=1``, no conv, hidden ``()`` or ``(128,)``;
    * conv heads: ``pool`` any divisor of ``s`` that is >= 2, then one or two convs with kernel
      in (1, 3), stride in (1, 2) (stride 2 only while the map is >= 4 wide), width in
      (32, 64, 128) capped at ``max(32, 2*C)`` and non-decreasing, then hidden ``()`` or
      ``(128,)``.

    For ``(C,)`` and ``(L, D)`` inputs: hidden ``()`` or one of (64, 128, 256) capped at
    ``max(64, 2*features)``.

    Pools always divide ``s``, so every spec is exact on pre-pooled activations. The order is
    deterministic: by :func:`head_flops`, then by id.

    Raises:
        ConfigError: for an unsupported shape.
    """
    in_shape = tuple(int(s) for s in in_shape)
    _check_shape(HeadSpec(pool=0), in_shape, num_classes)
    specs: list[HeadSpec] = []
    if len(in_shape) == 3:
        channels = in_shape[0]
        size = prepool_size_for(in_shape, max_spatial)
        widths = [w for w in CONV_WIDTHS if w <= max(CONV_WIDTHS[0], 2 * channels)]
        specs += [HeadSpec(pool=1, hidden=h) for h in CONV_HIDDEN]
        pools = [p for p in range(2, size + 1) if size % p == 0]

        def conv_choices(spatial: int, min_width: int) -> list[tuple[tuple[int, int, int], int]]:
            out = []
            for kernel in CONV_KERNELS:
                for stride in CONV_STRIDES:
                    if stride > 1 and spatial < 4:
                        continue
                    for width in widths:
                        if width >= min_width:
                            out.append(
                                (
                                    (width, kernel, stride),
                                    _conv_out(spatial, kernel, stride),
                                )
                            )
            return out

        for pool in pools:
            for conv1, spatial1 in conv_choices(pool, 0):
                chains = [(conv1,)]
                chains += [(conv1, conv2) for conv2, _ in conv_choices(spatial1, conv1[0])]
                for convs in chains:
                    specs += [HeadSpec(pool=pool, convs=convs, hidden=h) for h in CONV_HIDDEN]
    else:
        features = in_shape[-1]
        hidden = [()] + [(w,) for w in VECTOR_HIDDEN_WIDTHS if w <= max(64, 2 * features)]
        specs += [HeadSpec(pool=0, hidden=h) for h in hidden]
    specs.sort(key=lambda s: (_analytic_flops(s, in_shape, num_classes), s.id()))
    logger.debug("search space for %s: %d specs", in_shape, len(specs))
    return specs
