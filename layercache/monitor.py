"""Online verification and the guard: what a cached worker learns about its heads while it serves.

A share of cache hits (``verify_fraction``) also runs the rest of the backbone (:meth:`CachedModel.run`'s
``verify``): the head's answer is served all the same, and the backbone's tells whether the head agreed. Per head
the worker counts hits, verified hits and agreements; the agreement's lower confidence bound (Clopper-Pearson) and
an estimate of the whole cache's disagreement (the sum over heads of hit rate x (1 - agreement)) are reported as
TorchServe metrics and in the describe output, next to the tolerance the build certified.

The guard holds each head to the bound the build certified for it (``ExitSpec.certified["bound"]``: its
disagreement among its hits on rows the build never trained on). Every :data:`CHECK_EVERY` verified hits it asks
whether the last :data:`WINDOW` of them show, at confidence ``1 - GUARD_DELTA``, more disagreement than that bound
(their one-sided lower bound above it); a head that does is ``disable``d (answers nothing more) or gets a
``raise``d threshold, and the reason is logged once. Each check can fire falsely with probability at most
``GUARD_DELTA`` for a head exactly at its bound, less for the heads a build certifies (their true disagreement is
below the bound). Workers do not share memory: each guards on its own counts; the verified rows are recorded, so
the next build (and ``build_cache.py --check``) sees every worker's.

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

from layercache.certify import clopper_pearson_lower, clopper_pearson_upper
from layercache.config import CacheSpec
from layercache.runtime import CachedModel, CachedOutput

logger = logging.getLogger(__name__)

__all__ = ["CacheMonitor", "HeadMonitor"]

#: Verified hits a head's guard looks back on.
WINDOW = 1000
#: How often (verified hits) the guard checks a head, and the fewest verified hits it ever decides on.
CHECK_EVERY = 50
#: Chance of a false trip per check for a head exactly at its certified bound.
GUARD_DELTA = 0.001
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
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # (confidence, agreed) of verified hits
    _since_check: int = 0

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
            "reason": self.reason,
        }

    def trip(self, guard: str) -> float | None:
        """Check the window; returns the head's new threshold (``inf`` when disabled) when the guard fires."""
        if self.state == "disabled" or self._since_check < CHECK_EVERY or len(self.window) < CHECK_EVERY:
            return None
        self._since_check = 0
        conf = np.fromiter((c for c, _ in self.window), dtype=np.float64, count=len(self.window))
        agree = np.fromiter((a for _, a in self.window), dtype=bool, count=len(self.window))
        wrong = int((~agree).sum())
        lower = clopper_pearson_lower(wrong, len(agree), GUARD_DELTA)
        if lower <= self.bound:
            return None
        why = (
            f"{wrong} of its last {len(agree)} verified answers disagreed with the backbone: at least "
            f"{lower:.2%} at {1 - GUARD_DELTA:.1%} confidence, above the {self.bound:.2%} it was certified for"
        )
        if guard == "off":
            if not self.reason:
                logger.warning("head %s: %s (guard off: it keeps answering)", self.node, why)
            self.reason = why
            return None
        new = _raised(conf, agree, self.bound * _RAISE_MARGIN) if guard == "raise" else math.inf
        self.reason = why
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
    (and at least :data:`CHECK_EVERY` remain); ``inf`` when there is none."""
    order = np.argsort(-conf, kind="stable")
    wrong = np.cumsum(~agree[order])
    n = np.arange(1, len(order) + 1)
    ok = (wrong <= allowed * n) & (n >= CHECK_EVERY)
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
                        head.verified += n
                        head.agreed += int(agreed[v].sum())
                        head.window.extend(zip(conf[v].tolist(), agreed[v].tolist(), strict=True))
                        head._since_check += n
                        if head.trip(self.guard) is not None:
                            fired.append(head.node)
            if fired:
                self.model = self.model.with_thresholds([h.threshold for h in self.heads])
        return fired

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
