"""Crash-safe, append-only recording of answered requests, one Arrow IPC segment per worker process.

TorchServe SIGKILLs workers on stop and scale-down, so nothing may wait for a shutdown hook: every
:meth:`Recorder.append` writes its record batch to the process's segment and hands it to the OS before returning
(the page cache survives SIGKILL). A segment is an Arrow IPC *stream*, so a reader recovers every complete batch
of a file whose writer died mid-batch. The writer holds ``fcntl.flock(LOCK_EX)`` on its segment; the kernel drops
it when the process dies, which is how :func:`layercache.trafficlog.compact` tells orphaned segments from live ones.

Example::

    recorder = Recorder(RecorderConfig(log_dir=Path("logs/")), make_schema(nodes))
    recorder.append(encode_batch(recorder.schema, request_ids=ids, ...))
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pyarrow as pa

from layercache import trafficlog
from layercache.errors import ConfigError, LogError

logger = logging.getLogger(__name__)

# Python-side write buffer of a segment: one flush per append then issues one write() for most batches.
_WRITE_BUFFER_BYTES = 1 << 20
# While rows are dropped for the cap: how often to warn again and to re-measure the dir (files may have been
# deleted, or compaction may have shrunk them).
_CAP_RECHECK_S = 60.0
# close() waits this long for background compactions of this recorder.
_CLOSE_JOIN_S = 60.0


_background: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_atexit_registered = False


def _register_background(thread: threading.Thread) -> None:
    """Track a compaction thread so a normally exiting process waits for it.

    The threads are daemons (a worker that is SIGKILLed loses nothing: the segment is compacted later), but a
    daemon thread still inside pyarrow while the interpreter finalizes aborts the process (seen as SIGABRT,
    "PyGILState_Release ... finalizing"). An ``atexit`` hook joins them first.
    """
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_join_background)
        _atexit_registered = True
    _background.add(thread)


def _join_background() -> None:
    for thread in list(_background):
        thread.join(_CLOSE_JOIN_S)


@dataclass(frozen=True)
class RecorderConfig:
    """Where and how much to record.

    Attributes:
        log_dir: directory of the log (created on the first append).
        segment_bytes: rotate this process's segment once it reaches this size; the closed segment is compacted
            to Parquet in the background.
        max_total_bytes: cap on the whole log dir (Parquet parts and segments); rows beyond it are dropped and
            counted. None for no cap.
        dir_mode, file_mode: permissions of the directories and files the recorder creates (recorded requests
            are user data: only the worker's user reads them by default).
    """

    log_dir: Path
    segment_bytes: int = 64 * 2**20
    max_total_bytes: int | None = 10 * 2**30
    dir_mode: int = 0o700
    file_mode: int = 0o600

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_dir", Path(self.log_dir))
        if self.segment_bytes <= 0:
            raise ConfigError(f"segment_bytes must be > 0, got {self.segment_bytes}")
        if self.max_total_bytes is not None and self.max_total_bytes < 0:
            raise ConfigError(f"max_total_bytes must be >= 0 or None (no cap), got {self.max_total_bytes}")


def _dir_bytes(log_dir: Path) -> int:
    """Bytes of the regular files directly in ``log_dir`` and in its segment dir."""
    total = 0
    for directory in (log_dir, trafficlog.segment_dir(log_dir)):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # compacted meanwhile
    return total


def _host_tag() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)


class _Segment:
    """One open, locked segment file and its IPC stream writer."""

    def __init__(self, log_dir: Path, schema: pa.Schema, dir_mode: int = 0o700, file_mode: int = 0o600) -> None:
        directory = trafficlog.segment_dir(log_dir)
        for d in (Path(log_dir), directory):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True, mode=dir_mode)
                os.chmod(d, dir_mode)  # mkdir's mode is masked by the umask
        self.pid = os.getpid()
        stem = f"seg-{_host_tag()}-{self.pid}-{time.time_ns()}"
        self.path = directory / f"{stem}.arrows"
        # Create and lock under a name compaction does not look at, then rename: otherwise a compactor could lock
        # the fresh empty file first and delete it under us.
        tmp = directory / f".{stem}.arrows.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER_BYTES)
        self.writer = pa.ipc.new_stream(self.file, schema)
        self.size = 0

    def write(self, batch: pa.RecordBatch) -> int:
        """Write and flush one batch; returns the bytes it added to the file."""
        self.writer.write_batch(batch)
        self.file.flush()
        before, self.size = self.size, self.file.tell()
        return self.size - before

    def close(self) -> None:
        """End-of-stream marker, unlock, close."""
        try:
            self.writer.close()
            self.file.flush()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing anything more (after a failed write, or in a forked child)."""
        try:
            self.file.close()  # closing the last descriptor also releases the flock
        except OSError:
            logger.debug("closing segment %s failed", self.path, exc_info=True)


class Recorder:
    """Append record batches to this process's segment of a log dir; never raises from :meth:`append`.

    Bind the log dir and schema here; nothing is opened until the first append. Several processes may record into
    one log dir at once. Counters: ``written_rows``, ``dropped_rows`` (over the size cap), ``failed_rows``
    (errors, logged once per kind).

    Args:
        config: where and how much to record.
        schema: the row schema, from :func:`layercache.trafficlog.make_schema`; every batch must have it.
    """

    def __init__(self, config: RecorderConfig, schema: pa.Schema) -> None:
        self.config = config
        self.schema = schema
        self.written_rows = 0
        self.dropped_rows = 0
        self.failed_rows = 0
        self._lock = threading.Lock()
        self._segment: _Segment | None = None
        self._total_bytes: int | None = None
        self._cap_checked_at = float("-inf")
        self._cap_warned_at: float | None = None
        self._logged_errors: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._orphans_started = False
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------- request path

    def append(self, batch: pa.RecordBatch) -> int:
        """Write one batch to this process's segment and flush it to the OS before returning.

        Returns:
            The number of rows written: ``batch.num_rows``, or 0 when the rows were dropped (size cap) or an
            error occurred (logged, counted in ``failed_rows``).
        """
        rows = _num_rows(batch)
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            try:
                return self._append_locked(batch, rows)
            except Exception as exc:  # noqa: BLE001 - the request path must never fail because of recording
                self.failed_rows += rows
                self._log_error(exc)
                return 0

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time would never be released in the child, and the parent's
        # threads do not exist here. The inherited segment is dealt with in _append_locked (pid check).
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._threads = []
        self._orphans_started = False

    def _append_locked(self, batch: pa.RecordBatch, rows: int) -> int:
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"append() takes a pyarrow.RecordBatch from encode_batch(), got {type(batch).__name__}")
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise LogError(_schema_mismatch(self.schema, batch.schema))
        if rows == 0:
            return 0
        if not self._orphans_started:
            self._orphans_started = True
            self._start_thread(self._compact_orphans, "layercache-compact-orphans")
        if self._total_bytes is None:
            self._total_bytes = _dir_bytes(self.config.log_dir)
        if self._over_cap(batch):
            self.dropped_rows += rows
            return 0

        segment = self._segment
        if segment is not None and segment.pid != os.getpid():
            # Forked since the segment was opened: the parent owns that stream; writing to it here would
            # interleave two writers' bytes. Drop our copy of the descriptor (the parent keeps the lock).
            segment.abandon()
            segment = self._segment = None
        if segment is None:
            segment = self._segment = _Segment(
                self.config.log_dir, self.schema, self.config.dir_mode, self.config.file_mode
            )
            self._total_bytes += segment.size
        try:
            added = segment.write(batch)
        except BaseException:
            # Part of the batch may be in the file: nothing appended after it could be read back. Leave the
            # segment to orphan compaction (it recovers the complete batches) and start a new one next time.
            self._segment = None
            segment.abandon()
            raise
        self._total_bytes += added
        self.written_rows += rows
        if segment.size >= self.config.segment_bytes:
            try:
                self._rotate()
            except Exception:  # the rows are on disk: report them written
                logger.exception("rotating segment %s failed; a later compaction picks it up", segment.path)
        return rows

    def _over_cap(self, batch: pa.RecordBatch) -> bool:
        cap = self.config.max_total_bytes
        if cap is None:
            return False
        estimate = batch.get_total_buffer_size()
        if (self._total_bytes or 0) + estimate <= cap:
            return False
        now = time.monotonic()
        if now - self._cap_checked_at >= _CAP_RECHECK_S:
            self._cap_checked_at = now
            self._total_bytes = _dir_bytes(self.config.log_dir)
            if self._total_bytes + estimate <= cap:
                return False
        if self._cap_warned_at is None or now - self._cap_warned_at >= _CAP_RECHECK_S:
            self._cap_warned_at = now
            logger.warning(
                "log dir %s holds about %d bytes, the cap is %d (max_total_bytes): dropping recorded rows "
                "(%d so far). Free space there or raise the cap.",
                self.config.log_dir,
                self._total_bytes,
                cap,
                self.dropped_rows + batch.num_rows,
            )
        return True

    def _rotate(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        segment.close()
        self._total_bytes = _dir_bytes(self.config.log_dir)
        self._cap_checked_at = time.monotonic()
        # Parquet writing is slow: keep it off the request path. If the process dies first, the closed segment
        # is unlocked and any later compaction picks it up.
        self._start_thread(lambda: self._compact_quietly(segment.path), "layercache-compact")

    def _log_error(self, exc: Exception) -> None:
        kind = type(exc).__name__
        if kind in self._logged_errors:
            logger.debug("recording failed again (%s: %s); %d rows failed so far", kind, exc, self.failed_rows)
            return
        self._logged_errors.add(kind)
        logger.exception(
            "recording into %s failed (%s); the request was answered, its rows are not recorded. "
            "Further %s errors are logged at DEBUG level; see Recorder.failed_rows.",
            self.config.log_dir,
            kind,
            kind,
        )

    # ------------------------------------------------------------------------------------------- background

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        thread = threading.Thread(target=target, name=name, daemon=True)
        _register_background(thread)
        thread.start()
        self._threads.append(thread)

    def _compact_quietly(self, segment: Path) -> None:
        try:
            trafficlog.compact_segment(segment)
        except Exception:
            logger.exception("compacting segment %s failed; a later compaction will retry", segment)

    def _compact_orphans(self) -> None:
        try:
            trafficlog.compact(self.config.log_dir)
        except Exception:
            logger.exception("compacting orphaned segments of %s failed", self.config.log_dir)

    # ------------------------------------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Close the segment (end-of-stream marker, unlock) and compact it; waits for background compactions.

        Never raises (errors are logged). A later :meth:`append` opens a new segment.
        """
        try:
            with self._lock:
                segment, self._segment = self._segment, None
                if segment is not None and segment.pid == os.getpid():
                    segment.close()
                    self._compact_quietly(segment.path)
                elif segment is not None:
                    segment.abandon()
                threads, self._threads = self._threads, []
            for thread in threads:
                thread.join(_CLOSE_JOIN_S)
        except Exception:
            logger.exception("closing the recorder of %s failed", self.config.log_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _num_rows(batch: object) -> int:
    rows = getattr(batch, "num_rows", 0)
    return rows if isinstance(rows, int) else 0


def _schema_mismatch(expected: pa.Schema, got: pa.Schema) -> str:
    missing = [name for name in expected.names if name not in got.names]
    extra = [name for name in got.names if name not in expected.names]
    retyped = [
        f"{field.name}: {field.type} (expected {expected.field(field.name).type})"
        for field in got
        if field.name in expected.names and field.type != expected.field(field.name).type
    ]
    parts = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)
    parts += [f"retyped {retyped}"] * bool(retyped)
    detail = "; ".join(parts) or "same columns in another order or nullability"
    return (
        f"batch schema differs from the recorder's ({detail}). Hint: encode it with encode_batch(recorder.schema, ...)"
    )
