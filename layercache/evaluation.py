"""Scoring answers: accuracy, agreement, exits taken, FLOPs from exits, latency percentiles, Markdown tables.

One definition of each for the build report, the demo and the benchmarks, whether the answers came over HTTP
(:func:`from_run`) or from the model in process (arrays of predictions and exit names). The edge cases, once:

* a failed request (no 200) has prediction ``-1`` and exit ``None``; it counts in ``failed`` and in no rate;
* an answer without the ``X-Layercache-Exit`` header (an archive that does not cache) was answered by the whole
  backbone: its exit is ``backbone``;
* agreement is over the rows both sides answered; accuracy over the answered rows;
* a rate over no rows is NaN, printed as ``n/a``.

Example::

    before, after = from_run(run_original), from_run(run_cached)
    summary = score(after, reference=before.predicted, labels=labels, costs=exit_flops(report))
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKBONE",
    "Answers",
    "exit_flops",
    "exit_table",
    "from_run",
    "markdown_table",
    "model_answers",
    "ms",
    "name_to_index",
    "pct",
    "percentile",
    "score",
    "summarize_latency",
]

#: The exit name of rows answered by the whole backbone.
BACKBONE = "backbone"
#: Prediction of a request that got no answer.
FAILED = -1


@dataclass(frozen=True)
class Answers:
    """Answers to N requests in request order.

    Attributes:
        predicted: ``(N,)`` class indices, ``-1`` for a failed request.
        exits: exit names (``backbone`` or a head's node), ``None`` for a failed request.
        latencies_s: seconds of each answered request (empty for in-process answers).
        seconds: wall time of the whole run (0 for in-process answers).
    """

    predicted: np.ndarray
    exits: tuple[str | None, ...]
    latencies_s: tuple[float, ...] = ()
    seconds: float = 0.0

    @classmethod
    def of(cls, predicted: Sequence[int] | np.ndarray, exits: Sequence[str] | None = None) -> Answers:
        """In-process answers: every row answered (``exits`` default: all ``backbone``)."""
        pred = np.asarray(predicted, dtype=np.int64).reshape(-1)
        return cls(pred, tuple(exits) if exits is not None else (BACKBONE,) * len(pred))

    @property
    def ok(self) -> np.ndarray:
        return self.predicted != FAILED

    @property
    def failed(self) -> int:
        return int((~self.ok).sum())

    def __len__(self) -> int:
        return len(self.predicted)


def from_run(run: Any) -> Answers:
    """Answers of an HTTP run (:class:`layercache.testing.load.Run`)."""
    pred, exits, lat = [], [], []
    for a in run.answers:
        ok = a.status == 200 and a.predicted is not None
        pred.append(int(a.predicted) if ok else FAILED)
        exits.append((a.exit or BACKBONE) if ok else None)
        if ok:
            lat.append(float(a.seconds))
    return Answers(np.asarray(pred, dtype=np.int64), tuple(exits), tuple(lat), float(run.seconds))


def _rate(hits: np.ndarray, over: np.ndarray) -> float:
    n = int(over.sum())
    return float((hits & over).sum()) / n if n else math.nan


def score(
    answers: Answers,
    *,
    reference: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    costs: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Accuracy, agreement with ``reference`` (e.g. the backbone's predictions), exit rates, mean FLOPs.

    Args:
        costs: FLOPs of a request by its exit (:func:`exit_flops`); without it no FLOPs are given.

    Returns:
        ``n``, ``failed``, ``accuracy`` (with ``labels``), ``agreement`` (with ``reference``), ``exit_rates``
        (over answered rows), ``mean_flops`` (with ``costs``).
    """
    ok = answers.ok
    out: dict[str, Any] = {"n": len(answers), "failed": answers.failed}
    if labels is not None:
        out["accuracy"] = _rate(answers.predicted == np.asarray(labels), ok)
    if reference is not None:
        ref = np.asarray(reference)
        out["agreement"] = _rate(answers.predicted == ref, ok & (ref != FAILED))
    answered = [e for e in answers.exits if e is not None]
    names, counts = np.unique(np.asarray(answered, dtype=object), return_counts=True) if answered else ((), ())
    out["exit_rates"] = {str(k): int(c) / len(answered) for k, c in zip(names, counts)}
    if costs is not None:
        out["mean_flops"] = float(np.mean([costs.get(e, costs[BACKBONE]) for e in answered])) if answered else math.nan
    return out


def exit_table(
    answers: Answers, nodes: Sequence[str], reference: np.ndarray, labels: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Paper Table 2: per exit, hit rate, cache accuracy (agreement among its hits), GT accuracy, accuracy effect.

    The accuracy effect is Eq. 2 as a drop over all rows: (hits the backbone got right and the exit wrong, minus the
    reverse) / N; positive means accuracy lost. GT columns are None without labels.
    """
    exits = np.asarray([e if e is not None else "" for e in answers.exits], dtype=object)
    pred, ref = answers.predicted, np.asarray(reference)
    n = len(pred)
    rows = []
    for k, node in enumerate(nodes):
        hit = exits == node
        row: dict[str, Any] = {
            "exit": k + 1,
            "node": node,
            "hit_rate": float(hit.mean()) if n else math.nan,
            "cache_accuracy": _rate(pred == ref, hit),
            "gt_accuracy": None,
            "effect": None,
        }
        if labels is not None:
            lab = np.asarray(labels)
            row["gt_accuracy"] = _rate(pred == lab, hit)
            worse = (hit & (ref == lab) & (pred != lab)).sum()
            better = (hit & (ref != lab) & (pred == lab)).sum()
            row["effect"] = float(worse - better) / n if n else math.nan
        rows.append(row)
    return rows


def exit_flops(report: Mapping[str, Any]) -> dict[str, float]:
    """FLOPs of one request by the exit it took (``X-Layercache-Exit`` value), from a build report.

    A request leaving at exit k ran the backbone up to that exit's node (``total - flops_remaining_k``) and the
    heads of exits 1..k; a request reaching the end (``backbone``) ran the whole backbone and every head. Heads
    with an infinite threshold never run and cost nothing.
    """
    total = float(report["mean_flops_original"])
    costs: dict[str, float] = {}
    heads = 0.0
    for e in report["exits"]:
        if not math.isfinite(float(e["threshold"])):
            continue
        heads += float(e["head_flops"])
        costs[e["node"]] = total - float(e["flops_remaining"]) + heads
    costs[BACKBONE] = total + heads
    return costs


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be in [0, 100]")
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_latency(answers: Answers) -> dict[str, Any]:
    """Requests per second over the run's wall time, latency percentiles (ms) of the answered requests, errors."""
    ok = [1e3 * s for s in answers.latencies_s]
    return {
        "requests": len(answers),
        "rps": len(answers) / answers.seconds if answers.seconds > 0 else float("nan"),
        "p50_ms": percentile(ok, 50),
        "p90_ms": percentile(ok, 90),
        "p99_ms": percentile(ok, 99),
        "mean_ms": statistics.fmean(ok) if ok else float("nan"),
        "errors": answers.failed,
    }


def name_to_index(index_to_name: Mapping[str, str]) -> dict[str, int]:
    """``index_to_name.json`` (``{"0": "T-shirt/top", ...}``) turned around: class name -> index."""
    return {str(name): int(i) for i, name in index_to_name.items()}


def pct(v: float | None) -> str:
    """A fraction as a percentage with two decimals; ``n/a`` for None or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def ms(v: float | None) -> str:
    """Milliseconds with one decimal; ``n/a`` for None or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f} ms"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines: the header, the rule, one line per row (cells as given, str() applied)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def model_answers(backbone: Any, cached: Any, x: Any, batch: int = 32) -> tuple[np.ndarray, Answers]:
    """In process: the backbone's top-1 over ``x`` and the cached model's answers (Algorithm 1 with shrinking, in
    batches of ``batch``) with the exit of each row."""
    import torch

    from layercache.runtime import exit_names

    with torch.inference_mode():
        reference = torch.cat([backbone(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1).cpu().numpy()
        outs = [cached.run(x[i : i + batch], "shrink") for i in range(0, len(x), batch)]
    predicted = torch.cat([o.logits for o in outs]).argmax(1).cpu().numpy()
    exits = exit_names(cached.nodes, torch.cat([o.exit_index for o in outs]).cpu())
    return reference, Answers.of(predicted, exits)
