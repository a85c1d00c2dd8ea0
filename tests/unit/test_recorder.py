"""Recorder: append, rotation, size cap, errors never raised, SIGKILL and concurrent writers."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from layercache import recorder as recorder_module
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


def _batch(prefix: str, rows: int = 4, seed: int = 0, time: datetime | None = None) -> pa.RecordBatch:
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
        time=time,
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


def _on_disk(log_dir: Path) -> int:
    """Bytes of the regular files of a log dir and its segment dir, as the cap counts them."""
    dirs = [log_dir, logs.segment_dir(log_dir)]
    return sum(p.stat().st_size for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file())


def _settle(recorder: Recorder) -> None:
    """Wait for the recorder's background compactions, so a test knows which parts exist."""
    for thread in list(recorder._threads):
        thread.join(30)


def _size(batch: pa.RecordBatch) -> int:
    """Bytes a batch adds to a segment."""
    return batch.serialize().size


HEADER = SCHEMA.serialize().size


def test_cap_counts_the_bytes_written_and_drops_only_at_the_cap(tmp_path: Path) -> None:
    """Defect 3 (size cap drops too early): the cap compared an estimate (the batch's whole buffers, here those of
    the 64-row batch the rows are sliced from) with the cap and dropped rows with the dir far below it."""
    big = _batch("s", rows=64)
    slices = [big.slice(4 * i, 4) for i in range(11)]  # what record_fraction / a sub-batch hands the recorder
    sizes = [_size(batch) for batch in slices]
    cap = HEADER + sum(sizes[:10]) + sizes[10] // 2
    recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=cap), SCHEMA)
    assert [recorder.append(batch) for batch in slices[:10]] == [4] * 10
    (segment,) = logs.segment_dir(tmp_path).glob("seg-*.arrows")
    assert segment.stat().st_size == HEADER + sum(sizes[:10])  # what is on disk is what was counted
    # Dropped only once the next batch really does not fit.
    assert recorder.append(slices[10]) == 0
    assert recorder.dropped_rows == 4 and recorder.written_rows == 40 and recorder.failed_rows == 0
    recorder.close()


def test_cap_evicts_the_oldest_parts_and_keeps_recording(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Defect 3 (at the cap the newest rows were dropped): the parts with the oldest rows are deleted instead, their
    rows counted in evicted_rows and the files named in the log, so the log follows recent traffic."""
    parts = []
    for i in range(5):
        with Recorder(RecorderConfig(tmp_path, max_total_bytes=None), SCHEMA) as old:
            old.append(_batch(f"old{i}", seed=i, time=datetime(2026, 12, 1, tzinfo=UTC) - timedelta(hours=i)))
        (part,) = set(tmp_path.glob("part-*.parquet")) - set(parts)
        parts.append(part)
    # The rows' time decides, not the file's: by mtime (as compacting a dead worker's segment late makes it) the
    # first part written would be the oldest.
    for k, part in enumerate(parts):
        os.utime(part, ns=(1_000_000_000 * (k + 1),) * 2)
    by_age = list(reversed(parts))
    size = _size(_batch("new0"))
    cap = _on_disk(tmp_path) + HEADER + 2 * size + size // 2
    recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=cap), SCHEMA)
    with caplog.at_level(logging.INFO, logger="layercache.recorder"):
        assert [recorder.append(_batch(f"new{i}", seed=9)) for i in range(2)] == [4, 4]
        assert recorder.evicted_rows == 0 and all(p.exists() for p in parts)
        for i in range(2, 6):
            assert recorder.append(_batch(f"new{i}", seed=9)) == 4
            assert _on_disk(tmp_path) <= cap
    _settle(recorder)
    gone = [p for p in by_age if not p.exists()]
    assert gone and gone == by_age[: len(gone)]  # oldest first
    assert recorder.evicted_rows == 4 * len(gone)
    assert recorder.dropped_rows == 0 and recorder.written_rows == 24
    evictions = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert by_age[0].name in evictions[0] and "4 rows" in evictions[0]
    assert caplog.records[0].levelno == logging.WARNING
    assert all(any(p.name in message for message in evictions) for p in gone)
    recorder.close()
    kept = {f"old{parts.index(p)}-{j}" for p in by_age[len(gone) :] for j in range(4)}
    assert set(_ids(tmp_path)) == kept | {f"new{i}-{j}" for i in range(6) for j in range(4)}


def test_cap_drops_only_when_nothing_can_be_evicted_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 3 (the warning contradicted itself, "holds 295848 bytes, the cap is 536870: dropping"): with only
    another writer's live segment in the dir nothing can be evicted; rows are dropped and the warning gives the
    bytes on disk, the bytes needed and the cap, numbers that add up."""
    seg_dir = logs.segment_dir(tmp_path)
    seg_dir.mkdir(parents=True)
    foreign = seg_dir / "seg-otherhost-1-1.arrows"
    with open(foreign, "wb") as handle:
        writer = pa.ipc.new_stream(handle, SCHEMA)
        writer.write_batch(_batch("other", rows=8))
    held = foreign.stat().st_size
    need = HEADER + _size(_batch("x"))
    cap = held + need // 2
    fd = os.open(foreign, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer in another process
    try:
        recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=cap), SCHEMA)
        with caplog.at_level(logging.WARNING, logger="layercache.recorder"):
            assert recorder.append(_batch("x")) == 0
            assert recorder.append(_batch("y")) == 0
        _settle(recorder)
    finally:
        os.close(fd)
    assert recorder.dropped_rows == 8 and recorder.written_rows == 0 and recorder.evicted_rows == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"holds {held} bytes on disk ({held} of them in segments" in warning
    assert f"needs {need} more: over the cap of {cap} bytes" in warning and held + need > cap
    assert "no Parquet part left to evict" in warning and "(4 so far)" in warning
    assert foreign.stat().st_size == held
    recorder.close()


def test_cap_below_one_segment_rotates_it_and_keeps_the_newest_rows(tmp_path: Path) -> None:
    """Defect 3 (the log must follow recent traffic): a cap smaller than a segment used to stop recording for
    good; the full segment is rotated into a part, which the next rows then evict."""
    size = _size(_batch("00"))
    cap = HEADER + 3 * size + size // 2
    recorder = Recorder(RecorderConfig(tmp_path, max_total_bytes=cap), SCHEMA)
    results = []
    for i in range(18):
        results.append(recorder.append(_batch(f"{i:02d}", seed=i)))
        _settle(recorder)
        assert _on_disk(tmp_path) <= cap
    assert results[-1] == 4 and 0 in results
    assert recorder.evicted_rows > 0 and recorder.dropped_rows == 4 * results.count(0)
    assert recorder.written_rows + recorder.dropped_rows == 72
    recorder.close()
    ids = _ids(tmp_path)
    assert len(ids) == recorder.written_rows - recorder.evicted_rows
    written = [f"{i:02d}-{j}" for i, r in enumerate(results) if r for j in range(4)]
    assert sorted(ids) == written[len(written) - len(ids) :]  # the newest ones


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
    first.file.close()  # the next write fails, and so does cutting it back: the segment cannot be repaired
    assert recorder.append(_batch("lost")) == 0
    assert recorder.failed_rows == 4
    assert recorder.append(_batch("after")) == 4  # into a new segment
    assert recorder._segment is not first
    recorder.close()
    logs.compact(tmp_path)  # the abandoned segment is unlocked: an orphan
    assert sorted(_ids(tmp_path, include_live=False)) == sorted(
        [f"before-{i}" for i in range(4)] + [f"after-{i}" for i in range(4)]
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The recorder's clock, stepped by the test: ``clock[0] += 1.5``."""
    now = [1000.0]
    monkeypatch.setattr(recorder_module, "_clock", lambda: now[0])
    return now


class _Disk:
    """A disk with ``free`` bytes, shared by every segment the recorder opens: a write that does not fit writes
    what does, then fails with ENOSPC, as write(2) does. ``writes`` counts the attempts."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.writes = 0


class _FileOnDisk:
    def __init__(self, disk: _Disk, file: object) -> None:
        self._disk, self._file = disk, file

    def write(self, data: object) -> int:
        self._disk.writes += 1
        view = memoryview(data).cast("B")
        if len(view) > self._disk.free:
            self._file.write(view[: self._disk.free])
            self._disk.free = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.free -= len(view)
        return self._file.write(view)

    def truncate(self, size: int) -> int:
        self._file.flush()
        self._disk.free += max(0, os.fstat(self._file.fileno()).st_size - size)
        return self._file.truncate(size)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


class _OsOnDisk:
    """The recorder's ``os`` module, with ``fdopen`` giving files on a :class:`_Disk`."""

    def __init__(self, disk: _Disk) -> None:
        self._disk = disk

    def fdopen(self, fd: int, *args: object, **kwargs: object) -> _FileOnDisk:
        return _FileOnDisk(self._disk, os.fdopen(fd, *args, **kwargs))

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


def _segments(log_dir: Path) -> list[Path]:
    return sorted(logs.segment_dir(log_dir).iterdir())


def test_full_disk_pauses_recording_and_keeps_one_clean_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 2 (a full disk sprayed empty segments: one new file per failed batch, 158 in 25 s): the torn batch
    is cut off, recording pauses with a doubling delay (rows meanwhile count as failed, nothing touches the disk),
    then resumes in the same segment."""
    size = _size(_batch("a"))
    disk = _Disk(HEADER + 3 * size + size // 2)
    monkeypatch.setattr(recorder_module, "os", _OsOnDisk(disk))
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    with caplog.at_level(logging.INFO, logger="layercache"):
        assert [recorder.append(_batch(p)) for p in "abc"] == [4, 4, 4]
        assert recorder.append(_batch("d")) == 0  # half written, then ENOSPC
        (segment,) = _segments(tmp_path)
        assert segment.stat().st_size == HEADER + 3 * size  # the torn batch is cut off again
        assert logs.read_segment(segment).num_rows == 12
        writes = disk.writes
        assert [recorder.append(_batch(f"x{i}")) for i in range(20)] == [0] * 20
        assert disk.writes == writes and _segments(tmp_path) == [segment]  # no retry, no new file
        assert recorder.failed_rows == 84 and recorder.written_rows == 12
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
        assert "retries in 1 s" in errors[0].getMessage()

        disk.free = 10**9
        clock[0] += 0.5
        assert recorder.append(_batch("y")) == 0 and disk.writes == writes
        clock[0] += 0.6
        assert recorder.append(_batch("e")) == 4  # retried after 1 s, into the same segment
        assert _segments(tmp_path) == [segment]
        assert any("resumed; 88 rows failed while it was paused" in r.getMessage() for r in caplog.records)

        disk.free = 0  # full again: the delay doubles per failed retry
        assert recorder.append(_batch("z")) == 0
        clock[0] += 1.1
        writes = disk.writes
        assert recorder.append(_batch("z")) == 0 and disk.writes == writes + 1
        clock[0] += 1.5
        assert recorder.append(_batch("z")) == 0 and disk.writes == writes + 1
        clock[0] += 0.6
        assert recorder.append(_batch("z")) == 0 and disk.writes == writes + 2
    assert _segments(tmp_path) == [segment]
    disk.free = 10**9
    recorder.close()
    assert _segments(tmp_path) == [] and len(list(tmp_path.glob("part-*.parquet"))) == 1
    assert sorted(_ids(tmp_path)) == sorted(f"{p}-{i}" for p in "abce" for i in range(4))


def test_full_disk_from_the_start_leaves_no_empty_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """Defect 2 (empty segments left behind): with no byte free, every retry reuses one empty segment, and close()
    deletes it."""
    disk = _Disk(0)
    monkeypatch.setattr(recorder_module, "os", _OsOnDisk(disk))
    recorder = Recorder(RecorderConfig(tmp_path), SCHEMA)
    for i in range(10):
        assert recorder.append(_batch(f"r{i}")) == 0
        clock[0] += 61  # past the longest delay: every append retries
    assert disk.writes == 10
    (segment,) = _segments(tmp_path)
    assert segment.stat().st_size == 0
    assert recorder.failed_rows == 40
    recorder.close()
    assert _segments(tmp_path) == [] and list(tmp_path.glob("part-*.parquet")) == []


def test_deleted_log_dir_is_recreated_and_its_lost_rows_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 1 (silent loss when the log dir disappears): the recorder went on appending to the unlinked segment.
    Now it notices before the next append, counts the rows lost with it, logs once and records into a re-created
    dir."""
    log_dir = tmp_path / "logs"
    recorder = Recorder(RecorderConfig(log_dir), SCHEMA)
    assert recorder.append(_batch("a")) == 4 and recorder.append(_batch("b")) == 4
    _settle(recorder)
    shutil.rmtree(log_dir)
    with caplog.at_level(logging.WARNING, logger="layercache.recorder"):
        assert recorder.append(_batch("c")) == 4
        assert recorder.append(_batch("d")) == 4
    assert recorder.lost_rows == 8 and recorder.written_rows == 16 and recorder.failed_rows == 0
    (warning,) = caplog.records
    assert "its 8 rows are lost" in warning.getMessage() and "re-creating the log dir" in warning.getMessage()
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(logs.segment_dir(log_dir).stat().st_mode) == 0o700
    recorder.close()
    assert sorted(_ids(log_dir)) == sorted(f"{p}-{i}" for p in "cd" for i in range(4))


def test_moved_log_dir_starts_a_new_segment_and_loses_nothing(tmp_path: Path) -> None:
    """Defect 1 (writing on into a segment that left the log dir): a renamed dir keeps its rows (not lost); new rows
    go to a new segment under log_dir."""
    log_dir = tmp_path / "logs"
    recorder = Recorder(RecorderConfig(log_dir), SCHEMA)
    assert recorder.append(_batch("a")) == 4
    _settle(recorder)
    log_dir.rename(tmp_path / "moved")
    assert recorder.append(_batch("b")) == 4
    assert recorder.lost_rows == 0
    recorder.close()
    assert sorted(_ids(log_dir)) == [f"b-{i}" for i in range(4)]
    assert sorted(_ids(tmp_path / "moved")) == [f"a-{i}" for i in range(4)]


def test_log_dir_replaced_by_a_file_pauses_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 1 (the log dir replaced by a file): each batch is counted failed, the error logged once with the
    fix, and the dir retried after a growing delay, not on every batch."""
    opened = []

    class CountingSegment(recorder_module._Segment):
        def __init__(self, *args: object, **kwargs: object) -> None:
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(recorder_module, "_Segment", CountingSegment)
    log_dir = tmp_path / "logs"
    recorder = Recorder(RecorderConfig(log_dir), SCHEMA)
    assert recorder.append(_batch("a")) == 4
    _settle(recorder)
    shutil.rmtree(log_dir)
    log_dir.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="layercache.recorder"):
        assert [recorder.append(_batch(f"x{i}")) for i in range(10)] == [0] * 10
    assert len(opened) == 2  # one failed try, then a pause
    assert recorder.failed_rows == 40 and recorder.lost_rows == 4
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and f"{log_dir} is not a directory: move that file away" in failures[0]
    clock[0] += 1.1
    assert recorder.append(_batch("y")) == 0 and len(opened) == 3
    clock[0] += 1.5
    assert recorder.append(_batch("y")) == 0 and len(opened) == 3  # the delay is 2 s now
    log_dir.unlink()
    clock[0] += 0.6
    assert recorder.append(_batch("e")) == 4 and len(opened) == 4
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    recorder.close()
    assert sorted(_ids(log_dir)) == [f"e-{i}" for i in range(4)]


def test_log_dir_and_files_get_the_configured_modes_whatever_the_umask(tmp_path: Path) -> None:
    """Recorded requests are user data: dirs 0700 and files 0600 by default, and the Parquet part keeps the
    segment's mode. Also a defect: the segment's mode was masked by the umask (0640 came out as 0600)."""
    for umask, dir_mode, file_mode in ((0o022, None, None), (0o077, 0o750, 0o640)):
        log_dir = tmp_path / f"logs-{umask:o}"
        modes = {} if dir_mode is None else {"dir_mode": dir_mode, "file_mode": file_mode}
        want_dir, want_file = dir_mode or 0o700, file_mode or 0o600
        old = os.umask(umask)
        try:
            recorder = Recorder(RecorderConfig(log_dir, **modes), SCHEMA)
            assert recorder.append(_batch("a")) == 4
            (segment,) = _segments(log_dir)
            assert stat.S_IMODE(log_dir.stat().st_mode) == want_dir
            assert stat.S_IMODE(logs.segment_dir(log_dir).stat().st_mode) == want_dir
            assert stat.S_IMODE(segment.stat().st_mode) == want_file
            recorder.close()
        finally:
            os.umask(old)
        (part,) = log_dir.glob("part-*.parquet")
        assert stat.S_IMODE(part.stat().st_mode) == want_file


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
