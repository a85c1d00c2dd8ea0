"""The whole layercache story on Fashion-MNIST, end to end against a real TorchServe.

Archives the embedded classifier as a plain .mar, wraps it for recording, serves it, records real traffic over
HTTP, builds the cache from that traffic, swaps the cached version in through the management API while requests
keep coming, then sends held-out images to both versions and prints a before/after table (accuracy, agreement,
hit rate per exit, FLOPs, latency, throughput, failed requests). TorchServe is always stopped at the end (unless
--keep-running), also after an error or Ctrl-C.

The traffic is the first --traffic images of the Fashion-MNIST test split, the evaluation set the last --eval
(never seen by the build). Everything is written under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from layercache.errors import LayercacheError  # noqa: E402 - imports no torch

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_cnn"
MODEL = "fashion"
VERSION = "1.0"
CACHED_VERSION = f"{VERSION}-cached"
MARKER = ".layercache-demo"
# What the demo writes under --out; the only paths it ever deletes there.
OWNED = (MARKER, "data", "model-store", "logs", "report", "torchserve", "summary.md", ".layercache-swap.json")
WARMUP_REQUESTS = 32
# As the example archive's model-config.yaml says (layercache.testing.backbones.archive_fashion_classifier).
BATCH_SIZE, MAX_BATCH_DELAY_MS = 8, 20
# Unix socket paths are limited to 108 bytes; TorchServe puts worker sockets in TEMP.
MAX_SOCKET_DIR = 80

EPILOG = """examples:
  make demo                                   # installs what is missing, then runs this with the defaults
  python tools/demo.py                        # writes demo-out/, prints the before/after table
  python tools/demo.py --traffic 3000 --eval 500 --trials 2 --epochs 8     # a quicker, rougher run
  python tools/demo.py --out /tmp/lc-demo --tolerance 0.02 --keep-running  # leave TorchServe up afterwards

--out: the demo cleans and reuses a folder it made itself (it holds a .layercache-demo marker file). Any other
existing, non-empty folder is refused unless --force; even then only the demo's own entries in it are replaced
(data/, model-store/, logs/, report/, torchserve/, summary.md, .layercache-swap.json).
Exit status: 0 done, 1 a step failed (see the log), 2 usage error.
"""


class DemoError(LayercacheError):
    """A demo step failed (exit status 1)."""


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
    epochs: int
    keep_running: bool
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
        default=6000,
        help="images sent as traffic and recorded for the build: the first N of the test split (default: 6000)",
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
    p.add_argument("--trials", type=int, default=None, help="head architectures tried per layer (default: the build's)")
    p.add_argument(
        "--epochs",
        type=int,
        default=12,
        help="max training epochs per head (default: 12, to keep the demo near 3 minutes; the build's own is 20)",
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
        quiet=ns.quiet,
    )


# ------------------------------------------------------------------------------------------------------ state
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


@dataclass(frozen=True)
class Image:
    """One PNG and its true class index."""

    path: Path
    label: int


@dataclass
class Demo:
    """Where everything goes, and what the steps found out."""

    args: DemoArgs
    out: Path
    names: dict[str, int] = field(default_factory=dict)
    traffic: list[Image] = field(default_factory=list)
    evaluation: list[Image] = field(default_factory=list)
    server: Any = None
    traffic_run: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    swap_answers: list[Any] = field(default_factory=list)
    swap_seconds: float = 0.0
    runs: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.out / "model-store"

    def mar(self, kind: str) -> Path:
        return self.store / {"plain": "fashion.mar", "rec": "fashion_rec.mar", "cached": "fashion_cached.mar"}[kind]

    @property
    def predictions(self) -> str:
        return f"{self.server.inference_url}/predictions/{MODEL}"


# ------------------------------------------------------------------------------------------------------ steps
def send(
    url: str, images: Sequence[Image], concurrency: int, names: dict[str, int], desc: str, token: str | None
) -> Any:
    """Every image once with ``concurrency`` client threads; answers come back in image order. ``token``: the
    inference key (TorchServe runs with token authorization on)."""
    from layercache.progress import progress
    from layercache.testing.load import send_all

    def bar(answers: Iterable[Any], label: str, total: int) -> Iterable[Any]:
        return progress(answers, label, total=total)

    bodies = [img.path.read_bytes() for img in images]
    return send_all(url, bodies, concurrency, names, progress=bar, desc=desc, token=token)


class BackgroundLoad:
    """Requests to the default route from a few threads until stopped: what clients see during the swap."""

    def __init__(
        self, url: str, bodies: Sequence[bytes], names: dict[str, int], token: str | None, threads: int = 2
    ) -> None:
        self.url, self.bodies, self.names, self.token = url, list(bodies), names, token
        self.answers: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, offset: int) -> None:
        from layercache.testing.load import predict

        deadline = time.monotonic() + 600.0  # stops by itself, whatever happens
        i = offset
        while not self._stop.is_set() and time.monotonic() < deadline:
            answer = predict(self.url, self.bodies[i % len(self.bodies)], self.names, token=self.token)
            with self._lock:
                self.answers.append(answer)
            i += len(self._threads)

    def __enter__(self) -> BackgroundLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from layercache.testing.load import REQUEST_TIMEOUT_S

        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 5)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def _folder(root: Path) -> list[Image]:
    """The PNGs of an ImageFolder in file-name order (the folder name is the class index)."""
    return sorted((Image(p, int(p.parent.name)) for p in root.glob("*/*.png")), key=lambda i: i.path.name)


def write_data(demo: Demo) -> None:
    """The first --traffic and the last --eval test images as PNG ImageFolders under OUT/data."""
    from layercache.datasets import load_fashion_mnist, write_image_folder

    prepare_out(demo.out)
    images, labels = load_fashion_mnist("test")
    n, t, e = len(images), demo.args.traffic, demo.args.eval
    data = demo.out / "data"
    write_image_folder(images[:t], labels[:t], data / "traffic", start=0)
    write_image_folder(images[n - e :], labels[n - e :], data / "eval", start=n - e)
    demo.traffic, demo.evaluation = _folder(data / "traffic"), _folder(data / "eval")
    logger.info("%d traffic images, %d evaluation images in %s", len(demo.traffic), len(demo.evaluation), data)


def archive(demo: Demo) -> None:
    """The embedded classifier as a plain .mar (what a user already has), then wrapped for recording."""
    from layercache.archive import wrap_for_recording
    from layercache.config import HandlerConfig
    from layercache.testing.backbones import archive_fashion_classifier

    archive_fashion_classifier(EXAMPLE, demo.mar("plain"), name=MODEL, version=VERSION)
    config = HandlerConfig(log_dir=str((demo.out / "logs").resolve()), input_shape=(1, 28, 28))
    wrap_for_recording(demo.mar("plain"), demo.mar("rec"), handler_config=config)


def start(demo: Demo) -> None:
    """TorchServe on free loopback ports, the recording archive registered as version 1.0."""
    demo.server.start()
    client = demo.server.client(timeout_s=180)
    client.register(
        demo.mar("rec").name,
        MODEL,
        initial_workers=demo.args.workers,
        batch_size=BATCH_SIZE,
        max_batch_delay_ms=MAX_BATCH_DELAY_MS,
    )
    client.wait_ready(MODEL, VERSION, timeout_s=120)
    client.ensure_workers(MODEL, VERSION, demo.args.workers)
    logger.info("TorchServe up: inference %s, logs in %s", demo.server.inference_url, demo.server.workdir)


def send_traffic(demo: Demo) -> None:
    """Every traffic image over HTTP: the recording archive answers and records each one."""
    run = send(
        demo.predictions, demo.traffic, demo.args.concurrency, demo.names, "traffic", demo.server.inference_token
    )
    logger.info("traffic: %d requests in %.1f s, %d failed", len(run.answers), run.seconds, run.failed)
    if run.failed == len(run.answers):
        raise DemoError(f"every traffic request failed; see the TorchServe logs in {demo.server.workdir}")
    demo.traffic_run = run


def build(demo: Demo) -> None:
    """The cache from the recorded traffic (no labels used for training), with its report."""
    from layercache.build import BuildConfig
    from layercache.pipeline import BuildRequest, build_cached_archive
    from layercache.progress import progress

    defaults = BuildConfig()
    config = BuildConfig(
        tolerance=demo.args.tolerance,
        trials=demo.args.trials or defaults.trials,
        train=dataclasses.replace(defaults.train, epochs=demo.args.epochs),
    )
    request = BuildRequest(
        mar=demo.mar("rec"),
        logs=demo.out / "logs",
        output=demo.mar("cached"),
        config=config,
        report_dir=demo.out / "report",
    )
    demo.report = build_cached_archive(request, progress=progress).report


def swap_under_load(demo: Demo) -> None:
    """Swap the default to the cached version through the management API while two clients keep sending."""
    from layercache.swap import SwapRequest, swap_version

    bodies = [img.path.read_bytes() for img in demo.traffic[:200]]
    request = SwapRequest(
        model=MODEL,
        mar=demo.mar("cached"),
        workers=demo.args.workers,
        model_store=demo.store,
        state_file=demo.out / ".layercache-swap.json",
    )
    with BackgroundLoad(demo.predictions, bodies, demo.names, demo.server.inference_token) as load:
        t0 = time.perf_counter()
        swap_version(demo.server.client(timeout_s=180), request)
        demo.swap_seconds = time.perf_counter() - t0
        # A few more requests on the new default before the load stops.
        target, deadline = load.count() + 2 * demo.args.concurrency, time.monotonic() + 30
        while load.count() < target and time.monotonic() < deadline:
            time.sleep(0.05)
    demo.swap_answers = load.answers
    failed = sum(a.status != 200 for a in demo.swap_answers)
    logger.info("swap took %.1f s; %d of %d requests during it failed", demo.swap_seconds, failed, len(load.answers))


def evaluate(demo: Demo) -> None:
    """The evaluation images to each version, after a short warm-up, at the same concurrency."""
    token = demo.server.inference_token
    for version in (VERSION, CACHED_VERSION):
        url = f"{demo.predictions}/{version}"
        send(url, demo.evaluation[:WARMUP_REQUESTS], demo.args.concurrency, demo.names, f"warm-up {version}", token)
        demo.runs[version] = send(url, demo.evaluation, demo.args.concurrency, demo.names, f"eval {version}", token)


# ---------------------------------------------------------------------------------------------------- summary
def summary_markdown(demo: Demo, steps: Steps) -> str:
    """The before/after table and how the demo went."""
    from layercache.evaluation import (
        BACKBONE,
        exit_flops,
        from_run,
        markdown_table,
        ms,
        pct,
        score,
        summarize_latency,
    )

    labels = [img.label for img in demo.evaluation]
    before, after = from_run(demo.runs[VERSION]), from_run(demo.runs[CACHED_VERSION])
    total = float(demo.report["mean_flops_original"])
    s_before = score(before, labels=labels, costs={BACKBONE: total})
    s_after = score(after, reference=before.predicted, labels=labels, costs=exit_flops(demo.report))
    l_before, l_after = summarize_latency(before), summarize_latency(after)
    exits = [e["node"] for e in demo.report["exits"]]
    rows = [
        ("accuracy (true labels)", pct(s_before["accuracy"]), pct(s_after["accuracy"])),
        (f"agreement with {VERSION}", pct(1.0), pct(s_after["agreement"])),
    ]
    for node in [*exits, BACKBONE]:
        label = "answered by the whole backbone" if node == BACKBONE else f"hit rate at exit `{node}`"
        rows.append((label, pct(s_before["exit_rates"].get(node, 0.0)), pct(s_after["exit_rates"].get(node, 0.0))))
    ratio = s_after["mean_flops"] / s_before["mean_flops"]
    speed = l_after["rps"] / l_before["rps"]
    rows += [
        (
            "mean FLOPs per request",
            f"{s_before['mean_flops'] / 1e6:.1f}M",
            f"{s_after['mean_flops'] / 1e6:.1f}M ({ratio:.2f}x)",
        ),
        ("latency p50", ms(l_before["p50_ms"]), ms(l_after["p50_ms"])),
        ("latency p90", ms(l_before["p90_ms"]), ms(l_after["p90_ms"])),
        ("throughput", f"{l_before['rps']:.1f} req/s", f"{l_after['rps']:.1f} req/s ({speed:.2f}x)"),
        ("failed requests", f"{before.failed} of {len(before)}", f"{after.failed} of {len(after)}"),
    ]
    swap_failed = sum(a.status != 200 for a in demo.swap_answers)
    args = demo.args
    lines = [
        "# layercache demo: before / after",
        "",
        f"{len(before)} held-out Fashion-MNIST test images (never seen by the build) sent to "
        f"`/predictions/{MODEL}/{VERSION}` (the recording archive, before) and `/predictions/{MODEL}/"
        f"{CACHED_VERSION}` (the cache built from {len(demo.traffic_run.answers)} recorded requests at tolerance "
        f"{args.tolerance}, after), {args.concurrency} concurrent clients, TorchServe batch size {BATCH_SIZE}, "
        f"{args.workers} worker(s) per version with OMP_NUM_THREADS=1.",
        "",
        *markdown_table(["", f"{VERSION} (before)", f"{CACHED_VERSION} (after)"], rows),
        "",
        f"FLOPs: {demo.report.get('flops_counter', 'n/a')}; per request from the exit it took (the build report's "
        f"mean on its own test split: {float(demo.report['mean_flops_cached']) / 1e6:.1f}M of {total / 1e6:.1f}M).",
        "",
        f"Traffic: {len(demo.traffic_run.answers)} requests, {demo.traffic_run.failed} failed. Swap {VERSION} -> "
        f"{CACHED_VERSION} through the management API took {demo.swap_seconds:.1f} s under background load: "
        f"{swap_failed} of {len(demo.swap_answers)} requests failed.",
        "",
        f"Build report: {demo.out / 'report' / 'report.md'}",
        "",
        "## Demo steps (wall time)",
        "",
        *markdown_table(["step", "seconds"], [*((n, f"{s:.1f}") for n, s in steps.seconds.items())]),
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


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop TorchServe


def run_demo(args: DemoArgs, steps: Steps) -> str:
    """All steps; returns the summary Markdown. TorchServe is stopped on the way out unless --keep-running."""
    from layercache.evaluation import name_to_index
    from layercache.testing.torchserve import TorchServeProcess

    check_prerequisites()
    demo = Demo(args, args.out.resolve())
    demo.names = name_to_index(json.loads((EXAMPLE / "index_to_name.json").read_text(encoding="utf-8")))
    with steps.step("1. write Fashion-MNIST images"):
        write_data(demo)
    with steps.step("2. archive the classifier and wrap it for recording"):
        archive(demo)
    workdir = demo.out / "torchserve"
    if len(str(workdir / "temp")) > MAX_SOCKET_DIR:
        workdir = None  # a temp dir under /tmp keeps the worker socket paths short enough
    demo.server = TorchServeProcess(demo.store, workdir=workdir, env={"OMP_NUM_THREADS": "1"}, start_timeout_s=120)
    signal.signal(signal.SIGTERM, _sigterm)
    started = False
    try:
        with steps.step("3. start TorchServe and register the recording archive"):
            started = True
            start(demo)
        with steps.step(f"4. send {len(demo.traffic)} traffic requests (recorded)"):
            send_traffic(demo)
        with steps.step("5. build the cache from the recorded traffic"):
            build(demo)
        with steps.step("6. swap to the cached version under load"):
            swap_under_load(demo)
        with steps.step(f"7. send {len(demo.evaluation)} evaluation requests to each version"):
            evaluate(demo)
    except BaseException:
        if started:
            logger.error("TorchServe logs at the failure (all of them in %s):\n%s", demo.server.workdir,
                         demo.server.logs_text(max_chars=4000))  # fmt: skip
        raise
    finally:
        if args.keep_running and started and demo.server.workdir is not None:
            logger.warning(
                "TorchServe keeps running (inference %s, management %s, metrics %s; token authorization on, keys "
                "in %s). Stop it with:\n  TMPDIR=%s %s -m ts.model_server --stop --foreground",
                demo.server.inference_url,
                demo.server.management_url,
                demo.server.metrics_url,
                demo.server.key_file,
                demo.server.workdir / "tmp",
                sys.executable,
            )
        else:
            with steps.step("8. stop TorchServe"):
                demo.server.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return summary_markdown(demo, steps)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status.

    Example::

        main(["--out", "/tmp/lc-demo", "--traffic", "2000", "--eval", "500"])
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
    except (LayercacheError, OSError, RuntimeError) as error:
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
