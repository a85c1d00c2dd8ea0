"""Online verification and the guard: what a cached worker learns about its heads while it serves.

A share of cache hits (``verify_fraction``) also runs the rest of the backbone (:meth:`CachedModel.run`'s
``verify``): the head's answer is served all the same, and the backbone's tells whether the head agreed. Per head
the worker counts hits, verified hits and agreements; the agreement's lower confidence bound (Clopper-Pearson) and
an estimate of the whole cache's disagreement (the sum over heads of hit rate x (1 - agreement)) are reported as
TorchServe metrics and in the describe output, next to the tolerance the build certified.

The guard holds each head to the bound the build certified for it (``ExitSpec.certified["bound"]``: its
disagreement among its hits on rows the build never trained on). After every batch with verified hits it weighs the
head's verified answers as a sequential test (:func:`layercache.certify.excess_evidence`, an e-value that may be
looked at after every answer): a head whose verified answers are all wrong trips after a handful of them, one just
above its bound after enough of them. A head that trips is ``disable``d (answers nothing more) or gets a ``raise``d
threshold, and the reason is logged once. The evidence restarts every :data:`EPOCH` verified answers, so a head
that goes wrong late is caught almost as fast as one wrong from the start; epoch ``e`` trips at ``e (e + 1) /
GUARD_DELTA``, so a head within its bound trips falsely with probability at most :data:`GUARD_DELTA` over the
worker's whole life (Ville's inequality, summed over epochs). Workers do not share memory: each guards on its own
counts; the verified rows are recorded, so the next build (and ``build_cache.py --check``) sees every worker's.

Example::

    monitor = CacheMonitor.create(model, spec, guard="disable")
    out = monitor.model.run(x, verify=0.02)
    monitor.observe(out)            # may swap monitor.model for one with a head disabled
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layercache.certify import clopper_pearson_upper, excess_evidence
from layercache.config import CacheSpec
from layercache.runtime import CachedModel, CachedOutput

logger = logging.getLogger(__name__)

__all__ = ["CacheMonitor", "HeadMonitor"]

#: Verified answers per epoch of the guard's evidence, and the most a raised threshold is chosen on.
EPOCH = 1000
#: Chance that the guard ever trips, over a worker's life, on a head whose disagreement is within its bound.
GUARD_DELTA = 0.001
#: Fewest verified answers a raised threshold is chosen on; a head that trips on fewer is disabled.
MIN_RAISE = 50
#: Confidence level of the reported live bounds.
REPORT_DELTA = 0.05
# A raised threshold must keep the window's point disagreement at this share of the head's bound.
_RAISE_MARGIN = 0.5


@dataclass
class HeadMonitor:
    """One head's live counts and guard state (mutable, one per worker)."""

    node: str
    bound: float
    threshold: float
    hits: int = 0
    verified: int = 0
    agreed: int = 0
    state: str = "active"
    reason: str = ""
    window: deque = field(default_factory=lambda: deque(maxlen=EPOCH))  # (confidence, agreed) of verified hits
    epoch: int = 1
    epoch_verified: int = 0
    epoch_wrong: int = 0

    @property
    def agreement(self) -> float:
        return self.agreed / self.verified if self.verified else math.nan

    def describe(self, rows: int) -> dict[str, Any]:
        wrong = self.verified - self.agreed
        return {
            "node": self.node,
            "state": self.state,
            "threshold": self.threshold,
            "hits": self.hits,
            "hit_rate": self.hits / rows if rows else 0.0,
            "verified": self.verified,
            "agreement": self.agreement,
            "agreement_lower_bound": 1.0 - clopper_pearson_upper(wrong, self.verified, REPORT_DELTA),
            "certified_disagreement_bound": self.bound,
            "guard_evidence": round(self.evidence, 3),
            "guard_trips_at": round(self.trips_at, 3),
            "reason": self.reason,
        }

    @property
    def evidence(self) -> float:
        """Log e-value of this epoch's verified answers against a disagreement within the certified bound."""
        return excess_evidence(self.epoch_wrong, self.epoch_verified, self.bound)

    @property
    def trips_at(self) -> float:
        """The log e-value at which the guard trips in this epoch: ``log(e (e + 1) / GUARD_DELTA)``."""
        return math.log(self.epoch * (self.epoch + 1) / GUARD_DELTA)

    def add(self, confidence: Sequence[float], agreed: Sequence[bool]) -> None:
        """Count verified answers (the head's confidence on each, and whether it agreed with the backbone)."""
        self.verified += len(agreed)
        self.agreed += int(sum(agreed))
        self.window.extend(zip(confidence, agreed, strict=True))
        self.epoch_verified += len(agreed)
        self.epoch_wrong += len(agreed) - int(sum(agreed))

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_verified = self.epoch_wrong = 0

    def trip(self, guard: str) -> float | None:
        """Weigh this epoch's verified answers; returns the head's new threshold (``inf`` when disabled) when the
        guard fires."""
        if self.state == "disabled" or not self.epoch_verified:
            return None
        if self.evidence < self.trips_at:
            if self.epoch_verified >= EPOCH:
                self._next_epoch()
            return None
        wrong, n = self.epoch_wrong, self.epoch_verified
        why = (
            f"{wrong} of its {n} latest verified answers disagreed with the backbone, more than the {self.bound:.2%} "
            f"it was certified for allows (sequential test; a head within its bound trips with chance at most "
            f"{GUARD_DELTA:.1%})"
        )
        if guard == "off":
            if not self.reason:
                logger.warning("head %s: %s (guard off: it keeps answering)", self.node, why)
            self.reason = why
            return None
        new = math.inf
        if guard == "raise" and len(self.window) >= MIN_RAISE:
            conf = np.fromiter((c for c, _ in self.window), dtype=np.float64, count=len(self.window))
            agree = np.fromiter((a for _, a in self.window), dtype=bool, count=len(self.window))
            new = _raised(conf, agree, self.bound * _RAISE_MARGIN)
        self.reason = why
        self._next_epoch()
        if math.isfinite(new) and new > self.threshold:
            logger.warning("head %s: %s; threshold raised %.4f -> %.4f", self.node, why, self.threshold, new)
            self.state, self.threshold = "raised", new
            self.window.clear()
        else:
            logger.warning("head %s: %s; disabled (it answers nothing more; verification goes on)", self.node, why)
            self.state, self.threshold = "disabled", math.inf
        return self.threshold


def _raised(conf: np.ndarray, agree: np.ndarray, allowed: float) -> float:
    """The lowest confidence above which the window's verified answers disagree on at most ``allowed`` of them
    (and at least :data:`MIN_RAISE` remain); ``inf`` when there is none."""
    order = np.argsort(-conf, kind="stable")
    wrong = np.cumsum(~agree[order])
    n = np.arange(1, len(order) + 1)
    ok = (wrong <= allowed * n) & (n >= MIN_RAISE)
    if not ok.any():
        return math.inf
    last = int(np.nonzero(ok)[0].max())
    return float(np.nextafter(conf[order][last], -math.inf)) if last + 1 < len(order) else float(conf[order][last])


class CacheMonitor:
    """The live model of a cached worker and what verification says about each of its heads.

    Thread-safe: TorchServe calls ``handle`` from one thread, the describe call can come from another.
    """

    def __init__(self, model: CachedModel, heads: Sequence[HeadMonitor], tolerance: float, guard: str) -> None:
        self.model = model
        self.heads = list(heads)
        self.tolerance = tolerance
        self.guard = guard
        self.rows = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, model: CachedModel, spec: CacheSpec, guard: str) -> CacheMonitor:
        """Monitors for the heads of ``model``, held to the bounds ``spec`` certified (the tolerance itself for
        caches built before certification)."""
        heads = [
            HeadMonitor(e.node, float(e.certified.get("bound", spec.tolerance or 1.0)), t)
            for e, t in zip(spec.exits, model.thresholds, strict=True)
        ]
        return cls(model, heads, spec.tolerance, guard)

    def observe(self, out: CachedOutput) -> list[str]:
        """Count one batch; returns the nodes whose guard fired (the model then has their new thresholds)."""
        exits = out.exit_index.cpu().numpy()
        fired = []
        with self._lock:
            self.rows += len(exits)
            if out.verified is not None and self.heads:
                verified = out.verified.cpu().numpy()
                agreed = (out.backbone_pred == out.logits.argmax(1)).cpu().numpy()
                conf = out.confidence.cpu().numpy() if out.confidence is not None else np.full(len(exits), np.nan)
                for k, head in enumerate(self.heads):
                    mine = exits == k
                    head.hits += int(mine.sum())
                    v = mine & verified
                    n = int(v.sum())
                    if n:
                        head.add(conf[v].tolist(), agreed[v].tolist())
                        if head.trip(self.guard) is not None:
                            fired.append(head.node)
            if fired:
                self.model = self.model.with_thresholds([h.threshold for h in self.heads])
        return fired

    def verify_shares(self, base: float) -> list[float]:
        """Per head, the share of its hits to verify. Half of the budget (``base`` of all hits) is spread evenly over
        the hits, half evenly over the heads: ``base / 2 + base / (2 K x its share of the hits)``, at most 1. So
        ``base`` of all hits are verified at most (``verify_fraction`` is the cost it says), a head with an even
        share of the hits is verified at ``base``, and a head that answers rarely gets a larger share, at least half
        the verified answers an even split over the heads gives it: the guard has evidence on it within a few
        hundred requests instead of a few thousand. The shares depend only on the hit counts, never on whether an
        answer was right, so every head's verified answers stay a fair sample of its hits (and
        ``build_cache.py --check`` weighs each head by its own hit rate). A head the guard disabled answers nothing
        more: it gets share 0 and leaves the split to the heads that still answer (counting its past hits or its
        place among the heads would overspend or underspend the budget)."""
        with self._lock:
            hits = {i: h.hits for i, h in enumerate(self.heads) if h.state != "disabled"}
        total, k = sum(hits.values()), len(hits)
        shares = [0.0] * len(self.heads)
        if base <= 0:
            return shares
        for i, n in hits.items():
            if not total:  # no hits yet: every head that answers at the base
                shares[i] = base
            else:
                shares[i] = min(1.0, base / 2 + base * total / (2 * k * n)) if n else 1.0
        return shares

    def estimated_disagreement(self) -> float:
        """Sum over heads of hit rate x (1 - live agreement); heads without verified hits count as certified."""
        if not self.rows:
            return 0.0
        total = 0.0
        for h in self.heads:
            rate = h.hits / self.rows
            disagreement = 1.0 - h.agreement if h.verified else h.bound
            total += rate * disagreement
        return total

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows": self.rows,
                "guard": self.guard,
                "certified_tolerance": self.tolerance,
                "estimated_disagreement": self.estimated_disagreement(),
                "heads": [h.describe(self.rows) for h in self.heads],
            }
