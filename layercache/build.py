"""The offline build (paper section 4): logs -> candidates -> head search and training -> calibration and
thresholds -> subset selection -> a :class:`~layercache.config.CacheSpec` and the selected heads.

Only logged traffic is used: the preprocessed inputs are replayed through the frozen backbone to get the
activations at every candidate layer and the backbone's output distribution (the distillation target). Labels,
when the log has them, are used for the report only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from layercache.calibration import budget_thresholds, confidences, fit_temperature, poisson_upper_bound
from layercache.certify import Certificate, clopper_pearson_upper, fixed_sequence, requests_needed
from layercache.config import CacheSpec, ExitSpec
from layercache.errors import ConfigError, LogError
from layercache.graph import Candidate, describe_nodes, find_candidates, leaf_modules_for, split
from layercache.heads import HeadSpec, build_head, head_flops, search_space
from layercache.outputs import OutputSpec
from layercache.replay import ActivationStore, LoggedInputs, replay
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
from layercache.training import TrainConfig, Trainer, predict_logits

logger = logging.getLogger(__name__)
T = TypeVar("T")

COSTS = ("flops", "latency")
#: How thresholds and subset are vouched for: one certified promise for the whole cache, or a bound per head.
RULES = ("certified", "per-head")
# Candidate cascades of the certified rule: thresholds chosen on the validation split for these multiples of the
# tolerance as a target disagreement there, most conservative first (fixed-sequence order).
CERTIFY_LEVELS = tuple(float(v) for v in np.geomspace(0.02, 4.0, 48))


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build (the CLI flags of ``tools/build_cache.py``).

    Attributes:
        tolerance: accepted drop in agreement with the backbone (fraction, 0.01 = one point).
        rule: ``certified`` (default): thresholds and subset are chosen on the validation split, then the cascade's
            disagreement is certified on the test split (Clopper-Pearson at ``delta``, fixed-sequence testing over
            candidate cascades, :mod:`layercache.certify`); the cache agrees with the backbone on at least
            ``1 - tolerance`` of traffic like the logged one with probability at least ``1 - delta``.
            ``per-head``: each head's threshold keeps the Poisson bound of its wrong answers within tolerance/2^n
            of the validation rows (``margin_z``); no cache-wide promise (kept for comparison).
        delta: the certified promise's error probability.
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
        workers: candidate layers whose heads train at the same time (threads, each with ``train.num_threads``
            torch threads); the result does not depend on it.
        leaf_modules: module class names torch.fx must not trace into (``"SamePadConv2d"`` or
            ``"module.path:ClassName"``), besides those found automatically where tracing fails; the spec stores
            both (``CacheSpec.leaf_modules``).
    """

    tolerance: float = 0.01
    rule: str = "certified"
    delta: float = 0.05
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
    workers: int = 2
    leaf_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance={self.tolerance} must be in (0, 1); e.g. 0.01 for one accuracy point")
        if len(self.splits) != 3 or any(s <= 0 for s in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            raise ConfigError(f"splits={self.splits} must be three positive fractions summing to 1")
        if self.cost not in COSTS:
            raise ConfigError(f"cost={self.cost!r} must be one of {COSTS}")
        if self.rule not in RULES:
            raise ConfigError(f"rule={self.rule!r} must be one of {RULES}")
        if not 0 < self.delta < 0.5:
            raise ConfigError(f"delta={self.delta} must be in (0, 0.5), e.g. 0.05")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials} must be >= 1")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1")


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
    #: Positions in the logged table of the rows the cascade was certified on (never trained or calibrated on).
    certify_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


Progress = Callable[[Iterable[T], str], Iterable[T]]
#: The archive's original preprocess: a list of request rows -> a batched input tensor.
Preprocess = Callable[[list[dict[str, Any]]], torch.Tensor]


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


def policy_sample(inputs: LoggedInputs, max_rows: int = 256, max_bytes: int = 8 * 2**20, seed: int = 0) -> torch.Tensor:
    """Logged inputs, drawn at random, that ship in the cached ``.mar`` so a worker can time its policy at startup.

    At most ``max_rows`` rows and ``max_bytes`` bytes (float16, at least one row); only the drawn rows are decoded.

    Raises:
        LogError: there are no rows.
    """
    n = inputs.n
    if n == 0:
        raise LogError("no logged inputs to sample for the policy")
    row_bytes = 2 * int(np.prod(inputs.shape))
    k = max(1, min(max_rows, n, max_bytes // max(row_bytes, 1)))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return inputs.batch(rows).half()


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
    kept = [s for s in space if head_flops(s, cand.shape, num_classes) <= cap]  # closed form: no head is built
    return kept or space[:1]


@torch.inference_mode()
def measure_latency(
    backbone: nn.Module,
    nodes: Sequence[str],
    heads: dict[str, nn.Module],
    example: torch.Tensor,
    batch: int,
    leaf_modules: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, float], float]:
    """Seconds per sample, at ``batch``, of the backbone after each node (C2) and of each head (C1)."""
    segments = split(backbone, list(nodes), leaf_modules=leaf_modules)
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


def halving_rungs(epochs: int, trials: int) -> list[int]:
    """Epoch targets of successive halving: every trial trains to the first, the best half of them to the next,
    ..., the last one to ``epochs`` (e.g. 20 epochs, 4 trials: [5, 10, 20])."""
    rungs = max(1, math.ceil(math.log2(max(trials, 1))) + 1)
    return [max(1, math.ceil(epochs / 2 ** (rungs - 1 - k))) for k in range(rungs)]


def _score(
    head: nn.Module, spec: HeadSpec, cand: Candidate, x_va: torch.Tensor, pred_va: np.ndarray, num_classes: int,
    config: BuildConfig,
) -> dict[str, Any]:  # fmt: skip
    """A head's expected FLOPs saved per row if it were first in the cascade (Eq. 4 per row), at the threshold its
    share of the tolerance (tolerance/2) gives on the validation split."""
    logits = predict_logits(head, x_va)
    temp = fit_temperature(logits, torch.from_numpy(pred_va))
    conf, pred = confidences(logits, temp)
    correct = pred == pred_va
    z = 0.0 if config.rule == "certified" else config.margin_z
    thr = budget_thresholds(conf, correct, config.tolerance, max_position=1, z=z)[0]
    coverage = float((conf >= thr).mean()) if math.isfinite(thr) else 0.0
    flops = head_flops(spec, cand.shape, num_classes)
    return {
        "score": coverage * cand.flops_remaining - flops,
        "coverage": coverage,
        "val_agreement": float(correct.mean()),
        "head_flops": flops,
        "temperature": temp,
    }


# Head initialisation draws from torch's global RNG: serialise it so that parallel candidates stay deterministic.
_INIT_LOCK = threading.Lock()


def search_candidate(
    cand: Candidate,
    x: torch.Tensor,
    targets: torch.Tensor,
    backbone_pred: torch.Tensor,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    config: BuildConfig,
) -> CandidateResult:
    """Search, train, calibrate and score heads at one candidate layer (sections 4.2-4.3).

    ``config.trials`` architectures spread over the affordable search space train by successive halving
    (:func:`halving_rungs`): all of them for a few epochs, then the better half (by :func:`_score`) further, and so
    on; the survivor trains to ``config.train.epochs`` (early stopping on validation KL) and is kept if it beats
    always answering the most frequent class.
    """
    tr, va, _ = idx
    res = CandidateResult(candidate=cand)
    space = affordable_space(cand, num_classes, config)
    # float16 as replayed: the trainer converts each mini-batch (half the memory of a float32 copy).
    x_tr, x_va = x[tr], x[va]
    p_tr, p_va = targets[tr], targets[va]
    pred_va = backbone_pred[va].numpy()
    chance = max(1.0 / num_classes, float(np.bincount(pred_va, minlength=num_classes).max() / len(pred_va)))
    specs = pick_trials(space, config.trials)
    t0 = time.perf_counter()
    with _INIT_LOCK:
        trainers = []
        for spec in specs:
            torch.manual_seed(config.seed)
            trainers.append(Trainer(build_head(spec, cand.shape, num_classes), x_tr, p_tr, x_va, p_va, config.train))
    alive = list(range(len(specs)))
    rungs = halving_rungs(config.train.epochs, len(specs))
    for r, until in enumerate(rungs):
        for i in alive:
            trainers[i].run(until)
        if r == len(rungs) - 1:
            break
        scored = {i: _score(trainers[i].head, specs[i], cand, x_va, pred_va, num_classes, config) for i in alive}
        ranked = sorted(alive, key=lambda i: (-scored[i]["score"], i))  # ties: the cheaper spec
        survivors = ranked[: max(1, math.ceil(len(alive) / 2))]
        for i in alive:
            if i not in survivors:
                res.trials.append({"head": specs[i].id(), **_trial(scored[i]), "epochs": trainers[i].epochs_run})
        alive = survivors
    (best,) = alive if len(alive) == 1 else alive[:1]
    trainers[best].finish()
    head, spec = trainers[best].head, specs[best]
    final = _score(head, spec, cand, x_va, pred_va, num_classes, config)
    res.trials.append({"head": spec.id(), **_trial(final), "epochs": trainers[best].epochs_run, "selected": True})
    logger.info(
        "%s %s: agreement %.3f, coverage %.3f, %.2f MFLOPs, %d epochs, %d trials by halving (%s), %.1f s",
        cand.node,
        spec.id(),
        final["val_agreement"],
        final["coverage"],
        final["head_flops"] / 1e6,
        trainers[best].epochs_run,
        len(specs),
        "/".join(map(str, rungs)),
        time.perf_counter() - t0,
    )
    if final["val_agreement"] <= chance + 0.01:
        res.discarded = f"no head beat chance ({chance:.3f}) on the validation split"
        return res
    res.spec, res.head, res.temperature = spec, head, final["temperature"]
    res.val_agreement, res.head_flops = final["val_agreement"], final["head_flops"]
    res.head_params = sum(p.numel() for p in head.parameters())
    return res


def _trial(scored: dict[str, Any]) -> dict[str, Any]:
    return {k: scored[k] for k in ("val_agreement", "coverage", "head_flops", "score")}


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
    output: OutputSpec = field(default_factory=OutputSpec)
    leaf_modules: tuple[str, ...] = ()

    @property
    def kept(self) -> list[CandidateResult]:
        return [r for r in self.results if r.head is not None]


def search(
    backbone: nn.Module,
    table: pa.Table,
    config: BuildConfig,
    *,
    preprocess: Preprocess | None = None,
    index_to_name: dict[str, str] | None = None,
    progress: Progress = _no_progress,
) -> SearchState:
    """Candidates, replay, head search/training/calibration at every candidate (sections 4.1-4.3).

    Args:
        preprocess: the archive's original ``preprocess`` (rows -> batched tensor), replayed on logged request
            bodies; needed unless every row carries its input tensor.

    Raises:
        LogError: too few rows, inputs of several shapes, or bodies to replay without ``preprocess``.
        GraphError: the backbone cannot be traced (see the hint in the message).
    """
    t_start = time.perf_counter()
    backbone.eval()
    n = table.num_rows
    if n < 50:
        raise LogError(f"only {n} logged requests; a build needs at least 50 (thousands for a useful cache)")
    inputs = LoggedInputs(table, preprocess)
    example = inputs.batch(np.arange(1))
    leaves = leaf_modules_for(backbone, config.leaf_modules)
    if leaves:
        logger.info("leaf modules (torch.fx does not trace into them, no cut inside): %s", ", ".join(leaves))
    if config.nodes:
        cands = describe_nodes(backbone, example, list(config.nodes), leaf_modules=leaves)
    else:
        cands = find_candidates(
            backbone,
            example,
            min_remaining_fraction=config.min_remaining_fraction,
            max_candidates=config.max_candidates,
            leaf_modules=leaves,
        )
    nodes = [c.node for c in cands]
    logger.info("candidate layers: %s", ", ".join(nodes) or "(none)")
    workdir = tempfile.TemporaryDirectory(prefix="layercache-acts-")
    store = ActivationStore(Path(workdir.name))
    _, logits, output = replay(
        backbone,
        inputs,
        nodes,
        max_spatial=config.max_spatial,
        batch_size=config.replay_batch,
        progress=progress,
        store=store,
        leaf_modules=leaves,
    )
    targets = output.probs(logits)
    backbone_pred = logits.argmax(dim=1)
    fingerprint = weights_fingerprint(backbone)
    labels = None
    if "label" in table.column_names:
        labels = labels_to_index(table.column("label").to_pylist(), index_to_name)
    idx = split_indices(n, config.splits, config.seed)
    _, va, te = idx

    def one(cand: Candidate) -> CandidateResult:
        x = store.load(cand.node)  # this layer's rows only: peak memory is the layers training at once
        res = search_candidate(cand, x, targets, backbone_pred, idx, int(logits.shape[1]), config)
        if res.head is not None:
            for name, rows in (("val", va), ("test", te)):
                res.scores[name] = confidences(predict_logits(res.head, x[rows]), res.temperature)
        store.drop(cand.node)
        return res

    # Small heads train fastest on one thread each; candidates train side by side on the other cores.
    threads = torch.get_num_threads()
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    try:
        with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="layercache-heads") as pool:
            results: list[CandidateResult] = list(progress(pool.map(one, cands), "heads"))
    finally:
        torch.set_num_threads(threads)
        store.close()
        workdir.cleanup()
    kept = [r for r in results if r.head is not None]
    latency = None
    if config.cost == "latency" and kept:
        rest_t, head_t, _ = measure_latency(
            backbone, nodes, {r.candidate.node: r.head for r in kept}, example, config.latency_batch, leaves
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
        input_shape=tuple(inputs.shape),
        fingerprint=fingerprint,
        fidelity=_replay_fidelity(table, backbone_pred.numpy(), fingerprint),
        latency=latency,
        backbone_bytes=sum(t.numel() * t.element_size() for t in backbone.state_dict().values()),
        seconds=time.perf_counter() - t_start,
        output=output,
        leaf_modules=leaves,
    )


def resample(
    state: SearchState, seed: int, unseen: Sequence[tuple[np.ndarray, np.ndarray]], unseen_pred: np.ndarray
) -> tuple[SearchState, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The same trained heads and validation rows, with the certification rows drawn anew (seeded) from the build's
    test rows together with ``unseen`` rows no part of the build saw: what another build on the same traffic could
    have certified on. For experiments on the promise (how often it breaks over many builds) without training the
    heads again: the heads and the thresholds come from the training and validation rows alone, as in a real build,
    so each draw is a valid certification.

    Args:
        unseen: per kept head (in :attr:`SearchState.kept` order), its ``(confidence, answer)`` on the unseen rows.
        unseen_pred: the backbone's answer on them.

    Returns:
        The state to :func:`finalize`, and the rows left out of its certification, for evaluating what it chose:
        per kept head ``(confidence, answer)``, and the backbone's answers (as many rows as ``unseen``).
    """
    kept = state.kept
    if len(unseen) != len(kept):
        raise ConfigError(f"unseen scores for {len(unseen)} heads, the state has {len(kept)} trained heads")
    tr, va, te = state.idx
    n_extra = len(unseen_pred)
    order = np.random.default_rng(seed).permutation(len(te) + n_extra)
    certify, rest = order[: len(te)], order[len(te) :]
    # Rows of the extended state: the logged rows, then the unseen ones.
    rows = np.concatenate([te, len(state.backbone_pred) + np.arange(n_extra)])
    backbone_pred = np.concatenate([state.backbone_pred, unseen_pred])
    pooled_pred = backbone_pred[rows]
    results, left = [], []
    scores = iter(unseen)
    for r in state.results:
        if r.head is None:
            results.append(r)
            continue
        conf_u, pred_u = next(scores)
        conf = np.concatenate([r.scores["test"][0], conf_u])
        pred = np.concatenate([r.scores["test"][1], pred_u])
        new_scores = {"val": r.scores["val"], "test": (conf[certify], pred[certify])}
        results.append(replace(r, scores=new_scores, trials=list(r.trials)))
        left.append((conf[rest], pred[rest]))
    new = replace(state, results=results, idx=(tr, va, rows[certify]), backbone_pred=backbone_pred, labels=None)
    return new, left, pooled_pred[rest]


def min_tolerance(n_val: int, margin_z: float) -> float:
    """Per-head rule: smallest tolerance at which a head can answer at all: the first cascade position's budget
    (tolerance/2) must cover the upper bound of zero wrong hits on ``n_val`` validation rows (2.30 rows at
    z = 1.28). 0 without margin."""
    if margin_z <= 0:
        return 0.0
    if n_val < 1:
        raise ConfigError(f"n_val must be >= 1, got {n_val}")
    return 2.0 * float(poisson_upper_bound(np.zeros(1), margin_z)[0]) / n_val


def certified_floor(n_certify: int, delta: float) -> float:
    """Certified rule: smallest tolerance any cascade can be certified at on ``n_certify`` rows (zero
    disagreements: the Clopper-Pearson bound ``1 - delta**(1/n)``, about ``3 / n`` at delta = 0.05)."""
    return clopper_pearson_upper(0, n_certify, delta) if n_certify else 1.0


def _costs(state: SearchState, r: CandidateResult) -> tuple[float, float]:
    if state.latency is not None:
        return state.latency[1][r.candidate.node], state.latency[0][r.candidate.node]
    return float(r.head_flops), float(r.candidate.flops_remaining)


def _evals(state: SearchState, kept: list[CandidateResult], budget: float, z: float) -> tuple[list, list]:
    """Validation and test HeadEvals of every kept head, with the thresholds ``budget`` gives on validation."""
    _, va, _ = state.idx
    val, test = [], []
    for r in kept:
        conf_va, hp_va = r.scores["val"]
        conf_te, hp_te = r.scores["test"]
        thresholds = budget_thresholds(conf_va, hp_va == state.backbone_pred[va], budget, z=z)
        c1, c2 = _costs(state, r)
        val.append(HeadEval(r.candidate.node, conf_va, hp_va, thresholds, c1, c2))
        test.append(HeadEval(r.candidate.node, conf_te, hp_te, thresholds, c1, c2))
    return val, test


def _disagreements(test: list[HeadEval], selection: Selection, backbone_pred: np.ndarray) -> int:
    if not selection.subset:
        return 0
    result = evaluate_cascade(test, selection, backbone_pred)
    return int(np.count_nonzero(result.final_pred != backbone_pred))


def _shrunk(heads: list[HeadEval], share: float) -> list[HeadEval]:
    """The heads with thresholds raised so that each answers about ``share`` of the validation rows it answers
    now (a quantile of its own confidences): a more conservative cascade of the same heads."""
    out = []
    for h in heads:
        conf = np.asarray(h.conf, dtype=np.float64)
        raised = []
        for t in np.asarray(h.thresholds, dtype=np.float64):
            covered = float((conf >= t).mean()) if math.isfinite(t) else 0.0
            q = float(np.quantile(conf, 1.0 - share * covered)) if covered > 0 else math.inf
            raised.append(max(t, q) if covered > 0 else t)
        out.append(replace(h, thresholds=np.asarray(raised)))
    return out


def _certified(
    state: SearchState, config: BuildConfig, kept: list[CandidateResult]
) -> tuple[list, list, Selection, Certificate]:
    """Candidate cascades from the validation split, most conservative first; fixed-sequence testing on the test
    split picks the last one certified (see :mod:`layercache.certify`).

    The sequence: the first cascade the budget rule gives (thresholds at :data:`CERTIFY_LEVELS` x tolerance on
    validation, subset by K(S)) with its thresholds raised to answer 10%, 20%, ... of what it answers, then that
    cascade, then the budget rule's cascades at growing levels. Everything about the order is fixed from the
    validation split alone.
    """
    _, _, te = state.idx
    pred_te = state.backbone_pred[te]
    n = len(te)
    candidates: list[tuple[list, list, Selection, int]] = []

    def add(val: list[HeadEval], test: list[HeadEval], selection: Selection) -> None:
        if selection.subset and not (candidates and candidates[-1][2] == selection):
            candidates.append((val, test, selection, _disagreements(test, selection, pred_te)))

    for level in CERTIFY_LEVELS:
        val, test = _evals(state, kept, config.tolerance * level, 0.0)
        selection = best_subset(val)
        if selection.subset and not candidates:
            for share in np.linspace(0.1, 0.9, 9):
                sval = _shrunk(val, float(share))
                stest = [replace(t, thresholds=v.thresholds) for t, v in zip(test, sval, strict=True)]
                chosen = [sval[i] for i in selection.subset]
                sub = Selection(selection.subset, 0.0, tuple(float(h.thresholds[p]) for p, h in enumerate(chosen)))
                add(sval, stest, sub)
        add(val, test, selection)
    chosen, tested = fixed_sequence([c[3] for c in candidates], n, config.tolerance, config.delta)
    if chosen is None:
        val, test = candidates[0][:2] if candidates else _evals(state, kept, config.tolerance, 0.0)
        first = candidates[0][3] / n if candidates and n else None
        needed = None if first is None else requests_needed(first, config.tolerance, config.delta, config.splits[2])
        worst = candidates[0][3] if candidates else 0
        cert = Certificate(
            "certified", config.tolerance, config.delta, n, worst, worst / n if n else 0.0,
            clopper_pearson_upper(worst, n, config.delta) if n else 1.0, False, tested, needed,
        )  # fmt: skip
        return val, test, Selection((), 0.0, ()), cert
    val, test, selection, k = candidates[chosen]
    cert = Certificate(
        "certified", config.tolerance, config.delta, n, k, k / n, clopper_pearson_upper(k, n, config.delta), True,
        tested,
    )  # fmt: skip
    return val, test, selection, cert


def _per_head(
    state: SearchState, config: BuildConfig, kept: list[CandidateResult]
) -> tuple[list, list, Selection, Certificate]:
    """The per-head rule (each head within tolerance/2^n by its Poisson bound on validation); the certificate only
    reports what the test split shows, it promises nothing cache-wide."""
    _, va, te = state.idx
    val, test = _evals(state, kept, config.tolerance, config.margin_z)
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
    selection = best_subset(val) if kept else Selection((), 0.0, ())
    n, k = len(te), _disagreements(test, selection, state.backbone_pred[te])
    ub = clopper_pearson_upper(k, n, config.delta) if n else 1.0
    return val, test, selection, Certificate("per-head", config.tolerance, config.delta, n, k, k / n if n else 0.0,
                                             ub, ub <= config.tolerance)  # fmt: skip


def _exit_bounds(test: list[HeadEval], selection: Selection, backbone_pred: np.ndarray, delta: float) -> list[dict]:
    """Per chosen exit, its hits and disagreements on the test split and the bound the online guard holds it to."""
    if not selection.subset:
        return []
    result = evaluate_cascade(test, selection, backbone_pred)
    out = []
    for st in result.exits:
        wrong = int(round(st.hits * (1.0 - st.cache_accuracy))) if st.hits else 0
        out.append({"rows": len(backbone_pred), "hits": st.hits, "wrong": wrong,
                    "bound": clopper_pearson_upper(wrong, st.hits, delta) if st.hits else 1.0})  # fmt: skip
    return out


def _warn_uncertified(config: BuildConfig, certificate: Certificate, any_head: bool) -> None:
    """Say why the cache keeps the plain model, and how many logged requests would change that."""
    # Even a cascade that never disagrees needs this many requests for its certification rows to vouch for it.
    floor = requests_needed(0.0, config.tolerance, config.delta, config.splits[2])
    if not any_head:
        why = "no head agreed with the backbone more often than always answering its most frequent class"
    else:
        why = f"no cascade could be certified with {certificate.rows} certification rows"
    if floor and certificate.rows < math.ceil(floor * config.splits[2]):
        advice = (
            f"a cache at tolerance {config.tolerance:g} (delta {config.delta:g}) needs at least {floor} logged "
            f"requests, so that its {config.splits[2]:.0%} certification rows can vouch for it; record more traffic "
            "or raise --tolerance"
        )
    elif certificate.requests_needed:
        advice = (
            f"about {certificate.requests_needed} logged requests would certify the most conservative cascade at "
            "its observed disagreement; record more traffic or raise --tolerance"
        )
    else:
        advice = "even the most conservative cascade disagrees too often: raise --tolerance"
    logger.warning("%s: the cache keeps the plain model; %s", why, advice)


def finalize(
    state: SearchState, tolerance: float | None = None, *, rule: str | None = None, delta: float | None = None
) -> BuildResult:
    """Thresholds and subset for ``tolerance`` under ``rule`` (defaults: the config's), the spec and the report.

    Cheap next to :func:`search`: one search serves many tolerances and both rules (tools/bench.py).
    """
    changes = {k: v for k, v in (("tolerance", tolerance), ("rule", rule), ("delta", delta)) if v is not None}
    config = replace(state.config, **changes) if changes else state.config
    _, _, te = state.idx
    kept = state.kept
    choose = _certified if config.rule == "certified" else _per_head
    val, test, selection, certificate = choose(state, config, kept)
    if config.rule == "certified" and not certificate.passed:
        _warn_uncertified(config, certificate, bool(kept))
    for r, v, t in zip(kept, val, test, strict=True):
        r.val_eval, r.test_eval = v, t
        conf_te, hp_te = r.scores["test"]
        gt_te = None if state.labels is None else hp_te == state.labels[te]
        r.test_curve = _curve(conf_te, hp_te == state.backbone_pred[te], gt_te)
    chosen = [kept[i] for i in selection.subset]
    bounds = _exit_bounds(test, selection, state.backbone_pred[te], config.delta)
    exits = tuple(
        ExitSpec(
            node=r.candidate.node,
            head=r.spec.to_dict(),
            in_shape=r.candidate.shape,
            temperature=r.temperature,
            threshold=float(t),
            certified=b,
        )
        for r, t, b in zip(chosen, selection.thresholds, bounds, strict=True)
    )
    spec = CacheSpec(
        num_classes=state.num_classes,
        input_shape=state.input_shape,
        exits=exits,
        weights_fingerprint=state.fingerprint,
        candidates=tuple(state.nodes),
        tolerance=config.tolerance,
        output=state.output.to_dict(),
        certificate=certificate.to_dict(),
        leaf_modules=state.leaf_modules,
    )
    report = _report(config, state, kept, selection)
    report["promise"] = certificate.to_dict()
    report["build_seconds"] = round(state.seconds, 1)
    report["leaf_modules"] = list(state.leaf_modules)
    return BuildResult(
        spec=spec,
        heads=[r.head for r in chosen],
        candidates=state.results,
        selection=selection,
        report=report,
        certify_rows=te,
    )


def build_cache(
    backbone: nn.Module,
    table: pa.Table,
    config: BuildConfig,
    *,
    preprocess: Preprocess | None = None,
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
    return finalize(
        search(backbone, table, config, preprocess=preprocess, index_to_name=index_to_name, progress=progress)
    )


def _replay_fidelity(table: pa.Table, replay_pred: np.ndarray, fingerprint: str) -> dict[str, Any]:
    """How well replayed predictions match what the service answered (rows of these weights, backbone exits)."""
    same = np.asarray(table.column("weights_fingerprint").to_pylist()) == fingerprint
    backbone_rows = np.asarray(table.column("exit").to_pylist()) == "backbone"
    mask = same & backbone_rows
    out: dict[str, Any] = {"rows_same_weights": int(same.sum()), "rows_compared": int(mask.sum())}
    if mask.any():
        logged = table.column("prediction").to_numpy()[mask]
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
        "min_tolerance": certified_floor(len(te), config.delta)
        if config.rule == "certified"
        else min_tolerance(len(idx[1]), config.margin_z),
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
