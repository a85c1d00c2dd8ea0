"""Logged traffic back through the backbone: the build's view of what the service saw.

A logged row carries its request body as received (the default: a PNG or JPEG is smaller than the tensor it
decodes to) or, where the body could not be kept, its preprocessed input tensor. :class:`LoggedInputs` gives
either back as model inputs, batch by batch: stored tensors as they are, bodies through the archive's original
``preprocess`` (the same code that served them). :func:`replay` runs them through the backbone split at the
candidate layers and keeps the pre-pooled activations the heads train on and the backbone's class scores they
learn from.

Example::

    inputs = LoggedInputs(read_logs(log_dir), loaded.preprocess)
    acts, scores, output = replay(backbone, inputs, ["layer1.0.relu_1"], max_spatial=8, batch_size=256)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from layercache.errors import LogError
from layercache.graph import split
from layercache.heads import prepool, prepool_size_for
from layercache.outputs import OutputSpec, detect
from layercache.trafficlog import bodies_of, decode_inputs, input_shape_of

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["ActivationStore", "LoggedInputs", "replay"]

Preprocess = Callable[[list[dict[str, Any]]], torch.Tensor]


def _no_progress(it: Iterable[T], desc: str) -> Iterable[T]:
    return it


class LoggedInputs:
    """The model inputs of logged rows: stored tensors where a row has one, ``preprocess`` of its body elsewhere.

    Args:
        table: logged rows (:func:`layercache.trafficlog.read_logs`).
        preprocess: the archive's original preprocess (a list of request rows -> one batched tensor); needed when
            some rows carry only their body.

    Raises:
        LogError: rows of several input shapes, or bodies to replay without ``preprocess``.
    """

    def __init__(self, table: pa.Table, preprocess: Preprocess | None = None) -> None:
        self.table = table
        self.n = table.num_rows
        self.shape = input_shape_of(table) if self.n else ()
        self._has_input = (
            np.asarray(table.column("input").is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            if "input" in table.column_names
            else np.zeros(self.n, dtype=bool)
        )
        self._bodies = bodies_of(table)
        missing = [i for i in range(self.n) if not self._has_input[i] and self._bodies[i] is None]
        if missing:
            raise LogError(f"{len(missing)} logged rows have neither an input tensor nor a body; they cannot be used")
        if preprocess is None and not self._has_input.all():
            raise LogError(
                f"{int((~self._has_input).sum())} logged rows carry their request body: replaying them needs the "
                "archive's preprocess (open the archive with layercache.offline.open_mar)"
            )
        self._preprocess = preprocess

    def batch(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The inputs of ``rows`` as one float32 tensor ``(len(rows), *shape)``."""
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.empty((len(rows), *self.shape), dtype=torch.float32)
        stored = self._has_input[rows]
        if stored.any():
            picked = rows[stored]
            out[torch.from_numpy(np.nonzero(stored)[0])] = torch.from_numpy(
                decode_inputs(self.table.take(pa.array(picked)).select(["input", "input_shape"]))
            )
        ids = None
        for j in np.nonzero(~stored)[0]:
            body = self._bodies[rows[j]]
            assert body is not None and self._preprocess is not None  # checked in __init__
            try:
                t = self._preprocess([body.request()])
            except Exception as exc:  # noqa: BLE001 - name the row that no longer preprocesses
                if ids is None:
                    ids = self.table.column("request_id")
                raise LogError(
                    f"logged request {ids[int(rows[j])].as_py()} no longer preprocesses ({type(exc).__name__}: "
                    f"{exc}); was the archive's handler changed? Hint: build from the archive that served it"
                ) from exc
            if tuple(t.shape[1:]) != tuple(self.shape):
                raise LogError(
                    f"the archive's preprocess gives shape {list(t.shape[1:])} for a logged body, the log says "
                    f"{list(self.shape)}; was the archive's handler changed?"
                )
            out[j] = t[0].float()
        return out

    def batches(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, inputs)`` for consecutive batches of ``size`` rows."""
        for start in range(0, self.n, size):
            yield start, self.batch(np.arange(start, min(start + size, self.n)))


class ActivationStore:
    """The replayed activations of each candidate layer, in float16 files under ``directory``: while replaying, the
    process holds one batch of them; while a layer's heads train, that layer's rows. Peak memory then follows the
    rows used and the widest layer, not the number of layers.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._rows: dict[str, int] = {}
        self._files: dict[str, Any] = {}

    def _path(self, node: str) -> Path:
        return self.directory / f"{list(self._shapes).index(node)}.f16"

    def append(self, node: str, values: torch.Tensor) -> None:
        """Append rows (any float dtype; stored as float16) of ``node``; every call gives the same row shape."""
        shape = tuple(values.shape[1:])
        if node not in self._shapes:
            self._shapes[node], self._rows[node] = shape, 0
            self._files[node] = open(self._path(node), "wb")  # noqa: SIM115 - closed by load, drop or close
        elif self._shapes[node] != shape:
            raise LogError(f"activations of {node!r} changed shape from {self._shapes[node]} to {shape}")
        self._files[node].write(values.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
        self._rows[node] += int(values.shape[0])

    def _close(self, node: str) -> None:
        f = self._files.pop(node, None)
        if f is not None:
            f.close()

    def load(self, node: str) -> torch.Tensor:
        """Every stored row of ``node`` as one float16 tensor ``(N, *shape)``."""
        self._close(node)
        data = np.fromfile(self._path(node), dtype=np.float16)
        return torch.from_numpy(data.reshape(self._rows[node], *self._shapes[node]))

    def drop(self, node: str) -> None:
        """Forget ``node``'s rows (its file is deleted)."""
        self._close(node)
        self._path(node).unlink(missing_ok=True)

    def close(self) -> None:
        for node in list(self._files):
            self._close(node)


@torch.inference_mode()
def replay(
    backbone: nn.Module,
    inputs: LoggedInputs,
    nodes: Sequence[str],
    *,
    max_spatial: int,
    batch_size: int,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = _no_progress,
    output: OutputSpec | None = None,
    store: ActivationStore | None = None,
    leaf_modules: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], torch.Tensor, OutputSpec]:
    """Run logged inputs through the backbone split at ``nodes`` (traced with ``leaf_modules``).

    Args:
        store: where the activations go (on disk); when None they are returned in memory.

    Returns:
        ``acts[node]`` (empty when ``store`` is given: read them from it): float16 activations pre-pooled to at
        most ``max_spatial`` with :func:`prepool_size_for` (the function the heads' search space and pools are
        sized by, so a head sees in training exactly what it computes at serving time), the backbone's class
        scores ``(N, K)`` in float32, and where they are in its output (detected on the first batch unless
        ``output`` is given).
    """
    segments = split(backbone, list(nodes), leaf_modules=leaf_modules)
    n = inputs.n
    acts: dict[str, torch.Tensor] = {}
    scores_out: torch.Tensor | None = None
    for start, x in progress(inputs.batches(batch_size), "replay"):
        h = x
        for i, seg in enumerate(segments):
            h = seg(h)
            if i < len(nodes):
                p = prepool(h, prepool_size_for(tuple(h.shape[1:]), max_spatial)) if h.dim() == 4 else h
                if store is not None:
                    store.append(nodes[i], p)
                    continue
                if nodes[i] not in acts:
                    acts[nodes[i]] = torch.empty((n, *p.shape[1:]), dtype=torch.float16)
                acts[nodes[i]][start : start + p.shape[0]] = p.half()
        if output is None:
            output = detect(h)
            logger.info("backbone output: class scores at %r, %s", output.key, output.kind)
        scores = output.scores(h)
        if scores_out is None:
            scores_out = torch.empty((n, scores.shape[1]), dtype=torch.float32)
        scores_out[start : start + scores.shape[0]] = scores.float()
    if scores_out is None or output is None:
        raise LogError("no logged inputs to replay")
    return acts, scores_out, output
