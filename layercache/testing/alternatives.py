"""The cache against the accelerations a user would reach for instead: one table, measured side by side.

Each variant is the original backbone or the cached model on one engine of :mod:`layercache.accel` (eager,
``torch.compile``, int8 PT2E, ONNX Runtime). Per batch size, every variant runs the same real batch in turn
(:func:`layercache.timing.interleaved`: A B C ... A B C), so a slow phase of a shared machine hits them alike;
``ratio`` is, per variant, the median over rounds of its time over the time of the fastest original variant in
that same round. ``agreement`` is how often the variant's top-1 answer is the eager backbone's on ``x``.

Example::

    result = compare(backbone, cached, x, sample, batches=(1, 8), repeats=3)
    result.rows[0]["variant"], result.rows[0]["ms"]["1"], result.rows[0]["ratio"]["1"]
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from layercache.accel import ACCELERATIONS, AcceleratedModule, accelerate, accelerate_module, backbone_module
from layercache.errors import ConfigError
from layercache.progress import progress
from layercache.runtime import CachedModel
from layercache.timing import interleaved

logger = logging.getLogger(__name__)

__all__ = ["Alternatives", "compare", "KIND_NAMES"]

#: How tables call each kind.
KIND_NAMES = {"none": "eager", "channels_last": "channels_last", "compile": "compiled", "int8": "int8",
              "onnx": "ONNX Runtime"}  # fmt: skip
# Rows answered at a time when measuring agreement (the engines are built for batches up to this size).
_CHUNK = 128


@dataclass(frozen=True)
class Alternatives:
    """What :func:`compare` measured.

    Attributes:
        rows: one per variant, in the order built: ``variant`` (e.g. ``"compiled cached"``), ``kind``, ``model``
            (``original`` / ``cached``), ``engines`` (what runs its modules), ``build_s``, ``agreement``,
            ``ms`` and ``ratio`` per batch size (string keys, as in JSON), ``best_original`` per batch size.
        batches: the batch sizes timed.
        threads: torch's intra-op thread count while building and timing.
        n: rows the agreement is measured on.
    """

    rows: list[dict[str, Any]]
    batches: tuple[int, ...]
    threads: int
    n: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "batches": list(self.batches), "threads": self.threads, "n": self.n,
                "notes": self.notes}  # fmt: skip


def _engines(modules: Sequence[nn.Module]) -> list[str]:
    return sorted({m.engine if isinstance(m, AcceleratedModule) else "eager" for m in modules})


def _failures(name: str, modules: Sequence[nn.Module]) -> list[str]:
    """Notes of modules whose engine is not the one asked for (a failed quantization or export)."""
    return [f"{name}: {m.note}" for m in modules if isinstance(m, AcceleratedModule) and " failed" in m.note]


def _answers(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + _CHUNK]).argmax(1) for i in range(0, x.shape[0], _CHUNK)])


def compare(
    backbone: nn.Module,
    cached: CachedModel,
    x: torch.Tensor,
    sample: torch.Tensor,
    *,
    kinds: Sequence[str] = ("none", "compile", "int8", "onnx"),
    cached_kinds: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8, 32, 128),
    repeats: int = 5,
    rounds: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> Alternatives:
    """Time and score the original and the cached model on each engine of ``kinds``, side by side.

    Args:
        backbone: the original model (eval mode, CPU); accelerated as one traced graph (:func:`backbone_module`).
        cached: the eager cached model built for ``backbone``.
        x: the unseen inputs: batches are drawn from them and agreement is measured on all of them.
        sample: logged inputs (the archive's ``layercache_sample.pt``) the engines are built and calibrated on.
        kinds: engines for the original (:data:`~layercache.accel.ACCELERATIONS`).
        cached_kinds: engines for the cached model (default: ``kinds``).
        batches: batch sizes timed; the compiled engines are warmed up to the largest.
        repeats: fresh random batches per batch size, each timed ``rounds`` rounds.
        threads: torch threads while building and timing (restored after): dynamo and ONNX Runtime build for it.
        seed: which rows make the batches.

    Raises:
        ConfigError: an unknown kind, its package missing, or no batch sizes / repeats.
    """
    cached_kinds = tuple(kinds if cached_kinds is None else cached_kinds)
    for kind in (*kinds, *cached_kinds):
        if kind not in ACCELERATIONS:
            raise ConfigError(f"kind {kind!r} is not one of {ACCELERATIONS}")
    if not batches or repeats < 1 or rounds < 1:
        raise ConfigError(f"compare needs batch sizes and repeats, rounds >= 1; got {batches}, {repeats}, {rounds}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _compare(backbone, cached, x, sample, tuple(kinds), cached_kinds, tuple(batches), repeats, rounds, seed)
    finally:
        torch.set_num_threads(before)


def _compare(
    backbone: nn.Module,
    cached: CachedModel,
    x: torch.Tensor,
    sample: torch.Tensor,
    kinds: tuple[str, ...],
    cached_kinds: tuple[str, ...],
    batches: tuple[int, ...],
    repeats: int,
    rounds: int,
    seed: int,
) -> Alternatives:
    backbone = backbone.eval()
    traced = backbone_module(backbone)
    max_batch = max(batches)
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for model, kind in [("original", k) for k in kinds] + [("cached", k) for k in cached_kinds]:
        name = f"{KIND_NAMES[kind]} {model}"
        t0 = time.perf_counter()
        if model == "original":
            fn = backbone if kind == "none" else accelerate_module(traced, kind, sample, name=name, max_batch=max_batch)
            engines, modules = _engines([fn]), [fn]
        else:
            acc = accelerate(cached, kind, sample, max_batch=max_batch)
            modules = [*acc.segments, *acc.heads]
            fn, engines = acc.forward, _engines(modules)
        notes += _failures(name, modules)
        build_s = time.perf_counter() - t0
        logger.info("%s built in %.1f s (%s)", name, build_s, ", ".join(engines))
        calls[name] = fn
        rows.append({"variant": name, "kind": kind, "model": model, "engines": engines, "build_s": round(build_s, 1)})
    reference = _answers(backbone, x)
    for row in rows:
        row["agreement"] = float((_answers(calls[row["variant"]], x) == reference).float().mean())
    originals = [r["variant"] for r in rows if r["model"] == "original"]
    rng = np.random.default_rng(seed)
    for b in progress(batches, "alternatives"):
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            idx = torch.from_numpy(rng.choice(len(x), size=b, replace=len(x) < b))
            xb = x[idx].contiguous()
            with torch.inference_mode():
                t = interleaved({name: (lambda fn=fn, xb=xb: fn(xb)) for name, fn in calls.items()}, rounds=rounds)
            for name in calls:
                times[name] += t[name]
        best = min(originals, key=lambda n: statistics.median(times[n])) if originals else None
        for row in rows:
            mine = times[row["variant"]]
            row.setdefault("ms", {})[str(b)] = 1e3 * statistics.median(mine)
            row.setdefault("range_ms", {})[str(b)] = [1e3 * min(mine), 1e3 * max(mine)]
            row.setdefault("best_original", {})[str(b)] = best
            if best is not None:
                # Paired: each round's time over the best original's in the same round.
                row.setdefault("ratio", {})[str(b)] = statistics.median(
                    a / o for a, o in zip(mine, times[best], strict=True)
                )
    return Alternatives(rows, batches, torch.get_num_threads(), int(x.shape[0]), notes)
