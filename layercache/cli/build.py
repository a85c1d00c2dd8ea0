"""Build a cached .mar from recorded traffic (no labels, no training data).

Reads the logs, finds candidate layers (torch.fx), searches and trains cache heads by KL distillation against
the backbone's outputs, calibrates them (temperature scaling), sets thresholds from the accuracy-drop tolerance
(tolerance/2^n for the n-th head), picks the best subset (K(S) score) and packages the cached .mar with a report.
The archive's own Python code (model file, handler) runs here, as in TorchServe: build only from archives you
trust.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist

from layercache.build import RULES, BuildConfig
from layercache.cli import run_command, setup_logging
from layercache.config import ACCELERATIONS, POLICY_SOURCES
from layercache.errors import ConfigError
from layercache.pipeline import BuildRequest, build_cached_archive, list_layers
from layercache.progress import progress
from layercache.refresh import NEW_FRACTION, check_cache
from layercache.training import TrainConfig

logger = logging.getLogger("layercache.build")
#: Exit status of --check for a stale cache (0 fresh, 1 error, 2 usage).
STALE = 3

EPILOG = """examples:
  python tools/build_cache.py --mar model-store/fashion.mar --logs logs/fashion --tolerance 0.01 \\
      -o model-store/fashion_cached.mar --report reports/fashion
  python tools/build_cache.py --mar model.mar --logs logs/m --cost latency --version 2.0 -o m_cached.mar --report r/
  python tools/build_cache.py --mar model.mar --logs logs/m --list-layers
  python tools/build_cache.py --check --mar model-store/fashion_cached.mar --logs logs/fashion   # 0 fresh, 3 stale
  python tools/build_cache.py --mar model.mar --logs logs/m --acceleration onnx -o m_cached.mar
  python tools/build_cache.py --mar tf_port.mar --logs logs/t --leaf-modules SamePadConv2d -o t_cached.mar
"""


def _utc_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time such as 2026-12-01T08:00Z") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_cache.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mar", type=Path, required=True, help="the original (or recording) classifier archive")
    p.add_argument("--logs", type=Path, required=True, help="log dir written by the recording handler")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="accepted drop in agreement with the original model, 0.01 = 1 point (default: 0.01); the build "
        "certifies it on 30%% of the logged requests, which needs at least 3 / that many rows even with no "
        "disagreement: 0.0014 for 7,000 requests (the report says how many requests a failed certification needs)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=0.05,
        help="the promise's error probability: with probability >= 1 - delta the cache agrees with the backbone "
        "on >= 1 - tolerance of traffic like the logged one (exact binomial bound on rows the cascade never saw; "
        "default: 0.05)",
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        default="certified",
        help="certified: one promise for the whole cache (--tolerance, --delta); per-head: each head's threshold "
        "keeps a Poisson bound of its wrong answers within tolerance/2^n, no cache-wide promise (for comparison; "
        "default: certified)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="with --rule per-head: how sure each head's bound must be (one-sided, exact Poisson bound on the "
        "validation split; default: 0.9, BuildConfig.margin_z = 1.28)",
    )
    p.add_argument("-o", "--output", type=Path, help="cached archive to write (.mar); required unless --list-layers")
    p.add_argument("--report", type=Path, default=None, help="report dir: report.json, report.md, PNGs (default: none)")
    p.add_argument("--version", default=None, help="version of the cached archive (default: <original>-cached)")
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where the cached archive keeps recording traffic (default: the recording archive's log dir "
        "when --mar is one, else $LAYERCACHE_LOG_DIR/<model> or ~/.layercache/logs/<model>)",
    )
    p.add_argument(
        "--cost",
        choices=("flops", "latency"),
        default="flops",
        help="select the head subset by FLOPs or by latency measured on this device (default: flops)",
    )
    p.add_argument(
        "--policy",
        action="store_true",
        help="time shrink / no-shrink / backbone-only per batch size (1-128) on this device and store the "
        "fastest in the cache, so the cached model skips what does not pay here (default: off: always shrink). "
        "Workers on a GPU time their own device at startup instead (--policy-source auto)",
    )
    p.add_argument(
        "--policy-source",
        choices=POLICY_SOURCES,
        default="auto",
        help="where cached workers get their per-batch-size policy: 'startup' times it on the worker's device "
        "before taking traffic, 'stored' uses --policy's (or shrink everywhere), 'auto' is startup on a GPU, "
        "stored elsewhere (default: auto)",
    )
    p.add_argument(
        "--acceleration",
        choices=ACCELERATIONS,
        default="none",
        help="engine cached workers run the segments and heads on, built at load on the archive's logged sample "
        "(layercache.accel; compile/int8 take a while at startup, int8/onnx need the CPU and the accel extras; a "
        "worker without the package serves eager with a warning) (default: none)",
    )
    p.add_argument("--layers", default=None, help="comma-separated candidate fx node names (default: automatic)")
    p.add_argument("--list-layers", action="store_true", help="print the candidate and all cuttable layers, then exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="do not build: say whether the cached archive --mar is stale against --logs (new traffic, a changed "
        "backbone, verified answers below the promise); exit status 0 fresh, 3 stale",
    )
    p.add_argument(
        "--new-fraction",
        type=float,
        default=NEW_FRACTION,
        help="with --check: share of logged requests newer than the build that makes it stale "
        f"(default: {NEW_FRACTION})",
    )
    p.add_argument(
        "--leaf-modules",
        default=None,
        help="comma-separated module class names torch.fx must not trace into, e.g. SamePadConv2d or "
        "my_model.blocks:SamePadConv2d (default: only those found automatically where tracing fails)",
    )
    p.add_argument("--trials", type=int, default=4, help="head architectures tried per layer (default: 4)")
    p.add_argument("--epochs", type=int, default=20, help="max training epochs per head, early stopped (default: 20)")
    p.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads while training heads: small heads train fastest on one (default: 1)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=20_000,
        help="build from the newest N logged requests: the build's memory follows N, not the log (default: 20000)",
    )
    p.add_argument(
        "--since",
        type=_utc_time,
        default=None,
        help="only requests logged at or after this ISO time, e.g. 2026-12-01 or 2026-12-01T08:00+01:00 (UTC when "
        "no zone is given; default: no limit)",
    )
    p.add_argument(
        "--sample-seed",
        type=int,
        default=None,
        help="draw the --max-rows requests at random with this seed instead of taking the newest (default: newest)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a log file that cannot be read (default: skip it, with a warning naming it and its rows)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and shuffling (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device for the build (default: cpu)")
    p.add_argument("--force", action="store_true", help="overwrite the output archive (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars (default: off)")
    p.add_argument("--verbose", action="store_true", help="debug logging (default: off)")
    return p


@dataclass(frozen=True)
class BuildArgs:
    """The parsed command line: a build request, or a request to list the layers."""

    request: BuildRequest | None
    mar: Path
    logs: Path
    check: bool = False
    new_fraction: float = NEW_FRACTION
    leaf_modules: tuple[str, ...] = ()


def _leaf_modules(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[BuildArgs, argparse.Namespace]:
    ns = parser.parse_args(argv)
    if ns.check:
        if not 0 < ns.new_fraction <= 1:
            parser.error(f"--new-fraction {ns.new_fraction} must be in (0, 1]")
        return BuildArgs(None, ns.mar, ns.logs, check=True, new_fraction=ns.new_fraction), ns
    if not ns.list_layers and ns.output is None:
        parser.error("-o/--output is required (the cached .mar to write)")
    if ns.output is not None and ns.output.exists() and not ns.force:
        parser.error(f"{ns.output} exists; pass --force to overwrite it")
    if not 0 < ns.tolerance < 1:
        parser.error(f"--tolerance {ns.tolerance} must be in (0, 1), e.g. 0.01")
    if ns.confidence is not None and not 0.5 < ns.confidence < 1:
        parser.error(f"--confidence {ns.confidence} must be in (0.5, 1), e.g. 0.9 or 0.95")
    if ns.confidence is not None and ns.rule != "per-head":
        parser.error("--confidence sets the per-head rule's bound; with the certified rule use --delta")
    if not 0 < ns.delta < 0.5:
        parser.error(f"--delta {ns.delta} must be in (0, 0.5), e.g. 0.05")
    if ns.list_layers:
        return BuildArgs(None, ns.mar, ns.logs, leaf_modules=_leaf_modules(ns.leaf_modules)), ns
    try:
        config = BuildConfig(
            tolerance=ns.tolerance,
            rule=ns.rule,
            delta=ns.delta,
            seed=ns.seed,
            trials=ns.trials,
            cost=ns.cost,
            train=TrainConfig(epochs=ns.epochs, patience=3, seed=ns.seed, num_threads=ns.train_threads),
            nodes=tuple(ns.layers.split(",")) if ns.layers else None,
            leaf_modules=_leaf_modules(ns.leaf_modules),
            **({} if ns.confidence is None else {"margin_z": NormalDist().inv_cdf(ns.confidence)}),
        )
        request = BuildRequest(
            mar=ns.mar,
            logs=ns.logs,
            output=ns.output,
            config=config,
            report_dir=ns.report,
            version=ns.version,
            log_dir=ns.log_dir,
            measure_policy=ns.policy,
            policy_source=ns.policy_source,
            acceleration=ns.acceleration,
            max_rows=ns.max_rows,
            since=ns.since,
            sample_seed=ns.sample_seed,
            strict=ns.strict,
            force=ns.force,
        )
    except ConfigError as exc:
        parser.error(str(exc))
    return BuildArgs(request, ns.mar, ns.logs), ns


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, ns = parse_args(parser, argv)
    setup_logging(ns.quiet, ns.verbose)
    if ns.device != "cpu":
        logger.warning("--device %s: the build runs on the CPU in this version", ns.device)
    request = args.request
    if args.check:

        def call() -> int:
            found = check_cache(args.mar, args.logs, new_fraction=args.new_fraction)
            sys.stdout.write(found.text())
            return STALE if found.stale else 0

    elif request is None:

        def call() -> None:
            sys.stdout.write(list_layers(args.mar, args.logs, leaf_modules=args.leaf_modules).text())

    else:

        def call() -> None:
            build_cached_archive(request, progress=progress)

    return run_command(call, logger)
