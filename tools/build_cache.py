"""Build a cached .mar from recorded traffic (no labels, no training data).

Reads the logs, finds candidate layers (torch.fx), searches and trains cache heads by KL distillation against
the backbone's outputs, calibrates them (temperature scaling), sets thresholds from the accuracy-drop tolerance
(tolerance/2^n for the n-th head), picks the best subset (K(S) score) and packages the cached .mar with a report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from layercache.archive import package_cached, read_mar  # noqa: E402
from layercache.build import BuildConfig, build_cache, policy_sample  # noqa: E402
from layercache.cli import progress, setup_logging  # noqa: E402
from layercache.config import POLICIES, HandlerConfig  # noqa: E402
from layercache.errors import LayercacheError  # noqa: E402
from layercache.logs import compact, decode_inputs, read_logs  # noqa: E402
from layercache.report import write_report  # noqa: E402
from layercache.runtime import CachedModel, heads_state_dict, measure_policy  # noqa: E402
from layercache.torchserve_adapter import open_mar  # noqa: E402
from layercache.training import TrainConfig  # noqa: E402

logger = logging.getLogger("build_cache")

EPILOG = """examples:
  python tools/build_cache.py --mar model-store/fashion.mar --logs logs/fashion --tolerance 0.01 \\
      -o model-store/fashion_cached.mar --report reports/fashion
  python tools/build_cache.py --mar model.mar --logs logs/m --cost latency --version 2.0 -o m_cached.mar --report r/
  python tools/build_cache.py --mar model.mar --logs logs/m --list-layers
"""


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
        help="accepted accuracy drop, 0.01 = 1 point (default: 0.01); it must be at least about 4.6 / (validation "
        "rows, 20%% of the logged requests) for any head to answer: 0.0033 for 7,000 requests",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="how sure each head's threshold must be to keep its wrong answers within its share of the tolerance "
        "(one-sided, exact Poisson bound on the validation split): higher is safer on unseen traffic and saves "
        "less (default: 0.9, BuildConfig.margin_z = 1.28)",
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
        "Workers on a GPU time their own device at startup instead (layercache.policy: auto)",
    )
    p.add_argument(
        "--worker-policy",
        choices=POLICIES,
        default="auto",
        help="where cached workers get their per-batch-size mode: 'startup' times it on the worker's device "
        "before taking traffic, 'stored' uses --policy's (or shrink everywhere), 'auto' is startup on a GPU, "
        "stored elsewhere (default: auto)",
    )
    p.add_argument("--layers", default=None, help="comma-separated candidate fx node names (default: automatic)")
    p.add_argument("--list-layers", action="store_true", help="print the candidate and all cuttable layers, then exit")
    p.add_argument("--trials", type=int, default=4, help="head architectures tried per layer (default: 4)")
    p.add_argument("--epochs", type=int, default=20, help="max training epochs per head, early stopped (default: 20)")
    p.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads while training heads: small heads train fastest on one (default: 1)",
    )
    p.add_argument("--max-rows", type=int, default=None, help="use at most this many logged rows (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and shuffling (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device for the build (default: cpu)")
    p.add_argument("--force", action="store_true", help="overwrite the output archive (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars (default: off)")
    p.add_argument("--verbose", action="store_true", help="debug logging (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if not args.list_layers and args.output is None:
        parser.error("-o/--output is required (the cached .mar to write)")
    if args.output is not None and args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    if not 0 < args.tolerance < 1:
        parser.error(f"--tolerance {args.tolerance} must be in (0, 1), e.g. 0.01")
    if args.confidence is not None and not 0.5 < args.confidence < 1:
        parser.error(f"--confidence {args.confidence} must be in (0.5, 1), e.g. 0.9 or 0.95")
    if args.device != "cpu":
        logger.warning("--device %s: the build runs on the CPU in this version", args.device)
    t0 = time.perf_counter()
    try:
        return _run(args, t0)
    except LayercacheError as exc:
        logger.error("%s", exc)
        return 1


def _run(args: argparse.Namespace, t0: float) -> int:
    compacted = compact(args.logs) if args.logs.is_dir() else []
    if compacted:
        logger.info("compacted %d finished log segments to Parquet", len(compacted))
    table = read_logs(args.logs)
    if args.max_rows is not None:
        table = table.slice(0, args.max_rows)
    info = read_mar(args.mar)
    with tempfile.TemporaryDirectory(prefix="layercache-build-") as tmp:
        loaded = open_mar(args.mar, Path(tmp) / "mar")
        backbone = loaded.backbone
        if args.list_layers:
            from layercache.graph import find_candidates, list_layer_names

            example = torch.from_numpy(decode_inputs(table.slice(0, 1))).float()
            cands = find_candidates(backbone, example)
            sys.stdout.write("candidate layers (fx node names):\n")
            for c in cands:
                sys.stdout.write(f"  {c.node}  shape={list(c.shape)}  flops_after={c.flops_remaining}\n")
            sys.stdout.write("all layers with a single live value: " + ", ".join(list_layer_names(backbone)) + "\n")
            return 0
        index_to_name = None
        mapping = Path(tmp) / "mar" / "index_to_name.json"
        if mapping.is_file():
            index_to_name = json.loads(mapping.read_text())
        config = BuildConfig(
            tolerance=args.tolerance,
            seed=args.seed,
            trials=args.trials,
            cost=args.cost,
            train=TrainConfig(epochs=args.epochs, patience=3, seed=args.seed, num_threads=args.train_threads),
            nodes=tuple(args.layers.split(",")) if args.layers else None,
            **({} if args.confidence is None else {"margin_z": NormalDist().inv_cdf(args.confidence)}),
        )
        torch.manual_seed(args.seed)
        result = build_cache(backbone, table, config, index_to_name=index_to_name, progress=progress)
        heads_file = Path(tmp) / "heads.pt"
        torch.save(heads_state_dict(result.heads), heads_file)
        sample = policy_sample(table, seed=args.seed)
        sample_file = Path(tmp) / "sample.pt"
        torch.save(sample, sample_file)
        spec = result.spec
        if args.policy and spec.exits:
            model = CachedModel.from_spec(backbone, spec, heads_state_dict(result.heads))
            spec = dataclasses.replace(spec, policy=measure_policy(model, sample))
            result.report["policy"] = spec.policy
            logger.info("policy measured on this device: %s", spec.policy)
        version = args.version or f"{info.version}-cached"
        log_dir = str(args.log_dir.resolve()) if args.log_dir else None
        if log_dir is None and info.mode is not None:
            log_dir = HandlerConfig.from_yaml_config(info.yaml_config).log_dir
        handler_cfg = HandlerConfig(log_dir=log_dir, policy=args.worker_policy)
        package_cached(
            args.mar,
            args.output,
            spec_json=spec.to_json(),
            heads_file=heads_file,
            handler_config=handler_cfg,
            version=version,
            force=args.force,
            sample_file=sample_file,
        )
    report = result.report
    report["build_seconds_total"] = round(time.perf_counter() - t0, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["output"] = str(args.output)
    report["version"] = version
    if args.report is not None:
        write_report(report, args.report)
    exits = ", ".join(f"{e['node']} (hit {e['hit_rate']:.1%})" for e in report["exits"]) or "none"
    logger.info(
        "cached archive %s (version %s): exits %s; FLOPs %.3f x original; agreement %.2f%%; %.0f s",
        args.output,
        version,
        exits,
        report["flops_ratio"],
        100 * report["agreement"],
        report["build_seconds_total"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
