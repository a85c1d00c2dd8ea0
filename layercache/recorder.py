"""Crash-safe, append-only recording of answered requests, one Arrow IPC segment per worker process.

TorchServe SIGKILLs workers on stop and scale-down, so nothing may wait for a shutdown hook: every
:meth:`Recorder.append` writes its record batch to the process's segment and hands it to the OS before returning
(the page cache survives SIGKILL). A segment is an Arrow IPC *stream*, so a reader recovers every complete batch
of a file whose writer died mid-batch. The writer holds ``fcntl.flock(LOCK_EX)`` on its segment; the kernel drops
it when the process dies, which is how :func:`layercache.trafficlog.compact` tells orphaned segments from live ones.

The recorder writes the stream's messages itself (``Schema.serialize`` / ``RecordBatch.serialize``, the bytes
``pyarrow.ipc.new_stream`` would write) so that it knows each batch's exact size before writing it (for the size
cap) and can cut a half-written batch off again (a full disk must not leave a torn segment or a new file per
failure).

Example::

    recorder = Recorder(RecorderConfig(log_dir=Path("logs/")), make_schema(nodes))
    recorder.append(encode_batch(recorder.schema, request_ids=ids, ...))
"""

from __future__ import annotations

import atexit
import fcntl
import fnmatch
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

from layercache import trafficlog
from layercache.errors import ConfigError, LogError

logger = logging.getLogger(__name__)

# While rows are dropped for the cap: how often to warn again and to re-measure the dir (other writers' files
# grow, files may have been deleted). Also how often the dir is re-measured at all.
_CAP_RECHECK_S = 60.0
# close() waits this long for background compactions of this recorder.
_CLOSE_JOIN_S = 60.0
# After an I/O error (full disk, log dir gone and not re-creatable) batches fail without touching the disk for
# this long, doubling per failed retry up to _RETRY_MAX_S: one syscall storm and one new file per batch is what
# a full disk got before.
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0
# End-of-stream marker of an Arrow IPC stream (continuation, zero length).
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
# The recorder's clock (backoff, cap re-checks); a module attribute so that tests can step it.
_clock = time.monotonic
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        log_dir: directory of the log (created on the first append, and again if it is deleted while recording).
        segment_bytes: rotate this process's segment once it reaches this size; the closed segment is compacted
            to Parquet in the background.
        max_total_bytes: cap on the bytes on disk of the whole log dir (Parquet parts and segments). At the cap
            the oldest Parquet parts are deleted (``Recorder.evicted_rows``) so that the log follows recent
            traffic; only when no part is left to delete are new rows dropped (``Recorder.dropped_rows``). While
            a segment is compacted it and its part are both on disk: for that moment the dir may exceed the cap
            by up to one part. None for no cap.
        dir_mode, file_mode: permissions of the directories and files the recorder creates (recorded requests
            are user data: only the worker's user reads them by default). Set exactly, whatever the umask.
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


@dataclass(frozen=True)
class _Part:
    """A Parquet part found in the log dir: what eviction needs to order and count it."""

    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Usage:
    """Bytes on disk of a log dir: every regular file in it and in its segment dir."""

    total: int
    segments: int
    parts: tuple[_Part, ...]


def _usage(log_dir: Path) -> _Usage:
    total = segments = 0
    parts = []
    seg_dir = trafficlog.segment_dir(log_dir)
    for directory in (log_dir, seg_dir):
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # compacted or evicted meanwhile
            total += info.st_size
            if directory is seg_dir:
                segments += info.st_size
            elif fnmatch.fnmatchcase(entry.name, trafficlog.PART_GLOB):
                parts.append(_Part(Path(entry.path), info.st_size, info.st_mtime_ns))
    return _Usage(total, segments, tuple(parts))


def _newest_row_ns(meta: pq.FileMetaData) -> int | None:
    """The newest ``time`` in a Parquet file from its row group statistics, or None where they are missing."""
    paths = [meta.schema.column(j).path for j in range(meta.num_columns)]
    if "time" not in paths or meta.num_row_groups == 0:
        return None
    column = paths.index("time")
    newest = None
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or not isinstance(stats.max, datetime):
            return None
        value = stats.max if stats.max.tzinfo is not None else stats.max.replace(tzinfo=UTC)
        ns = (value - _EPOCH) // timedelta(microseconds=1) * 1000
        newest = ns if newest is None else max(newest, ns)
    return newest


def _host_tag() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)


class _Segment:
    """One open, locked segment file of complete IPC messages.

    ``size`` is the length of the complete messages; a write that fails part-way is cut off again, so the file
    stays a readable stream and the same segment takes the next batch. The schema message goes out with the
    first batch: a segment that never got a batch is empty, and :meth:`close` deletes it.
    """

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
        name = tmp
        try:
            os.fchmod(fd, file_mode)  # the open() mode is masked by the umask too
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.path)
            name = self.path
            info = os.fstat(fd)
            # Unbuffered: each write is one write(2), and a failure is known at once and where it happened.
            self.file = os.fdopen(fd, "wb", buffering=0)
        except BaseException:
            os.close(fd)
            name.unlink(missing_ok=True)  # empty and still ours: leave no file behind
            raise
        self.fd = fd
        self.inode = (info.st_dev, info.st_ino)
        self.header = schema.serialize()
        self.size = 0
        self.rows = 0
        self.broken = False

    def cost(self, message: pa.Buffer) -> int:
        """Bytes writing ``message`` adds to the file (with the schema message before the first batch)."""
        return message.size + (self.header.size if self.size == 0 else 0)

    def write(self, message: pa.Buffer, rows: int) -> int:
        """Write one serialized batch; returns the bytes it added to the file.

        On failure the file is cut back to its complete messages (``broken`` is set if even that fails; then the
        segment must be abandoned) and the error is raised.
        """
        start = self.size
        try:
            if start == 0:
                self._write_all(self.header)
            self._write_all(message)
        except BaseException:
            self._cut(start)
            raise
        added = message.size + (self.header.size if start == 0 else 0)
        self.size += added
        self.rows += rows
        return added

    def _write_all(self, data: pa.Buffer) -> None:
        view = memoryview(data)
        while view:
            written = self.file.write(view)
            if not written:
                raise OSError(f"writing segment {self.path} made no progress")
            view = view[written:]

    def _cut(self, size: int) -> None:
        try:
            self.file.truncate(size)
            self.file.seek(size)
        except (OSError, ValueError):
            self.broken = True
            logger.debug("cutting segment %s back to %d bytes failed", self.path, size, exc_info=True)

    def state(self) -> str:
        """``"ok"``; ``"moved"`` (its path no longer leads to this file, which still exists: the log dir was
        renamed or replaced); or ``"deleted"`` (the file is unlinked: every row in it is lost).

        One ``stat`` of the path: cheap enough for every append.
        """
        try:
            info = os.stat(self.path)
        except OSError:
            info = None
        if info is not None and (info.st_dev, info.st_ino) == self.inode:
            return "ok"
        try:
            return "deleted" if os.fstat(self.fd).st_nlink == 0 else "moved"
        except OSError:
            return "moved"  # descriptor unusable: nothing more is known

    def close(self) -> bool:
        """End-of-stream marker, unlock, close; a segment without rows is deleted instead.

        Returns:
            Whether a segment with rows is left to compact.
        """
        try:
            if self.rows == 0:
                if self.state() == "ok":
                    self.path.unlink(missing_ok=True)  # still locked by us: no compactor has it
                return False
            try:
                self._write_all(pa.py_buffer(_EOS))
            except OSError:
                # A stream without the marker reads the same; do not let a full disk stop the close.
                self._cut(self.size)
                logger.debug("writing the end-of-stream marker of %s failed", self.path, exc_info=True)
            return True
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
    one log dir at once. Counters (rows):

    - ``written_rows``: appended and on disk when :meth:`append` returned;
    - ``dropped_rows``: not written, the log being at ``max_total_bytes`` with no Parquet part left to evict;
    - ``failed_rows``: not written because of an error (logged once per kind), or while recording pauses after
      an I/O error (full disk, unusable log dir), retried with a growing delay;
    - ``lost_rows``: written, then lost: their segment was deleted under the recorder (the log dir was removed);
    - ``evicted_rows``: rows of the oldest Parquet parts deleted to stay under ``max_total_bytes`` (any
      writer's parts: several processes share one cap).

    Args:
        config: where and how much to record.
        schema: the row schema, from :func:`layercache.trafficlog.make_schema`; every batch must have it.
    """

    def __init__(self, config: RecorderConfig, schema: pa.Schema) -> None:
        self.config = config
        self.schema = schema
        self._header_size = schema.serialize().size
        self.written_rows = 0
        self.dropped_rows = 0
        self.failed_rows = 0
        self.lost_rows = 0
        self.evicted_rows = 0
        self._lock = threading.Lock()
        self._segment: _Segment | None = None
        # Cap accounting: bytes on disk when last measured, plus what this recorder wrote since.
        self._total_bytes: int | None = None
        self._measured_at = float("-inf")
        self._remeasure = False  # set by background compactions: they shrink the dir
        self._dropping = False
        self._cap_warned_at: float | None = None
        self._evicted_before = False
        self._part_info: dict[tuple[str, int, int], tuple[int | None, int]] = {}
        # I/O failure backoff: until _retry_at, batches fail without touching the disk.
        self._retry_at: float | None = None
        self._retry_delay = 0.0
        self._failed_at_pause = 0
        self._logged_errors: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._orphans_started = False
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------- request path

    def append(self, batch: pa.RecordBatch) -> int:
        """Write one batch to this process's segment and hand it to the OS before returning.

        Returns:
            The number of rows written: ``batch.num_rows``, or 0 when the rows were dropped (size cap) or not
            written because of an error (logged, counted in ``failed_rows``).
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
        # threads do not exist here. The inherited segment is dealt with in _current_segment (pid check).
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
        now = _clock()
        if self._retry_at is not None and now < self._retry_at:
            self.failed_rows += rows
            return 0
        if not self._orphans_started:
            self._orphans_started = True
            self._start_thread(self._compact_orphans, "layercache-compact-orphans")
        segment = self._current_segment()
        message = batch.serialize()
        need = segment.cost(message) if segment is not None else message.size + self._header_size
        if not self._make_room(need, rows, now):
            self.dropped_rows += rows
            return 0
        try:
            if segment is None:
                segment = self._segment = _Segment(
                    self.config.log_dir, self.schema, self.config.dir_mode, self.config.file_mode
                )
            added = segment.write(message, rows)
        except Exception as exc:
            if segment is not None and segment.broken:
                # Its complete batches stay readable: unlocked, it is an orphan, compacted from the next append on.
                self._segment = None
                segment.abandon()
                self._orphans_started = False
            if isinstance(exc, OSError):
                self._pause(exc, rows, now)
                return 0
            raise
        self._resumed()
        self._total_bytes = (self._total_bytes or 0) + added
        self.written_rows += rows
        if segment.size >= self.config.segment_bytes:
            try:
                self._rotate()
            except Exception:  # the rows are on disk: report them written
                logger.exception("rotating segment %s failed; a later compaction picks it up", segment.path)
        return rows

    def _current_segment(self) -> _Segment | None:
        """The open segment if it is still this process's and still in the log dir, else None."""
        segment = self._segment
        if segment is None:
            return None
        if segment.pid != os.getpid():
            # Forked since the segment was opened: the parent owns that stream; writing to it here would
            # interleave two writers' bytes. Drop our copy of the descriptor (the parent keeps the lock).
            segment.abandon()
            self._segment = None
            return None
        state = segment.state()
        if state == "ok":
            return segment
        self._segment = None
        segment.abandon()
        self._remeasure = True
        if state == "deleted":
            self.lost_rows += segment.rows
            logger.warning(
                "segment %s was deleted while recording (was the log dir %s removed?): its %d rows are lost "
                "(%d lost so far, see Recorder.lost_rows). Recording goes on in a new segment, re-creating the "
                "log dir.",
                segment.path,
                self.config.log_dir,
                segment.rows,
                self.lost_rows,
            )
        else:
            logger.warning(
                "segment %s no longer is in the log dir %s (the dir was moved or replaced); its %d rows stay "
                "where it went. Recording goes on in a new segment there.",
                segment.path,
                self.config.log_dir,
                segment.rows,
            )
        return None

    def _pause(self, exc: OSError, rows: int, now: float) -> None:
        """Count the batch failed and stop touching the disk for a while (doubling per failed retry)."""
        self.failed_rows += rows
        new_episode = self._retry_delay == 0.0
        self._retry_delay = _RETRY_FIRST_S if new_episode else min(2 * self._retry_delay, _RETRY_MAX_S)
        self._retry_at = now + self._retry_delay
        if not new_episode:
            delay = self._retry_delay
            logger.debug("recording into %s failed again (%s); next try in %.0f s", self.config.log_dir, exc, delay)
            return
        self._failed_at_pause = self.failed_rows - rows
        log_dir = self.config.log_dir
        hint = (
            f" {log_dir} is not a directory: move that file away (recording retries and re-creates the dir)."
            if log_dir.exists() and not log_dir.is_dir()
            else ""
        )
        kind = f"{type(exc).__name__}:{exc.errno}"
        log = logger.warning if kind in self._logged_errors else logger.error
        self._logged_errors.add(kind)
        log(
            "recording into %s failed (%s); the request was answered, its rows are not recorded.%s Recording "
            "pauses: it retries in %.0f s, then backs off to %.0f s; rows meanwhile count in Recorder.failed_rows.",
            log_dir,
            exc,
            hint,
            self._retry_delay,
            _RETRY_MAX_S,
            exc_info=log is logger.error,
        )

    def _resumed(self) -> None:
        if self._retry_at is None:
            return
        logger.info(
            "recording into %s resumed; %d rows failed while it was paused",
            self.config.log_dir,
            self.failed_rows - self._failed_at_pause,
        )
        self._retry_at = None
        self._retry_delay = 0.0

    # ------------------------------------------------------------------------------------------- size cap

    def _make_room(self, need: int, rows: int, now: float) -> bool:
        """Whether ``need`` more bytes fit under the cap, after evicting the oldest Parquet parts if they must."""
        cap = self.config.max_total_bytes
        if cap is None:
            return True
        usage = None
        if self._total_bytes is None or self._remeasure or now - self._measured_at >= _CAP_RECHECK_S:
            usage = self._measure(now)
        if self._total_bytes + need <= cap:
            self._dropping = False
            return True
        if usage is None:
            if self._dropping:
                return False  # measured lately, nothing to evict: no directory scan per batch
            usage = self._measure(now)
            if self._total_bytes + need <= cap:
                return True
        self._evict(usage, self._total_bytes + need - cap)
        if self._total_bytes + need <= cap:
            self._dropping = False
            return True
        segment = self._segment
        if segment is not None and segment.rows:
            # The live segment alone fills the cap: rotate it, so that its rows become a part that can be
            # evicted once newer rows need the room.
            self._rotate()
        self._dropping = True
        if self._cap_warned_at is None or now - self._cap_warned_at >= _CAP_RECHECK_S:
            self._cap_warned_at = now
            logger.warning(
                "log dir %s holds %d bytes on disk (%d of them in segments not yet compacted) and the next batch "
                "needs %d more: over the cap of %d bytes (max_total_bytes), with no Parquet part left to evict. "
                "Dropping recorded rows (%d so far). Free space there, raise the cap or lower segment_bytes.",
                self.config.log_dir,
                self._total_bytes,
                usage.segments,
                need,
                cap,
                self.dropped_rows + rows,
            )
        return False

    def _measure(self, now: float) -> _Usage:
        self._remeasure = False  # before the scan: a compaction ending during it asks again
        usage = _usage(self.config.log_dir)
        self._total_bytes = usage.total
        self._measured_at = now
        return usage

    def _evict(self, usage: _Usage, excess: int) -> None:
        """Delete the oldest Parquet parts until ``excess`` bytes are freed.

        Oldest by the newest row in each (the footer's statistics of ``time``; a part compacted from a dead
        worker's segment long after its rows were written has a recent mtime), else by mtime.
        """
        listed = {part.path.name: part for part in usage.parts}
        self._part_info = {k: v for k, v in self._part_info.items() if k[0] in listed}
        order = sorted(usage.parts, key=lambda part: (self._info(part)[1], part.path.name))
        freed = 0
        removed: list[str] = []
        rows_known = rows_unknown = 0
        for part in order:
            if freed >= excess:
                break
            rows = self._info(part)[0]
            try:
                part.path.unlink()
            except FileNotFoundError:
                pass  # evicted by another writer meanwhile: gone, but not ours to count
            except OSError:
                logger.debug("could not evict %s", part.path, exc_info=True)
                continue
            else:
                removed.append(part.path.name)
                if rows is None:
                    rows_unknown += 1
                else:
                    rows_known += rows
            freed += part.size
            self._total_bytes = (self._total_bytes or 0) - part.size
        if not removed:
            return
        self.evicted_rows += rows_known
        log = logger.info if self._evicted_before else logger.warning
        self._evicted_before = True
        log(
            "log dir %s reached its cap of %d bytes (max_total_bytes): evicted the %d oldest Parquet part(s), "
            "%d bytes and %d rows%s (%s); %d rows evicted so far (Recorder.evicted_rows)",
            self.config.log_dir,
            self.config.max_total_bytes,
            len(removed),
            freed,
            rows_known,
            f" plus those of {rows_unknown} unreadable part(s)" if rows_unknown else "",
            ", ".join(removed),
            self.evicted_rows,
        )

    def _info(self, part: _Part) -> tuple[int | None, int]:
        """Rows of a part (None: unreadable footer) and the time (ns since the epoch) eviction orders it by;
        cached, as parts do not change once written."""
        key = (part.path.name, part.size, part.mtime_ns)
        info = self._part_info.get(key)
        if info is None:
            try:
                meta = pq.read_metadata(part.path)
            except (OSError, pa.ArrowException):
                info = (None, part.mtime_ns)  # evicted all the same
            else:
                newest = _newest_row_ns(meta)
                info = (meta.num_rows, part.mtime_ns if newest is None else newest)
            self._part_info[key] = info
        return info

    def _rotate(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        if not segment.close():
            return
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
        finally:
            self._remeasure = True  # the part is smaller than the segment was

    def _compact_orphans(self) -> None:
        try:
            trafficlog.compact(self.config.log_dir)
        except Exception:
            logger.exception("compacting orphaned segments of %s failed", self.config.log_dir)
        finally:
            self._remeasure = True

    # ------------------------------------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Close the segment (end-of-stream marker, unlock) and compact it; waits for background compactions.

        Never raises (errors are logged). A later :meth:`append` opens a new segment.
        """
        try:
            with self._lock:
                segment = self._current_segment()
                self._segment = None
                if segment is not None and segment.close():
                    self._compact_quietly(segment.path)
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
