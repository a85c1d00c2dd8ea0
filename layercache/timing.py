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
from collections.abc import Callable, Mapping
from typing import Any

import torch

from layercache.errors import ConfigError

__all__ = ["interleaved", "median_seconds", "seconds", "sync"]


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
