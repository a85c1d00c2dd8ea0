"""Wall-clock timing of model calls on CPU or CUDA: the one timer the policy, the latency cost model and the
benchmarks share.

On CUDA, kernels run asynchronously: :func:`seconds` synchronises the device before starting the clock (so work
queued earlier is not billed to this call) and after the call (so all of its kernels are). Host syncs inside the
call (e.g. boolean indexing when a batch shrinks) are part of its cost and are measured as such.

Example::

    t = median_seconds(lambda: model(x), repeats=5, device=x.device)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from layercache.errors import ConfigError
from layercache.progress import progress

__all__ = ["interleaved", "latency_rows", "median_seconds", "seconds", "sync"]


def sync(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes, including the device work it queued."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_seconds(
    fn: Callable[[], Any], repeats: int = 5, *, warmup: int = 1, device: torch.device | str | None = None
) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Time every call once per round, in turn (A B C A B C ...), after ``warmup`` untimed rounds.

    Side by side in one process, slow drifts of a shared machine hit all calls alike, so their ratios hold even
    when absolute times wander.

    Returns:
        Seconds per call name, one entry per round.
    """
    if rounds < 1 or warmup < 0:
        raise ConfigError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds(fn, device))
    return times


def latency_rows(
    original: Callable[[Any], Any],
    cached: Callable[[Any], Any],
    x: torch.Tensor | Sequence[Any],
    repeats: int,
    *,
    seed: int = 0,
    batches: Sequence[int] = (1, 8, 16, 32, 64, 128),
) -> list[dict[str, Any]]:
    """Original vs cached per batch size: ``repeats`` fresh real batches, each timed 3 rounds, interleaved.

    ``x`` is the pool batches are drawn from: a tensor (a batch is its rows, on its device) or a sequence of
    requests (a batch is a list of them).

    Returns one row per batch size: medians and min-max in ms; ``ratio`` is the median over rounds of
    cached / original timed back to back in that round (a paired estimate: a slow phase of a shared machine hits
    both calls of a round alike), ``ratio_of_medians`` the ratio of the two medians.
    """
    rng = np.random.default_rng(seed)
    device = x.device if isinstance(x, torch.Tensor) else None
    rows = []
    for b in progress(batches, "latency"):
        ta: list[float] = []
        tb: list[float] = []
        for _ in range(repeats):
            idx = rng.choice(len(x), size=b, replace=len(x) < b)
            if isinstance(x, torch.Tensor):
                xb: Any = x[torch.from_numpy(idx).to(x.device)].contiguous()
            else:
                xb = [x[i] for i in idx]
            calls = {"a": lambda xb=xb: original(xb), "b": lambda xb=xb: cached(xb)}
            t = interleaved(calls, rounds=3, device=device)
            ta += t["a"]
            tb += t["b"]
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append(
            {
                "batch": b,
                "original_ms": 1e3 * ma,
                "cached_ms": 1e3 * mb,
                "ratio": statistics.median(tb_i / ta_i for ta_i, tb_i in zip(ta, tb, strict=True)),
                "ratio_of_medians": mb / ma,
                "original_range_ms": [1e3 * min(ta), 1e3 * max(ta)],
                "cached_range_ms": [1e3 * min(tb), 1e3 * max(tb)],
            }
        )
    return rows
