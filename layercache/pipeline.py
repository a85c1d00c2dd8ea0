"""From recorded traffic to a cached ``.mar``: the whole offline build as one library call.

:func:`build_cached_archive` compacts finished log segments, reads the logs, opens the archive's classifier,
builds the cache (:func:`layercache.build.build_cache`: candidates, head search and training, calibration,
thresholds, subset), optionally times the per-batch-size policy, packages the cached archive and writes the
report. ``tools/build_cache.py`` is this function behind a command line.

Example::

    outcome = build_cached_archive(BuildRequest(mar=Path("m_rec.mar"), logs=Path("logs/m"), output=Path("m.mar")))
    outcome.report["flops_ratio"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from layercache.archive import package_cached, read_mar
from layercache.build import BuildConfig, build_cache, policy_sample
from layercache.config import ACCELERATIONS, POLICY_SOURCES, CacheSpec, HandlerConfig
from layercache.errors import ArchiveError, ConfigError
from layercache.graph import Candidate, excluded_layers, find_candidates, leaf_modules_for, list_layer_names
from layercache.offline import open_mar
from layercache.progress import Progress, no_progress
from layercache.replay import LoggedInputs
from layercache.report import write_report
from layercache.runtime import CachedModel, heads_state_dict, measure_policy
from layercache.trafficlog import compact, read_logs

logger = logging.getLogger(__name__)

__all__ = ["BuildOutcome", "BuildRequest", "LayerListing", "build_cached_archive", "list_layers"]


@dataclass(frozen=True)
class BuildRequest:
    """One build: which archive and logs, what to write, and how.

    Attributes:
        mar: the original (or recording) classifier archive.
        logs: the log dir the recording handler wrote.
        output: the cached archive to write.
        config: the build's settings (tolerance, trials, ...).
        report_dir: where to write report.json / report.md / plots (None: no report files).
        version: the cached archive's version (default ``<original>-cached``).
        log_dir: where the cached archive keeps recording (default: the recording archive's log dir).
        measure_policy: time shrink / no-shrink / backbone-only per batch size here and store the fastest.
        policy_source: the cached workers' ``layercache.policy_source``.
        acceleration: the engine cached workers run on (:data:`~layercache.config.ACCELERATIONS`), recorded in the
            spec and applied at load.
        max_rows: use the newest this many logged rows (None: all). The build's memory follows the rows it uses,
            so the default keeps it flat however long the log grows.
        since: only rows logged at or after this time (timezone-aware).
        sample_seed: draw the ``max_rows`` rows at random with this seed instead of taking the newest.
        strict: refuse a log file that cannot be read instead of skipping it (a warning names it and its rows).
        force: overwrite ``output``.
    """

    mar: Path
    logs: Path
    output: Path
    config: BuildConfig = field(default_factory=BuildConfig)
    report_dir: Path | None = None
    version: str | None = None
    log_dir: Path | None = None
    measure_policy: bool = False
    policy_source: str = "auto"
    acceleration: str = "none"
    max_rows: int | None = 20_000
    since: datetime | None = None
    sample_seed: int | None = None
    strict: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.policy_source not in POLICY_SOURCES:
            raise ConfigError(f"policy_source={self.policy_source!r} is not one of {POLICY_SOURCES}")
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(f"acceleration={self.acceleration!r} is not one of {ACCELERATIONS}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows={self.max_rows} must be >= 1")
        if self.since is not None and self.since.tzinfo is None:
            raise ConfigError(f"since={self.since.isoformat()} has no timezone; add one, e.g. 2026-12-01T00:00Z")
        if self.sample_seed is not None and self.max_rows is None:
            raise ConfigError("sample_seed draws max_rows rows at random: give max_rows too")
        if Path(self.output).exists() and not self.force:
            raise ArchiveError(f"{self.output} exists. Hint: pass --force to overwrite it")


@dataclass(frozen=True)
class BuildOutcome:
    """What a build wrote: the cached archive, its version and spec, and the report (as report.json holds it)."""

    output: Path
    version: str
    spec: CacheSpec
    report: dict[str, Any]
    #: Request ids of the logged rows the cache was certified on (it never trained on them).
    certify_ids: tuple[str, ...] = ()


def build_cached_archive(request: BuildRequest, *, progress: Progress = no_progress) -> BuildOutcome:
    """Build a cached archive from recorded traffic (see the module docstring).

    Raises:
        LogError: the logs are missing, too few, or unusable.
        GraphError: the backbone cannot be traced (see the hint in the message).
        ArchiveError: the archive is not a usable eager classifier archive, or ``output`` exists.
    """
    t0 = time.perf_counter()
    table = _read(
        request.logs,
        max_rows=request.max_rows,
        since=request.since,
        sample_seed=request.sample_seed,
        strict=request.strict,
    )
    info = read_mar(request.mar)
    with tempfile.TemporaryDirectory(prefix="layercache-build-") as tmp:
        loaded = open_mar(request.mar, Path(tmp) / "mar")
        backbone = loaded.backbone
        mapping = loaded.model_dir / "index_to_name.json"
        index_to_name = json.loads(mapping.read_text()) if mapping.is_file() else None
        torch.manual_seed(request.config.seed)
        result = build_cache(
            backbone,
            table,
            request.config,
            preprocess=loaded.preprocess,
            index_to_name=index_to_name,
            progress=progress,
        )
        heads_file = Path(tmp) / "heads.pt"
        torch.save(heads_state_dict(result.heads), heads_file)
        sample = policy_sample(LoggedInputs(table, loaded.preprocess), seed=request.config.seed)
        sample_file = Path(tmp) / "sample.pt"
        torch.save(sample, sample_file)
        spec = dataclasses.replace(
            result.spec, provenance=provenance(table, request.logs, result.report), acceleration=request.acceleration
        )
        result.report["provenance"] = spec.provenance
        if request.measure_policy and spec.exits:
            model = CachedModel.from_spec(backbone, spec, heads_state_dict(result.heads))
            spec = dataclasses.replace(spec, policy=measure_policy(model, sample))
            result.report["policy"] = spec.policy
            logger.info("policy measured on this device: %s", spec.policy)
        version = request.version or f"{info.version}-cached"
        log_dir = str(Path(request.log_dir).resolve()) if request.log_dir else None
        if log_dir is None and info.mode is not None:
            log_dir = HandlerConfig.from_yaml_config(info.yaml_config).log_dir
        package_cached(
            request.mar,
            request.output,
            spec_json=spec.to_json(),
            heads_file=heads_file,
            handler_config=HandlerConfig(log_dir=log_dir, policy_source=request.policy_source),
            version=version,
            force=request.force,
            sample_file=sample_file,
        )
    report = result.report
    report["build_seconds_total"] = round(time.perf_counter() - t0, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["output"] = str(request.output)
    report["version"] = version
    if request.report_dir is not None:
        write_report(report, Path(request.report_dir))
    exits = ", ".join(f"{e['node']} (hit {e['hit_rate']:.1%})" for e in report["exits"]) or "none"
    logger.info(
        "cached archive %s (version %s): exits %s; FLOPs %.3f x original; agreement %.2f%%; %.0f s",
        request.output,
        version,
        exits,
        report["flops_ratio"],
        100 * report["agreement"],
        report["build_seconds_total"],
    )
    ids = tuple(table.column("request_id").take(pa.array(result.certify_rows)).to_pylist())
    return BuildOutcome(Path(request.output), version, spec, report, ids)


def provenance(table: Any, logs: Path, report: dict[str, Any]) -> dict[str, Any]:
    """What a build used, kept in the cache so that ``build_cache.py --check`` can tell when it went stale: the
    logged rows (how many, their time range), the log dir, the backbone's weights, when it was built."""
    import pyarrow.compute as pc

    times = pc.min_max(table.column("time"))
    return {
        "rows": table.num_rows,
        "time_min": times["min"].as_py().isoformat(),
        "time_max": times["max"].as_py().isoformat(),
        "log_dir": str(Path(logs).resolve()),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tolerance": report["tolerance"],
    }


def _read(
    logs: Path,
    *,
    max_rows: int | None,
    since: datetime | None = None,
    sample_seed: int | None = None,
    strict: bool = False,
) -> Any:
    compacted = compact(logs) if Path(logs).is_dir() else []
    if compacted:
        logger.info("compacted %d finished log segments to Parquet", len(compacted))
    # read_logs reads only the chosen rows' columns: a log larger than memory still builds with max_rows.
    return read_logs(logs, max_rows=max_rows, since=since, sample_seed=sample_seed, strict=strict)


@dataclass(frozen=True)
class LayerListing:
    """The candidate layers of an archive's classifier and every layer it can be cut at (fx node names).

    ``excluded``: cuttable layers no head can read (node -> reason, e.g. a channels-last activation);
    ``leaf_modules``: module classes traced as leaves (given or found automatically where torch.fx fails).
    """

    candidates: list[Candidate]
    cuttable: list[str]
    excluded: dict[str, str] = field(default_factory=dict)
    leaf_modules: tuple[str, ...] = ()

    def text(self) -> str:
        lines = ["candidate layers (fx node names):"]
        lines += [f"  {c.node}  shape={list(c.shape)}  flops_after={c.flops_remaining}" for c in self.candidates]
        lines.append("all layers with a single live value: " + ", ".join(self.cuttable))
        if self.excluded:
            lines.append("layers that cannot carry a head:")
            lines += [f"  {node}: {why}" for node, why in self.excluded.items()]
        if self.leaf_modules:
            lines.append("leaf modules (traced as one node, not cut inside): " + ", ".join(self.leaf_modules))
        return "\n".join(lines) + "\n"


def list_layers(mar: Path, logs: Path, *, leaf_modules: tuple[str, ...] = ()) -> LayerListing:
    """Candidate layers of the archive's classifier for the logged input shape, and every cuttable layer."""
    table = _read(logs, max_rows=1)
    with tempfile.TemporaryDirectory(prefix="layercache-layers-") as tmp:
        loaded = open_mar(mar, Path(tmp) / "mar")
        example = LoggedInputs(table, loaded.preprocess).batch([0])
        model = loaded.backbone
        leaves = leaf_modules_for(model, leaf_modules)
        return LayerListing(
            find_candidates(model, example, leaf_modules=leaves),
            list_layer_names(model, leaf_modules=leaves),
            excluded_layers(model, example, leaf_modules=leaves),
            leaves,
        )
