"""The trunk scenario against a real TorchServe, stage by stage (each stage a module-scoped fixture, in order):

1. ``served``: the shipped Fashion-MNIST classifier archived (``tools/make_default_model.py``) and wrapped for
   recording (``archiver/wrap_mar.py``), served with 2 workers, batch size 8, max batch delay 50 ms.
2. ``recorded``: 600 predictions from 12 client threads; one worker is SIGKILLed midway while traffic goes on.
3. ``bad_batches``: bursts mixing good images with a non-image body and a wrong-shape JSON tensor.
4. ``built``: ``tools/build_cache.py`` in-process on the recorded logs.
5. ``swapped``: ``tools/swap_version.py`` to the cached archive while 8 client threads keep sending; then
   explanations while predictions go on; then the cached version's ``?customized=true`` description and metrics.
6. ``stopped``: TorchServe stopped (it SIGKILLs every worker), the whole log dir compacted and read back.

TorchServe runs with token authorization on, as the shipped config.properties: every request carries the
inference or the management key from the server's key_file.json, and the swap reads it with ``--key-file``.

Takes about 2 minutes on 2 cores, most of it the cache build. TorchServe's own logs stay in pytest's temp dir
(``trunk0/ts/logs``) for failure analysis.

How a request is matched to its recorded row: TorchServe answers every request, 200 or not, with an
``x-request-id`` header carrying the id the worker got (``context.get_request_id``), which is what the recorder
writes into ``request_id``. The test keeps that header of every response and looks the row up by it. To make sure
a row is not attributed to the wrong request, the row's ``input`` must also be the test's own preprocessing of the
image that request sent (each request sends one Fashion-MNIST test image) and its ``prediction`` the answer's top
class.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from layercache.testing.torchserve import TorchServeProcess, require_torchserve

pytestmark = pytest.mark.integration

MODEL = "fashion"
VERSION = "1.0"
CACHED_VERSION = "1.0-cached"
BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 50
REQUEST_TIMEOUT_S = 30.0
LOAD_LIMIT_S = 120.0  # a traffic thread stops by itself after this long, whatever happens
RECORD_REQUESTS = 600
RECORD_THREADS = 12
KILL_AFTER = 200  # answers before one worker is SIGKILLed
SWAP_THREADS = 8
CACHED_ANSWERS = 200  # answers wanted from the cached version after the swap
MEAN, STD = 0.2860, 0.3530  # examples/fashion_cnn/fashion_handler.py
EXIT_HEADER = "x-layercache-exit"
NOT_AN_IMAGE = b"not an image"
WRONG_SHAPE = json.dumps([[0.5, 0.5], [0.5, 0.5]]).encode()
CLASS_NAMES = json.loads(
    (Path(__file__).resolve().parents[2] / "examples" / "fashion_cnn" / "index_to_name.json").read_text()
)


# ------------------------------------------------------------------------------------------------------ clients
@dataclass(frozen=True)
class Answer:
    """One HTTP exchange as the client saw it."""

    kind: str  # "predict" or "explain"
    image: int  # index of the test image sent; -1 for a body that is not one
    status: int  # HTTP status; -1 when no answer came (refused, reset, timed out)
    headers: dict[str, str]  # names lowercased
    body: bytes
    sent: float  # time.monotonic()
    done: float

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def json(self) -> Any:
        return json.loads(self.body)

    def top_class(self) -> str:
        answer = self.json()
        assert isinstance(answer, dict), f"a prediction answers {{class: probability}}, got {str(answer)[:200]}"
        return max(answer, key=answer.get)


def post(
    url: str,
    body: bytes,
    *,
    image: int,
    auth: Mapping[str, str],
    kind: str = "predict",
    content_type: str = "image/png",
) -> Answer:
    """``auth``: the inference key's header (TorchServeProcess.inference_headers)."""
    # An explicit content type: urllib's default (form-urlencoded) makes TorchServe parse the body as a form.
    headers = {"Content-Type": content_type, **auth}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    sent = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, headers, payload = response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        status, headers, payload = error.code, dict(error.headers.items()), error.read()
    except OSError as error:  # refused, reset, timed out
        status, headers, payload = -1, {}, repr(error).encode()
    return Answer(kind, image, status, {k.lower(): v for k, v in headers.items()}, payload, sent, time.monotonic())


@dataclass
class Traffic:
    """``threads`` clients sending predictions back to back (test images ``first``, ``first + 1``, ... in turn)
    from start until stop, or until LOAD_LIMIT_S at the latest."""

    url: str
    pngs: Sequence[bytes]
    threads: int
    first: int
    auth: Mapping[str, str]
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self._next = self.first
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for thread in self._workers:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(REQUEST_TIMEOUT_S + 5)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                image, self._next = self._next, self._next + 1
            answer = post(self.url, self.pngs[image % len(self.pngs)], image=image % len(self.pngs), auth=self.auth)
            with self._lock:
                self.answers.append(answer)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def wait_for(self, count: int, *, after: float = 0.0, timeout_s: float = 60.0) -> None:
        """Wait until ``count`` answers to requests sent after monotonic time ``after`` have arrived."""
        deadline = time.monotonic() + timeout_s
        while sum(a.sent > after for a in self.snapshot()) < count:
            if time.monotonic() > deadline:
                got = sum(a.sent > after for a in self.snapshot())
                raise AssertionError(f"only {got} of {count} answers after {timeout_s:g} s")
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------------- log helpers
ROW_COLUMNS = [
    "request_id",
    "time",
    "model_version",
    "body",
    "input_shape",
    "top_classes",
    "top_probs",
    "prediction",
    "exit",
]


def rows_by_id(table: Any) -> dict[str, dict[str, Any]]:
    """Recorded rows keyed by request id (pyarrow table or pandas DataFrame)."""
    records = table.to_pylist() if hasattr(table, "to_pylist") else table.to_dict("records")
    return {r["request_id"]: r for r in records}


def check_rows(answers: Sequence[Answer], rows: dict[str, dict[str, Any]], pngs: Sequence[bytes]) -> None:
    """Every 200 prediction has its row, and the row holds that request's body and answer."""
    missing = [a.request_id for a in answers if a.request_id not in rows]
    assert not missing, f"{len(missing)} of {len(answers)} answered requests have no recorded row: {missing[:5]}"
    for a in answers:
        row = rows[a.request_id]
        assert list(row["input_shape"]) == [1, 28, 28]
        # The request body as received: the PNG this request sent (the build replays the preprocess on it).
        assert bytes(row["body"]) == pngs[a.image], a.request_id
        top, answer = a.top_class(), a.json()
        assert CLASS_NAMES[str(row["prediction"])] == top, (a.request_id, row["prediction"], answer)
        assert list(row["top_classes"])[0] == row["prediction"]
        assert row["top_probs"][0] == pytest.approx(answer[top], abs=1e-4)
        assert row["exit"] == a.headers.get(EXIT_HEADER), (a.request_id, row["exit"], a.headers)


# ------------------------------------------------------------------------------------------------------ stages
@dataclass
class Served:
    server: TorchServeProcess
    store: Path
    log_dir: Path
    rec_mar: Path
    images: np.ndarray
    pngs: list[bytes]
    timings: dict[str, float]

    @property
    def predict_url(self) -> str:
        return f"{self.server.inference_url}/predictions/{MODEL}"

    @property
    def auth(self) -> dict[str, str]:
        return self.server.inference_headers()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_torchserve()
    from PIL import Image

    from archiver.wrap_mar import main as wrap_main
    from layercache.datasets import load_fashion_mnist
    from tools.make_default_model import main as make_main

    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("trunk")
    store, log_dir = tmp / "model-store", tmp / "logs"
    store.mkdir()
    plain, rec_mar = tmp / "fashion.mar", store / "fashion_rec.mar"
    assert make_main(["-o", str(plain), "--quiet"]) == 0
    assert (
        wrap_main([str(plain), "-o", str(rec_mar), "--log-dir", str(log_dir), "--input-shape", "1,28,28", "--quiet"])
        == 0
    )
    images, _ = load_fashion_mnist("test")
    images = images[:2000]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    timings = {"archives": time.monotonic() - started}
    started = time.monotonic()

    with TorchServeProcess(store, workdir=tmp / "ts", env={"OMP_NUM_THREADS": "1"}) as server:
        client = server.client(timeout_s=120)
        client.register(
            rec_mar.name, MODEL, initial_workers=1, batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS
        )
        # The archive's model-config.yaml says maxWorkers 1, which caps initial_workers: scale explicitly.
        client.scale(MODEL, VERSION, 2)
        client.wait_ready(MODEL, VERSION, timeout_s=60)
        description = client.describe(MODEL, VERSION)
        assert (description["batchSize"], description["maxBatchDelay"]) == (BATCH_SIZE, MAX_BATCH_DELAY_MS)
        assert len(server.worker_pids(MODEL, VERSION)) == 2
        timings["serving"] = time.monotonic() - started
        yield Served(server, store, log_dir, rec_mar, images, pngs, timings)


@dataclass
class Recorded:
    answers: list[Answer]
    killed_pid: int
    survivor_pid: int
    kill_time: float


@pytest.fixture(scope="module")
def recorded(served: Served) -> Recorded:
    started = time.monotonic()
    pids = served.server.worker_pids(MODEL, VERSION)
    killed, survivor = pids[0], pids[1]
    with ThreadPoolExecutor(RECORD_THREADS) as pool:
        futures = [
            pool.submit(post, served.predict_url, served.pngs[i], image=i, auth=served.auth)
            for i in range(RECORD_REQUESTS)
        ]
        deadline = time.monotonic() + 60
        while sum(f.done() for f in futures) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(killed, signal.SIGKILL)
        kill_time = time.monotonic()
        _, pending = wait(futures, timeout=120)
        assert not pending, f"{len(pending)} requests still pending after 120 s"
    answers = [f.result() for f in futures]
    served.timings["record"] = time.monotonic() - started
    return Recorded(answers, killed, survivor, kill_time)


@dataclass
class BadBatches:
    bursts: list[list[Answer]]


@pytest.fixture(scope="module")
def bad_batches(served: Served, recorded: Recorded) -> BadBatches:
    """Bursts of 6 images + a non-image body + a wrong-shape JSON tensor, sent together so that they share a batch.

    Repeated (5 at most) until the 400 message of the non-image body says it was not the first row of its batch.
    """
    bursts = []
    with ThreadPoolExecutor(8) as pool:
        for burst in range(5):
            first = 700 + 10 * burst
            futures = [
                pool.submit(post, served.predict_url, served.pngs[i], image=i, auth=served.auth)
                for i in range(first, first + 6)
            ]
            time.sleep(0.005)  # the bad ones last: then they are not row 0 of their batch
            futures.append(
                pool.submit(
                    post,
                    served.predict_url,
                    NOT_AN_IMAGE,
                    image=-1,
                    auth=served.auth,
                    content_type="application/octet-stream",
                )
            )
            futures.append(
                pool.submit(
                    post, served.predict_url, WRONG_SHAPE, image=-1, auth=served.auth, content_type="application/json"
                )
            )
            bursts.append([f.result() for f in futures])
            if _batch_row(served, bursts[-1][6]) > 0:
                break
    return BadBatches(bursts)


def _batch_row(served: Served, answer: Answer, timeout_s: float = 10.0) -> int:
    """The row of its batch that a request failed in preprocessing was: the worker logs it (the client's message
    carries no batch position, which would mean nothing to it)."""
    log = served.server.workdir / "logs" / "model_log.log"
    pattern = re.compile(rf"request {re.escape(answer.request_id or '?')} \(batch position (\d+)\)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the frontend writes the worker's lines a moment later
        match = pattern.search(log.read_text(errors="replace")) if log.is_file() else None
        if match:
            return int(match.group(1))
        time.sleep(0.2)
    return -1


@dataclass
class Built:
    cached_mar: Path
    report: dict[str, Any]
    returncode: int
    seconds: float


@pytest.fixture(scope="module")
def built(served: Served, bad_batches: BadBatches) -> Built:
    from tools.build_cache import main as build_main

    cached_mar, report_dir = served.store / "fashion_cached.mar", served.store.parent / "report"
    started = time.monotonic()
    code = build_main(
        [
            "--mar",
            str(served.rec_mar),
            "--logs",
            str(served.log_dir),
            "--tolerance",
            "0.05",
            "-o",
            str(cached_mar),
            "--report",
            str(report_dir),
            "--trials",
            "2",
            "--epochs",
            "8",
            "--quiet",
        ]
    )
    seconds = time.monotonic() - started
    served.timings["build"] = seconds
    report = json.loads((report_dir / "report.json").read_text()) if (report_dir / "report.json").is_file() else {}
    return Built(cached_mar, report, code, seconds)


@dataclass
class Swapped:
    returncode: int
    answers: list[Answer]
    swap_started: float
    swap_done: float
    explanations: list[Answer]
    default_version: str | None
    versions: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def swapped(served: Served, built: Built) -> Swapped:
    from layercache.cli.swap import main as swap_main

    assert built.returncode == 0, "the build failed: see test_build_writes_report"
    started = time.monotonic()
    server = served.server
    explain_url = f"{server.inference_url}/explanations/{MODEL}"
    with Traffic(served.predict_url, served.pngs, SWAP_THREADS, first=1000, auth=served.auth) as traffic:
        traffic.wait_for(20)
        swap_started = time.monotonic()
        code = swap_main(
            [
                "--model",
                MODEL,
                "--mar",
                str(built.cached_mar),
                "--management",
                server.management_url,
                "--key-file",
                str(server.key_file),
                "--model-store",
                str(served.store),
                "--timeout",
                "120",
                "--state-file",
                str(served.store.parent / "swap-state.json"),
                "--quiet",
            ]
        )
        swap_done = time.monotonic()
        if code == 0:
            traffic.wait_for(CACHED_ANSWERS, after=swap_done, timeout_s=90)
        with ThreadPoolExecutor(2) as pool:
            explanations = list(
                pool.map(lambda i: post(explain_url, served.pngs[i], image=i, auth=served.auth, kind="explain"), [3, 4])
            )
        traffic.wait_for(10, after=max(e.done for e in explanations))
    client = server.client()
    served.timings["swap"] = time.monotonic() - started
    return Swapped(
        code,
        traffic.snapshot(),
        swap_started,
        swap_done,
        explanations,
        client.default_version(MODEL),
        {v["modelVersion"]: v for v in client.list_versions(MODEL)},
    )


@dataclass
class Stopped:
    pandas_rows: dict[str, dict[str, Any]]
    arrow_rows: int
    segments_left: list[Path]


@pytest.fixture(scope="module")
def stopped(served: Served, recorded: Recorded, bad_batches: BadBatches, swapped: Swapped) -> Stopped:
    """Stop TorchServe (SIGKILL of every worker), compact everything, read it back with pandas and pyarrow."""
    import pandas as pd

    from layercache.trafficlog import compact, read_logs, segment_dir

    served.server.stop()
    compact(served.log_dir)
    frame = pd.read_parquet(served.log_dir, columns=ROW_COLUMNS)
    table = read_logs(served.log_dir, include_live=False)
    return Stopped(rows_by_id(frame), table.num_rows, sorted(segment_dir(served.log_dir).glob("seg-*.arrows")))


# -------------------------------------------------------------------------------------------------------- tests
def test_recording_survives_a_killed_worker(served: Served, recorded: Recorded) -> None:
    from layercache.trafficlog import compact, read_logs, segment_dir

    answers = recorded.answers
    ok = [a for a in answers if a.status == 200]
    failed = [a for a in answers if a.status != 200]
    # TorchServe fails the batch the killed worker held (507 "Worker died."); the other worker answers the rest.
    # A batch the frontend had just handed to the worker when it died gets no answer at all (TorchServe 0.12
    # loses it; seen as client timeouts, status -1): that is the frontend's, not layercache's.
    assert len(failed) <= 2 * BATCH_SIZE, f"{len(failed)} failed: {[(a.status, a.body[:80]) for a in failed[:5]]}"
    assert all(a.status >= 500 or a.status == -1 for a in failed), [(a.status, a.body[:80]) for a in failed]
    late = [a for a in answers if a.sent > recorded.kill_time + 0.5]
    assert len(late) >= 50, f"only {len(late)} requests sent after the kill"
    assert all(a.status == 200 for a in late), [(a.status, a.body[:80]) for a in late if a.status != 200]
    assert recorded.survivor_pid in served.server.worker_pids(MODEL, VERSION)

    # The killed worker's segment is orphaned: compaction (ours, or the restarted worker's in the background)
    # turns it into a Parquet part. The live workers' segments stay as they are.
    deadline = time.monotonic() + 20
    while True:
        compact(served.log_dir)
        killed_segments = list(segment_dir(served.log_dir).glob(f"seg-*-{recorded.killed_pid}-*.arrows"))
        parts = list(served.log_dir.glob(f"part-seg-*-{recorded.killed_pid}-*.parquet"))
        if not killed_segments and parts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not killed_segments and parts, (killed_segments, parts)

    rows = rows_by_id(read_logs(served.log_dir, columns=ROW_COLUMNS))
    check_rows(ok, rows, served.pngs)
    assert {rows[a.request_id]["model_version"] for a in ok} == {VERSION}
    assert {rows[a.request_id]["exit"] for a in ok} == {"backbone"}

    import pandas as pd

    # What the killed worker recorded is plain Parquet now (pandas ignores _segments/).
    frame = pd.read_parquet(served.log_dir, columns=["request_id"])
    assert len(frame) > 0 and set(frame["request_id"]) <= set(rows)
    assert any(a.request_id in set(frame["request_id"]) for a in ok)


def test_requests_are_batched(served: Served, recorded: Recorded) -> None:
    from layercache.trafficlog import read_logs

    table = read_logs(served.log_dir, columns=["request_id", "time"])
    ids = {a.request_id for a in recorded.answers if a.status == 200}
    times = [t for rid, t in zip(table["request_id"].to_pylist(), table["time"].to_pylist()) if rid in ids]
    # Each handle() call writes one record batch stamped with one time: rows sharing a time shared a batch.
    _, sizes = np.unique(np.asarray([t.timestamp() for t in times]), return_counts=True)
    assert sizes.max() > 1, "no batch of more than one request formed"
    assert sizes.max() <= BATCH_SIZE


def test_bad_input_fails_only_its_own_request(served: Served, recorded: Recorded, bad_batches: BadBatches) -> None:
    from layercache.trafficlog import read_logs

    for burst in bad_batches.bursts:
        good, not_image, wrong_shape = burst[:6], burst[6], burst[7]
        assert [a.status for a in good] == [200] * 6, [(a.status, a.body[:100]) for a in good]
        assert not_image.status == 400
        # One sentence the client can act on, no Python internals (those are in the worker log).
        assert b"could not be read as an input for this model" in not_image.body, not_image.body
        assert b"Error" not in not_image.body and b"BytesIO" not in not_image.body, not_image.body
        assert wrong_shape.status == 400
        assert b"takes inputs of shape [1, 28, 28] after preprocessing; this request gave [2, 2]" in wrong_shape.body
    assert _batch_row(served, bad_batches.bursts[-1][6]) > 0, "the non-image body never shared a batch with good images"

    rows = rows_by_id(read_logs(served.log_dir, columns=ROW_COLUMNS))
    good = [a for burst in bad_batches.bursts for a in burst[:6]]
    check_rows(good, rows, served.pngs)
    bad_ids = {a.request_id for burst in bad_batches.bursts for a in burst[6:]}
    assert None not in bad_ids and not bad_ids & set(rows), "a failed request was recorded"
    # Nothing recorded before was lost.
    check_rows([a for a in recorded.answers if a.status == 200], rows, served.pngs)


def test_build_writes_report(served: Served, built: Built) -> None:
    assert built.returncode == 0
    assert built.cached_mar.is_file()
    report = built.report
    for key in ("tolerance", "mean_flops_original", "mean_flops_cached", "exits"):
        assert key in report, f"report.json has no {key!r}: {sorted(report)}"
    assert report["tolerance"] == 0.05
    assert 0 < report["mean_flops_cached"] <= report["mean_flops_original"]
    assert report["exits"], "the build selected no exit"
    for exit_ in report["exits"]:
        for key in ("node", "threshold", "hit_rate", "cache_accuracy"):
            assert key in exit_, f"report exit has no {key!r}: {sorted(exit_)}"
        assert 0 <= exit_["hit_rate"] <= 1 and 0 <= exit_["cache_accuracy"] <= 1


def test_swap_to_cached_version_under_traffic(served: Served, swapped: Swapped) -> None:
    from layercache.archive import read_mar
    from layercache.trafficlog import read_logs

    assert swapped.returncode == 0
    predictions = swapped.answers
    failed = [(a.status, a.body[:100]) for a in predictions if a.status != 200]
    assert not failed, f"{len(failed)} of {len(predictions)} requests failed around the swap: {failed[:5]}"
    assert swapped.default_version == CACHED_VERSION
    assert set(swapped.versions) == {VERSION, CACHED_VERSION}  # the old version stays (no --retire-old)

    after = [a for a in predictions if a.sent > swapped.swap_done]
    assert len(after) >= CACHED_ANSWERS
    assert all(EXIT_HEADER in a.headers for a in after)
    exits = [a.headers[EXIT_HEADER] for a in after]
    assert any(e != "backbone" for e in exits), f"no early exit in {len(after)} answers of the cached version"

    # The cached version keeps recording, to the log dir its archive names; requests sent after the switch were
    # all answered by it.
    cached_log_dir = Path(read_mar(served.store / "fashion_cached.mar").yaml_config["layercache"]["log_dir"])
    rows = rows_by_id(read_logs(cached_log_dir, columns=ROW_COLUMNS))
    check_rows(after, rows, served.pngs)
    assert {rows[a.request_id]["model_version"] for a in after} == {CACHED_VERSION}
    assert any(rows[a.request_id]["exit"] != "backbone" for a in after)
    before = [a for a in predictions if a.done < swapped.swap_started]
    assert before and {rows[a.request_id]["model_version"] for a in before} == {VERSION}


def test_explanations_while_predicting(swapped: Swapped) -> None:
    for answer in swapped.explanations:
        assert answer.status == 200, answer.body[:200]
        attributions = np.asarray(answer.json(), dtype=np.float64)
        assert attributions.shape == (1, 28, 28)
        assert np.isfinite(attributions).all() and np.abs(attributions).sum() > 0
    start = min(a.sent for a in swapped.explanations)
    end = max(a.done for a in swapped.explanations)
    meanwhile = [a for a in swapped.answers if a.sent < end and a.done > start]
    assert meanwhile, "no prediction overlapped the explanations"
    for answer in meanwhile:
        assert answer.status == 200
        assert answer.top_class() in CLASS_NAMES.values()  # a prediction, not an attribution


def test_cached_version_describes_itself_and_counts_exits(served: Served, built: Built, swapped: Swapped) -> None:
    url = f"{served.server.management_url}/models/{MODEL}/{CACHED_VERSION}?customized=true"
    request = urllib.request.Request(url, headers=served.server.management_headers())
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        (description,) = json.loads(response.read())
    metadata = description["customizedMetadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    assert metadata["mode"] == "cached"
    assert [e["node"] for e in metadata["exits"]] == [e["node"] for e in built.report["exits"]]
    # A CPU worker with layercache.policy auto keeps the build's policy: none was measured, so shrink everywhere.
    assert metadata["policy"] == {"modes": {}, "source": "default"}

    # Model metrics reach Prometheus through the worker's log: poll a little.
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"{served.server.metrics_url}/metrics", timeout=REQUEST_TIMEOUT_S) as response:
            text = response.read().decode()
        early = [
            line
            for line in text.splitlines()
            if line.startswith("LayercacheExits{")
            and 'Exit="backbone"' not in line
            and float(line.rsplit(" ", 1)[1]) > 0
        ]
        if early or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert early, "no LayercacheExits counter for an early exit in /metrics"


def test_a_worker_times_its_policy_at_startup(served: Served, built: Built, swapped: Swapped, tmp_path: Path) -> None:
    """The built cache repackaged with ``layercache.policy: startup``: its worker times shrink / no-shrink /
    backbone-only on its own device for batch 1 and the archive's batch size before it serves."""
    import zipfile

    from layercache.archive import package_cached
    from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, SAMPLE_FILE, HandlerConfig

    with zipfile.ZipFile(built.cached_mar) as zf:
        files = {name: tmp_path / name for name in (CACHE_SPEC_FILE, HEADS_FILE, SAMPLE_FILE)}
        for name, path in files.items():
            path.write_bytes(zf.read(name))
    mar = served.store / "fashion_startup.mar"
    package_cached(
        served.rec_mar,
        mar,
        spec_json=files[CACHE_SPEC_FILE].read_text(),
        heads_file=files[HEADS_FILE],
        sample_file=files[SAMPLE_FILE],
        handler_config=HandlerConfig(record=False, policy_source="startup"),
        version="1.0-startup",
    )
    client = served.server.client(timeout_s=120)
    client.register(mar.name, "startup", initial_workers=1, batch_size=BATCH_SIZE, max_batch_delay_ms=20)
    try:
        url = f"{served.server.management_url}/models/startup/1.0-startup?customized=true"
        request = urllib.request.Request(url, headers=served.server.management_headers())
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            (description,) = json.loads(response.read())
        metadata = description["customizedMetadata"]
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        assert metadata["policy"]["source"] == "startup"
        assert set(metadata["policy"]["modes"]) == {"1", str(BATCH_SIZE)}
        assert set(metadata["policy"]["modes"].values()) <= {"shrink", "noshrink", "backbone"}
    finally:
        client.unregister("startup", "1.0-startup")


def test_logs_complete_after_stop(
    served: Served, recorded: Recorded, bad_batches: BadBatches, swapped: Swapped, stopped: Stopped
) -> None:
    assert not stopped.segments_left, "compaction left segments after every worker was gone"
    rows = stopped.pandas_rows
    assert stopped.arrow_rows >= len(rows)
    answered = [a for a in recorded.answers if a.status == 200]
    answered += [a for burst in bad_batches.bursts for a in burst[:6]]
    answered += [a for a in swapped.answers if a.status == 200]
    check_rows(answered, rows, served.pngs)
    assert not {a.request_id for burst in bad_batches.bursts for a in burst[6:]} & set(rows)
    versions = {r["model_version"] for r in rows.values()}
    assert versions == {VERSION, CACHED_VERSION}
    assert any(r["exit"] != "backbone" for r in rows.values() if r["model_version"] == CACHED_VERSION)
    total = sum(served.timings.values())
    print(f"trunk stages (s): { ({k: round(v, 1) for k, v in served.timings.items()}) }, total ~{total:.0f}")
