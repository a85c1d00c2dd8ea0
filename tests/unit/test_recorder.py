"""Recorder: append, rotation, size cap, errors never raised, SIGKILL and concurrent writers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from layercache import trafficlog as logs
from layercache.errors import ConfigError
from layercache.recorder import Recorder, RecorderConfig

REPO = Path(__file__).resolve().parents[2]
NODES = ["layer1.0.relu_1", "layer2.1.relu_1"]
SCHEMA = logs.make_schema(NODES)

# A worker process: appends batches of 4 rows and prints each acknowledged row id once append() has returned.
WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from layercache import trafficlog as logs
    from layercache.recorder import Recorder, RecorderConfig

    log_dir, tag, batches, segment_bytes, end = sys.argv[1:6]
    schema = logs.make_schema(["layer1.0.relu_1", "layer2.1.relu_1"])
    recorder = Recorder(RecorderConfig(Path(log_dir), segment_bytes=int(segment_bytes)), schema)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    i = 0
    while int(batches) < 0 or i < int(batches):
        ids = [f"{tag}-{i}-{j}" for j in range(4)]
        batch = logs.encode_batch(
            schema, request_ids=ids, model_name="m", model_version="1", weights_fingerprint="f",
            inputs=rng.normal(size=(4, 3, 16, 16)), probs=rng.dirichlet(np.ones(10), size=4),
            exits=["backbone"] * 4, acts={"layer1.0.relu_1": rng.random((4, 64))},
        )
        if recorder.append(batch) != 4:
            sys.exit(3)
        print(" ".join(ids), flush=True)
        i += 1
    if end == "wait":
        print("ready", flush=True)
        sys.stdin.readline()
    if end in ("close", "wait"):
        recorder.close()
    print("done", flush=True)
    """
)


def _batch(prefix: str, rows: int = 4, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    return logs.encode_batch(
        SCHEMA,
        request_ids=[f"{prefix}-{i}" for i in range(rows)],
        model_name="m",
        model_version="1",
        weights_fingerprint="f",
        inputs=rng.normal(size=(rows, 3, 8, 8)),
        probs=rng.dirichlet(np.ones(10), size=rows),
        exits=["backbone"] * rows,
        acts={NODES[0]: rng.random((rows, 16))},
    )


def _ids(log_dir: Path, **kwargs: object) -> list[str]:
    return logs.read_logs(log_dir, columns=["request_id"], **kwargs)["request_id"].to_pylist()


def _start_worker(tmp_path: Path, log_dir: Path, tag: str, batches: int, segment_bytes: int, end: str):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, str(script), str(log_dir), tag, str(batches), str(segment_bytes), end],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _acknowledged(output: str) -> set[str]:
    """Ids on complete lines (a line cut by the kill is not an acknowledgement)."""
    lines = output.split("\n")[:-1]
    return {row for line in lines if line not in ("ready", "done") for row in line.split()}


# ------------------------------------------------------------------------------------------------ basics


def test_config_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="segment_bytes must be > 0, got 0"):
        RecorderConfig(tmp_path, segment_bytes=0)
    with pytest.raises(ConfigError, match="max_total_bytes"):
        RecorderConfig(tmp_path, max_total_bytes=-1)


def test_nothing_is_opened_before_the_first_append(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    recorder = Recorder(RecorderConfig(log_dir), SCHEMA)
    assert not log_dir.exists()
    recorder.close()
    assert not log_dir.exists()


def test_append_then_close_is_readable_by_pandas_and_dataset(tmp_path: Path) -> None:
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    assert recorder.append(_batch("a")) == 4
    assert recorder.append(_batch("b", 3)) == 3
    segments = list(logs.segment_dir(tmp_path).glob("seg-*.arrows"))
    assert len(segments) == 1
    host_pid = segments[0].name.split("-")
    assert host_pid[2] == str(os.getpid()) and segments[0].name.endswith(".arrows")
    # On disk before close(): readable while the writer is alive.
    assert len(_ids(tmp_path)) == 7
    recorder.close()
    assert recorder.written_rows == 7 and recorder.failed_rows == 0 and recorder.dropped_rows == 0
    assert list(logs.segment_dir(tmp_path).iterdir()) == []
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{segments[0].stem}.parquet"]
    expected = {f"a-{i}" for i in range(4)} | {f"b-{i}" for i in range(3)}
    assert set(pd.read_parquet(tmp_path)["request_id"]) == expected
    assert set(ds.dataset(tmp_path, format="parquet").to_table()["request_id"].to_pylist()) == expected
    # A later append opens a new segment.
    assert recorder.append(_batch("c")) == 4
    recorder.close()
    assert len(_ids(tmp_path)) == 11


def test_rotation_by_size_writes_several_parts_and_loses_nothing(tmp_path: Path) -> None:
    one_batch = _batch("x").get_total_buffer_size()
    with Recorder(RecorderConfig(tmp_path, segment_bytes=2 * one_batch), SCHEMA) as recorder:
        for i in range(12):
            assert recorder.append(_batch(f"r{i}", seed=i)) == 4
    parts = list(tmp_path.glob("part-*.parquet"))
    assert 4 <= len(parts) <= 12
    assert list(logs.segment_dir(tmp_path).iterdir()) == []
    ids = pd.read_parquet(tmp_path)["request_id"].tolist()
    assert sorted(ids) == sorted(f"r{i}-{j}" for i in range(12) for j in range(4))


def test_compact_skips_the_live_segment_of_this_process(tmp_path: Path) -> None:
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    recorder.append(_batch("live"))
    (segment,) = logs.segment_dir(tmp_path).glob("seg-*.arrows")
    size = segment.stat().st_size
    assert logs.compact(tmp_path) == []
    assert segment.stat().st_size == size
    with pytest.raises(logs.LogError, match="no recorded rows"):
        logs.read_logs(tmp_path, include_live=False)
    assert recorder.append(_batch("more")) == 4  # still writable
    recorder.close()
    assert len(_ids(tmp_path, include_live=False)) == 8


def test_cap_drops_and_counts_rows_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    one_batch = _batch("x").get_total_buffer_size()
    cap = int(3.5 * one_batch)
    recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=cap), SCHEMA)
    with caplog.at_level(logging.WARNING, logger="layercache.recorder"):
        results = [recorder.append(_batch(f"r{i}", seed=i)) for i in range(10)]
    assert results[0] == 4 and 0 in results
    assert recorder.written_rows + recorder.dropped_rows == 40
    assert recorder.dropped_rows >= 4 * 6
    assert recorder.failed_rows == 0
    assert sum("dropping recorded rows" in r.getMessage() for r in caplog.records) == 1
    on_disk = sum(p.stat().st_size for p in logs.segment_dir(tmp_path).iterdir())
    assert on_disk <= cap + 4096  # IPC framing on top of the buffer estimate
    recorder.close()
    assert len(_ids(tmp_path)) == recorder.written_rows


def test_cap_zero_records_nothing(tmp_path: Path) -> None:
    recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=0), SCHEMA)
    assert recorder.append(_batch("x")) == 0
    assert recorder.dropped_rows == 4 and recorder.written_rows == 0
    recorder.close()


# ------------------------------------------------------------------------------------------- never raises


def test_append_never_raises_on_bad_batches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    other = logs.encode_batch(
        logs.make_schema(["elsewhere"]),
        request_ids=["a", "b"],
        model_name="m",
        model_version="1",
        weights_fingerprint="f",
        inputs=np.zeros((2, 3)),
        probs=np.eye(2),
        exits=["backbone"] * 2,
    )
    with caplog.at_level(logging.DEBUG, logger="layercache.recorder"):
        assert recorder.append(other) == 0
        assert recorder.append(other) == 0
        assert recorder.append({"not": "a batch"}) == 0  # type: ignore[arg-type]
    assert recorder.failed_rows == 4
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2  # once per kind of error, not per call
    assert "missing ['act:layer1.0.relu_1', 'act:layer2.1.relu_1']" in errors[0].exc_text
    assert "unexpected ['act:elsewhere']" in errors[0].exc_text
    assert "TypeError" in errors[1].getMessage()
    assert recorder.append(_batch("ok")) == 4  # still records good batches
    recorder.close()
    assert _ids(tmp_path) == [f"ok-{i}" for i in range(4)]


def test_append_never_raises_when_log_dir_is_unusable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # chmod does not stop root: make the log dir a regular file instead.
    log_dir = tmp_path / "a-file"
    log_dir.write_text("not a directory")
    recorder = Recorder(RecorderConfig(log_dir), SCHEMA)
    with caplog.at_level(logging.ERROR, logger="layercache.recorder"):
        assert recorder.append(_batch("x")) == 0
        assert recorder.append(_batch("y")) == 0
    assert recorder.failed_rows == 8 and recorder.written_rows == 0
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    recorder.close()


def test_a_failed_write_abandons_the_segment_and_keeps_earlier_rows(tmp_path: Path) -> None:
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    assert recorder.append(_batch("before")) == 4
    first = recorder._segment
    assert first is not None
    first.file.close()  # the next write fails, as on a full disk
    assert recorder.append(_batch("lost")) == 0
    assert recorder.failed_rows == 4
    assert recorder.append(_batch("after")) == 4  # into a new segment
    assert recorder._segment is not first
    recorder.close()
    logs.compact(tmp_path)  # the abandoned segment is unlocked: an orphan
    assert sorted(_ids(tmp_path, include_live=False)) == sorted(
        [f"before-{i}" for i in range(4)] + [f"after-{i}" for i in range(4)]
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_segment(tmp_path: Path) -> None:
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    assert recorder.append(_batch("parent0")) == 4
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            code = 0 if recorder.append(_batch("child")) == 4 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert recorder.append(_batch("parent1")) == 4
    assert len(list(logs.segment_dir(tmp_path).glob("seg-*.arrows"))) == 2
    recorder.close()
    logs.compact(tmp_path)
    assert list(logs.segment_dir(tmp_path).glob("seg-*.arrows")) == []
    ids = _ids(tmp_path, include_live=False)
    assert sorted(ids) == sorted(f"{p}-{i}" for p in ("parent0", "parent1", "child") for i in range(4))


# ------------------------------------------------------------------------------------ real processes


def test_sigkill_keeps_every_acknowledged_row(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    # Small segments: the worker rotates every few batches, so background compactions are in flight when it dies.
    worker = _start_worker(tmp_path, log_dir, "k", batches=-1, segment_bytes=30_000, end="none")
    output = []
    try:
        deadline = time.monotonic() + 60
        while len(output) < 60:
            line = worker.stdout.readline()
            if not line or time.monotonic() > deadline:
                pytest.fail(f"worker stopped early: {worker.stderr.read()}")
            output.append(line)
        worker.send_signal(signal.SIGKILL)  # while it keeps appending
        rest, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == -signal.SIGKILL
    acknowledged = _acknowledged("".join(output) + rest)
    assert len(acknowledged) >= 60 * 4

    recovered = _ids(log_dir)  # parts + orphaned segments, no lock needed
    assert acknowledged <= set(recovered)
    assert len(recovered) == len(set(recovered))

    logs.compact(log_dir)
    assert list(logs.segment_dir(log_dir).glob("seg-*.arrows")) == []
    frame = pd.read_parquet(log_dir)
    assert acknowledged <= set(frame["request_id"])
    assert len(frame) == len(set(frame["request_id"])) == len(recovered)
    np.testing.assert_equal(logs.decode_inputs(logs.read_logs(log_dir)).shape[1:], (3, 16, 16))


def test_two_processes_record_into_one_dir(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    workers = [
        _start_worker(tmp_path, log_dir, "p", batches=40, segment_bytes=30_000, end="close"),
        _start_worker(tmp_path, log_dir, "q", batches=40, segment_bytes=30_000, end="exit"),  # no close()
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    logs.compact(log_dir)
    assert list(logs.segment_dir(log_dir).glob("seg-*.arrows")) == []
    ids = pd.read_parquet(log_dir)["request_id"].tolist()
    expected = {f"{tag}-{i}-{j}" for tag in "pq" for i in range(40) for j in range(4)}
    assert len(ids) == len(expected) and set(ids) == expected
    assert len(list(log_dir.glob("part-*.parquet"))) >= 4


def test_compact_does_not_touch_a_live_writers_segment(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    worker = _start_worker(tmp_path, log_dir, "w", batches=3, segment_bytes=2**30, end="wait")
    try:
        lines = [worker.stdout.readline() for _ in range(4)]
        assert lines[-1] == "ready\n", worker.stderr.read()
        (segment,) = logs.segment_dir(log_dir).glob("seg-*.arrows")
        size = segment.stat().st_size
        assert logs.compact(log_dir) == []
        assert segment.exists() and segment.stat().st_size == size
        assert len(_ids(log_dir)) == 12  # readable without the lock
        worker.stdin.write("\n")
        worker.stdin.flush()
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
    finally:
        if worker.poll() is None:
            worker.kill()
    assert not segment.exists()
    assert len(_ids(log_dir, include_live=False)) == 12
