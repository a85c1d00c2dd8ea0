"""Keeping a cache fresh (paper section 4.5, automated): tell when it went stale, rebuild it, swap it in only when
the new one is better.

A cached archive records what its build used (``CacheSpec.provenance``: rows, their time range, the log dir) and
what it promised (``CacheSpec.certificate``). :func:`check_cache` compares that with the log as it is now and says
whether the cache is stale and why: a large share of the logged requests is newer than the build (the paper's
trigger: 20%), the backbone answering the recent requests is not the one the cache was built for, or the verified
answers of the cache's heads (online verification) show more disagreement than it promised.

:func:`refresh_cache` rebuilds from the newest logged rows, compares the candidate with the running cache on
recent rows neither has trained on, and swaps the candidate in through the management API only if it keeps its
promise and costs no more; otherwise the running cache stays and the outcome says why. The previous version stays
registered, so ``swap_version.py --rollback`` goes back.

Example::

    report = check_cache(Path("model-store/fashion_cached.mar"), Path("logs/fashion"))
    if report.stale:
        refresh_cache(client, RefreshRequest(model="fashion", mar=..., logs=..., model_store=...))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from layercache.archive import read_mar
from layercache.build import BuildConfig
from layercache.config import CACHE_SPEC_FILE, CacheSpec
from layercache.errors import ArchiveError, ConfigError
from layercache.evaluation import BACKBONE, model_answers, score
from layercache.management import ManagementClient
from layercache.progress import Progress, no_progress
from layercache.trafficlog import compact, read_logs

logger = logging.getLogger(__name__)

__all__ = ["RefreshOutcome", "RefreshRequest", "Staleness", "check_cache", "decide", "read_cache_spec", "refresh_cache"]

#: Share of logged requests newer than the build that makes a cache stale (the paper's example trigger).
NEW_FRACTION = 0.2
#: Verified hits a cache needs before live disagreement is held against its promise.
MIN_VERIFIED = 50
_COLUMNS = ["time", "weights_fingerprint", "exit", "prediction", "backbone_prediction"]


def read_cache_spec(mar: Path) -> CacheSpec:
    """The cache spec of a cached archive.

    Raises:
        ArchiveError: the archive is not a cached one.
    """
    try:
        with zipfile.ZipFile(mar) as z:
            text = z.read(CACHE_SPEC_FILE).decode("utf-8")
    except (FileNotFoundError, KeyError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"{mar} is not a cached archive ({exc}). Hint: build one with tools/build_cache.py") from exc
    return CacheSpec.from_json(text, where=f"{mar}:{CACHE_SPEC_FILE}")


@dataclass(frozen=True)
class Staleness:
    """What :func:`check_cache` found: whether the cache is stale, why, and the numbers behind it."""

    stale: bool
    reasons: list[str]
    facts: dict[str, Any]

    def text(self) -> str:
        head = "stale" if self.stale else "fresh"
        lines = [f"cache is {head}"] + [f"  - {r}" for r in self.reasons]
        lines += [f"  {k}: {v}" for k, v in self.facts.items()]
        return "\n".join(lines) + "\n"


def _parse_time(value: str | None) -> datetime | None:
    return None if not value else datetime.fromisoformat(value)


def check_cache(
    mar: Path, logs: Path, *, new_fraction: float = NEW_FRACTION, min_verified: int = MIN_VERIFIED
) -> Staleness:
    """Whether the cached archive ``mar`` is stale against the log dir ``logs`` (see the module docstring).

    Raises:
        ArchiveError: ``mar`` is not a cached archive.
        LogError: the log dir has no rows.
    """
    if not 0 < new_fraction <= 1:
        raise ConfigError(f"new_fraction={new_fraction} must be in (0, 1]")
    spec = read_cache_spec(mar)
    if Path(logs).is_dir():
        compact(logs)
    table = read_logs(logs, columns=[c for c in _COLUMNS])
    built_until = _parse_time(spec.provenance.get("time_max"))
    times = table.column("time").to_numpy()
    reasons: list[str] = []
    facts: dict[str, Any] = {"logged_rows": table.num_rows, "built_from_rows": spec.provenance.get("rows")}
    if built_until is None:
        reasons.append("the cache does not say which traffic it was built from (built before 0.2): rebuild it")
        new = np.ones(table.num_rows, dtype=bool)
    else:
        new = times > np.datetime64(built_until.astimezone(UTC).replace(tzinfo=None), "us")
    share = float(new.mean()) if table.num_rows else 0.0
    facts["new_rows"], facts["new_share"] = int(new.sum()), round(share, 4)
    if built_until is not None and share >= new_fraction:
        reasons.append(
            f"{share:.0%} of the logged requests are newer than the build (at least {new_fraction:.0%} makes it stale)"
        )
    fps = np.asarray(table.column("weights_fingerprint").to_pylist(), dtype=object)
    recent = fps[new] if new.any() else fps[-min(len(fps), 100) :]
    others = sorted({str(f) for f in recent} - {spec.weights_fingerprint})
    if spec.weights_fingerprint and others:
        reasons.append(
            f"the backbone changed: recent requests were answered by weights {', '.join(others)}, the cache was built "
            f"for {spec.weights_fingerprint}"
        )
    live = _live_disagreement(table, new, spec)
    facts.update(live)
    if live["verified"] >= min_verified and live["estimated_disagreement"] > spec.tolerance > 0:
        reasons.append(
            f"verified answers since the build show {live['estimated_disagreement']:.2%} disagreement with the "
            f"backbone, above the promised {spec.tolerance:.2%} ({live['verified']} verified hits)"
        )
    return Staleness(bool(reasons), reasons, facts)


def _live_disagreement(table: pa.Table, new: np.ndarray, spec: CacheSpec) -> dict[str, Any]:
    """Sum over heads of hit rate x (1 - verified agreement), over the rows since the build."""
    exits = np.asarray(table.column("exit").to_pylist(), dtype=object)[new]
    bpred = table.column("backbone_prediction")
    verified_col = pc.is_valid(bpred).to_numpy(zero_copy_only=False)[new] if bpred.null_count < len(bpred) else None
    pred = table.column("prediction").to_numpy()[new]
    bp = bpred.fill_null(-1).to_numpy()[new]
    total = len(exits)
    out = {"verified": 0, "estimated_disagreement": 0.0, "heads": {}}
    if not total or verified_col is None:
        return out
    for node in spec.nodes:
        hits = exits == node
        v = hits & verified_col
        n = int(v.sum())
        agree = float((pred[v] == bp[v]).mean()) if n else math.nan
        out["heads"][node] = {"hit_rate": float(hits.mean()), "verified": n, "agreement": agree}
        out["verified"] += n
        if n:
            out["estimated_disagreement"] += float(hits.mean()) * (1.0 - agree)
    out["estimated_disagreement"] = round(out["estimated_disagreement"], 6)
    return out


# ------------------------------------------------------------------------------------------------------ refresh
@dataclass(frozen=True)
class RefreshRequest:
    """One refresh.

    Attributes:
        model: the name the model is served under.
        mar: the running cached archive (its classifier and handler are the ones rebuilt on).
        logs: the log dir.
        model_store: the server's model store (the new archive is written there).
        config: the build's settings (tolerance, delta, ...).
        max_rows: rebuild from at most this many of the newest logged rows.
        min_eval_rows: fewest recent rows neither cache trained on that the comparison needs.
        version: the new version (default ``<running>-r<UTC timestamp>``).
        workers: workers for the new version.
        state_file: the swap state file (for ``swap_version.py --rollback``).
        dry_run: build and compare, but do not swap.
    """

    model: str
    mar: Path
    logs: Path
    model_store: Path
    config: BuildConfig = field(default_factory=BuildConfig)
    max_rows: int | None = 20_000
    min_eval_rows: int = 200
    version: str | None = None
    workers: int = 1
    state_file: Path = Path(".layercache-swap.json")
    dry_run: bool = False


@dataclass(frozen=True)
class RefreshOutcome:
    """What a refresh did: whether it swapped, why, and the comparison behind it."""

    swapped: bool
    reason: str
    candidate: Path | None
    version: str | None
    comparison: dict[str, Any]
    #: The candidate's build report (its exits, FLOPs, promise).
    report: dict[str, Any] = field(default_factory=dict)


def _costs(spec: CacheSpec, backbone: Any, example: Any) -> dict[str, float]:
    """FLOPs of one request by the exit it takes, for a cache ``spec`` on ``backbone`` (as the report counts)."""
    from layercache.graph import count_flops, describe_nodes
    from layercache.heads import HeadSpec, head_flops

    total = float(count_flops(backbone, example))
    costs, heads = {}, 0.0
    cands = describe_nodes(backbone, example, list(spec.nodes)) if spec.exits else []
    for e, c in zip(spec.exits, cands, strict=True):
        if not math.isfinite(e.threshold):
            continue
        heads += head_flops(HeadSpec.from_dict(e.head), e.in_shape, spec.num_classes)
        costs[e.node] = total - c.flops_remaining + heads
    costs[BACKBONE] = total + heads
    return costs


def _evaluate(mar: Path, backbone: Any, x: Any, example: Any) -> dict[str, Any]:
    from layercache.loading import load_cached

    with tempfile.TemporaryDirectory(prefix="layercache-eval-") as tmp:
        cached = load_cached(mar, Path(tmp))
    spec = read_cache_spec(mar)
    reference, answers = model_answers(backbone, cached, x)
    costs = _costs(spec, backbone, example)
    scored = score(answers, reference=reference, costs=costs)
    return {"agreement": scored["agreement"], "mean_flops": scored["mean_flops"], "flops_original": costs[BACKBONE]}


def refresh_cache(
    client: ManagementClient | None, request: RefreshRequest, *, progress: Progress = no_progress
) -> RefreshOutcome:
    """Rebuild from the newest logs, compare, and swap the candidate in only if it is better (module docstring).

    ``client`` may be None with ``dry_run``.

    Raises:
        LogError, ArchiveError: as a build does.
    """
    from layercache.offline import open_mar
    from layercache.pipeline import BuildRequest, build_cached_archive
    from layercache.replay import LoggedInputs
    from layercache.swap import SwapRequest, swap_version

    running = read_cache_spec(request.mar)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = read_mar(request.mar).version
    version = request.version or f"{base.split('-r')[0]}-r{stamp}"
    candidate = Path(request.model_store) / f"{request.model}_{version}.mar"
    config = request.config
    if not config.leaf_modules and running.leaf_modules:
        # The running cache's leaves (given by hand or found) keep the candidate's layer names comparable.
        config = dataclasses.replace(config, leaf_modules=tuple(running.leaf_modules))
    outcome = build_cached_archive(
        BuildRequest(
            mar=request.mar,
            logs=request.logs,
            output=candidate,
            config=config,
            version=version,
            max_rows=request.max_rows,
            force=True,
        ),
        progress=progress,
    )
    promise = outcome.report["promise"]
    # Rows to compare on: the candidate's certification rows (it never trained on them) that are newer than the
    # running cache's build (neither did the running one).
    built_until = _parse_time(running.provenance.get("time_max"))
    table = read_logs(request.logs)
    rows = _eval_rows(table, outcome.certify_ids, built_until)
    comparison: dict[str, Any] = {"candidate_promise": promise, "eval_rows": int(len(rows))}
    if promise.get("passed") and len(rows) >= request.min_eval_rows:
        with tempfile.TemporaryDirectory(prefix="layercache-refresh-") as tmp:
            loaded = open_mar(request.mar, Path(tmp) / "mar")
            inputs = LoggedInputs(table.take(pa.array(rows)), loaded.preprocess)
            x = inputs.batch(np.arange(inputs.n))
            comparison["running"] = _evaluate(request.mar, loaded.backbone, x, x[:2])
            comparison["candidate"] = _evaluate(candidate, loaded.backbone, x, x[:2])
    better, reason = decide(comparison, request.config.tolerance, request.min_eval_rows)
    if not better:
        return RefreshOutcome(False, reason, candidate, version, comparison, outcome.report)
    if request.dry_run or client is None:
        return RefreshOutcome(False, reason + "; dry run: not swapped", candidate, version, comparison, outcome.report)
    swap_version(
        client,
        SwapRequest(
            model=request.model,
            mar=candidate,
            workers=request.workers,
            model_store=request.model_store,
            state_file=request.state_file,
        ),
    )
    return RefreshOutcome(
        True, reason + f"; swapped in as version {version}", candidate, version, comparison, outcome.report
    )


def decide(comparison: dict[str, Any], tolerance: float, min_eval_rows: int) -> tuple[bool, str]:
    """Whether a refresh candidate replaces the running cache, and why (the comparison of :func:`refresh_cache`).

    It does when it certified its promise, agrees with the backbone on at least ``1 - tolerance`` of the recent
    requests neither cache trained on (at least ``min_eval_rows`` of them), and costs no more FLOPs per request
    there than the running cache.
    """
    n = comparison.get("eval_rows", 0)
    if not comparison.get("candidate_promise", {}).get("passed"):
        return False, "the candidate could not certify its promise; the running cache stays"
    if n < min_eval_rows:
        return False, (
            f"only {n} recent logged requests neither cache trained on (at least {min_eval_rows} needed to "
            "compare); the running cache stays until more traffic is logged"
        )
    run, cand = comparison["running"], comparison["candidate"]
    if cand["agreement"] < 1.0 - tolerance:
        return (
            False,
            f"the candidate agrees on only {cand['agreement']:.2%} of the recent requests; the running cache stays",
        )
    if cand["mean_flops"] > run["mean_flops"]:
        return False, (
            f"the candidate costs more ({cand['mean_flops'] / 1e6:.1f}M FLOPs per request against "
            f"{run['mean_flops'] / 1e6:.1f}M) on the recent requests; the running cache stays"
        )
    return True, (
        f"the candidate keeps its promise and costs {cand['mean_flops'] / 1e6:.1f}M FLOPs per request against "
        f"{run['mean_flops'] / 1e6:.1f}M on {n} recent requests (agreement {cand['agreement']:.2%})"
    )


def _eval_rows(table: pa.Table, certify_ids: tuple[str, ...], built_until: datetime | None) -> np.ndarray:
    """Positions in ``table`` of the candidate's certification rows newer than the running cache's build."""
    ids = np.asarray(table.column("request_id").to_pylist(), dtype=object)
    rows = np.nonzero(np.isin(ids, np.asarray(certify_ids, dtype=object)))[0]
    if built_until is not None:
        times = table.column("time").to_numpy()
        rows = rows[times[rows] > np.datetime64(built_until.astimezone(UTC).replace(tzinfo=None), "us")]
    return rows
