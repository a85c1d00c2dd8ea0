"""The offline build (paper section 4): logs -> candidates -> head search and training -> calibration and
thresholds -> subset selection -> a :class:`~layercache.config.CacheSpec` and the selected heads.

Only logged traffic is used: the preprocessed inputs are replayed through the frozen backbone to get the
activations at every candidate layer and the backbone's output distribution (the distillation target). Labels,
when the log has them, are used for the report only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from layercache.calibration import budget_thresholds, confidences, fit_temperature, poisson_upper_bound
from layercache.config import CacheSpec, ExitSpec
from layercache.errors import ConfigError, LogError
from layercache.graph import Candidate, describe_nodes, find_candidates, split
from layercache.heads import HeadSpec, build_head, head_flops, prepool, prepool_size, search_space
from layercache.runtime import weights_fingerprint
from layercache.selection import (
    HeadEval,
    Selection,
    best_subset,
    evaluate_cascade,
    hindsight_thresholds,
    oracle_cost,
)
from layercache.timing import median_seconds
from layercache.trafficlog import decode_inputs, decode_probs
from layercache.training import TrainConfig, predict_logits, train_head

logger = logging.getLogger(__name__)
T = TypeVar("T")

COSTS = ("flops", "latency")


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build (the CLI flags of ``tools/build_cache.py``).

    Attributes:
        tolerance: accepted drop in accuracy (fraction, 0.01 = one point), split over the heads as tolerance/2^n.
        splits: train / validation / test fractions of the logged rows (paper: 50/20/30).
        seed: seed of the split, head initialisation and shuffling.
        max_spatial: activations are average-pooled to at most this size before heads see them.
        trials: head architectures tried per candidate layer (the cheapest pooled-linear head is always one).
        train: head training settings.
        cost: subset selection by ``flops`` or by measured ``latency`` on this device.
        min_remaining_fraction: candidate layers with less of the backbone after them are dropped.
        max_candidates: at most this many candidate layers (exact subset search is 2^n).
        nodes: explicit candidate layers (fx node names); ``None`` finds them automatically.
        replay_batch: batch size for replaying logged inputs through the backbone.
        latency_batch: batch size at which ``--cost latency`` times segments and heads.
        margin_z: thresholds keep an upper confidence bound on the wrong hits within each head's budget (exact
            Poisson bound at the level of a standard normal z, 1.28 = 90%: ``calibration.poisson_upper_bound``), so
            the drop measured on a finite validation split also holds on unseen traffic (0: Eq. 3 as is).
        max_head_fraction: heads costing more than this fraction of the FLOPs after their layer are not tried.
        max_head_flops: nor heads above this many FLOPs per sample (bounds training time on a CPU).
    """

    tolerance: float = 0.01
    splits: tuple[float, float, float] = (0.5, 0.2, 0.3)
    seed: int = 0
    max_spatial: int = 8
    trials: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, patience=3, num_threads=1))
    cost: str = "flops"
    min_remaining_fraction: float = 0.1
    max_candidates: int = 12
    nodes: tuple[str, ...] | None = None
    replay_batch: int = 256
    latency_batch: int = 32
    margin_z: float = 1.28
    max_head_fraction: float = 0.02
    max_head_flops: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance={self.tolerance} must be in (0, 1); e.g. 0.01 for one accuracy point")
        if len(self.splits) != 3 or any(s <= 0 for s in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            raise ConfigError(f"splits={self.splits} must be three positive fractions summing to 1")
        if self.cost not in COSTS:
            raise ConfigError(f"cost={self.cost!r} must be one of {COSTS}")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials} must be >= 1")


@dataclass
class CandidateResult:
    """What the search found at one candidate layer."""

    candidate: Candidate
    spec: HeadSpec | None = None
    head: nn.Module | None = None
    temperature: float = 1.0
    val_agreement: float = 0.0
    head_flops: int = 0
    head_params: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)
    discarded: str | None = None
    val_eval: HeadEval | None = None
    test_eval: HeadEval | None = None
    test_curve: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # split -> (confidence, class)


@dataclass
class BuildResult:
    """The built cache and everything the report needs."""

    spec: CacheSpec
    heads: list[nn.Module]
    candidates: list[CandidateResult]
    selection: Selection
    report: dict[str, Any]


Progress = Callable[[Iterable[T], str], Iterable[T]]


def _no_progress(it: Iterable[T], desc: str) -> Iterable[T]:
    return it


def split_indices(n: int, splits: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/val/test row indices (seeded permutation)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(splits[0] * n))
    n_val = int(round(splits[1] * n))
    return np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_val]), np.sort(perm[n_train + n_val :])


def labels_to_index(labels: Sequence[str | None], index_to_name: dict[str, str] | None) -> np.ndarray | None:
    """GT labels as class indices: digits are indices, names are looked up in ``index_to_name.json``.

    Returns ``None`` when any row lacks a usable label (GT columns of the report are then left out).
    """
    if not labels or any(lbl is None for lbl in labels):
        return None
    name_to_index = {str(v): int(k) for k, v in (index_to_name or {}).items()}
    out = np.empty(len(labels), dtype=np.int64)
    for i, lbl in enumerate(labels):
        s = str(lbl)
        if s in name_to_index:
            out[i] = name_to_index[s]
        elif s.isdigit():
            out[i] = int(s)
        else:
            logger.warning("label %r is neither a class index nor a class name; GT accuracy is not reported", s)
            return None
    return out


@torch.inference_mode()
def replay(
    backbone: nn.Module,
    inputs: np.ndarray,
    nodes: Sequence[str],
    *,
    max_spatial: int,
    batch_size: int,
    progress: Progress = _no_progress,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run logged inputs through the backbone split at ``nodes``.

    Returns:
        ``acts[node]``: float16 activations pre-pooled to at most ``max_spatial`` (see :func:`prepool_size`),
        and the backbone's logits ``(N, K)`` in float32.
    """
    segments = split(backbone, list(nodes))
    n = inputs.shape[0]
    acts: dict[str, torch.Tensor] = {}
    logits_out: torch.Tensor | None = None
    for start in progress(range(0, n, batch_size), "replay"):
        h = torch.from_numpy(inputs[start : start + batch_size]).float()
        for i, seg in enumerate(segments):
            h = seg(h)
            if i < len(nodes):
                p = prepool(h, prepool_size(h.shape[-1], max_spatial)) if h.dim() == 4 else h
                if nodes[i] not in acts:
                    acts[nodes[i]] = torch.empty((n, *p.shape[1:]), dtype=torch.float16)
                acts[nodes[i]][start : start + p.shape[0]] = p.half()
        if logits_out is None:
            logits_out = torch.empty((n, h.shape[1]), dtype=torch.float32)
        logits_out[start : start + h.shape[0]] = h.float()
    assert logits_out is not None
    return acts, logits_out


def policy_sample(table: pa.Table, max_rows: int = 256, max_bytes: int = 8 * 2**20, seed: int = 0) -> torch.Tensor:
    """Logged inputs, drawn at random, that ship in the cached ``.mar`` so a worker can time its policy at startup.

    At most ``max_rows`` rows and ``max_bytes`` bytes (float16, at least one row); only the drawn rows are decoded.

    Raises:
        LogError: the table has no rows (or inputs of several shapes, see :func:`decode_inputs`).
    """
    n = table.num_rows
    if n == 0:
        raise LogError("no logged inputs to sample for the policy")
    row_bytes = 2 * int(np.prod(decode_inputs(table.slice(0, 1)).shape[1:]))
    k = max(1, min(max_rows, n, max_bytes // max(row_bytes, 1)))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return torch.from_numpy(decode_inputs(table.take(pa.array(rows)))).half()


def pick_trials(space: Sequence[HeadSpec], trials: int) -> list[HeadSpec]:
    """``trials`` specs spread evenly over the (cheapest-first) search space; the cheapest is always tried."""
    if trials >= len(space):
        return list(space)
    idx = np.unique(np.linspace(0, len(space) - 1, trials).round().astype(int))
    return [space[i] for i in idx]


def affordable_space(cand: Candidate, num_classes: int, config: BuildConfig) -> list[HeadSpec]:
    """The search space at ``cand`` without heads too costly for the FLOPs they could save (or to train)."""
    cap = min(config.max_head_fraction * cand.flops_remaining, config.max_head_flops)
    space = search_space(cand.shape, num_classes, config.max_spatial)
    kept = [s for s in space if head_flops(s, cand.shape, num_classes) <= cap]
    return kept or space[:1]


@torch.inference_mode()
def measure_latency(
    backbone: nn.Module, nodes: Sequence[str], heads: dict[str, nn.Module], example: torch.Tensor, batch: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Seconds per sample, at ``batch``, of the backbone after each node (C2) and of each head (C1)."""
    segments = split(backbone, list(nodes))
    x = example.expand(batch, *example.shape[1:]).contiguous()
    seg_times = []
    inputs = []
    h = x
    for seg in segments:
        inputs.append(h)
        seg_times.append(median_seconds(lambda s=seg, i=h: s(i)) / batch)
        h = seg(h)
    rest = {node: float(sum(seg_times[i + 1 :])) for i, node in enumerate(nodes)}
    head_t = {}
    for node, m in heads.items():
        act = inputs[list(nodes).index(node) + 1]
        head_t[node] = median_seconds(lambda m=m, a=act: m(a)) / batch
    return rest, head_t, float(sum(seg_times))


def _curve(conf: np.ndarray, correct: np.ndarray, gt_correct: np.ndarray | None) -> dict[str, list[float]]:
    grid = np.linspace(0.0, 1.0, 51)
    hr, ca, ga = [], [], []
    for t in grid:
        hit = conf >= t
        hr.append(float(hit.mean()))
        ca.append(float(correct[hit].mean()) if hit.any() else float("nan"))
        if gt_correct is not None:
            ga.append(float(gt_correct[hit].mean()) if hit.any() else float("nan"))
    out = {"threshold": grid.tolist(), "hit_rate": hr, "cache_accuracy": ca}
    if gt_correct is not None:
        out["gt_accuracy"] = ga
    return out


def search_candidate(
    cand: Candidate,
    x: torch.Tensor,
    targets: torch.Tensor,
    backbone_pred: torch.Tensor,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    config: BuildConfig,
) -> CandidateResult:
    """Search, train, calibrate and score heads at one candidate layer (sections 4.2-4.3)."""
    tr, va, _ = idx
    res = CandidateResult(candidate=cand)
    space = affordable_space(cand, num_classes, config)
    x_tr, x_va = x[tr].float(), x[va].float()
    p_tr, p_va = targets[tr], targets[va]
    pred_va = backbone_pred[va].numpy()
    chance = max(1.0 / num_classes, float(np.bincount(pred_va, minlength=num_classes).max() / len(pred_va)))
    best_score = -math.inf
    for spec in pick_trials(space, config.trials):
        torch.manual_seed(config.seed)
        head = build_head(spec, cand.shape, num_classes)
        t0 = time.perf_counter()
        result = train_head(head, x_tr, p_tr, x_va, p_va, config.train)
        logits = predict_logits(head, x_va)
        temp = fit_temperature(logits, torch.from_numpy(pred_va))
        conf, pred = confidences(logits, temp)
        correct = pred == pred_va
        thr = budget_thresholds(conf, correct, config.tolerance, max_position=1, z=config.margin_z)[0]
        coverage = float((conf >= thr).mean()) if math.isfinite(thr) else 0.0
        flops = head_flops(spec, cand.shape, num_classes)
        # Expected FLOPs saved per row if this head were first in the cascade (accuracy vs cost, Eq. 4 per row).
        score = coverage * cand.flops_remaining - flops
        agreement = float(correct.mean())
        res.trials.append(
            {
                "head": spec.id(),
                "val_agreement": agreement,
                "coverage": coverage,
                "head_flops": flops,
                "score": score,
                "epochs": result.epochs_run,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        logger.info(
            "%s %s: agreement %.3f, coverage %.3f, %.2f MFLOPs, %d epochs, %.1f s",
            cand.node,
            spec.id(),
            agreement,
            coverage,
            flops / 1e6,
            result.epochs_run,
            time.perf_counter() - t0,
        )
        if agreement <= chance + 0.01:
            continue
        if score > best_score:
            best_score = score
            res.spec, res.head, res.temperature = spec, head, temp
            res.val_agreement, res.head_flops = agreement, flops
            res.head_params = sum(p.numel() for p in head.parameters())
    if res.head is None:
        res.discarded = f"no head beat chance ({chance:.3f}) on the validation split"
    return res


@dataclass
class SearchState:
    """Everything the heads' search produced; :func:`finalize` turns it into a cache for one tolerance."""

    config: BuildConfig
    results: list[CandidateResult]
    nodes: list[str]
    backbone_pred: np.ndarray
    labels: np.ndarray | None
    idx: tuple[np.ndarray, np.ndarray, np.ndarray]
    total_flops: float
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    fidelity: dict[str, Any]
    latency: tuple[dict[str, float], dict[str, float]] | None
    backbone_bytes: int
    seconds: float

    @property
    def kept(self) -> list[CandidateResult]:
        return [r for r in self.results if r.head is not None]


def search(
    backbone: nn.Module,
    table: pa.Table,
    config: BuildConfig,
    *,
    index_to_name: dict[str, str] | None = None,
    progress: Progress = _no_progress,
) -> SearchState:
    """Candidates, replay, head search/training/calibration at every candidate (sections 4.1-4.3).

    Raises:
        LogError: too few rows, or inputs of several shapes.
        GraphError: the backbone cannot be traced (see the hint in the message).
    """
    t_start = time.perf_counter()
    backbone.eval()
    n = table.num_rows
    if n < 50:
        raise LogError(f"only {n} logged requests; a build needs at least 50 (thousands for a useful cache)")
    inputs = decode_inputs(table)
    example = torch.from_numpy(inputs[:1]).float()
    if config.nodes:
        cands = describe_nodes(backbone, example, list(config.nodes))
    else:
        cands = find_candidates(
            backbone,
            example,
            min_remaining_fraction=config.min_remaining_fraction,
            max_candidates=config.max_candidates,
        )
    nodes = [c.node for c in cands]
    logger.info("candidate layers: %s", ", ".join(nodes) or "(none)")
    acts, logits = replay(
        backbone, inputs, nodes, max_spatial=config.max_spatial, batch_size=config.replay_batch, progress=progress
    )
    targets = F.softmax(logits, dim=1)
    backbone_pred = logits.argmax(dim=1)
    fingerprint = weights_fingerprint(backbone)
    labels = None
    if "label" in table.column_names:
        labels = labels_to_index(table.column("label").to_pylist(), index_to_name)
    idx = split_indices(n, config.splits, config.seed)
    _, va, te = idx
    results: list[CandidateResult] = []
    for cand in progress(cands, "heads"):
        res = search_candidate(cand, acts[cand.node], targets, backbone_pred, idx, int(logits.shape[1]), config)
        if res.head is not None:
            for name, rows in (("val", va), ("test", te)):
                res.scores[name] = confidences(predict_logits(res.head, acts[cand.node][rows].float()), res.temperature)
        results.append(res)
        del acts[cand.node]  # free as we go: peak memory is the replayed activations, not the training
    kept = [r for r in results if r.head is not None]
    latency = None
    if config.cost == "latency" and kept:
        rest_t, head_t, _ = measure_latency(
            backbone, nodes, {r.candidate.node: r.head for r in kept}, example, config.latency_batch
        )
        latency = (rest_t, head_t)
    return SearchState(
        config=config,
        results=results,
        nodes=nodes,
        backbone_pred=backbone_pred.numpy(),
        labels=labels,
        idx=idx,
        total_flops=float(cands[0].flops_prefix + cands[0].flops_remaining) if cands else 0.0,
        num_classes=int(logits.shape[1]),
        input_shape=tuple(inputs.shape[1:]),
        fingerprint=fingerprint,
        fidelity=_replay_fidelity(table, backbone_pred.numpy(), fingerprint),
        latency=latency,
        backbone_bytes=sum(t.numel() * t.element_size() for t in backbone.state_dict().values()),
        seconds=time.perf_counter() - t_start,
    )


def min_tolerance(n_val: int, margin_z: float) -> float:
    """Smallest tolerance at which a head can answer at all: the first cascade position's budget (tolerance/2) must
    cover the upper bound of zero wrong hits on ``n_val`` validation rows (2.30 rows at z = 1.28). 0 without margin.
    """
    if margin_z <= 0:
        return 0.0
    if n_val < 1:
        raise ConfigError(f"n_val must be >= 1, got {n_val}")
    return 2.0 * float(poisson_upper_bound(np.zeros(1), margin_z)[0]) / n_val


def finalize(state: SearchState, tolerance: float | None = None) -> BuildResult:
    """Thresholds for ``tolerance`` (default: the config's), subset selection (4.4), spec and report."""
    config = state.config if tolerance is None else replace(state.config, tolerance=tolerance)
    _, va, te = state.idx
    kept = state.kept
    for r in kept:
        assert r.head is not None and r.spec is not None
        conf_va, hp_va = r.scores["val"]
        conf_te, hp_te = r.scores["test"]
        thresholds = budget_thresholds(conf_va, hp_va == state.backbone_pred[va], config.tolerance, z=config.margin_z)
        if state.latency is not None:
            c1, c2 = state.latency[1][r.candidate.node], state.latency[0][r.candidate.node]
        else:
            c1, c2 = float(r.head_flops), float(r.candidate.flops_remaining)
        r.val_eval = HeadEval(r.candidate.node, conf_va, hp_va, thresholds, c1, c2)
        r.test_eval = HeadEval(r.candidate.node, conf_te, hp_te, thresholds, c1, c2)
        gt_te = None if state.labels is None else hp_te == state.labels[te]
        r.test_curve = _curve(conf_te, hp_te == state.backbone_pred[te], gt_te)
    floor = min_tolerance(len(va), config.margin_z)
    if kept and config.tolerance < floor:
        logger.warning(
            "tolerance %g is below what %d validation rows can vouch for (%.4f): even a head with no wrong answer "
            "there may exceed tolerance/2 on unseen traffic, so no head answers. Record more traffic or raise "
            "--tolerance to at least %.4f",
            config.tolerance,
            len(va),
            floor,
            floor,
        )
    selection = best_subset([r.val_eval for r in kept]) if kept else Selection((), 0.0, ())
    chosen = [kept[i] for i in selection.subset]
    exits = tuple(
        ExitSpec(
            node=r.candidate.node,
            head=r.spec.to_dict(),
            in_shape=r.candidate.shape,
            temperature=r.temperature,
            threshold=float(t),
        )
        for r, t in zip(chosen, selection.thresholds, strict=True)
    )
    spec = CacheSpec(
        num_classes=state.num_classes,
        input_shape=state.input_shape,
        exits=exits,
        weights_fingerprint=state.fingerprint,
        candidates=tuple(state.nodes),
        tolerance=config.tolerance,
    )
    report = _report(config, state, kept, selection)
    report["build_seconds"] = round(state.seconds, 1)
    return BuildResult(
        spec=spec, heads=[r.head for r in chosen], candidates=state.results, selection=selection, report=report
    )


def build_cache(
    backbone: nn.Module,
    table: pa.Table,
    config: BuildConfig,
    *,
    index_to_name: dict[str, str] | None = None,
    progress: Progress = _no_progress,
) -> BuildResult:
    """Build a cache for ``backbone`` from logged traffic ``table`` (see :func:`layercache.trafficlog.read_logs`).

    Example:
        >>> result = build_cache(backbone, read_logs(Path("logs/m")), BuildConfig(tolerance=0.01))
        >>> result.spec.exits, result.report["mean_flops_cached"]

    Raises:
        LogError: too few rows, or inputs of several shapes.
        GraphError: the backbone cannot be traced (see the hint in the message).
    """
    return finalize(search(backbone, table, config, index_to_name=index_to_name, progress=progress))


def _replay_fidelity(table: pa.Table, replay_pred: np.ndarray, fingerprint: str) -> dict[str, Any]:
    """How well replayed predictions match what the service answered (rows of these weights, backbone exits)."""
    same = np.asarray(table.column("weights_fingerprint").to_pylist()) == fingerprint
    backbone_rows = np.asarray(table.column("exit").to_pylist()) == "backbone"
    mask = same & backbone_rows
    out: dict[str, Any] = {"rows_same_weights": int(same.sum()), "rows_compared": int(mask.sum())}
    if mask.any():
        logged = decode_probs(table.filter(pa.array(mask))).argmax(axis=1)
        out["prediction_agreement"] = float((logged == replay_pred[mask]).mean())
    if not same.all():
        logger.warning(
            "%d of %d logged rows were recorded with other backbone weights; their inputs are replayed through "
            "the current backbone",
            int((~same).sum()),
            len(same),
        )
    return out


def _report(
    config: BuildConfig, state: SearchState, kept: list[CandidateResult], selection: Selection
) -> dict[str, Any]:
    idx, labels, total_flops = state.idx, state.labels, state.total_flops
    backbone_pred, results, n = state.backbone_pred, state.results, int(sum(len(i) for i in state.idx))
    _, _, te = idx
    test_heads = [r.test_eval for r in kept]
    flops_heads = [
        HeadEval(h.node, h.conf, h.pred, h.thresholds, float(r.head_flops), float(r.candidate.flops_remaining))
        for h, r in zip(test_heads, kept)
    ]
    lab_te = None if labels is None else labels[te]
    cascade = evaluate_cascade(flops_heads, selection, backbone_pred[te], lab_te, total_flops) if kept else None
    oracle = oracle_cost(flops_heads, backbone_pred[te], total_flops) if kept else total_flops
    chosen = [flops_heads[i] for i in selection.subset]
    oracle_selected = oracle_cost(chosen, backbone_pred[te], total_flops) if chosen else total_flops
    # The selected heads with the best thresholds for these very rows: what a better threshold rule could reach.
    hindsight = hindsight_thresholds(chosen, backbone_pred[te], total_flops, 1.0 - config.tolerance)[1]
    backbone_bytes = state.backbone_bytes
    head_bytes = sum(
        p.numel() * p.element_size() for r in (kept[i] for i in selection.subset) for p in r.head.state_dict().values()
    )
    exits = []
    if cascade is not None:
        for i, st in zip(selection.subset, cascade.exits):
            r = kept[i]
            exits.append(
                {
                    "node": st.node,
                    "threshold": st.threshold,
                    "hit_rate": st.hit_rate,
                    "cache_accuracy": st.cache_accuracy,
                    "gt_accuracy": st.gt_accuracy,
                    "accuracy_effect": st.accuracy_effect,
                    "hits": st.hits,
                    "head": r.spec.id(),
                    "temperature": r.temperature,
                    "head_flops": r.head_flops,
                    "head_params": r.head_params,
                    "flops_remaining": r.candidate.flops_remaining,
                }
            )
    mean_cached = cascade.mean_cost if cascade is not None else total_flops
    return {
        "tolerance": config.tolerance,
        "cost": config.cost,
        "flops_counter": "torch.utils.flop_counter.FlopCounterMode: FLOPs = 2 x MACs (conv/linear/matmul); "
        "heads add their pooling reads",
        "rows": {"total": n, "train": int(len(idx[0])), "val": int(len(idx[1])), "test": int(len(te))},
        "mean_flops_original": total_flops,
        "mean_flops_cached": mean_cached,
        "flops_ratio": mean_cached / total_flops if total_flops else 1.0,
        "oracle_flops": oracle,
        "achieved_over_oracle": mean_cached / oracle if oracle else None,
        "oracle_flops_selected": oracle_selected,
        "achieved_over_oracle_selected": mean_cached / oracle_selected if oracle_selected else None,
        "hindsight_flops_selected": hindsight,
        "hindsight_over_oracle_selected": hindsight / oracle_selected if oracle_selected else None,
        "min_tolerance": min_tolerance(len(idx[1]), config.margin_z),
        "agreement": cascade.agreement if cascade is not None else 1.0,
        "gt_accuracy_original": cascade.gt_accuracy_backbone if cascade is not None else None,
        "gt_accuracy_cached": cascade.gt_accuracy_cached if cascade is not None else None,
        "selection_score": selection.score,
        "exits": exits,
        "candidates": [
            {
                "node": r.candidate.node,
                "shape": list(r.candidate.shape),
                "flops_prefix": r.candidate.flops_prefix,
                "flops_remaining": r.candidate.flops_remaining,
                "head": r.spec.id() if r.spec else None,
                "val_agreement": r.val_agreement,
                "temperature": r.temperature,
                "discarded": r.discarded,
                "trials": r.trials,
                "selected": r in [kept[i] for i in selection.subset],
                "curve": r.test_curve,
            }
            for r in results
        ],
        "model_bytes": {
            "backbone": backbone_bytes,
            "heads": head_bytes,
            "growth": head_bytes / backbone_bytes if backbone_bytes else 0.0,
        },
        "replay": state.fidelity,
    }
