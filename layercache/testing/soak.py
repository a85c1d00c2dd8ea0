"""A soak: closed-loop load on a served model for a while, watching what should not grow.

While ``concurrency`` clients keep sending, every ``sample_s`` seconds the soak records the workers' resident memory
and open file descriptors (from ``/proc``) and the log dir's size on disk; optional actions run at given times
(swap a version, roll back, scale workers) under that load. Bounded: it stops after ``seconds``, whatever happens,
and only talks to the server it is given (loopback in tests and benchmarks).

Example::

    result = soak(url, bodies, names, seconds=60, concurrency=8, pids=lambda: server.worker_pids("m"))
    assert result.errors == 0 and result.rss_growth < 0.10
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layercache.testing.load import Answer, predict

__all__ = ["Sample", "SoakResult", "soak"]


@dataclass(frozen=True)
class Sample:
    """One look at the server: seconds since the start, answers so far, each worker's RSS (bytes) and open fds, the
    log dir's bytes on disk."""

    t: float
    answered: int
    rss: dict[int, int]
    fds: dict[int, int]
    log_bytes: int


@dataclass
class SoakResult:
    """What a soak saw."""

    answers: list[Answer] = field(default_factory=list)
    #: When each answer came back, in seconds from the start (same order as ``answers``).
    done_at: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    actions: list[tuple[float, str]] = field(default_factory=list)
    seconds: float = 0.0
    warmup_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(a.status != 200 for a in self.answers)

    def errors_between(self, start: float, end: float) -> int:
        """Failed requests whose answer (or time-out) came back between ``start`` and ``end`` seconds."""
        return sum(a.status != 200 and start <= t <= end for a, t in zip(self.answers, self.done_at, strict=True))

    @property
    def rps(self) -> float:
        return len(self.answers) / self.seconds if self.seconds else 0.0

    def _warm(self) -> dict[int, list[Sample]]:
        """Per worker, the samples from the end of its own warm-up on: ``warmup_s`` after the soak's start for the
        workers there from the start, ``warmup_s`` after it first shows up for one a scale-up started later (its
        first requests grow its memory as they did the first workers')."""
        first: dict[int, float] = {}
        warm: dict[int, list[Sample]] = {}
        for s in self.samples:
            for pid in s.rss:
                first.setdefault(pid, s.t if s.t > self.samples[0].t else 0.0)
                if s.t >= first[pid] + self.warmup_s:
                    warm.setdefault(pid, []).append(s)
        return warm

    def _growth(self, attr: str) -> tuple[float, int]:
        """The largest relative and absolute growth of ``attr`` of one worker over its value when it was warm."""
        rel, absolute = 0.0, 0
        for pid, samples in self._warm().items():
            base = getattr(samples[0], attr).get(pid, 0)
            for s in samples[1:]:
                v = getattr(s, attr).get(pid, 0)
                if base and v:
                    rel = max(rel, v / base - 1.0)
                    absolute = max(absolute, v - base)
        return rel, absolute

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: when it was seen, and its RSS (MB) when warm, at its last sample and at most."""
        out = []
        for pid, samples in self._warm().items():
            rss = [s.rss[pid] for s in samples if s.rss.get(pid)]
            if not rss:
                continue
            out.append(
                {
                    "pid": pid,
                    "warm_at_s": round(samples[0].t, 1),
                    "last_s": round(samples[-1].t, 1),
                    "rss_mb_warm": round(rss[0] / 2**20, 1),
                    "rss_mb_last": round(rss[-1] / 2**20, 1),
                    "rss_mb_max": round(max(rss) / 2**20, 1),
                    "growth": round(max(rss) / rss[0] - 1.0, 4),
                }
            )
        return out

    @property
    def rss_growth(self) -> float:
        """Largest growth of a worker's RSS after its warm-up, as a fraction of its value then."""
        return self._growth("rss")[0]

    @property
    def fd_growth(self) -> int:
        """Largest growth of a worker's open file descriptors after warm-up."""
        return self._growth("fds")[1]

    @property
    def max_log_bytes(self) -> int:
        return max((s.log_bytes for s in self.samples), default=0)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "requests": len(self.answers),
            "rps": round(self.rps, 1),
            "errors": self.errors,
            "rss_growth": round(self.rss_growth, 4),
            "rss_mb_max": round(max((max(s.rss.values(), default=0) for s in self.samples), default=0) / 2**20, 1),
            "fd_growth": self.fd_growth,
            "max_log_mb": round(self.max_log_bytes / 2**20, 2),
            "actions": [f"{t:.0f} s: {name}" for t, name in self.actions],
            "workers": self.workers(),
        }


def _proc(pid: int) -> tuple[int, int]:
    """RSS bytes and open fds of a process (0, 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    return rss, fds


def _dir_bytes(path: Path | None) -> int:
    if path is None or not Path(path).is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def soak(
    url: str,
    bodies: Sequence[bytes],
    names: dict[str, int],
    *,
    seconds: float,
    concurrency: int,
    pids: Callable[[], list[int]],
    log_dir: Path | None = None,
    sample_s: float = 2.0,
    warmup_s: float = 10.0,
    actions: Sequence[tuple[float, str, Callable[[], Any]]] = (),
    token: str | None = None,
) -> SoakResult:
    """Load ``url`` for ``seconds`` with ``concurrency`` closed-loop clients; sample memory, fds and the log dir.

    Args:
        pids: the worker processes to watch, asked at every sample (they change when workers are scaled).
        actions: ``(at seconds, name, call)`` run in order under load (e.g. a swap); their failures raise.
        token: inference token for servers with token authorization on.
    """
    if concurrency < 1 or seconds <= 0:
        raise ValueError(f"concurrency={concurrency} and seconds={seconds} must be positive")
    result = SoakResult(warmup_s=warmup_s)
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + seconds

    def client(k: int) -> None:
        i = k
        while not stop.is_set() and time.monotonic() < deadline:
            kwargs = {"token": token} if token else {}
            answer = predict(url, bodies[i % len(bodies)], names, **kwargs)
            with lock:
                result.answers.append(answer)
                result.done_at.append(time.monotonic() - t0)
            i += concurrency

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    pending = sorted(actions, key=lambda a: a[0])
    next_sample = t0
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if pending and now - t0 >= pending[0][0]:
                at, name, call = pending.pop(0)
                call()
                result.actions.append((time.monotonic() - t0, name))
                continue
            if now >= next_sample:
                procs = {p: _proc(p) for p in pids()}
                procs = {p: v for p, v in procs.items() if v[0]}
                with lock:
                    answered = len(result.answers)
                rss = {p: v[0] for p, v in procs.items()}
                fds = {p: v[1] for p, v in procs.items()}
                result.samples.append(Sample(now - t0, answered, rss, fds, _dir_bytes(log_dir)))
                next_sample = now + sample_s
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=40)
        result.seconds = time.monotonic() - t0
    return result
