"""CUDA graphs per module and batch-size bucket, for the cached model's segments and heads on a GPU.

On a GPU a small model is bound by kernel launches, not arithmetic (FIELD_NOTES: a CIFAR ResNet-18 takes about
2.2 ms at any batch from 1 to 128 on an H200), so early exits only pay once the launches are gone. A
:class:`BucketedGraph` captures its module once per batch-size bucket (1, 2, 4, ... up to ``max_batch``) on first
use: a call copies the rows into the bucket's static input (the rows past them are left as they are: rows of an
eval-mode classifier do not mix), replays the graph and returns a copy of the first rows of the static output.
Batches larger than ``max_batch`` and empty ones run eagerly.

Capturing is injected (``capture``), so the bucketing, padding and reuse are tested on a CPU with a capture that
only calls the module; :func:`cuda_capture` is the real one (warm-up on a side stream, then
``torch.cuda.graph`` into a memory pool all graphs of a model share).

Example::

    model = CachedModel.from_spec(backbone.cuda(), spec, heads).enable_graphs(max_batch=128)
    out = model.run(batch, "graphs")        # shrink mode, every segment and head a replayed graph
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from layercache.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["BucketedGraph", "Capture", "bucket_for", "cuda_capture", "eager_capture"]

#: ``capture(fn, static_input) -> (static_output, replay)``: record ``fn`` on ``static_input``; ``replay()`` then
#: recomputes ``static_output`` in place from whatever ``static_input`` holds.
Capture = Callable[[Callable[[torch.Tensor], Any], torch.Tensor], tuple[Any, Callable[[], None]]]


def bucket_for(n: int, max_batch: int) -> int | None:
    """The smallest power of two >= ``n``, or None when ``n`` is 0 or above ``max_batch`` (run eagerly)."""
    if n <= 0 or n > max_batch:
        return None
    return min(1 << (n - 1).bit_length(), max_batch)


def eager_capture(fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> tuple[Any, Callable[[], None]]:
    """A stand-in for :func:`cuda_capture` on any device: ``replay`` calls ``fn`` and copies into the static
    output, so everything around the graphs runs and is tested without a GPU."""
    static_output = fn(static_input)

    def replay() -> None:
        _copy_into(static_output, fn(static_input))

    return static_output, replay


def _copy_into(dest: Any, src: Any) -> None:
    if isinstance(dest, torch.Tensor):
        dest.copy_(src)
    elif isinstance(dest, dict):
        for k in dest:
            _copy_into(dest[k], src[k])
    elif isinstance(dest, (tuple, list)):
        for d, s in zip(dest, src, strict=True):
            _copy_into(d, s)


def cuda_capture(pool: Any = None, warmup: int = 3) -> Capture:
    """The real capture: ``warmup`` runs on a side stream (cuDNN picks its algorithms), then one
    ``torch.cuda.graph`` capture into ``pool`` (share one ``torch.cuda.graph_pool_handle()`` per model)."""

    def capture(fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> tuple[Any, Callable[[], None]]:
        stream = torch.cuda.Stream(device=static_input.device)
        stream.wait_stream(torch.cuda.current_stream(static_input.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(static_input)
        torch.cuda.current_stream(static_input.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            static_output = fn(static_input)
        return static_output, graph.replay

    return capture


class BucketedGraph:
    """``module`` replayed from one captured graph per batch-size bucket (see the module docstring).

    Not an ``nn.Module``: it holds no parameters of its own (the wrapped module's are shared, and a state_dict of
    the cached model does not list them twice).

    Args:
        module: an eval-mode module whose rows do not mix (a classifier's segment or a head).
        max_batch: the largest bucket; larger batches run eagerly.
        capture: how to capture (default: :func:`cuda_capture` with a pool of this wrapper's own).
    """

    def __init__(self, module: nn.Module, max_batch: int = 128, capture: Capture | None = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1")
        self.module = module
        self.max_batch = int(max_batch)
        self._capture = capture
        self._graphs: dict[tuple[Any, ...], tuple[torch.Tensor, Any, Callable[[], None]]] = {}

    @property
    def captures(self) -> int:
        """How many graphs this wrapper holds (one per bucket, input shape, dtype and device seen)."""
        return len(self._graphs)

    def _capture_for(self, key: tuple[Any, ...], x: torch.Tensor) -> tuple[torch.Tensor, Any, Callable[[], None]]:
        bucket = key[0]
        static_input = x.new_zeros((bucket, *x.shape[1:]))
        static_input[: x.shape[0]].copy_(x)
        capture = self._capture or cuda_capture()
        static_output, replay = capture(self.module, static_input)
        logger.debug("captured %s for batch bucket %d", type(self.module).__name__, bucket)
        entry = (static_input, static_output, replay)
        self._graphs[key] = entry
        return entry

    def __call__(self, x: torch.Tensor) -> Any:
        n = int(x.shape[0])
        bucket = bucket_for(n, self.max_batch)
        if bucket is None:
            return self.module(x)
        key = (bucket, tuple(x.shape[1:]), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture_for(key, x)
        static_input, static_output, replay = entry
        static_input[:n].copy_(x)
        replay()
        # A copy: the static output is overwritten by the next replay of this bucket.
        return tree_map(lambda t: t[:n].clone() if isinstance(t, torch.Tensor) else t, static_output)
