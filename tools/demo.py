"""The whole layercache story on Fashion-MNIST, end to end against a real TorchServe.

Archives the embedded default classifier as a plain .mar, wraps it for recording, serves it, records real
traffic over HTTP, builds the cache from that traffic, swaps the cached version in through the management API
while requests keep coming, then sends held-out images to both versions and prints a before/after table
(accuracy, agreement, hit rate per exit, FLOPs, latency, throughput, failed requests). TorchServe is always
stopped at the end (unless --keep-running), also after an error or Ctrl-C.

The traffic is the first --traffic images of the Fashion-MNIST test split, the evaluation set the last --eval
(never seen by the build). Everything is written under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from layercache.entry import tool_module  # noqa: E402 - after the path fix
from layercache.errors import LayercacheError  # noqa: E402 - after the path fix; imports no torch
from layercache.report import exit_flops  # noqa: E402 - after the path fix
from layercache.testing.load import REQUEST_TIMEOUT_S, Answer, Run, predict, send_all  # noqa: E402 - ditto

logger = logging.getLogger("demo")

MODEL = "fashion"
VERSION = "1.0"
CACHED_VERSION = f"{VERSION}-cached"
BACKBONE = "backbone"
INDEX_TO_NAME = ROOT / "examples" / "fashion_cnn" / "index_to_name.json"
MARKER = ".layercache-demo"
# What the demo writes under --out; the only paths it ever deletes there.
OWNED = (MARKER, "data", "model-store", "logs", "report", "torchserve", "summary.md", ".layercache-swap.json")
WARMUP_REQUESTS = 32
# Unix socket paths are limited to 108 bytes; TorchServe puts worker sockets in TEMP.
MAX_SOCKET_DIR = 80

EPILOG = """examples:
  make demo                                   # installs what is missing, then runs this with the defaults
  python tools/demo.py                        # writes demo-out/, prints the before/after table
  python tools/demo.py --traffic 1000 --eval 500 --trials 2 --epochs 10    # a quicker, rougher run
  python tools/demo.py --out /tmp/lc-demo --tolerance 0.02 --keep-running  # leave TorchServe up afterwards

--out: the demo cleans and reuses a folder it made itself (it holds a .layercache-demo marker file). Any other
existing, non-empty folder is refused unless --force; even then only the demo's own entries in it are replaced
(data/, model-store/, logs/, report/, torchserve/, summary.md, .layercache-swap.json).
Exit status: 0 done, 1 a step failed (see the log), 2 usage error.
"""


# ---------------------------------------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class DemoArgs:
    """The parsed command line."""

    out: Path
    traffic: int
    eval: int
    concurrency: int
    tolerance: float
    workers: int
    trials: int | None
    epochs: int | None
    keep_running: bool
    force: bool
    quiet: bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="output folder; a previous demo's folder is cleaned and reused, any other non-empty one "
        "needs --force (default: demo-out)",
    )
    p.add_argument(
        "--traffic",
        type=int,
        default=3000,
        help="images sent as traffic and recorded for the build: the first N of the test split (default: 3000)",
    )
    p.add_argument(
        "--eval",
        type=int,
        default=1000,
        help="held-out images sent to both versions: the last N of the test split (default: 1000)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="concurrent client requests (default: 8)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="accepted accuracy drop for the build, 0.01 = one point (default: 0.01)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="TorchServe workers per version, each with OMP_NUM_THREADS=1 (default: 1)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="passed to build_cache.py --trials: head architectures tried per layer (default: build_cache.py's own)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passed to build_cache.py --epochs: max training epochs per head (default: build_cache.py's own)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave TorchServe running at the end and print how to stop it (default: stop it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use an existing non-empty --out that is not a previous demo's, replacing only the demo's "
        "own entries in it (default: refuse)",
    )
    p.add_argument("--quiet", action="store_true", help="warnings and the final table only (default: off)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> DemoArgs:
    ns = parser.parse_args(argv)
    for name, low in (("traffic", 50), ("eval", 1), ("concurrency", 1), ("workers", 1)):
        if getattr(ns, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(ns, name)}")
    for name in ("trials", "epochs"):
        if getattr(ns, name) is not None and getattr(ns, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(ns, name)}")
    if ns.traffic + ns.eval > 10_000:
        parser.error(f"--traffic {ns.traffic} + --eval {ns.eval} exceeds the 10000 test images of Fashion-MNIST")
    if not 0 < ns.tolerance < 1:
        parser.error(f"--tolerance {ns.tolerance} must be in (0, 1), e.g. 0.01")
    out = ns.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not ns.force:
        parser.error(
            f"--out {out} is not empty and was not made by the demo; pass --force to replace the demo's "
            f"entries in it, or choose another folder"
        )
    return DemoArgs(
        out=out,
        traffic=ns.traffic,
        eval=ns.eval,
        concurrency=ns.concurrency,
        tolerance=ns.tolerance,
        workers=ns.workers,
        trials=ns.trials,
        epochs=ns.epochs,
        keep_running=ns.keep_running,
        force=ns.force,
        quiet=ns.quiet,
    )


# ------------------------------------------------------------------------------------------------------ timing
@dataclass
class Steps:
    """Wall time of each demo step, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        logger.info("== %s", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0
            logger.info("== %s: %.1f s", name, self.seconds[name])


# ---------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Image:
    """One PNG and its true class index."""

    path: Path
    label: int


def send_images(url: str, images: Sequence[Image], concurrency: int, name_to_index: dict[str, int], desc: str) -> Run:
    """Send every image once with ``concurrency`` client threads; answers come back in image order."""
    from layercache.cli import progress

    def bar(answers: Iterable[Answer], label: str, total: int) -> Iterable[Answer]:
        return progress(answers, label, total=total)

    bodies = [img.path.read_bytes() for img in images]
    return send_all(url, bodies, concurrency, name_to_index, progress=bar, desc=desc)


class BackgroundLoad:
    """Requests to the default route from a few threads until stopped: what clients see during the swap."""

    def __init__(
        self, url: str, bodies: Sequence[bytes], name_to_index: dict[str, int], threads: int = 2, limit_s: float = 600.0
    ) -> None:
        self.url, self.bodies, self.name_to_index = url, list(bodies), name_to_index
        self.limit_s = limit_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True, name=f"demo-load-{i}") for i in range(threads)
        ]

    def _run(self, offset: int) -> None:
        deadline = time.monotonic() + self.limit_s
        i = offset
        while not self._stop.is_set() and time.monotonic() < deadline:
            answer = predict(self.url, self.bodies[i % len(self.bodies)], self.name_to_index)
            with self._lock:
                self.answers.append(answer)
            i += len(self._threads)

    def __enter__(self) -> BackgroundLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 5)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


# ------------------------------------------------------------------------------------------------------- data
def write_images(out: Path, traffic: int, evaluation: int) -> tuple[list[Image], list[Image]]:
    """The first ``traffic`` and the last ``evaluation`` test images as PNG ImageFolders under ``out``."""
    from layercache.datasets import load_fashion_mnist, write_image_folder

    images, labels = load_fashion_mnist("test")
    n = len(images)
    write_image_folder(images[:traffic], labels[:traffic], out / "traffic", start=0)
    write_image_folder(images[n - evaluation :], labels[n - evaluation :], out / "eval", start=n - evaluation)
    return _folder(out / "traffic"), _folder(out / "eval")


def _folder(root: Path) -> list[Image]:
    """The PNGs of an ImageFolder in file-name order (the folder name is the class index)."""
    return sorted((Image(p, int(p.parent.name)) for p in root.glob("*/*.png")), key=lambda i: i.path.name)


# ------------------------------------------------------------------------------------------------------- FLOPs
# ----------------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Measured:
    """What one version did on the evaluation images."""

    version: str
    run: Run
    accuracy: float
    agreement: float
    hit_rates: dict[str, float]
    mean_flops: float

    @property
    def latencies_ms(self) -> list[float]:
        return [1e3 * a.seconds for a in self.run.answers if a.status == 200]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def measure(
    version: str,
    run: Run,
    images: Sequence[Image],
    reference: Run | None,
    exit_costs: dict[str, float] | None,
    total_flops: float,
) -> Measured:
    ok = [(a, img) for a, img in zip(run.answers, images) if a.status == 200]
    accuracy = sum(a.predicted == img.label for a, img in ok) / len(ok) if ok else math.nan
    if reference is None:
        agreement = 1.0
    else:
        pairs = [(a, r) for a, r in zip(run.answers, reference.answers) if a.status == 200 and r.status == 200]
        agreement = sum(a.predicted == r.predicted for a, r in pairs) / len(pairs) if pairs else math.nan
    exits: dict[str, int] = {}
    for a, _ in ok:
        exits[a.exit or BACKBONE] = exits.get(a.exit or BACKBONE, 0) + 1
    hit_rates = {k: v / len(ok) for k, v in exits.items()} if ok else {}
    if exit_costs is None:
        mean_flops = total_flops
    else:
        mean_flops = (
            sum(exit_costs.get(a.exit or BACKBONE, exit_costs[BACKBONE]) for a, _ in ok) / len(ok) if ok else math.nan
        )
    return Measured(version, run, accuracy, agreement, hit_rates, mean_flops)


def summary_markdown(
    before: Measured,
    after: Measured,
    exit_order: Sequence[str],
    *,
    args: DemoArgs,
    traffic: Run,
    swap_load: list[Answer],
    swap_seconds: float,
    report: dict[str, Any],
    steps: Steps,
    report_md: Path,
) -> str:
    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.2f}%"

    def ms(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.1f} ms"

    rows = [
        ("accuracy (true labels)", pct(before.accuracy), pct(after.accuracy)),
        (f"agreement with {VERSION}", pct(before.agreement), pct(after.agreement)),
    ]
    for node in [*exit_order, BACKBONE]:
        label = "answered by the whole backbone" if node == BACKBONE else f"hit rate at exit `{node}`"
        rows.append((label, pct(before.hit_rates.get(node, 0.0)), pct(after.hit_rates.get(node, 0.0))))
    ratio = after.mean_flops / before.mean_flops if before.mean_flops else math.nan
    rows += [
        ("mean FLOPs per request", f"{before.mean_flops / 1e6:.2f}M", f"{after.mean_flops / 1e6:.2f}M ({ratio:.3f}x)"),
        ("latency p50", ms(_percentile(before.latencies_ms, 50)), ms(_percentile(after.latencies_ms, 50))),
        ("latency p90", ms(_percentile(before.latencies_ms, 90)), ms(_percentile(after.latencies_ms, 90))),
        (
            "throughput",
            f"{len(before.run.answers) / before.run.seconds:.1f} req/s",
            f"{len(after.run.answers) / after.run.seconds:.1f} req/s",
        ),
        (
            "failed requests",
            f"{before.run.failed} of {len(before.run.answers)}",
            f"{after.run.failed} of {len(after.run.answers)}",
        ),
    ]
    swap_failed = sum(a.status != 200 for a in swap_load)
    lines = [
        "# layercache demo: before / after",
        "",
        f"{len(before.run.answers)} held-out Fashion-MNIST test images (never seen by the build) sent to "
        f"`/predictions/{MODEL}/{VERSION}` (the recording archive, before) and `/predictions/{MODEL}/"
        f"{CACHED_VERSION}` (the cache built from {len(traffic.answers)} recorded requests at tolerance "
        f"{args.tolerance}, after), {args.concurrency} concurrent clients, TorchServe batch size 8, "
        f"{args.workers} worker(s) per version with OMP_NUM_THREADS=1.",
        "",
        f"| | {VERSION} (before) | {CACHED_VERSION} (after) |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"FLOPs: {report.get('flops_counter', 'n/a')}; per request from the exit it took (the build report's "
        f"mean on its own test split: {float(report['mean_flops_cached']) / 1e6:.2f}M of "
        f"{float(report['mean_flops_original']) / 1e6:.2f}M).",
        "",
        f"Traffic: {len(traffic.answers)} requests, {traffic.failed} failed. Swap {VERSION} -> {CACHED_VERSION} "
        f"through the management API took {swap_seconds:.1f} s under background load: {swap_failed} of "
        f"{len(swap_load)} requests failed.",
        "",
        f"Build report: {report_md}",
        "",
        "## Demo steps (wall time)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {s:.1f} |" for name, s in steps.seconds.items()],
        f"| total | {sum(steps.seconds.values()):.1f} |",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def prepare_out(out: Path) -> None:
    """Remove the demo's own entries under ``out`` (never anything else) and mark the folder as the demo's."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    (out / MARKER).write_text("made by tools/demo.py; the demo cleans and reuses this folder\n", encoding="utf-8")


def check_prerequisites() -> None:
    """Java and the torchserve package, checked before anything is written (``make install`` provides both)."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home, "bin", "java")) if java_home else "java"
    missing = []
    if shutil.which(java) is None:
        missing.append(f"java ({java}; JDK 17)")
    if importlib.util.find_spec("ts") is None:
        missing.append(f"the torchserve package for {sys.executable}")
    if missing:
        raise DemoError(f"{' and '.join(missing)} missing. Hint: run `make install` (or `make demo`)")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise DemoError(f"{what} exited with status {rc} (see the log above)")


class DemoError(RuntimeError):
    """A demo step failed (exit status 1)."""


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop TorchServe


def run_demo(args: DemoArgs, steps: Steps) -> str:
    """All steps; returns the summary Markdown. TorchServe is stopped on the way out unless --keep-running."""
    from layercache.testing.torchserve import TorchServeProcess

    make_default_model, wrap_mar = tool_module("tools/make_default_model.py"), tool_module("archiver/wrap_mar.py")
    build_cache, swap_version = tool_module("tools/build_cache.py"), tool_module("tools/swap_version.py")

    out = args.out.resolve()
    store, logs, report_dir = out / "model-store", out / "logs", out / "report"
    plain_mar, rec_mar, cached_mar = store / "fashion.mar", store / "fashion_rec.mar", store / "fashion_cached.mar"
    index_to_name = json.loads(INDEX_TO_NAME.read_text(encoding="utf-8"))
    name_to_index = {str(name): int(i) for i, name in index_to_name.items()}
    quiet = ["--quiet"] if args.quiet else []
    check_prerequisites()

    with steps.step("1. write Fashion-MNIST images"):
        prepare_out(out)
        traffic_images, eval_images = write_images(out / "data", args.traffic, args.eval)
        logger.info(
            "%d traffic images in %s, %d evaluation images in %s",
            len(traffic_images),
            out / "data" / "traffic",
            len(eval_images),
            out / "data" / "eval",
        )

    with steps.step("2. archive the classifier and wrap it for recording"):
        _check(make_default_model.main(["-o", str(plain_mar), "--force", *quiet]), "make_default_model.py")
        _check(
            wrap_mar.main(
                [
                    str(plain_mar),
                    "-o",
                    str(rec_mar),
                    "--log-dir",
                    str(logs),
                    "--input-shape",
                    "1,28,28",
                    "--force",
                    *quiet,
                ]
            ),
            "wrap_mar.py",
        )

    workdir = out / "torchserve"
    if len(str(workdir / "temp")) > MAX_SOCKET_DIR:
        workdir = None  # a temp dir under /tmp keeps the worker socket paths short enough
    server = TorchServeProcess(store, workdir=workdir, env={"OMP_NUM_THREADS": "1"}, start_timeout_s=120)
    signal.signal(signal.SIGTERM, _sigterm)
    started = False
    try:
        with steps.step("3. start TorchServe and register the recording archive"):
            server.start()
            started = True
            client = server.client(timeout_s=180)
            client.register(rec_mar.name, MODEL, initial_workers=args.workers, batch_size=8, max_batch_delay_ms=20)
            client.wait_ready(MODEL, VERSION, timeout_s=120)
            client.ensure_workers(MODEL, VERSION, args.workers)
            logger.info(
                "TorchServe up: inference %s, management %s, logs in %s",
                server.inference_url,
                server.management_url,
                server.workdir,
            )

        predictions = f"{server.inference_url}/predictions/{MODEL}"
        with steps.step(f"4. send {len(traffic_images)} traffic requests (recorded)"):
            traffic = send_images(predictions, traffic_images, args.concurrency, name_to_index, "traffic")
            logger.info(
                "traffic: %d requests in %.1f s, %d failed", len(traffic.answers), traffic.seconds, traffic.failed
            )
            if traffic.failed == len(traffic.answers):
                raise DemoError("every traffic request failed; see the TorchServe logs in " + str(server.workdir))

        with steps.step("5. build the cache from the recorded traffic"):
            build_argv = [
                "--mar",
                str(rec_mar),
                "--logs",
                str(logs),
                "--tolerance",
                str(args.tolerance),
                "-o",
                str(cached_mar),
                "--report",
                str(report_dir),
                "--force",
                *quiet,
            ]
            if args.trials is not None:
                build_argv += ["--trials", str(args.trials)]
            if args.epochs is not None:
                build_argv += ["--epochs", str(args.epochs)]
            _check(build_cache.main(build_argv), "build_cache.py")
            report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))

        with steps.step("6. swap to the cached version under load"):
            bodies = [img.path.read_bytes() for img in traffic_images[:200]]
            with BackgroundLoad(predictions, bodies, name_to_index) as load:
                t0 = time.perf_counter()
                rc = swap_version.main(
                    [
                        "--model",
                        MODEL,
                        "--mar",
                        str(cached_mar),
                        "--management",
                        server.management_url,
                        "--model-store",
                        str(store),
                        "--workers",
                        str(args.workers),
                        "--state-file",
                        str(out / ".layercache-swap.json"),
                        *quiet,
                    ]
                )
                swap_seconds = time.perf_counter() - t0
                # A few more requests on the new default before the load stops.
                target = load.count() + 2 * args.concurrency
                deadline = time.monotonic() + 30
                while load.count() < target and time.monotonic() < deadline:
                    time.sleep(0.05)
            _check(rc, "swap_version.py")  # swap_version scales the new version to --workers itself
            swap_load = load.answers
            logger.info(
                "swap took %.1f s; %d of %d requests during it failed",
                swap_seconds,
                sum(a.status != 200 for a in swap_load),
                len(swap_load),
            )

        with steps.step(f"7. send {len(eval_images)} evaluation requests to each version"):
            runs: dict[str, Run] = {}
            for version in (VERSION, CACHED_VERSION):
                url = f"{predictions}/{version}"
                send_images(url, eval_images[:WARMUP_REQUESTS], args.concurrency, name_to_index, f"warm-up {version}")
                runs[version] = send_images(url, eval_images, args.concurrency, name_to_index, f"eval {version}")
            total, costs = float(report["mean_flops_original"]), exit_flops(report)
            before = measure(VERSION, runs[VERSION], eval_images, None, None, total)
            after = measure(CACHED_VERSION, runs[CACHED_VERSION], eval_images, runs[VERSION], costs, total)
    except BaseException:
        if started:
            logger.error(
                "TorchServe logs at the failure (all of them in %s):\n%s",
                server.workdir,
                server.logs_text(max_chars=4000),
            )
        raise
    finally:
        if args.keep_running and started and server.workdir is not None:
            logger.warning(
                "TorchServe keeps running (inference %s, management %s, metrics %s). Stop it with:\n"
                "  TMPDIR=%s %s -m ts.model_server --stop --foreground",
                server.inference_url,
                server.management_url,
                server.metrics_url,
                server.workdir / "tmp",
                sys.executable,
            )
        else:
            with steps.step("8. stop TorchServe"):
                server.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    exit_order = [e["node"] for e in report["exits"]]
    return summary_markdown(
        before,
        after,
        exit_order,
        args=args,
        traffic=traffic,
        swap_load=swap_load,
        swap_seconds=swap_seconds,
        report=report,
        steps=steps,
        report_md=report_dir / "report.md",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status.

    Example::

        main(["--out", "/tmp/lc-demo", "--traffic", "1000", "--eval", "500"])
    """
    parser = build_parser()
    args = parse_args(parser, argv)
    from layercache.cli import setup_logging

    setup_logging(args.quiet)
    steps = Steps()
    t0 = time.perf_counter()
    try:
        text = run_demo(args, steps)
    except KeyboardInterrupt:
        logger.error("demo interrupted")
        return 130
    except (DemoError, LayercacheError, OSError, RuntimeError) as error:
        logger.error("demo failed: %s", error)
        return 1
    except Exception as error:  # noqa: BLE001 - anything unexpected: report it with its traceback, exit 1
        logger.exception("demo failed: %s: %s", type(error).__name__, error)
        return 1
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    # The table is the demo's result: plain stdout, so `make demo > result.md` keeps it apart from the log.
    sys.stdout.write(text)
    sys.stdout.write(
        f"\nSummary: {args.out / 'summary.md'}   build report: {args.out / 'report' / 'report.md'}   "
        f"whole demo: {time.perf_counter() - t0:.0f} s\n"
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
